"""TFBackend: conversions, random draws, gradients, layer hooks, freezing, plugin loading."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = pytest.mark.tf

import iba_core  # noqa: E402
from iba_tf import TFBackend  # noqa: E402

BE = TFBackend()


def functional(data_format: str = "channels_last") -> keras.Model:
    shape = (8, 8, 3) if data_format == "channels_last" else (3, 8, 8)
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, padding="same", data_format=data_format, name="conv")(inputs)
    x = keras.layers.BatchNormalization(axis=-1 if data_format == "channels_last" else 1, name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    outputs = keras.layers.Dense(3, name="fc")(x)
    return keras.Model(inputs, outputs, name="net")


def sequence_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((5, 2)),
            keras.layers.Dense(3, name="proj"),
            keras.layers.GlobalAveragePooling1D(name="gap"),
        ],
        name="seq",
    )


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(2, 3, name="conv")
        self.flat = keras.layers.Flatten()
        self.fc = keras.layers.Dense(2, name="fc")

    def call(self, x):
        return self.fc(self.flat(self.conv(x)))


def x_img(n: int = 2, shape=(8, 8, 3)) -> tf.Tensor:
    return tf.constant(np.random.default_rng(0).standard_normal((n, *shape)).astype("float32"))


# -- registry ----------------------------------------------------------------------------
def test_selected_by_name_and_by_object():
    assert isinstance(iba_core.get_backend("tf"), TFBackend)
    assert iba_core.get_backend(tf.zeros(1)).name == "tf"
    assert iba_core.get_backend(functional()).name == "tf"
    assert BE.owns(tf.Variable(1.0)) and BE.owns(keras.Variable(1.0))
    assert not BE.owns(np.zeros(1))


def test_plugin_does_not_import_tensorflow():
    code = (
        "import sys, iba_core, iba_tf, iba_tf._plugin; "
        "assert 'tf' in iba_core.available_backends(); "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False False"


# -- arrays --------------------------------------------------------------------------------
def test_numpy_round_trip_and_dtype_rules():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert BE.from_numpy(a).dtype == tf.float64
    like32 = tf.zeros(1)
    assert BE.from_numpy(a, like=like32).dtype == tf.float32  # floats take like's dtype
    assert BE.from_numpy(np.arange(3), like=like32).dtype == tf.int64  # integers keep theirs
    np.testing.assert_array_equal(BE.to_numpy(BE.from_numpy(a)), a)
    np.testing.assert_array_equal(BE.to_numpy(tf.Variable([1.0, 2.0])), [1.0, 2.0])
    np.testing.assert_array_equal(BE.to_numpy(keras.Variable([3.0])), [3.0])


def test_standard_normal_and_generators():
    like = tf.zeros(1, dtype=tf.float64)
    draw = BE.standard_normal((4000,), like=like)
    assert draw.dtype == tf.float64 and draw.shape == (4000,)
    assert abs(float(tf.reduce_mean(draw))) < 0.1 and abs(float(tf.math.reduce_std(draw)) - 1) < 0.1
    a = BE.standard_normal((5,), like=like, generator=BE.make_generator(7, like))
    b = BE.standard_normal((5,), like=like, generator=BE.make_generator(7, like))
    c = BE.standard_normal((5,), like=like, generator=BE.make_generator(8, like))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_value_and_grad_watches_the_parameter_only():
    w = tf.Variable([2.0, 3.0])
    layer = keras.layers.Dense(1)
    layer.build((None, 2))
    p = tf.constant([1.0, -1.0])

    def fn(q):
        return tf.reduce_sum(w * q * q) + tf.reduce_sum(layer(q[None, :]))

    value, grad = BE.value_and_grad(fn, p)
    expected = float(tf.reduce_sum(w * p * p) + tf.reduce_sum(layer(p[None, :])))
    assert isinstance(value, float) and value == pytest.approx(expected, rel=1e-6)
    kernel = layer.kernel.numpy()[:, 0]
    np.testing.assert_allclose(grad.numpy(), 2 * w.numpy() * p.numpy() + kernel, rtol=1e-6)
    # A function with no gradient path to the parameter is refused: its map would ignore
    # the model.
    with pytest.raises(ValueError, match="no gradient path"):
        BE.value_and_grad(lambda q: tf.reduce_sum(w), p)
    with pytest.raises(ValueError, match="not a tensor"):
        BE.value_and_grad(lambda q: 1.0, p)


def test_value_and_grad_records_no_model_weights(monkeypatch):
    """The tape must not watch the model's variables (no weight gradients are formed)."""
    watched = []
    real = tf.GradientTape

    class Spy(real):
        def __exit__(self, *exc):
            watched.extend(self.watched_variables())
            return super().__exit__(*exc)

    monkeypatch.setattr(tf, "GradientTape", Spy)
    model = functional()
    x = x_img()
    BE.value_and_grad(lambda q: tf.reduce_sum(model(x * q, training=False)), tf.constant(1.0))
    assert watched == []


