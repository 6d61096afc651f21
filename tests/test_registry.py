"""Backend discovery through pluggy, without importing frameworks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import iba_core


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_importing_the_core_imports_no_framework():
    out = _run("""
        import sys
        import iba_core, iba_core.testing, iba_core.apps.plotting
        names = iba_core.available_backends()
        loaded = [m for m in ("torch", "tensorflow", "keras", "jax") if m in sys.modules]
        print(loaded)
    """)
    assert out == "[]"


def test_builtin_backends_come_from_entry_points():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group=iba_core.ENTRY_POINT_GROUP)}
    assert eps.get("torch") == "iba_torch._plugin"
    assert eps.get("tf") == "iba_tf._plugin"
    pm = iba_core.plugin_manager()
    assert {"iba_torch._plugin", "iba_tf._plugin"} <= {getattr(p, "__name__", "") for p in pm.get_plugins()}


def test_unknown_name_lists_installed_backends():
    with pytest.raises(LookupError, match=r"no iba backend named 'mxnet'; installed backends: (\[|none)"):
        iba_core.get_backend("mxnet")


def test_unknown_type_lists_installed_backends():
    with pytest.raises(LookupError, match="numpy.ndarray; installed backends"):
        iba_core.get_backend(np.zeros(3))


def test_a_plugin_registered_at_runtime_is_found_by_name_and_type(strict_plugin):
    import array_api_strict as xp

    assert "strict" in iba_core.available_backends()
    backend = iba_core.get_backend("strict")
    assert backend.name == "strict"
    assert iba_core.get_backend(xp.asarray([1.0])) is backend
    assert iba_core.get_backend(backend) is backend


def test_unregistered_plugin_is_gone(strict_plugin):
    pm = iba_core.plugin_manager()
    pm.unregister(strict_plugin)
    try:
        assert "strict" not in iba_core.available_backends()
    finally:
        pm.register(strict_plugin, name="strict-test-backend")


def test_environment_variable_pins_the_backend_set(monkeypatch):
    monkeypatch.setenv("IBA_BACKENDS", "torch")
    assert iba_core.available_backends() == (["torch"] if _has("torch") else [])


def test_detection_by_type_does_not_import_frameworks():
    out = _run("""
        import sys, numpy as np, iba_core
        try:
            iba_core.get_backend(np.zeros(1))
        except LookupError:
            pass
        print([m for m in ("torch", "tensorflow") if m in sys.modules])
    """)
    assert out == "[]"


def test_bad_registration_is_refused():
    class Bad:
        @iba_core.hookimpl
        def iba_register_backends(self, register):
            register("torch")

    pm = iba_core.plugin_manager()
    bad = Bad()
    pm.register(bad)
    try:
        with pytest.raises(TypeError, match="BackendSpec"):
            iba_core.available_backends()
    finally:
        pm.unregister(bad)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
