"""Streaming per-element mean / std / activity estimate of a feature map."""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

from ._xp import namespace, to_numpy


class Estimator:
    """Welford/Chan running statistics of feature maps, one value per element.

    Call :meth:`update` with batches ``(B, *shape)`` of features.  Batches are merged with
    Chan's parallel formula, so feeding the data in any batching, or merging the
    estimates of several shards with :meth:`merge`, gives the same result up to
    round-off.  Statistics accumulate in float64 (NumPy on the host), which keeps long
    runs accurate and lets estimates from any backend be compared and combined.

    Attributes:
        n: number of samples seen.
        shape: the per-sample feature shape ``(C, ...)``, or ``None`` before any update.
        version: a number that changes with every change of the estimate (update, merge,
            reset, load), so caches of statistics derived from it know when to refresh.
        layer: name of the layer the features come from (saved with the estimate, so
            an estimate is refused for another layer), or ``None``.
        layout: ``"channels_first"``/``"channels_last"``: the layer's own layout (the
            statistics themselves are always channels-first), or ``None``.
    """

    _versions = itertools.count(1)

    def __init__(self) -> None:
        self.version = next(Estimator._versions)
        self.layer: str | None = getattr(self, "layer", None)
        self.layout: str | None = getattr(self, "layout", None)
        self.n = 0
        self.shape: tuple[int, ...] | None = None
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None
        self._nonzero: np.ndarray | None = None

    # -- accumulation --------------------------------------------------------------
    def update(self, batch: Any) -> None:
        """Add a batch of features of shape ``(B, *shape)`` (any supported array type).

        Raises ``ValueError`` when the batch holds NaN or inf, or when its per-sample
        shape differs from earlier batches.
        """
        if not isinstance(batch, np.ndarray):
            namespace(batch)  # clear error for unsupported types
        b = np.asarray(to_numpy(batch), dtype=np.float64)
        if b.ndim < 1 or b.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch of shape (B, ...), got {b.shape}")
        if not np.all(np.isfinite(b)):
            bad = int(np.size(b) - np.count_nonzero(np.isfinite(b)))
            raise ValueError(
                f"features contain {bad} NaN/inf values; check the model and the data "
                "(e.g. unnormalised inputs or a diverged model) before estimating"
            )
        n_b = b.shape[0]
        mean_b = b.mean(axis=0)
        m2_b = ((b - mean_b) ** 2).sum(axis=0)
        nonzero_b = np.count_nonzero(b, axis=0).astype(np.float64)
        self._merge(n_b, tuple(b.shape[1:]), mean_b, m2_b, nonzero_b)

    def merge(self, other: Estimator) -> Estimator:
        """Fold another estimate (e.g. from another data shard) into this one, exactly."""
        if other.n == 0:
            return self
        if self.layer is not None and other.layer is not None and self.layer != other.layer:
            raise ValueError(f"cannot merge an estimate of layer {other.layer!r} into one of "
                             f"layer {self.layer!r}")
        assert other._mean is not None and other._m2 is not None
        assert other._nonzero is not None and other.shape is not None
        self._merge(other.n, other.shape, other._mean, other._m2, other._nonzero)
        return self

    def _merge(self, n_b: int, shape: tuple[int, ...], mean_b, m2_b, nonzero_b) -> None:
        self.version = next(Estimator._versions)
        if self.n == 0:
            self.shape = shape
            self.n = int(n_b)
            self._mean = np.array(mean_b, dtype=np.float64)
            self._m2 = np.array(m2_b, dtype=np.float64)
            self._nonzero = np.array(nonzero_b, dtype=np.float64)
            return
        if shape != self.shape:
            raise ValueError(
                f"feature shape {shape} differs from the estimate's shape {self.shape}; "
                "call reset() to start a new estimate"
            )
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta * delta * (n_a * n_b / n)
        self._nonzero = self._nonzero + nonzero_b
        self.n = n

    def reset(self) -> None:
        """Forget all samples."""
        self.__init__()

    # -- results -------------------------------------------------------------------
    def _require(self) -> None:
        if self.n == 0:
            raise RuntimeError("the estimate is empty: call estimate()/update() with data first")

    def mean(self) -> np.ndarray:
        """Per-element mean, shape ``(C, ...)``."""
        self._require()
        return self._mean.copy()

    def var(self) -> np.ndarray:
        """Per-element unbiased variance (``ddof=1``; zero for a single sample)."""
        self._require()
        if self.n < 2:
            return np.zeros_like(self._m2)
        return self._m2 / (self.n - 1)

    def std(self) -> np.ndarray:
        """Per-element unbiased standard deviation, shape ``(C, ...)``."""
        return np.sqrt(self.var())

    def active_fraction(self) -> np.ndarray:
        """Per-element fraction of samples in which the feature was non-zero."""
        self._require()
        return self._nonzero / self.n

    def active_mask(self, threshold: float = 0.01) -> np.ndarray:
        """1.0 where the feature was non-zero in more than ``threshold`` of samples."""
        return (self.active_fraction() > threshold).astype(np.float64)

    # -- persistence ---------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain NumPy state: ``n``, ``mean``, ``m2``, ``nonzero``, and ``layer`` and
        ``layout`` when known."""
        self._require()
        state = {
            "n": np.asarray(self.n, dtype=np.int64),
            "mean": self._mean.copy(),
            "m2": self._m2.copy(),
            "nonzero": self._nonzero.copy(),
        }
        if self.layer is not None:
            state["layer"] = np.asarray(str(self.layer))
        if self.layout is not None:
            state["layout"] = np.asarray(str(self.layout))
        return state

    def load_state_dict(
        self, state: dict[str, Any], expected_shape: tuple[int, ...] | None = None,
        expected_layer: str | None = None,
    ) -> None:
        """Restore from :meth:`state_dict`, validating keys and shapes.

        ``expected_shape`` (the per-sample feature shape of the layer) and
        ``expected_layer`` (its name) are checked when given, so an estimate from another
        layer or model is refused.
        """
        missing = {"n", "mean", "m2", "nonzero"} - set(state)
        if missing:
            raise ValueError(f"estimate state lacks {sorted(missing)}; was it saved by iba?")
        mean = np.asarray(state["mean"], dtype=np.float64)
        m2 = np.asarray(state["m2"], dtype=np.float64)
        nonzero = np.asarray(state["nonzero"], dtype=np.float64)
        n = int(np.asarray(state["n"]))
        layer = str(np.asarray(state["layer"])) if "layer" in state else None
        layout = str(np.asarray(state["layout"])) if "layout" in state else None
        if not (mean.shape == m2.shape == nonzero.shape):
            raise ValueError(
                f"inconsistent estimate: mean {mean.shape}, m2 {m2.shape}, nonzero {nonzero.shape}"
            )
        if expected_layer is not None and layer is not None and layer != expected_layer:
            raise ValueError(f"the estimate was made for layer {layer!r}, not "
                             f"{expected_layer!r}; estimate again for this layer")
        if expected_shape is not None and tuple(mean.shape) != tuple(expected_shape):
            raise ValueError(
                f"the estimate has feature shape {mean.shape} but the layer produces "
                f"{tuple(expected_shape)}; estimate again for this layer"
            )
        if n < 1:
            raise ValueError("the estimate holds no samples")
        self.n, self.shape = n, tuple(mean.shape)
        self._mean, self._m2, self._nonzero = mean, m2, nonzero
        self.layer, self.layout = layer, layout
        self.version = next(Estimator._versions)

    def save(self, path: str | os.PathLike) -> None:
        """Write the estimate to an ``.npz`` file."""
        np.savez(path, **self.state_dict())

    @classmethod
    def load(
        cls, path: str | os.PathLike, expected_shape: tuple[int, ...] | None = None,
        expected_layer: str | None = None,
    ) -> Estimator:
        """Read an estimate written by :meth:`save`; see :meth:`load_state_dict`."""
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
        est = cls()
        est.load_state_dict(state, expected_shape, expected_layer)
        return est

    def __repr__(self) -> str:
        return f"Estimator(n={self.n}, shape={self.shape})"
