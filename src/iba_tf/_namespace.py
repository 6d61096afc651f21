"""A minimal Array API namespace for TensorFlow tensors.

``array-api-compat`` does not wrap TensorFlow, so this module supplies exactly the
functions the core calls (:data:`iba_core.REQUIRED_FUNCTIONS`, plus ``finfo`` and the
dtype names) with Array API semantics, written with plain ``tf`` ops.  Nothing here
flips a process-global switch (no ``tf.experimental.numpy`` behaviour mode), so a user's
other TensorFlow code is unaffected.

Arrays made from host data (NumPy, Python scalars) inside a ``tf.function`` are created
eagerly (``tf.init_scope``) and captured by the graph.  The core caches such constants
(smoothing matrices, feature statistics); an eager tensor can be captured by any later
graph, a graph tensor could not.

Usage: ``iba_tf.namespace`` (or ``TFBackend().namespace()``), e.g. ``xp.matmul(a, b)``.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

__array_api_version__ = "2023.12"

bool = tf.bool  # Array API dtype names (shadowing the builtin here is intended)
int32 = tf.int32
int64 = tf.int64
float32 = tf.float32
float64 = tf.float64

_LN2 = math.log(2.0)


# -- helpers ---------------------------------------------------------------------------
def _dtype(dtype: Any) -> tf.DType | None:
    """A ``tf.DType`` from a ``tf.DType``, NumPy dtype or dtype name (``None`` stays)."""
    if dtype is None:
        return None
    return tf.as_dtype(dtype)


def _device_scope(device: Any) -> Any:
    """``tf.device`` for a device string / ``tf.DeviceSpec``; no-op for ``None`` or ``''``."""
    if device is None or device == "":
        return _null_scope()
    return tf.device(device)


class _null_scope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _is_tensor(x: Any) -> builtins.bool:
    return isinstance(x, (tf.Tensor, tf.Variable))


def _host_constant(obj: Any, dtype: tf.DType | None, device: Any) -> tf.Tensor:
    """Eager constant from host data, also when called while tracing a ``tf.function``."""
    arr = np.asarray(obj)
    if dtype is None:
        if not isinstance(obj, (np.ndarray, np.generic)):
            # Python scalars and sequences take the default dtypes: float32, int64.
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
            elif arr.dtype.kind in "iu":
                arr = arr.astype(np.int64)
    else:
        arr = arr.astype(dtype.as_numpy_dtype, copy=False)
    with tf.init_scope(), _device_scope(device):
        return tf.constant(arr)


def _binary(x1: Any, x2: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Convert a Python-scalar operand to the other operand's dtype (Array API rule)."""
    if not _is_tensor(x1) and _is_tensor(x2):
        x1 = tf.constant(x1, dtype=x2.dtype)
    elif not _is_tensor(x2) and _is_tensor(x1):
        x2 = tf.constant(x2, dtype=x1.dtype)
    return tf.convert_to_tensor(x1), tf.convert_to_tensor(x2)


def _axis(axis: int | Sequence[int] | None) -> Any:
    if axis is None or isinstance(axis, int):
        return axis
    return list(axis)


# -- creation --------------------------------------------------------------------------
def asarray(
    obj: Any, /, *, dtype: Any = None, device: Any = None, copy: builtins.bool | None = None
) -> tf.Tensor:
    """Tensor from a tensor, NumPy array or Python scalar/sequence, on ``device``."""
    dtype = _dtype(dtype)
    if isinstance(obj, tf.Variable):
        obj = obj.value()
    if isinstance(obj, tf.Tensor):
        out = obj if dtype is None or obj.dtype == dtype else tf.cast(obj, dtype)
        if (
            device is not None
            and device != ""
            and tf.executing_eagerly()
            and tf.DeviceSpec.from_string(out.device) != tf.DeviceSpec.from_string(device)
        ):
            with tf.device(device):
                out = tf.identity(out)
        elif copy:
            out = tf.identity(out)
        return out
    return _host_constant(obj, dtype, device)


def full(
    shape: int | tuple[int, ...], fill_value: Any, *, dtype: Any = None, device: Any = None
) -> tf.Tensor:
    """Tensor of ``shape`` filled with ``fill_value`` (float32 for a Python float)."""
    dtype = _dtype(dtype)
    if dtype is None:
        if isinstance(fill_value, builtins.bool):
            dtype = tf.bool
        elif isinstance(fill_value, int):
            dtype = tf.int64
        else:
            dtype = tf.float32
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    with _device_scope(device):
        return tf.fill(shape, tf.constant(fill_value, dtype=dtype))


