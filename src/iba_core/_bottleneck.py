"""The Per-Sample Bottleneck, written once for every backend."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._adam import adam_init, adam_kernel, adam_update
from ._backend import Backend
from ._capacity import capacity as capacity_fn
from ._capacity import capacity_from_mask, restrict, restriction_mask
from ._estimator import Estimator
from ._linear_ops import smoothing_operands
from ._xp import namespace

MIN_RECOMMENDED_SAMPLES = 1000


class FewSamplesWarning(UserWarning):
    """The feature statistics rest on fewer samples than recommended (1,000)."""


class _StopForward(Exception):
    """Raised by the hook to end a forward pass early (see ``interrupt``)."""


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

    def __init__(self, backend: Backend, like: Any, n_inputs: int, batch_size: int,
                 seed: int | Sequence[int] | None, source: str) -> None:
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
        if source == "numpy":
            self.streams = [np.random.default_rng(s) for s in seeds]
        elif seed is not None:
            self.streams = [backend.make_generator(s, like) for s in seeds]
        else:
            self.streams = None

    def draw(self, sample_shape: tuple[int, ...]) -> Any:
        shape = (self.batch_size, *sample_shape)
        if self.source == "numpy":
            a = np.concatenate([rng.standard_normal(shape) for rng in self.streams])
            return self.backend.from_numpy(a, like=self.like)  # takes like's float dtype
        if self.streams is None:
            return self.backend.standard_normal((self.n_inputs * self.batch_size, *sample_shape),
                                                like=self.like, generator=self.generator)
        parts = [self.backend.standard_normal(shape, like=self.like, generator=g)
                 for g in self.streams]
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


class Bottleneck:
    """A Per-Sample Bottleneck at one layer: statistics, hook and optimisation.

    Framework fronts (``iba_torch.IBA``, ``iba_tf.IBALayer``, ...) own one of these,
    attach :meth:`__call__` to the layer through their backend and call
    :meth:`estimate` and :meth:`optimize`.  Defaults follow the reference library.

    Args:
        sigma: std of the Gaussian smoothing the mask, in feature-map pixels
            (0 or ``None``: no smoothing).
        beta: weight of the mean capacity (nats per element) in the loss.
        min_std: lower bound on the feature std (avoids division by ~0).
        optimization_steps: Adam steps per explanation.
        lr: Adam learning rate.
        batch_size: noise samples (copies of each input) per step.
        initial_alpha: starting mask logit (5 lets ~99.3% of the signal pass).
        active_neurons_threshold: elements non-zero in at most this fraction of the
            estimation samples are treated as inactive.
        relu: clamp the noisy features at zero (for post-ReLU layers).
        feature_mean, feature_std: statistics given directly (NumPy-convertible,
            per-sample shape), instead of or overriding an estimate.
        estimator: an :class:`Estimator` to start from (e.g. loaded from a file).
        progbar: show tqdm progress bars.
        compile: compile the pure array parts of each optimisation step (mask and
            capacity, noise injection, Adam) with the backend's compiler
            (``torch.compile``, ``tf.function``): a one-off compilation, shared by all
            bottlenecks of the process, for fewer operations per step.  ``None`` (the
            default): as the backend recommends (:attr:`Backend.compile_by_default`:
            yes for TensorFlow, whose eager operations are expensive; no for PyTorch,
            where compiling costs seconds and measured no gain).
    """

    def __init__(
        self,
        *,
        sigma: float | None = 1.0,
        beta: float = 10.0,
        min_std: float = 0.01,
        optimization_steps: int = 10,
        lr: float = 1.0,
        batch_size: int = 10,
        initial_alpha: float = 5.0,
        active_neurons_threshold: float = 0.01,
        relu: bool = False,
        feature_mean: Any = None,
        feature_std: Any = None,
        estimator: Estimator | None = None,
        progbar: bool = False,
        compile: bool | None = None,
    ) -> None:
        if sigma is not None and not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be >= 0 or None, got {sigma!r}")
        _check(beta >= 0 and math.isfinite(beta), f"beta must be finite and >= 0, got {beta!r}")
        _check(min_std >= 0, f"min_std must be >= 0, got {min_std!r}")
        _check(int(optimization_steps) == optimization_steps and optimization_steps >= 0,
               f"optimization_steps must be an integer >= 0, got {optimization_steps!r}")
        _check(lr > 0, f"lr must be > 0, got {lr!r}")
        _check(int(batch_size) == batch_size and batch_size >= 1,
               f"batch_size must be an integer >= 1, got {batch_size!r}")
        _check(0 <= active_neurons_threshold < 1,
               f"active_neurons_threshold must be in [0, 1), got {active_neurons_threshold!r}")
        self.sigma = sigma
        self.beta = float(beta)
        self.min_std = float(min_std)
        self.optimization_steps = int(optimization_steps)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.initial_alpha = float(initial_alpha)
        self.active_neurons_threshold = float(active_neurons_threshold)
        self.relu = bool(relu)
        self.progbar = bool(progbar)
        self.compile = None if compile is None else bool(compile)
        self.estimator = estimator if estimator is not None else Estimator()
        self.feature_mean = None if feature_mean is None else _float_array(feature_mean)
        self.feature_std = None if feature_std is None else _float_array(feature_std)
        if (self.feature_mean is not None and self.feature_std is not None
                and self.feature_mean.shape != self.feature_std.shape):
            raise ValueError(f"feature_mean {self.feature_mean.shape} and feature_std "
                             f"{self.feature_std.shape} must have the same shape")
        #: The mask logits of the last explanation, ``(N, C, ...)``, in the backend's type.
        self.alpha: Any = None
        self.backend: Backend | None = None
        #: Where the last optimisation made the noisy copies: ``"input"`` or ``"layer"``
        #: (``"input"`` also when ``copies="layer"`` was asked for but the model fell back).
        self.copies_made_at: str | None = None
        self._mode = "pass"
        self._interrupt = False
        self._recorded: list[Any] = []
        self._active_alpha: Any = None
        self._mask: tuple[Any, ...] | None = None
        self._noise: Any = None
        self._calls = 0
        self._last_features: Any = None
        self._stats_cache: dict[Any, tuple[Any, Any, Any]] = {}
        self._stats_version = -1

    # -- statistics ----------------------------------------------------------------
    def has_statistics(self) -> bool:
        """Whether mean and std are known (estimated or given)."""
        return (self.feature_mean is not None or self.estimator.n > 0) and (
            self.feature_std is not None or self.estimator.n > 0)

    def statistics(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, std, active)`` as float64 NumPy arrays of the per-sample shape.

        ``std`` is clamped to ``min_std``.  Elements whose std is 0 (possible only with
        ``min_std=0``) are constant, carry no information, and are marked inactive (their
        std is set to 1 to keep the arithmetic finite).
        """
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
            active = est.active_mask(self.active_neurons_threshold)
        else:
            active = np.ones_like(mean)
        std = np.maximum(std, self.min_std)
        constant = std <= 0
        if np.any(constant):
            active = np.where(constant, 0.0, active)
            std = np.where(constant, 1.0, std)
        return mean, std, active

    def _stats_like(self, features: Any, backend: Backend) -> tuple[Any, Any, Any]:
        version = (self.estimator.n, id(self.feature_mean), id(self.feature_std), self.min_std,
                   self.active_neurons_threshold)
        if version != self._stats_version:
            self._stats_cache.clear()
            self._stats_version = version
        key = (type(features), str(getattr(features, "device", "")), str(features.dtype))
        cached = self._stats_cache.get(key)
        if cached is None:
            mean, std, active = self.statistics()
            sample_shape = tuple(int(n) for n in features.shape[1:])
            if sample_shape != mean.shape:
                raise ValueError(
                    f"the layer outputs features of shape {sample_shape} per sample but the "
                    f"statistics have shape {mean.shape}; estimate() again on this layer "
                    "(or pass feature_mean/feature_std of the right shape)"
                )
            cached = tuple(backend.from_numpy(a.astype(np.float64), like=features)
                           for a in (mean, std, active))
            self._stats_cache[key] = cached
        return cached

    def copies_per_input(self, batch_size: int | None = None) -> int:
        """Noisy copies of each input per step: ``batch_size`` if given, else the default."""
        if batch_size is None:
            return self.batch_size
        _check(int(batch_size) == batch_size and batch_size >= 1,
               f"batch_size must be an integer >= 1, got {batch_size!r}")
        return int(batch_size)

    def reset_estimate(self) -> None:
        """Forget the estimate (the given ``feature_mean``/``feature_std`` too)."""
        self.estimator.reset()
        self.feature_mean = self.feature_std = None

    # -- the hook ------------------------------------------------------------------
    def __call__(self, features: Any) -> Any:
        """Layer hook: features ``(N, C, ...)`` channels-first; returns replacement or ``None``."""
        if self._mode == "pass":
            return None
        if self._mode == "record":
            assert self.backend is not None
            self._recorded.append(self.backend.stop_gradient(features))
            if self._interrupt:
                raise _StopForward
            return None
        # restrict
        backend = self.backend
        assert backend is not None
        self._calls += 1
        # One forward pass per optimisation step; restrict_flow() may run the model often.
        if self._calls > 1 and self._mask is not None:
            raise RuntimeError(
                "the bottleneck layer ran more than once in one forward pass; put the "
                "bottleneck on a layer that the model calls exactly once"
            )
        if self._mask is not None:
            return self._noisy_copies(features, self._noise)
        mean, std, active = self._stats_like(features, backend)
        noise = self._noise
        if noise is None or tuple(noise.shape) != tuple(features.shape):
            noise = backend.standard_normal(tuple(features.shape), like=features)
        alpha = self._active_alpha
        if alpha.shape[0] not in (1, features.shape[0]):
            raise ValueError(
                f"the mask holds {alpha.shape[0]} inputs but the batch has {features.shape[0]};"
                " restrict_flow() needs a batch of the explained inputs or one mask to broadcast"
            )
        z, _ = restrict(features, alpha, noise, mean, std, active=active, sigma=self.sigma,
                        relu=self.relu)
        return z

    def _noisy_copies(self, features: Any, noise: Any) -> Any:
        """The optimisation loop's injection: ``batch_size`` noisy copies of each input.

        The step's mask terms ``(lambda_a, mu_a, sigma_a)`` (followed by the injection
        function of :func:`_step_functions`) are shaped ``(N, 1, C, ...)`` and the
        standard noise ``(N * batch_size, C, ...)``.  ``features`` hold the N inputs
        either once each (``copies="layer"``: the copies are made here) or already
        repeated ``batch_size`` times (``copies="input"``).  With
        ``mu_a = (1 - lambda) * mean * active`` and ``sigma_a = (1 - lambda) * std * active``,
        ``Z = lambda * R + mu_a + sigma_a * eps`` equals ``active * (lambda * R + (1 -
        lambda) * (mean + std * eps))`` with two full-size operations instead of six.
        """
        assert self.backend is not None and self._mask is not None
        xp = self.backend.namespace()
        lam, shift, scale, inject = self._mask
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
        z = inject(grouped, lam, shift, scale, eps)
        return xp.reshape(z, (total, *sample))

    @contextlib.contextmanager
    def _state(self, mode: str, *, interrupt: bool = False, alpha: Any = None,
               mask: tuple[Any, ...] | None = None, noise: Any = None) -> Iterator[None]:
        saved = (self._mode, self._interrupt, self._active_alpha, self._mask, self._noise,
                 self._calls, self._recorded)
        self._mode, self._interrupt = mode, interrupt
        self._active_alpha, self._mask, self._noise, self._calls = alpha, mask, noise, 0
        self._recorded = []
        try:
            yield
        finally:
            (self._mode, self._interrupt, self._active_alpha, self._mask, self._noise,
             self._calls, self._recorded) = saved

    def recording(self, *, interrupt: bool = False) -> contextlib.AbstractContextManager[None]:
        """Context: the hook records the features it sees (in ``recorded``).

        With ``interrupt=True`` it also ends the forward pass right after the layer;
        wrap the model call in :meth:`interruptible` to swallow that.
        """
        return self._state("record", interrupt=interrupt)

    @property
    def recorded(self) -> list[Any]:
        """Features recorded by the hook in the current :meth:`recording` context."""
        return self._recorded

    def restricting(self, alpha: Any | None = None, noise: Any = None
                    ) -> contextlib.AbstractContextManager[None]:
        """Context: the hook injects noise with mask logits ``alpha`` (default: the last)."""
        alpha = self.alpha if alpha is None else alpha
        if alpha is None:
            raise RuntimeError("no mask to restrict the flow with: call analyze() first")
        return self._state("restrict", alpha=alpha, noise=noise)

    @staticmethod
    @contextlib.contextmanager
    def interruptible() -> Iterator[None]:
        """Swallow the early end of a forward pass requested by ``recording(interrupt=True)``."""
        try:
            yield
        except _StopForward:
            pass

    def capacity(self, features: Any = None, alpha: Any = None) -> Any:
        """Capacity in nats per element for ``features`` under mask ``alpha``.

        Defaults: the features and mask of the last explanation.
        """
        backend = self._require_backend()
        features = self._last_features if features is None else features
        alpha = self.alpha if alpha is None else alpha
        if features is None or alpha is None:
            raise RuntimeError("nothing to compute the capacity of: call analyze() first")
        mean, std, active = self._stats_like(features, backend)
        return capacity_fn(features, alpha, mean, std, active=active, sigma=self.sigma)

    def _require_backend(self) -> Backend:
        if self.backend is None:
            raise RuntimeError("the bottleneck is not attached to a model's backend yet")
        return self.backend

    # -- estimation ----------------------------------------------------------------
    def estimate(
        self,
        run_batch: Callable[[Any], Any],
        batches: Iterable[Any],
        *,
        n_samples: int = 10000,
        progbar: bool | None = None,
        reset: bool = True,
    ) -> Estimator:
        """Estimate the feature statistics over ``batches``.

        ``run_batch(batch)`` runs the model on one batch (moving it to the device as
        needed); the hook records the layer's features and ends the pass right after the
        layer.  Stops after ``n_samples`` samples.  Warns (:class:`FewSamplesWarning`)
        below 1,000 samples.
        """
        backend = self._require_backend()
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if reset:
            self.estimator.reset()
        progbar = self.progbar if progbar is None else progbar
        bar = _progress(progbar, total=n_samples, desc="estimate", unit="sample")
        for batch in batches:
            with self.recording(interrupt=True):
                with self.interruptible():
                    run_batch(batch)
                if not self._recorded:
                    raise RuntimeError(
                        "the model ran without calling the bottleneck layer; check that the "
                        "layer belongs to the model that is run"
                    )
                feats = self._recorded[0]
            take = min(int(feats.shape[0]), n_samples - self.estimator.n)
            self.estimator.update(backend.to_numpy(feats[:take, ...]))
            if bar is not None:
                bar.update(take)
            if self.estimator.n >= n_samples:
                break
        if bar is not None:
            bar.close()
        if self.estimator.n == 0:
            raise ValueError("the data iterator yielded no batches; nothing was estimated")
        if self.estimator.n < MIN_RECOMMENDED_SAMPLES:
            warnings.warn(
                f"the statistics rest on {self.estimator.n} samples; the reference uses about "
                f"10,000 and at least {MIN_RECOMMENDED_SAMPLES} are recommended",
                FewSamplesWarning,
                stacklevel=2,
            )
        return self.estimator

    # -- the per-sample optimisation -------------------------------------------------
    def optimize(
        self,
        model_loss: Callable[[Any], Any],
        x: Any,
        *,
        beta: float | None = None,
        optimization_steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | Sequence[int] | None = None,
        noise: str = "backend",
        progbar: bool | None = None,
        copies: str = "input",
    ) -> Any:
        """Optimise one mask per input and return its capacity ``(N, C, ...)`` in nats.

        ``x`` is a batch of ``N`` inputs in the backend's type.  ``model_loss(batch)``
        runs the model on a batch and returns the *mean* model loss over the model's
        ``N * batch_size`` output rows as a scalar (e.g. the target-class
        cross-entropy), each input's ``batch_size`` noisy copies in a row.
        The loss optimised is ``sum_i [mean model loss of input i + beta * mean capacity
        of input i]``, so every input gets exactly the mask it would get alone.

        ``copies`` says where the ``batch_size`` copies of each input are made.
        ``"input"`` (the reference library's contract): ``model_loss`` is called with
        ``N * batch_size`` samples, each input repeated.  ``"layer"``: ``model_loss`` is
        called with the ``N`` inputs and the bottleneck layer turns its ``N`` feature maps
        into ``N * batch_size`` noisy copies, so the layers before it run once per input
        instead of ``batch_size`` times (the same result for a fraction of the work);
        ``model_loss`` must then accept model outputs with ``batch_size`` rows per input
        and should raise if it gets any other number (a model that reshapes by its
        input's batch size).  If the first step fails that way, or because the model
        cannot carry the larger batch (e.g. a skip connection around the layer), the
        optimisation goes on with ``"input"`` and the same noise.

        ``seed`` makes the noise reproducible: input ``i`` draws from a stream seeded with
        ``seed + i`` (or ``seed[i]`` for a sequence), so it gets the same mask alone as
        in a batch.  A framework generator (e.g. a ``torch.Generator``) is used as it is,
        one stream for all inputs.  ``noise`` picks
        the generator: ``"backend"`` (on the device) or ``"numpy"`` (the same numbers on
        every backend).  The returned capacity is that of the final mask (the reference
        library reported the one before the last update).
        """
        backend = self._require_backend()
        beta = self.beta if beta is None else float(beta)
        steps = self.optimization_steps if optimization_steps is None else int(optimization_steps)
        lr = self.lr if lr is None else float(lr)
        bs = self.copies_per_input(batch_size)
        progbar = self.progbar if progbar is None else progbar
        if copies not in ("input", "layer"):
            raise ValueError(f"copies must be 'input' or 'layer', got {copies!r}")
        xp = backend.namespace()
        n = int(x.shape[0])
        if n < 1:
            raise ValueError("analyze() needs at least one input")

        # One short pass (ended after the layer) gives the features and validates the setup.
        with self.recording(interrupt=True):
            with self.interruptible():
                model_loss(x)
            if not self._recorded:
                raise RuntimeError(
                    "the model loss function never ran the bottleneck layer; it must run "
                    "the model that contains the layer on the batch it is given"
                )
            features = self._recorded[0]
        if int(features.shape[0]) != n:
            raise ValueError(f"the layer saw a batch of {features.shape[0]} for {n} inputs; "
                             "the model must keep the batch axis first")
        mean, std, active = self._stats_like(features, backend)
        sample_shape = tuple(int(s) for s in features.shape[1:])

        batch = x if copies == "layer" else repeat_inputs(xp, x, bs)
        r = (features - mean) / std  # normalised features, constant across steps
        alpha = xp.full(tuple(features.shape), self.initial_alpha, dtype=features.dtype,
                        device=getattr(features, "device", None))
        state = adam_init(alpha)
        source = _Noise(backend, features, n, bs, seed, noise)

        compiled = backend.compile_by_default if self.compile is None else self.compile
        terms, inject, adam = _step_functions(backend, self.sigma, self.relu, compiled)
        operands = smoothing_operands(features, self.sigma, features.ndim - 2)
        mean_a, std_a = mean * active, std * active

        def loss_fn(a: Any) -> Any:
            mask, cap_term = terms(a, r, active, mean_a, std_a, operands)
            with self._state("restrict", mask=(*mask, inject), noise=standard_noise):
                model_term = model_loss(batch)
                if self._calls == 0:
                    raise RuntimeError("the model loss function never ran the bottleneck layer")
            if getattr(model_term, "ndim", 0) != 0:
                raise ValueError(
                    "the model loss function must return a scalar (the mean loss over the "
                    f"batch), got shape {tuple(model_term.shape)}"
                )
            return model_term * n + beta * cap_term

        bar = _progress(progbar, total=steps, desc="analyze", unit="step")
        for step in range(steps):
            standard_noise = source.draw(sample_shape)
            try:
                value, grad = backend.value_and_grad(loss_fn, alpha)
            except Exception:
                if step > 0 or copies != "layer":
                    raise
                # The model cannot take the copies at the layer: make them at the input.
                copies, batch = "input", repeat_inputs(xp, x, bs)
                value, grad = backend.value_and_grad(loss_fn, alpha)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss became {value} at step {step}; check the model loss function "
                    "(it must be finite for the given inputs) and the feature statistics"
                )
            alpha, state = adam_update(alpha, grad, state, lr=lr, kernel=adam)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.copies_made_at = copies

        self.alpha = backend.stop_gradient(alpha)
        self._last_features = features
        return capacity_fn(features, self.alpha, mean, std, active=active, sigma=self.sigma)


    def explain(
        self,
        loss_for: Callable[[int, int], Callable[[Any], Any]],
        x: Any,
        *,
        inputs_per_pass: int | None = None,
        seed: Any = None,
        **optimize_kwargs: Any,
    ) -> Any:
        """:meth:`optimize` for many inputs, in passes of ``inputs_per_pass`` inputs.

        ``loss_for(start, stop)`` returns the model loss function for inputs
        ``x[start:stop]`` (see :meth:`optimize`).  Inputs are independent problems, so
        splitting them changes nothing but speed: input ``i`` still draws from the noise
        stream ``seed + i``.  By default a pass holds as many inputs as fit in the
        backend's :meth:`~iba_core.Backend.pass_size` (all of them on accelerators).
        Returns the capacity ``(N, C, ...)`` in nats; :attr:`alpha` holds all masks.
        """
        backend = self._require_backend()
        n = int(x.shape[0])
        if inputs_per_pass is None:
            limit = backend.pass_size(x)
            bs = self.copies_per_input(optimize_kwargs.get("batch_size"))
            inputs_per_pass = n if limit is None else max(1, limit // bs)
        if int(inputs_per_pass) < 1:
            raise ValueError(f"inputs_per_pass must be >= 1, got {inputs_per_pass}")
        k = int(inputs_per_pass)
        if k >= n:
            return self.optimize(loss_for(0, n), x, seed=seed, **optimize_kwargs)
        if seed is not None and not isinstance(seed, (int, np.integer)) and isinstance(seed, Sequence):
            if len(seed) != n:
                raise ValueError(f"got {len(seed)} seeds for {n} inputs")
        xp = backend.namespace()
        caps, alphas, features = [], [], []
        for start in range(0, n, k):
            stop = min(n, start + k)
            caps.append(self.optimize(loss_for(start, stop), x[start:stop, ...],
                                      seed=_seeds_for(seed, start, stop), **optimize_kwargs))
            alphas.append(self.alpha)
            features.append(self._last_features)
        self.alpha = xp.concat(alphas, axis=0)
        self._last_features = xp.concat(features, axis=0)
        return xp.concat(caps, axis=0)


class _StepFunctions(NamedTuple):
    terms: Callable[..., tuple[tuple[Any, Any, Any], Any]]
    inject: Callable[..., Any]
    adam: Callable[..., tuple[Any, Any, Any]]


_STEP_FUNCTIONS: dict[tuple[Any, ...], _StepFunctions] = {}


def _step_functions(backend: Backend, sigma: float | None, relu: bool,
                    compiled: bool) -> _StepFunctions:
    """The pure array parts of an optimisation step, compiled by the backend if asked.

    ``terms(alpha, r, active, mean * active, std * active, smoothing_operands)``
    returns the mask terms ``(lambda * active, (1 - lambda) * mean * active,
    (1 - lambda) * std * active)`` shaped ``(N, 1, C, ...)`` to meet the ``batch_size``
    noisy copies of each input, and the sum over inputs of each one's mean capacity.
    The mask depends on alpha only and all copies of an input share it, so it (and the
    capacity, from the recorded features) is computed once per input.
    ``inject(features, lambda_a, mu_a, sigma_a, eps)`` makes the noisy copies (see
    :meth:`Bottleneck._noisy_copies`) and ``adam`` is :func:`iba_core.adam_kernel`.
    They close over nothing but settings, so one compiled set serves every bottleneck.
    """
    key = (type(backend), backend.name, sigma, relu, compiled)
    cached = _STEP_FUNCTIONS.get(key)
    if cached is not None:
        return cached

    def terms(a: Any, r: Any, active: Any, mean_a: Any, std_a: Any,
              operands: tuple[Any, ...] | None) -> tuple[tuple[Any, Any, Any], Any]:
        xp = namespace(a)
        lam, one_minus = restriction_mask(a, sigma, operands)
        cap = capacity_from_mask(r, a, lam, one_minus, active, sigma, clip=False)
        mask = (lam * active, one_minus * mean_a, one_minus * std_a)
        # The sum over inputs of each input's mean capacity (no sizes: a compiled
        # function may see them as unknown).
        per_input = xp.mean(cap, axis=tuple(range(1, cap.ndim)))
        return tuple(xp.expand_dims(m, axis=1) for m in mask), xp.sum(per_input)

    def inject(grouped: Any, lam: Any, shift: Any, scale: Any, eps: Any) -> Any:
        z = (lam * grouped + shift) + scale * eps
        if relu:
            xp = namespace(z)
            z = xp.maximum(z, xp.zeros_like(z))
        return z

    fns = _StepFunctions(terms, inject, adam_kernel())
    if compiled:
        fns = _StepFunctions(*(backend.compile(f) for f in fns))
    _STEP_FUNCTIONS[key] = fns
    return fns


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
    from ._xp import to_numpy

    arr = np.asarray(to_numpy(a), dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("feature_mean/feature_std contain NaN or inf")
    return arr
