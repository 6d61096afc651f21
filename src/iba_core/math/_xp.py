"""Array-namespace resolution for the core.

The core is written against the Python Array API standard.  For arrays that
``array_api_compat`` understands (NumPy, PyTorch, CuPy, JAX, array-api-strict, ...)
its namespace is used; for anything else (TensorFlow tensors), the backend that owns
the array's type supplies a namespace.

The math layer never imports the plugin registry: the contract layer
(:mod:`iba_core.contract`) installs the lookup of a backend by array type with
:func:`set_backend_lookup` when it is imported.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

#: Every namespace function the core calls.  A backend namespace must provide all of
#: them with Array API semantics; the conformance suite checks each one.
REQUIRED_FUNCTIONS: tuple[str, ...] = (
    "asarray",
    "concat",
    "astype",
    "broadcast_to",
    "exp",
    "expand_dims",
    "full",
    "log",
    "logaddexp",
    "matmul",
    "max",
    "maximum",
    "mean",
    "permute_dims",
    "reshape",
    "sqrt",
    "sum",
    "where",
    "zeros",
    "zeros_like",
)


def namespace(*arrays: Any) -> Any:
    """Return the Array API namespace of ``arrays``.

    Falls back to the registered backend that owns the first array's type, so the
    core never needs to know about frameworks ``array_api_compat`` lacks.
    """
    kind = type(arrays[0])
    if kind not in _NOT_COMPAT:
        try:
            return array_api_compat.array_namespace(*arrays)
        except TypeError:
            if len({type(a) for a in arrays}) == 1:
                _NOT_COMPAT.add(kind)
    backend = _lookup(arrays[0])
    if backend is None:
        raise TypeError(
            f"no array namespace for {type(arrays[0]).__module__}."
            f"{type(arrays[0]).__qualname__}: array_api_compat does not support it "
            "and no installed iba backend owns it"
        )
    return backend.namespace()


def _no_lookup(x: Any) -> Any:
    return None


_lookup: Any = _no_lookup


def set_backend_lookup(lookup: Any) -> None:
    """Install ``lookup(array) -> backend or None`` for arrays array_api_compat lacks.

    Called once by :mod:`iba_core.contract`; the backend must have ``namespace()`` and
    ``to_numpy(x)``.
    """
    global _lookup
    _lookup = lookup


# Array types array_api_compat refused: asked of a backend directly next time (the
# refusal costs an exception, which adds up over the many small ops of a step).
_NOT_COMPAT: set[type] = set()


def device(x: Any) -> Any:
    """Device of ``x`` (``None`` for arrays whose namespace has no device concept)."""
    try:
        return array_api_compat.device(x)
    except (TypeError, AttributeError):
        return getattr(x, "device", None)


def from_numpy(a: np.ndarray, like: Any) -> Any:
    """Move a NumPy array into the namespace, device and float dtype of ``like``."""
    xp = namespace(like)
    return xp.asarray(a, dtype=like.dtype, device=device(like))


def to_numpy(x: Any) -> np.ndarray:
    """Copy any supported array (NumPy, a backend's tensor, any DLPack array) to NumPy."""
    if isinstance(x, np.ndarray):
        return x
    backend = _lookup(x)
    if backend is not None:
        return backend.to_numpy(x)
    try:
        return np.from_dlpack(x)
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return np.asarray(x)


def sigmoid(xp: Any, x: Any) -> Any:
    """Numerically stable logistic function ``1 / (1 + exp(-x))``."""
    return sigmoid_pair(xp, x)[0]


def sigmoid_pair(xp: Any, x: Any) -> tuple[Any, Any]:
    """``(sigmoid(x), sigmoid(-x))`` from one exponential, each to full relative precision.

    With ``s = 1 - 2 * [x >= 0]``, ``e = exp(s * x) = exp(-|x|)`` lies in ``(0, 1]`` (and
    the derivative at 0 is right): the smaller of the two results is ``e / (1 + e)``,
    exact to an ulp, and the larger one adds ``1 - 2 * small`` to it.  The selection is
    arithmetic with the constant 0/1 mask rather than ``where``, whose backward pass
    costs three times as much in eager frameworks.
    """
    nonneg = xp.astype(x >= 0, x.dtype)  # a constant: no gradient flows through it
    e = xp.exp(x * (1.0 - 2.0 * nonneg))
    small = e / (e + 1.0)
    diff = (1.0 - small) - small
    # Where the mask is 0 the product vanishes exactly, so the small side stays exact.
    return small + nonneg * diff, small + (1.0 - nonneg) * diff


def softplus(xp: Any, x: Any) -> Any:
    """``log(1 + exp(x))`` without overflow."""
    return xp.logaddexp(xp.zeros_like(x), x)
