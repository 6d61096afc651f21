"""IBALayer: the bottleneck as a layer of the user's own Keras model."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = [pytest.mark.tf, pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")]

from iba_core import Estimator, FewSamplesWarning  # noqa: E402
from iba_tf import IBALayer, TFBackend  # noqa: E402

BE = TFBackend()


def build(with_iba: bool = True, seed: int = 0, input_shape=(12, 12, 3), **iba_kwargs):
    """conv -> ReLU -> [IBALayer 'iba'] -> conv -> global average -> 3 logits."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = layers.ReLU(name="relu1")(x)
    iba = IBALayer(name="iba", **iba_kwargs) if with_iba else None
    if iba is not None:
        x = iba(x)
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, name="fc")(x)
    return keras.Model(inputs, outputs), iba


def images(n: int, seed: int = 1, shape=(12, 12, 3)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype("float32")


@pytest.fixture(scope="module")
def fitted():
    model, iba = build()
    iba.estimate(model, images(64))
    return model, iba


def test_identity_unless_active_also_while_training():
    model, iba = build()
    plain, _ = build(with_iba=False)
    plain.set_weights(model.get_weights())
    x = images(4)
    np.testing.assert_array_equal(model(x).numpy(), plain(x).numpy())
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(model.predict(x, verbose=0), plain(x).numpy(), rtol=1e-6)
    assert iba.get_weights() == []


def test_estimate_from_arrays_generators_and_datasets_agree():
    model, iba = build()
    x = images(48)
    ref = x_features(model, x)
    from_array = _stats(iba.estimate(model, x, batch_size=16))
    from_gen = _stats(iba.estimate(model, ((x[i : i + 12], None) for i in range(0, 48, 12))))
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(48))).batch(20)
    from_ds = _stats(iba.estimate(model, ds))

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[i * 12 : (i + 1) * 12], np.zeros(12)

    from_pydataset = _stats(iba.estimate(model, Batches()))
    for stats in (from_array, from_gen, from_ds, from_pydataset):
        np.testing.assert_allclose(stats[0], ref.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats[1], ref.std(axis=0, ddof=1), rtol=1e-9, atol=1e-12)
    assert iba.estimator.n == 48 and iba.estimator.shape == (6, 12, 12)  # channels-first


def x_features(model, x) -> np.ndarray:
    """The IBA layer's input, channels-first, computed independently of the layer."""
    sub = keras.Model(model.input, model.get_layer("relu1").output)
    return np.transpose(sub(x).numpy(), (0, 3, 1, 2)).astype(np.float64)


def _stats(est: Estimator) -> tuple[np.ndarray, np.ndarray]:
    return est.mean(), est.std()


def test_estimate_stops_at_the_layer_and_at_n_samples():
    model, iba = build()
    ran = []
    handle = BE.attach(model, "fc", lambda f: ran.append(1))
    try:
        with pytest.warns(FewSamplesWarning, match="20 samples"):
            iba.estimate(model, images(64), n_samples=20, batch_size=8)
    finally:
        handle.remove()
    assert ran == [] and iba.estimator.n == 20
    iba.fit(model, images(8), reset=False)  # fit is estimate; reset=False accumulates
    assert iba.estimator.n == 28


def test_analyze_maps(fitted):
    model, iba = fitted
    x = images(3, seed=5)
    one = iba.analyze(x[:1], model=model, target=2, seed=0)
    assert one.shape == (12, 12) and isinstance(one, np.ndarray)
    cap_bits = BE.to_numpy(iba.capacity()).sum() / math.log(2)
    assert one.sum() == pytest.approx(cap_bits, rel=1e-5)
    assert np.all(one >= 0) and one.sum() > 0
    several = iba.analyze(x, model=model, target=[2, 0, 1], seed=0)
    assert several.shape == (3, 12, 12)
    np.testing.assert_allclose(several[0], one, rtol=2e-4, atol=1e-6 * one.max())
    coarse = iba.analyze(x[:1], model=model, target=2, seed=0, mode="capacity")
    assert coarse.shape == (12, 12)


def test_a_loss_function_and_a_target_give_the_same_map(fitted):
    model, iba = fitted
    x = images(1, seed=6)

    def loss(batch):
        logits = model(batch, training=False)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(tf.fill([tf.shape(logits)[0]], 1), logits)
        )

    by_loss = iba.analyze(x, loss, seed=4)
    by_target = iba.analyze(x, model=model, target=1, seed=4)
    # The same float32 arithmetic in another order (the target path runs as one compiled
    # step with a fused soft-label cross-entropy, and makes the copies at the layer):
    # round-off of ~1e-7, amplified a little by ten Adam steps.
    np.testing.assert_allclose(by_loss, by_target, rtol=1e-4, atol=1e-6 * by_target.max())
    again = iba.analyze(x, loss, seed=4)
    np.testing.assert_array_equal(again, by_loss)
    assert not np.array_equal(iba.analyze(x, loss, seed=5), by_loss)


def test_options_change_the_result(fitted):
    model, iba = fitted
    x = images(1, seed=7)
    low = iba.analyze(x, model=model, target=0, seed=1, beta=0.1)
    high = iba.analyze(x, model=model, target=0, seed=1, beta=100)
    assert high.sum() < low.sum()
    assert iba.bottleneck.min_std == 0.01  # per-call overrides are not kept
    iba.analyze(x, model=model, target=0, seed=1, min_std=5.0, optimization_steps=1)
    assert iba.bottleneck.min_std == 0.01


