"""Feature layouts: the engines work channels-first; a layer may produce channels-last.

A layer's layout is declared (``layout=``), or reported by the backend where the
framework says it for sure (:meth:`Backend.layer_layout`), or unknown (``None``).
Unknown is harmless for images, which stay channels-first as PyTorch makes them, but a
sequence ``(N, A, B)`` may be ``(N, C, T)`` (a 1-D convolution) or ``(N, T, C)`` (an
embedding, a transformer block): reading one as the other attributes along the wrong
axis without any sign of it, so such features are refused until the layout is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..contract._backend import LAYOUTS, Backend


def check_layout(layout: str, name: str = "layout") -> str:
    """``layout`` if it is one of :data:`iba_core.contract.LAYOUTS`, else a clear error."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")
    return layout


def layer_layout(backend: Backend, model: Any, layer: Any, layout: str | None) -> str | None:
    """The layout of ``layer``'s features: as given, else as the backend knows it, else
    ``None`` (unknown: channels-first images, refused sequences; see :func:`in_layout`)."""
    if layout is None and layer is not None:
        layout = backend.layer_layout(model, layer)
    return None if layout is None else check_layout(layout)


def unknown_sequence_layout(shape: tuple[Any, ...], label: str = "the bottleneck layer") -> ValueError:
    """The error for rank-3 features whose layout nobody declared."""
    dims = tuple(int(s) if s is not None else None for s in shape)
    return ValueError(
        f"{label} gives sequence features of shape {dims} and their layout is not known: "
        "(N, C, T) and (N, T, C) cannot be told apart, and reading one as the other "
        "attributes along the wrong axis. Pass layout='channels_last' for (N, T, C) "
        "features (embeddings, transformer blocks, linear layers) or "
        "layout='channels_first' for (N, C, T) features (Conv1d)"
    )


def in_layout(
    backend: Backend,
    hook: Callable[[Any], Any],
    layout: str | None,
    *,
    label: str = "the bottleneck layer",
    busy: Callable[[], bool] | None = None,
) -> Callable[[Any], Any]:
    """``hook`` (which works on channels-first features) for features in ``layout``.

    Channels-last features of rank 3 or more are permuted to ``(N, C, ...)`` for the hook
    and its replacement back to ``(N, ..., C)``; vectors ``(N, C)`` need nothing.  An
    unknown layout (``None``) passes images and vectors as channels-first and refuses
    sequences ``(N, A, B)`` with an error naming ``label`` and the fix; ``busy()`` (default:
    always) says whether the hook is at work, so that a bottleneck resting inside a model
    lets any features through.
    """
    if layout is None:

        def unknown_layout_hook(features: Any) -> Any:
            if features.ndim == 3 and (busy is None or busy()):
                raise unknown_sequence_layout(tuple(features.shape), label)
            return hook(features)

        return unknown_layout_hook
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
