"""Every test here runs with 64-bit floats available (``jax_enable_x64``), as the float64
checks of the suites need; float32 models stay float32."""

from __future__ import annotations

import os
import sys

import pytest

try:
    import flax  # noqa: F401
    import jax
except ImportError:  # nothing here runs without JAX and Flax: skip the folder
    collect_ignore_glob = ["test_*.py"]
else:
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too, so the tests also run from iba's root (whose pytest settings
    # apply there) with --strict-markers.
    config.addinivalue_line("markers", "jax: needs JAX and Flax")
