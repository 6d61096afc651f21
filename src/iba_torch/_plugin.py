"""Registers the PyTorch backend with iba's plugin system (imports no torch)."""

from __future__ import annotations

import importlib.util

from iba_core import BackendSpec, hookimpl

_KERAS_FILES = (".keras", ".h5", ".hdf5")


def claims_model(spec: str) -> bool:
    """Whether the ``iba`` command's MODEL is a PyTorch factory: ``package.module:function``
    or ``file.py:function`` (a colon), not a Keras model file."""
    return ":" in spec and not spec.lower().endswith(_KERAS_FILES)


@hookimpl
def iba_register_backends(register):
    if importlib.util.find_spec("torch") is not None:
        register(
            BackendSpec(
                "torch",
                modules=("torch",),
                loader="iba_torch._backend:TorchBackend",
                aliases=("pytorch",),
                claims=claims_model,
            )
        )
