"""A tiny third backend: array-api-strict tensors with finite-difference gradients.

It is registered from the tests through the plugin manager, the way any third-party
plugin's hook implementation is called, and proves that the core and the conformance
suite need nothing beyond the Array API and the Backend contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_strict as xp
import numpy as np

from iba_core import Backend, BackendSpec, hookimpl


class StrictModel:
    """A small classifier made of named layers, in pure array-api-strict.

    Input ``(N, 3, 6, 6)`` -> ``conv`` (1x1, 6 channels) -> ``relu`` -> ``pool`` (2x2
    average: ``(N, 6, 3, 3)``) -> ``flatten`` -> ``fc`` (5 logits).
    """

    def __init__(self, dtype: str = "float64", seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dtype = getattr(xp, dtype)
        self.w_conv = xp.asarray(rng.standard_normal((6, 3)) * 0.8, dtype=self.dtype)
        self.b_conv = xp.asarray(rng.standard_normal((6, 1, 1)) * 0.1, dtype=self.dtype)
        self.w_fc = xp.asarray(rng.standard_normal((54, 5)) * 0.3, dtype=self.dtype)
        self.layers: dict[str, Callable[[Any], Any]] = {
            "conv": self._conv,
            "relu": lambda x: xp.maximum(x, xp.zeros_like(x)),
            "pool": self._pool,
            "flatten": lambda x: xp.reshape(x, (x.shape[0], -1)),
            "fc": lambda x: xp.matmul(x, self.w_fc),
        }
        self.hooks: dict[str, list[Callable[[Any], Any]]] = {name: [] for name in self.layers}

    def _conv(self, x: Any) -> Any:
        y = xp.matmul(self.w_conv, xp.reshape(x, (x.shape[0], 3, -1)))
        return xp.reshape(y, (x.shape[0], 6, x.shape[2], x.shape[3])) + self.b_conv

    def _pool(self, x: Any) -> Any:
        n, c, h, w = x.shape
        return xp.mean(xp.reshape(x, (n, c, h // 2, 2, w // 2, 2)), axis=(3, 5))

    def __call__(self, x: Any) -> Any:
        for name, layer in self.layers.items():
            x = layer(x)
            for hook in list(self.hooks[name]):
                out = hook(x)
                if out is not None:
                    x = out
        return x


class StrictSequenceModel(StrictModel):
    """A small classifier of sequences whose logits depend on position ``KEY`` only.

    Input ``(N, 8, 3)`` -> ``proj`` (3 -> 4 channels, ``tanh``; ``(N, 4, 8)`` with
    ``layout="channels_first"``, ``(N, 8, 4)`` with ``"channels_last"``) -> ``pick``
    (position ``KEY``: ``(N, 4)``) -> ``fc`` (5 logits).  Both layouts compute the same.
    """

    T, C, KEY = 8, 4, 2

    def __init__(self, layout: str, dtype: str = "float32", seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dtype = getattr(xp, dtype)
        self.w_proj = xp.asarray(rng.standard_normal((3, self.C)) * 1.2, dtype=self.dtype)
        self.w_fc = xp.asarray(rng.standard_normal((self.C, 5)) * 3.0, dtype=self.dtype)
        first = layout == "channels_first"

        def proj(x: Any) -> Any:
            h = xp.tanh(xp.matmul(x, self.w_proj))
            return xp.permute_dims(h, (0, 2, 1)) if first else h

        self.layers = {
            "proj": proj,
            "pick": (lambda h: h[:, :, self.KEY]) if first else (lambda h: h[:, self.KEY, :]),
            "fc": lambda h: xp.matmul(h, self.w_fc),
        }
        self.hooks = {name: [] for name in self.layers}


class _Handle:
    def __init__(self, hooks: list[Any], hook: Any) -> None:
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        self._hooks[:] = [h for h in self._hooks if h is not self._hook]


class StrictBackend(Backend):
    name = "strict"
    modules = ("array_api_strict", "strict_backend")

    def namespace(self) -> Any:
        return xp

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.from_dlpack(x).copy()

    def from_numpy(self, a: np.ndarray, like: Any = None) -> Any:
        a = np.asarray(a)
        if like is not None and np.issubdtype(a.dtype, np.floating):
            return xp.asarray(a, dtype=like.dtype)
        return xp.asarray(a)

    def standard_normal(self, shape: tuple[int, ...], like: Any, generator: Any = None) -> Any:
        rng = generator if generator is not None else np.random.default_rng()
        return xp.asarray(rng.standard_normal(shape), dtype=like.dtype)

    def make_generator(self, seed: int, like: Any) -> Any:
        return np.random.default_rng(seed)

    def value_and_grad(self, fn: Callable[..., Any], param: Any, *operands: Any) -> tuple[float, Any]:
        """Central finite differences of ``fn(p, *operands)`` in ``p``, one pair of
        evaluations per parameter element; the operands are passed through unchanged."""
        base = self.to_numpy(param)
        value = float(self.to_numpy(fn(param, *operands)))
        grad = np.zeros(base.shape, dtype=np.float64)
        # The step balancing truncation and round-off error for central differences.
        rel = float(np.finfo(base.dtype).eps) ** (1 / 3)
        for idx in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += rel * max(1.0, abs(float(base[idx])))
            down[idx] -= rel * max(1.0, abs(float(base[idx])))
            h = (float(up[idx]) - float(down[idx])) / 2
            f_up = float(self.to_numpy(fn(self.from_numpy(up, like=param), *operands)))
            f_down = float(self.to_numpy(fn(self.from_numpy(down, like=param), *operands)))
            grad[idx] = (f_up - f_down) / (2 * h)
        return value, self.from_numpy(grad, like=param)

    def attach(self, model: Any, layer: Any, hook: Any, *, on_input: bool = False) -> Any:
        if on_input:
            raise NotImplementedError("the strict test backend hooks layer outputs only")
        if layer not in model.layers:
            raise LookupError(f"layer {layer!r} not found; layers are: {list(model.layers)}")

        def entry(x: Any) -> Any:  # one object per attach, so each handle removes its own
            return hook(x)

        model.hooks[layer].append(entry)
        return _Handle(model.hooks[layer], entry)

    def call(self, model: Any, x: Any) -> Any:
        return model(x)

    def layer_names(self, model: Any) -> list[str]:
        return list(model.layers)


class StrictPlugin:
    """What a third-party plugin module provides: one hook implementation."""

    @hookimpl
    def iba_register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(BackendSpec("strict", modules=StrictBackend.modules, loader=StrictBackend))
