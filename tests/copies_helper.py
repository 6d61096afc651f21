"""A test helper shared by the PyTorch and TensorFlow front tests."""

from __future__ import annotations

from typing import Any


def analyze_with_copies_at_the_input(iba: Any, *args: Any, **kwargs: Any) -> Any:
    """``iba.analyze`` with the noisy copies made at the input (the closure contract), the
    whole model run in every step."""
    explain = iba.bottleneck.explain
    iba.bottleneck.explain = lambda *a, **k: explain(*a, **{**k, "copies": "input"})
    iba.engine.split_model = False
    try:
        return iba.analyze(*args, **kwargs)
    finally:
        del iba.bottleneck.explain
        del iba.engine.split_model
