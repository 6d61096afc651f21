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

Capabilities a backend lacks are declared in the case (e.g. ``float64=False``,
``on_input=False``; no ``make_sequence_model``: the rank-3 :class:`SequenceTests`, both
layouts and attention masks, are skipped), never tested with ``if backend == ...``; what
only the framework can see (gradients stored on weights, training flags) the case reads
with small callables (``weight_gradients``, ``model_flags``, ``mix_flags``,
``is_frozen``), and a test whose callable is ``None`` is skipped with the reason.
:class:`PromiseTests` checks the promises of the :class:`~iba_core.contract.Backend`
contract through its API alone: ``value_and_grad`` passes operands through, is correct
through a model and writes no weight gradients; ``frozen`` restores every flag, also
after an exception; hooks see the layer's input or output as the layer produces it,
stack in attach order and come off in any order; seeded generators reproduce and advance
on every draw.  Reference values come from NumPy and, when it is installed,
array-api-strict.  Requires pytest.

Fixtures in these classes follow what pytest 10 keeps.  pytest 9.1 deprecates fixtures
of class (or wider) scope written as instance methods, with
``pytest.PytestRemovedIn10Warning``: each test gets a new instance while such a fixture
runs once per class, so what it sets on ``self`` is never seen.  Hence:

- a function-scoped fixture (the default; ``case`` and ``backend`` here) may be a plain
  method taking ``self``, and a subclass overrides it by defining one of the same name;
- a fixture of class scope (``readout_case`` and ``trained`` of :class:`ReadoutTests`)
  is a classmethod, ``@classmethod`` written below ``@pytest.fixture(scope="class")``;
- fixtures return what the tests need; no fixture stores state on ``self`` or ``cls``.
  A fixture may depend only on fixtures of its scope or wider (a function-scoped
  ``case`` may use a function-scoped plugin fixture; a class-scoped one may not).

The suite raises no such warning (checked with ``-W error::pytest.PytestRemovedIn10Warning``).
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
    PromiseTests,
    SequenceTests,
)

__all__ = [
    "BackendConformanceTests",
    "ConformanceCase",
    "EstimationTests",
    "GradientTests",
    "HookTests",
    "NamespaceTests",
    "PerSampleTests",
    "PromiseTests",
    "ReadoutCase",
    "ReadoutTests",
    "SequenceTests",
]
