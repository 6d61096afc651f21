"""iba_tf: Information Bottleneck Attribution for TensorFlow 2 / Keras 3.

``from iba_tf import IBALayer, IBACopy, IBACopyInnvestigate, plot_saliency_map``.
Attributes are loaded on first access, so the plugin registry can import this package
(``iba_tf._plugin``) without importing TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iba_core.contract import lazy_exports

__all__ = [
    "IBACopy",
    "IBACopyInnvestigate",
    "IBALayer",
    "IBAReadout",
    "TFBackend",
    "model_wo_softmax",
    "namespace",
    "plot_saliency_map",
]

_LAZY = {
    "IBACopy": "iba_tf._copy",
    "IBACopyInnvestigate": "iba_tf._copy",
    "IBALayer": "iba_tf._layer",
    "IBAReadout": "iba_tf._readout",
    "TFBackend": "iba_tf._backend",
    "model_wo_softmax": "iba_tf._copy",
    "namespace": "iba_tf._namespace:",
    "plot_saliency_map": "iba_core.apps.plotting",
}

if TYPE_CHECKING:  # pragma: no cover
    from iba_core.apps.plotting import plot_saliency_map

    from . import _namespace as namespace
    from ._backend import TFBackend
    from ._copy import IBACopy, IBACopyInnvestigate, model_wo_softmax
    from ._layer import IBALayer
    from ._readout import IBAReadout


__getattr__, __dir__ = lazy_exports("iba_tf", _LAZY)
