"""Registers the TensorFlow/Keras backend with iba's plugin system (imports no TensorFlow)."""

from __future__ import annotations

import importlib.util

from iba_core import BackendSpec, hookimpl


@hookimpl
def iba_register_backends(register):
    if importlib.util.find_spec("tensorflow") is not None:
        register(BackendSpec("tf", modules=("tensorflow", "keras"),
                             loader="iba_tf._backend:TFBackend"))
