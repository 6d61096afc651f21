"""Attention masks in the estimation: padded positions stay out of the feature statistics.

An estimate reads batches of model inputs.  A batch of sequences may carry its attention
mask ``(B, T)`` (1 = real token, 0 = padding) as a :class:`MaskedBatch`; every estimation
loop (:func:`~iba_core.engines.estimate_loop`, one process or data-parallel) records the
layer's features of ``batch.inputs`` and updates the estimate with the mask spread over
the channels, so each position's mean and std are taken over the sequences in which it is
real.  The fronts build these batches from the user's data (see
:func:`~iba_core.engines._front.estimation_batches`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..contract._backend import Backend
from ..math._estimator import Estimator


class MaskedBatch(NamedTuple):
    """A batch of model inputs ``(B, T, ...)`` and its attention mask ``(B, T)`` (NumPy or
    the backend's type; 1/True = real token, 0/False = padding).  The model is run on
    ``inputs`` alone; the mask only decides which positions enter the statistics."""

    inputs: Any
    attention_mask: Any


class UnseenPositionsWarning(UserWarning):
    """Some positions of a sequence layer were padding in every sequence estimated, so the
    estimate holds no statistics of their own (they get their channel's, pooled over all
    real positions)."""


def padding_mask(backend: Backend, attention_mask: Any, n: int) -> np.ndarray:
    """An attention mask ``(N, T)`` (NumPy or the backend's type; 1/True = real token,
    0/False = padding) checked and as a float64 NumPy array of 0 and 1."""
    if hasattr(attention_mask, "shape") and not isinstance(attention_mask, np.ndarray):
        attention_mask = backend.to_numpy(attention_mask)
    a = np.asarray(attention_mask)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"attention_mask must hold 0/1 or booleans, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] != n:
        raise ValueError(
            f"attention_mask must have shape (N, T) = ({n}, T): one row per input, one entry "
            f"per position (1 = real token, 0 = padding); got shape {a.shape}"
        )
    if not np.all((a == 0) | (a == 1)):
        raise ValueError("attention_mask must hold only 0/1 (or False/True): 1 = real token, 0 = padding")
    empty = np.flatnonzero(a.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"attention_mask marks no real token in input(s) {empty.tolist()}; every input needs at least one"
        )
    return a.astype(np.float64)


def check_sequence_mask(
    padding_shape: tuple[int, ...], features_shape: tuple[int, ...], action: str, unit: str, hint: str = ""
) -> None:
    """Refuse an attention mask ``(N, T)`` that does not fit the layer's channels-first
    features ``(N, C, T)``: features that are not sequences, or another number of rows or
    positions.  ``action`` (``"explain"``, ``"estimate"``) and ``unit`` (``"input"``,
    ``"sequence"``) word the error; ``hint`` is added to the second one."""
    if len(features_shape) != 3:
        raise ValueError(
            f"attention_mask= needs sequence features (N, C, T) or (N, T, C); the layer gives "
            f"features of shape {features_shape} (channels first); {action} without a mask, or "
            "put the bottleneck on a sequence layer"
        )
    n, _, t = features_shape
    if tuple(padding_shape) != (n, t):
        raise ValueError(
            f"attention_mask has shape {tuple(padding_shape)} but the layer's sequence features "
            f"are {features_shape} (channels first): the mask needs one entry per {unit} and "
            f"position of the layer, shape ({n}, {t}){hint}"
        )


def checked_padding(backend: Backend, attention_mask: Any, n: int, where: str) -> np.ndarray:
    """``attention_mask`` for ``n`` sequences checked (shape ``(n, T)``, only 0/1, a real
    token in every row) as float64 NumPy; errors start with ``where``."""
    try:
        return padding_mask(backend, attention_mask, n)
    except ValueError as exc:
        hint = (
            " (leave sequences without real tokens out of the estimation data)"
            if "no real token" in str(exc)
            else ""
        )
        raise ValueError(f"{where}: {exc}{hint}") from None


def with_inputs(batch: Any, convert: Callable[[Any], Any]) -> Any:
    """``convert(batch)``, or for a :class:`MaskedBatch` the batch with converted inputs."""
    if isinstance(batch, MaskedBatch):
        return batch._replace(inputs=convert(batch.inputs))
    return convert(batch)


def record_masked(
    backend: Backend, record: Callable[[Any], list[Any]], batch: Any
) -> list[tuple[Any, np.ndarray | None]]:
    """``record(batch)`` (one feature array per estimate) paired with each array's element
    mask: ``None`` for a plain batch; for a :class:`MaskedBatch` the mask is checked before
    the model runs, then spread over the channels of each channels-first feature array
    ``(B, C, T)`` as ``(B, 1, T)``."""
    if not isinstance(batch, MaskedBatch):
        return [(f, None) for f in record(batch)]
    shape = tuple(getattr(batch.inputs, "shape", ()))
    if len(shape) < 1:
        raise ValueError(
            f"a MaskedBatch's inputs must be a batch (B, T, ...), got {type(batch.inputs).__name__}"
        )
    padding = checked_padding(backend, batch.attention_mask, int(shape[0]), "a batch's attention_mask")
    return [(f, _element_mask(padding, f)) for f in record(batch.inputs)]


def _element_mask(padding: np.ndarray, features: Any) -> np.ndarray:
    """The padding ``(B, T)`` as a mask ``(B, 1, T)`` of channels-first features ``(B, C, T)``."""
    hint = (
        "; a layer that changes the sequence length (pooling, strides) cannot be estimated "
        "with the inputs' mask"
    )
    check_sequence_mask(padding.shape, tuple(int(s) for s in features.shape), "estimate", "sequence", hint)
    return padding[:, None, :]


def warn_unseen(estimators: Sequence[Estimator], stacklevel: int) -> None:
    """Warn (:class:`UnseenPositionsWarning`) for each estimate with positions that were
    padding in every sequence it saw; ``stacklevel`` counts from the caller."""
    for est in estimators:
        if est.n == 0 or est.shape is None or len(est.shape) < 2:
            continue
        unseen = est.counts() == 0
        if not unseen.any():
            continue
        positions = np.flatnonzero(unseen.reshape(unseen.shape[0], -1).any(axis=0))
        shown = positions.tolist() if positions.size <= 12 else [*positions[:12].tolist(), "..."]
        layer = f" of layer {est.layer!r}" if est.layer is not None else ""
        warnings.warn(
            f"{positions.size} position(s){layer} were padding in every sequence estimated "
            f"(positions {shown}); analyze() gives them each channel's statistics over all real "
            "positions. Estimate on data with real tokens there (e.g. texts as long as the "
            "ones you explain) to give them statistics of their own",
            UnseenPositionsWarning,
            stacklevel=stacklevel + 1,
        )
