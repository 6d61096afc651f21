"""The conformance suite, run against the TensorFlow/Keras backend."""

from __future__ import annotations

import numpy as np
import pytest

from iba_core.testing import BackendConformanceTests, ConformanceCase

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = pytest.mark.tf


def make_model(dtype: str) -> tuple[object, str]:
    """Conv net 12x12x3 -> conv(6) -> ReLU -> conv(8, stride 2) -> tanh ['act': 6x6x8,
    channels-first 8x6x6] -> logits(5); channels-last like every Keras image model."""
    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3), dtype=dtype),
            keras.layers.Conv2D(6, 3, padding="same", dtype=dtype, name="conv1"),
            keras.layers.ReLU(dtype=dtype, name="relu1"),
            keras.layers.Conv2D(8, 3, strides=2, padding="same", dtype=dtype, name="conv2"),
            keras.layers.Activation("tanh", dtype=dtype, name="act"),
            keras.layers.Flatten(dtype=dtype, name="flatten"),
            keras.layers.Dense(5, dtype=dtype, name="logits"),
        ],
        name=f"conformance_{dtype}",
    )
    model.set_weights([(rng.standard_normal(w.shape) * 0.3).astype(dtype) for w in model.get_weights()])
    return model, "act"


def make_inputs(n: int, dtype: str, seed: int) -> object:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.standard_normal((n, 12, 12, 3)).astype(dtype))


def weight_gradients(model: object) -> list[np.ndarray | None]:
    """Keras variables hold no gradient, so ``value_and_grad`` can write none: one ``None``
    per weight.  That the tape watched only the parameter shows in the suite's other
    checks: the gradient has the parameter's shape, and the weights (the model's outputs)
    are unchanged."""
    return [None for _ in model.weights]


def _layers(model: object) -> list[object]:
    return [model, *model.layers]


def model_flags(model: object) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    return (tuple(layer.trainable for layer in _layers(model)), tuple(v.trainable for v in model.variables))


def mix_flags(model: object) -> None:
    """The first convolution not trainable; the logits' kernel not trainable in a
    trainable layer."""
    model.get_layer("conv1").trainable = False
    model.get_layer("logits").kernel.trainable = False


def is_frozen(model: object) -> bool:
    # Keras chooses inference mode per call (``training=False``, which Backend.call
    # passes); frozen means no layer and no weight trainable.
    return not any(layer.trainable for layer in _layers(model)) and not model.trainable_weights


class TestTFConformance(BackendConformanceTests):
    @pytest.fixture
    def case(self) -> ConformanceCase:
        return ConformanceCase(
            backend="tf",
            make_model=make_model,
            make_inputs=make_inputs,
            input_size=(12, 12),
            feature_shape=(8, 6, 6),
            n_classes=5,
            layer_output_shape=(6, 6, 8),
            fast_compile=True,
            weight_gradients=weight_gradients,
            model_flags=model_flags,
            mix_flags=mix_flags,
            is_frozen=is_frozen,
        )
