"""Small stand-ins for what the reference library's examples load from outside: a
pretrained VGG-16, an ImageNet folder and its transform, and the downloaded monkey image.

Used by tests/test_docs_migration.py, which runs the reference's example with only its
import lines changed; these names are imported in place of torchvision's and the
reference's, so the example's own lines stay as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

N_CLASSES = 10
SIZE = 32  # images are 3 x SIZE x SIZE
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


class TinyVGG(nn.Module):
    """A VGG-shaped network (``features``, ``avgpool``, ``classifier``) on 32x32 images;
    ``features[17]`` is a convolution, as conv4_1 is in VGG-16."""

    def __init__(self) -> None:
        super().__init__()
        # VGG-16's first 17 layers: blocks of 2, 2 and 3 convolutions, each followed by a pool.
        layers: list[nn.Module] = []
        channels = 3
        for n_convs in (2, 2, 3):
            for _ in range(n_convs):
                layers += [nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU()]
                channels = 8
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear(16 * 2 * 2, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16(pretrained: bool = False) -> TinyVGG:
    """A seeded :class:`TinyVGG` (no weights are downloaded)."""
    torch.manual_seed(0)
    return TinyVGG()


def imagenet_transform(resize: int = 256, crop_size: int = 224) -> Any:
    """``(H, W, 3)`` uint8 image -> normalised ``(3, H, W)`` float tensor."""

    def transform(img: np.ndarray) -> torch.Tensor:
        x = (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD
        return torch.as_tensor(np.moveaxis(x, -1, 0), dtype=torch.float32)

    return transform


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def get_imagenet_folder(path: str, image_size: int = 224, transform: Any = "default") -> Any:
    """A data set of 128 ``(image, label)`` pairs in place of an ImageFolder at ``path``."""
    to_tensor = imagenet_transform()
    images = torch.stack([to_tensor(img) for img in _images(128, seed=1)])
    labels = torch.arange(128) % N_CLASSES
    return torch.utils.data.TensorDataset(images, labels)


def load_monkeys(center_crop: bool = True, size: int = 224, pil: bool = False) -> tuple[np.ndarray, int]:
    """One ``(H, W, 3)`` uint8 image and its class, in place of the downloaded photo."""
    return _images(1, seed=2)[0], 3