def zeros(shape: int | tuple[int, ...], *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """Tensor of zeros (float32 by default)."""
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    with _device_scope(device):
        return tf.zeros(shape, dtype=_dtype(dtype) or tf.float32)


def zeros_like(x: tf.Tensor, /, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """Zeros with the shape (and dtype, unless given) of ``x``."""
    with _device_scope(device):
        return tf.zeros_like(x, dtype=_dtype(dtype))


# -- data types --------------------------------------------------------------------------
def astype(x: tf.Tensor, dtype: Any, /, *, copy: builtins.bool = True, device: Any = None) -> tf.Tensor:
    """``x`` cast to ``dtype``."""
    dtype = _dtype(dtype)
    if x.dtype == dtype:
        return tf.identity(x) if copy else x
    return tf.cast(x, dtype)


class finfo_object(NamedTuple):
    """Array API ``finfo``: machine limits of a floating dtype."""

    bits: int
    eps: float
    max: float
    min: float
    smallest_normal: float
    dtype: tf.DType


def finfo(type: Any, /) -> finfo_object:
    """Machine limits of a floating dtype (or of a tensor's dtype)."""
    dtype = type.dtype if _is_tensor(type) else tf.as_dtype(type)
    fi = np.finfo(dtype.as_numpy_dtype)
    return finfo_object(
        int(fi.bits), float(fi.eps), float(fi.max), float(fi.min), float(fi.smallest_normal), dtype
    )


# -- manipulation ------------------------------------------------------------------------
def broadcast_to(x: tf.Tensor, /, shape: tuple[int, ...]) -> tf.Tensor:
    return tf.broadcast_to(x, tuple(shape))


def concat(arrays: Sequence[tf.Tensor], /, *, axis: int | None = 0) -> tf.Tensor:
    if axis is None:
        return tf.concat([tf.reshape(a, (-1,)) for a in arrays], axis=0)
    return tf.concat(list(arrays), axis=axis)


def expand_dims(x: tf.Tensor, /, *, axis: int = 0) -> tf.Tensor:
    return tf.expand_dims(x, axis=axis)


def permute_dims(x: tf.Tensor, /, axes: tuple[int, ...]) -> tf.Tensor:
    return tf.transpose(x, perm=list(axes))


def reshape(x: tf.Tensor, /, shape: tuple[int, ...], *, copy: builtins.bool | None = None) -> tf.Tensor:
    return tf.reshape(x, tuple(shape))


# -- element-wise --------------------------------------------------------------------------
def exp(x: tf.Tensor, /) -> tf.Tensor:
    return tf.exp(x)


def log(x: tf.Tensor, /) -> tf.Tensor:
    return tf.math.log(x)


def sqrt(x: tf.Tensor, /) -> tf.Tensor:
    return tf.sqrt(x)


def maximum(x1: Any, x2: Any, /) -> tf.Tensor:
    return tf.maximum(*_binary(x1, x2))


def logaddexp(x1: Any, x2: Any, /) -> tf.Tensor:
    """``log(exp(x1) + exp(x2))`` without overflow or cancellation.

    ``big + softplus(small - big)`` with ``big``/``small`` picked by ``tf.where`` (not
    ``maximum``/``minimum``), so at ``x1 == x2`` the gradient is split 1/2 : 1/2 exactly.
    Where the difference is NaN (both ``+inf`` or both ``-inf``, or a NaN operand) the
    result is ``x1 + x2``: ``+inf``, ``-inf`` or NaN, as the Array API specifies.
    """
    x1, x2 = _binary(x1, x2)
    first_bigger = tf.greater(x1, x2)
    big = tf.where(first_bigger, x1, x2)
    small = tf.where(first_bigger, x2, x1)
    diff = small - big
    out = big + tf.math.softplus(diff)
    return tf.where(tf.math.is_nan(diff), x1 + x2, out)


def where(condition: Any, x1: Any, x2: Any, /) -> tf.Tensor:
    x1, x2 = _binary(x1, x2)
    return tf.where(condition, x1, x2)


# -- linear algebra ----------------------------------------------------------------------
def matmul(x1: tf.Tensor, x2: tf.Tensor, /) -> tf.Tensor:
    """Matrix product with NumPy broadcasting of the batch axes (1-D operands promoted).

    ``tf.linalg.matmul`` broadcasts batch axes itself (without materialising the
    broadcast operand); on CPU that measured faster than a ``tensordot`` rewrite.
    """
    x1, x2 = tf.convert_to_tensor(x1), tf.convert_to_tensor(x2)
    if x1.shape.rank == 1 and x2.shape.rank == 1:
        return tf.reduce_sum(x1 * x2)
    if x1.shape.rank == 1:
        return tf.squeeze(tf.linalg.matmul(x1[None, :], x2), axis=-2)
    if x2.shape.rank == 1:
        return tf.squeeze(tf.linalg.matmul(x1, x2[:, None]), axis=-1)
    return tf.linalg.matmul(x1, x2)


# -- reductions --------------------------------------------------------------------------
def max(
    x: tf.Tensor, /, *, axis: int | tuple[int, ...] | None = None, keepdims: builtins.bool = False
) -> tf.Tensor:
    return tf.reduce_max(x, axis=_axis(axis), keepdims=keepdims)


def mean(
    x: tf.Tensor, /, *, axis: int | tuple[int, ...] | None = None, keepdims: builtins.bool = False
) -> tf.Tensor:
    return tf.reduce_mean(x, axis=_axis(axis), keepdims=keepdims)


def sum(
    x: tf.Tensor,
    /,
    *,
    axis: int | tuple[int, ...] | None = None,
    dtype: Any = None,
    keepdims: builtins.bool = False,
) -> tf.Tensor:
    dtype = _dtype(dtype)
    if dtype is None and x.dtype in (tf.bool, tf.int8, tf.int16, tf.int32):
        dtype = tf.int64  # Array API: integer sums accumulate in the default integer dtype
    if dtype is not None and dtype != x.dtype:
        x = tf.cast(x, dtype)
    return tf.reduce_sum(x, axis=_axis(axis), keepdims=keepdims)


__all__ = [
    "asarray",
    "astype",
    "bool",
    "broadcast_to",
    "concat",
    "exp",
    "expand_dims",
    "finfo",
    "float32",
    "float64",
    "full",
    "int32",
    "int64",
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
]
