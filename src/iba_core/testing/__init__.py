"""The conformance suite every iba backend runs.

A backend's test module provides one fixture, ``case``, returning a
:class:`ConformanceCase`, and inherits :class:`BackendConformanceTests` (or any of the
smaller classes).  Every test then runs against that backend::

    import pytest
    from iba_core.testing import BackendConformanceTests, ConformanceCase

    class TestMyBackend(BackendConformanceTests):
        @pytest.fixture
        def case(self):
            return ConformanceCase(backend="mybackend", make_model=..., make_inputs=...,
                                   input_size=(12, 12), feature_shape=(8, 6, 6))

Capabilities a backend lacks are declared in the case (e.g. ``float64=False``), never
tested with ``if backend == ...``.  Reference values come from NumPy and, when it is
installed, array-api-strict.  Requires pytest.
"""

from ._readout_suite import ReadoutCase, ReadoutTests
from ._suite import (
    BackendConformanceTests,
    ConformanceCase,
    EstimationTests,
    GradientTests,
    HookTests,
    NamespaceTests,
    PerSampleTests,
)

__all__ = [
    "BackendConformanceTests",
    "ConformanceCase",
    "EstimationTests",
    "GradientTests",
    "HookTests",
    "NamespaceTests",
    "PerSampleTests",
    "ReadoutCase",
    "ReadoutTests",
]
