"""Abstract conformance tests; see the package docstring for how to use them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypedDict

import array_api_compat.numpy as np_xp
import numpy as np
import pytest

from ..contract import LAYOUTS, Backend, attached, get_backend
from ..engines import Bottleneck, FewSamplesWarning, in_layout, layer_layout, repeat_inputs
from ..math import (
    REQUIRED_FUNCTIONS,
    adam_init,
    adam_update,
    capacity,
    cross_entropy,
    gaussian_smooth,
    restrict,
    saliency_map,
)


def bottleneck_on(backend: Backend, model: Any, layer: Any, bottleneck: Bottleneck) -> Any:
    """Context: ``bottleneck`` hooked on ``layer``, seeing channels-first features whatever
    the layer's layout (as the engines hook it)."""
    layout = layer_layout(backend, model, layer, None)
    return attached(backend, model, layer, in_layout(backend, bottleneck, layout))


@dataclasses.dataclass
class ConformanceCase:
    """What a backend supplies to the suite.

    Attributes:
        backend: the registered backend name.
        make_model: ``dtype -> (model, layer)`` with ``dtype`` ``"float32"`` or
            ``"float64"``; a small classifier returning logits ``(B, n_classes)`` and the
            layer (object or name) to put the bottleneck on.  Same weights every call, a
            fresh model (flags, gradients) every call.
        make_inputs: ``(n, dtype, seed) -> inputs``: ``n`` inputs in the backend's type
            and the model's input layout.
        input_size: spatial size of one input, e.g. ``(H, W)``.
        feature_shape: channels-first per-sample shape of the layer's output, as the
            engine sees it.
        n_classes: number of logits.
        layer_output_shape: per-sample shape of the layer's output as the layer produces
            it, which is what a hook sees (e.g. ``(6, 6, 8)`` for a channels-last Keras
            layer whose ``feature_shape`` is ``(8, 6, 6)``); ``None``: ``feature_shape``.
        layer_input_shape: per-sample shape of the layer's (first) input, which an
            ``on_input`` hook sees; ``None``: ``layer_output_shape``.
        float64: whether the backend computes in float64 (tests that need exact
            arithmetic are skipped otherwise).
        exact_gradients: whether gradients are exact up to round-off (autograd).  A
            finite-difference backend sets ``False``: its gradient errors, though tiny,
            are amplified by Adam's normalisation, so bit-level comparisons are skipped.
        fast_compile: whether ``Backend.compile`` is quick enough (seconds) to test the
            compiled optimisation step; slow compilers are skipped.
        on_input: whether ``Backend.attach(..., on_input=True)`` is supported.
        weight_gradients: ``model -> list``: the gradient stored on each of the model's
            weights, as NumPy, ``None`` where there is none (PyTorch: ``p.grad``).  The
            suite checks that ``value_and_grad`` leaves them as they were.  ``None``: the
            framework stores no gradients on weights; the check is skipped.
        model_flags: ``model -> snapshot``: every flag :meth:`Backend.frozen` may change
            (training modes, trainable flags), as a value compared with ``==``.
            ``None``: the backend's models have no such flags; the checks are skipped.
        mix_flags: ``model -> None``: set the flags to an unusual mix (some layers
            training or trainable and some not), so that restoring them all to one value
            is caught.  ``None``: the flags are left as ``make_model`` sets them.
        is_frozen: ``model -> bool``: whether the model is in inference mode with no
            weight trainable, as :meth:`Backend.frozen` promises.  ``None``: not checked.
        make_sequence_model: ``layout -> (model, layer)`` for ``layout`` in
            :data:`~iba_core.contract.LAYOUTS`: a small float32 classifier of sequences
            (``n_classes`` logits) whose ``layer`` gives features ``(N, C, T)``
            (``"channels_first"``) or ``(N, T, C)`` (``"channels_last"``) and whose logits
            depend on those features at position ``sequence_key`` only.  The two models
            compute the same function with the same weights.  ``None``: the sequence tests
            (:class:`SequenceTests`) are skipped.
        make_sequence_inputs: ``(n, seed) -> inputs`` of the sequence models (token ids
            ``(n, T)`` or float features; integers are never cast by the engine).
        sequence_shape: ``(C, T)``, the channels-first per-sample shape of the sequence
            layer's features.
        sequence_key: the position the sequence models' logits depend on.
    """

    backend: str
    make_model: Callable[[str], tuple[Any, Any]]
    make_inputs: Callable[[int, str, int], Any]
    input_size: tuple[int, ...]
    feature_shape: tuple[int, ...]
    n_classes: int
    layer_output_shape: tuple[int, ...] | None = None
    layer_input_shape: tuple[int, ...] | None = None
    float64: bool = True
    exact_gradients: bool = True
    fast_compile: bool = False
    on_input: bool = True
    weight_gradients: Callable[[Any], list[np.ndarray | None]] | None = None
    model_flags: Callable[[Any], Any] | None = None
    mix_flags: Callable[[Any], None] | None = None
    is_frozen: Callable[[Any], bool] | None = None
    make_sequence_model: Callable[[str], tuple[Any, Any]] | None = None
    make_sequence_inputs: Callable[[int, int], Any] | None = None
    sequence_shape: tuple[int, int] = (0, 0)
    sequence_key: int = 0

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample shape a hook on the layer's output sees."""
        return tuple(self.layer_output_shape or self.feature_shape)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape a hook on the layer's input sees."""
        return tuple(self.layer_input_shape or self.output_shape)

    @property
    def dtype(self) -> str:
        """The most exact dtype the backend computes in."""
        return "float64" if self.float64 else "float32"


