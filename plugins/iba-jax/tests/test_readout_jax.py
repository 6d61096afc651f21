"""The readout suite of iba_core.testing, run against the JAX backend."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from iba_core.testing import ReadoutCase, ReadoutTests

from models import ReadoutNet

pytestmark = pytest.mark.jax


def to_inputs(images: np.ndarray) -> Any:
    return jnp.asarray(np.transpose(images, (0, 2, 3, 1)))


class TestJaxReadout(ReadoutTests):
    @pytest.fixture(scope="class")
    @classmethod
    def readout_case(cls) -> ReadoutCase:
        return ReadoutCase(
            backend="jax",
            make_model=ReadoutNet,
            to_inputs=to_inputs,
            layer_of=lambda model, name: getattr(model, name),
            train_options={"compile": True},
        )
