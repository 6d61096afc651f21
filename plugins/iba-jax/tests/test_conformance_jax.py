"""The conformance suite of iba_core.testing, run against the JAX backend."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iba_core.testing import BackendConformanceTests, ConformanceCase

from models import SEQ_C, SEQ_KEY, SEQ_T, ConformanceNet, SequenceNet, make_sequence_inputs

pytestmark = pytest.mark.jax


def make_model(dtype: str) -> tuple[Any, str]:
    return ConformanceNet(jnp.dtype(dtype)), "act"


def make_inputs(n: int, dtype: str, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, 12, 12, 3)).astype(dtype))


def model_flags(model: Any) -> tuple[tuple[str, Any], ...]:
    """Every inference flag of every submodule (``Module.eval()`` sets them)."""
    return tuple(
        (f"{path}.{flag}", getattr(m, flag))
        for path, m in nnx.iter_modules(model)
        for flag in ("deterministic", "use_running_average")
        if hasattr(m, flag)
    )


def is_frozen(model: Any) -> bool:
    return all(value is True for _, value in model_flags(model))


class TestJaxConformance(BackendConformanceTests):
    @pytest.fixture
    def case(self) -> ConformanceCase:
        return ConformanceCase(
            backend="jax",
            make_model=make_model,
            make_inputs=make_inputs,
            input_size=(12, 12),
            feature_shape=(8, 6, 6),
            n_classes=5,
            layer_output_shape=(6, 6, 8),
            layer_input_shape=(6, 6, 8),
            fast_compile=True,
            model_flags=model_flags,
            is_frozen=is_frozen,
            make_sequence_model=lambda layout: (SequenceNet(layout), "proj"),
            make_sequence_inputs=make_sequence_inputs,
            sequence_shape=(SEQ_C, SEQ_T),
            sequence_key=SEQ_KEY,
        )
