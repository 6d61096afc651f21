"""The TensorFlow backend's fast paths (issue 12): the unseeded noise sampler
(``box_muller``), the direct calls of compiled functions (``Compiled``) and the compiled
cut of a Keras model; each must give what the plain path gives."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = [pytest.mark.tf, pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")]

from iba_tf import IBACopy  # noqa: E402
from iba_tf._backend import Compiled, TFBackend, box_muller  # noqa: E402

L = keras.layers
BE = TFBackend()


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inputs, L.Dense(4, name="fc")(h))


def images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype("float32")


@pytest.fixture(scope="module")
def iba() -> IBACopy:
    copy = IBACopy(model(), "conv1")
    copy.estimate(images(64, seed=9), n_samples=64, progbar=False)
    return copy


def close(a: np.ndarray, b: np.ndarray) -> None:
    """Maps in bits, float32: equal but for the round-off of another order of operations."""
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


# -- the optimisation: compiled step against the eager one --------------------------------
@pytest.mark.parametrize("noise", ["backend", "numpy"])
def test_the_compiled_step_gives_the_maps_of_the_eager_step(iba, noise):
    x = images(3)
    settings = {"target": [0, 1, 2], "seed": 4, "noise": noise, "optimization_steps": 4, "batch_size": 5}
    compiled = iba.analyze(x, compile=True, **settings)
    eager = iba.analyze(x, compile=False, **settings)
    assert compiled.shape == (3, 8, 8) and np.ptp(compiled) > 0
    close(compiled, eager)
    # Another number of inputs selects another graph of the compiled step: input 0 keeps
    # its noise stream (seed + 0) and so its map.
    alone = iba.analyze(x[:1], compile=True, **{**settings, "target": 0})
    close(alone, compiled[0])


def test_unseeded_noise_follows_tf_random_set_seed(iba):
    x = images(2)
    tf.random.set_seed(11)
    first = iba.analyze(x, target=[1, 2], optimization_steps=3)
    again = iba.analyze(x, target=[1, 2], optimization_steps=3)
    tf.random.set_seed(11)
    repeated = iba.analyze(x, target=[1, 2], optimization_steps=3)
    np.testing.assert_array_equal(first, repeated)
    assert not np.array_equal(first, again)  # fresh noise on every call


# -- the noise ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_box_muller_draws_standard_normals(dtype):
    z = box_muller((101, 99), dtype)  # an odd number of draws: one pair is cut in half
    assert z.shape == (101, 99) and z.dtype == tf.as_dtype(dtype)
    s = z.numpy().astype(np.float64).ravel()
    n = s.size  # 9999 draws: standard errors 0.010 (mean), 0.0071 (std), 0.0047 (share
    # within one sigma), 0.024 (fourth moment, 3 for a normal, 1.8 for a uniform), 0.010
    # (correlation of the two halves: the cosine and sine of the same pairs)
    assert abs(s.mean()) < 0.05
    assert abs(s.std() - 1.0) < 0.035
    assert abs(np.mean(np.abs(s) < 1.0) - 0.6827) < 0.025
    assert abs(np.mean(s**4) - 3.0) < 0.25
    half = n // 2
    assert abs(np.corrcoef(s[:half], s[half : 2 * half])[0, 1]) < 0.05
    assert np.isfinite(s).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_box_muller_draws_16_bit_floats_in_float32(dtype):
    tf.random.set_seed(5)
    half = box_muller((4000,), dtype)
    tf.random.set_seed(5)
    full = box_muller((4000,), "float32")
    assert half.dtype == tf.as_dtype(dtype)
    np.testing.assert_array_equal(half.numpy(), tf.cast(full, dtype).numpy())


def test_box_muller_repeats_under_set_seed_and_each_draw_is_fresh():
    tf.random.set_seed(7)
    a, b = box_muller((50,)).numpy(), box_muller((50,)).numpy()
    tf.random.set_seed(7)
    np.testing.assert_array_equal(box_muller((50,)).numpy(), a)
    assert not np.any(a == b)
    assert box_muller((0, 3)).shape == (0, 3) and box_muller(()).shape == ()


def test_standard_normal_keeps_the_seeded_generators_numbers():
    like = tf.zeros((1,), tf.float32)
    drawn = BE.standard_normal((4, 5), like=like, generator=BE.make_generator(12, like))
    expected = tf.random.Generator.from_seed(12).normal((4, 5))
    np.testing.assert_array_equal(drawn.numpy(), expected.numpy())
    tf.random.set_seed(2)
    unseeded = BE.standard_normal((4, 5), like=like)
    tf.random.set_seed(2)
    np.testing.assert_array_equal(unseeded.numpy(), box_muller((4, 5)).numpy())


# -- direct calls of compiled functions -----------------------------------------------------
def test_compiled_calls_match_the_tf_function_and_trace_once_per_signature():
    traces = []

    def fn(x, pair, scale):
        traces.append(1)
        y, nothing = pair
        assert nothing is None
        return {"sum": tf.reduce_sum(x * y) * scale, "x": x + 1.0}

    f = Compiled(fn)
    x, y = tf.constant([[1.0, 2.0]]), tf.constant([[3.0, 4.0]])
    out = f(x, (y, None), 2.0)
    assert float(out["sum"]) == 22.0 and out["x"].numpy().tolist() == [[2.0, 3.0]]
    f(x * 2, (y, None), 2.0)
    assert len(traces) == 1  # the same signature: the same graph
    assert float(f(x, (y, None), 3.0)["sum"]) == 33.0  # a Python scalar is part of the key
    assert float(f(tf.ones((3, 2)), (tf.ones((3, 2)), None), 1.0)["sum"]) == 6.0
    assert len(traces) == 3
    assert isinstance(f, tf.types.experimental.PolymorphicFunction)


def test_compiled_calls_are_differentiable_and_nest_in_traced_code():
    f = Compiled(lambda x, w: tf.reduce_sum(tf.sin(x) * w))
    x, w = tf.constant([0.5, 1.5]), tf.constant([2.0, 3.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = f(x, w)
    np.testing.assert_allclose(tape.gradient(value, x).numpy(), (w * tf.cos(x)).numpy(), rtol=1e-6)
    traced = tf.function(lambda x: f(x, w) * 2.0, autograph=False)
    np.testing.assert_allclose(float(traced(x)), 2.0 * float(value), rtol=1e-6)
    np.testing.assert_allclose(float(f(x, w=w)), float(value), rtol=1e-6)  # keywords: dispatched
    v = tf.Variable([1.0, 1.0])  # a variable operand: the tf.function's own dispatch
    np.testing.assert_allclose(float(f(v, w)), float(tf.reduce_sum(tf.sin(v) * w)), rtol=1e-6)


def test_the_compiled_cut_of_a_model_runs_the_layers_after_it():
    net = model()
    after = BE.split_after(net, "conv1")
    head = keras.Model(net.inputs[0], net.get_layer("conv1").output)
    for n in (1, 3):  # two batch sizes
        x = images(n)
        features = head(x)
        np.testing.assert_allclose(after(features), net(x), rtol=1e-5, atol=1e-6)
        traced = tf.function(after, autograph=False)  # in line inside traced code
        np.testing.assert_allclose(traced(features), net(x), rtol=1e-5, atol=1e-6)
