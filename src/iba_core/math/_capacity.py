"""The bottleneck's math: mask, noise injection, capacity, saliency map.

Feature maps are channels-first with a leading batch axis: ``(N, C)``, ``(N, C, T)`` or
``(N, C, h, w)``.  Per-element statistics (``mean``, ``std``, ``active``) have the shape
of one sample, ``(C, ...)``, and broadcast over the batch.
"""

from __future__ import annotations

import math
from typing import Any

from ._linear_ops import gaussian_smooth, resize_bilinear
from ._xp import namespace, sigmoid_pair

LN2 = math.log(2.0)


def _n_spatial(x: Any) -> int:
    return x.ndim - 2


def restriction_mask(
    alpha: Any, sigma: float | None = 1.0, operands: tuple[Any, ...] | None = None
) -> tuple[Any, Any]:
    """Smoothed mask ``lambda = smooth(sigmoid(alpha))`` and its complement.

    ``alpha`` has shape ``(N, C, ...)``.  Returns ``(lambda, 1 - lambda)``.  Both are
    computed from sigmoids (``1 - lambda = smooth(sigmoid(-alpha))``, which is exact
    because the smoothing kernel sums to 1), so the complement keeps full relative
    precision even when ``lambda`` rounds to 1.  ``operands``: precomputed smoothing
    operands (:func:`iba_core.smoothing_operands`).
    """
    xp = namespace(alpha)
    n = _n_spatial(alpha)
    lam, one_minus = sigmoid_pair(xp, alpha)
    return (gaussian_smooth(lam, sigma, n, operands), gaussian_smooth(one_minus, sigma, n, operands))


def _log_one_minus(alpha: Any, one_minus: Any, sigma: float | None) -> Any:
    """``log(1 - lambda)``; exactly ``-softplus(alpha)`` when there is no smoothing."""
    xp = namespace(alpha)
    if not sigma or _n_spatial(alpha) == 0:
        return -xp.logaddexp(xp.zeros_like(alpha), alpha)
    # Smoothing positive sigmoids keeps them positive; only an underflow to 0 (alpha far
    # above 80 everywhere around) needs the guard.  Adding the smallest normal number
    # changes nothing else, and differentiates more cheaply than a maximum.
    return xp.log(one_minus + float(_finfo_tiny(xp, alpha.dtype)))


def _finfo_tiny(xp: Any, dtype: Any) -> float:
    try:
        return float(xp.finfo(dtype).smallest_normal)
    except AttributeError:
        return float(xp.finfo(dtype).tiny)


def capacity(
    features: Any,
    alpha: Any,
    mean: Any,
    std: Any,
    *,
    active: Any | None = None,
    sigma: float | None = 1.0,
) -> Any:
    """Information that passes the bottleneck, per feature element, in nats.

    This is ``KL(N(lambda * r, (1 - lambda)^2) || N(0, 1))`` with ``r = (R - mu) / sigma``:
    ``0.5 * (m^2 + v - 1) - log(1 - lambda)`` with ``m = lambda * r``, ``v = (1 - lambda)^2``.

    Args:
        features: ``R``, shape ``(N, C, ...)``.
        alpha: mask logits, shape ``(N, C, ...)`` (or broadcastable to it).
        mean, std: per-element feature statistics, shape ``(C, ...)``; ``std`` already
            clamped to its minimum.
        active: optional ``(C, ...)`` 0/1 mask of elements that carry information;
            inactive elements get zero capacity.
        sigma: std of the Gaussian that smooths the mask, in feature-map pixels; 0 or
            ``None`` disables smoothing.

    Returns:
        Array of shape ``(N, C, ...)``, non-negative, in nats.
    """
    xp = namespace(features, alpha)
    alpha = xp.broadcast_to(alpha, features.shape)
    lam, one_minus = restriction_mask(alpha, sigma)
    return capacity_from_mask((features - mean) / std, alpha, lam, one_minus, active, sigma)


