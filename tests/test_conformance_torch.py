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


def weight_gradients(model: torch.nn.Module) -> list[np.ndarray | None]:
    return [None if p.grad is None else p.grad.detach().numpy().copy() for p in model.parameters()]


def model_flags(model: torch.nn.Module) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    return (tuple(m.training for m in model.modules()), tuple(p.requires_grad for p in model.parameters()))


def mix_flags(model: torch.nn.Module) -> None:
    """Training mode except the first conv; one frozen bias."""
    model.train()
    model[0].eval()
    model[2].bias.requires_grad_(False)


def is_frozen(model: torch.nn.Module) -> bool:
    return not any(m.training for m in model.modules()) and not any(
        p.requires_grad for p in model.parameters()
    )


SEQ_T, SEQ_C, SEQ_KEY, SEQ_VOCAB = 8, 4, 2, 10


class SequenceModel(torch.nn.Module):
    """Token ids (N, 8) -> embedding (N, 8, 3) -> 'proj': Linear (N, 8, 4) or 1x1 Conv1d
    (N, 4, 8), tanh -> position 2 -> 5 logits; the same weights in both layouts."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.first = layout == "channels_first"
        self.emb = torch.nn.Embedding(SEQ_VOCAB, 3)
        self.proj = torch.nn.Conv1d(3, SEQ_C, 1) if self.first else torch.nn.Linear(3, SEQ_C)
        self.fc = torch.nn.Linear(SEQ_C, 5)
        with torch.no_grad():
            self.emb.weight.copy_(torch.as_tensor(rng.standard_normal((SEQ_VOCAB, 3))))
            w = torch.as_tensor(rng.standard_normal((SEQ_C, 3)) * 1.2, dtype=torch.float32)
            self.proj.weight.copy_(w.reshape(self.proj.weight.shape))
            self.proj.bias.zero_()
            self.fc.weight.copy_(torch.as_tensor(rng.standard_normal((5, SEQ_C)) * 3.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if self.first:
            return self.fc(torch.tanh(self.proj(h.transpose(1, 2)))[:, :, SEQ_KEY])
        return self.fc(torch.tanh(self.proj(h))[:, SEQ_KEY])


def make_sequence_inputs(n: int, seed: int) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).integers(0, SEQ_VOCAB, (n, SEQ_T)))


class TestTorchConformance(BackendConformanceTests):
    @pytest.fixture
    def case(self) -> ConformanceCase:
        return ConformanceCase(
            backend="torch",
            make_model=make_model,
            make_inputs=make_inputs,
            input_size=(12, 12),
            feature_shape=(8, 6, 6),
            n_classes=5,
            weight_gradients=weight_gradients,
            model_flags=model_flags,
            mix_flags=mix_flags,
            is_frozen=is_frozen,
            make_sequence_model=lambda layout: (SequenceModel(layout).eval(), "proj"),
            make_sequence_inputs=make_sequence_inputs,
            sequence_shape=(SEQ_C, SEQ_T),
            sequence_key=SEQ_KEY,
        )
