"""Evaluation metrics for attribution maps, framework-agnostic (NumPy in, NumPy out).

The protocols of the IBA paper (``ALGORITHM.md``, "Evaluation protocols") and the usual
companions, each a function of saliency maps ``(N, H, W)`` as NumPy arrays:

* :func:`degradation_test`: tiles removed most-relevant-first (MoRF) and
  least-relevant-first (LeRF); the score is the area between the two curves.
* :func:`bounding_box_score` and :func:`pointing_game`: agreement with ground-truth boxes
  or masks.
* :func:`insertion_deletion`: pixels inserted into a blurred image / deleted from the
  image in order of attribution; area under each curve.
* :func:`sensitivity_n`: correlation between the attribution of random subsets of ``n``
  features and the output drop when the subset is removed.
* :func:`model_randomization` (with :func:`cascading_randomization` and
  :func:`spearman_correlation`): the sanity check of maps of the trained model against
  maps of models whose weights were randomised from the top layer down.

Models are called through their backend (``get_backend(model).call(model, x)``), in
inference mode (:meth:`Backend.frozen`) and in batches of ``batch_size`` images; a plain
callable that maps a NumPy batch to NumPy outputs works too (no backend is needed then).
Images are NumPy arrays in the model's own layout, ``(N, C, H, W)`` (PyTorch) or
``(N, H, W, C)`` (Keras): ``channel_axis`` says which, and by default it follows the
backend (``channels_last``) or is 1 for plain callables.  Randomising weights is
framework-specific, so the sanity check takes the randomised models from the caller.

Every function is deterministic for a given ``seed``; nothing here imports a framework.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ..contract._registry import find_backend, get_backend
from ..math._linear_ops import smoothing_matrix

__all__ = [
    "DegradationResult",
    "InsertionDeletionResult",
    "RandomizationResult",
    "SensitivityNResult",
    "bounding_box_score",
    "boxes_to_masks",
    "cascading_randomization",
    "degradation_test",
    "insertion_deletion",
    "model_randomization",
    "pointing_game",
    "sensitivity_n",
    "spearman_correlation",
    "target_scores",
]

_OUTPUTS = ("softmax", "raw")


# -- calling the model -------------------------------------------------------------------
class _Scorer:
    """The model's score of given target classes for NumPy batches in the model's layout.

    ``output="softmax"``: softmax of the model's logits at the target; ``"raw"``: the
    model's output at the target as it is (logits, or probabilities for a model that
    ends in softmax).
    """

    def __init__(
        self,
        model: Any,
        *,
        output: str,
        batch_size: int,
        backend: Any = None,
        like: Any = None,
        dtype: Any = np.float32,
    ) -> None:
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.output = output
        self.batch_size = int(batch_size)
        self.like = like
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.backend = get_backend(backend) if backend is not None else find_backend(model)
        if self.backend is None and not callable(model):
            raise TypeError(
                f"no iba backend handles models of type {type(model).__qualname__}, and it is "
                "not callable; pass a model of an installed backend, backend=..., or a function "
                "mapping a NumPy batch to NumPy outputs"
            )
        self.n_calls = 0

    @property
    def channels_last(self) -> bool:
        """The backend's declared image layout; plain callables take ``(N, C, H, W)``."""
        return self.backend is not None and self.backend.channels_last

    @contextlib.contextmanager
    def session(self) -> Iterator[_Scorer]:
        """The model in inference mode (backend's ``frozen``) for the duration."""
        if self.backend is None:
            yield self
            return
        with self.backend.frozen(self.model):
            yield self

    def _outputs(self, x: np.ndarray) -> np.ndarray:
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.astype(self.dtype)
        x = np.ascontiguousarray(x)
        self.n_calls += 1
        if self.backend is None:
            out = np.asarray(self.model(x))
        else:
            b = self.backend
            out = b.to_numpy(b.call(self.model, b.from_numpy(x, like=self.like)))
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model must return scores (batch, classes); for a batch of "
                f"{x.shape[0]} it returned shape {out.shape}"
            )
        return out.astype(np.float64)

    def __call__(self, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``(B,)`` scores of ``targets`` ``(B,)`` for inputs ``x`` ``(B, ...)``."""
        targets = np.asarray(targets, dtype=np.int64)
        scores = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), self.batch_size):
            stop = min(start + self.batch_size, len(x))
            out = self._outputs(x[start:stop])
            t = targets[start:stop]
            if t.min(initial=0) < 0 or t.max(initial=0) >= out.shape[1]:
                raise ValueError(
                    f"targets {np.unique(t).tolist()} out of range for a model with {out.shape[1]} outputs"
                )
            if self.output == "softmax":
                out = out - out.max(axis=1, keepdims=True)
                out = np.exp(out)
                out /= out.sum(axis=1, keepdims=True)
            scores[start:stop] = out[np.arange(stop - start), t]
        return scores


def _targets(targets: Any, n: int) -> np.ndarray:
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        if t.dtype.kind == "f" and np.all(t == np.round(t)):
            t = t.astype(np.int64)
        else:
            raise TypeError(f"targets must be class indices (integers), got dtype {t.dtype}")
    if t.size not in (1, n):
        raise ValueError(f"targets must be one class index or one per image ({n}), got {t.size}")
    return np.broadcast_to(t.astype(np.int64).reshape(-1), (n,)).copy()


def _channels_first(images: Any, channel_axis: int | None, scorer: _Scorer) -> tuple[np.ndarray, int]:
    """Images as ``(N, C, H, W)`` (a view) and the channel axis of the model's layout."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"images must be (N, C, H, W) or (N, H, W, C), got shape {images.shape}; "
            "add a channel axis for grayscale images"
        )
    if channel_axis is None:
        channel_axis = 3 if scorer.channels_last else 1
    channel_axis = int(channel_axis) % 4
    if channel_axis not in (1, 3):
        raise ValueError(f"channel_axis must be 1 (channels first) or -1 (channels last), got {channel_axis}")
    return np.moveaxis(images, channel_axis, 1), channel_axis


