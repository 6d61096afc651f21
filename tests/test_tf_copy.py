"""IBACopy, IBACopyInnvestigate and model_wo_softmax: the model copy and the classifier
wrapper, and the user's model left untouched."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = [pytest.mark.tf, pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")]

from copies_helper import analyze_with_copies_at_the_input  # noqa: E402
from iba_tf import IBACopy, IBACopyInnvestigate, IBALayer, model_wo_softmax  # noqa: E402

L = keras.layers


def functional(head_activation: str | None = None, seed: int = 0) -> keras.Model:
    """12x12x3 -> conv 'conv1' -> BN -> ReLU 'relu1' -> conv 'conv2' (stride 2) -> dropout
    -> global average -> 3 logits (or probabilities with ``head_activation``)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = L.Dropout(0.3, name="drop")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, activation=head_activation, name="fc")(x)
    model = keras.Model(inputs, outputs, name="clf")
    # Non-trivial BatchNorm statistics, so inference and training mode differ.
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-0.2, 0.2, 6))
    bn.moving_variance.assign(np.linspace(0.5, 1.5, 6))
    return model


def sequential(seed: int = 0, final=None) -> keras.Sequential:
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((12, 12, 3)),
        L.Conv2D(6, 3, padding="same", activation="relu", name="conv1"),
        L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2"),
        L.Flatten(name="flat"),
        L.Dense(3, name="fc"),
    ]
    if final is not None:
        layers.append(final)
    return keras.Sequential(layers, name="seq")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.conv1 = L.Conv2D(4, 3, name="conv1")
        self.gap = L.GlobalAveragePooling2D()
        self.fc = L.Dense(3, name="fc")

    def call(self, x):
        return self.fc(self.gap(self.conv1(x)))


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 12, 12, 3)).astype("float32")


def snapshot(model: keras.Model, x: np.ndarray) -> dict:
    return {
        "weights": [w.copy() for w in model.get_weights()],
        "outputs": model(x, training=False).numpy(),
        "config": model.get_config(),
        "trainable": [(layer.name, layer.trainable) for layer in model.layers],
        "trainable_vars": [v.path for v in model.trainable_variables],
        "patched": [layer.name for layer in model.layers if "call" in layer.__dict__],
        "layers": [id(layer) for layer in model.layers],
    }


