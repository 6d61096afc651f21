"""Abstract conformance tests; see the package docstring for how to use them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as np_xp
import numpy as np
import pytest

from .. import (
    REQUIRED_FUNCTIONS,
    Backend,
    Bottleneck,
    FewSamplesWarning,
    adam_init,
    adam_update,
    attached,
    capacity,
    cross_entropy,
    gaussian_smooth,
    get_backend,
    repeat_inputs,
    restrict,
    saliency_map,
)


@dataclasses.dataclass
class ConformanceCase:
    """What a backend supplies to the suite.

    Attributes:
        backend: the registered backend name.
        make_model: ``dtype -> (model, layer)`` with ``dtype`` ``"float32"`` or
            ``"float64"``; a small classifier returning logits ``(B, n_classes)`` and the
            layer (object or name) to put the bottleneck on.  Same weights every call.
        make_inputs: ``(n, dtype, seed) -> inputs``: ``n`` inputs in the backend's type
            and the model's input layout.
        input_size: spatial size of one input, e.g. ``(H, W)``.
        feature_shape: channels-first per-sample shape of the layer's output.
        n_classes: number of logits.
        float64: whether the backend computes in float64 (tests that need exact
            arithmetic are skipped otherwise).
        exact_gradients: whether gradients are exact up to round-off (autograd).  A
            finite-difference backend sets ``False``: its gradient errors, though tiny,
            are amplified by Adam's normalisation, so bit-level comparisons are skipped.
        fast_compile: whether ``Backend.compile`` is quick enough (seconds) to test the
            compiled optimisation step; slow compilers are skipped.
    """

    backend: str
    make_model: Callable[[str], tuple[Any, Any]]
    make_inputs: Callable[[int, str, int], Any]
    input_size: tuple[int, ...]
    feature_shape: tuple[int, ...]
    n_classes: int
    float64: bool = True
    exact_gradients: bool = True
    fast_compile: bool = False


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
F32 = {"rtol": 2e-6, "atol": 1e-6}
F64 = {"rtol": 1e-12, "atol": 1e-12}


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
        arrs = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2)]
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

    @pytest.mark.parametrize("what", ["capacity", "restrict", "smooth_1d", "smooth_2d",
                                      "saliency", "cross_entropy", "adam", "repeat"])
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
                "capacity": lambda: capacity(t(feats), t(alpha), t(mean), t(std),
                                             active=t(active), sigma=1.0),
                "restrict": lambda: restrict(t(feats), t(alpha), t(noise), t(mean), t(std),
                                             active=t(active), sigma=1.0, relu=True)[0],
                "smooth_1d": lambda: gaussian_smooth(t(feats[:, :, 0, :]), 1.5, 1),
                "smooth_2d": lambda: gaussian_smooth(t(feats), 1.0, 2),
                "saliency": lambda: saliency_map(t(np.abs(feats)), (13, 9)),
                "cross_entropy": lambda: cross_entropy(t(logits), t(onehot)),
                "adam": lambda: adam_update(t(alpha), t(feats),
                                            adam_update(t(alpha), t(noise),
                                                        adam_init(t(alpha)))[1])[0],
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
    from .._xp import namespace

    return namespace(x)


class GradientTests(_Base):
    """``value_and_grad`` of the capacity term matches finite differences."""

    def test_capacity_gradient_matches_finite_differences(self, case: ConformanceCase,
                                                           backend: Backend) -> None:
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
        tol = {"rtol": 1e-6, "atol": 1e-7} if case.float64 else {"rtol": 1e-3, "atol": 1e-4}
        np.testing.assert_allclose(value, total_np(alpha), **tol)
        np.testing.assert_allclose(grad, fd, **tol)


def _record(backend: Backend, model: Any, layer: Any, x: Any) -> np.ndarray:
    seen: list[np.ndarray] = []

    def hook(f: Any) -> None:
        seen.append(backend.to_numpy(f))

    with attached(backend, model, layer, hook):
        backend.call(model, x)
    assert len(seen) == 1, f"the layer ran {len(seen)} times in one pass"
    return seen[0]


def _estimated(case: ConformanceCase, backend: Backend, model: Any, layer: Any,
               dtype: str = "float32", **kwargs: Any) -> Bottleneck:
    bn = Bottleneck(**kwargs)
    bn.backend = backend
    batches = [case.make_inputs(16, dtype, 100 + i) for i in range(4)]
    with attached(backend, model, layer, bn), backend.frozen(model):
        with pytest.warns(FewSamplesWarning):
            bn.estimate(lambda b: backend.call(model, b), batches)
    return bn


class EstimationTests(_Base):
    """Estimation records the layer's channels-first features and matches NumPy."""

    def test_estimate_matches_numpy(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        batches = [case.make_inputs(16, "float32", 100 + i) for i in range(4)]
        feats = np.concatenate([_record(backend, model, layer, b) for b in batches])
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
        with attached(backend, model, layer, bn), pytest.warns(FewSamplesWarning):
            bn.estimate(lambda b: backend.call(model, b), batches, n_samples=10)
        assert bn.estimator.n == 10


class HookTests(_Base):
    """Putting a hook on a layer and taking it out leaves the model's outputs unchanged."""

    def test_attach_and_remove_are_bit_identical(self, case: ConformanceCase,
                                                 backend: Backend) -> None:
        model, layer = case.make_model("float32")
        x = case.make_inputs(3, "float32", 0)
        before = backend.to_numpy(backend.call(model, x))
        for hook in (lambda f: None, lambda f: f):  # pass-through, and a layout round trip
            with attached(backend, model, layer, hook):
                during = backend.to_numpy(backend.call(model, x))
            np.testing.assert_array_equal(during, before)
        after = backend.to_numpy(backend.call(model, x))
        np.testing.assert_array_equal(after, before)

    def test_hook_sees_channels_first_and_its_output_is_used(self, case: ConformanceCase,
                                                            backend: Backend) -> None:
        model, layer = case.make_model("float32")
        x = case.make_inputs(2, "float32", 0)
        before = backend.to_numpy(backend.call(model, x))
        shapes: list[tuple[int, ...]] = []

        def zero(f: Any) -> Any:
            shapes.append(tuple(int(s) for s in f.shape))
            return f * 0.0

        with attached(backend, model, layer, zero):
            zeroed = backend.to_numpy(backend.call(model, x))
        assert shapes == [(2, *case.feature_shape)]
        assert not np.allclose(zeroed, before)
        assert np.allclose(zeroed[0], zeroed[1]), "zero features must give input-independent outputs"

    def test_unknown_layer_name_lists_layers(self, case: ConformanceCase,
                                            backend: Backend) -> None:
        model, _ = case.make_model("float32")
        with pytest.raises(LookupError, match="no_such_layer") as info:
            backend.attach(model, "no_such_layer", lambda f: None)
        names = backend.layer_names(model)
        assert names and any(n in str(info.value) for n in names)

    def test_restricted_flow_changes_outputs(self, case: ConformanceCase,
                                             backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 0)
        clean = backend.to_numpy(backend.call(model, x))
        feats = _record(backend, model, layer, x)
        xp = backend.namespace()
        like = backend.from_numpy(feats)
        closed = xp.full(tuple(feats.shape), -10.0, dtype=like.dtype)
        opened = xp.full(tuple(feats.shape), 30.0, dtype=like.dtype)
        with attached(backend, model, layer, bn):
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
    def explain(case: ConformanceCase, backend: Backend, model: Any, layer: Any,
                bn: Bottleneck, x: Any, targets: list[int], **kwargs: Any) -> tuple[Any, Any]:
        n = len(targets)

        def loss(batch: Any) -> Any:
            logits = backend.call(model, batch)
            reps = int(logits.shape[0]) // n
            onehot = np.eye(case.n_classes)[np.repeat(targets, reps)]
            return cross_entropy(logits, backend.from_numpy(onehot, like=logits))

        with attached(backend, model, layer, bn), backend.frozen(model):
            cap = bn.optimize(loss, x, **kwargs)
        return cap, saliency_map(cap, case.input_size)

    def test_saliency_map_properties(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 7)
        cap, smap = self.explain(case, backend, model, layer, bn, x, [0, 1], seed=0,
                                 optimization_steps=3)
        assert backend.owns(smap)
        cap, smap = backend.to_numpy(cap), backend.to_numpy(smap)
        assert cap.shape == (2, *case.feature_shape)
        assert smap.shape == (2, *case.input_size)
        assert np.all(np.isfinite(smap)) and np.all(smap >= 0)
        total_bits = cap.reshape(2, -1).sum(axis=1, dtype=np.float64) / math.log(2)
        assert np.all(total_bits > 0)
        # Two float32 sums of a few hundred positive terms: relative error well below 1e-5.
        np.testing.assert_allclose(smap.reshape(2, -1).sum(axis=1, dtype=np.float64),
                                   total_bits, rtol=1e-5)

    def test_same_seed_same_map(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(1, "float32", 3)
        maps = [backend.to_numpy(self.explain(case, backend, model, layer, bn, x, [2],
                                              seed=s, optimization_steps=3)[1])
                for s in (5, 5, 6)]
        np.testing.assert_array_equal(maps[0], maps[1])
        assert not np.array_equal(maps[0], maps[2])

    def test_many_inputs_match_single_calls(self, case: ConformanceCase,
                                            backend: Backend) -> None:
        if not case.float64:
            pytest.skip("needs float64: Adam amplifies float32 round-off of near-zero gradients")
        if not case.exact_gradients:
            pytest.skip("needs exact gradients: Adam amplifies finite-difference errors")
        model, layer = case.make_model("float64")
        bn = _estimated(case, backend, model, layer, dtype="float64")
        x = case.make_inputs(3, "float64", 11)
        targets = [0, 1, 2]
        xp = backend.namespace()
        together = backend.to_numpy(self.explain(case, backend, model, layer, bn, x, targets,
                                                 seed=4)[0])
        for i in range(3):
            xi = xp.reshape(x[i:i + 1, ...], (1, *tuple(x.shape[1:])))
            single = backend.to_numpy(self.explain(case, backend, model, layer, bn, xi,
                                                   [targets[i]], seed=4 + i)[0])
            # float64 with lr=1 Adam steps: round-off of ~1e-15 grows to ~1e-9 at most.
            np.testing.assert_allclose(together[i], single[0], rtol=1e-7, atol=1e-9)

    def test_passes_of_fewer_inputs_change_nothing(self, case: ConformanceCase,
                                                   backend: Backend) -> None:
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
            with attached(backend, model, layer, bn), backend.frozen(model):
                caps.append(backend.to_numpy(bn.explain(loss_for, x, inputs_per_pass=per_pass,
                                                        seed=7, optimization_steps=4)))
            alphas.append(backend.to_numpy(bn.alpha))
        assert caps[0].shape == (3, *case.feature_shape) and alphas[2].shape == caps[0].shape
        for cap, alpha in zip(caps[1:], alphas[1:]):
            # float64: differences are round-off, amplified a little by Adam (see above).
            np.testing.assert_allclose(cap, caps[0], rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(alpha, alphas[0], rtol=1e-7, atol=1e-9)

    def test_higher_beta_lets_less_information_through(self, case: ConformanceCase,
                                                       backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 9)
        totals = []
        for beta in (0.1, 100.0):
            cap, _ = self.explain(case, backend, model, layer, bn, x, [0, 1], seed=1,
                                  beta=beta)
            totals.append(backend.to_numpy(cap).reshape(2, -1).sum(axis=1))
        assert np.all(totals[1] < totals[0])

    def test_compiled_step_gives_the_same_map(self, case: ConformanceCase,
                                              backend: Backend) -> None:
        if not case.fast_compile:
            pytest.skip("the backend's compiler is too slow for a unit test")
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(2, "float32", 4)
        caps = []
        for compiled in (False, True):
            bn.compile = compiled
            cap, _ = self.explain(case, backend, model, layer, bn, x, [0, 1], seed=2,
                                  optimization_steps=4)
            caps.append(backend.to_numpy(cap))
        # Same float32 arithmetic, fused or reordered by the compiler: round-off level
        # differences, amplified a little by four Adam steps.
        np.testing.assert_allclose(caps[1], caps[0], rtol=1e-3, atol=1e-5)

    def test_copies_at_the_layer_match_copies_of_the_input(self, case: ConformanceCase,
                                                           backend: Backend) -> None:
        exact = case.float64 and case.exact_gradients
        dtype = "float64" if exact else "float32"
        model, layer = case.make_model(dtype)
        bn = _estimated(case, backend, model, layer, dtype=dtype)
        x = case.make_inputs(2, dtype, 13)
        caps = {}
        for copies in ("input", "layer"):
            cap, _ = self.explain(case, backend, model, layer, bn, x, [1, 2], seed=3,
                                  optimization_steps=4, copies=copies)
            assert bn.copies_made_at == copies
            caps[copies] = backend.to_numpy(cap)
        # The same arithmetic except the layers before the bottleneck, which run on one
        # copy instead of ten: float64 round-off (see test_many_inputs_match_single_calls),
        # or float32 round-off amplified by four Adam steps (see the compiled-step test).
        rtol, atol = (1e-7, 1e-9) if exact else (1e-3, 1e-5)
        np.testing.assert_allclose(caps["layer"], caps["input"], rtol=rtol, atol=atol)

    def test_copies_fall_back_to_the_input_when_the_model_refuses(
            self, case: ConformanceCase, backend: Backend) -> None:
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
        with attached(backend, model, layer, bn), backend.frozen(model):
            for where in ("layer", "input"):
                caps[where] = backend.to_numpy(bn.optimize(
                    loss, x, copies=where, batch_size=copies, seed=6, optimization_steps=3))
                assert bn.copies_made_at == "input"
            # A loss that fails either way reports its own error.
            with pytest.raises(ValueError, match="scalar"):
                bn.optimize(lambda b: backend.call(model, b), x, copies="layer")
            with pytest.raises(ValueError, match="copies must be"):
                bn.optimize(loss, x, copies="output")
        # The fallback reuses the first step's noise: the same numbers exactly.
        np.testing.assert_array_equal(caps["layer"], caps["input"])

    def test_closure_that_skips_the_layer_is_refused(self, case: ConformanceCase,
                                                     backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(1, "float32", 0)
        xp = backend.namespace()
        with attached(backend, model, layer, bn), pytest.raises(RuntimeError, match="never ran"):
            bn.optimize(lambda b: xp.sum(b), x)

    def test_non_scalar_loss_is_refused(self, case: ConformanceCase, backend: Backend) -> None:
        model, layer = case.make_model("float32")
        bn = _estimated(case, backend, model, layer)
        x = case.make_inputs(1, "float32", 0)
        with attached(backend, model, layer, bn), pytest.raises(ValueError, match="scalar"):
            bn.optimize(lambda b: backend.call(model, b), x)


class BackendConformanceTests(NamespaceTests, GradientTests, EstimationTests, HookTests,
                              PerSampleTests):
    """Every conformance test; inherit it and provide the ``case`` fixture."""
