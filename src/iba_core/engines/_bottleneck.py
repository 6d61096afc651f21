"""The Per-Sample Bottleneck, written once for every backend."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any, NamedTuple

import numpy as np

from ..contract._backend import Backend
from ..math._adam import adam_init, adam_kernel, adam_schedule
from ..math._capacity import capacity as capacity_fn
from ..math._capacity import capacity_from_mask, capacity_partials, inject_folded, restriction_mask
from ..math._estimator import Estimator
from ..math._linear_ops import adjoint_operands, apply_operands, smoothing_matrix, smoothing_operands
from ..math._xp import namespace, sigmoid_pair
from ._config import FIELDS, IBAConfig, LiveSettings
from ._distributed import agree, collectives, sharded_estimate
from ._padding import check_sequence_mask, record_masked, warn_unseen

MIN_RECOMMENDED_SAMPLES = 1000


class FewSamplesWarning(UserWarning):
    """The feature statistics rest on fewer samples than recommended (1,000)."""


class _StopForward(Exception):
    """Raised by the hook to end a forward pass early (see ``interrupt``)."""


class FeatureRecorder:
    """The one feature recorder: a layer hook that keeps the features it sees while active.

    Used by the bottleneck (estimation, the first pass of an explanation) and by the
    readout's layers.  Features are cut from any gradient graph; with ``interrupt`` the
    forward pass ends right after the layer (see :meth:`Bottleneck.interruptible`).
    """

    def __init__(self, label: str = "the bottleneck layer") -> None:
        self.label = label
        self.backend: Backend | None = None
        self.active = False
        self.interrupt = False
        self.features: list[Any] = []

    def start(self, backend: Backend, *, interrupt: bool = False) -> None:
        self.backend, self.active, self.interrupt, self.features = backend, True, interrupt, []

    def stop(self) -> None:
        self.active = self.interrupt = False

    def __call__(self, features: Any) -> None:
        if self.active:
            assert self.backend is not None
            self.features.append(self.backend.stop_gradient(features))
            if self.interrupt:
                raise _StopForward
        return None

    def take(self) -> Any:
        """The features of the one call of the layer; a clear error for none or several."""
        if not self.features:
            raise RuntimeError(
                f"{self.label} never ran in the forward pass; choose a layer that the model "
                "computes on every input (and that belongs to the model that is run)"
            )
        if len(self.features) > 1:
            raise RuntimeError(
                f"{self.label} ran {len(self.features)} times in one forward pass; choose a "
                "layer that the model calls exactly once"
            )
        return self.features[0]


def is_half(dtype: Any) -> bool:
    """Whether ``dtype`` (any framework's) is a 16-bit float: ``float16`` or ``bfloat16``."""
    return re.search(r"\b(b?float16|half)\b", str(dtype)) is not None


def working_precision(xp: Any, x: Any) -> Any:
    """``x`` in the precision the bottleneck computes in: 16-bit floats become float32.

    Statistics, the mask (alpha and its Adam state) and the capacity are kept in float32
    for models that run in float16 or bfloat16 (their range and resolution are too small
    for the capacity's logarithms and Adam's second moments); the noisy features handed
    back to the model are cast to the model's dtype again (see :meth:`Bottleneck._inject`).
    """
    return xp.astype(x, xp.float32) if is_half(x.dtype) else x


def repeat_inputs(xp: Any, x: Any, times: int) -> Any:
    """``(N, ...) -> (N * times, ...)`` with each input repeated ``times`` times in a row."""
    n = x.shape[0]
    rest = tuple(x.shape[1:])
    tiled = xp.broadcast_to(xp.expand_dims(x, axis=1), (n, times, *rest))
    return xp.reshape(tiled, (n * times, *rest))


class _Noise:
    """Standard-normal draws for ``n_inputs`` inputs, ``batch_size`` copies each.

    With an integer seed, input ``i`` draws from its own stream seeded by ``seed + i``;
    a sequence gives one seed per input.  Input ``i`` therefore gets the same noise when
    explained alone with seed ``seed + i`` as among others.  ``source="numpy"``
    draws on the host with NumPy (identical numbers on every backend and device);
    ``"backend"`` draws with the framework's generator on the features' device.
    """

    def __init__(
        self,
        backend: Backend,
        like: Any,
        n_inputs: int,
        batch_size: int,
        seed: int | Sequence[int] | None,
        source: str,
    ) -> None:
        if source not in ("backend", "numpy"):
            raise ValueError(f"noise source must be 'backend' or 'numpy', got {source!r}")
        self.backend, self.like = backend, like
        self.n_inputs, self.batch_size = n_inputs, batch_size
        self.source = source
        seeds: list[int | None] = [None] * n_inputs
        self.generator = None
        if seed is not None and not isinstance(seed, (int, np.integer, Sequence)):
            # A framework generator object (e.g. torch.Generator): one stream for all.
            if source == "numpy":
                raise ValueError("noise='numpy' needs an integer seed, not a generator")
            self.generator, seed = seed, None
        if seed is not None:
            if isinstance(seed, (int, np.integer)):
                per_input = [int(seed) + i for i in range(n_inputs)]
            else:
                per_input = [int(s) for s in seed]
                if len(per_input) != n_inputs:
                    raise ValueError(f"got {len(per_input)} seeds for {n_inputs} inputs")
            # Spread nearby integers into unrelated streams.
            seeds = [int(np.random.SeedSequence(s).generate_state(1)[0]) for s in per_input]
        self.streams: list[Any] | None
        if source == "numpy":
            self.streams = [np.random.default_rng(s) for s in seeds]
        elif seed is not None:
            # Every input has an integer seed once a seed is given.
            self.streams = [backend.make_generator(s, like) for s in seeds if s is not None]
        else:
            self.streams = None

    def draw(self, sample_shape: tuple[int, ...]) -> Any:
        shape = (self.batch_size, *sample_shape)
        if self.source == "numpy":
            assert self.streams is not None  # numpy noise always has its streams
            a = np.concatenate([rng.standard_normal(shape) for rng in self.streams])
            return self.backend.from_numpy(a, like=self.like)  # takes like's float dtype
        if self.streams is None:
            eps, self.generator = self.backend.draw(
                (self.n_inputs * self.batch_size, *sample_shape), self.like, self.generator
            )
            return eps
        parts = []
        for i, g in enumerate(self.streams):
            eps, self.streams[i] = self.backend.draw(shape, self.like, g)
            parts.append(eps)
        if len(parts) == 1:
            return parts[0]
        return self.backend.namespace().concat(parts, axis=0)


def _progress(enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar (``update``/``close``) when enabled and tqdm is installed, else ``None``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the framework extras
        warnings.warn("progress bars need tqdm: pip install tqdm", stacklevel=3)
        return None
    return tqdm(**kwargs)


def _given_statistic(name: str, what: str) -> property:
    """A per-sample feature statistic given directly (channels-first, float64) or ``None``;
    every assignment is checked and refreshes the cached statistics."""

    def get(self: Bottleneck) -> np.ndarray | None:
        return self.__dict__.get("_" + name)

    def set_(self: Bottleneck, value: Any) -> None:
        self.__dict__["_" + name] = None if value is None else _float_array(value)
        self._given_version += 1
        self._check_given()

    return property(get, set_, doc=f"Given per-sample feature {what} (channels-first, float64), or ``None``.")


class Bottleneck(LiveSettings):
    """A Per-Sample Bottleneck's state at one layer: settings, statistics, hook, optimisation.

    The engine (:class:`~iba_core.PerSampleBottleneck`) puts :meth:`__call__` on the layer
    through its backend and calls :meth:`estimate` and :meth:`optimize`; the readout
    engine uses its statistics and noise injection.  The hook sees channels-first features
    ``(N, C, ...)`` (the engine converts other layouts).

    Args:
        config: an :class:`IBAConfig`; keyword settings (``beta=...``) override it.
        feature_mean, feature_std: statistics given directly (NumPy-convertible,
            channels-first per-sample shape), instead of or overriding an estimate.
        estimator: an :class:`Estimator` to start from (e.g. loaded from a file).
        backend: the backend of the model (the engine sets it).
        **settings: fields of :class:`IBAConfig`, validated the same way.
    """

    def __init__(
        self,
        config: IBAConfig | None = None,
        *,
        feature_mean: Any = None,
        feature_std: Any = None,
        estimator: Estimator | None = None,
        backend: Backend | None = None,
        **settings: Any,
    ) -> None:
        base = config if config is not None else IBAConfig()
        #: The live settings (an immutable :class:`IBAConfig`; assign a new one to change).
        self.config: IBAConfig = base.replace(**settings) if settings else base
        #: The settings the last explanation was made with (``capacity()`` and
        #: ``restricting()`` use them); ``None`` before the first.
        self.last_config: IBAConfig | None = None
        self.estimator = estimator if estimator is not None else Estimator()
        self._given_version = 0
        self.feature_mean = feature_mean
        self.feature_std = feature_std
        #: The mask logits of the last explanation, ``(N, C, ...)``, in the backend's type.
        self.alpha: Any = None
        self.backend: Backend | None = backend
        #: Where the last optimisation made the noisy copies: ``"input"`` or ``"layer"``
        #: (``"input"`` also when ``copies="layer"`` was asked for but the model fell back).
        self.copies_made_at: str | None = None
        self._mode = "pass"
        self._recorder = FeatureRecorder()
        self._active_alpha: Any = None
        self._mask: tuple[Any, ...] | None = None
        self._noise: Any = None
        self._calls = 0
        self._per_pass = False
        self._last_features: Any = None
        self._last_padding: np.ndarray | None = None
        self._active_padding: np.ndarray | None = None
        self._stats_cache: dict[Any, tuple[Any, Any, Any]] = {}
        self._stats_version: Any = None
        self._compiled_steps: dict[Any, Any] = {}

    feature_mean = _given_statistic("feature_mean", "mean")
    feature_std = _given_statistic("feature_std", "std")

    def _check_given(self) -> None:
        mean, std = getattr(self, "_feature_mean", None), getattr(self, "_feature_std", None)
        if mean is not None and std is not None and mean.shape != std.shape:
            raise ValueError(
                f"feature_mean {mean.shape} and feature_std {std.shape} must have the same shape"
            )

    # -- statistics ----------------------------------------------------------------
    def has_statistics(self) -> bool:
        """Whether mean and std are known (estimated or given)."""
        return (self.feature_mean is not None or self.estimator.n > 0) and (
            self.feature_std is not None or self.estimator.n > 0
        )

    def statistics(self, config: IBAConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, std, active)`` as float64 NumPy arrays of the per-sample shape.

        ``std`` is clamped to ``min_std``.  Elements whose std is 0 (possible only with
        ``min_std=0``) are constant, carry no information, and are marked inactive (their
        std is set to 1 to keep the arithmetic finite).  ``config``: the settings to use
        (default: the live ones).
        """
        config = self.config if config is None else config
        if not self.has_statistics():
            raise RuntimeError(
                "the bottleneck has no feature statistics: call estimate() on some data "
                "first, or pass feature_mean and feature_std"
            )
        est = self.estimator
        mean = self.feature_mean if self.feature_mean is not None else est.mean()
        std = self.feature_std if self.feature_std is not None else est.std()
        if mean.shape != std.shape:
            raise ValueError(f"feature mean {mean.shape} and std {std.shape} differ in shape")
        if est.n > 0 and est.shape == mean.shape:
            active = est.active_mask(config.active_neurons_threshold)
        else:
            active = np.ones_like(mean)
        std = np.maximum(std, config.min_std)
        constant = std <= 0
        if np.any(constant):
            active = np.where(constant, 0.0, active)
            std = np.where(constant, 1.0, std)
        return mean, std, active

    def _stats_like(
        self, features: Any, backend: Backend, config: IBAConfig | None = None
    ) -> tuple[Any, Any, Any]:
        config = self.config if config is None else config
        # Every change of the estimate (its version), of the given statistics or of the
        # settings they depend on refreshes the cache.
        version = (
            id(self.estimator),
            self.estimator.version,
            self._given_version,
            config.min_std,
            config.active_neurons_threshold,
        )
        if version != self._stats_version:
            self._stats_cache.clear()
            self._stats_version = version
        key = (type(features), str(getattr(features, "device", "")), str(features.dtype))
        cached = self._stats_cache.get(key)
        if cached is None:
            mean, std, active = self.statistics(config)
            sample_shape = tuple(int(n) for n in features.shape[1:])
            if sample_shape != mean.shape:
                raise ValueError(
                    f"the layer outputs features of shape {sample_shape} per sample "
                    f"(channels first) but the statistics have shape {mean.shape}; estimate() "
                    "again on this layer (or pass feature_mean/feature_std of the right shape)"
                )
            cached = tuple(
                backend.from_numpy(a.astype(np.float64), like=features) for a in (mean, std, active)
            )
            self._stats_cache[key] = cached
        return cached

    def copies_per_input(self, batch_size: int | None = None) -> int:
        """Noisy copies of each input per step: ``batch_size`` if given, else the setting."""
        if batch_size is None:
            return self.config.batch_size
        return self.config.replace(batch_size=batch_size).batch_size

    def reset_estimate(self) -> None:
        """Forget the estimate (the given ``feature_mean``/``feature_std`` too)."""
        self.estimator.reset()
        self.feature_mean = self.feature_std = None

    # -- the hook ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether the hook is recording or restricting (not just passing features on)."""
        return self._mode != "pass"

    @contextlib.contextmanager
    def counting_passes(self) -> Iterator[Callable[[], None]]:
        """Context of :meth:`restricting` for a model run many times: yields
        ``new_pass()``, to be called when a forward pass of the model begins; the hook then
        refuses a layer that runs more than once in one pass."""
        saved = self._per_pass

        def new_pass() -> None:
            self._calls = 0

        self._per_pass, self._calls = True, 0
        try:
            yield new_pass
        finally:
            self._per_pass = saved

    def __call__(self, features: Any) -> Any:
        """Layer hook: features ``(N, C, ...)`` channels-first; returns replacement or ``None``."""
        if self._mode == "pass":
            return None
        if self._mode == "record":
            return self._recorder(features)
        # restrict
        backend = self.backend
        assert backend is not None
        self._calls += 1
        # One forward pass per optimisation step; restrict_flow() may run the model often
        # and counts per pass where the engine knows where passes begin.
        if self._calls > 1 and (self._mask is not None or self._per_pass):
            raise RuntimeError(
                "the bottleneck layer ran more than once in one forward pass, so the noise "
                "would be added several times; put the bottleneck on a layer that the model "
                "calls exactly once"
            )
        if self._mask is not None:
            return self._noisy_copies(features, self._noise)
        # restrict_flow() and the readout: the same injection with a given mask.
        config = self.last_config or self.config
        xp = backend.namespace()
        model_features, features = features, working_precision(xp, features)
        mean, std, active = self._stats_like(features, backend, config)
        alpha = self._active_alpha
        if str(alpha.dtype) != str(features.dtype):
            alpha = xp.astype(alpha, features.dtype)
        n = int(features.shape[0])
        if int(alpha.shape[0]) not in (1, n):
            raise ValueError(
                f"the mask holds {alpha.shape[0]} inputs but the batch has {n};"
                " restrict_flow() needs a batch of the explained inputs or one mask to broadcast"
            )
        noise = self._noise
        if noise is None or tuple(noise.shape) != tuple(features.shape):
            noise, _ = backend.draw(tuple(features.shape), features)
        if int(alpha.shape[0]) != n:
            alpha = xp.broadcast_to(alpha, tuple(features.shape))
        fns = _step_functions(backend, config.sigma, config.relu, False)
        operands = smoothing_operands(features, config.sigma, features.ndim - 2)
        padding, pad_terms = self._active_padding, None
        if padding is not None and features.ndim == 3 and tuple(padding.shape) == (n, int(features.shape[2])):
            # The last explanation's attention mask: its padding passes unchanged.
            active, pad_terms, operands = padding_terms(backend, features, padding, active, config.sigma)
        mask = fns.mask(alpha, active, mean * active, std * active, operands, pad_terms)
        return self._inject(model_features, noise, (*mask, fns.inject))

    def _noisy_copies(self, features: Any, noise: Any) -> Any:
        """The optimisation loop's injection: ``batch_size`` noisy copies of each input."""
        assert self._mask is not None
        return self._inject(features, noise, self._mask)

    def _inject(self, features: Any, noise: Any, mask: tuple[Any, ...]) -> Any:
        """Noisy features: the one injection path of the optimiser, restrict_flow and readout.

        ``mask = (lambda_a, mu_a, sigma_a, inject)``: the mask terms are shaped
        ``(N, 1, C, ...)`` and the standard noise ``(N * copies, C, ...)``.  ``features``
        hold the N inputs either once each (the copies are made here) or already repeated
        ``copies`` times.  With ``mu_a = (1 - lambda) * mean * active`` and
        ``sigma_a = (1 - lambda) * std * active``, ``Z = lambda * R + mu_a + sigma_a * eps``
        equals ``active * (lambda * R + (1 - lambda) * (mean + std * eps))`` with two
        full-size operations instead of six.  The mask terms set the precision of the
        arithmetic (float32 for 16-bit models); the result has the features' dtype.
        """
        assert self.backend is not None
        xp = self.backend.namespace()
        lam, shift, scale, inject = mask
        dtype = features.dtype
        if str(dtype) != str(lam.dtype):
            features = xp.astype(features, lam.dtype)
        if str(noise.dtype) != str(lam.dtype):
            noise = xp.astype(noise, lam.dtype)
        n_in = int(lam.shape[0])
        rows, sample = int(features.shape[0]), tuple(int(s) for s in features.shape[1:])
        total = int(noise.shape[0])
        if rows not in (n_in, total):
            raise ValueError(
                f"the bottleneck layer saw a batch of {rows} for {n_in} inputs with "
                f"{total // n_in} noise copies each; the model must keep the batch axis first"
            )
        grouped = xp.reshape(features, (n_in, rows // n_in, *sample))
        eps = xp.reshape(noise, (n_in, total // n_in, *sample))
        z = xp.reshape(inject(grouped, lam, shift, scale, eps), (total, *sample))
        return z if str(z.dtype) == str(dtype) else xp.astype(z, dtype)

    @contextlib.contextmanager
    def _state(
        self,
        mode: str,
        *,
        interrupt: bool = False,
        alpha: Any = None,
        mask: tuple[Any, ...] | None = None,
        noise: Any = None,
        padding: np.ndarray | None = None,
    ) -> Iterator[None]:
        saved = (self._mode, self._active_alpha, self._mask, self._noise, self._calls, self._recorder)
        saved_padding = self._active_padding
        self._mode = mode
        self._active_alpha, self._mask, self._noise, self._calls = alpha, mask, noise, 0
        self._active_padding = padding
        self._recorder = FeatureRecorder()
        if mode == "record":
            self._recorder.start(self._require_backend(), interrupt=interrupt)
        try:
            yield
        finally:
            self._recorder.stop()
            (self._mode, self._active_alpha, self._mask, self._noise, self._calls, self._recorder) = saved
            self._active_padding = saved_padding

    def recording(self, *, interrupt: bool = False) -> contextlib.AbstractContextManager[None]:
        """Context: the hook records the features it sees (in ``recorded``).

        With ``interrupt=True`` it also ends the forward pass right after the layer;
        wrap the model call in :meth:`interruptible` to swallow that.
        """
        return self._state("record", interrupt=interrupt)

    @property
    def expected_rows(self) -> int | None:
        """Inside an optimisation step: the rows every model output must have (all noisy
        copies of all inputs); ``None`` elsewhere."""
        if self._mask is None or self._noise is None:
            return None
        return int(self._noise.shape[0])

    def take_recorded(self) -> Any:
        """Inside :meth:`recording`: the features of the layer's one call in the pass
        (a clear error when it ran never or several times)."""
        return self._recorder.take()

    @property
    def recorded(self) -> list[Any]:
        """Features recorded by the hook in the current :meth:`recording` context."""
        return self._recorder.features

    def restricting(
        self, alpha: Any | None = None, noise: Any = None
    ) -> contextlib.AbstractContextManager[None]:
        """Context: the hook injects noise with mask logits ``alpha`` (default: the last,
        with the last explanation's attention mask: padding passes unchanged), with the
        settings of the last explanation."""
        padding = self._last_padding if alpha is None else None
        alpha = self.alpha if alpha is None else alpha
        if alpha is None:
            raise RuntimeError("no mask to restrict the flow with: call analyze() first")
        return self._state("restrict", alpha=alpha, noise=noise, padding=padding)

    @property
    def last_padding(self) -> np.ndarray | None:
        """The attention mask ``(N, T)`` of the last explanation (1 = real, 0 = padding;
        NumPy), or ``None``."""
        return self._last_padding

    @staticmethod
    @contextlib.contextmanager
    def interruptible() -> Iterator[None]:
        """Swallow the early end of a forward pass requested by ``recording(interrupt=True)``."""
        try:
            yield
        except _StopForward:
            pass

    def mask_terms(self, alpha: Any, padding: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        """``(lambda * active, (1 - lambda) * mean * active, (1 - lambda) * std * active)``
        for mask logits ``alpha`` ``(N, C, ...)``, each shaped like ``alpha``, with the
        settings of the last explanation: the terms of the injection ``Z = lambda_a * R +
        mu_a + sigma_a * eps``, for a front that injects noise in its own traced code.
        ``padding``: an attention mask ``(N, T)`` for sequence logits ``(N, C, T)`` (e.g.
        :attr:`last_padding`): padded positions then pass unchanged."""
        backend = self._require_backend()
        config = self.last_config or self.config
        mean, std, active = self._stats_like(alpha, backend, config)
        fns = _step_functions(backend, config.sigma, config.relu, False)
        operands = smoothing_operands(alpha, config.sigma, alpha.ndim - 2)
        pad_terms = None
        if padding is not None:
            active, pad_terms, operands = padding_terms(backend, alpha, padding, active, config.sigma)
        xp = backend.namespace()
        shape = tuple(int(n) for n in alpha.shape)
        return tuple(
            xp.reshape(t, shape)
            for t in fns.mask(alpha, active, mean * active, std * active, operands, pad_terms)
        )

    def capacity(self, features: Any = None, alpha: Any = None) -> Any:
        """Capacity in nats per element for ``features`` under mask ``alpha``.

        Defaults: the features and mask of the last explanation, with the settings that
        explanation was made with.
        """
        backend = self._require_backend()
        features = self._last_features if features is None else features
        alpha = self.alpha if alpha is None else alpha
        if features is None or alpha is None:
            raise RuntimeError("nothing to compute the capacity of: call analyze() first")
        config = self.last_config or self.config
        xp = backend.namespace()
        features = working_precision(xp, features)
        if str(alpha.dtype) != str(features.dtype):
            alpha = xp.astype(alpha, features.dtype)
        mean, std, active = self._stats_like(features, backend, config)
        padding = self._last_padding
        if padding is None or int(padding.shape[0]) != int(features.shape[0]):
            return capacity_fn(features, alpha, mean, std, active=active, sigma=config.sigma)
        # The padding of the last explanation: zero at padded positions, smoothed per input.
        active, _, operands = padding_terms(backend, features, padding, active, config.sigma)
        alpha = xp.broadcast_to(alpha, tuple(features.shape))
        lam, one_minus = restriction_mask(alpha, config.sigma, operands)
        return capacity_from_mask((features - mean) / std, alpha, lam, one_minus, active, config.sigma)

    def _require_backend(self) -> Backend:
        if self.backend is None:
            raise RuntimeError("the bottleneck is not attached to a model's backend yet")
        return self.backend

    # -- estimation ----------------------------------------------------------------
    def record(self, run: Callable[[], Any]) -> Any:
        """Run ``run()`` (a model pass) up to the layer; return the layer's features."""
        with self.recording(interrupt=True):
            with self.interruptible():
                run()
            return self.take_recorded()

    def estimate(
        self,
        run_batch: Callable[[Any], Any],
        batches: Iterable[Any],
        *,
        n_samples: int = 10000,
        progbar: bool | None = None,
        reset: bool = True,
        distributed: bool | str | None = None,
    ) -> Estimator:
        """Estimate the feature statistics over ``batches``.

        ``run_batch(batch)`` runs the model on one batch (moving it to the device as
        needed); the hook records the layer's features and ends the pass right after the
        layer.  Stops after ``n_samples`` samples.  Warns (:class:`FewSamplesWarning`)
        below 1,000 samples.  ``distributed``: see :func:`estimate_loop`.
        """
        backend = self._require_backend()
        if reset:
            self.estimator.reset()

        def record(batch: Any) -> list[Any]:
            return [self.record(lambda: run_batch(batch))]

        estimate_loop(
            backend,
            batches,
            record,
            [self.estimator],
            n_samples=n_samples,
            progbar=self.config.progbar if progbar is None else progbar,
            distributed=distributed,
        )
        return self.estimator

    # -- the per-sample optimisation -------------------------------------------------
    def optimize(
        self,
        model_loss: Callable[..., Any],
        x: Any,
        *,
        targets: np.ndarray | None = None,
        config: IBAConfig | None = None,
        seed: int | Sequence[int] | None = None,
        noise: str = "backend",
        copies: str = "input",
        compile_step: bool = False,
        check_path: bool = False,
        features: Any = None,
        padding: np.ndarray | None = None,
        **overrides: Any,
    ) -> Any:
        """Optimise one mask per input and return its capacity ``(N, C, ...)`` in nats.

        ``x`` is a batch of ``N`` inputs in the backend's type.  ``model_loss(batch)``
        (or ``model_loss(batch, target_rows)`` when ``targets`` are given) runs the model
        on a batch and returns the *mean* model loss over the model's
        ``N * batch_size`` output rows as a scalar, each input's ``batch_size`` noisy
        copies in a row.  ``targets``: per-input arrays ``(N, ...)`` (NumPy), e.g. the
        class distribution each input is explained for; each is repeated for the copies
        and given to ``model_loss`` as a tensor like the features: an explicit operand
        of the step.  The loss optimised is ``sum_i [mean model loss of input i + beta *
        mean capacity of input i]``, so every input gets exactly the mask it would get
        alone.

        The step ``(alpha, noise, batch, statistics, targets) -> loss`` is a pure function
        of its operands; with ``compile_step=True`` the backend may compile it whole
        (:meth:`Backend.compile_step`), model forward included, once per shape.
        ``features``: the layer's features for ``x`` (channels-first), when a pass over
        the inputs already recorded them; else one short pass records them.
        ``check_path=True`` (for losses the engine did not write) differentiates the first
        step's model term on its own, so a loss without a gradient path to the mask
        raises instead of giving a map that ignores the model.

        ``padding``: for sequence features ``(N, C, T)``, a NumPy ``(N, T)`` array, 1 at
        real positions and 0 at padded ones (an attention mask).  Padded positions get no
        noise (the features pass unchanged) and exactly zero capacity, the capacity term
        is each input's mean over its real positions, and the mask is smoothed along each
        input's real positions only; so the real positions' result does not depend on
        what the padding holds (see :func:`padding_terms`).

        ``copies`` says where the ``batch_size`` copies of each input are made.
        ``"input"`` (the reference library's contract): ``model_loss`` is called with
        ``N * batch_size`` samples, each input repeated.  ``"layer"``: ``model_loss`` is
        called with the ``N`` inputs and the bottleneck layer turns its ``N`` feature maps
        into ``N * batch_size`` noisy copies, so the layers before it run once per input;
        ``model_loss`` must then raise if the model returns another number of rows (see
        :func:`check_output_rows`).  If the first step fails that way, or because the
        model cannot carry the larger batch, the optimisation goes on with ``"input"`` and
        the same noise.

        ``seed`` makes the noise reproducible: input ``i`` draws from a stream seeded with
        ``seed + i`` (or ``seed[i]`` for a sequence), so it gets the same mask alone as
        in a batch.  A framework generator (e.g. a ``torch.Generator``) is used as it is,
        one stream for all inputs.  ``noise`` picks the generator: ``"backend"`` (on the
        device) or ``"numpy"`` (the same numbers on every backend).  ``config`` (default:
        the live settings) and ``**overrides`` (settings, validated) set the settings of
        this optimisation.  The returned capacity is that of the final mask (the
        reference library reported the one before the last update).
        """
        backend = self._require_backend()
        cfg = (self.config if config is None else config).override(**overrides)
        if copies not in ("input", "layer"):
            raise ValueError(f"copies must be 'input' or 'layer', got {copies!r}")
        xp = backend.namespace()
        n = int(x.shape[0])
        if n < 1:
            raise ValueError("analyze() needs at least one input")
        bs, steps = cfg.batch_size, cfg.optimization_steps

        features = self._features_of(model_loss, x, targets is not None, features)
        # The mask, its Adam state, the statistics and the noise in float32 for 16-bit
        # models; the noisy features go back to the model in its own dtype.
        features = working_precision(xp, features)
        mean, std, active = self._stats_like(features, backend, cfg)
        sample_shape = tuple(int(s) for s in features.shape[1:])
        active, pad_terms, operands = _smoothing_and_padding(backend, features, padding, active, cfg.sigma)

        batch = x if copies == "layer" else repeat_inputs(xp, x, bs)
        r = (features - mean) / std  # normalised features, constant across steps
        alpha = xp.full(
            tuple(features.shape),
            cfg.initial_alpha,
            dtype=features.dtype,
            device=getattr(features, "device", None),
        )
        m, v = adam_init(alpha)[1:]
        source = _Noise(backend, features, n, bs, seed, noise)
        target_rows = (
            ()
            if targets is None
            else (backend.from_numpy(np.repeat(np.asarray(targets), bs, axis=0), like=features),)
        )
        step = self._step(backend, model_loss, cfg, compile_step, targets is not None)
        first_step = step
        if check_path:
            first_step = self._eager_step(backend, model_loss, cfg, False, require_tensor=True)
        mean_a, std_a = mean * active, std * active

        schedule = adam_schedule(steps, cfg.lr, like=alpha)
        bar = _progress(cfg.progbar, total=steps, desc="analyze", unit="step")
        for i in range(steps):
            eps = source.draw(sample_shape)
            args = (eps, batch, r, active, mean_a, std_a, operands, pad_terms, *target_rows)
            adam = (m, v, *schedule[i])
            try:
                value, new_alpha, (m, v) = (first_step if i == 0 else step)(alpha, adam, args)
            except Exception:
                if i > 0 or copies != "layer":
                    raise
                # The model cannot take the copies at the layer: make them at the input.
                copies, batch = "input", repeat_inputs(xp, x, bs)
                args = (eps, batch, r, active, mean_a, std_a, operands, pad_terms, *target_rows)
                value, new_alpha, (m, v) = first_step(alpha, adam, args)
            _check_finite_loss(float(value), i)
            alpha = new_alpha
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.copies_made_at = copies
        self.alpha = backend.stop_gradient(alpha)
        self._last_features = features
        self._last_padding = None if padding is None else np.asarray(padding, dtype=np.float64)
        self.last_config = cfg
        # Compiled with the step: op by op, a compiler (XLA) would compile each operation
        # on a first call.
        compiled = compile_step or (backend.compile_by_default if cfg.compile is None else cfg.compile)
        fns = _step_functions(backend, cfg.sigma, cfg.relu, bool(compiled))
        return fns.capacity(self.alpha, r, active, operands)

    def _features_of(self, model_loss: Callable[..., Any], x: Any, with_targets: bool, features: Any) -> Any:
        """The layer's features for the batch ``x`` (channels-first): ``features`` when
        given, else recorded by one short pass (ended after the layer) that also validates
        the setup; checked to keep the batch axis first."""
        n = int(x.shape[0])
        if features is None:
            with self.recording(interrupt=True):
                with self.interruptible():
                    if with_targets:
                        model_loss(x, None)
                    else:
                        model_loss(x)
                if not self._recorder.features:
                    raise RuntimeError(
                        "the model loss function never ran the bottleneck layer; it must run "
                        "the model that contains the layer on the batch it is given"
                    )
                features = self._recorder.features[0]
        if int(features.shape[0]) != n:
            raise ValueError(
                f"the layer saw a batch of {features.shape[0]} for {n} inputs; "
                "the model must keep the batch axis first"
            )
        return features

    def _step(
        self,
        backend: Backend,
        model_loss: Callable[..., Any],
        cfg: IBAConfig,
        compile_step: bool,
        with_targets: bool,
    ) -> Callable[..., Any]:
        """``(alpha, (m, v, step_size, bias2_sqrt), (eps, batch, r, active, mean_a, std_a,
        smoothing, padding, *targets)) -> (loss, new alpha, (m, v))``: one optimisation step with
        its Adam update, a pure function of its operands (compiled whole, once per loss and
        settings, when ``compile_step`` and the backend can)."""
        # Without a whole-step compile, the step's array parts may still be compiled
        # (worth it where eager operations are expensive).
        parts = not compile_step and (backend.compile_by_default if cfg.compile is None else cfg.compile)
        key = (model_loss, cfg.beta, cfg.sigma, cfg.relu, with_targets, compile_step, parts)
        cached = self._compiled_steps.get(key)
        if cached is not None:
            return cached
        fns = _step_functions(backend, cfg.sigma, cfg.relu, bool(parts))
        beta = cfg.beta

        def loss(
            a: Any,
            eps: Any,
            batch: Any,
            r: Any,
            active: Any,
            mean_a: Any,
            std_a: Any,
            smoothing: Any,
            padding: Any,
            *targets: Any,
        ) -> Any:
            mask, cap_term = fns.terms(a, r, active, mean_a, std_a, smoothing, padding)
            model_term = self._model_term(backend, model_loss, (*mask, fns.inject), eps, batch, targets, a)
            return model_term + beta * cap_term

        compiled = backend.compile_step(loss, fns.adam) if compile_step else None
        if compiled is None:
            compiled = self._eager_step(backend, model_loss, cfg, bool(parts))
        if len(self._compiled_steps) > 16:
            self._compiled_steps.clear()
        self._compiled_steps[key] = compiled
        return compiled

    def _model_term(
        self,
        backend: Backend,
        model_loss: Callable[..., Any],
        mask: tuple[Any, ...],
        eps: Any,
        batch: Any,
        targets: Sequence[Any],
        a: Any,
        *,
        require_tensor: bool = False,
    ) -> Any:
        """The step's model term: ``model_loss(batch, *targets)`` run with the hook
        injecting noise under ``mask``, checked to be a scalar, in the mask's dtype, times
        the number of inputs.  ``require_tensor``: a loss that is not an array (a Python
        number) is refused too."""
        with self._state("restrict", mask=mask, noise=eps):
            model_term = model_loss(batch, *targets)
            if self._calls == 0:
                raise RuntimeError("the model loss function never ran the bottleneck layer")
        if require_tensor and not hasattr(model_term, "shape"):
            raise ValueError(
                f"the model loss function returned a {type(model_term).__name__}; it must "
                "return a scalar tensor computed from the model's output (the mean loss)"
            )
        if getattr(model_term, "ndim", 0) != 0:
            raise ValueError(
                "the model loss function must return a scalar (the mean loss over the "
                f"batch), got shape {tuple(model_term.shape)}"
            )
        if str(getattr(model_term, "dtype", a.dtype)) != str(a.dtype):
            model_term = backend.namespace().astype(model_term, a.dtype)
        return model_term * int(a.shape[0])

    def _eager_step(
        self,
        backend: Backend,
        model_loss: Callable[..., Any],
        cfg: IBAConfig,
        parts: bool,
        *,
        require_tensor: bool = False,
    ) -> Callable[..., tuple[float, Any, tuple[Any, Any]]]:
        """The step op by op: only the model term goes through the backend's autograd,
        with respect to ``lambda`` and ``1 - lambda`` (stacked); the capacity term's
        gradient and the chain back to alpha through the smoothing and the sigmoid are
        written out (:func:`~iba_core.math._capacity.capacity_partials`), which takes
        about half the operations of differentiating the whole loss.  It is also the
        check of a user's loss: a loss with no gradient path to the mask (detached, a
        Python number with ``require_tensor``) makes ``value_and_grad`` raise instead of
        giving a map that ignores the model."""
        fns = _step_functions(backend, cfg.sigma, cfg.relu, parts)
        beta = cfg.beta

        def model_part(
            pair: Any,
            eps: Any,
            batch: Any,
            active: Any,
            mean_a: Any,
            std_a: Any,
            padding: Any,
            *targets: Any,
        ) -> Any:
            lam = pair[0, ...]
            mask = fns.grouped(lam, pair[1, ...], active, mean_a, std_a, padding)
            return self._model_term(
                backend,
                model_loss,
                (*mask, fns.inject),
                eps,
                batch,
                targets,
                lam,
                require_tensor=require_tensor,
            )

        def step(a: Any, adam: tuple[Any, ...], args: tuple[Any, ...]) -> tuple[float, Any, tuple[Any, Any]]:
            eps, batch, r, active, mean_a, std_a, smoothing, padding, *targets = args
            pair, slope = fns.relax(a, smoothing)
            value, grad = backend.value_and_grad(
                model_part, pair, eps, batch, active, mean_a, std_a, padding, *targets
            )
            weight = beta / math.prod(int(k) for k in a.shape[1:])
            cap, new_a, m, v = fns.descend(a, pair, slope, grad, r, active, smoothing, padding, weight, *adam)
            return float(value) + beta * float(cap), new_a, (m, v)

        return step

    def explain(
        self,
        loss_for: Callable[[int, int], Callable[..., Any]],
        x: Any,
        *,
        targets: np.ndarray | None = None,
        inputs_per_pass: int | None = None,
        seed: Any = None,
        config: IBAConfig | None = None,
        **optimize_kwargs: Any,
    ) -> Any:
        """:meth:`optimize` for many inputs, in passes of ``inputs_per_pass`` inputs.

        ``loss_for(start, stop)`` returns the model loss function for inputs
        ``x[start:stop]`` (see :meth:`optimize`); ``targets`` are sliced the same way.
        Inputs are independent problems, so splitting them changes nothing but speed:
        input ``i`` still draws from the noise stream ``seed + i``.  By default a pass
        holds as many inputs as fit in the backend's :meth:`~iba_core.Backend.pass_size`
        (all of them on accelerators).  Returns the capacity ``(N, C, ...)`` in nats;
        :attr:`alpha` holds all masks.
        """
        backend = self._require_backend()
        cfg = (self.config if config is None else config).override(
            **{k: optimize_kwargs.pop(k) for k in list(optimize_kwargs) if k in FIELDS}
        )
        n = int(x.shape[0])
        if inputs_per_pass is None:
            limit = backend.pass_size(x)
            inputs_per_pass = n if limit is None else max(1, limit // cfg.batch_size)
        if (
            isinstance(inputs_per_pass, bool)
            or int(inputs_per_pass) != inputs_per_pass
            or int(inputs_per_pass) < 1
        ):
            raise ValueError(f"inputs_per_pass must be an integer >= 1, got {inputs_per_pass!r}")
        k = int(inputs_per_pass)
        recorded = optimize_kwargs.pop("features", None)
        padding = optimize_kwargs.pop("padding", None)
        if k >= n:
            return self.optimize(
                loss_for(0, n),
                x,
                targets=targets,
                seed=seed,
                config=cfg,
                features=recorded,
                padding=padding,
                **optimize_kwargs,
            )
        if seed is not None and not isinstance(seed, (int, np.integer)) and isinstance(seed, Sequence):
            if len(seed) != n:
                raise ValueError(f"got {len(seed)} seeds for {n} inputs")
        xp = backend.namespace()
        caps, alphas, features = [], [], []
        for start in range(0, n, k):
            stop = min(n, start + k)
            caps.append(
                self.optimize(
                    loss_for(start, stop),
                    x[start:stop, ...],
                    config=cfg,
                    targets=None if targets is None else targets[start:stop],
                    features=None if recorded is None else recorded[start:stop, ...],
                    padding=None if padding is None else padding[start:stop],
                    seed=_seeds_for(seed, start, stop),
                    **optimize_kwargs,
                )
            )
            alphas.append(self.alpha)
            features.append(self._last_features)
        self.alpha = xp.concat(alphas, axis=0)
        self._last_features = xp.concat(features, axis=0)
        self._last_padding = None if padding is None else np.asarray(padding, dtype=np.float64)
        return xp.concat(caps, axis=0)


def estimate_loop(
    backend: Backend,
    batches: Iterable[Any],
    record: Callable[[Any], list[Any]],
    estimators: Sequence[Estimator],
    *,
    n_samples: int,
    progbar: bool,
    distributed: bool | str | None = None,
) -> None:
    """The estimation loop of every engine: record features, update the estimates.

    ``record(batch)`` returns one feature array per estimator (the first one sets the
    batch's sample count).  A batch may be a :class:`~iba_core.engines.MaskedBatch`:
    ``record`` then gets its inputs, and the padded positions of its attention mask stay
    out of the statistics (each estimate's features must be sequences with one position
    per mask entry); warns (:class:`~iba_core.engines.UnseenPositionsWarning`) when some
    position was padding in every sequence.  Stops after ``n_samples`` samples of the
    first estimator; warns (:class:`FewSamplesWarning`) below 1,000.  In a data-parallel run (see
    :func:`~iba_core.engines.data_parallel`) the shards share the batches and every
    process ends with the same, merged estimate.  ``distributed``: ``None`` (data-parallel
    when the runtime is active), ``False`` (alone), ``True`` (required), ``"shared"`` or
    ``"own"`` (required; every process reads the same batches, or each its own; by
    default the processes' first batches tell).
    """
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    first = estimators[0]
    dist = collectives(backend, distributed)
    if dist is not None:
        agree(
            dist,
            "the layers estimated",
            [e.layer for e in estimators],
            "every process must estimate the same layers of the same model",
        )
    shown = progbar and (dist is None or dist.is_main)  # one bar: rank 0's
    bar = _progress(shown, total=n_samples, desc="estimate", unit="sample")
    try:
        if dist is not None:
            split = distributed if isinstance(distributed, str) else None
            sharded_estimate(
                dist, backend, batches, record, estimators, n_samples=int(n_samples), bar=bar, split=split
            )
        else:
            _estimate_alone(backend, batches, record, estimators, n_samples, bar)
    finally:
        if bar is not None:
            bar.close()
    if first.n == 0:
        raise ValueError("the data yielded no batches; nothing was estimated")
    if first.n < MIN_RECOMMENDED_SAMPLES and (dist is None or dist.is_main):
        warnings.warn(
            f"the statistics rest on {first.n} samples; the reference uses about "
            f"10,000 and at least {MIN_RECOMMENDED_SAMPLES} are recommended",
            FewSamplesWarning,
            stacklevel=_caller_level(),
        )
    if dist is None or dist.is_main:
        warn_unseen(estimators, stacklevel=_caller_level())


def _estimate_alone(
    backend: Backend,
    batches: Iterable[Any],
    record: Callable[[Any], list[Any]],
    estimators: Sequence[Estimator],
    n_samples: int,
    bar: Any,
) -> None:
    """The estimation loop of one process: update ``estimators`` until the first one
    holds ``n_samples`` samples or the batches run out."""
    first = estimators[0]
    for batch in batches:
        features = record_masked(backend, record, batch)
        take = min(int(features[0][0].shape[0]), int(n_samples) - first.n)
        for est, (f, mask) in zip(estimators, features, strict=True):
            est.update(backend.to_numpy(f[:take, ...]), None if mask is None else mask[:take])
        if bar is not None:
            bar.update(take)
        if first.n >= n_samples:
            break


def _smoothing_and_padding(
    backend: Backend, features: Any, padding: np.ndarray | None, active: Any, sigma: float | None
) -> tuple[Any, Any, Any]:
    """``(active, padding terms, smoothing operands)`` of the optimisation: without
    ``padding`` the statistics' ``active`` mask, no padding terms and the plain smoothing
    operands; with it, those of :func:`padding_terms`."""
    operands = smoothing_operands(features, sigma, features.ndim - 2)
    if padding is None:
        return active, None, operands
    return padding_terms(backend, features, padding, active, sigma)


def _check_finite_loss(value: float, step: int) -> None:
    """Stop the optimisation when the loss of step ``step`` (0-based) is NaN or infinite."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the loss became {value} at step {step}; check the model loss function "
            "(it must be finite for the given inputs) and the feature statistics"
        )


def _caller_level() -> int:
    """The ``stacklevel`` of the first caller outside the core and the registered backends'
    packages (the user's line)."""
    from ..contract._registry import backend_specs

    packages = {__name__.partition(".")[0]}
    for spec in backend_specs().values():
        loader = spec.loader if isinstance(spec.loader, str) else spec.loader.__module__
        packages.add(loader.partition(".")[0].partition(":")[0])
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in packages:
        frame, level = frame.f_back, level + 1
    return level


class _StepFunctions(NamedTuple):
    terms: Callable[..., tuple[tuple[Any, Any, Any], Any]]
    mask: Callable[..., tuple[Any, Any, Any]]
    inject: Callable[..., Any]
    adam: Callable[..., tuple[Any, Any, Any]]
    capacity: Callable[..., Any]
    relax: Callable[..., tuple[Any, Any]]
    grouped: Callable[..., tuple[Any, Any, Any]]
    descend: Callable[..., tuple[Any, Any, Any, Any]]


_STEP_FUNCTIONS: dict[tuple[Any, ...], _StepFunctions] = {}


def _step_functions(backend: Backend, sigma: float | None, relu: bool, compiled: bool) -> _StepFunctions:
    """The pure array parts of an optimisation step, compiled by the backend if asked.

    ``mask(alpha, active, mean * active, std * active, smoothing_operands, padding)``
    returns the mask terms ``(lambda * active, (1 - lambda) * mean * active, (1 - lambda) *
    std * active)`` shaped ``(N, 1, C, ...)`` to meet the noisy copies of each input
    (``padding``: ``None``, or the :func:`padding_terms` ``(passthrough, scale)``, with
    ``active`` then zero at padded positions);
    ``terms(alpha, r, active, mean * active, std * active, smoothing_operands)`` returns
    them and the sum over inputs of each one's mean capacity.  The mask depends on alpha
    only and all copies of an input share it, so it (and the capacity, from the recorded
    features) is computed once per input.  ``inject(features, lambda_a, mu_a, sigma_a,
    eps)`` makes the noisy copies (see :meth:`Bottleneck._inject`) and ``adam`` is
    :func:`iba_core.math.adam_kernel`; ``capacity(alpha, r, active, smoothing_operands)``
    is the capacity map in nats (clipped at 0, as reported).  They close over nothing but
    settings, so one compiled set serves every bottleneck.
    """
    key = (type(backend), backend.name, sigma, relu, compiled)
    cached = _STEP_FUNCTIONS.get(key)
    if cached is not None:
        return cached

    def grouped_mask(
        lam: Any, one_minus: Any, active: Any, mean_a: Any, std_a: Any, padding: Any = None
    ) -> tuple[Any, Any, Any]:
        xp = namespace(lam)
        lam_a = lam * active
        if padding is not None:  # padded positions pass unchanged: lambda_a = 1 there
            lam_a = lam_a + padding[0]
        mask = (lam_a, one_minus * mean_a, one_minus * std_a)
        return tuple(xp.expand_dims(m, axis=1) for m in mask)

    def mask(
        a: Any,
        active: Any,
        mean_a: Any,
        std_a: Any,
        operands: tuple[Any, ...] | None,
        padding: tuple[Any, Any] | None = None,
    ) -> tuple[Any, Any, Any]:
        lam, one_minus = restriction_mask(a, sigma, operands)
        return grouped_mask(lam, one_minus, active, mean_a, std_a, padding)

    def terms(
        a: Any,
        r: Any,
        active: Any,
        mean_a: Any,
        std_a: Any,
        operands: tuple[Any, ...] | None,
        padding: tuple[Any, Any] | None = None,
    ) -> tuple[tuple[Any, Any, Any], Any]:
        xp = namespace(a)
        lam, one_minus = restriction_mask(a, sigma, operands)
        cap = capacity_from_mask(r, a, lam, one_minus, active, sigma, clip=False)
        # The sum over inputs of each input's mean capacity (no sizes: a compiled
        # function may see them as unknown); with padding, the mean over the real
        # positions only (``padding[1]`` rescales each input's mean).
        per_input = xp.mean(cap, axis=tuple(range(1, cap.ndim)))
        if padding is not None:
            per_input = per_input * padding[1]
        return grouped_mask(lam, one_minus, active, mean_a, std_a, padding), xp.sum(per_input)

    def inject(grouped: Any, lam: Any, shift: Any, scale: Any, eps: Any) -> Any:
        return inject_folded(grouped, lam, shift, scale, eps, relu)

    def capacity_map(a: Any, r: Any, active: Any, operands: tuple[Any, ...] | None) -> Any:
        lam, one_minus = restriction_mask(a, sigma, operands)
        return capacity_from_mask(r, a, lam, one_minus, active, sigma)

    descend = functools.partial(_descend, sigma, adam_kernel())
    fns = _StepFunctions(terms, mask, inject, adam_kernel(), capacity_map, _relax, grouped_mask, descend)
    if compiled:
        fns = _StepFunctions(*(backend.compile(f) for f in fns))
    _STEP_FUNCTIONS[key] = fns
    return fns


def _relax(a: Any, operands: tuple[Any, ...] | None) -> tuple[Any, Any]:
    """``(pair, slope)``: ``lambda`` and ``1 - lambda`` (each smoothed from its own sigmoid)
    stacked on a new leading axis, and ``d sigmoid(alpha) / d alpha``."""
    xp = namespace(a)
    s, s_bar = sigmoid_pair(xp, a)
    pair = xp.concat([xp.expand_dims(s, axis=0), xp.expand_dims(s_bar, axis=0)], axis=0)
    if operands is not None:  # both smoothed in one product
        pair = apply_operands(pair, operands)
    return pair, s * s_bar


def _descend(
    sigma: float | None,
    adam: Callable[..., tuple[Any, Any, Any]],
    a: Any,
    pair: Any,
    slope: Any,
    grad: Any,
    r: Any,
    active: Any,
    operands: tuple[Any, ...] | None,
    padding: tuple[Any, Any] | None,
    weight: float,
    m: Any,
    v: Any,
    step_size: Any,
    bias2_sqrt: Any,
) -> tuple[Any, Any, Any, Any]:
    """The capacity term and its gradient by hand, chained with the model term's gradient
    ``grad`` (with respect to :func:`_relax`'s ``pair``) back to alpha, then Adam.

    ``weight``: beta over the number of elements of one input (the derivative of beta
    times an input's mean capacity), rescaled per input to its real positions with
    ``padding``.  Returns ``(sum over inputs of the mean capacity, new alpha, m, v)``.
    """
    xp = namespace(a)
    lam, one_minus = pair[0, ...], pair[1, ...]
    cap, d_lam, d_one_minus, d_alpha = capacity_partials(r, a, lam, one_minus, active, sigma)
    per_input = xp.mean(cap, axis=tuple(range(1, cap.ndim)))
    if padding is not None:
        per_input = per_input * padding[1]
        weight = weight * xp.reshape(padding[1], (-1,) + (1,) * (cap.ndim - 1))
    through_mask = (grad[0, ...] + weight * d_lam) - (grad[1, ...] + weight * d_one_minus)
    if operands is not None:
        through_mask = apply_operands(through_mask, adjoint_operands(operands))
    g = through_mask * slope
    if d_alpha is not None:
        g = g + weight * d_alpha
    new_a, m, v = adam(a, g, m, v, step_size, bias2_sqrt)
    return xp.sum(per_input), new_a, m, v


def padding_terms(
    backend: Backend, features: Any, padding: np.ndarray, active: Any, sigma: float | None
) -> tuple[Any, tuple[Any, Any], tuple[Any, ...] | None]:
    """What an attention mask changes in the optimisation of sequence features.

    ``features`` are channels-first ``(N, C, T)``; ``padding`` is NumPy ``(N, T)``, 1 at
    real positions and 0 at padded ones; ``active`` the per-sample ``(C, T)`` mask of
    active elements.  Returns ``(active * keep, (passthrough, scale), smoothing)``:
    ``active`` zero at padded positions ``(N, C, T)`` (no noise, no capacity there);
    ``passthrough = 1 - keep`` ``(N, 1, T)``, added to ``lambda * active`` so that padded
    features pass unchanged (``Z = R``); ``scale = T / T_real`` per input, which turns the
    mean capacity over all ``C * T`` elements into the mean over the real ones; and per-input
    smoothing matrices ``(N, T, T)`` (transposed, for a right product) that smooth along
    each input's real positions as if they were the whole sequence and leave padded ones
    alone (``None`` without smoothing).
    """
    shape = tuple(int(s) for s in features.shape)
    pad = np.asarray(padding, dtype=np.float64)
    check_sequence_mask(pad.shape, shape, "explain", "input")
    n, _, t = shape
    keep = backend.from_numpy(pad[:, None, :], like=features)
    passthrough = backend.from_numpy(1.0 - pad[:, None, :], like=features)
    scale = backend.from_numpy(t / pad.sum(axis=1), like=features)
    smoothing = None
    if sigma:
        mats = np.zeros((n, t, t), dtype=np.float64)
        for i in range(n):
            real = np.flatnonzero(pad[i] > 0)
            mats[i] = np.eye(t)
            mats[i][np.ix_(real, real)] = smoothing_matrix(len(real), float(sigma))
        smoothing = (backend.from_numpy(np.ascontiguousarray(np.swapaxes(mats, 1, 2)), like=features),)
    return active * keep, (passthrough, scale), smoothing


def check_output_rows(rows: int, n_inputs: int, copies: int) -> None:
    """Raise unless a model output holds ``copies`` rows for each of ``n_inputs`` inputs.

    Loss functions given to :meth:`Bottleneck.optimize` with ``copies="layer"`` call this
    on the model's output, so a model that reshapes by its input's batch size is caught
    (and the optimisation falls back to copies of the input) instead of giving wrong maps.
    """
    if rows != n_inputs * copies:
        raise ValueError(
            f"the model returned {rows} output rows for {n_inputs} input(s) with {copies} noisy "
            f"copies each (expected {n_inputs * copies}); the model must keep the batch axis "
            "first and return one row per sample"
        )


def _seeds_for(seed: Any, start: int, stop: int) -> Any:
    """The noise seeds of inputs ``start:stop`` (a generator object is shared)."""
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(start, stop)]
    if isinstance(seed, Sequence):
        return list(seed)[start:stop]
    return seed


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _float_array(a: Any) -> np.ndarray:
    from ..math._xp import to_numpy

    arr = np.asarray(to_numpy(a), dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("feature_mean/feature_std contain NaN or inf")
    return arr
