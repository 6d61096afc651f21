"""Plotting of saliency maps (matplotlib, imported on use)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..math._xp import to_numpy


def _greyscale(img: Any) -> np.ndarray:
    img = np.asarray(to_numpy(img), dtype=np.float64)
    if img.ndim == 3:
        if img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
            img = np.moveaxis(img, 0, -1)  # (C, H, W) -> (H, W, C)
        img = img[..., :3].mean(axis=-1)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def plot_saliency_map(
    saliency_map: Any,
    img: Any = None,
    ax: Any = None,
    colorbar_label: str = "Bits / Pixel",
    colorbar_fontsize: int = 14,
    min_alpha: float = 0.2,
    max_alpha: float = 0.7,
    vmax: float | None = None,
    colorbar_size: float = 0.3,
    colorbar_pad: float = 0.08,
) -> Any:
    """Draw an ``(H, W)`` saliency map (bits per pixel), over a greyscale copy of ``img``.

    ``img`` may be ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``, NumPy or a framework tensor.
    The map's opacity grows with its value, from ``min_alpha`` to ``max_alpha``, so the
    image shows through where little information flows.  Returns the axes.
    """
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    smap = np.asarray(to_numpy(saliency_map), dtype=np.float64)
    if smap.ndim == 3 and smap.shape[0] == 1:
        smap = smap[0]
    if smap.ndim != 2:
        raise ValueError(f"saliency_map must be (H, W), got shape {smap.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    vmax = float(smap.max()) if vmax is None else float(vmax)
    vmax = vmax if vmax > 0 else 1.0
    cmap = plt.get_cmap("jet")
    rgba = cmap(np.clip(smap / vmax, 0.0, 1.0))
    if img is not None:
        grey = _greyscale(img)
        if grey.shape != smap.shape:
            raise ValueError(f"img {grey.shape} and saliency_map {smap.shape} differ in size")
        ax.imshow(grey, cmap="Greys_r", interpolation="nearest")
        rgba[..., 3] = min_alpha + (max_alpha - min_alpha) * np.clip(smap / vmax, 0.0, 1.0)
    ax.imshow(rgba, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    divider = make_axes_locatable(ax)
    cax = divider.append_axes("right", size=f"{colorbar_size * 10:.0f}%", pad=colorbar_pad)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin=0.0, vmax=vmax))
    cbar = ax.figure.colorbar(mappable, cax=cax)
    cbar.set_label(colorbar_label, fontsize=colorbar_fontsize)
    return ax
