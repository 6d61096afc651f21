"""Hook specifications of the ``iba`` plugin system (pluggy project name ``iba``).

A backend plugin is a module or object with a function marked ``@hookimpl`` named
``iba_register_backends``, exposed through the ``iba.backends`` entry-point group::

    [project.entry-points."iba.backends"]
    mybackend = "my_package._iba_plugin"

    # my_package/_iba_plugin.py
    from iba_core import BackendSpec, hookimpl

    @hookimpl
    def iba_register_backends(register):
        register(BackendSpec("mybackend", modules=("myframework",),
                             loader="my_package._backend:MyBackend"))

The built-in ``torch`` and ``tf`` backends register exactly this way.  The plugin module
should not import its framework at import time: ``loader`` is imported only when the
backend is first used, so listing backends never imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "iba"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def iba_register_backends(register: Callable[[Any], None]) -> None:
    """Register backends by calling ``register(BackendSpec(...))`` once per backend."""
