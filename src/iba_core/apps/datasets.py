"""Small data sets with ground truth for demos and tests (NumPy only).

:func:`cluttered_digits` builds images with one real handwritten digit (from
scikit-learn's bundled ``load_digits``, so nothing is downloaded) among fragments of
other digits and noise.  The label is the digit; its bounding box is the ground truth a
good attribution map should point at.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from ..math._linear_ops import bilinear_matrix

__all__ = ["ClutteredDigits", "cluttered_digits", "load_digits_split"]

#: Source digits per split: a fixed permutation of the 1,797 ``load_digits`` images,
#: the first ``_N_TRAIN`` for training, the rest for testing; no handwriting is shared.
_N_TRAIN = 1200
_SPLIT_SEED = 20200107
_SPLITS = ("train", "test")
#: Intensity (in [0, 1]) above which a pixel of the scaled digit counts as ink: any
#: visible pixel (the contrast stretch in ``_scale`` sets the faint blur to exactly 0).
_INK = 0.0


class ClutteredDigits(NamedTuple):
    """Images, labels and ground-truth boxes of :func:`cluttered_digits`.

    Attributes:
        images: ``(N, 1, H, W)`` float32 in ``[0, 1]`` (channels first; use
            ``np.moveaxis(images, 1, -1)`` for channels last).
        labels: ``(N,)`` int64, the target digit 0..9.
        boxes: ``(N, 4)`` int64 ``(x0, y0, x1, y1)``: columns ``x0 <= x < x1`` and rows
            ``y0 <= y < y1`` hold the target digit's ink (``image[0, y0:y1, x0:x1]``).
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the cluttered-digits data is built from scikit-learn's bundled digits: "
            "pip install scikit-learn (it comes with the 'torch' and 'tf' extras of iba)"
        ) from exc
    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float64) / 16.0).clip(0.0, 1.0)
    labels = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(M, 8, 8)`` source digits in ``[0, 1]`` and their labels for one split.

    ``split`` is ``"train"`` (1,200 digits) or ``"test"`` (597 digits); the split is fixed,
    independent of any seed.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    images, labels = _digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    idx = order[:_N_TRAIN] if split == "train" else order[_N_TRAIN:]
    return images[idx], labels[idx]


def _scale(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upscaling of an ``(8, 8)`` digit to ``(height, width)``, contrast-stretched."""
    rows = bilinear_matrix(height, digit.shape[0])
    cols = bilinear_matrix(width, digit.shape[1])
    # A contrast stretch turns the blur of upscaling back into strokes.
    return np.clip((rows @ digit @ cols.T - 0.15) / 0.6, 0.0, 1.0)


def _ink_box(patch: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of the ink (non-zero pixels), or ``None``."""
    ys, xs = np.nonzero(patch > _INK)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (
        a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]
    )


