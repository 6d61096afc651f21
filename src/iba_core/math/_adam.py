"""Adam as a pair of pure functions over Array API arrays.

``adam_init`` builds the state, ``adam_update`` returns the new parameter and state.
Nothing is mutated, so the same code runs on any backend, and a step can be traced by
a compiler (``torch.compile``, ``tf.function``).  The update is written to match
``torch.optim.Adam`` (no weight decay, no amsgrad) operation for operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ._xp import device, namespace


class AdamState(NamedTuple):
    """Step count and first/second moment estimates, shaped like the parameter."""

    step: int
    m: Any
    v: Any


def adam_init(param: Any) -> AdamState:
    """Zero moments for ``param``."""
    xp = namespace(param)
    return AdamState(0, xp.zeros_like(param), xp.zeros_like(param))


def adam_update(
    param: Any,
    grad: Any,
    state: AdamState,
    *,
    lr: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    kernel: Callable[..., tuple[Any, Any, Any]] | None = None,
) -> tuple[Any, AdamState]:
    """One Adam step: returns ``(new_param, new_state)``.

    ``param - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with the moments
    updated from ``grad`` first.  ``kernel``: :func:`adam_kernel` for these ``betas`` and
    ``eps``, possibly compiled; its step-dependent scalars arrive as 0-d arrays, so a
    compiled kernel is traced once rather than once per step.
    """
    step = state.step + 1
    if kernel is None:
        new_param, m, v = adam_kernel(betas, eps)(
            param, grad, state.m, state.v, *adam_scalars(step, lr, betas)
        )
    else:
        new_param, m, v = kernel(param, grad, state.m, state.v, *adam_scalars(step, lr, betas, like=param))
    return new_param, AdamState(step, m, v)


def adam_scalars(
    step: int, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), like: Any = None
) -> tuple[Any, Any]:
    """The step-dependent scalars of :func:`adam_kernel` for step ``step`` (from 1):
    ``(lr / (1 - b1^t), sqrt(1 - b2^t))``; 0-d arrays like ``like`` if given (so a
    compiled kernel is traced once rather than once per step), else Python floats."""
    b1, b2 = betas
    step_size, bias2_sqrt = lr / (1.0 - b1**step), math.sqrt(1.0 - b2**step)
    if like is None:
        return step_size, bias2_sqrt
    xp = namespace(like)
    return (
        xp.asarray(step_size, dtype=like.dtype, device=device(like)),
        xp.asarray(bias2_sqrt, dtype=like.dtype, device=device(like)),
    )


def adam_schedule(
    steps: int, lr: float, like: Any, betas: tuple[float, float] = (0.9, 0.999)
) -> list[tuple[Any, Any]]:
    """:func:`adam_scalars` of steps ``1..steps`` as 0-d arrays like ``like`` (item
    ``t - 1`` holds step ``t``'s), taken apart from one ``(steps, 2)`` array: one transfer
    to the device per optimisation instead of two per step (a conversion costs about a
    millisecond in JAX's eager mode), and ``unstack`` where the namespace has it (indexing
    one element at a time costs JAX about 60 microseconds each)."""
    xp = namespace(like)
    rows = np.array([adam_scalars(t, lr, betas) for t in range(1, steps + 1)], dtype=np.float64)
    table = xp.asarray(rows.reshape(steps, 2), dtype=like.dtype, device=device(like))
    unstack = getattr(xp, "unstack", None)
    if unstack is None:
        return [(table[t, 0], table[t, 1]) for t in range(steps)]
    return [(row[0], row[1]) for row in map(unstack, unstack(table))]


def adam_kernel(
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> Callable[..., tuple[Any, Any, Any]]:
    """The array part of an Adam step:
    ``(param, grad, m, v, step_size, bias2_sqrt) -> (new_param, m, v)``."""
    b1, b2 = betas

    def kernel(
        param: Any, grad: Any, m: Any, v: Any, step_size: Any, bias2_sqrt: Any
    ) -> tuple[Any, Any, Any]:
        xp = namespace(param, grad)
        m = m * b1 + grad * (1.0 - b1)
        v = v * b2 + (grad * grad) * (1.0 - b2)
        denom = xp.sqrt(v) / bias2_sqrt + eps
        return param - step_size * (m / denom), m, v

    return kernel
