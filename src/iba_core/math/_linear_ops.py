"""Small linear operators built once in NumPy and applied as matrix products.

Gaussian smoothing and bilinear resizing are separable linear maps along each spatial
axis.  Each is an ``(n_out, n_in)`` matrix with the border rule folded in, so applying
it is one ``xp.matmul`` per axis: pure Array API, no convolution needed, any map size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ._xp import device, namespace


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` covering +-2 sigma.

    The size is ``2 * round(2 * sigma) + 1`` (5 taps for ``sigma = 1``); the weights sum
    to 1.  ``sigma`` must be positive.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    radius = int(round(2 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_index(i: Any, n: int) -> Any:
    """Mirror ``i`` (an int or an integer array) into ``[0, n)`` without repeating the
    edge (NumPy's 'reflect').

    Reflection is repeated as often as needed, so offsets larger than the axis work;
    an axis of length 1 maps everything onto its single element.
    """
    if n == 1:
        return i * 0
    period = 2 * (n - 1)
    i = i % period
    return np.where(i < n, i, period - i) if isinstance(i, np.ndarray) else (i if i < n else period - i)


#: Above this many taps (and for kernels much wider than the reflection period) the
#: folded kernel is summed in closed form instead of tap by tap.
_MAX_TAPS = 1 << 20


def _folded_kernel(period: int, sigma: float, closed_form: bool | None = None) -> np.ndarray:
    """The kernel of :func:`gaussian_kernel_1d` wrapped onto ``period`` positions.

    Entry ``s`` is the total weight of the taps at offsets ``d`` with ``d % period == s``
    (``d`` in ``[-r, r]``, ``r = round(2 sigma)``); the entries sum to 1.  Up to
    :data:`_MAX_TAPS` taps they are added exactly (one ``bincount``); for wider kernels
    each sum of Gaussian samples ``period`` apart is evaluated with the Euler-Maclaurin
    formula (an integral by ``erf`` plus end corrections), exact to float64 round-off
    when ``sigma`` is many periods wide, so the cost does not grow with ``sigma``.
    """
    radius = int(round(2 * sigma))
    if closed_form is None:
        closed_form = 2 * radius + 1 > _MAX_TAPS and sigma > 50 * period
    if not closed_form:
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        weights = np.exp(-0.5 * (offsets / sigma) ** 2)
        weights /= weights.sum()
        idx = np.arange(-radius, radius + 1) % period
        return np.bincount(idx, weights=weights, minlength=period)

    def sums(start: np.ndarray, step: int) -> np.ndarray:
        # sum over m = a..b of f(m) = exp(-x^2 / 2), x = (start + m * step) / sigma, for the
        # m that keep |start + m * step| <= radius.
        a = np.ceil((-radius - start) / step)
        b = np.floor((radius - start) / step)
        h = step / sigma
        xa, xb = (start + a * step) / sigma, (start + b * step) / sigma
        erf = np.frompyfunc(math.erf, 1, 1)
        integral = (np.sqrt(np.pi / 2) / h) * (erf(xb / np.sqrt(2)) - erf(xa / np.sqrt(2))).astype(np.float64)
        fa, fb = np.exp(-0.5 * xa**2), np.exp(-0.5 * xb**2)
        d1 = lambda x, f: -x * f * h
        d3 = lambda x, f: (3 * x - x**3) * f * h**3
        return integral + (fa + fb) / 2 + (d1(xb, fb) - d1(xa, fa)) / 12 - (d3(xb, fb) - d3(xa, fa)) / 720

    total = sums(np.zeros(1), 1)[0]
    return sums(np.arange(period, dtype=np.float64), period) / total


@functools.lru_cache(maxsize=64)
def smoothing_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` matrix that smooths a length-``n`` axis with a Gaussian.

    Row ``i`` holds the kernel of :func:`gaussian_kernel_1d` centred on ``i`` with
    reflect borders folded in, so every row sums to 1 and the operator is defined for
    every ``n >= 1``.  A kernel wider than the axis folds onto it again and again; it is
    first wrapped onto one reflection period (``2 (n - 1)`` positions), so building the
    matrix costs ``O(n^2)`` whatever ``sigma`` (a very wide kernel gives the uniform
    limit: every row ``[1, 2, ..., 2, 1] / (2 (n - 1))``).  Returned read-only; cached.
    """
    if n < 1:
        raise ValueError(f"axis length must be at least 1, got {n}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if n == 1:
        mat = np.ones((1, 1), dtype=np.float64)
    else:
        period = 2 * (n - 1)
        kernel = _folded_kernel(period, float(sigma))
        # Row i, position q of the period: the kernel's weight at offset q - i.
        q = np.arange(period)
        wrapped = kernel[(q[None, :] - np.arange(n)[:, None]) % period]  # (n, period)
        mat = np.zeros((n, n), dtype=np.float64)
        np.add.at(mat.T, _reflect_index(q, n), wrapped.T)
    mat.setflags(write=False)
    return mat


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-interpolation matrix with pixel-centre alignment.

    Output sample ``i`` reads the input at ``(i + 0.5) * n_in / n_out - 0.5``, clamped to
    the border (``align_corners=False`` in PyTorch's terms).  Rows sum to 1, so constant
    signals stay constant.  Returned read-only; it is cached.
    """
    if n_out < 1 or n_in < 1:
        raise ValueError(f"sizes must be at least 1, got n_out={n_out}, n_in={n_in}")
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = min(max((i + 0.5) * scale - 0.5, 0.0), n_in - 1)
        lo = int(math.floor(src))
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        mat[i, lo] += 1.0 - frac
        mat[i, hi] += frac
    mat.setflags(write=False)
    return mat


@functools.lru_cache(maxsize=64)
def mass_preserving_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Resize matrix whose columns each sum to ``n_out / n_in``.

    Every input sample spreads its value over the output exactly in proportion to the
    size ratio, so ``sum(M @ v) == sum(v) * n_out / n_in`` for any ``v``.  Upsampling is
    bilinear with columns renormalised: for integer factors this equals
    :func:`bilinear_matrix`; for other factors the border clamp would otherwise over- or
    under-count edge samples by a few percent.  Downsampling averages over areas.
    """
    if n_out >= n_in:
        mat = np.array(bilinear_matrix(n_out, n_in))
        mat *= (n_out / n_in) / mat.sum(axis=0, keepdims=True)
    else:
        # Downsampling: bilinear sampling would skip inputs, so average over areas.
        # Output i covers [i, i + 1) * n_in / n_out of the input axis.
        mat = np.zeros((n_out, n_in), dtype=np.float64)
        width = n_in / n_out
        for i in range(n_out):
            lo, hi = i * width, (i + 1) * width
            for j in range(int(math.floor(lo)), min(int(math.ceil(hi)), n_in)):
                mat[i, j] = (min(hi, j + 1) - max(lo, j)) / width
    mat.setflags(write=False)
    return mat


# Matrices already moved to a namespace/device/dtype, keyed by the NumPy matrix's id (the
# NumPy matrix is kept in the value so its id cannot be reused while the entry lives).
_ON_DEVICE: dict[tuple[Any, ...], tuple[np.ndarray, Any]] = {}


def separable_operands(like: Any, matrices: list[np.ndarray | None]) -> tuple[Any, ...]:
    """Matrices for :func:`apply_operands`, in ``like``'s namespace, dtype and device.

    ``matrices`` holds one ``(n_out, n_in)`` NumPy matrix (or ``None``: leave the axis
    alone) per trailing axis, 1 or 2 of them.  The last axis' matrix is stored
    transposed, ready for a right-multiplication.  Conversions are cached, so calling
    this every step costs a dictionary look-up.
    """
    if len(matrices) not in (1, 2):
        raise ValueError(f"separable operators act on 1 or 2 trailing axes, got {len(matrices)}")
    xp = namespace(like)
    dev = device(like)
    out: list[Any] = []
    for k, m in enumerate(matrices):
        if m is None:
            out.append(None)
            continue
        last = k == len(matrices) - 1
        key = (id(m), last, type(like), str(dev), str(like.dtype))
        hit = _ON_DEVICE.get(key)
        if hit is None or hit[0] is not m:
            if len(_ON_DEVICE) > 256:
                _ON_DEVICE.clear()
            host = np.array(m.T if last else m)
            hit = _ON_DEVICE[key] = (m, xp.asarray(host, dtype=like.dtype, device=dev))
        out.append(hit[1])
    return tuple(out)


def apply_operands(x: Any, operands: tuple[Any, ...]) -> Any:
    """Apply :func:`separable_operands` to the trailing axes of ``x`` (matrix products)."""
    xp = namespace(x)
    if len(operands) == 1:
        (m,) = operands
        return x if m is None else xp.matmul(x, m)
    m_rows, m_cols_t = operands
    if m_rows is not None:
        x = xp.matmul(m_rows, x)
    if m_cols_t is not None:
        x = xp.matmul(x, m_cols_t)
    return x


def adjoint_operands(operands: tuple[Any, ...]) -> tuple[Any, ...]:
    """The operands of the adjoint (transposed) operator of :func:`apply_operands`:
    ``apply_operands(g, adjoint_operands(ops))`` is the gradient of
    ``sum(g * apply_operands(x, ops))`` with respect to ``x``.  Every matrix is
    transposed over its last two axes (batched matrices keep their leading axis)."""
    out: list[Any] = []
    for m in operands:
        if m is None:
            out.append(None)
            continue
        xp = namespace(m)
        axes = (*range(m.ndim - 2), m.ndim - 1, m.ndim - 2)
        out.append(xp.permute_dims(m, axes))
    return tuple(out)


def apply_separable(x: Any, matrices: list[np.ndarray | None]) -> Any:
    """Apply one NumPy matrix per trailing axis of ``x``: ``M_k`` acts on axis ``-d + k``.

    ``x`` has shape ``(..., n_1, ..., n_d)`` with ``d = len(matrices)`` in {1, 2}; a
    ``None`` entry leaves its axis alone.  Matrices are moved to ``x``'s namespace,
    dtype and device (once; cached).
    """
    return apply_operands(x, separable_operands(x, matrices))


def smoothing_operands(like: Any, sigma: float | None, n_spatial: int) -> tuple[Any, ...] | None:
    """Operands that smooth the last ``n_spatial`` axes of arrays shaped like ``like``.

    ``None`` when there is nothing to smooth (``sigma`` 0/``None`` or no spatial axes).
    """
    if not sigma or n_spatial == 0:
        return None
    if n_spatial not in (1, 2):
        raise ValueError(f"smoothing supports 1 or 2 spatial axes, got {n_spatial}")
    shape = tuple(like.shape[-n_spatial:])
    return separable_operands(like, [smoothing_matrix(int(n), float(sigma)) for n in shape])


def gaussian_smooth(
    x: Any, sigma: float | None, n_spatial: int, operands: tuple[Any, ...] | None = None
) -> Any:
    """Smooth the last ``n_spatial`` axes of ``x`` with a Gaussian of std ``sigma``.

    ``n_spatial`` is 0 (vectors: returned unchanged), 1 (sequences ``(..., T)``) or 2
    (images ``(..., h, w)``).  ``sigma`` of 0 or ``None`` disables smoothing.  Each
    channel is smoothed independently with reflect borders; every output is a weighted
    mean of inputs (weights sum to 1).  ``operands`` from :func:`smoothing_operands`
    may be passed in, e.g. to keep NumPy out of a compiled function.
    """
    if operands is None:
        operands = smoothing_operands(x, sigma, n_spatial)
    return x if operands is None else apply_operands(x, operands)


@functools.lru_cache(maxsize=64)
def _resize_matrices(
    size: tuple[int, ...], in_shape: tuple[int, ...], preserve_sum: bool
) -> tuple[np.ndarray | None, ...]:
    if preserve_sum:
        mats = [np.array(mass_preserving_matrix(o, i)) for o, i in zip(size, in_shape, strict=True)]
        mats[0] *= math.prod(in_shape) / math.prod(size)
    else:
        mats = [np.array(bilinear_matrix(o, i)) for o, i in zip(size, in_shape, strict=True)]
    out = []
    for m in mats:
        identity = m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(m.shape[0]))
        m.setflags(write=False)
        out.append(None if identity else m)
    return tuple(out)


def resize_bilinear(x: Any, size: tuple[int, ...], *, preserve_sum: bool = False) -> Any:
    """Resize the last ``len(size)`` axes of ``x`` bilinearly to ``size``.

    With ``preserve_sum=True`` the mass-preserving variant is used and the result is
    rescaled so that its total over the resized axes equals the input's total.
    """
    in_shape = tuple(int(n) for n in x.shape[-len(size) :])
    mats = _resize_matrices(tuple(int(s) for s in size), in_shape, bool(preserve_sum))
    return apply_separable(x, list(mats))
