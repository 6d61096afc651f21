"""Small Flax NNX models for the plugin's tests (layers are named submodules)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx


class Act(nnx.Module):
    """An activation as a submodule, so that it is a layer with a name."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, x: Any) -> Any:
        return self.fn(x)


class ConformanceNet(nnx.Module):
    """12x12x3 -> conv1(6) -> relu1 -> conv2(8, stride 2) -> act (tanh: 6x6x8, the
    bottleneck) -> drop (dropout 0.5) -> logits(5); channels-last like every Flax model."""

    def __init__(self, dtype: Any, seed: int = 0) -> None:
        rngs = nnx.Rngs(0)
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.conv1 = nnx.Conv(3, 6, (3, 3), padding="SAME", **kw)
        self.relu1 = Act(nnx.relu)
        self.conv2 = nnx.Conv(6, 8, (3, 3), strides=2, padding="SAME", **kw)
        self.act = Act(jnp.tanh)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.logits = nnx.Linear(6 * 6 * 8, 5, **kw)
        rng = np.random.default_rng(seed)
        for _, var in nnx.to_flat_state(nnx.state(self, nnx.Param)):
            var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape) * 0.3, dtype=dtype))

    def __call__(self, x: Any) -> Any:
        x = self.act(self.conv2(self.relu1(self.conv1(x))))
        return self.logits(self.drop(x).reshape(x.shape[0], -1))


class ReadoutNet(nnx.Module):
    """The readout suite's reference network (``readout_reference_weights``), channels-last:
    conv1 relu1 conv2 relu2 conv3 relu3, global average pooling, logits."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        rngs = nnx.Rngs(0)
        for i, (name, stride) in enumerate((("conv1", 1), ("conv2", 2), ("conv3", 2)), start=1):
            kernel = weights[f"{name}.weight"]  # (out, in, kh, kw)
            conv = nnx.Conv(kernel.shape[1], kernel.shape[0], (3, 3), strides=stride, padding=1, rngs=rngs)
            conv.kernel.set_value(jnp.asarray(kernel.transpose(2, 3, 1, 0)))
            conv.bias.set_value(jnp.asarray(weights[f"{name}.bias"]))
            setattr(self, name, conv)
            setattr(self, f"relu{i}", Act(nnx.relu))
        out, inp = weights["logits.weight"].shape
        self.logits = nnx.Linear(inp, out, rngs=rngs)
        self.logits.kernel.set_value(jnp.asarray(weights["logits.weight"].T))
        self.logits.bias.set_value(jnp.asarray(weights["logits.bias"]))

    def __call__(self, x: Any) -> Any:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.logits(x.mean(axis=(1, 2)))


SEQ_T, SEQ_C, SEQ_KEY, SEQ_VOCAB = 8, 4, 2, 10


class Proj(nnx.Module):
    """A per-position linear map of ``(N, T, 3)`` embeddings with a tanh, giving ``(N, T, C)``,
    or ``(N, C, T)`` with ``data_format = "channels_first"`` declared for the backend."""

    def __init__(self, w: np.ndarray, layout: str) -> None:
        self.w = nnx.Param(jnp.asarray(w, dtype=jnp.float32))  # (3, C)
        self.data_format = layout

    def __call__(self, h: Any) -> Any:
        y = jnp.tanh(h @ self.w[...])
        return jnp.swapaxes(y, 1, 2) if self.data_format == "channels_first" else y


class SequenceNet(nnx.Module):
    """Token ids (N, 8) -> embedding (N, 8, 3) -> 'proj' (N, 8, 4) or (N, 4, 8) -> position 2
    -> 5 logits; the same weights in both layouts."""

    def __init__(self, layout: str) -> None:
        rng = np.random.default_rng(5)
        self.emb = nnx.Embed(SEQ_VOCAB, 3, rngs=nnx.Rngs(0))
        self.emb.embedding.set_value(jnp.asarray(rng.standard_normal((SEQ_VOCAB, 3)), dtype=jnp.float32))
        self.proj = Proj(rng.standard_normal((3, SEQ_C)) * 1.2, layout)
        self.fc = nnx.Linear(SEQ_C, 5, rngs=nnx.Rngs(0))
        self.fc.kernel.set_value(jnp.asarray(rng.standard_normal((SEQ_C, 5)) * 3.0, dtype=jnp.float32))

    def __call__(self, ids: Any) -> Any:
        y = self.proj(self.emb(ids))
        return self.fc(y[:, :, SEQ_KEY] if self.proj.data_format == "channels_first" else y[:, SEQ_KEY])


def make_sequence_inputs(n: int, seed: int) -> Any:
    return jnp.asarray(np.random.default_rng(seed).integers(0, SEQ_VOCAB, (n, SEQ_T)))
