from __future__ import annotations

import pytest

import iba_core


@pytest.fixture
def strict_plugin():
    """Register the array-api-strict test backend for the duration of a test."""
    pytest.importorskip("array_api_strict")
    from strict_backend import StrictPlugin

    pm = iba_core.plugin_manager()
    plugin = StrictPlugin()
    pm.register(plugin, name="strict-test-backend")
    try:
        yield plugin
    finally:
        pm.unregister(plugin)
