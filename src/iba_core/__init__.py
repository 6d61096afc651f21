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
)
from .math import Estimator

__version__ = "0.1.0"

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
    "UsageError",
    "available_backends",
    "get_backend",
    "hookimpl",
    "plugin_manager",
]
