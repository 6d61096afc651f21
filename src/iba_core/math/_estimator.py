"""Streaming per-element mean / std / activity estimate of a feature map."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._xp import namespace, to_numpy

#: Format mark of an estimate's state (``Estimator.state_dict``, ``.npz`` files).  Version 1
#: (no mark) held the same arrays; it is refused because nothing vouched for its values.
ESTIMATE_FORMAT = "iba.estimate/2"
#: Format mark of an estimate made with an attention mask: version 2 plus ``count``, the
#: per-element number of samples in which the element was real.  Written only when some
#: element was padding somewhere, so unmasked estimates stay readable by older versions
#: (and these are refused there instead of being read without their counts).
MASKED_ESTIMATE_FORMAT = "iba.estimate/3"


class SavedStateError(ValueError):
    """A saved state (an ``.npz`` file or a state dict) that this version of iba cannot use:
    not written by iba, damaged, of another format version, or holding invalid values.
    The message names the file (when there is one) and what to do instead."""


def npz_path(path: str | os.PathLike) -> Path:
    """The file ``np.savez(path)`` writes: ``path`` with ``.npz`` appended unless it has it."""
    p = Path(os.fspath(path))
    return p if p.name.endswith(".npz") else p.with_name(p.name + ".npz")


def file_name(file: Any) -> str:
    """How messages name ``file``: a path, or an open file's ``name`` (else its repr)."""
    if isinstance(file, (str, os.PathLike)):
        return os.fspath(file)
    return str(getattr(file, "name", None) or repr(file))


def save_target(path: Any) -> Any:
    """Where ``np.savez`` should write: :func:`npz_path` of a path; an open file as it is."""
    return npz_path(path) if isinstance(path, (str, os.PathLike)) else path