# Each namespace function the core uses, exercised as the core uses it.  ``a``/``b`` are
# (2, 3, 4) float32 arrays, ``p`` a positive one.
_FUNCTION_CHECKS: dict[str, Callable[[Any, Any, Any, Any], Any]] = {
    "asarray": lambda xp, a, b, p: xp.asarray(a, dtype=xp.float32),
    "astype": lambda xp, a, b, p: xp.astype(a > b, xp.float32),
    "broadcast_to": lambda xp, a, b, p: xp.broadcast_to(a[:1, ...], (2, 3, 4)),
    "concat": lambda xp, a, b, p: xp.concat([a, b], axis=0),
    "exp": lambda xp, a, b, p: xp.exp(a),
    "expand_dims": lambda xp, a, b, p: xp.expand_dims(a, axis=1),
    "full": lambda xp, a, b, p: xp.full((2, 3), 1.5, dtype=xp.float32),
    "log": lambda xp, a, b, p: xp.log(p),
    "logaddexp": lambda xp, a, b, p: xp.logaddexp(a * 30.0, b),
    "matmul": lambda xp, a, b, p: xp.matmul(a[0, ...], xp.permute_dims(b, (0, 2, 1))),
    "max": lambda xp, a, b, p: xp.max(a, axis=1, keepdims=True),
    "maximum": lambda xp, a, b, p: xp.maximum(a, b),
    "mean": lambda xp, a, b, p: xp.mean(xp.reshape(a, (2, -1)), axis=1),
    "permute_dims": lambda xp, a, b, p: xp.permute_dims(a, (2, 0, 1)),
    "reshape": lambda xp, a, b, p: xp.reshape(a, (6, -1)),
    "sqrt": lambda xp, a, b, p: xp.sqrt(p),
    "sum": lambda xp, a, b, p: xp.sum(a, axis=1),
    "where": lambda xp, a, b, p: xp.where(a > 0, a, b),
    "zeros": lambda xp, a, b, p: xp.zeros((2, 3), dtype=xp.float32),
    "zeros_like": lambda xp, a, b, p: xp.zeros_like(a),
}


# float32 has a 24-bit significand (eps 1.2e-7); a handful of rounding steps per value
# stays well inside these.
class Tolerance(TypedDict):
    """Keyword arguments of ``np.testing.assert_allclose``."""

    rtol: float
    atol: float


F32: Tolerance = {"rtol": 2e-6, "atol": 1e-6}
F64: Tolerance = {"rtol": 1e-12, "atol": 1e-12}


def _reference_namespace() -> Any:
    try:
        import array_api_strict

        return array_api_strict
    except ImportError:  # pragma: no cover - array-api-strict is in the test extra
        return np_xp


def _to_np(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


class _Base:
    @pytest.fixture
    def backend(self, case: ConformanceCase) -> Backend:
        return get_backend(case.backend)

    @staticmethod
    def tensor(backend: Backend, a: np.ndarray, like: Any = None) -> Any:
        return backend.from_numpy(np.asarray(a), like=like)

    @staticmethod
    def like(backend: Backend, dtype: str) -> Any:
        return backend.from_numpy(np.zeros(1, dtype=dtype))


class NamespaceTests(_Base):
    """The backend's Array API namespace agrees with the reference on what the core uses."""

    def test_every_required_function_is_checked(self) -> None:
        assert set(_FUNCTION_CHECKS) == set(REQUIRED_FUNCTIONS)

    @pytest.mark.parametrize("name", sorted(_FUNCTION_CHECKS))
    def test_function_matches_reference(self, backend: Backend, name: str) -> None:
        xp = backend.namespace()
        assert hasattr(xp, name), f"namespace lacks {name}"
        rng = np.random.default_rng(0)
        arrs: list[np.ndarray] = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2)]
        arrs.append(np.abs(arrs[0]) + 0.1)
        ref_xp = _reference_namespace()
        expected = _to_np(_FUNCTION_CHECKS[name](ref_xp, *[ref_xp.asarray(a) for a in arrs]))
        got_t = _FUNCTION_CHECKS[name](xp, *[backend.from_numpy(a) for a in arrs])
        assert backend.owns(got_t), f"{name} returned {type(got_t)}, not a backend tensor"
        got = backend.to_numpy(got_t)
        assert got.shape == expected.shape
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, **F32)

    def test_finfo_smallest_normal(self, backend: Backend) -> None:
        xp = backend.namespace()
        fi = xp.finfo(xp.float32)
        tiny = getattr(fi, "smallest_normal", None) or fi.tiny
        assert float(tiny) == float(np.finfo(np.float32).tiny)

    @pytest.mark.parametrize(
        "what",
        ["capacity", "restrict", "smooth_1d", "smooth_2d", "saliency", "cross_entropy", "adam", "repeat"],
    )
    def test_core_math_matches_numpy(self, backend: Backend, what: str) -> None:
        rng = np.random.default_rng(1)
        feats = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
        alpha = rng.uniform(-4, 6, (2, 3, 5, 4)).astype(np.float32)
        mean = rng.standard_normal((3, 5, 4)).astype(np.float32)
        std = rng.uniform(0.5, 2.0, (3, 5, 4)).astype(np.float32)
        active = (rng.uniform(size=(3, 5, 4)) > 0.2).astype(np.float32)
        noise = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
        logits = rng.standard_normal((6, 4)).astype(np.float32) * 5
        onehot = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]]

        def run(t: Callable[[np.ndarray], Any]) -> list[np.ndarray]:
            fns: dict[str, Callable[[], Any]] = {
                "capacity": lambda: capacity(
                    t(feats), t(alpha), t(mean), t(std), active=t(active), sigma=1.0
                ),
                "restrict": lambda: restrict(
                    t(feats), t(alpha), t(noise), t(mean), t(std), active=t(active), sigma=1.0, relu=True
                )[0],
                "smooth_1d": lambda: gaussian_smooth(t(feats[:, :, 0, :]), 1.5, 1),
                "smooth_2d": lambda: gaussian_smooth(t(feats), 1.0, 2),
                "saliency": lambda: saliency_map(t(np.abs(feats)), (13, 9)),
                "cross_entropy": lambda: cross_entropy(t(logits), t(onehot)),
                "adam": lambda: adam_update(
                    t(alpha), t(feats), adam_update(t(alpha), t(noise), adam_init(t(alpha)))[1]
                )[0],
                "repeat": lambda: repeat_inputs(_namespace_of(t(feats)), t(feats), 3),
            }
            return fns[what]()

        expected = _to_np(run(lambda a: a))
        got_t = run(lambda a: backend.from_numpy(a))
        assert backend.owns(got_t)
        got = backend.to_numpy(got_t)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def _namespace_of(x: Any) -> Any:
    from ..math import namespace

    return namespace(x)