def assert_unchanged(model: keras.Model, before: dict, x: np.ndarray) -> None:
    after = snapshot(model, x)
    assert len(after["weights"]) == len(before["weights"])
    for a, b in zip(after["weights"], before["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after["outputs"], before["outputs"])
    for key in ("config", "trainable", "trainable_vars", "patched", "layers"):
        assert after[key] == before[key], key
    assert after["patched"] == []


# -- IBACopy -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [functional, sequential])
def test_the_copy_leaves_the_model_untouched(make):
    model = make()
    x = images(4)
    before = snapshot(model, x)
    model.get_layer("fc").trainable = False
    before_frozen_fc = snapshot(model, x)
    iba = IBACopy(model, "conv2")
    assert iba.model is not model and iba.iba_layer in iba.model.layers
    np.testing.assert_allclose(iba.predict(x), before["outputs"], rtol=1e-6, atol=1e-6)
    iba.estimate(images(32, seed=2))
    iba.analyze(x[:2], target=[0, 2], seed=0)
    with iba.restrict_flow():
        iba.model(x[:2])
    assert_unchanged(model, before_frozen_fc, x)
    model.get_layer("fc").trainable = True
    assert_unchanged(model, before, x)


def test_the_copy_shares_the_weights():
    model = functional()
    iba = IBACopy(model, "relu1")
    assert {id(v) for v in iba.model.weights} == {id(v) for v in model.weights}
    fc = model.get_layer("fc")
    fc.bias.assign(fc.bias.numpy() + 1.0)
    x = images(2)
    np.testing.assert_allclose(iba.predict(x), model(x, training=False).numpy(), rtol=1e-6)


def test_the_copy_explains_like_a_layer_in_the_model():
    """The same bottleneck put into the model by hand gives the same estimate and map."""
    reference = sequential()
    inputs = keras.Input((12, 12, 3))
    x = reference.get_layer("conv1")(inputs)
    by_hand = IBALayer(name="by_hand")
    x = reference.get_layer("fc")(reference.get_layer("flat")(reference.get_layer("conv2")(by_hand(x))))
    with_layer = keras.Model(inputs, x)
    data, x1 = images(40, seed=3), images(1, seed=4)
    by_hand.estimate(with_layer, data)
    expected = by_hand.analyze(x1, model=with_layer, target=1, seed=9)

    iba = IBACopy(reference, "conv1")
    iba.estimate(data)
    np.testing.assert_array_equal(iba.estimator.mean(), by_hand.estimator.mean())
    got = iba.analyze(x1, target=1, seed=9)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_any_task_through_a_loss_function():
    model = functional()
    iba = IBACopy(model, "relu1", batch_size=4)
    iba.estimate(images(32))
    x = images(2, seed=5)
    clean = tf.constant(model(x, training=False).numpy().repeat(4, axis=0))

    def keep_the_output(outputs):  # e.g. a regression: stay close to the clean output
        return tf.reduce_mean(tf.square(outputs - clean))

    smap = iba.analyze(x, keep_the_output, seed=0)
    assert smap.shape == (2, 12, 12) and np.all(smap >= 0) and smap.sum() > 0
    smaller = iba.analyze(x, keep_the_output, seed=0, beta=1000)
    assert smaller.sum() < smap.sum()


def residual() -> keras.Model:
    """A skip connection around the bottleneck layer 'conv2'."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 3))
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = L.Conv2D(6, 3, padding="same", name="conv2")(h)
    x = L.ReLU(name="relu2")(L.Add(name="skip")([x, h]))
    outputs = L.Dense(3, name="fc")(L.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inputs, outputs, name="res")


def test_noisy_copies_at_the_layer_or_at_the_input():
    model = functional()
    iba = IBACopy(model, "relu1")
    iba.estimate(images(64, seed=2), batch_size=32)
    smaps = iba.analyze(images(2), target=[0, 2], seed=5, optimization_steps=3)
    assert iba.bottleneck.copies_made_at == "layer"
    expected = analyze_with_copies_at_the_input(iba, images(2), target=[0, 2], seed=5, optimization_steps=3)
    # float32: the layers before the bottleneck run on 2 instead of 20 rows (round-off
    # only), amplified a little by three Adam steps.
    np.testing.assert_allclose(smaps, expected, rtol=1e-4, atol=1e-6)

    # A skip connection around the layer cannot add 2 and 20 rows: copies at the input.
    model = residual()
    iba = IBACopy(model, "conv2")
    iba.estimate(images(64, seed=2), batch_size=32)
    smaps = iba.analyze(images(2), target=[1, 0], seed=5, optimization_steps=3)
    assert iba.bottleneck.copies_made_at == "input"
    expected = analyze_with_copies_at_the_input(iba, images(2), target=[1, 0], seed=5, optimization_steps=3)
    np.testing.assert_array_equal(smaps, expected)


def test_copy_errors():
    model = functional()
    with pytest.raises(LookupError, match=r"'conv9' not found.*\['conv1', 'bn', 'relu1'"):
        IBACopy(model, "conv9")
    sub = Subclassed()
    sub(images(1))
    with pytest.raises(TypeError, match="subclassed.*IBALayer"):
        IBACopy(sub, "conv1")
    unbuilt = keras.Sequential([L.Conv2D(2, 3, name="c"), L.Flatten(), L.Dense(2)])
    with pytest.raises(ValueError, match="no known input shape"):
        IBACopy(unbuilt, "c")
    with pytest.raises(TypeError, match="keras.Model"):
        IBACopy(L.Dense(2), "x")
    iba = IBACopy(model, "relu1")
    with pytest.raises(RuntimeError, match=r"estimate\(data\)"):
        iba.analyze(images(1), target=0)
    iba.estimate(images(16))
    with pytest.raises(ValueError, match="give exactly one of.*got target and output_loss"):
        iba.analyze(images(1), lambda out: tf.reduce_mean(out), target=0)
    with pytest.raises(ValueError, match="give exactly one of.*got none"):
        iba.analyze(images(1))
    with pytest.raises(ValueError, match="scalar"):
        iba.analyze(images(1), lambda out: out)


def test_unique_name_for_the_inserted_layer():
    inputs = keras.Input((4,))
    outputs = L.Dense(2, name="iba")(L.Dense(3, name="h")(inputs))
    iba = IBACopy(keras.Model(inputs, outputs), "h")
    assert iba.iba_layer.name == "iba_1"


# -- model_wo_softmax ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense-activation", "activation-layer", "softmax-layer", "sequential"])
def test_model_wo_softmax(kind):
    if kind == "dense-activation":
        model = functional(head_activation="softmax")
    elif kind == "activation-layer":
        base = functional()
        model = keras.Model(base.input, L.Activation("softmax")(base.output))
    elif kind == "softmax-layer":
        base = functional()
        model = keras.Model(base.input, L.Softmax()(base.output))
    else:
        model = sequential(final=L.Softmax(name="probs"))
    x = images(3)
    before = snapshot(model, x)
    logits_model = model_wo_softmax(model)
    logits = logits_model(x, training=False).numpy()
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), before["outputs"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(logits.sum(axis=1), 1.0)
    assert_unchanged(model, before, x)
    assert model_wo_softmax(logits_model) is logits_model  # nothing left to strip
    with pytest.raises(ValueError, match="softmax.*model_wo_softmax"):
        IBACopyInnvestigate(model, feature_name="conv2")
    IBACopyInnvestigate(logits_model, feature_name="conv2")


# -- IBACopyInnvestigate -------------------------------------------------------------------
@pytest.fixture(scope="module")
def analyzer_and_model():
    model = functional()
    analyzer = IBACopyInnvestigate(model, "index", feature_name="relu1")
    analyzer.fit(images(48, seed=2))
    return analyzer, model


def test_neuron_selection_modes(analyzer_and_model):
    analyzer, model = analyzer_and_model
    x = images(3, seed=6)
    logits = analyzer.predict(x)
    np.testing.assert_allclose(logits, model(x, training=False).numpy(), rtol=1e-6, atol=1e-7)
    predicted = np.argmax(logits, axis=1)

    by_index = analyzer.analyze(x, neuron_selection=predicted, seed=0)
    assert by_index.shape == (3, 12, 12)
    one = analyzer.analyze(x[:1], neuron_selection=int(predicted[0]), seed=0)
    assert one.shape == (12, 12)

    maxact = IBACopyInnvestigate(model, feature_name="relu1", estimator=analyzer.estimator)
    np.testing.assert_allclose(maxact.analyze(x, seed=0), by_index, rtol=1e-6, atol=1e-9)

    every = IBACopyInnvestigate(model, "all", feature_name="relu1", estimator=analyzer.estimator)
    all_map = every.analyze(x, seed=0)
    assert all_map.shape == (3, 12, 12) and np.all(np.isfinite(all_map))
    assert not np.allclose(all_map, by_index)

    with pytest.raises(ValueError, match="needs neuron_selection"):
        analyzer.analyze(x)
    with pytest.raises(ValueError, match="only neuron_selection_mode='index'"):
        maxact.analyze(x, neuron_selection=0)
    with pytest.raises(ValueError, match="neuron_selection_mode must be one of"):
        IBACopyInnvestigate(model, "top", feature_name="relu1")
    with pytest.raises(ValueError, match="give feature_name.*'conv1'"):
        IBACopyInnvestigate(model)


def test_fit_accumulates_and_fit_generator_counts_steps():
    model = sequential()
    data = images(40, seed=2)
    once = IBACopyInnvestigate(model, feature_name="conv2")
    once.fit(data, batch_size=16)
    twice = IBACopyInnvestigate(model, feature_name="conv2")
    twice.fit(data[:24])
    twice.fit(data[24:])
    assert once.estimator.n == twice.estimator.n == 40
    np.testing.assert_allclose(twice.estimator.mean(), once.estimator.mean(), rtol=1e-12)
    np.testing.assert_allclose(twice.estimator.std(), once.estimator.std(), rtol=1e-10)

    def endless():
        rng = np.random.default_rng(0)
        while True:
            yield rng.standard_normal((8, 12, 12, 3)).astype("float32"), np.zeros(8)

    gen = IBACopyInnvestigate(model, feature_name="conv2")
    gen.fit_generator(endless(), steps_per_epoch=3)
    assert gen.estimator.n == 24
    gen.fit_generator(endless(), steps_per_epoch=2, epochs=2)
    assert gen.estimator.n == 56
    gen.reset_estimate()
    gen.fit(data, n_samples=10)
    assert gen.estimator.n == 10


def test_tf1_style_feature_name_and_save_load(tmp_path, analyzer_and_model):
    analyzer, model = analyzer_and_model
    path = tmp_path / "estimate.npz"
    analyzer.save_npz(path)
    other = IBACopyInnvestigate(model, "index", feature_name="relu1/Relu:0")
    assert other.layer_name == "relu1"
    assert other.load_npz(path) is other
    assert other.estimator.n == analyzer.estimator.n
    x = images(1, seed=7)
    np.testing.assert_array_equal(
        other.analyze(x, neuron_selection=1, seed=3), analyzer.analyze(x, neuron_selection=1, seed=3)
    )
    wrong_layer = IBACopyInnvestigate(model, feature_name="conv2")
    with pytest.raises(ValueError, match="layer 'relu1', not 'conv2'"):
        wrong_layer.load_npz(path)
    with pytest.raises(RuntimeError, match="nothing to save"):
        wrong_layer.save_npz(tmp_path / "empty.npz")


def test_a_loss_function_gets_all_inputs_copies_in_one_pass():
    # TensorFlow's CPU passes hold 3 inputs of 10 copies; the loss holds targets for all 40.
    model = functional()
    iba = IBACopy(model, "relu1")
    iba.estimate(images(32))
    x, targets = images(4, seed=5), [0, 1, 2, 0]
    onehot = tf.one_hot(np.repeat(targets, 10), 3)
    seen = []

    def cross_entropy(outputs):
        seen.append(int(outputs.shape[0]))
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, outputs))

    smap = iba.analyze(x, cross_entropy, seed=0)
    assert set(seen) == {40}
    np.testing.assert_allclose(smap, iba.analyze(x, target=targets, seed=0), rtol=1e-4, atol=1e-6)
