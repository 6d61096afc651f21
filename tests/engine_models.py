"""Small PyTorch models for ``test_engine.py`` (imported only where PyTorch is installed)."""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict

import torch
from torch import nn

N_CLASSES = 5


class Tripwire(nn.Module):
    """The identity, until armed: then the ``calls``-th forward pass raises."""

    def __init__(self) -> None:
        super().__init__()
        self.countdown: int | None = None

    def arm(self, calls: int) -> None:
        self.countdown = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown <= 0:
                self.countdown = None
                raise RuntimeError("tripwire")
        return x


class Pause(nn.Module):
    """The identity, after a short sleep that lets other threads run (or after calling
    ``gate()``, when set)."""

    def __init__(self, seconds: float = 0.002) -> None:
        super().__init__()
        self.seconds = seconds
        self.gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate()
        else:
            time.sleep(self.seconds)
        return x


class ToChannelsLast(nn.Module):
    """``(N, C, H, W) -> (N, H, W, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """``(N, H, W, C) -> (N, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


@dataclasses.dataclass
class ClassifierOutput:
    """An output object with ``.logits`` (like those of model hubs), not a tensor."""

    logits: torch.Tensor
    hidden: torch.Tensor


class ObjectOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        return ClassifierOutput(logits=self.inner(x), hidden=x.flatten(1))


class DictOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # "logits" deliberately not the first key.
        return {"hidden": x.flatten(1), "logits": self.inner(x)}


class TupleOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x), x.flatten(1)


WRAPPERS = {"object": ObjectOutput, "dict": DictOutput, "tuple": TupleOutput}


def classifier(
    seed: int = 0, train: bool = False, tripwire: bool = False, pause: bool = False
) -> nn.Sequential:
    """3x8x8 -> conv1 -> bn -> relu1 -> conv2 (stride 2: 6x4x4) -> relu2 -> drop -> pool
    (2x2) -> flat -> fc (5 logits) [-> trip] [-> pause].

    ``train=True``: training mode with mixed flags (``fc`` in eval mode, ``conv1.bias``
    not trainable), so a test sees whether each flag is restored, not just reset.
    """
    torch.manual_seed(seed)
    layers = [
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)),
        ("bn", nn.BatchNorm2d(4)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 6, 3, padding=1, stride=2)),
        ("relu2", nn.ReLU()),
        ("drop", nn.Dropout(0.5)),
        ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flat", nn.Flatten()),
        ("fc", nn.Linear(24, N_CLASSES)),
    ]
    if tripwire:
        layers.append(("trip", Tripwire()))
    if pause:
        layers.append(("pause", Pause()))
    model = nn.Sequential(OrderedDict(layers))
    with torch.no_grad():  # non-trivial running statistics: train and eval mode differ
        model.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 4))
        model.bn.running_var.copy_(torch.linspace(0.5, 1.5, 4))
    if train:
        model.train()
        model.fc.eval()
        model.conv1.bias.requires_grad_(False)
    else:
        model.eval()
    return model


def channels_last_twin(model: nn.Sequential) -> nn.Sequential:
    """``model`` (shared modules, so the same weights) with a layer ``to_nhwc`` whose
    output is conv2's features channels-last; ``to_nchw`` turns them back."""
    names = ["conv1", "bn", "relu1", "conv2"]
    rest = ["relu2", "drop", "pool", "flat", "fc"]
    layers = [(n, getattr(model, n)) for n in names]
    layers += [("to_nhwc", ToChannelsLast()), ("to_nchw", ToChannelsFirst())]
    layers += [(n, getattr(model, n)) for n in rest]
    twin = nn.Sequential(OrderedDict(layers))
    twin.training = model.training  # not train(): that would reset the shared modules
    return twin


def images(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen) * scale + shift


def model_flags(model: nn.Module) -> tuple:
    """What an explanation must leave as it found it: train/eval flags, ``requires_grad``,
    hook counts and ``.grad`` of every module and parameter."""
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        [p.grad for p in model.parameters()],
    )
