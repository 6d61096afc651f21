"""The math of IBA, written once against the Python Array API.

Capacity, noise injection, the Gaussian smoothing and bilinear resize operators, Adam and
the Welford/Chan estimator.  Every function works in the namespace of the arrays it is
given (``array_api_compat``, or a backend's own namespace for TensorFlow tensors), and
nothing here imports a framework, the plugin registry, an engine or an application.
"""

from ._adam import AdamState, adam_init, adam_kernel, adam_scalars, adam_update
from ._capacity import (
    capacity,
    capacity_from_mask,
    cross_entropy,
    explanation_maps,
    inject_folded,
    inject_noise,
    input_spatial_size,
    restrict,
    restriction_mask,
    saliency_map,
)
from ._estimator import (
    ESTIMATE_FORMAT,
    Estimator,
    SavedStateError,
    check_format,
    file_name,
    read_npz,
    save_target,
)
from ._linear_ops import (
    bilinear_matrix,
    gaussian_kernel_1d,
    gaussian_smooth,
    mass_preserving_matrix,
    resize_bilinear,
    smoothing_matrix,
    smoothing_operands,
)
from ._xp import REQUIRED_FUNCTIONS, device, namespace, sigmoid_pair, to_numpy

__all__ = [
    "ESTIMATE_FORMAT",
    "REQUIRED_FUNCTIONS",
    "AdamState",
    "Estimator",
    "SavedStateError",
    "adam_init",
    "adam_kernel",
    "adam_scalars",
    "adam_update",
    "bilinear_matrix",
    "capacity",
    "capacity_from_mask",
    "check_format",
    "cross_entropy",
    "device",
    "explanation_maps",
    "file_name",
    "gaussian_kernel_1d",
    "gaussian_smooth",
    "inject_folded",
    "inject_noise",
    "input_spatial_size",
    "mass_preserving_matrix",
    "read_npz",
    "namespace",
    "resize_bilinear",
    "restrict",
    "restriction_mask",
    "saliency_map",
    "save_target",
    "sigmoid_pair",
    "smoothing_matrix",
    "smoothing_operands",
    "to_numpy",
]
