"""The conformance suite against a third backend registered from a test (no framework)."""

from __future__ import annotations

import array_api_strict as xp
import numpy as np
import pytest

from iba_core.testing import BackendConformanceTests, ConformanceCase
from strict_backend import StrictModel, StrictSequenceModel


def make_model(dtype: str) -> tuple[StrictModel, str]:
    return StrictModel(dtype), "pool"


def make_inputs(n: int, dtype: str, seed: int):
    rng = np.random.default_rng(seed)
    return xp.asarray(rng.standard_normal((n, 3, 6, 6)), dtype=getattr(xp, dtype))


def make_sequence_inputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return xp.asarray(rng.standard_normal((n, StrictSequenceModel.T, 3)), dtype=xp.float32)


class TestStrictConformance(BackendConformanceTests):
    @pytest.fixture
    def case(self, strict_plugin) -> ConformanceCase:
        return ConformanceCase(
            backend="strict",
            make_model=make_model,
            make_inputs=make_inputs,
            input_size=(6, 6),
            feature_shape=(6, 3, 3),
            n_classes=5,
            exact_gradients=False,
            on_input=False,
            make_sequence_model=lambda layout: (StrictSequenceModel(layout), "proj"),
            make_sequence_inputs=make_sequence_inputs,
            sequence_shape=(StrictSequenceModel.C, StrictSequenceModel.T),
            sequence_key=StrictSequenceModel.KEY,
        )
