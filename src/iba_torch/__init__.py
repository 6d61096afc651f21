"""iba_torch: Information Bottleneck Attribution for PyTorch.

``from iba_torch import IBA, plot_saliency_map``.  Attributes are loaded on first
access, so the plugin registry can import this package without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["IBA", "IBAReadout", "TorchBackend", "plot_saliency_map"]

_LAZY = {
    "IBA": "iba_torch._iba",
    "IBAReadout": "iba_torch._readout",
    "TorchBackend": "iba_torch._backend",
    "plot_saliency_map": "iba_core.apps.plotting",
}

if TYPE_CHECKING:  # pragma: no cover
    from iba_core.apps.plotting import plot_saliency_map

    from ._backend import TorchBackend
    from ._iba import IBA
    from ._readout import IBAReadout


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'iba_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
