"""Helpers kept for users of the reference library (``IBA.utils``, ``IBA.pytorch``).

Framework-agnostic: arrays of any supported library go in (NumPy, a PyTorch or
TensorFlow tensor, any Array API array); images and maps come back as NumPy, as they did
in the reference library.  ``iba_torch`` re-exports these names, so
``from iba_torch import tensor_to_np_img`` works where ``from IBA.pytorch import ...``
did.  See the migration guide (``docs/migration.md``) for every reference name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..math import saliency_map
from ..math._xp import namespace, to_numpy

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "tensor_to_np_img", "to_saliency_map", "to_unit_interval"]

#: Per-channel mean and standard deviation of the usual ImageNet preprocessing (RGB).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_unit_interval(x: Any) -> Any:
    """Scale ``x`` linearly so that its minimum is 0 and its maximum is 1.

    Works in the namespace of ``x`` (the result has the type and device of ``x``).  A
    constant ``x`` gives zeros, where the reference library divided by zero.
    """
    xp = namespace(x)
    lo = -xp.max(-x)  # only the namespace functions every backend provides
    span = xp.max(x) - lo
    return (x - lo) / span if float(span) > 0 else xp.zeros_like(x)


def to_saliency_map(
    capacity: Any, shape: Sequence[int] | None = None, data_format: str = "channels_first"
) -> np.ndarray:
    """Turn a capacity in nats into a saliency map in bits per pixel (NumPy).

    ``capacity`` is one input's ``(C, h, w)`` (or a batch ``(N, C, h, w)``) capacity, as
    ``iba.capacity()`` returns it; ``data_format="channels_last"`` reads ``(h, w, C)``
    (the reference library's TensorFlow layout).  The channels are summed, nats become
    bits, and with ``shape=(H, W)`` the map is resized bilinearly so that its total is
    kept: ``map.sum()`` is the total capacity in bits at any size.  Returns ``(H, W)``
    (or ``(N, H, W)``).
    """
    if data_format not in ("channels_first", "channels_last"):
        raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
    cap = np.asarray(to_numpy(capacity), dtype=np.float64)
    if cap.ndim not in (3, 4):
        raise ValueError(
            f"capacity must be (C, h, w) or (N, C, h, w) (channels first), got shape {cap.shape}"
        )
    single = cap.ndim == 3
    batch = cap[None] if single else cap
    if data_format == "channels_last":
        batch = np.moveaxis(batch, -1, 1)
    size = None if shape is None else tuple(int(s) for s in shape)
    if size is not None and len(size) != 2:
        raise ValueError(f"shape must be (height, width), got {shape!r}")
    out = np.asarray(saliency_map(batch, size))
    return out[0] if single else out


def tensor_to_np_img(
    img: Any, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Undo the per-channel normalisation of a ``(C, H, W)`` image; return ``(H, W, C)`` NumPy.

    ``img * std + mean`` per channel, with the ImageNet values by default (as in the
    reference library); pass the ``mean``/``std`` your own preprocessing used (one
    value, or one per channel).  The values are not clipped.
    """
    arr = np.asarray(to_numpy(img), dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"img must be one (C, H, W) image, got shape {arr.shape}; index the batch first")
    channels = arr.shape[0]
    stats = {}
    for name, value in (("mean", mean), ("std", std)):
        v = np.atleast_1d(np.asarray(value, dtype=np.float64))
        if v.ndim != 1 or v.size not in (1, channels):
            raise ValueError(f"{name} must have 1 or {channels} values (one per channel), got {v.size}")
        stats[name] = v.reshape(-1, 1, 1)
    return np.moveaxis(arr * stats["std"] + stats["mean"], 0, -1)