class GradientTests(_Base):
    """``value_and_grad`` of the capacity term matches finite differences."""

    def test_capacity_gradient_matches_finite_differences(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        dtype = "float64" if case.float64 else "float32"
        rng = np.random.default_rng(2)
        feats = rng.standard_normal((1, 2, 4, 3))
        alpha = rng.uniform(-3, 4, (1, 2, 4, 3))
        alpha[0, 0, 1, :2] = 0.0  # where the two halves of the sigmoid meet
        mean = rng.standard_normal((2, 4, 3)) * 0.1
        std = rng.uniform(0.5, 1.5, (2, 4, 3))
        like = self.like(backend, dtype)
        t = lambda a: backend.from_numpy(a.astype(dtype), like=like)
        xp = backend.namespace()

        def total(a: Any) -> Any:
            return xp.sum(capacity(t(feats), a, t(mean), t(std), sigma=1.0))

        value, grad = backend.value_and_grad(total, t(alpha))
        grad = backend.to_numpy(grad)
        assert grad.shape == alpha.shape

        def total_np(a: np.ndarray) -> float:
            return float(np.sum(capacity(feats, a, mean, std, sigma=1.0)))

        h = 1e-6
        fd = np.zeros_like(alpha)
        for idx in np.ndindex(alpha.shape):
            up, down = alpha.copy(), alpha.copy()
            up[idx] += h
            down[idx] -= h
            fd[idx] = (total_np(up) - total_np(down)) / (2 * h)
        # Central differences in float64 are accurate to ~1e-8; float32 autograd to ~1e-6
        # relative per term, summed over the few dozen terms of this map.
        tol: Tolerance = {"rtol": 1e-6, "atol": 1e-7} if case.float64 else {"rtol": 1e-3, "atol": 1e-4}
        np.testing.assert_allclose(value, total_np(alpha), **tol)
        np.testing.assert_allclose(grad, fd, **tol)


def _record(backend: Backend, model: Any, layer: Any, x: Any, *, on_input: bool = False) -> np.ndarray:
    """The layer's output (or input) for ``x``, as the layer produces it."""
    seen: list[np.ndarray] = []

    def hook(f: Any) -> None:
        seen.append(backend.to_numpy(f))

    with attached(backend, model, layer, hook, on_input=on_input):
        backend.call(model, x)
    assert len(seen) == 1, f"the layer ran {len(seen)} times in one pass"
    return seen[0]


def _layout(backend: Backend, model: Any, layer: Any) -> str:
    """The layer's layout as the engine takes it: what the backend says, else channels-first."""
    return backend.layer_layout(model, layer) or "channels_first"


def _channels_first(a: np.ndarray, layout: str) -> np.ndarray:
    """``(N, ..., C) -> (N, C, ...)`` for a channels-last layout; vectors are unchanged."""
    return np.moveaxis(a, -1, 1) if layout == "channels_last" and a.ndim > 2 else a


def _record_features(backend: Backend, model: Any, layer: Any, x: Any) -> np.ndarray:
    """The layer's output for ``x``, channels-first: the features the engine works on."""
    return _channels_first(_record(backend, model, layer, x), _layout(backend, model, layer))


def _estimated(
    case: ConformanceCase, backend: Backend, model: Any, layer: Any, dtype: str = "float32", **kwargs: Any
) -> Bottleneck:
    bn = Bottleneck(**kwargs)
    bn.backend = backend
    batches = [case.make_inputs(16, dtype, 100 + i) for i in range(4)]
    with bottleneck_on(backend, model, layer, bn), backend.frozen(model):
        with pytest.warns(FewSamplesWarning):
            bn.estimate(lambda b: backend.call(model, b), batches)
    return bn


class EstimationTests(_Base):
    """Estimation records the layer's channels-first features and matches NumPy."""

    def test_estimate_matches_numpy(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        batches = [case.make_inputs(16, "float32", 100 + i) for i in range(4)]
        feats = np.concatenate([_record_features(backend, model, layer, b) for b in batches])
        assert feats.shape[1:] == tuple(case.feature_shape)
        bn = _estimated(case, backend, model, layer)
        est = bn.estimator
        assert est.n == 64
        ref = feats.astype(np.float64)
        # Same float32 features, summed in float64 in two orders: agreement to ~1e-12.
        np.testing.assert_allclose(est.mean(), ref.mean(axis=0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(est.std(), ref.std(axis=0, ddof=1), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(est.active_fraction(), (ref != 0).mean(axis=0))

    def test_estimate_stops_at_n_samples(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = Bottleneck()
        bn.backend = backend
        batches = [case.make_inputs(4, "float32", i) for i in range(5)]
        with bottleneck_on(backend, model, layer, bn), pytest.warns(FewSamplesWarning):
            bn.estimate(lambda b: backend.call(model, b), batches, n_samples=10)
        assert bn.estimator.n == 10


class HookTests(_Base):
    """A hook sees the layer's output as the layer produces it, its replacement is used,
    and taking it out leaves the model's outputs unchanged."""

    def test_attach_and_remove_are_bit_identical(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        x = case.make_inputs(3, "float32", 0)
        before = backend.to_numpy(backend.call(model, x))
        for hook in (lambda f: None, lambda f: f):  # no replacement, and the same features
            with attached(backend, model, layer, hook):
                during = backend.to_numpy(backend.call(model, x))
            np.testing.assert_array_equal(during, before)
        after = backend.to_numpy(backend.call(model, x))
        np.testing.assert_array_equal(after, before)

    def test_hook_sees_the_layer_output_and_its_output_is_used(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        model, layer = case.make_model("float32")
        x = case.make_inputs(2, "float32", 0)
        other = case.make_inputs(2, "float32", 1)
        before = backend.to_numpy(backend.call(model, x))
        expected = backend.to_numpy(backend.call(model, other))
        assert not np.allclose(expected, before)
        shapes: list[tuple[int, ...]] = []

        def zero(f: Any) -> Any:
            shapes.append(tuple(int(s) for s in f.shape))
            return f * 0.0

        with attached(backend, model, layer, zero):
            zeroed = backend.to_numpy(backend.call(model, x))
        # As the layer produces it: no transposition by the backend.
        assert shapes == [(2, *case.output_shape)]
        assert not np.allclose(zeroed, before)
        assert np.allclose(zeroed[0], zeroed[1]), "zero features must give input-independent outputs"
        # The features recorded for other inputs, put in while the model runs on x, give
        # the other inputs' outputs: the hook saw the whole output, in the layer's own
        # layout, and the rest of the model ran on its replacement.
        features = _record(backend, model, layer, other)
        with attached(backend, model, layer, lambda f: backend.from_numpy(features, like=f)):
            swapped = backend.to_numpy(backend.call(model, x))
        # The same float32 numbers through the same layers: equal up to kernel choices.
        np.testing.assert_allclose(swapped, expected, **F32)

    def test_hook_may_return_a_whole_multiple_of_the_rows(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        model, layer = case.make_model("float32")
        x = case.make_inputs(2, "float32", 2)
        before = backend.to_numpy(backend.call(model, x))
        xp = backend.namespace()
        with attached(backend, model, layer, lambda f: xp.concat([f, f, f], axis=0)):
            tripled = backend.to_numpy(backend.call(model, x))
        assert tripled.shape == (6, *before.shape[1:])
        for k in range(3):
            # Batches of 6 rows instead of 2 may take other float32 kernels (blocking).
            np.testing.assert_allclose(tripled[2 * k : 2 * k + 2], before, rtol=1e-5, atol=1e-5)

    def test_layer_layout_maps_the_layer_output_to_the_feature_shape(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        model, layer = case.make_model("float32")
        reported = backend.layer_layout(model, layer)
        assert reported in (*LAYOUTS, None)
        shape = case.output_shape
        if _layout(backend, model, layer) == "channels_last" and len(shape) > 1:
            shape = (shape[-1], *shape[:-1])
        assert shape == tuple(case.feature_shape), (
            f"the layer gives {case.output_shape} in layout {reported!r}, which is not the "
            f"channels-first feature shape {case.feature_shape}"
        )

    def test_unknown_layer_name_lists_layers(self, case: ConformanceCase, backend: Backend) -> None:
        model, _ = case.make_model("float32")
        with pytest.raises(LookupError, match="no_such_layer") as info:
            backend.attach(model, "no_such_layer", lambda f: None)
        names = backend.layer_names(model)
        assert names and any(n in str(info.value) for n in names)

    def test_restricted_flow_changes_outputs(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 0)
        clean = backend.to_numpy(backend.call(model, x))
        feats = _record_features(backend, model, layer, x)
        xp = backend.namespace()
        like = backend.from_numpy(feats)
        closed = xp.full(tuple(feats.shape), -10.0, dtype=like.dtype)
        opened = xp.full(tuple(feats.shape), 30.0, dtype=like.dtype)
        with bottleneck_on(backend, model, layer, bn):
            with bn.restricting(closed):
                noisy = backend.to_numpy(backend.call(model, x))
            with bn.restricting(opened):
                passed = backend.to_numpy(backend.call(model, x))
        assert np.max(np.abs(noisy - clean)) > 1e-2 * (np.max(np.abs(clean)) + 1e-6)
        # lambda = sigmoid(30) is 1 in float32: only the active-element mask can differ.
        _, _, active = bn.statistics()
        if np.all(active == 1):
            np.testing.assert_allclose(passed, clean, rtol=1e-5, atol=1e-5)


class PerSampleTests(_Base):
    """The per-sample optimisation through the backend."""

    @staticmethod
    def explain(
        case: ConformanceCase,
        backend: Backend,
        model: Any,
        layer: Any,
        bn: Bottleneck,
        x: Any,
        targets: list[int],
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        n = len(targets)

        def loss(batch: Any) -> Any:
            logits = backend.call(model, batch)
            reps = int(logits.shape[0]) // n
            onehot = np.eye(case.n_classes)[np.repeat(targets, reps)]
            return cross_entropy(logits, backend.from_numpy(onehot, like=logits))

        with bottleneck_on(backend, model, layer, bn), backend.frozen(model):
            cap = bn.optimize(loss, x, **kwargs)
        return cap, saliency_map(cap, case.input_size)

    def test_saliency_map_properties(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 7)
        cap, smap = self.explain(case, backend, model, layer, bn, x, [0, 1], seed=0, optimization_steps=3)
        assert backend.owns(smap)
        cap, smap = backend.to_numpy(cap), backend.to_numpy(smap)
        assert cap.shape == (2, *case.feature_shape)
        assert smap.shape == (2, *case.input_size)
        assert np.all(np.isfinite(smap)) and np.all(smap >= 0)
        total_bits = cap.reshape(2, -1).sum(axis=1, dtype=np.float64) / math.log(2)
        assert np.all(total_bits > 0)
        # Two float32 sums of a few hundred positive terms: relative error well below 1e-5.
        np.testing.assert_allclose(smap.reshape(2, -1).sum(axis=1, dtype=np.float64), total_bits, rtol=1e-5)

    def test_same_seed_same_map(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(1, "float32", 3)
        maps = [
            backend.to_numpy(
                self.explain(case, backend, model, layer, bn, x, [2], seed=s, optimization_steps=3)[1]
            )
            for s in (5, 5, 6)
        ]
        np.testing.assert_array_equal(maps[0], maps[1])
        assert not np.array_equal(maps[0], maps[2])

    def test_many_inputs_match_single_calls(self, case: ConformanceCase, backend: Backend) -> None:
        if not case.float64:
            pytest.skip("needs float64: Adam amplifies float32 round-off of near-zero gradients")
        if not case.exact_gradients:
            pytest.skip("needs exact gradients: Adam amplifies finite-difference errors")
        model, layer = case.make_model("float64")
        bn = _estimated(case, backend, model, layer, dtype="float64")
        x = case.make_inputs(3, "float64", 11)
        targets = [0, 1, 2]
        xp = backend.namespace()
        together = backend.to_numpy(self.explain(case, backend, model, layer, bn, x, targets, seed=4)[0])
        for i in range(3):
            xi = xp.reshape(x[i : i + 1, ...], (1, *tuple(x.shape[1:])))
            single = backend.to_numpy(
                self.explain(case, backend, model, layer, bn, xi, [targets[i]], seed=4 + i)[0]
            )
            # float64 with lr=1 Adam steps: round-off of ~1e-15 grows to ~1e-9 at most.
            np.testing.assert_allclose(together[i], single[0], rtol=1e-7, atol=1e-9)

    def test_passes_of_fewer_inputs_change_nothing(self, case: ConformanceCase, backend: Backend) -> None:
        if not (case.float64 and case.exact_gradients):
            pytest.skip("needs float64 and exact gradients (see test_many_inputs_match_single_calls)")
        model, layer = case.make_model("float64")
        bn = _estimated(case, backend, model, layer, dtype="float64")
        x = case.make_inputs(3, "float64", 12)
        targets = [2, 0, 1]

        def loss_for(start: int, stop: int) -> Callable[[Any], Any]:
            def loss(batch: Any) -> Any:
                logits = backend.call(model, batch)
                reps = int(logits.shape[0]) // (stop - start)
                onehot = np.eye(case.n_classes)[np.repeat(targets[start:stop], reps)]
                return cross_entropy(logits, backend.from_numpy(onehot, like=logits))

            return loss

        caps, alphas = [], []
        for per_pass in (3, 2, 1):
            with bottleneck_on(backend, model, layer, bn), backend.frozen(model):
                caps.append(
                    backend.to_numpy(
                        bn.explain(loss_for, x, inputs_per_pass=per_pass, seed=7, optimization_steps=4)
                    )
                )
            alphas.append(backend.to_numpy(bn.alpha))
        assert caps[0].shape == (3, *case.feature_shape) and alphas[2].shape == caps[0].shape
        for cap, alpha in zip(caps[1:], alphas[1:], strict=True):
            # float64: differences are round-off, amplified a little by Adam (see above).
            np.testing.assert_allclose(cap, caps[0], rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(alpha, alphas[0], rtol=1e-7, atol=1e-9)

    def test_higher_beta_lets_less_information_through(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 9)
        totals = []
        for beta in (0.1, 100.0):
            cap, _ = self.explain(case, backend, model, layer, bn, x, [0, 1], seed=1, beta=beta)
            totals.append(backend.to_numpy(cap).reshape(2, -1).sum(axis=1))
        assert np.all(totals[1] < totals[0])

    def test_compiled_step_gives_the_same_map(self, case: ConformanceCase, backend: Backend) -> None:
        if not case.fast_compile:
            pytest.skip("the backend's compiler is too slow for a unit test")
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 4)
        caps = []
        for compiled in (False, True):
            bn.compile = compiled
            cap, _ = self.explain(case, backend, model, layer, bn, x, [0, 1], seed=2, optimization_steps=4)
            caps.append(backend.to_numpy(cap))
        # Same float32 arithmetic, fused or reordered by the compiler: round-off level
        # differences, amplified a little by four Adam steps.
        np.testing.assert_allclose(caps[1], caps[0], rtol=1e-3, atol=1e-5)

    def test_copies_at_the_layer_match_copies_of_the_input(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        exact = case.float64 and case.exact_gradients
        dtype = "float64" if exact else "float32"
        model, layer = case.make_model(dtype)
        bn = _estimated(case, backend, model, layer, dtype=dtype)
        x = case.make_inputs(2, dtype, 13)
        caps = {}
        for copies in ("input", "layer"):
            cap, _ = self.explain(
                case, backend, model, layer, bn, x, [1, 2], seed=3, optimization_steps=4, copies=copies
            )
            assert bn.copies_made_at == copies
            caps[copies] = backend.to_numpy(cap)
        # The same arithmetic except the layers before the bottleneck, which run on one
        # copy instead of ten: float64 round-off (see test_many_inputs_match_single_calls),
        # or float32 round-off amplified by four Adam steps (see the compiled-step test).
        rtol, atol = (1e-7, 1e-9) if exact else (1e-3, 1e-5)
        np.testing.assert_allclose(caps["layer"], caps["input"], rtol=rtol, atol=atol)

    def test_copies_fall_back_to_the_input_when_the_model_refuses(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 5)
        copies = 3
        onehot = np.eye(case.n_classes)[np.repeat([0, 1], copies)]

        def loss(batch: Any) -> Any:
            logits = backend.call(model, batch)
            # Stands for a model that cannot carry more rows after the layer than it was
            # given (a skip connection around the layer, a reshape by the batch size).
            if int(logits.shape[0]) != int(batch.shape[0]):
                raise ValueError("this model needs the noisy copies in its input")
            return cross_entropy(logits, backend.from_numpy(onehot, like=logits))

        caps = {}
        with bottleneck_on(backend, model, layer, bn), backend.frozen(model):
            for where in ("layer", "input"):
                caps[where] = backend.to_numpy(
                    bn.optimize(loss, x, copies=where, batch_size=copies, seed=6, optimization_steps=3)
                )
                assert bn.copies_made_at == "input"
            # A loss that fails either way reports its own error.
            with pytest.raises(ValueError, match="scalar"):
                bn.optimize(lambda b: backend.call(model, b), x, copies="layer")
            with pytest.raises(ValueError, match="copies must be"):
                bn.optimize(loss, x, copies="output")
        # The fallback reuses the first step's noise: the same numbers exactly.
        np.testing.assert_array_equal(caps["layer"], caps["input"])

    def test_closure_that_skips_the_layer_is_refused(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(1, "float32", 0)
        xp = backend.namespace()
        with bottleneck_on(backend, model, layer, bn), pytest.raises(RuntimeError, match="never ran"):
            bn.optimize(lambda b: xp.sum(b), x)

    def test_non_scalar_loss_is_refused(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(1, "float32", 0)
        with bottleneck_on(backend, model, layer, bn), pytest.raises(ValueError, match="scalar"):
            bn.optimize(lambda b: backend.call(model, b), x)


class _Boom(Exception):
    """Raised by the suite inside :meth:`Backend.frozen`."""


def _grad_tol(case: ConformanceCase, dtype: str) -> Tolerance:
    """Tolerance of ``value_and_grad`` on a few-term function with an exact gradient."""
    if case.exact_gradients:
        # Autograd: a few rounding steps per element.
        return F64 if dtype == "float64" else F32
    # Central differences with the step eps**(1/3) (6e-6 in float64, 5e-3 in float32):
    # round-off eps*|f|/h, about 1e-10 (float64) or 1e-4 (float32) for |f| ~ 10.
    return {"rtol": 1e-6, "atol": 1e-6} if dtype == "float64" else {"rtol": 2e-2, "atol": 2e-2}


class PromiseTests(_Base):
    """The promises of the :class:`~iba_core.contract.Backend` contract, checked through
    the Backend API only: gradients, freezing, hooks and random draws."""

    # -- value_and_grad -------------------------------------------------------------------
    def test_value_and_grad_passes_the_operands_through(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        dtype = case.dtype
        like = self.like(backend, dtype)
        xp = backend.namespace()
        rng = np.random.default_rng(20)
        p, a, b = (rng.standard_normal((3, 4)) for _ in range(3))
        t = lambda v: backend.from_numpy(v.astype(dtype), like=like)
        arities: list[int] = []

        def fn(param: Any, *operands: Any) -> Any:
            arities.append(len(operands))
            first, second = operands
            return xp.sum(first * param * param) + xp.sum(second * param)

        value, grad = backend.value_and_grad(fn, t(p), t(a), t(b))
        assert arities and set(arities) == {2}
        assert isinstance(value, float)
        assert backend.owns(grad)
        grad = backend.to_numpy(grad)
        assert grad.shape == p.shape and grad.dtype == np.dtype(dtype)
        tol = _grad_tol(case, dtype)
        np.testing.assert_allclose(value, np.sum(a * p * p) + np.sum(b * p), **tol)
        # The gradient with respect to the parameter only, each operand in its place
        # (swapped operands would give 2 b p + a).
        np.testing.assert_allclose(grad, 2 * a * p + b, **tol)
        # Without operands, fn gets the parameter alone.
        arities.clear()
        value, grad = backend.value_and_grad(lambda q: fn(q, t(a), t(b)), t(p))
        assert set(arities) == {2}
        np.testing.assert_allclose(value, np.sum(a * p * p) + np.sum(b * p), **tol)
        np.testing.assert_allclose(backend.to_numpy(grad), 2 * a * p + b, **tol)

    @staticmethod
    def _masked_loss(backend: Backend, model: Any, layer: Any) -> Callable[..., Any]:
        """``(mask, inputs, onehot) -> loss``: the layer's output times ``mask``, through
        the rest of the model, into the core's cross-entropy.  Reads only its arguments."""

        def loss(mask: Any, inputs: Any, onehot: Any) -> Any:
            with attached(backend, model, layer, lambda f: f * mask):
                logits = backend.call(model, inputs)
            return cross_entropy(logits, onehot)

        return loss

    def test_value_and_grad_through_the_model_matches_finite_differences(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        dtype = case.dtype
        model, layer = case.make_model(dtype)
        x = case.make_inputs(2, dtype, 21)
        like = self.like(backend, dtype)
        rng = np.random.default_rng(22)
        mask = rng.uniform(0.5, 1.5, case.output_shape)
        onehot = backend.from_numpy(np.eye(case.n_classes)[[1, case.n_classes - 1]], like=like)
        loss = self._masked_loss(backend, model, layer)

        def f(v: np.ndarray) -> float:
            return float(backend.to_numpy(loss(backend.from_numpy(v, like=like), x, onehot)))

        with backend.frozen(model):
            value, grad = backend.value_and_grad(loss, backend.from_numpy(mask, like=like), x, onehot)
            grad = backend.to_numpy(grad)
            assert grad.shape == mask.shape
            norm = float(np.linalg.norm(grad))
            assert norm > 0
            # The same arithmetic as a plain call: the same value, round-off apart.
            np.testing.assert_allclose(value, f(mask), rtol=1e-10 if case.float64 else 1e-5)
            # Directional derivatives along random unit directions, by central differences.
            # float64, h = 1e-4: truncation h**2 |f'''| ~ 1e-9, round-off eps |f| / h ~
            # 1e-12.  float32, h = 1e-2: both ~ 1e-5.  A wrong gradient errs by ~ its norm.
            h = 1e-4 if case.float64 else 1e-2
            atol = (1e-7 if case.float64 else 1e-3) * max(norm, 1.0)
            for _ in range(4):
                d = rng.standard_normal(mask.shape)
                d /= np.linalg.norm(d)
                fd = (f(mask + h * d) - f(mask - h * d)) / (2 * h)
                np.testing.assert_allclose(float(np.sum(grad * d)), fd, rtol=1e-5, atol=atol)

    def test_value_and_grad_writes_no_weight_gradients(self, case: ConformanceCase, backend: Backend) -> None:
        if case.weight_gradients is None:
            pytest.skip("the case declares no weight gradients (weight_gradients=None)")
        model, layer = case.make_model("float32")
        x = case.make_inputs(2, "float32", 23)
        like = self.like(backend, "float32")
        outputs = backend.to_numpy(backend.call(model, x))
        before = case.weight_gradients(model)
        assert before, "weight_gradients returned no weights"
        mask = np.random.default_rng(24).uniform(0.5, 1.5, case.output_shape)
        onehot = backend.from_numpy(np.eye(case.n_classes)[[0, 1]], like=like)
        loss = self._masked_loss(backend, model, layer)
        # Outside frozen on purpose: the weights are trainable here, which is where a
        # backend that differentiates the whole graph would write their gradients.
        runs = [
            backend.value_and_grad(loss, backend.from_numpy(mask, like=like), x, onehot) for _ in range(2)
        ]
        after = case.weight_gradients(model)
        assert len(after) == len(before)
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            if b is None:
                assert a is None, f"value_and_grad wrote a gradient on weight {i}"
            else:
                assert a is not None, f"value_and_grad cleared the gradient of weight {i}"
                np.testing.assert_array_equal(a, b, err_msg=f"weight {i}'s gradient changed")
        # Nothing accumulates from one call to the next, and the weights are unchanged.
        assert runs[0][0] == runs[1][0]
        np.testing.assert_array_equal(backend.to_numpy(runs[1][1]), backend.to_numpy(runs[0][1]))
        np.testing.assert_array_equal(backend.to_numpy(backend.call(model, x)), outputs)

    # -- frozen ---------------------------------------------------------------------------
    @staticmethod
    def _flagged_model(case: ConformanceCase) -> Any:
        if case.model_flags is None:
            pytest.skip("the case declares no model flags (model_flags=None)")
        model, _ = case.make_model("float32")
        if case.mix_flags is not None:
            case.mix_flags(model)
        return model

    def test_frozen_restores_every_flag_also_after_an_exception(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        model = self._flagged_model(case)
        flags = case.model_flags
        assert flags is not None
        before = flags(model)
        inside: list[Any] = []
        with pytest.raises(_Boom):
            with backend.frozen(model):
                inside.append(flags(model))
                raise _Boom
        assert flags(model) == before, "an exception inside frozen left flags changed"
        assert inside[0] != before, "frozen changed no flag"
        # A normal exit, and frozen within frozen: each exit restores what its entry saw.
        with backend.frozen(model):
            assert flags(model) == inside[0]
            with backend.frozen(model):
                pass
            assert flags(model) == inside[0]
        assert flags(model) == before

    def test_frozen_model_is_in_inference_mode(self, case: ConformanceCase, backend: Backend) -> None:
        model = self._flagged_model(case)
        if case.is_frozen is None:
            pytest.skip("the case cannot tell a frozen model (is_frozen=None)")
        x = case.make_inputs(2, "float32", 25)
        expected = backend.to_numpy(backend.call(model, x))
        assert not case.is_frozen(model)
        with backend.frozen(model):
            assert case.is_frozen(model)
            outputs = backend.to_numpy(backend.call(model, x))
        assert not case.is_frozen(model)
        np.testing.assert_array_equal(outputs, expected)

    # -- hooks ----------------------------------------------------------------------------
    def test_input_hook_sees_the_layer_input_and_its_output_is_used(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        if not case.on_input:
            pytest.skip("the case declares no input hooks (on_input=False)")
        model, layer = case.make_model("float32")
        x = case.make_inputs(2, "float32", 26)
        other = case.make_inputs(2, "float32", 27)
        expected = backend.to_numpy(backend.call(model, other))
        assert not np.allclose(backend.to_numpy(backend.call(model, x)), expected)
        order: list[str] = []
        seen: list[np.ndarray] = []

        def on_input(f: Any) -> None:
            order.append("input")
            seen.append(backend.to_numpy(f))

        def on_output(f: Any) -> None:
            order.append("output")

        # The output hook attached first: the input hook runs first all the same.
        with (
            attached(backend, model, layer, on_output),
            attached(backend, model, layer, on_input, on_input=True),
        ):
            during = backend.to_numpy(backend.call(model, other))
        assert order == ["input", "output"]
        np.testing.assert_array_equal(during, expected)
        assert seen[0].shape == (2, *case.input_shape)
        # The input recorded for other inputs, put in while the model runs on x, gives the
        # other inputs' outputs: the hook saw the layer's input (not its output), and the
        # layer ran on the replacement.
        with attached(backend, model, layer, lambda f: backend.from_numpy(seen[0], like=f), on_input=True):
            swapped = backend.to_numpy(backend.call(model, x))
        # The same float32 numbers through the same layers: equal up to kernel choices.
        np.testing.assert_allclose(swapped, expected, **F32)
        np.testing.assert_array_equal(backend.to_numpy(backend.call(model, other)), expected)

    def test_hooks_stack_in_attach_order_and_come_off_in_any_order(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        model, layer = case.make_model("float32")
        x = case.make_inputs(2, "float32", 28)
        before = backend.to_numpy(backend.call(model, x))
        raw = _record(backend, model, layer, x)
        # Powers of two: the sum of the hooks that ran before tells which ones they were.
        constants = {1: 1.0, 2: 2.0, 3: 4.0}
        ran: list[int] = []
        seen: dict[int, np.ndarray] = {}

        def adder(k: int) -> Callable[[Any], Any]:
            def hook(f: Any) -> Any:
                ran.append(k)
                seen[k] = backend.to_numpy(f)
                return f + constants[k]

            return hook

        def run(order: list[int]) -> np.ndarray:
            ran.clear()
            seen.clear()
            out = backend.to_numpy(backend.call(model, x))
            assert ran == order, f"hooks ran in order {ran}, expected {order}"
            total = 0.0
            for k in order:
                # Each hook sees the output of the ones before it (float32 sums of a
                # feature and numbers up to 7: a few ulps).
                np.testing.assert_allclose(seen[k], raw + np.float32(total), **F32)
                total += constants[k]
            return out

        handles = {k: backend.attach(model, layer, adder(k)) for k in (1, 2, 3)}
        try:
            stacked = run([1, 2, 3])
            handles.pop(2).remove()  # the middle one
            run([1, 3])
            handles[2] = backend.attach(model, layer, adder(2))  # on again, now last
            run([1, 3, 2])
            handles.pop(1).remove()  # the first one
            run([3, 2])
            handles.pop(2).remove()  # the last one
            run([3])
            handles.pop(3).remove()
            after = run([])
        finally:
            for handle in handles.values():
                handle.remove()
        # The model ran on the last hook's output: the layer's output plus 7.
        with attached(backend, model, layer, lambda f: f + 7.0):
            plus_seven = backend.to_numpy(backend.call(model, x))
        np.testing.assert_allclose(stacked, plus_seven, rtol=1e-5, atol=1e-5)
        assert not np.allclose(stacked, before)
        np.testing.assert_array_equal(after, before)

    # -- random draws ---------------------------------------------------------------------
    @staticmethod
    def _generator(backend: Backend, seed: int, like: Any) -> Any:
        try:
            return backend.make_generator(seed, like)
        except NotImplementedError:
            pytest.skip(f"backend {backend.name!r} has no seeded generator")

    def test_seeded_generators_reproduce_and_successive_draws_differ(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        like = self.like(backend, "float32")
        shape = (2, 3, 5)

        def draws(seed: int) -> list[np.ndarray]:
            generator = self._generator(backend, seed, like)
            out = []
            for _ in range(3):
                sample, generator = backend.draw(shape, like, generator)
                out.append(backend.to_numpy(sample))
            return out

        first, again, other = draws(3), draws(3), draws(4)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)  # the same seed: the same sequence
        # Each draw advances the generator: no value repeats among 30 continuous draws.
        assert not np.any(first[0] == first[1]) and not np.any(first[1] == first[2])
        assert not np.any(first[0] == other[0]), "another seed gave the same draws"

    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_draws_have_the_requested_shape_dtype_and_distribution(
        self, case: ConformanceCase, backend: Backend, dtype: str
    ) -> None:
        if dtype == "float64" and not case.float64:
            pytest.skip("the case declares no float64 (float64=False)")
        like = self.like(backend, dtype)
        shape = (40, 25, 4)
        for generator in (self._generator(backend, 0, like), None):
            sample, _ = backend.draw(shape, like, generator)
            assert backend.owns(sample)
            s = backend.to_numpy(sample)
            assert s.shape == shape and s.dtype == np.dtype(dtype)
            s = s.astype(np.float64)
            # 4000 N(0, 1) draws: standard errors 0.016 (mean), 0.011 (standard
            # deviation) and 0.0074 (share within one sigma, 0.683); the bounds are five
            # to six of them.  A uniform of unit variance has 0.577 within one sigma.
            assert abs(s.mean()) < 0.1
            assert abs(s.std() - 1.0) < 0.06
            assert abs(np.mean(np.abs(s) < 1.0) - 0.6827) < 0.04


class SequenceTests(_Base):
    """Rank-3 features in both layouts: layouts declared, reported or refused, attention
    masks, per-position maps (issue 13).  Needs the case's ``make_sequence_model``."""

    #: Settings that keep the sequence tests fast on every backend (a finite-difference
    #: one included) while the map still finds the one position that matters (no
    #: smoothing: it would spread that position's bits onto its neighbours).
    SETTINGS: ClassVar[dict[str, Any]] = {
        "beta": 0.1,
        "batch_size": 3,
        "optimization_steps": 10,
        "sigma": None,
    }

    @staticmethod
    def _require(case: ConformanceCase) -> tuple[Callable[[str], tuple[Any, Any]], Callable[[int, int], Any]]:
        if case.make_sequence_model is None or case.make_sequence_inputs is None:
            pytest.skip("the case has no sequence model (make_sequence_model)")
        return case.make_sequence_model, case.make_sequence_inputs

    def _engine(self, case: ConformanceCase, backend: Backend, layout: str) -> tuple[Any, Any]:
        from ..engines import PerSampleBottleneck

        make_model, make_inputs = self._require(case)
        model, layer = make_model(layout)
        engine = PerSampleBottleneck(backend, model, layer, layout=layout, **self.SETTINGS)
        engine.estimate([make_inputs(24, 100)], n_samples=24)
        return engine, make_inputs

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_sequence_layout_is_reported_right_or_not_at_all(
        self, case: ConformanceCase, backend: Backend, layout: str
    ) -> None:
        make_model, make_inputs = self._require(case)
        model, layer = make_model(layout)
        assert backend.layer_layout(model, layer) in (layout, None)
        seen = _record(backend, model, layer, make_inputs(2, 0))
        c, t = case.sequence_shape
        assert seen.shape == ((2, c, t) if layout == "channels_first" else (2, t, c))

    @pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_the_position_that_matters_gets_the_most_bits(
        self, case: ConformanceCase, backend: Backend, layout: str
    ) -> None:
        engine, make_inputs = self._engine(case, backend, layout)
        assert engine.estimator.mean().shape == tuple(case.sequence_shape)
        bits = backend.to_numpy(engine.analyze(make_inputs(2, 1), target=[0, 1], seed=0, mode="capacity"))
        assert bits.shape == (2, case.sequence_shape[1])
        assert np.all(bits >= 0)
        np.testing.assert_array_equal(bits.argmax(axis=1), case.sequence_key)

    @pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")
    def test_both_layouts_give_the_same_statistics_and_capacity(
        self, case: ConformanceCase, backend: Backend
    ) -> None:
        # The channels-first features the engine works on are the same in both layouts;
        # so is the capacity of the initial mask (an optimised mask is compared in float64
        # elsewhere: Adam amplifies float32 round-off of near-zero gradients).
        engines = [self._engine(case, backend, layout) for layout in LAYOUTS]
        means = [e.estimator.mean() for e, _ in engines]
        stds = [e.estimator.std() for e, _ in engines]
        np.testing.assert_allclose(means[0], means[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stds[0], stds[1], rtol=1e-5, atol=1e-6)
        maps = [
            backend.to_numpy(
                e.analyze(make(2, 1), target=[0, 1], mode="capacity", optimization_steps=0, sigma=1.0)
            )
            for e, make in engines
        ]
        assert maps[0].shape == (2, case.sequence_shape[1]) and np.all(maps[0] > 0)
        np.testing.assert_allclose(maps[0], maps[1], rtol=1e-4, atol=1e-6 * float(maps[0].max()))

    @pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_padding_gets_exactly_zero_bits(
        self, case: ConformanceCase, backend: Backend, layout: str
    ) -> None:
        engine, make_inputs = self._engine(case, backend, layout)
        t, key = case.sequence_shape[1], case.sequence_key
        mask = np.ones((2, t), dtype=bool)
        mask[1, key + 4 :] = False  # the second input is shorter (needs T >= key + 5)
        x = make_inputs(2, 1)
        # With smoothing, which works along each input's real positions only.
        opts: dict[str, Any] = {"mode": "capacity", "sigma": 1.0}
        bits = backend.to_numpy(engine.analyze(x, target=[0, 1], seed=[4, 5], attention_mask=mask, **opts))
        assert np.all(bits[~mask] == 0.0) and np.all(bits[mask] > 0)
        if not case.exact_gradients:
            return  # Adam amplifies finite-difference errors: alone and together differ slightly
        alone = backend.to_numpy(
            engine.analyze(x[1:2, ...], target=[1], seed=[5], attention_mask=mask[1:], **opts)
        )
        np.testing.assert_allclose(alone[0], bits[1], rtol=1e-4, atol=1e-6 * float(bits.max()))

    @pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_padding_stays_out_of_the_estimate(
        self, case: ConformanceCase, backend: Backend, layout: str
    ) -> None:
        from ..engines import MaskedBatch, PerSampleBottleneck

        make_model, make_inputs = self._require(case)
        model, layer = make_model(layout)
        t = case.sequence_shape[1]
        mask = np.ones((6, t))
        for i, length in enumerate((t, t - 1, 1, 2, t - 2, t // 2)):
            mask[i, length:] = 0
        x = make_inputs(6, 2)
        engine = PerSampleBottleneck(backend, model, layer, layout=layout)
        est = engine.estimate(
            [MaskedBatch(x[:4, ...], mask[:4]), MaskedBatch(x[4:, ...], mask[4:])], n_samples=6
        )
        f = _channels_first(_record(backend, model, layer, x), layout).astype(np.float64)  # (6, C, T)
        np.testing.assert_array_equal(est.counts(), np.broadcast_to(mask.sum(axis=0), f.shape[1:]))
        scale = float(np.abs(f).max())
        for p in range(t):
            real = f[mask[:, p] > 0, :, p]
            np.testing.assert_allclose(est.mean()[:, p], real.mean(axis=0), rtol=1e-5, atol=1e-6 * scale)
            spread = real.std(axis=0, ddof=1) if len(real) > 1 else np.zeros(f.shape[1])
            np.testing.assert_allclose(est.std()[:, p], spread, rtol=1e-4, atol=1e-6 * scale)

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_an_unknown_sequence_layout_is_refused_and_the_hook_removed(
        self, case: ConformanceCase, backend: Backend, layout: str
    ) -> None:
        make_model, make_inputs = self._require(case)
        model, layer = make_model(layout)
        x = make_inputs(2, 0)
        before = backend.to_numpy(backend.call(model, x))
        bn = Bottleneck()
        bn.backend = backend
        with pytest.raises(ValueError, match="layout='channels_last'"):
            with attached(backend, model, layer, in_layout(backend, bn, None)):
                bn.record(lambda: backend.call(model, x))
        np.testing.assert_array_equal(backend.to_numpy(backend.call(model, x)), before)


class BackendConformanceTests(
    NamespaceTests, GradientTests, EstimationTests, HookTests, PromiseTests, PerSampleTests, SequenceTests
):
    """Every conformance test; inherit it and provide the ``case`` fixture."""