def cluttered_digits(
    n: int = 1000,
    *,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    scale: tuple[float, float] = (2.4, 3.4),
    n_clutter: int = 6,
    noise: float = 0.05,
) -> ClutteredDigits:
    """``n`` images, each with one handwritten digit among clutter, and its ground truth.

    Every image holds one *target* digit of the split (``load_digits``, 8x8 px) scaled up by
    a random factor in ``scale`` (slightly different per axis) at a random position, plus
    up to ``n_clutter`` *fragments*: random crops (a third to a half of each side) of other
    digits, scaled alike and placed so that they do not touch the target's box.  Gaussian
    pixel noise of std ``noise`` is added and values are clipped to ``[0, 1]``.

    Args:
        n: number of images.
        split: ``"train"`` or ``"test"``; the two draw on disjoint handwritten digits
            (see :func:`load_digits_split`), so a model trained on one is tested on
            unseen handwriting.
        seed: the result is a pure function of ``(n, split, seed, ...)``; the first ``k``
            images do not depend on ``n``.
        size: side of the square images in pixels (at least 32).
        scale: range of the upscaling factor of the 8x8 digits.
        n_clutter: maximum number of fragments per image.
        noise: std of the additive Gaussian pixel noise.

    Returns:
        :class:`ClutteredDigits` ``(images (N, 1, size, size) float32, labels (N,) int64,
        boxes (N, 4) int64 as (x0, y0, x1, y1))``.
    """
    n = int(n)
    lo, hi = _checked_scale(n, split, scale, size, n_clutter, noise)
    digits, digit_labels = load_digits_split(split)
    images = np.zeros((n, 1, size, size), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    boxes = np.zeros((n, 4), dtype=np.int64)
    split_id = _SPLITS.index(split)
    for i in range(n):
        # One stream per image: image i is the same whatever n is.
        rng = np.random.default_rng([int(seed), split_id, i])
        canvas = np.zeros((size, size), dtype=np.float64)
        k, box = _place_target(rng, canvas, digits, lo, hi)
        for _ in range(int(rng.integers(n_clutter // 2, n_clutter + 1))):
            _place_fragment(rng, canvas, digits, lo, hi, box)
        if noise > 0:
            canvas += rng.normal(0.0, noise, size=canvas.shape)
        images[i, 0] = np.clip(canvas, 0.0, 1.0)
        labels[i] = digit_labels[k]
        boxes[i] = box
    return ClutteredDigits(images, labels, boxes)


def _checked_scale(
    n: int, split: str, scale: tuple[float, float], size: int, n_clutter: int, noise: float
) -> tuple[float, float]:
    """The scale range ``(lo, hi)``, once the arguments of :func:`cluttered_digits` are checked."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    lo, hi = float(scale[0]), float(scale[1])
    if not 1.0 <= lo <= hi:
        raise ValueError(f"scale must be a range (lo, hi) with 1 <= lo <= hi, got {scale!r}")
    if size < 32 or size < int(np.ceil(8 * hi * 1.1)) + 2:
        raise ValueError(f"size {size} is too small for digits scaled up to {hi}x (8 px each)")
    if n_clutter < 0 or noise < 0:
        raise ValueError("n_clutter and noise must be >= 0")
    return lo, hi


def _place_target(
    rng: np.random.Generator, canvas: np.ndarray, digits: np.ndarray, lo: float, hi: float
) -> tuple[int, tuple[int, int, int, int]]:
    """Draw the target digit into ``canvas`` at a random scale and position: its index in
    ``digits`` and the box ``(x0, y0, x1, y1)`` of its ink."""
    size = canvas.shape[0]
    k = int(rng.integers(len(digits)))
    s = rng.uniform(lo, hi)
    h = round(8 * s)
    w = round(8 * s * rng.uniform(0.9, 1.1))
    patch = _scale(digits[k], h, w)
    y, x = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
    canvas[y : y + h, x : x + w] = patch
    ink = _ink_box(patch)
    assert ink is not None  # every load_digits digit has ink
    return k, (x + ink[0], y + ink[1], x + ink[2], y + ink[3])


def _place_fragment(
    rng: np.random.Generator,
    canvas: np.ndarray,
    digits: np.ndarray,
    lo: float,
    hi: float,
    box: tuple[int, int, int, int],
) -> None:
    """Draw a random crop of a random digit into ``canvas`` where its ink keeps 2 px
    away from ``box`` (up to 10 tries; none if it never fits or the crop has no ink)."""
    size = canvas.shape[0]
    j = int(rng.integers(len(digits)))
    s = rng.uniform(lo, hi)
    full = _scale(digits[j], round(8 * s), round(8 * s * rng.uniform(0.9, 1.1)))
    fh = int(rng.integers(full.shape[0] // 3, full.shape[0] // 2 + 1))
    fw = int(rng.integers(full.shape[1] // 3, full.shape[1] // 2 + 1))
    fy = int(rng.integers(full.shape[0] - fh + 1))
    fx = int(rng.integers(full.shape[1] - fw + 1))
    frag = full[fy : fy + fh, fx : fx + fw]
    frag_ink = _ink_box(frag)
    if frag_ink is None:
        return
    for _try in range(10):
        py, px = int(rng.integers(size - fh + 1)), int(rng.integers(size - fw + 1))
        placed = (px + frag_ink[0], py + frag_ink[1], px + frag_ink[2], py + frag_ink[3])
        if not _overlaps(placed, box, margin=2):
            region = canvas[py : py + fh, px : px + fw]
            np.maximum(region, frag, out=region)
            return
