"""iba_torch: Information Bottleneck Attribution for PyTorch.

``from iba_torch import IBA, plot_saliency_map``.  Attributes are loaded on first
access, so the plugin registry can import this package without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iba_core.contract import lazy_exports

__all__ = [
    "IBA",
    "IBAReadout",
    "TorchBackend",
    "insert_into_sequential",
    "plot_saliency_map",
    "tensor_to_np_img",
    "to_saliency_map",
    "to_unit_interval",
]

if TYPE_CHECKING:  # pragma: no cover
    from iba_core.apps.compat import tensor_to_np_img, to_saliency_map, to_unit_interval
    from iba_core.apps.plotting import plot_saliency_map

    from ._backend import TorchBackend
    from ._compat import insert_into_sequential
    from ._iba import IBA
    from ._readout import IBAReadout

#: Public name -> the module it is loaded from on first access.
_LAZY = {
    "IBA": "iba_torch._iba",
    "IBAReadout": "iba_torch._readout",
    "TorchBackend": "iba_torch._backend",
    "plot_saliency_map": "iba_core.apps.plotting",
    # Helpers of the reference library (IBA.pytorch, IBA.utils); see docs/migration.md.
    "insert_into_sequential": "iba_torch._compat",
    "tensor_to_np_img": "iba_core.apps.compat",
    "to_saliency_map": "iba_core.apps.compat",
    "to_unit_interval": "iba_core.apps.compat",
}

__getattr__, __dir__ = lazy_exports("iba_torch", _LAZY)
