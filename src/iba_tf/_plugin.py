"""Registers the TensorFlow/Keras backend with iba's plugin system (imports no TensorFlow)."""

from __future__ import annotations

import importlib.util

from iba_core import BackendSpec, hookimpl

MODEL_FILES = (".keras", ".h5", ".hdf5")


def claims_model(spec: str) -> bool:
    """Whether the ``iba`` command's MODEL is a Keras model file."""
    return spec.lower().endswith(MODEL_FILES)


@hookimpl
def iba_register_backends(register):
    if importlib.util.find_spec("tensorflow") is not None:
        register(
            BackendSpec(
                "tf",
                modules=("tensorflow", "keras"),
                loader="iba_tf._backend:TFBackend",
                aliases=("tensorflow", "keras"),
                claims=claims_model,
            )
        )