def capacity_from_mask(
    r: Any, alpha: Any, lam: Any, one_minus: Any, active: Any, sigma: float | None, *, clip: bool = True
) -> Any:
    """:func:`capacity` from normalised features ``r = (R - mean) / std`` and the mask
    pair of :func:`restriction_mask` (for loops that reuse ``r`` across steps).

    ``clip=False`` leaves the few ulps of round-off below zero in place (a loss term
    needs no clipping; reported capacities do)."""
    xp = namespace(r)
    m = lam * r
    cap = 0.5 * (m * m + one_minus * one_minus - 1.0) - _log_one_minus(alpha, one_minus, sigma)
    if clip:
        # The KL is >= 0 analytically; clip the few ulps of round-off below zero.
        cap = xp.maximum(cap, xp.zeros_like(cap))
    if active is not None:
        cap = cap * xp.astype(active, cap.dtype)
    return cap


def capacity_partials(
    r: Any, alpha: Any, lam: Any, one_minus: Any, active: Any, sigma: float | None
) -> tuple[Any, Any, Any, Any]:
    """:func:`capacity_from_mask` (unclipped) with its partial derivatives, for a step
    that chains them by hand instead of differentiating the capacity through autograd.

    Returns ``(cap, d_lambda, d_one_minus, d_alpha)``: the capacity and its derivatives
    with respect to ``lambda`` and ``1 - lambda`` taken as independent arrays (the chain
    back to ``alpha`` through the smoothing is the caller's), and ``d_alpha``, the part
    that depends on ``alpha`` directly: without smoothing ``-log(1 - lambda)`` is
    ``softplus(alpha)``, whose derivative ``sigmoid(alpha) = lambda`` is used as is
    (``None`` with smoothing).  All are multiplied by ``active`` when given.
    """
    xp = namespace(r)
    cap = capacity_from_mask(r, alpha, lam, one_minus, active, sigma, clip=False)
    d_lam = lam * r * r
    if bool(sigma) and _n_spatial(alpha) > 0:  # the derivative of log(1 - lambda + tiny)
        d_one_minus = one_minus - 1.0 / (one_minus + float(_finfo_tiny(xp, alpha.dtype)))
        d_alpha = None
    else:
        d_one_minus, d_alpha = one_minus, lam
    if active is not None:
        act = xp.astype(active, cap.dtype)
        d_lam, d_one_minus = d_lam * act, d_one_minus * act
        d_alpha = None if d_alpha is None else d_alpha * act
    return cap, d_lam, d_one_minus, d_alpha


def restrict(
    features: Any,
    alpha: Any,
    standard_noise: Any,
    mean: Any,
    std: Any,
    *,
    active: Any | None = None,
    sigma: float | None = 1.0,
    relu: bool = False,
) -> tuple[Any, Any]:
    """Restrict the flow through a feature map: noisy features and their capacity.

    ``standard_noise`` holds ``N(0, 1)`` draws shaped like ``features``; it is scaled
    to ``eps = mean + std * standard_noise``.  Returns ``(Z, capacity)`` as
    :func:`inject_noise` and :func:`capacity` would, computing the mask once.
    """
    xp = namespace(features, alpha)
    alpha = xp.broadcast_to(alpha, features.shape)
    lam, one_minus = restriction_mask(alpha, sigma)
    noise = mean + std * standard_noise
    z = inject_noise(features, lam, one_minus, noise, active=active, relu=relu)
    cap = capacity_from_mask((features - mean) / std, alpha, lam, one_minus, active, sigma)
    return z, cap


def inject_noise(
    features: Any,
    lam: Any,
    one_minus: Any,
    noise: Any,
    *,
    active: Any | None = None,
    relu: bool = False,
) -> Any:
    """Replace part of the signal by noise: ``Z = lambda * R + (1 - lambda) * eps``.

    Args:
        features: ``R``, shape ``(N, C, ...)``.
        lam, one_minus: the mask and its complement from :func:`restriction_mask`.
        noise: ``eps``, drawn from ``N(mu, sigma^2)``, shape ``(N, C, ...)``.
        active: optional 0/1 mask; inactive elements are set to zero.
        relu: clamp ``Z`` at zero (use when the layer's output is post-ReLU).
    """
    xp = namespace(features)
    z = lam * features + one_minus * noise
    if active is not None:
        z = z * xp.astype(active, z.dtype)
    if relu:
        z = xp.maximum(z, xp.zeros_like(z))
    return z


