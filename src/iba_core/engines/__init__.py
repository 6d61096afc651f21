"""The engines: the Per-Sample and Readout Bottlenecks, which own the whole workflow.

:class:`PerSampleBottleneck` and :class:`ReadoutBottleneck` take a backend, a model and a
layer; :class:`Bottleneck` holds a per-sample bottleneck's settings (:class:`IBAConfig`),
statistics, hook and optimisation.  :class:`PerSampleFront` is what the framework fronts
share and :class:`IBA` the front for any registered backend.
"""

from ._bottleneck import (
    MIN_RECOMMENDED_SAMPLES,
    Bottleneck,
    FewSamplesWarning,
    check_output_rows,
    estimate_loop,
    repeat_inputs,
)
from ._config import FIELDS, IBAConfig
from ._distributed import data_parallel
from ._front import (
    IBA,
    MULTI_INPUT,
    PerSampleFront,
    analysis_options,
    estimation_batches,
    input_batches,
    refuse_multi_input,
    settings_of,
)
from ._layout import in_layout, layer_layout
from ._padding import MaskedBatch, UnseenPositionsWarning
from ._per_sample import (
    TARGET_MODES,
    PerSampleBottleneck,
    class_indices,
    model_lock,
    model_logits,
    prepared_inputs,
)
from ._readout import (
    READOUT_BETA,
    READOUT_LR,
    NotConvergedWarning,
    ReadoutBottleneck,
    ReadoutFront,
    ReadoutHead,
    TrainHistory,
    one_hot_targets,
    readout_input,
    target_cross_entropy,
)

__all__ = [
    "FIELDS",
    "IBA",
    "MIN_RECOMMENDED_SAMPLES",
    "MULTI_INPUT",
    "READOUT_BETA",
    "READOUT_LR",
    "TARGET_MODES",
    "Bottleneck",
    "FewSamplesWarning",
    "IBAConfig",
    "MaskedBatch",
    "NotConvergedWarning",
    "PerSampleBottleneck",
    "PerSampleFront",
    "ReadoutBottleneck",
    "ReadoutFront",
    "ReadoutHead",
    "TrainHistory",
    "UnseenPositionsWarning",
    "analysis_options",
    "check_output_rows",
    "class_indices",
    "data_parallel",
    "estimate_loop",
    "estimation_batches",
    "in_layout",
    "input_batches",
    "layer_layout",
    "model_lock",
    "model_logits",
    "one_hot_targets",
    "prepared_inputs",
    "readout_input",
    "refuse_multi_input",
    "repeat_inputs",
    "settings_of",
    "target_cross_entropy",
]
