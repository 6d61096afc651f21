"""The plugin contract: what a backend supplies, how it registers, how it is found.

:class:`Backend` lists everything a backend may provide, with defaults; a plugin registers a
:class:`BackendSpec` from the ``iba.backends`` entry-point group through the
``iba_register_backends`` hook (:mod:`iba_core.contract.hookspecs`), and
:func:`get_backend` finds it by name or by the type of a model or tensor.  The conformance
suite that checks a backend's promises is :mod:`iba_core.testing`.
"""

from ..math import _xp
from ._backend import (
    LAYOUTS,
    Backend,
    FeatureHook,
    Handle,
    InputSpec,
    RunFailure,
    UsageError,
    attached,
)
from ._collectives import Collectives, DistributedError, LocalShards
from ._helpers import HookList, assigned, lazy_exports, resolve_layer
from ._registry import (
    ENTRY_POINT_GROUP,
    BackendSpec,
    available_backends,
    backend_specs,
    find_backend,
    get_backend,
    plugin_manager,
)
from .hookspecs import hookimpl

# The math asks for a backend by array type only for arrays array_api_compat lacks.
_xp.set_backend_lookup(find_backend)

__all__ = [
    "ENTRY_POINT_GROUP",
    "LAYOUTS",
    "Backend",
    "BackendSpec",
    "Collectives",
    "DistributedError",
    "FeatureHook",
    "Handle",
    "HookList",
    "InputSpec",
    "LocalShards",
    "RunFailure",
    "UsageError",
    "assigned",
    "attached",
    "available_backends",
    "backend_specs",
    "find_backend",
    "get_backend",
    "hookimpl",
    "lazy_exports",
    "plugin_manager",
    "resolve_layer",
]