def read_npz(path: Any, what: str, writer: str) -> tuple[Any, dict[str, np.ndarray]]:
    """``(file, arrays)`` of an ``.npz`` file written by ``writer`` (a method name);
    ``path`` is a path or an open binary file.

    The file is ``path`` with ``.npz`` appended when that suffix is missing (as the
    writers save it); a file at exactly ``path`` is read when no such ``.npz`` exists.
    Pickles are never loaded.  A missing or unreadable file raises the usual ``OSError``;
    anything that is not a plain ``.npz`` archive of arrays (empty, truncated, another
    format, object arrays) raises :class:`SavedStateError` naming the file.
    """
    if isinstance(path, (str, os.PathLike)):
        given = Path(os.fspath(path))
        file: Any = npz_path(given)
        if not file.exists() and given.exists():
            file = given
        if not file.exists():
            raise FileNotFoundError(
                f"no {what} at {os.fspath(given)!r}"
                + (f" (nor {os.fspath(file)!r})" if file != given else "")
                + f"; write one with {writer}"
            )
    else:  # an open binary file
        file = path
    name = file_name(file)
    reason = None
    try:
        data = np.load(file, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                state = {k: data[k] for k in data.files}
        else:
            reason = "a single .npy array, not an .npz archive"
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # BadZipFile, EOFError, zlib.error, pickles, ...
        text = str(exc)
        reason = (
            "it holds object arrays, which would need pickles"
            if "Object arrays" in text
            else "not a zip archive of arrays; pickled data is never loaded"
            if "pickle" in text
            else f"empty or cut short ({type(exc).__name__})"
            if isinstance(exc, EOFError)
            else f"a damaged or truncated archive ({type(exc).__name__})"
        )
    if reason is not None:
        raise SavedStateError(
            f"cannot read the {what} {name!r}: not an .npz file written by "
            f"{writer} ({reason}); the file is damaged or of another kind, write it again "
            f"with {writer}"
        ) from None
    return file, state


def check_format(state: Mapping[str, Any], accepted: Iterable[str], what: str, remedy: str) -> str:
    """The state's ``format`` mark, or :class:`SavedStateError` when it is missing or not
    one of ``accepted``; ``remedy`` says how to make a new state."""
    accepted = tuple(accepted)
    reads = " or ".join(repr(a) for a in accepted)
    if "format" not in state:
        raise SavedStateError(
            f"the {what} has no format mark: it was written by an older iba (or is not an iba "
            f"{what}); this version reads {reads}; {remedy}"
        )
    mark = np.asarray(state["format"])
    got = str(mark) if mark.dtype.kind == "U" and mark.ndim == 0 else None
    if got in accepted:
        return got
    age = "an unknown"
    match = re.fullmatch(r"(.+)/(\d+)", got or "")
    known = [re.fullmatch(r"(.+)/(\d+)", a) for a in accepted]
    for k in known:
        if match and k and match.group(1) == k.group(1):
            age = "an older" if int(match.group(2)) < int(k.group(2)) else "a newer"
    raise SavedStateError(
        f"the {what} has {age} format {got if got is not None else mark!r}; this version of "
        f"iba reads {reads}; {remedy}"
    )


class Estimator:
    """Welford/Chan running statistics of feature maps, one value per element.

    Call :meth:`update` with batches ``(B, *shape)`` of features.  Batches are merged with
    Chan's parallel formula, so feeding the data in any batching, or merging the
    estimates of several shards with :meth:`merge`, gives the same result up to
    round-off.  Statistics accumulate in float64 (NumPy on the host), which keeps long
    runs accurate and lets estimates from any backend be compared and combined.

    **Padding.**  ``update(batch, mask)`` leaves out the elements where ``mask`` is 0
    (e.g. the padded positions of sequences, mask ``(B, 1, T)`` for features
    ``(B, C, T)``): every element has its own sample count (:meth:`counts`), and its mean,
    std and active fraction are taken over the samples in which it was real; the merge
    is Chan's formula element by element, exact as before.  An element that was never
    real (a position that was padding in every sequence) gets the statistics of its
    channel (the first axis) pooled over all real elements of that channel, so an
    explanation that has a real token there still meets noise of the right scale.

    Attributes:
        n: number of samples seen (sequences, padded or not).
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
        self._count: np.ndarray | None = None  # per element: samples in which it was real

    # -- accumulation --------------------------------------------------------------
    def update(self, batch: Any, mask: Any = None) -> None:
        """Add a batch of features of shape ``(B, *shape)`` (any supported array type).

        ``mask`` (optional): 1/True where an element is real, 0/False where it is padding
        and must not enter the statistics; an array with one row per sample that
        broadcasts to the batch, e.g. ``(B, 1, T)`` for sequence features ``(B, C, T)``.
        The values of padded elements are never read (they may be anything, NaN included).

        Raises ``ValueError`` when the real elements hold NaN or inf, when the per-sample
        shape differs from earlier batches, or when the mask is not 0/1 of a fitting shape.
        """
        if not isinstance(batch, np.ndarray):
            namespace(batch)  # clear error for unsupported types
        b = np.asarray(to_numpy(batch), dtype=np.float64)
        if b.ndim < 1 or b.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch of shape (B, ...), got {b.shape}")
        real = None if mask is None else _element_mask(mask, b.shape)
        if real is not None and real.all():
            real = None  # nothing padded: exactly the unmasked update
        finite = np.isfinite(b) if real is None else np.isfinite(b) | ~real
        if not np.all(finite):
            bad = int(np.size(b) - np.count_nonzero(finite))
            raise ValueError(
                f"features contain {bad} NaN/inf values; check the model and the data "
                "(e.g. unnormalised inputs or a diverged model) before estimating"
            )
        n_b = b.shape[0]
        shape = tuple(b.shape[1:])
        if real is None:
            mean_b = b.mean(axis=0)
            m2_b = ((b - mean_b) ** 2).sum(axis=0)
            nonzero_b = np.count_nonzero(b, axis=0).astype(np.float64)
            count_b = np.full(shape, float(n_b))
        else:
            count_b = real.sum(axis=0).astype(np.float64)
            kept = np.where(real, b, 0.0)
            mean_b = _ratio(kept.sum(axis=0), count_b)
            m2_b = (np.where(real, kept - mean_b, 0.0) ** 2).sum(axis=0)
            nonzero_b = np.count_nonzero(kept, axis=0).astype(np.float64)
        self._merge(n_b, shape, mean_b, m2_b, nonzero_b, count_b)

    def merge(self, other: Estimator) -> Estimator:
        """Fold another estimate (e.g. from another data shard) into this one, exactly
        (element by element when the estimates were made with masks)."""
        if other.n == 0:
            return self
        if self.layer is not None and other.layer is not None and self.layer != other.layer:
            raise ValueError(
                f"cannot merge an estimate of layer {other.layer!r} into one of layer {self.layer!r}"
            )
        assert other._mean is not None and other._m2 is not None
        assert other._nonzero is not None and other.shape is not None and other._count is not None
        self._merge(other.n, other.shape, other._mean, other._m2, other._nonzero, other._count)
        return self

    def _merge(self, n_b: int, shape: tuple[int, ...], mean_b, m2_b, nonzero_b, count_b) -> None:
        self.version = next(Estimator._versions)
        if self.n == 0:
            self.shape = shape
            self.n = int(n_b)
            self._mean = np.array(mean_b, dtype=np.float64)
            self._m2 = np.array(m2_b, dtype=np.float64)
            self._nonzero = np.array(nonzero_b, dtype=np.float64)
            self._count = np.array(count_b, dtype=np.float64)
            return
        if shape != self.shape:
            raise ValueError(
                f"feature shape {shape} differs from the estimate's shape {self.shape}; "
                "call reset() to start a new estimate"
            )
        assert self._count is not None
        # Chan's formula per element, with each element's own counts (equal to the
        # scalar formula, bit for bit, when every element was real in every sample).
        count_a = self._count
        count = count_a + count_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * _ratio(count_b, count)
        self._m2 = self._m2 + m2_b + delta * delta * _ratio(count_a * count_b, count)
        self._nonzero = self._nonzero + nonzero_b
        self._count = count
        self.n = self.n + int(n_b)

    def reset(self) -> None:
        """Forget all samples."""
        Estimator.__init__(self)  # keeps layer and layout (read back with getattr)

    # -- results -------------------------------------------------------------------
    def _require(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The accumulated ``(mean, m2, nonzero)``; raises when the estimate is empty."""
        if self.n == 0:
            raise RuntimeError("the estimate is empty: call estimate()/update() with data first")
        assert self._mean is not None and self._m2 is not None and self._nonzero is not None
        return self._mean, self._m2, self._nonzero

    def counts(self) -> np.ndarray:
        """Per-element number of samples in which the element was real (not padding),
        shape ``(C, ...)``; ``n`` everywhere for an estimate made without masks."""
        self._require()
        assert self._count is not None
        return self._count.copy()

    def _unseen(self) -> tuple[np.ndarray, Any]:
        """``(unseen, pooled)``: where no sample was real, and (only when there are such
        elements) each channel's ``(mean, var, active fraction)`` over its real elements,
        shaped to broadcast against the statistics."""
        mean, m2, nonzero = self._require()
        assert self._count is not None
        count = self._count
        unseen = count == 0
        if not unseen.any():
            return unseen, None
        channels = mean.shape[0] if mean.ndim else 1
        cnt, mu = count.reshape(channels, -1), mean.reshape(channels, -1)
        n_c = cnt.sum(axis=1)
        mean_c = _ratio((cnt * mu).sum(axis=1), n_c)
        m2_c = m2.reshape(channels, -1).sum(axis=1) + (cnt * (mu - mean_c[:, None]) ** 2).sum(axis=1)
        var_c = _ratio(m2_c, n_c - 1.0, where=n_c >= 2)
        frac_c = _ratio(nonzero.reshape(channels, -1).sum(axis=1), n_c)
        like = (channels,) + (1,) * max(mean.ndim - 1, 0) if mean.ndim else ()
        return unseen, tuple(a.reshape(like) for a in (mean_c, var_c, frac_c))

    def mean(self) -> np.ndarray:
        """Per-element mean, shape ``(C, ...)`` (over the samples in which the element
        was real; see the class docstring for elements that never were)."""
        mean, _, _ = self._require()
        unseen, pooled = self._unseen()
        return mean.copy() if pooled is None else np.where(unseen, pooled[0], mean)

    def var(self) -> np.ndarray:
        """Per-element unbiased variance (``ddof=1``; zero for a single sample)."""
        _, m2, _ = self._require()
        assert self._count is not None
        var = _ratio(m2, self._count - 1.0, where=self._count >= 2)
        unseen, pooled = self._unseen()
        return var if pooled is None else np.where(unseen, pooled[1], var)

    def std(self) -> np.ndarray:
        """Per-element unbiased standard deviation, shape ``(C, ...)``."""
        return np.sqrt(self.var())

    def active_fraction(self) -> np.ndarray:
        """Per-element fraction of samples (in which the element was real) in which the
        feature was non-zero."""
        _, _, nonzero = self._require()
        assert self._count is not None
        fraction = _ratio(nonzero, self._count)
        unseen, pooled = self._unseen()
        return fraction if pooled is None else np.where(unseen, pooled[2], fraction)

    def active_mask(self, threshold: float = 0.01) -> np.ndarray:
        """1.0 where the feature was non-zero in more than ``threshold`` of samples."""
        return (self.active_fraction() > threshold).astype(np.float64)

    # -- persistence ---------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain NumPy state: ``format``, ``n``, ``mean``, ``m2``, ``nonzero``, and ``layer``
        and ``layout`` when known.  An estimate in which some element was padding in some
        sample also holds ``count`` (see :meth:`counts`) and is marked
        :data:`MASKED_ESTIMATE_FORMAT`; any other is marked :data:`ESTIMATE_FORMAT`."""
        mean, m2, nonzero = self._require()
        assert self._count is not None
        masked = bool(np.any(self._count != self.n))
        state = {
            "format": np.asarray(MASKED_ESTIMATE_FORMAT if masked else ESTIMATE_FORMAT),
            "n": np.asarray(self.n, dtype=np.int64),
            "mean": mean.copy(),
            "m2": m2.copy(),
            "nonzero": nonzero.copy(),
        }
        if masked:
            state["count"] = self._count.copy()
        if self.layer is not None:
            state["layer"] = np.asarray(str(self.layer))
        if self.layout is not None:
            state["layout"] = np.asarray(str(self.layout))
        return state

    def load_state_dict(
        self,
        state: Mapping[str, Any],
        expected_shape: tuple[int, ...] | None = None,
        expected_layer: str | None = None,
    ) -> None:
        """Restore from :meth:`state_dict` (in memory or read from a file), validating it.

        The state must carry the format mark :data:`ESTIMATE_FORMAT` or
        :data:`MASKED_ESTIMATE_FORMAT` (estimates of older versions are refused: estimate
        again) and sound values: finite statistics of one shape, ``m2 >= 0``, a whole
        ``n >= 1``, ``0 <= nonzero <= n`` and, in a masked estimate, whole counts
        ``0 <= count <= n`` with ``nonzero <= count``.  ``expected_shape`` (the per-sample
        feature shape of the layer) and ``expected_layer`` (its name) are checked when
        given, so an estimate from another layer or model is refused.  Problems raise
        :class:`SavedStateError` (a ``ValueError``); the estimator is left as it was.
        """
        remedy = "make a new estimate with estimate() (or update()) and save()"
        missing = {"n", "mean", "m2", "nonzero"} - set(state)
        if missing:
            raise SavedStateError(
                f"the estimate state lacks {sorted(missing)}; it was not "
                f"written by Estimator.save()/state_dict(); {remedy}"
            )
        mark = check_format(state, (ESTIMATE_FORMAT, MASKED_ESTIMATE_FORMAT), "estimate", remedy)
        if mark == MASKED_ESTIMATE_FORMAT and "count" not in state:
            raise SavedStateError(f"the masked estimate state lacks its per-element 'count'; {remedy}")
        mean, m2, nonzero = (_finite_numbers(state, key, remedy) for key in ("mean", "m2", "nonzero"))
        n = _sample_count(state, remedy)
        text = {key: _saved_text(state, key, remedy) for key in ("layer", "layout") if key in state}
        _check_statistics(mean, m2, nonzero, n, remedy)
        if mark == MASKED_ESTIMATE_FORMAT:
            count = _finite_numbers(state, "count", remedy)
            _check_counts(count, mean.shape, nonzero, n, remedy)
        else:
            count = np.full(mean.shape, float(n))
        layer, layout = text.get("layer"), text.get("layout")
        if expected_layer is not None and layer is not None and layer != expected_layer:
            raise SavedStateError(
                f"the estimate was made for layer {layer!r}, not "
                f"{expected_layer!r}; estimate again for this layer"
            )
        if expected_shape is not None and tuple(mean.shape) != tuple(expected_shape):
            raise SavedStateError(
                f"the estimate has feature shape {mean.shape} but the layer produces "
                f"{tuple(expected_shape)}; estimate again for this layer"
            )
        self.n, self.shape = n, tuple(mean.shape)
        self._mean, self._m2, self._nonzero, self._count = mean, m2, nonzero, count
        self.layer, self.layout = layer, layout
        self.version = next(Estimator._versions)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the estimate to an ``.npz`` file (a path or an open binary file); returns
        the file written.

        As with ``np.savez``, ``.npz`` is appended to a path without that suffix
        (``save("stats")`` writes ``stats.npz``); :meth:`load` finds it under either name.
        """
        file = save_target(path)
        state: dict[str, Any] = self.state_dict()
        np.savez(file, **state)
        return file

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected_shape: tuple[int, ...] | None = None,
        expected_layer: str | None = None,
    ) -> Estimator:
        """Read an estimate written by :meth:`save`; see :meth:`load_state_dict`.

        ``path`` may omit the ``.npz`` suffix, as :meth:`save` adds it.  A file that is
        not such an estimate (damaged, another format version, invalid values) raises
        :class:`SavedStateError` naming the file; pickles are never loaded.
        """
        file, state = read_npz(path, "estimate", "Estimator.save()")
        est = cls()
        try:
            est.load_state_dict(state, expected_shape, expected_layer)
        except ValueError as exc:
            raise SavedStateError(f"cannot use the estimate {file_name(file)!r}: {exc}") from None
        return est

    def __repr__(self) -> str:
        return f"Estimator(n={self.n}, shape={self.shape})"


