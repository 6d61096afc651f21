"""Registers the PyTorch backend with iba's plugin system (imports no torch)."""

from __future__ import annotations

import importlib.util

from iba_core import BackendSpec, hookimpl


@hookimpl
def iba_register_backends(register):
    if importlib.util.find_spec("torch") is not None:
        register(BackendSpec("torch", modules=("torch",), loader="iba_torch._backend:TorchBackend"))
