"""The TensorFlow Array API namespace: what the core calls, beyond the conformance suite."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tf

import iba_core  # noqa: E402
from iba_tf import _namespace as xp  # noqa: E402


def t(a, dtype="float32"):
    return tf.constant(np.asarray(a, dtype=dtype))


def test_covers_every_function_the_core_calls():
    missing = [name for name in iba_core.math.REQUIRED_FUNCTIONS if not callable(getattr(xp, name, None))]
    assert missing == []
    assert callable(xp.finfo)


def test_is_the_backend_namespace_and_core_dispatch_finds_it():
    assert iba_core.get_backend("tf").namespace() is xp
    assert iba_core.math.namespace(tf.zeros(2)) is xp


def test_no_numpy_behaviour_switch():
    """tf.experimental.numpy's behaviour mode would give every tensor NumPy methods."""
    x = xp.reshape(xp.asarray(np.arange(6.0)), (2, 3))
    assert not hasattr(x, "reshape") and not hasattr(x, "T")


class TestCreation:
    def test_asarray_dtypes(self):
        assert xp.asarray(1.5).dtype == tf.float32  # Python float: default float dtype
        assert xp.asarray([1, 2]).dtype == tf.int64
        assert xp.asarray(np.float64(1.5)).dtype == tf.float64  # NumPy keeps its dtype
        assert xp.asarray(np.zeros(3, np.float64)).dtype == tf.float64
        assert xp.asarray(np.zeros(3), dtype=xp.float32).dtype == tf.float32
        x = t([1.0, 2.0])
        assert xp.asarray(x) is x
        np.testing.assert_array_equal(xp.asarray(x, dtype="float64").numpy(), [1.0, 2.0])
        assert xp.asarray(x, dtype=np.float64).dtype == tf.float64

    def test_asarray_device(self):
        x = xp.asarray(np.ones(2), device="/CPU:0")
        assert "CPU:0" in x.device
        y = xp.asarray(x, device=x.device)
        assert y is x

    def test_asarray_inside_tf_function_makes_an_eager_constant(self):
        """Host data becomes an eager tensor even while tracing, so the core may cache it
        and use it in other graphs and eagerly."""
        made = []

        @tf.function(autograph=False)
        def f(v):
            c = xp.asarray(np.full(3, 2.0), dtype=v.dtype)
            made.append(c)
            return v * c

        np.testing.assert_array_equal(f(t([1.0, 2.0, 3.0])).numpy(), [2.0, 4.0, 6.0])
        assert made[0].numpy().tolist() == [2.0, 2.0, 2.0]  # an EagerTensor has .numpy()
        np.testing.assert_array_equal((made[0] + 1).numpy(), [3.0, 3.0, 3.0])

    def test_full_zeros(self):
        assert xp.full((2, 3), 1.5).dtype == tf.float32
        assert xp.full((2,), 3).dtype == tf.int64
        assert xp.full((2,), True).dtype == tf.bool
        assert xp.full(4, 0.5, dtype=xp.float64).shape == (4,)
        np.testing.assert_array_equal(xp.full((), 2.0, dtype="float64").numpy(), 2.0)
        assert xp.zeros((2, 2)).dtype == tf.float32
        assert xp.zeros(3, dtype=xp.float64).dtype == tf.float64
        z = xp.zeros_like(t([[1.0]], "float64"))
        assert z.dtype == tf.float64 and z.shape == (1, 1)
        assert xp.zeros_like(t([1.0]), dtype=xp.int32).dtype == tf.int32

    def test_astype_and_finfo(self):
        assert xp.astype(t([0.5, -1.0]) > 0, xp.float32).numpy().tolist() == [1.0, 0.0]
        x = t([1.0])
        assert xp.astype(x, xp.float32, copy=False) is x
        fi = xp.finfo(xp.float64)
        assert fi.smallest_normal == np.finfo(np.float64).tiny and fi.bits == 64
        assert xp.finfo(t([1.0])).eps == np.finfo(np.float32).eps


