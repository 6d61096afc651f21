"""Framework-free parts of ``iba demo`` / ``iba explain``: the figures.

NumPy only; matplotlib is imported on use (Agg, so no display is needed).  The demo
scores maps with :func:`iba_core.apps.metrics.bounding_box_score`; :func:`top_n_in_box` is a
plain, independent implementation of the same score, kept as a reference for tests.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The layer of the demo CNN (in every backend) the demo puts the bottleneck on.
DEMO_LAYER = "features.relu3"


def demo_weights(path: Any) -> dict[str, np.ndarray]:
    """The demo CNN's weights from an ``.npz`` file (each backend ships its own layout)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo CNN's weights are missing ({path}); reinstall iba or run scripts/train_demo_models.py"
        )
    with np.load(path) as data:
        return {k: np.array(data[k]) for k in data.files}


def top_n_in_box(saliency: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of the ``n`` highest-attributed pixels that lie inside the box (reference).

    The bounding-box score of the IBA paper: ``n`` is the box's area in pixels, so a map
    that puts its ``n`` largest values exactly on the box scores 1, and a random map
    scores about ``n / (H * W)``.  Ties are broken by pixel order (row-major).  Use
    :func:`iba_core.apps.metrics.bounding_box_score`, which shares ties fairly; this loop is an
    independent reference for its tests.

    Args:
        saliency: ``(N, H, W)`` maps (any unit).
        boxes: ``(N, 4)`` integer ``(x0, y0, x1, y1)``, columns ``x0 <= x < x1`` and rows
            ``y0 <= y < y1``.

    Returns:
        ``(N,)`` float64 in ``[0, 1]``.
    """
    saliency = np.asarray(saliency, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.int64)
    if saliency.ndim != 3 or boxes.shape != (saliency.shape[0], 4):
        raise ValueError(f"expected maps (N, H, W) and boxes (N, 4), got {saliency.shape} and {boxes.shape}")
    n_img, h, w = saliency.shape
    scores = np.zeros(n_img)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        x0, x1 = max(int(x0), 0), min(int(x1), w)
        y0, y1 = max(int(y0), 0), min(int(y1), h)
        n = max(x1 - x0, 0) * max(y1 - y0, 0)
        if n == 0:
            raise ValueError(f"box {i} {boxes[i].tolist()} is empty or outside the {h}x{w} map")
        inside = np.zeros((h, w), dtype=bool)
        inside[y0:y1, x0:x1] = True
        top = np.argsort(-saliency[i].ravel(), kind="stable")[:n]
        scores[i] = inside.ravel()[top].mean()
    return scores


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib comes with the extras
        raise ImportError("figures need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


#: Colour of the ground-truth box, on the image and on the map alike: magenta is neither a
#: grey of the image nor a colour of the map's "jet" scale.
BOX_COLOR = "magenta"


def _draw_box(ax: Any, box: Sequence[int], color: str = BOX_COLOR) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (int(v) for v in box)
    ax.add_patch(
        Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5)
    )


def _png_bytes(fig: Any, dpi: int) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def demo_figure(
    images: np.ndarray,
    maps: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    box_scores: np.ndarray,
    *,
    columns: int = 4,
    title: str | None = None,
    dpi: int = 100,
    shared_scale: bool = False,
) -> bytes:
    """The demo's figure as PNG bytes: per image, the input with its box, then the map.

    ``images`` ``(N, 1, H, W)`` or ``(N, H, W)``; ``maps`` ``(N, H, W)`` in bits per pixel.
    Each image takes two panels, one above the other: the input with the ground-truth box
    (title: true and predicted class), and the saliency map over it (title: total bits
    and the fraction of the top-n pixels inside the box).  The box has the same colour
    (:data:`BOX_COLOR`) on both.  Each map's colour scale runs from 0 to its own maximum,
    or, with ``shared_scale=True``, to the maximum over all maps, so that colours compare
    across images.
    """
    from .plotting import plot_saliency_map

    plt = _pyplot()
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    n = len(images)
    vmax = float(np.max(maps)) if shared_scale and np.size(maps) else None
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.1 * cols, 5.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        top.axis("on")
        top.imshow(images[i], cmap="Greys_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        top.set_xticks([])
        top.set_yticks([])
        _draw_box(top, boxes[i], color=BOX_COLOR)
        ok = int(predicted[i]) == int(labels[i])
        top.set_title(
            f"digit {int(labels[i])}, predicted {int(predicted[i])}",
            fontsize=10,
            color="black" if ok else "red",
        )
        bottom.axis("on")
        plot_saliency_map(
            maps[i],
            images[i],
            ax=bottom,
            colorbar_label="bits / pixel",
            colorbar_fontsize=8,
            colorbar_size=0.5,
            vmax=vmax,
        )
        _draw_box(bottom, boxes[i], color=BOX_COLOR)
        bottom.set_title(f"{float(maps[i].sum()):.1f} bits, {box_scores[i]:.0%} in box", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png_bytes(fig, dpi)


def overlay_figure(saliency: np.ndarray, image: np.ndarray, title: str, dpi: int = 100) -> bytes:
    """One saliency map over its input image, as PNG bytes (for ``iba explain``)."""
    from .plotting import plot_saliency_map

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    plot_saliency_map(saliency, image, ax=ax, colorbar_fontsize=10)
    ax.set_title(title, fontsize=10)
    return _png_bytes(fig, dpi)