def _native(x: np.ndarray, channel_axis: int) -> np.ndarray:
    """``(B, C, H, W)`` back to the model's layout."""
    return x if channel_axis == 1 else np.moveaxis(x, 1, channel_axis)


def _maps(saliency: Any, n: int, hw: tuple[int, int]) -> np.ndarray:
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim == 2 and n == 1:
        s = s[None]
    if s.shape != (n, *hw):
        raise ValueError(
            f"saliency must be (N, H, W) = {(n, *hw)} like the images, got "
            f"{s.shape}; resize maps to the input size first"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("saliency maps contain NaN or infinite values")
    return s


def target_scores(
    model: Any,
    images: Any,
    targets: Any,
    *,
    output: str = "softmax",
    batch_size: int = 64,
    backend: Any = None,
    like: Any = None,
) -> np.ndarray:
    """The model's ``(N,)`` scores of the target classes, batched, in inference mode.

    ``model`` is a model of an installed backend (called as ``backend.call(model, x)``) or
    a function from a NumPy batch to NumPy outputs ``(B, K)``.  ``output="softmax"`` takes
    the softmax of the outputs (logits), ``"raw"`` the outputs as they are.  ``like``: a
    tensor on the model's device (inputs are made with ``from_numpy(x, like=like)``).
    """
    scorer = _Scorer(model, output=output, batch_size=batch_size, backend=backend, like=like)
    images = np.asarray(images)
    with scorer.session():
        return scorer(images, _targets(targets, len(images)))


# -- baselines and feature units ---------------------------------------------------------
def _baseline(spec: Any, images: np.ndarray, blur_sigma: float | None = None) -> np.ndarray:
    """Per-image baselines ``(N, C, H, W)`` for channels-first ``images``.

    ``"mean"``: each image's per-channel mean; ``"zero"``: zeros; ``"blur"``: the image
    smoothed with a Gaussian of std ``blur_sigma`` pixels; a number: that constant; an
    array broadcastable to ``(N, C, H, W)`` (channels first).
    """
    x = images.astype(np.float64)
    if isinstance(spec, str):
        if spec == "mean":
            return np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape)
        if spec == "zero":
            return np.zeros_like(x)
        if spec == "blur":
            h, w = x.shape[2:]
            sigma = float(blur_sigma) if blur_sigma is not None else max(h, w) / 45.0
            rows, cols = smoothing_matrix(h, sigma), smoothing_matrix(w, sigma)
            return np.einsum("ij,ncjk,lk->ncil", rows, x, cols, optimize=True)
        raise ValueError(f"baseline must be 'mean', 'zero', 'blur', a number or an array, got {spec!r}")
    b = np.asarray(spec, dtype=np.float64)
    try:
        return np.broadcast_to(b, x.shape)
    except ValueError:
        raise ValueError(
            f"baseline of shape {b.shape} does not broadcast to the images' channels-first shape {x.shape}"
        ) from None


