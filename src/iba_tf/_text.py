"""The small transformer of ``iba demo --task text`` for Keras: the PyTorch model, layer
for layer.

Token ids ``(N, T)`` -> ``embeddings`` (token + position, ``(N, T, D)``, channels-last)
-> ``blocks.0`` ... (pre-norm self-attention and feed-forward) -> ``norm`` -> mean over
the real tokens -> ``classifier`` -> logits.  The padding mask is derived from the ids
(``ids == PAD_ID``), as in ``iba_torch._text``.  The weights ship as
``iba_tf/data/text_transformer.npz`` in Keras layout, converted from the PyTorch ones by
``scripts/train_text_model.py``; both models give the same logits to float32 round-off
(tested), and :func:`attention` gives the attention weights of every block.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from iba_core.apps.text_task import PAD_ID, TEXT_CONFIG, TEXT_LAYER, text_weights

__all__ = [
    "TEXT_CONFIG",
    "TEXT_LAYER",
    "attention",
    "build_text_model",
    "keras_weights_from_torch",
    "text_model",
    "text_weights_path",
]

_NEG = -1e9
_EPS = 1e-5  # PyTorch's LayerNorm epsilon (Keras' default is 1e-3)


class Embeddings(keras.layers.Layer):
    """Token plus position embedding, ``(N, T) -> (N, T, D)``."""

    def __init__(self, vocab: int, max_length: int, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.token = keras.layers.Embedding(vocab, width, name="token")
        self.position = keras.layers.Embedding(max_length, width, name="position")

    def call(self, ids: Any) -> Any:
        positions = ops.arange(ops.shape(ids)[1])
        return self.token(ids) + self.position(positions)[None]


class PadMask(keras.layers.Layer):
    """1.0 where ``ids == PAD_ID`` (padding), else 0.0."""

    def call(self, ids: Any) -> Any:
        return ops.cast(ops.equal(ids, PAD_ID), "float32")


class Block(keras.layers.Layer):
    """Pre-norm transformer block with written-out multi-head self-attention."""

    def __init__(self, width: int, heads: int, mlp: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.width, self.heads = width, heads
        self.norm1 = keras.layers.LayerNormalization(epsilon=_EPS, name="norm1")
        self.qkv = keras.layers.Dense(3 * width, name="qkv")
        self.out = keras.layers.Dense(width, name="out")
        self.norm2 = keras.layers.LayerNormalization(epsilon=_EPS, name="norm2")
        self.fc1 = keras.layers.Dense(mlp, activation="relu", name="fc1")
        self.fc2 = keras.layers.Dense(width, name="fc2")

    def weights_and_values(self, x: Any, pad: Any) -> tuple[Any, Any]:
        """Attention weights ``(N, heads, T, T)`` of ``x`` (already normalised), and values."""
        n, t = ops.shape(x)[0], ops.shape(x)[1]
        head = self.width // self.heads
        qkv = ops.transpose(ops.reshape(self.qkv(x), (n, t, 3, self.heads, head)), (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(head)
        scores = scores + pad[:, None, None, :] * _NEG
        return ops.softmax(scores, axis=-1), v

    def call(self, x: Any, pad: Any) -> Any:
        n, t = ops.shape(x)[0], ops.shape(x)[1]
        weights, v = self.weights_and_values(self.norm1(x), pad)
        mixed = ops.reshape(ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3)), (n, t, self.width))
        x = x + self.out(mixed)
        return x + self.fc2(self.fc1(self.norm2(x)))


class MaskedMean(keras.layers.Layer):
    """Mean over the real tokens: ``(N, T, D), pad (N, T) -> (N, D)``."""

    def call(self, x: Any, pad: Any) -> Any:
        keep = (1.0 - pad)[..., None]
        return ops.sum(x * keep, axis=1) / ops.maximum(ops.sum(keep, axis=1), 1.0)


def text_weights_path() -> Path:
    """Where the Keras weights of the text demo model ship inside the package."""
    return Path(str(resources.files("iba_tf") / "data" / "text_transformer.npz"))


def build_text_model(**overrides: int) -> keras.Model:
    """The untrained Functional model of :data:`TEXT_CONFIG` (``overrides`` change sizes)."""
    cfg = {**TEXT_CONFIG, **overrides}
    unknown = set(cfg) - set(TEXT_CONFIG)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(TEXT_CONFIG)}")
    if cfg["width"] % cfg["heads"]:
        raise ValueError(f"width {cfg['width']} is not divisible by heads {cfg['heads']}")
    ids = keras.Input((None,), dtype="int32", name="ids")
    pad = PadMask(name="pad_mask")(ids)
    x = Embeddings(cfg["vocab"], cfg["max_length"], cfg["width"], name="embeddings")(ids)
    for i in range(cfg["layers"]):
        x = Block(cfg["width"], cfg["heads"], cfg["mlp"], name=f"blocks.{i}")(x, pad)
    x = keras.layers.LayerNormalization(epsilon=_EPS, name="norm")(x)
    x = MaskedMean(name="pool")(x, pad)
    logits = keras.layers.Dense(cfg["classes"], name="classifier")(x)
    return keras.Model(ids, logits, name="text_transformer")


def keras_weights_from_torch(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch ``state_dict`` arrays -> ``{"<layer path>": array}`` in Keras layout.

    Dense kernels ``(out, in)`` become ``(in, out)``; LayerNorm ``weight`` is ``gamma``.
    Keys are ``<torch module path>/<kernel|bias|gamma|beta|embeddings>``.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        value = np.asarray(value, dtype=np.float32)
        if module.startswith("embeddings."):
            out[f"{module}/embeddings"] = value
        elif module.split(".")[-1].startswith("norm"):
            out[f"{module}/{'gamma' if kind == 'weight' else 'beta'}"] = value
        else:
            out[f"{module}/{'kernel' if kind == 'weight' else 'bias'}"] = (
                np.ascontiguousarray(value.T) if kind == "weight" else value
            )
    return out


#: Keras sublayer of each PyTorch module path inside a block.
_BLOCK_PARTS = {
    "norm1": "norm1",
    "attn.qkv": "qkv",
    "attn.out": "out",
    "norm2": "norm2",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
}


def _sublayer(model: keras.Model, module: str) -> keras.layers.Layer:
    parts = module.split(".")
    if parts[0] == "embeddings":
        return getattr(model.get_layer("embeddings"), parts[1])
    if parts[0] == "blocks":
        return getattr(model.get_layer(f"blocks.{parts[1]}"), _BLOCK_PARTS[".".join(parts[2:])])
    return model.get_layer(module)


def load_weights(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Put the arrays of :func:`keras_weights_from_torch` into ``model``'s layers."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        module, _, kind = key.rpartition("/")
        modules.setdefault(module, {})[kind] = value
    order = {"embeddings": 0, "kernel": 0, "gamma": 0, "bias": 1, "beta": 1}
    for module, kinds in modules.items():
        layer = _sublayer(model, module)
        layer.set_weights([v for _, v in sorted(kinds.items(), key=lambda kv: order[kv[0]])])


def text_model(weights: str | Path | None = None) -> keras.Model:
    """The trained Keras text demo model (``weights``: another ``.npz`` in Keras layout)."""
    model = build_text_model()
    load_weights(model, text_weights(weights if weights is not None else text_weights_path()))
    return model


def attention(model: keras.Model, ids: Any) -> list[Any]:
    """The attention weights of every block of ``model``, ``(N, heads, T, T)`` each."""
    ids = ops.convert_to_tensor(ids, dtype="int32")
    pad = model.get_layer("pad_mask")(ids)
    x = model.get_layer("embeddings")(ids)
    maps: list[Any] = []
    i = 0
    while True:
        try:
            block = model.get_layer(f"blocks.{i}")
        except ValueError:
            return maps
        weights, _ = block.weights_and_values(block.norm1(x), pad)
        maps.append(weights)
        x = block(x, pad)
        i += 1
