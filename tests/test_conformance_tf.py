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
    model = keras.Sequential([
        keras.Input((12, 12, 3), dtype=dtype),
        keras.layers.Conv2D(6, 3, padding="same", dtype=dtype, name="conv1"),
        keras.layers.ReLU(dtype=dtype, name="relu1"),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", dtype=dtype, name="conv2"),
        keras.layers.Activation("tanh", dtype=dtype, name="act"),
        keras.layers.Flatten(dtype=dtype, name="flatten"),
        keras.layers.Dense(5, dtype=dtype, name="logits"),
    ], name=f"conformance_{dtype}")
    model.set_weights([(rng.standard_normal(w.shape) * 0.3).astype(dtype)
                       for w in model.get_weights()])
    return model, "act"


def make_inputs(n: int, dtype: str, seed: int) -> object:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.standard_normal((n, 12, 12, 3)).astype(dtype))


class TestTFConformance(BackendConformanceTests):
    @pytest.fixture
    def case(self) -> ConformanceCase:
        return ConformanceCase(backend="tf", make_model=make_model, make_inputs=make_inputs,
                               input_size=(12, 12), feature_shape=(8, 6, 6), n_classes=5,
                               fast_compile=True)