class TestMath:
    @pytest.mark.parametrize(
        "shapes",
        [
            ((3, 4), (4, 5)),
            ((5, 5), (2, 3, 5, 4)),
            ((2, 3, 4, 5), (5, 2)),
            ((4,), (4, 3)),
            ((3, 4), (4,)),
            ((4,), (4,)),
            ((1, 3, 4), (2, 4, 2)),
        ],
    )
    def test_matmul_broadcasts_like_numpy(self, shapes):
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal(s) for s in shapes)
        got = xp.matmul(t(a, "float64"), t(b, "float64")).numpy()
        np.testing.assert_allclose(got, np.matmul(a, b), rtol=1e-12, atol=1e-12)

    def test_logaddexp_special_values(self):
        inf = np.inf
        a = np.array([0.0, 1.0, -1.0, 50.0, -50.0, inf, -inf, inf, -inf, 3.0, -1e30, 88.0, -100.0])
        b = np.array([0.0, 1.0, 2.0, -50.0, 50.0, inf, -inf, 3.0, 3.0, -inf, 1.0, 88.0, -100.0])
        for dtype in ("float32", "float64"):
            got = xp.logaddexp(t(a, dtype), t(b, dtype)).numpy()
            np.testing.assert_allclose(got, np.logaddexp(a, b).astype(dtype), rtol=2e-7)
        got = xp.logaddexp(t([np.nan, 1.0]), t([1.0, np.nan])).numpy()
        assert np.all(np.isnan(got))

    def test_logaddexp_gradient_is_the_softmax_weight_also_at_ties(self):
        x1, x2 = t([0.0, 2.0, -3.0, 1.0, 30.0], "float64"), t([0.0, 1.0, 4.0, 1.0, -30.0], "float64")
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x1, x2])
            y = xp.logaddexp(x1, x2)
        w1 = 1 / (1 + np.exp(x2.numpy() - x1.numpy()))
        np.testing.assert_allclose(tape.gradient(y, x1).numpy(), w1, rtol=1e-14)
        np.testing.assert_allclose(tape.gradient(y, x2).numpy(), 1 - w1, rtol=1e-14, atol=1e-25)

    def test_logaddexp_is_precise_where_the_result_is_small(self):
        """softplus(-a) = logaddexp(0, -a) is ~exp(-a) for large a: no cancellation."""
        a = np.array([5.0, 20.0, 80.0], np.float32)
        got = xp.logaddexp(xp.zeros_like(t(a)), -t(a)).numpy()
        np.testing.assert_allclose(got, np.log1p(np.exp(-a.astype(np.float64))), rtol=1e-6)

    def test_scalars_take_the_tensor_dtype(self):
        x = t([1.0, -2.0], "float64")
        assert xp.maximum(x, 0.0).dtype == tf.float64
        np.testing.assert_array_equal(xp.where(x > 0, x, 0.0).numpy(), [1.0, 0.0])
        np.testing.assert_allclose(xp.logaddexp(0.0, x).numpy(), np.logaddexp(0.0, [1.0, -2.0]))

    def test_reductions(self):
        a = np.arange(24.0).reshape(2, 3, 4)
        x = t(a, "float64")
        np.testing.assert_array_equal(xp.sum(x, axis=(0, 2)).numpy(), a.sum(axis=(0, 2)))
        np.testing.assert_array_equal(
            xp.mean(x, axis=-1, keepdims=True).numpy(), a.mean(axis=-1, keepdims=True)
        )
        np.testing.assert_array_equal(xp.max(x).numpy(), 23.0)
        assert xp.sum(t([True, True, False], "bool")).dtype == tf.int64
        assert xp.sum(x, dtype=xp.float32).dtype == tf.float32

    def test_manipulation(self):
        a = np.arange(6.0).reshape(2, 3)
        x = t(a)
        np.testing.assert_array_equal(xp.concat([x, x], axis=1).numpy(), np.concatenate([a, a], 1))
        np.testing.assert_array_equal(
            xp.concat([x, x], axis=None).numpy(), np.concatenate([a.ravel(), a.ravel()])
        )
        assert xp.expand_dims(x, axis=-1).shape == (2, 3, 1)
        assert xp.permute_dims(x, (1, 0)).shape == (3, 2)
        assert xp.reshape(x, (-1,)).shape == (6,)
        assert xp.broadcast_to(x[:1], (4, 3)).shape == (4, 3)
        np.testing.assert_allclose(xp.sqrt(xp.exp(xp.log(t([4.0])))).numpy(), [2.0])