def _ratio(a: np.ndarray, b: np.ndarray, where: Any = None) -> np.ndarray:
    """``a / b`` element by element, 0 where ``b`` is 0 (or where ``where`` is false)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    where = b != 0 if where is None else where
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape)), where=where)


def _element_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` (0/1 or booleans, one row per sample) as booleans of the batch's ``shape``."""
    m = np.asarray(mask if isinstance(mask, np.ndarray) else to_numpy(mask))
    if m.dtype.kind not in "biuf" or not np.all((m == 0) | (m == 1)):
        raise ValueError(
            f"the mask must hold only 0/1 (or False/True): 1 = real, 0 = padding; got dtype {m.dtype}"
        )
    fits = m.ndim == len(shape) and m.shape[0] == shape[0]
    if fits:
        try:
            return np.broadcast_to(m != 0, shape)
        except ValueError:
            pass
    raise ValueError(
        f"the mask has shape {m.shape} but the batch {shape}: it needs one row per sample and "
        f"must broadcast to the batch (e.g. (B, 1, T) for sequence features (B, C, T))"
    )


def _check_counts(
    count: np.ndarray, shape: tuple[int, ...], nonzero: np.ndarray, n: int, remedy: str
) -> None:
    """Refuse per-element counts of another shape, not whole, outside ``[0, n]`` or below
    the non-zero counts."""
    if count.shape != shape:
        raise SavedStateError(f"the estimate's 'count' has shape {count.shape}, not {shape}; {remedy}")
    if np.any(count != np.round(count)) or np.any(count < 0) or np.any(count > n):
        raise SavedStateError(
            f"the estimate's 'count' must hold whole numbers in [0, n = {n}], got "
            f"[{count.min():g}, {count.max():g}]; {remedy}"
        )
    if np.any(nonzero > count):
        raise SavedStateError(f"the estimate's 'nonzero' counts exceed its per-element 'count'; {remedy}")


