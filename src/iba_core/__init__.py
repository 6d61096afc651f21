"""iba_core: Information Bottleneck Attribution, written once against the Array API.

The core is layered; each layer imports only the ones above it in this list:

- :mod:`iba_core.math`: capacity, noise injection, smoothing and resizing operators,
  Adam, the Welford/Chan estimator (array functions, no framework, no registry);
- :mod:`iba_core.contract`: the :class:`Backend` a plugin implements, its registration
  (:class:`BackendSpec`, :func:`hookimpl`) and the registry (:func:`get_backend`);
- :mod:`iba_core.engines`: the Per-Sample and Readout Bottlenecks, which own the whole
  explanation workflow (targets, losses, overrides, freezing, output shaping), and
  :class:`IBA`, the front for any registered backend;
- :mod:`iba_core.apps`: the ``iba`` command, demo data and figures, metrics, plotting.

The framework fronts (``iba_torch``, ``iba_tf``) are thin adapters over the engines.
"""

from ._version import package_version
from .contract import (
    ENTRY_POINT_GROUP,
    Backend,
    BackendSpec,
    RunFailure,
    UsageError,
    available_backends,
    get_backend,
    hookimpl,
    plugin_manager,
)
from .engines import (
    IBA,
    Bottleneck,
    FewSamplesWarning,
    IBAConfig,
    PerSampleBottleneck,
    ReadoutBottleneck,
    UnseenPositionsWarning,
)
from .math import Estimator

#: The installed distribution's version (``version`` in pyproject.toml's ``[project]``).
__version__ = package_version()

__all__ = [
    "ENTRY_POINT_GROUP",
    "IBA",
    "Backend",
    "BackendSpec",
    "Bottleneck",
    "Estimator",
    "FewSamplesWarning",
    "IBAConfig",
    "PerSampleBottleneck",
    "ReadoutBottleneck",
    "RunFailure",
    "UnseenPositionsWarning",
    "UsageError",
    "available_backends",
    "get_backend",
    "hookimpl",
    "plugin_manager",
    "plot_token_map",
    "token_map_html",
]

#: Names served from :mod:`iba_core.apps` on first use (they need no framework, but the
#: apps layer is not loaded with the core).
_LAZY = {"plot_token_map": "iba_core.apps.tokens", "token_map_html": "iba_core.apps.tokens"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iba_core' has no attribute {name!r}")
