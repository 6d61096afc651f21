"""Registers the JAX backend with iba's plugin system (imports neither JAX nor Flax).

This module is the whole of what iba sees of the distribution before a backend is used:
the ``iba.backends`` entry point in ``pyproject.toml`` names it, and its one hook
implementation registers a :class:`iba_core.BackendSpec` that loads the backend lazily.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from iba_core import BackendSpec, hookimpl
from iba_core.apps.loading import factory_imports


def claims_model(spec: str) -> bool:
    """Whether the ``iba`` command's MODEL is a factory (``file.py:function`` or
    ``package.module:function``) in a Python file that imports Flax; the file is read,
    not run."""
    return "flax" in factory_imports(spec)


@hookimpl
def iba_register_backends(register: Callable[[BackendSpec], None]) -> None:
    if importlib.util.find_spec("jax") is not None and importlib.util.find_spec("flax") is not None:
        register(
            BackendSpec(
                "jax",
                modules=("jax", "jaxlib", "flax"),
                loader="iba_jax._backend:JaxBackend",
                aliases=("flax",),
                claims=claims_model,
            )
        )