def _finite_numbers(state: Mapping[str, Any], key: str, remedy: str) -> np.ndarray:
    """``state[key]`` as float64, refused unless it holds finite numbers."""
    a = np.asarray(state[key])
    if a.dtype.kind not in "iuf":
        raise SavedStateError(f"the estimate's {key!r} holds {a.dtype} values, not numbers; {remedy}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise SavedStateError(f"the estimate's {key!r} holds NaN/inf values; {remedy}")
    return a


def _sample_count(state: Mapping[str, Any], remedy: str) -> int:
    """The saved sample count ``n``: one whole number >= 1."""
    n_arr = np.asarray(state["n"])
    if (
        n_arr.size != 1
        or n_arr.dtype.kind not in "iuf"
        or not np.isfinite(n_arr).all()
        or n_arr.reshape(()) != np.round(n_arr)
    ):
        raise SavedStateError(
            f"the estimate's sample count 'n' must be one whole number, got {n_arr!r}; {remedy}"
        )
    n = int(n_arr.reshape(()))
    if n < 1:
        raise SavedStateError(f"the estimate holds no samples (n = {n}); {remedy}")
    return n


def _saved_text(state: Mapping[str, Any], key: str, remedy: str) -> str:
    """``state[key]`` (``"layer"`` or ``"layout"``), refused unless it is one string."""
    v = np.asarray(state[key])
    if v.dtype.kind != "U" or v.ndim != 0:
        raise SavedStateError(f"the estimate's {key!r} must be a string, got {v.dtype} {v.shape}; {remedy}")
    return str(v)


def _check_statistics(mean: np.ndarray, m2: np.ndarray, nonzero: np.ndarray, n: int, remedy: str) -> None:
    """Refuse statistics of different shapes, negative ``m2`` or counts outside ``[0, n]``."""
    if not (mean.shape == m2.shape == nonzero.shape):
        raise SavedStateError(
            f"inconsistent estimate: mean {mean.shape}, m2 {m2.shape}, nonzero "
            f"{nonzero.shape} (they must have one shape); {remedy}"
        )
    if np.any(m2 < 0):
        raise SavedStateError(
            f"the estimate's 'm2' (sums of squared deviations) holds negative values; {remedy}"
        )
    if np.any(nonzero < 0) or np.any(nonzero > n):
        raise SavedStateError(
            f"the estimate's 'nonzero' counts must lie in [0, n = {n}], "
            f"got [{nonzero.min():g}, {nonzero.max():g}]; {remedy}"
        )
