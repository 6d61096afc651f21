"""The small transformer of ``iba demo --task text``, in plain PyTorch layers.

Token ids ``(N, T)`` -> ``embeddings`` (token + learned position embedding, ``(N, T, D)``,
channels-last: the usual place for the bottleneck) -> ``blocks.0`` ... (pre-norm
self-attention and feed-forward blocks, ``(N, T, D)``) -> ``norm`` -> mean over the real
tokens -> ``classifier`` -> logits ``(N, 4)``.  The model takes the ids alone and derives
its padding mask from them (``ids == PAD_ID``): padded tokens are never attended to and
never pooled, so they cannot change the output.

The attention is written out (no fused kernel), so :meth:`TextTransformer.attention`
can return the attention weights of every layer for the attention baselines; ``forward``
is the same computation without keeping them.  The Keras twin is ``iba_tf._text``; the
weights ship as ``iba_torch/data/text_transformer.npz`` (``scripts/train_text_model.py``).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from iba_core.apps.text_task import PAD_ID, TEXT_CONFIG, TEXT_LAYER, text_weights

__all__ = [
    "TEXT_CONFIG",
    "TEXT_LAYER",
    "TextTransformer",
    "build_text_model",
    "text_model",
    "text_weights_path",
]

_NEG = -1e9  # added to the attention scores of padded keys


class Embeddings(nn.Module):
    """Token plus position embedding, ``(N, T) -> (N, T, D)``; the pad token embeds to 0."""

    def __init__(self, vocab: int, max_length: int, width: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, width, padding_idx=PAD_ID)
        self.position = nn.Embedding(max_length, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token(ids) + self.position(positions)[None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask, written out."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def weights_and_values(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights ``(N, heads, T, T)`` (rows: queries) and the values."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores + pad[:, None, None, :].to(scores.dtype) * _NEG
        return torch.softmax(scores, dim=-1), v

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        weights, v = self.weights_and_values(x, pad)
        n, t, d = x.shape
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.ReLU(), nn.Linear(mlp, width))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), pad)
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Token ids ``(N, T)`` (``PAD_ID`` = padding) -> logits ``(N, classes)``."""

    def __init__(
        self,
        vocab: int,
        max_length: int,
        width: int,
        layers: int,
        heads: int,
        mlp: int,
        classes: int,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.embeddings = Embeddings(vocab, max_length, width)
        self.blocks: nn.ModuleList = nn.ModuleList(Block(width, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == PAD_ID
        x = self.embeddings(ids)
        for block in self.blocks:
            x = block(x, pad)
        return self.pool(self.norm(x), pad)

    def pool(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Mean over the real tokens, then the classifier."""
        keep = (~pad).to(x.dtype)[..., None]
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)

    @torch.no_grad()
    def attention(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The attention weights of every block, ``(N, heads, T, T)`` each (rows: queries;
        padded keys get 0).  The model's output is not changed or computed."""
        pad = ids == PAD_ID
        x = self.embeddings(ids)
        maps = []
        for block in cast("list[Block]", list(self.blocks)):
            weights, _ = block.attn.weights_and_values(block.norm1(x), pad)
            maps.append(weights)
            x = block(x, pad)
        return maps


def text_weights_path() -> Path:
    """Where the trained weights of the text demo model ship inside the package."""
    return Path(str(resources.files("iba_torch") / "data" / "text_transformer.npz"))


def build_text_model(**overrides: int) -> TextTransformer:
    """The untrained model of :data:`TEXT_CONFIG` (``overrides`` change its sizes)."""
    config = {**TEXT_CONFIG, **overrides}
    unknown = set(config) - set(TEXT_CONFIG)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(TEXT_CONFIG)}")
    return TextTransformer(**config)


def text_model(weights: str | Path | None = None) -> TextTransformer:
    """The trained text demo model in eval mode (``weights``: another ``.npz`` to load)."""
    arrays = text_weights(weights if weights is not None else text_weights_path())
    model = build_text_model()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    return model.eval()