def test_restrict_flow_eagerly_and_in_tf_function(fitted):
    model, iba = fitted
    x = images(2, seed=8)
    iba.analyze(x, model=model, target=[0, 1], beta=100, seed=0)
    clean = model(x).numpy()
    with iba.restrict_flow():
        first, second = model(x).numpy(), model(x).numpy()
        run = tf.function(lambda v: model(v, training=False), autograph=False)
        traced_a, traced_b = run(x).numpy(), run(x).numpy()
    assert not np.allclose(first, clean) and not np.allclose(first, second)  # fresh noise
    assert not np.allclose(traced_a, clean) and not np.allclose(traced_a, traced_b)
    np.testing.assert_array_equal(model(x).numpy(), clean)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras'
def test_config_round_trip_and_saving(tmp_path):
    model, iba = build(beta=3.0, sigma=0.5, batch_size=4)
    config = iba.get_config()
    assert config["beta"] == 3.0 and config["sigma"] == 0.5 and config["batch_size"] == 4
    clone = IBALayer.from_config(config)
    assert clone.bottleneck.beta == 3.0 and clone.bottleneck.batch_size == 4
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("iba"), IBALayer)
    x = images(2)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_given_statistics_in_the_layer_layout():
    model, _ = build(with_iba=False)
    feats = x_features(model, images(32))  # (N, C, h, w)
    mean_hwc = feats.mean(axis=0).transpose(1, 2, 0)
    std_hwc = feats.std(axis=0).transpose(1, 2, 0)
    model2, iba = build(feature_mean_std=(mean_hwc, std_hwc))
    model2.set_weights(model.get_weights())
    np.testing.assert_allclose(iba.bottleneck.feature_mean, feats.mean(axis=0))
    assert iba.analyze(images(1), model=model2, target=0, seed=0).shape == (12, 12)
    with pytest.raises(ValueError, match="not both"):
        IBALayer(feature_mean_std=(mean_hwc, std_hwc), feature_mean=mean_hwc)


def test_channels_first_and_sequence_layers():
    inputs = keras.Input((3, 8, 8))
    iba = IBALayer(data_format="channels_first")
    x = keras.layers.Conv2D(4, 3, padding="same", data_format="channels_first")(inputs)
    x = iba(x)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    x = images(16, shape=(3, 8, 8))
    iba.estimate(model, x)
    assert iba.estimator.shape == (4, 8, 8)
    assert iba.analyze(x[:1], model=model, target=1, seed=0).shape == (8, 8)

    tokens = keras.Input((7,), dtype="int32")
    seq_iba = IBALayer(sigma=None)
    h = seq_iba(keras.layers.Embedding(20, 5)(tokens))
    logits = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h))
    text = keras.Model(tokens, logits)
    ids = np.random.default_rng(0).integers(0, 20, (32, 7)).astype("int32")
    seq_iba.estimate(text, ids)
    assert seq_iba.estimator.shape == (5, 7)
    smap = seq_iba.analyze(ids[:2], model=text, target=[0, 1], seed=0)
    assert smap.shape == (2, 7) and np.all(smap >= 0)


def test_float64_model():
    inputs = keras.Input((6, 6, 2), dtype="float64")
    iba = IBALayer()
    x = iba(keras.layers.Conv2D(3, 3, dtype="float64")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, dtype="float64")(keras.layers.Flatten()(x)))
    x = images(16, shape=(6, 6, 2)).astype("float64")
    iba.estimate(model, x)
    smap = iba.analyze(x[:1], model=model, target=0, seed=0)
    assert smap.dtype == np.float64 and smap.shape == (6, 6)
    assert iba.capacity().dtype == tf.float64


def test_errors(fitted):
    model, iba = fitted
    fresh_model, fresh = build()
    with pytest.raises(RuntimeError, match=r"estimate\(model, data\)"):
        fresh.analyze(images(1), model=fresh_model, target=0)
    with pytest.raises(ValueError, match="batch"):
        iba.analyze(images(1).reshape(-1), model=model, target=0)
    with pytest.raises(ValueError, match="give exactly one of target=.*got none"):
        iba.analyze(images(1))
    with pytest.raises(ValueError, match="out of range"):
        iba.analyze(images(1), model=model, target=7)
    with pytest.raises(ValueError, match="one per input"):
        iba.analyze(images(3), model=model, target=[0, 1])
    bad = images(1)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        iba.analyze(bad, model=model, target=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        fresh.estimate(fresh_model, np.full((4, 12, 12, 3), np.inf, np.float32))
    with pytest.raises(ValueError, match="data_format"):
        IBALayer(data_format="nhwc")
    with pytest.raises(TypeError, match="cannot iterate"):
        iba.estimate(model, 3)


def test_non_finite_features_are_refused():
    inputs = keras.Input((4,))
    iba = IBALayer(feature_mean=np.zeros(3), feature_std=np.ones(3))
    h = keras.layers.Dense(3, name="h")(inputs)
    blown_up = keras.layers.Lambda(lambda t: t / 0.0)(h)  # +-inf features
    model = keras.Model(inputs, keras.layers.Dense(2)(iba(blown_up)))
    x = np.ones((2, 4), np.float32)
    with pytest.raises(FloatingPointError, match="loss became"):
        iba.analyze(x, model=model, target=0, mode="capacity")
    with pytest.raises(ValueError, match="NaN/inf"):
        iba.estimate(model, x)


def test_batch_shape_must_match_the_estimate():
    model, iba = build(input_shape=(None, None, 3))
    iba.estimate(model, images(16))
    with pytest.raises(ValueError, match=r"\(6, 16, 16\).*\(6, 12, 12\).*estimate\(\) again"):
        iba.analyze(images(1, shape=(16, 16, 3)), model=model, target=0)
