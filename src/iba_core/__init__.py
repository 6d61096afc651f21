"""iba_core: Information Bottleneck Attribution, written once against the Array API.

The core holds the whole method (capacity, noise injection, smoothing, resizing, the
Welford/Chan estimator, Adam, the per-sample loop) and the backend plugin registry.
It imports no deep-learning framework; backends (``iba_torch``, ``iba_tf``, or a
third-party plugin) supply tensors, autograd and layer hooks.
"""

from ._adam import AdamState, adam_init, adam_update
from ._backend import Backend, FeatureHook, Handle, attached
from ._bottleneck import Bottleneck, FewSamplesWarning, check_output_rows, repeat_inputs
from ._capacity import (
    capacity,
    cross_entropy,
    explanation_maps,
    inject_noise,
    input_spatial_size,
    restrict,
    restriction_mask,
    saliency_map,
)
from ._estimator import Estimator
from ._linear_ops import (
    bilinear_matrix,
    gaussian_kernel_1d,
    gaussian_smooth,
    mass_preserving_matrix,
    resize_bilinear,
    smoothing_matrix,
    smoothing_operands,
)
from ._readout import (
    ReadoutBottleneck,
    ReadoutHead,
    one_hot_targets,
    readout_input,
    target_cross_entropy,
)
from ._registry import (
    ENTRY_POINT_GROUP,
    BackendSpec,
    available_backends,
    find_backend,
    get_backend,
    plugin_manager,
)
from ._xp import REQUIRED_FUNCTIONS, namespace, to_numpy
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "REQUIRED_FUNCTIONS",
    "AdamState",
    "Backend",
    "BackendSpec",
    "Bottleneck",
    "Estimator",
    "FeatureHook",
    "FewSamplesWarning",
    "Handle",
    "ReadoutBottleneck",
    "ReadoutHead",
    "adam_init",
    "adam_update",
    "attached",
    "available_backends",
    "bilinear_matrix",
    "capacity",
    "check_output_rows",
    "cross_entropy",
    "explanation_maps",
    "find_backend",
    "gaussian_kernel_1d",
    "gaussian_smooth",
    "get_backend",
    "hookimpl",
    "inject_noise",
    "input_spatial_size",
    "mass_preserving_matrix",
    "namespace",
    "one_hot_targets",
    "plugin_manager",
    "readout_input",
    "repeat_inputs",
    "resize_bilinear",
    "restrict",
    "restriction_mask",
    "saliency_map",
    "smoothing_matrix",
    "smoothing_operands",
    "target_cross_entropy",
    "to_numpy",
]
