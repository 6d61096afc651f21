"""The small CNN of ``iba demo`` for Keras: the PyTorch demo network, channels-last.

The same architecture and the same trained weights as ``iba_torch._demo`` (layer names
included, so ``features.relu3`` is the bottleneck layer in both); the weights ship as
``iba_tf/data/demo_cnn.npz`` in Keras layout, converted from the PyTorch ones by
``scripts/train_demo_models.py``.  Given the same noise (``noise="numpy"``) the two
backends give the same saliency maps up to float32 round-off.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from iba_core.apps.demo import DEMO_LAYER, demo_weights

if TYPE_CHECKING:
    import keras

__all__ = [
    "DEMO_LAYER",
    "INPUT_SHAPE",
    "build_demo_cnn",
    "demo_cnn",
    "keras_weights_from_torch",
    "weights_path",
]

#: Input shape per image, channels last.
INPUT_SHAPE = (64, 64, 1)
N_CLASSES = 10
_CONVS = (("features.conv1", 16), ("features.conv2", 32), ("features.conv3", 64), ("features.conv4", 64))


def weights_path() -> Path:
    """Where the trained weights of the Keras demo CNN ship inside the package."""
    return Path(str(resources.files("iba_tf") / "data" / "demo_cnn.npz"))


def build_demo_cnn() -> keras.Model:
    """The untrained Keras model (Functional, channels-last), layer for layer the PyTorch one."""
    import keras

    layers = keras.layers
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = inputs
    for i, (name, filters) in enumerate(_CONVS, start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=name)(x)
        x = layers.ReLU(name=f"features.relu{i}")(x)
        if i < 4:
            x = layers.MaxPooling2D(2, name=f"features.pool{i}")(x)
    x = layers.GlobalMaxPooling2D(name="classifier.pool")(x)
    outputs = layers.Dense(N_CLASSES, name="classifier.fc")(x)
    return keras.Model(inputs, outputs, name="demo_cnn")


def keras_weights_from_torch(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch ``state_dict`` arrays -> ``{"<layer>/kernel", "<layer>/bias"}`` in Keras layout.

    Conv kernels ``(out, in, kh, kw)`` become ``(kh, kw, in, out)``; the dense kernel
    ``(out, in)`` becomes ``(in, out)``.
    """
    out: dict[str, np.ndarray] = {}
    for name, _ in _CONVS:
        out[f"{name}/kernel"] = np.ascontiguousarray(state[f"{name}.weight"].transpose(2, 3, 1, 0))
        out[f"{name}/bias"] = np.asarray(state[f"{name}.bias"])
    out["classifier.fc/kernel"] = np.ascontiguousarray(state["classifier.fc.weight"].T)
    out["classifier.fc/bias"] = np.asarray(state["classifier.fc.bias"])
    return out


def demo_cnn(weights: str | Path | None = None) -> keras.Model:
    """The trained Keras demo CNN (``weights``: another ``.npz`` in Keras layout)."""
    data = demo_weights(weights if weights is not None else weights_path())
    model = build_demo_cnn()
    for name in [n for n, _ in _CONVS] + ["classifier.fc"]:
        model.get_layer(name).set_weights([data[f"{name}/kernel"], data[f"{name}/bias"]])
    return model
