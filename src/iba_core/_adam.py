"""Adam as a pair of pure functions over Array API arrays.

``adam_init`` builds the state, ``adam_update`` returns the new parameter and state.
Nothing is mutated, so the same code runs on any backend, and a step can be traced by
a compiler (``torch.compile``, ``tf.function``).  The update is written to match
``torch.optim.Adam`` (no weight decay, no amsgrad) operation for operation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._xp import namespace


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
) -> tuple[Any, AdamState]:
    """One Adam step: returns ``(new_param, new_state)``.

    ``param - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with the moments
    updated from ``grad`` first.
    """
    xp = namespace(param, grad)
    b1, b2 = betas
    step = state.step + 1
    m = state.m * b1 + grad * (1.0 - b1)
    v = state.v * b2 + (grad * grad) * (1.0 - b2)
    bias1 = 1.0 - b1**step
    bias2_sqrt = math.sqrt(1.0 - b2**step)
    denom = xp.sqrt(v) / bias2_sqrt + eps
    new_param = param - (lr / bias1) * (m / denom)
    return new_param, AdamState(step, m, v)
