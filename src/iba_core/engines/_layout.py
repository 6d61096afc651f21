"""Feature layouts: the engines work channels-first; a layer may produce channels-last."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..contract._backend import LAYOUTS, Backend


def check_layout(layout: str, name: str = "layout") -> str:
    """``layout`` if it is one of :data:`iba_core.contract.LAYOUTS`, else a clear error."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")
    return layout


def layer_layout(backend: Backend, model: Any, layer: Any, layout: str | None) -> str:
    """The layout of ``layer``'s features: as given, else as the backend knows it, else
    channels-first."""
    if layout is None and layer is not None:
        layout = backend.layer_layout(model, layer)
    return check_layout(layout or "channels_first")


def in_layout(backend: Backend, hook: Callable[[Any], Any], layout: str) -> Callable[[Any], Any]:
    """``hook`` (which works on channels-first features) for features in ``layout``.

    Channels-last features of rank 3 or more are permuted to ``(N, C, ...)`` for the hook
    and its replacement back to ``(N, ..., C)``; vectors ``(N, C)`` need nothing.
    """
    if check_layout(layout) == "channels_first":
        return hook

    def channels_last_hook(features: Any) -> Any:
        rank = features.ndim
        if rank < 3:
            return hook(features)
        xp = backend.namespace()
        out = hook(xp.permute_dims(features, (0, rank - 1, *range(1, rank - 1))))
        return None if out is None else xp.permute_dims(out, (0, *range(2, rank), 1))

    return channels_last_hook
