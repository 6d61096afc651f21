"""The small CNN of ``iba demo`` (cluttered digits, 1x64x64 -> 10 classes), for PyTorch.

Trained by ``scripts/train_demo_models.py``; the weights ship with the package as
``iba_torch/data/demo_cnn.npz`` (NumPy arrays keyed like the ``state_dict``).  Use it as
a ready model to try ``iba explain iba_torch._demo:demo_cnn --layer features.relu3 ...``.
"""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iba_core.apps.demo import DEMO_LAYER, demo_weights

__all__ = ["DEMO_LAYER", "INPUT_SHAPE", "build_demo_cnn", "demo_cnn", "weights_path"]
#: Input shape per image, channels first.
INPUT_SHAPE = (1, 64, 64)
N_CLASSES = 10


def weights_path() -> Path:
    """Where the trained weights of the demo CNN ship inside the package."""
    return Path(str(resources.files("iba_torch") / "data" / "demo_cnn.npz"))


def build_demo_cnn() -> nn.Sequential:
    """The untrained architecture: four 3x3 conv layers, global max pooling, a linear head.

    Global max pooling makes the classifier look for the digit wherever it is, which
    suits inputs with one object among clutter.
    """
    features = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 16, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),  # 32 x 32
                ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),  # 16 x 16
                ("conv3", nn.Conv2d(32, 64, 3, padding=1)),
                ("relu3", nn.ReLU()),
                ("pool3", nn.MaxPool2d(2)),  # 8 x 8
                ("conv4", nn.Conv2d(64, 64, 3, padding=1)),
                ("relu4", nn.ReLU()),
            ]
        )
    )
    classifier = nn.Sequential(
        OrderedDict(
            [
                ("pool", nn.AdaptiveMaxPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(64, N_CLASSES)),
            ]
        )
    )
    return nn.Sequential(OrderedDict([("features", features), ("classifier", classifier)]))


def state_dict_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's ``state_dict`` as float32 NumPy arrays (what the ``.npz`` holds)."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def demo_cnn(weights: str | Path | None = None) -> nn.Sequential:
    """The trained demo CNN in eval mode (``weights``: another ``.npz`` to load instead)."""
    arrays = demo_weights(weights if weights is not None else weights_path())
    model = build_demo_cnn()
    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    model.load_state_dict(state)
    return model.eval()