def _tiles(hw: tuple[int, int], tile_size: int) -> tuple[np.ndarray, int]:
    """``(H*W,)`` tile index of every pixel (row-major tiles) and the number of tiles.

    Tiles are ``tile_size`` pixels square; at the right and bottom borders they may be
    cut short when the image size is not a multiple of ``tile_size``.
    """
    tile_size = int(tile_size)
    if tile_size < 1:
        raise ValueError(f"tile_size must be at least 1 pixel, got {tile_size}")
    h, w = hw
    n_cols = -(-w // tile_size)
    rows = np.arange(h) // tile_size
    cols = np.arange(w) // tile_size
    index = (rows[:, None] * n_cols + cols[None, :]).ravel()
    return index, int(-(-h // tile_size) * n_cols)


def _unit_attribution(saliency: np.ndarray, unit_index: np.ndarray, n_units: int) -> np.ndarray:
    """``(N, n_units)`` summed attribution per unit (tile or pixel)."""
    flat = saliency.reshape(len(saliency), -1)
    return np.stack([np.bincount(unit_index, weights=s, minlength=n_units) for s in flat])


def _rank_order(values: np.ndarray, descending: bool) -> np.ndarray:
    """Stable ordering of the last axis (ties keep row-major order)."""
    return np.argsort(-values if descending else values, axis=-1, kind="stable")


def _steps(n_units: int, n_steps: int | None) -> np.ndarray:
    """Numbers of units removed at each evaluated point, 0 .. n_units (evenly spaced)."""
    if n_steps is None or n_steps >= n_units:
        return np.arange(n_units + 1)
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    return np.unique(np.round(np.linspace(0, n_units, int(n_steps) + 1)).astype(np.int64))


def _perturbed(
    image: np.ndarray, fill: np.ndarray, order: np.ndarray, unit_index: np.ndarray, ks: np.ndarray
) -> np.ndarray:
    """``(len(ks), C, H, W)``: ``image`` with its first ``k`` units of ``order`` from ``fill``."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    pixel_rank = rank[unit_index].reshape(image.shape[1:])
    mask = pixel_rank[None, None] < ks[:, None, None, None]  # (S, 1, H, W)
    return np.where(mask, fill[None], image[None])


def _curves(
    scorer: _Scorer,
    images: np.ndarray,
    fills: np.ndarray,
    orders: Sequence[np.ndarray],
    unit_index: np.ndarray,
    ks: np.ndarray,
    targets: np.ndarray,
    channel_axis: int,
) -> list[np.ndarray]:
    """Score curves ``(N, len(ks))``, one per entry of ``orders`` (each ``(N, n_units)``).

    Perturbed images are built for a few images at a time, so that about ``batch_size``
    of them are in memory at once.
    """
    n = len(images)
    per_image = len(ks) * len(orders)
    group = max(1, scorer.batch_size // per_image)
    out = [np.empty((n, len(ks))) for _ in orders]
    for start in range(0, n, group):
        idx = range(start, min(start + group, n))
        stack = np.concatenate(
            [_perturbed(images[i], fills[i], o[i], unit_index, ks) for i in idx for o in orders]
        )
        t = np.repeat(targets[list(idx)], per_image)
        scores = scorer(_native(stack, channel_axis), t).reshape(len(idx), len(orders), len(ks))
        for j in range(len(orders)):
            out[j][list(idx)] = scores[:, j]
    return out


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.sum((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2.0, axis=-1)


# -- degradation -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DegradationResult:
    """Curves and scores of :func:`degradation_test`.

    Attributes:
        fractions: ``(S,)`` fraction of the tiles replaced at each point, 0 .. 1.
        morf: ``(N, S)`` target scores, most relevant tiles replaced first.
        lerf: ``(N, S)`` target scores, least relevant tiles replaced first.
        score: ``(N,)`` area between the curves, ``integral(lerf - morf)`` over the
            fraction (higher is better; in units of the score).
    """

    fractions: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray
    score: np.ndarray


def degradation_test(
    model: Any,
    images: Any,
    saliency: Any,
    targets: Any,
    *,
    tile_size: int = 8,
    n_steps: int | None = 20,
    baseline: Any = "mean",
    normalize: bool = False,
    output: str = "softmax",
    channel_axis: int | None = None,
    batch_size: int = 64,
    backend: Any = None,
    like: Any = None,
) -> DegradationResult:
    """The degradation test of the IBA paper: MoRF and LeRF curves and the area between.

    Each image is cut into ``tile_size`` x ``tile_size`` tiles, ranked by their summed
    attribution.  Tiles are replaced by ``baseline`` (default: the image's per-channel
    mean) in that order (MoRF) or the reverse (LeRF), and the target score (softmax
    probability, ``output="softmax"``) is recorded after each of ``n_steps`` evenly
    spaced fractions of the tiles (``None``: after every tile).  A faithful map makes
    the MoRF curve fall early and the LeRF curve late.  Ties keep row-major tile order.

    Args:
        model: a model of an installed backend, or a NumPy function ``(B, ...) -> (B, K)``.
        images: ``(N, C, H, W)`` or ``(N, H, W, C)`` NumPy, in the model's layout.
        saliency: ``(N, H, W)`` maps (any unit; higher = more relevant).
        targets: class index, or one per image.
        normalize: scale both curves of an image by its unperturbed score ``s0`` and its
            fully degraded score ``s1``, ``(s - s1) / (s0 - s1)``, so that areas of
            different images compare; off by default (raw scores, as in the paper).
        channel_axis: 1 (channels first) or -1 (channels last); default from the backend.
        batch_size: images per model call.
        backend, like: backend override, and a tensor on the model's device.

    Returns:
        :class:`DegradationResult`.
    """
    scorer = _Scorer(model, output=output, batch_size=batch_size, backend=backend, like=like)
    x, axis = _channels_first(images, channel_axis, scorer)
    n, hw = len(x), x.shape[2:]
    s = _maps(saliency, n, hw)
    t = _targets(targets, n)
    unit_index, n_tiles = _tiles(hw, tile_size)
    attribution = _unit_attribution(s, unit_index, n_tiles)
    ks = _steps(n_tiles, n_steps)
    fills = _baseline(baseline, x)
    with scorer.session():
        morf, lerf = _curves(
            scorer,
            x,
            fills,
            [_rank_order(attribution, True), _rank_order(attribution, False)],
            unit_index,
            ks,
            t,
            axis,
        )
    if normalize:
        top, bottom = morf[:, :1], morf[:, -1:]
        span = top - bottom
        span = np.where(np.abs(span) > 1e-12, span, np.nan)
        morf, lerf = (morf - bottom) / span, (lerf - bottom) / span
    fractions = ks / n_tiles
    return DegradationResult(fractions, morf, lerf, _trapezoid(lerf - morf, fractions))


# -- localisation ------------------------------------------------------------------------
def boxes_to_masks(boxes: Any, hw: tuple[int, int]) -> np.ndarray:
    """``(N, H, W)`` boolean masks of ``(N, 4)`` boxes ``(x0, y0, x1, y1)``, ends exclusive.

    Columns ``x0 <= x < x1`` and rows ``y0 <= y < y1`` (the convention of
    :func:`iba_core.apps.datasets.cluttered_digits`); boxes are clipped to the image.
    """
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) as (x0, y0, x1, y1), got shape {b.shape}")
    h, w = int(hw[0]), int(hw[1])
    rows, cols = np.arange(h), np.arange(w)
    in_rows = (rows[None, :] >= b[:, 1:2]) & (rows[None, :] < b[:, 3:4])
    in_cols = (cols[None, :] >= b[:, 0:1]) & (cols[None, :] < b[:, 2:3])
    return in_rows[:, :, None] & in_cols[:, None, :]


def _regions(regions: Any, n: int, hw: tuple[int, int]) -> np.ndarray:
    r = np.asarray(regions)
    if r.ndim == 2 and r.shape == (n, 4):
        return boxes_to_masks(r, hw)
    if r.ndim == 2 and n == 1 and r.shape == hw:
        r = r[None]
    if r.shape != (n, *hw):
        raise ValueError(
            f"give boxes (N, 4) as (x0, y0, x1, y1) or masks (N, H, W) = {(n, *hw)}, got shape {r.shape}"
        )
    return r.astype(bool)


def bounding_box_score(saliency: Any, boxes: Any) -> np.ndarray:
    """Fraction of the ``n`` highest-attributed pixels inside the box, ``n`` = box area.

    The bounding-box metric of the IBA paper.  ``boxes`` are ``(N, 4)`` ``(x0, y0, x1,
    y1)`` (ends exclusive) or boolean masks ``(N, H, W)`` (``n`` = mask area).  A map
    whose top ``n`` pixels cover the box scores 1; a constant or random map scores about
    ``n / (H * W)``.  Ties at the threshold are shared fairly: the score is the expected
    value when tied pixels are ordered at random, so it does not depend on pixel order.

    Returns:
        ``(N,)`` float64 in ``[0, 1]``.
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3:
        raise ValueError(f"saliency must be (N, H, W), got shape {s.shape}")
    masks = _regions(boxes, len(s), s.shape[1:])
    scores = np.empty(len(s))
    for i, (m, inside) in enumerate(zip(s.reshape(len(s), -1), masks.reshape(len(s), -1), strict=True)):
        n = int(inside.sum())
        if n == 0:
            raise ValueError(f"box/mask {i} is empty (or outside the {s.shape[1:]} map)")
        threshold = np.partition(m, m.size - n)[m.size - n]  # the n-th largest value
        above, tied = m > threshold, m == threshold
        need = n - int(above.sum())
        hits = float(np.sum(above & inside)) + need * float(np.sum(tied & inside)) / tied.sum()
        scores[i] = hits / n
    return scores


def pointing_game(saliency: Any, boxes: Any, *, tolerance: float = 0.0) -> np.ndarray:
    """Pointing game: 1 when the map's maximum lies in the box (or within ``tolerance``).

    ``boxes`` as in :func:`bounding_box_score`.  A hit is counted when the maximum pixel
    is at most ``tolerance`` pixels (Euclidean) from a pixel of the box or mask (the
    original protocol uses 15 px on 224 px images).  When several pixels share the
    maximum, the result is the fraction of them that hit (the expected hit for a random
    choice among them), so a constant map does not score by accident of pixel order.

    Returns:
        ``(N,)`` float64 in ``[0, 1]``; the mean is the pointing accuracy.
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3:
        raise ValueError(f"saliency must be (N, H, W), got shape {s.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    masks = _regions(boxes, len(s), s.shape[1:])
    hits = np.empty(len(s))
    for i in range(len(s)):
        inside = np.argwhere(masks[i])
        if len(inside) == 0:
            raise ValueError(f"box/mask {i} is empty (or outside the {s.shape[1:]} map)")
        peaks = np.argwhere(s[i] == s[i].max())
        d2 = ((peaks[:, None, :] - inside[None, :, :]) ** 2).sum(-1).min(axis=1)
        hits[i] = np.mean(d2 <= tolerance**2 + 1e-9)
    return hits


# -- insertion / deletion ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InsertionDeletionResult:
    """Curves and areas of :func:`insertion_deletion`.

    Attributes:
        fractions: ``(S,)`` fraction of the pixels inserted / deleted at each point.
        insertion: ``(N, S)`` target scores while pixels are inserted into the baseline,
            most relevant first.
        deletion: ``(N, S)`` target scores while pixels are deleted, most relevant first.
        insertion_auc: ``(N,)`` area under the insertion curve (higher is better).
        deletion_auc: ``(N,)`` area under the deletion curve (lower is better).
    """

    fractions: np.ndarray
    insertion: np.ndarray
    deletion: np.ndarray
    insertion_auc: np.ndarray
    deletion_auc: np.ndarray


def insertion_deletion(
    model: Any,
    images: Any,
    saliency: Any,
    targets: Any,
    *,
    n_steps: int | None = 32,
    tile_size: int = 1,
    deletion_baseline: Any = "zero",
    insertion_baseline: Any = "blur",
    blur_sigma: float | None = None,
    output: str = "softmax",
    channel_axis: int | None = None,
    batch_size: int = 64,
    backend: Any = None,
    like: Any = None,
) -> InsertionDeletionResult:
    """Insertion and deletion curves (RISE, Petsiuk et al. 2018) and their areas.

    Pixels (or ``tile_size`` tiles) are ranked by attribution.  *Deletion* replaces them,
    most relevant first, by ``deletion_baseline`` (default black, ``"zero"``);
    *insertion* starts from ``insertion_baseline`` (default the image blurred with a
    Gaussian of std ``blur_sigma`` px, default ``max(H, W) / 45``) and puts the
    original pixels back, most relevant first.  The target score is recorded at
    ``n_steps`` evenly spaced fractions (``None``: after every unit); the areas under
    the curves use the trapezoid rule over the fraction in ``[0, 1]``.  Baselines:
    ``"mean"``, ``"zero"``, ``"blur"``, a number or a channels-first array.  Other
    arguments as in :func:`degradation_test`.
    """
    scorer = _Scorer(model, output=output, batch_size=batch_size, backend=backend, like=like)
    x, axis = _channels_first(images, channel_axis, scorer)
    n, hw = len(x), x.shape[2:]
    s = _maps(saliency, n, hw)
    t = _targets(targets, n)
    unit_index, n_units = _tiles(hw, tile_size)
    order = _rank_order(_unit_attribution(s, unit_index, n_units), True)
    ks = _steps(n_units, n_steps)
    x64 = x.astype(np.float64)
    with scorer.session():
        (deletion,) = _curves(
            scorer, x64, _baseline(deletion_baseline, x, blur_sigma), [order], unit_index, ks, t, axis
        )
        # Insertion: the baseline with the first k units taken from the image.
        start = np.ascontiguousarray(_baseline(insertion_baseline, x, blur_sigma))
        (insertion,) = _curves(scorer, start, x64, [order], unit_index, ks, t, axis)
    fractions = ks / n_units
    return InsertionDeletionResult(
        fractions, insertion, deletion, _trapezoid(insertion, fractions), _trapezoid(deletion, fractions)
    )


# -- sensitivity-n -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SensitivityNResult:
    """Result of :func:`sensitivity_n`.

    Attributes:
        ns: ``(M,)`` subset sizes (numbers of pixels or tiles).
        correlation: ``(N, M)`` Pearson correlation, per image and subset size, between
            the summed attribution of a subset and the output drop when it is removed;
            NaN where either is constant over the subsets (e.g. a constant map).
        mean: ``(M,)`` mean correlation over the images (NaNs ignored).
    """

    ns: np.ndarray
    correlation: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        c = self.correlation
        counts = np.sum(np.isfinite(c), axis=0)
        sums = np.nansum(c, axis=0)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either input is constant."""

    def centred(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.max(np.abs(v), axis=-1)
        v = v - v.mean(axis=-1, keepdims=True)
        norm = np.sqrt(np.sum(v * v, axis=-1))
        # Round-off of a constant vector leaves a norm of about eps * scale * sqrt(n).
        return v, np.where(norm > 1e-12 * scale * np.sqrt(v.shape[-1]), norm, np.nan)

    a, na = centred(a)
    b, nb = centred(b)
    with np.errstate(invalid="ignore"):
        return np.clip(np.sum(a * b, axis=-1) / (na * nb), -1.0, 1.0)


def sensitivity_n(
    model: Any,
    images: Any,
    saliency: Any,
    targets: Any,
    *,
    ns: Sequence[int] = (1, 4, 16, 64),
    n_subsets: int = 64,
    tile_size: int = 1,
    baseline: Any = "zero",
    output: str = "raw",
    seed: int = 0,
    channel_axis: int | None = None,
    batch_size: int = 64,
    backend: Any = None,
    like: Any = None,
) -> SensitivityNResult:
    """Sensitivity-n (Ancona et al., ICLR 2018).

    For each image and each ``n`` in ``ns``, ``n_subsets`` random subsets of ``n``
    pixels (or ``tile_size`` tiles) are set to ``baseline``; the result is the Pearson
    correlation between each subset's summed attribution and the drop of the target
    output (``output="raw"``: the model's output, normally the logit, as in the paper).
    A map that satisfies sensitivity-n exactly (e.g. gradient x (input - baseline) for a
    linear model) scores 1 for every ``n``.  Subsets are drawn from ``seed`` and do not
    depend on ``batch_size``.  Other arguments as in :func:`degradation_test`.
    """
    scorer = _Scorer(model, output=output, batch_size=batch_size, backend=backend, like=like)
    x, axis = _channels_first(images, channel_axis, scorer)
    n_img, hw = len(x), x.shape[2:]
    s = _maps(saliency, n_img, hw)
    t = _targets(targets, n_img)
    unit_index, n_units = _tiles(hw, tile_size)
    ns_arr = np.asarray([int(k) for k in ns], dtype=np.int64)
    if ns_arr.size == 0 or ns_arr.min() < 1 or ns_arr.max() >= n_units:
        raise ValueError(
            f"every n must be in [1, {n_units - 1}] ({n_units} features of "
            f"{tile_size} px), got {ns_arr.tolist()}"
        )
    if int(n_subsets) < 2:
        raise ValueError(f"n_subsets must be at least 2 to compute a correlation, got {n_subsets}")
    attribution = _unit_attribution(s, unit_index, n_units)
    fills = _baseline(baseline, x)
    x64 = x.astype(np.float64)
    corr = np.empty((n_img, len(ns_arr)))
    with scorer.session():
        full = scorer(_native(x64, axis), t)
        for i in range(n_img):
            rng = np.random.default_rng([int(seed), i])
            # (M, n_subsets, n_units) membership of each subset
            members = np.zeros((len(ns_arr), int(n_subsets), n_units), dtype=bool)
            for j, k in enumerate(ns_arr):
                for r in range(int(n_subsets)):
                    members[j, r, rng.choice(n_units, size=int(k), replace=False)] = True
            flat = members.reshape(-1, n_units)
            pixel_masks = flat[:, unit_index].reshape(-1, 1, *hw)
            scores = np.empty(len(flat))
            step = max(1, scorer.batch_size)
            for start in range(0, len(flat), step):
                m = pixel_masks[start : start + step]
                stack = np.where(m, fills[i][None], x64[i][None])
                scores[start : start + step] = scorer(_native(stack, axis), np.full(len(stack), t[i]))
            drops = (full[i] - scores).reshape(len(ns_arr), int(n_subsets))
            sums = (flat.astype(np.float64) @ attribution[i]).reshape(len(ns_arr), int(n_subsets))
            corr[i] = _pearson(sums, drops)
    return SensitivityNResult(ns_arr, corr)


# -- model randomisation -----------------------------------------------------------------
def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their average rank."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    new_group = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(np.r_[new_group, True])
    average = 0.5 * (starts[:-1] + starts[1:] - 1) + 1.0
    ranks = np.empty(len(a))
    ranks[order] = average[group]
    return ranks


def spearman_correlation(a: Any, b: Any) -> np.ndarray:
    """Spearman rank correlation of maps ``a`` and ``b``, per image.

    ``a`` and ``b`` are ``(N, ...)`` (or single maps); each image's values are flattened
    and ranked (ties share the average rank).  Returns ``(N,)``; NaN for a constant map.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim <= 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    ra = np.stack([_rankdata(v) for v in a])
    rb = np.stack([_rankdata(v) for v in b])
    return _pearson(ra, rb)


@dataclasses.dataclass(frozen=True)
class RandomizationResult:
    """Result of :func:`model_randomization`.

    Attributes:
        names: the label of each randomisation stage, e.g. the last layer randomised.
        spearman: ``(S, N)`` rank correlation of each image's map after stage ``s`` with
            its map for the trained model (lower means the method depends on the weights).
        spearman_abs: the same on absolute values of the maps.
        maps: ``(S, N, H, W)`` the maps of the randomised models, or ``None``.
    """

    names: list[str]
    spearman: np.ndarray
    spearman_abs: np.ndarray
    maps: np.ndarray | None = None


def cascading_randomization(
    model: Any,
    layers: Sequence[str],
    randomize: Callable[[Any, str], None],
    *,
    copy: Callable[[Any], Any] = _copy.deepcopy,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(layer, model copy)`` with ``layers[:i + 1]`` randomised, for each ``i``.

    The cascading randomisation of Adebayo et al. (2018): give ``layers`` from the top
    (output) layer down.  Each stage is a fresh ``copy`` of the previous stage, so stages
    may be kept; ``model`` itself is never changed.  ``randomize(model_copy, layer)``
    re-initialises one layer in place; it is framework-specific, e.g. for PyTorch
    ``lambda m, name: m.get_submodule(name).reset_parameters()``.  For Keras give a
    ``copy`` such as ``lambda m: (c := keras.models.clone_model(m), c.set_weights(
    m.get_weights()))[0]``.
    """
    current = copy(model)
    for layer in layers:
        current = copy(current)
        randomize(current, layer)
        yield layer, current


def model_randomization(
    explain: Callable[[Any, np.ndarray, np.ndarray], Any],
    model: Any,
    randomized: Iterable[tuple[str, Any]],
    images: Any,
    targets: Any,
    *,
    keep_maps: bool = False,
) -> RandomizationResult:
    """The model-randomisation sanity check (Adebayo et al., NeurIPS 2018).

    ``explain(model, images, targets) -> (N, H, W)`` maps of any method.  Its maps for
    the trained ``model`` are compared, image by image, with its maps for each model of
    ``randomized`` (``(name, model)`` pairs, e.g. from :func:`cascading_randomization`)
    by Spearman rank correlation.  A method whose maps explain the model should lose the
    correlation as more layers are randomised; a method that ignores the model (an edge
    detector) keeps it at 1.  Randomising weights is framework-specific, which is why the
    models are the caller's to make.
    """
    images = np.asarray(images)
    t = _targets(targets, len(images))
    reference = np.asarray(explain(model, images, t), dtype=np.float64)
    names, rho, rho_abs, maps = [], [], [], []
    for name, randomized_model in randomized:
        m = np.asarray(explain(randomized_model, images, t), dtype=np.float64)
        if m.shape != reference.shape:
            raise ValueError(
                f"explain returned shape {m.shape} for stage {name!r}, but "
                f"{reference.shape} for the trained model"
            )
        names.append(str(name))
        rho.append(spearman_correlation(reference, m))
        rho_abs.append(spearman_correlation(np.abs(reference), np.abs(m)))
        if keep_maps:
            maps.append(m)
    if not names:
        raise ValueError("randomized gave no models; pass (name, model) pairs")
    return RandomizationResult(names, np.stack(rho), np.stack(rho_abs), np.stack(maps) if keep_maps else None)
