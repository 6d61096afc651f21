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


SEQ_T, SEQ_C, SEQ_KEY, SEQ_VOCAB = 8, 4, 2, 10


def make_sequence_model(layout: str) -> tuple[object, str]:
    """Token ids (N, 8) -> embedding (N, 8, 3) -> 'proj': Dense (N, 8, 4) or a 1x1
    channels-first Conv1D (N, 4, 8), tanh -> position 2 -> 5 logits; the same weights."""
    rng = np.random.default_rng(0)
    first = layout == "channels_first"
    ids = keras.Input((SEQ_T,), dtype="int32")
    h = keras.layers.Embedding(SEQ_VOCAB, 3, name="emb")(ids)
    if first:
        h = keras.layers.Permute((2, 1), name="to_cf")(h)
        h = keras.layers.Conv1D(SEQ_C, 1, data_format="channels_first", activation="tanh", name="proj")(h)
        h = keras.layers.Lambda(lambda t: t[:, :, SEQ_KEY], name="pick")(h)
    else:
        h = keras.layers.Dense(SEQ_C, activation="tanh", name="proj")(h)
        h = keras.layers.Lambda(lambda t: t[:, SEQ_KEY], name="pick")(h)
    model = keras.Model(ids, keras.layers.Dense(5, name="fc")(h), name=f"sequence_{layout}")
    emb = rng.standard_normal((SEQ_VOCAB, 3))
    w = rng.standard_normal((SEQ_C, 3)) * 1.2
    fc = rng.standard_normal((5, SEQ_C)) * 3.0
    model.get_layer("emb").set_weights([emb])
    model.get_layer("proj").set_weights([w.T[None] if first else w.T, np.zeros(SEQ_C)])
    model.get_layer("fc").set_weights([fc.T, np.zeros(5)])
    return model, "proj"


def make_sequence_inputs(n: int, seed: int) -> object:
    return tf.constant(np.random.default_rng(seed).integers(0, SEQ_VOCAB, (n, SEQ_T)), dtype=tf.int32)


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
            make_sequence_model=make_sequence_model,
            make_sequence_inputs=make_sequence_inputs,
            sequence_shape=(SEQ_C, SEQ_T),
            sequence_key=SEQ_KEY,
        )