def inject_folded(
    features: Any, lam_a: Any, mu_a: Any, sigma_a: Any, standard_noise: Any, relu: bool = False
) -> Any:
    """The noise injection every path runs: ``Z = lambda_a * R + mu_a + sigma_a * eps``.

    With ``lambda_a = lambda * active``, ``mu_a = (1 - lambda) * mean * active`` and
    ``sigma_a = (1 - lambda) * std * active`` (broadcast against ``features``), this equals
    ``active * (lambda * R + (1 - lambda) * (mean + std * eps))`` of :func:`inject_noise`
    in two full-size operations instead of six; ``relu`` clamps ``Z`` at zero.
    """
    z = (lam_a * features + mu_a) + sigma_a * standard_noise
    if relu:
        xp = namespace(z)
        z = xp.maximum(z, xp.zeros_like(z))
    return z


def saliency_map(capacity_nats: Any, size: tuple[int, ...] | None = None) -> Any:
    """Turn per-element capacity into a map over the input, in bits per pixel.

    Sums ``capacity_nats`` (``(N, C, h, w)`` or ``(N, C, T)``) over channels, converts
    nats to bits, and resizes bilinearly to ``size`` (the input's ``(H, W)`` or ``(L,)``)
    with a mass-preserving operator, so ``map.sum()`` equals the total capacity in bits
    for every input.  Returns ``(N, H, W)`` / ``(N, L)``; for vector features ``(N, C)``
    the per-element capacity in bits is returned.
    """
    xp = namespace(capacity_nats)
    if capacity_nats.ndim == 2:
        return capacity_nats / LN2
    bits = xp.sum(capacity_nats, axis=1) / LN2
    if size is None or tuple(size) == tuple(bits.shape[1:]):
        return bits
    if len(size) != bits.ndim - 1:
        raise ValueError(
            f"size {tuple(size)} has {len(size)} axes but the feature map has {bits.ndim - 1} spatial axes"
        )
    out = resize_bilinear(bits, tuple(int(s) for s in size), preserve_sum=True)
    return xp.maximum(out, xp.zeros_like(out))


def cross_entropy(logits: Any, targets: Any) -> Any:
    """Mean target-class cross-entropy ``-log_softmax(logits)[target]`` over the batch.

    ``logits`` is ``(B, K)``; ``targets`` is a ``(B, K)`` one-hot array in the logits'
    namespace (see :func:`one_hot`).
    """
    xp = namespace(logits)
    shift = xp.max(logits, axis=1, keepdims=True)
    shifted = logits - shift
    log_norm = xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    log_probs = shifted - log_norm
    return -xp.mean(xp.sum(targets * log_probs, axis=1))


def input_spatial_size(
    input_shape: tuple[int, ...], n_spatial: int, channels_last: bool = False
) -> tuple[int, ...]:
    """Spatial size of a batch of inputs: ``(H, W)`` of ``(N, C, H, W)`` (or of
    ``(N, H, W, C)`` with ``channels_last``), ``(L,)`` of ``(N, L)`` token inputs."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == n_spatial + 2:
        return shape[1:-1] if channels_last else shape[2:]
    if len(shape) == n_spatial + 1:
        return shape[1:]
    raise ValueError(
        f"inputs of shape {shape} do not have the feature map's {n_spatial} "
        "spatial axes; use mode='capacity' for a map at feature resolution"
    )


def explanation_maps(
    capacity_nats: Any, input_shape: tuple[int, ...], mode: str = "saliency", *, channels_last: bool = False
) -> Any:
    """What the fronts' ``analyze`` returns, before conversion to NumPy.

    ``mode="saliency"``: :func:`saliency_map` at the inputs' spatial size (bits per
    pixel, totalling the capacity); ``mode="capacity"``: the channel-summed capacity in
    bits at feature-map resolution.  Vector features give per-element bits either way.
    """
    if mode not in ("saliency", "capacity"):
        raise ValueError(f"mode must be 'saliency' or 'capacity', got {mode!r}")
    n_spatial = capacity_nats.ndim - 2
    if mode == "capacity" or n_spatial == 0:
        return saliency_map(capacity_nats)
    return saliency_map(capacity_nats, input_spatial_size(input_shape, n_spatial, channels_last))
