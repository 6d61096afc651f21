"""The conformance suite, run against the PyTorch backend."""

from __future__ import annotations

import numpy as np
import pytest

from iba_core.testing import BackendConformanceTests, ConformanceCase

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def make_model(dtype: str) -> tuple[torch.nn.Module, str]:
    """Conv net 3x12x12 -> conv(8) -> ReLU -> [bottleneck on '3': 8x6x6] -> logits(5)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, padding=1, stride=2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 5),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.to(getattr(torch, dtype)).eval(), "3"


def make_inputs(n: int, dtype: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.standard_normal((n, 3, 12, 12)).astype(dtype))


class TestTorchConformance(BackendConformanceTests):
    @pytest.fixture
    def case(self) -> ConformanceCase:
        return ConformanceCase(backend="torch", make_model=make_model, make_inputs=make_inputs,
                               input_size=(12, 12), feature_shape=(8, 6, 6), n_classes=5)