# -- hooks ---------------------------------------------------------------------------------
def test_hook_sees_channels_first_and_removal_restores_the_layer():
    model = functional()
    x = x_img()
    before = model(x, training=False).numpy()
    layer = model.get_layer("relu")
    seen = []

    def hook(f):
        seen.append(tuple(f.shape))
        return f * 0.0

    handle = BE.attach(model, "relu", hook)
    assert "call" in layer.__dict__
    zeroed = model(x, training=False).numpy()
    handle.remove()
    assert "call" not in layer.__dict__
    assert seen == [(2, 8, 8, 4)]  # as the layer produces them (the engine handles layout)
    assert not np.allclose(zeroed, before)
    np.testing.assert_allclose(zeroed[0], zeroed[1])
    np.testing.assert_array_equal(model(x, training=False).numpy(), before)
    handle.remove()  # idempotent


def test_channels_first_layer_is_not_transposed():
    model = functional("channels_first")
    seen = []
    with iba_core.contract.attached(BE, model, "conv", lambda f: seen.append(tuple(f.shape))):
        model(x_img(1, (3, 8, 8)), training=False)
    assert seen == [(1, 4, 8, 8)]


def test_hooks_see_sequence_features_as_produced_and_the_layout_is_declared():
    model = sequence_model()
    x = tf.constant(np.ones((2, 5, 2), np.float32))
    seen = []
    with iba_core.contract.attached(BE, model, "proj", lambda f: seen.append(tuple(f.shape))):
        model(x)
    assert seen == [(2, 5, 3)]
    assert BE.layer_layout(model, "proj") == "channels_last"
    assert BE.layer_layout(functional("channels_first"), "conv") == "channels_first"


def test_hooks_stack_and_can_be_removed_in_any_order():
    model = functional()
    x = x_img()
    clean = model(x, training=False).numpy()
    layer = model.get_layer("relu")
    h1 = BE.attach(model, "relu", lambda f: f * 2.0)
    h2 = BE.attach(model, layer, lambda f: f * 3.0)
    six = model(x, training=False).numpy()
    h1.remove()
    three = model(x, training=False).numpy()
    h2.remove()
    assert "call" not in layer.__dict__
    only3 = BE.attach(model, layer, lambda f: f * 3.0)
    np.testing.assert_allclose(three, model(x, training=False).numpy(), rtol=1e-6)
    only3.remove()
    with BE.frozen(model):
        pass
    six_ref = BE.attach(model, layer, lambda f: f * 6.0)
    np.testing.assert_allclose(six, model(x, training=False).numpy(), rtol=1e-5)
    six_ref.remove()
    np.testing.assert_array_equal(model(x, training=False).numpy(), clean)


def test_an_existing_instance_call_is_put_back():
    model = functional()
    layer = model.get_layer("relu")
    own = layer.call
    layer.call = own  # e.g. a user's own patch
    BE.attach(model, "relu", lambda f: None).remove()
    assert layer.__dict__["call"] is own


def test_input_hook():
    model = functional()
    x = x_img()
    seen = []
    with iba_core.contract.attached(
        BE, model, "conv", lambda f: seen.append(tuple(f.shape)) or f * 0.0, on_input=True
    ):
        out = model(x, training=False).numpy()
    assert seen == [(2, 8, 8, 3)]
    np.testing.assert_allclose(out[0], out[1])


def test_hook_runs_inside_tf_function_and_subclassed_models():
    model = Subclassed()
    x = x_img()
    model(x)
    calls = []

    @tf.function(autograph=False)
    def run(v):
        return model(v)

    with iba_core.contract.attached(BE, model, "conv", lambda f: calls.append(1) or f * 0.0):
        traced = run(x).numpy()
    assert calls == [1]  # called once, while tracing
    np.testing.assert_allclose(traced[0], traced[1])
    np.testing.assert_allclose(traced, run(x).numpy())  # the traced graph keeps the hook
    assert not np.allclose(model(x).numpy(), traced)  # eagerly, the layer is clean again


