"""The Readout Bottleneck on TensorFlow/Keras: the shared suite and the ``IBAReadout`` front."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from iba_core import FewSamplesWarning
from iba_core.testing import ReadoutCase, ReadoutTests
from iba_core.testing._readout_suite import READOUT_LAYERS, blob_images, readout_reference_weights

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = pytest.mark.tf


def make_model(weights: dict[str, np.ndarray]) -> Any:
    """The suite's reference network in Keras, channels-last, PyTorch's padding."""
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            layers.Conv2D(8, 3, padding="same", name="conv1"),
            layers.ReLU(name="relu1"),
            layers.ZeroPadding2D(1, name="pad2"),
            layers.Conv2D(8, 3, strides=2, name="conv2"),
            layers.ReLU(name="relu2"),
            layers.ZeroPadding2D(1, name="pad3"),
            layers.Conv2D(8, 3, strides=2, name="conv3"),
            layers.ReLU(name="relu3"),
            layers.GlobalAveragePooling2D(name="pool"),
            layers.Dense(5, name="logits"),
        ],
        name="readout_reference",
    )
    for name in ("conv1", "conv2", "conv3"):
        kernel = np.transpose(weights[f"{name}.weight"], (2, 3, 1, 0))  # (kh, kw, in, out)
        model.get_layer(name).set_weights([kernel, weights[f"{name}.bias"]])
    model.get_layer("logits").set_weights([weights["logits.weight"].T, weights["logits.bias"]])
    return model


def to_inputs(images: np.ndarray) -> Any:
    return tf.constant(np.transpose(images, (0, 2, 3, 1)))


def make_case() -> ReadoutCase:
    from iba_tf._readout import compile_loss

    return ReadoutCase(
        backend="tf",
        make_model=make_model,
        to_inputs=to_inputs,
        layer_of=lambda model, name: model.get_layer(name),
        train_options={"compile": compile_loss},
    )


class TestTFReadout(ReadoutTests):
    @pytest.fixture(scope="class")
    @classmethod
    def readout_case(cls) -> ReadoutCase:
        return make_case()


# -- the Keras front ---------------------------------------------------------------------
def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = blob_images(n, seed)
    return np.transpose(images, (0, 2, 3, 1)), labels


def _patched(model: Any) -> list[str]:
    return [layer.name for layer in model.layers if "call" in layer.__dict__]


@pytest.fixture(scope="module")
def trained_front() -> tuple[Any, Any]:
    from iba_tf import IBAReadout

    model = make_model(readout_reference_weights())
    readout = IBAReadout("relu2", ["relu2", model.get_layer("relu3"), "logits"], model)
    x, y = _data(128, 1)
    with pytest.warns(FewSamplesWarning):
        readout.estimate(x)
    history = readout.fit(x, y, epochs=2, lr=3e-2, seed=0, compile=False)
    assert len(history["loss"]) == 2
    return readout, model


class TestIBAReadoutKeras:
    def test_analyze_returns_numpy_maps(self, trained_front: Any) -> None:
        readout, _ = trained_front
        x, _ = _data(3, 5)
        maps = readout.analyze(x)
        assert isinstance(maps, np.ndarray) and maps.shape == (3, 12, 12)
        assert readout.analyze(x[:1]).shape == (12, 12)
        cap = readout.analyze(x, mode="capacity")
        assert cap.shape == (3, 6, 6)
        np.testing.assert_allclose(cap.sum((1, 2)), maps.sum((1, 2)), rtol=1e-4)
        assert tuple(readout.capacity().shape) == (3, 8, 6, 6)

    def test_fit_takes_datasets_and_one_hot_labels(self, trained_front: Any) -> None:
        readout, _ = trained_front
        x, y = _data(64, 3)
        onehot = np.eye(5, dtype=np.float32)[y]
        ds = tf.data.Dataset.from_tensor_slices((x, onehot)).batch(32)
        by_index = readout.evaluate(x, y, beta=0)
        np.testing.assert_allclose(readout.evaluate(ds, beta=0), by_index, rtol=1e-5)
        steps = readout.steps
        history = readout.fit(ds, epochs=2, lr=1e-9, compile=False)
        assert len(history["loss"]) == 2 and readout.steps == steps + 4
        with pytest.raises(ValueError, match="no batches in epoch 2"):
            readout.fit((b for b in ds), epochs=2, lr=1e-9, compile=False)

    def test_model_left_unchanged(self) -> None:
        from iba_tf import IBAReadout

        model = make_model(readout_reference_weights())
        flags = [(layer.name, layer.trainable) for layer in model.layers]
        weights = [w.copy() for w in model.get_weights()]
        x, y = _data(64, 1)
        before = model(x[:4], training=False).numpy()
        readout = IBAReadout("relu2", list(READOUT_LAYERS), model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FewSamplesWarning)
            readout.estimate(x)
        readout.fit(x, y, epochs=1, lr=1e-2, warn=False)  # compiled: the model is untouched all the same
        readout.analyze(x[:4])
        assert _patched(model) == []
        assert [(layer.name, layer.trainable) for layer in model.layers] == flags
        for w, w0 in zip(model.get_weights(), weights, strict=True):
            np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(model(x[:4], training=False).numpy(), before)

    def test_layers_not_in_the_model_are_refused(self) -> None:
        from iba_tf import IBAReadout

        model = make_model(readout_reference_weights())
        with pytest.raises(LookupError, match="conv9"):
            IBAReadout("relu2", ["relu3", "conv9"], model)
        stranger = keras.layers.ReLU(name="stranger")
        with pytest.raises(ValueError, match="not a layer of model"):
            IBAReadout("relu2", [stranger], model)

    def test_analyze_before_training_is_refused(self) -> None:
        from iba_tf import IBAReadout

        model = make_model(readout_reference_weights())
        readout = IBAReadout("relu2", list(READOUT_LAYERS), model)
        x, y = _data(32, 0)
        with pytest.raises(RuntimeError, match="estimate"):
            readout.analyze(x[:2])
        with pytest.raises(RuntimeError, match="estimate"):
            readout.fit(x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FewSamplesWarning)
            readout.estimate(x)
        with pytest.raises(RuntimeError, match="fit"):
            readout.analyze(x[:2])

    def test_save_load_and_wrong_weights(self, trained_front: Any, tmp_path: Any) -> None:
        from iba_tf import IBAReadout

        readout, model = trained_front
        x, _ = _data(4, 6)
        path = tmp_path / "readout.npz"
        readout.save(path)
        loaded = IBAReadout("relu2", list(READOUT_LAYERS), model).load(path)
        np.testing.assert_array_equal(loaded.analyze(x), readout.analyze(x))
        state = readout.state_dict()
        with pytest.raises(ValueError, match="readout layers"):
            IBAReadout("relu2", ["relu2", "logits"], model).load_state_dict(state)
        state["head.b1"] = np.zeros(3, dtype=np.float32)
        with pytest.raises(ValueError, match="'b1' has shape"):
            IBAReadout("relu2", list(READOUT_LAYERS), model).load_state_dict(state)