def test_hook_errors():
    model = functional()
    with pytest.raises(LookupError, match="'nope' not found.*'conv', 'bn', 'relu'"):
        BE.attach(model, "nope", lambda f: None)
    with pytest.raises(ValueError, match="model is needed"):
        BE.attach(None, "conv", lambda f: None)
    with pytest.raises(TypeError, match="layer must be"):
        BE.attach(model, 3, lambda f: None)
    with (
        iba_core.contract.attached(BE, model, "relu", lambda f: f[:1]),
        pytest.raises(ValueError, match="returned shape"),
    ):
        model(x_img(), training=False)
    assert "call" not in model.get_layer("relu").__dict__


def test_layer_names_include_nested_models():
    inner = functional()
    inputs = keras.Input((8, 8, 3))
    outer = keras.Model(inputs, keras.layers.Dense(2, name="head")(inner(inputs)), name="outer")
    names = BE.layer_names(outer)
    assert names[:2] == ["net", "conv"] and "head" in names
    seen = []
    with iba_core.contract.attached(BE, outer, "relu", lambda f: seen.append(tuple(f.shape))):
        outer(x_img(1))
    assert seen == [(1, 8, 8, 4)]


# -- freezing ----------------------------------------------------------------------------------
def test_frozen_restores_every_flag_also_after_an_exception():
    model = functional()
    model.get_layer("fc").trainable = False
    kernel = model.get_layer("conv").kernel
    flags = {layer.name: layer.trainable for layer in model.layers}
    with pytest.raises(KeyError), BE.frozen(model):
        assert not any(layer.trainable for layer in model.layers)
        assert len(model.trainable_variables) == 0
        raise KeyError
    assert {layer.name: layer.trainable for layer in model.layers} == flags
    assert kernel.trainable and model.trainable
    assert len(model.trainable_variables) == 4  # conv 2, bn 2 (gamma, beta); fc stays frozen


def test_frozen_batchnorm_uses_moving_statistics_even_in_training_mode():
    model = functional()
    x = x_img(4)
    bn = model.get_layer("bn")
    moving = [v.numpy().copy() for v in bn.non_trainable_variables]
    features = keras.Model(model.input, model.get_layer("flat").output)  # before dropout
    with BE.frozen(model):
        in_training = features(x, training=True).numpy()
    np.testing.assert_array_equal([v.numpy() for v in bn.non_trainable_variables], moving)
    np.testing.assert_allclose(in_training, features(x, training=False).numpy(), rtol=1e-6)
    # Not frozen, training mode normalises with the batch statistics: different features.
    assert not np.allclose(features(x, training=True).numpy(), in_training, atol=1e-3)


def test_call_runs_in_inference_mode():
    model = functional()
    x = x_img(3)
    np.testing.assert_array_equal(BE.call(model, x).numpy(), BE.call(model, x).numpy())


def test_compile_returns_a_tf_function():
    f = BE.compile(lambda v: v * 2)
    assert isinstance(f, tf.types.experimental.PolymorphicFunction)
    np.testing.assert_array_equal(f(tf.constant([1.0])).numpy(), [2.0])


def test_public_surface():
    import iba_core.apps.plotting
    import iba_tf

    for name in iba_tf.__all__:
        assert getattr(iba_tf, name) is not None, name
    assert iba_tf.plot_saliency_map is iba_core.apps.plotting.plot_saliency_map
    assert iba_tf.namespace.matmul is not None
    with pytest.raises(AttributeError, match="no attribute 'IBA'"):
        iba_tf.IBA  # noqa: B018


def test_the_step_parts_are_compiled_by_default():
    from iba_core.engines._bottleneck import _step_functions
    from iba_tf import IBALayer

    assert BE.compile_by_default and IBALayer().bottleneck.compile is None
    compiled = _step_functions(BE, 1.0, False, True)
    eager = _step_functions(BE, 1.0, False, False)
    assert all(isinstance(f, tf.types.experimental.PolymorphicFunction) for f in compiled)
    assert not any(isinstance(f, tf.types.experimental.PolymorphicFunction) for f in eager)
    assert _step_functions(BE, 1.0, False, True) is compiled  # one set per process
