"""The Readout Bottleneck, written once for every backend.

A small network, the *readout head*, predicts the mask logits ``alpha`` of a bottleneck
from features recorded at several *readout layers* of a frozen model, so that an
explanation costs one forward pass instead of a per-sample optimisation:

1. First pass (no bottleneck): record the features of every readout layer and of the
   bottleneck layer.  Normalise each readout by its own estimated mean and std, resize it
   to the bottleneck's spatial size with the bilinear operator of the saliency map
   (vectors are broadcast spatially) and concatenate along channels.
2. The head, three 1x1 convolutions ``C_in -> C_in // 2 -> 2 * C_out -> C_out`` with
   ReLU between (matrix products over channels), gives ``alpha`` clamped to ``[-5, 5]``.
3. Training: a second pass injects noise with this ``alpha`` exactly as the Per-Sample
   Bottleneck does; the loss is the target-class cross-entropy plus ``beta`` times the
   mean capacity.  Only the head's parameters are trained, with the core's Adam.

All head parameters live in one flat 1-D array (:class:`ReadoutHead` describes its
layout), so the backend's ``value_and_grad`` with respect to a single array trains them,
and a readout trained on one framework loads on another (its state is plain NumPy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ..contract._backend import Backend
from ..contract._collectives import Collectives
from ..math._adam import AdamState, adam_init, adam_update
from ..math._capacity import cross_entropy, explanation_maps
from ..math._estimator import (
    ESTIMATE_FORMAT,
    MASKED_ESTIMATE_FORMAT,
    Estimator,
    SavedStateError,
    check_format,
    file_name,
    read_npz,
    save_target,
)
from ..math._linear_ops import resize_bilinear
from ..math._xp import device, namespace, to_numpy
from ._bottleneck import Bottleneck, FeatureRecorder, _caller_level, _progress, estimate_loop
from ._distributed import collectives, describe, exchange
from ._layout import in_layout, layer_layout
from ._per_sample import prepared_inputs

#: The head's output is clamped to ``[-ALPHA_BOUND, ALPHA_BOUND]`` (mask logits).
ALPHA_BOUND = 5.0
#: Bias of the head's last layer at initialisation: ``sigmoid(4.9)`` lets ~99.3% pass.
#: Just inside the clamp on purpose: at exactly 5 (the reference), about half of the
#: outputs start above the clamp, where the gradient is zero, and a channel whose outputs
#: all start there never trains (seen in practice with small heads).
INITIAL_BIAS = ALPHA_BOUND - 0.1
#: Scale of the last layer's initial weights relative to the default initialisation.
LAST_LAYER_WEIGHT_SCALE = 1e-3

#: Format mark of a readout's state.  Version 2: the embedded estimates carry their own
#: mark (:data:`iba_core.math._estimator.ESTIMATE_FORMAT`); version 1 files are refused.
_FORMAT = "iba.readout/2"


# -- the head --------------------------------------------------------------------------
class ReadoutHead:
    """Three 1x1 convolutions over channels, with parameters in one flat 1-D array.

    ``in_channels -> max(in_channels // 2, 1) -> 2 * out_channels -> out_channels``, ReLU
    between, output clamped to ``[-5, 5]``.  The flat array holds, in this order (see
    :attr:`layout`), ``w1 (C_in, H1)``, ``b1 (H1,)``, ``w2 (H1, H2)``, ``b2 (H2,)``,
    ``w3 (H2, C_out)``, ``b3 (C_out,)``: the layer acts on a pixel's channel vector ``v``
    as ``v @ w + b`` (a PyTorch ``Conv2d`` weight ``(out, in, 1, 1)`` is ``w.T``).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"channel counts must be >= 1, got {in_channels} -> {out_channels}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        h1, h2 = max(self.in_channels // 2, 1), 2 * self.out_channels
        #: ``(name, shape)`` of each parameter, in the order they are stored.
        self.layout: tuple[tuple[str, tuple[int, ...]], ...] = (
            ("w1", (self.in_channels, h1)),
            ("b1", (h1,)),
            ("w2", (h1, h2)),
            ("b2", (h2,)),
            ("w3", (h2, self.out_channels)),
            ("b3", (self.out_channels,)),
        )
        self._slices: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        start = 0
        for name, shape in self.layout:
            stop = start + math.prod(shape)
            self._slices[name] = (start, stop, shape)
            start = stop
        #: Number of parameters (length of the flat array).
        self.size = start

    def __repr__(self) -> str:
        dims = " -> ".join(str(s[-1]) for n, s in self.layout if n.startswith("w"))
        return f"ReadoutHead({self.in_channels} -> {dims}, {self.size} parameters)"

    def init(self, seed: int | None = 0, dtype: Any = np.float32) -> np.ndarray:
        """A fresh flat parameter array (NumPy).

        Layers 1 and 2 use PyTorch's default ``Conv2d`` initialisation (uniform in
        ``+-1/sqrt(fan_in)``); the last layer starts near "let everything pass": bias 4.9
        (just inside the clamp at 5, so every output has a gradient) and weights scaled
        by 1e-3, so ``alpha`` is about 4.9 for every input.
        """
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for name, shape in self.layout:
            fan_in = shape[0] if name.startswith("w") else self._slices["w" + name[1:]][2][0]
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = rng.uniform(-bound, bound, shape)
        params["w3"] *= LAST_LAYER_WEIGHT_SCALE
        params["b3"] = np.full(params["b3"].shape, INITIAL_BIAS)
        return self.pack(params, dtype=dtype)

    def pack(self, params: Mapping[str, Any], dtype: Any = np.float32) -> np.ndarray:
        """Named NumPy parameters -> the flat array; shapes are checked."""
        parts = []
        for name, shape in self.layout:
            if name not in params:
                raise ValueError(f"readout head parameter {name!r} is missing")
            a = np.asarray(params[name])
            if tuple(a.shape) != shape:
                raise ValueError(
                    f"readout head parameter {name!r} has shape {tuple(a.shape)}, but this head "
                    f"({self.in_channels} input channels, {self.out_channels} output channels) "
                    f"needs {shape}; the weights belong to other readout layers or another "
                    "bottleneck layer"
                )
            parts.append(a.reshape(-1))
        return np.concatenate(parts).astype(dtype)

    def unpack(self, flat: Any) -> dict[str, Any]:
        """The flat array (NumPy or any backend's) -> named parameters (views/slices)."""
        if tuple(flat.shape) != (self.size,):
            raise ValueError(
                f"expected a flat parameter array of shape ({self.size},), got {tuple(flat.shape)}"
            )
        if isinstance(flat, np.ndarray):
            return {n: flat[a:b].reshape(s) for n, (a, b, s) in self._slices.items()}
        xp = namespace(flat)
        return {n: xp.reshape(flat[a:b], s) for n, (a, b, s) in self._slices.items()}

    def __call__(self, flat: Any, inputs: Any) -> Any:
        """``alpha`` ``(N, C_out, ...)`` from readout inputs ``(N, C_in, ...)``.

        ``flat`` holds the parameters in the inputs' namespace and dtype.  Differentiable
        with respect to ``flat``.
        """
        xp = namespace(inputs)
        p = self.unpack(flat)
        # A traced batch axis may be unknown (None): -1 lets the reshapes infer it.
        shape = tuple(-1 if s is None else int(s) for s in inputs.shape)
        if len(shape) < 2 or shape[1] != self.in_channels:
            raise ValueError(f"the readout head expects inputs (N, {self.in_channels}, ...), got {shape}")
        n, spatial = shape[0], shape[2:]
        # Channels last, pixels as rows: each 1x1 convolution is one 2-D matrix product.
        if spatial:
            order = (0, *range(2, len(shape)), 1)
            v = xp.reshape(xp.permute_dims(inputs, order), (-1, self.in_channels))
        else:
            v = inputs
        h = _relu(xp, xp.matmul(v, p["w1"]) + p["b1"])
        h = _relu(xp, xp.matmul(h, p["w2"]) + p["b2"])
        out = _clamp(xp, xp.matmul(h, p["w3"]) + p["b3"], ALPHA_BOUND)
        if not spatial:
            return out
        out = xp.reshape(out, (n, *spatial, self.out_channels))
        return xp.permute_dims(out, (0, len(shape) - 1, *range(1, len(shape) - 1)))


def _relu(xp: Any, x: Any) -> Any:
    return xp.maximum(x, xp.zeros_like(x))


def _clamp(xp: Any, x: Any, bound: float) -> Any:
    """``x`` clamped to ``[-bound, bound]`` (``min(x, b) = -max(-x, -b)``); gradient 1 inside.

    Negative values are kept: the reference library clamped the readout's output at zero
    by accident, so its masks could never close below ``sigmoid(0) = 0.5``.
    """
    low = xp.full((), -float(bound), dtype=x.dtype, device=device(x))
    return -xp.maximum(-xp.maximum(x, low), low)


def readout_input(
    features: Sequence[Any], means: Sequence[Any], stds: Sequence[Any], size: tuple[int, ...]
) -> Any:
    """The head's input: normalised readouts at the bottleneck's size, stacked on channels.

    Args:
        features: one array per readout layer, ``(N, C_i)`` (vectors) or ``(N, C_i, ...)``
            with as many spatial axes as ``size``.
        means, stds: per-sample statistics of each readout, shapes ``(C_i, ...)``; ``std``
            already clamped away from zero.
        size: the bottleneck's spatial size ``(h, w)`` / ``(T,)`` (``()`` for vectors).

    Returns:
        ``(N, sum C_i, *size)``: each readout ``(f - mean) / std``, resized bilinearly
        (pixel-centre aligned, the saliency map's operator without mass preservation) or,
        for vectors, broadcast over every position.
    """
    if not features:
        raise ValueError("a readout needs at least one readout layer")
    xp = namespace(features[0])
    size = tuple(int(s) for s in size)
    parts = []
    for f, mean, std in zip(features, means, stds, strict=True):
        r = (f - mean) / std
        n, c = int(r.shape[0]), int(r.shape[1])
        if r.ndim == 2:
            if size:
                r = xp.reshape(r, (n, c, *([1] * len(size))))
                r = xp.broadcast_to(r, (n, c, *size))
        elif r.ndim - 2 != len(size):
            raise ValueError(
                f"a readout feature map of shape {tuple(r.shape)} has {r.ndim - 2} spatial axes "
                f"but the bottleneck has {len(size)}; readout layers must give vectors (N, C) or "
                "maps with the bottleneck's number of spatial axes"
            )
        elif tuple(int(s) for s in r.shape[2:]) != size:
            r = resize_bilinear(r, size, preserve_sum=False)
        parts.append(r)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


def one_hot_targets(logits: Any, targets: Any) -> Any:
    """One-hot ``(B, K)`` array like ``logits`` (namespace, dtype, device) from class indices.

    ``targets`` holds one class index per sample, ``(B,)`` (NumPy or any array that
    converts to it); row ``i`` is the target of sample ``i``.
    """
    t = np.asarray(to_numpy(targets)).reshape(-1)
    if getattr(logits, "ndim", 0) != 2:
        raise ValueError(
            f"the target-class loss needs logits (B, K), got shape "
            f"{tuple(logits.shape)}; pass a model loss for other outputs"
        )
    b, k = int(logits.shape[0]), int(logits.shape[1])
    if t.shape != (b,):
        raise ValueError(f"expected one target per sample ({b}), got {t.shape[0]}")
    if t.dtype.kind not in "iu" and not (t.dtype.kind == "f" and np.all(t == np.round(t))):
        raise ValueError(f"targets must be class indices, got dtype {t.dtype}")
    t = t.astype(np.int64)
    if b and (t.min() < 0 or t.max() >= k):
        raise ValueError(f"targets {sorted(set(t.tolist()))} out of range for {k} classes")
    return namespace(logits).asarray(np.eye(k)[t], dtype=logits.dtype, device=device(logits))


def target_cross_entropy(logits: Any, targets: Any) -> Any:
    """Mean over the batch of ``-log_softmax(logits)[i, targets[i]]``.

    ``logits`` is ``(B, K)``; ``targets`` holds one class index per sample, ``(B,)``
    (see :func:`one_hot_targets`).  Each sample is scored against its own target.
    """
    return cross_entropy(logits, one_hot_targets(logits, targets))


# -- recording readout layers ---------------------------------------------------------
def _describe(layer: Any) -> str:
    if isinstance(layer, str):
        return repr(layer)
    name = getattr(layer, "name", None)
    return repr(name) if isinstance(name, str) else type(layer).__name__


TrainBatch = tuple[Any, Any]
"""One training batch for the core: inputs in the backend's type and layout, and the
targets (one class index per sample, NumPy) or ``None`` for the model's predicted class."""


#: Default peak learning rate of the readout's training (the reference used 1e-5).  On the
#: demo data (1,400 images, 3 epochs, beta 1) the readout maps correlate with the
#: per-sample maps at 0.68 (lr 1e-3), 0.78 (3e-3) and 0.83 (1e-2), against 0.66 for the
#: untrained, all-open mask at the reference's 1e-5 (``benchmarks/bench_readout_defaults.py``).
READOUT_LR = 1e-2
#: Default weight of the mean capacity when training a readout.  The per-sample default
#: (10) suits ten Adam steps from an open mask; a readout trained to convergence with it
#: closes almost every mask (held-out capacity 6e-5 nats per element on the demo data,
#: 0.15 with beta 1).
READOUT_BETA = 1.0
#: Learning-rate schedules of :meth:`ReadoutBottleneck.train`.
SCHEDULES = ("cosine", "constant")
#: Fraction of the steps spent warming the learning rate up (``"cosine"``).
WARMUP_FRACTION = 0.05
#: Warm-up steps while the number of steps is not yet known.
WARMUP_STEPS_UNKNOWN = 10


class NotConvergedWarning(UserWarning):
    """The readout's training has clearly not converged (see :meth:`ReadoutBottleneck.train`)."""


class TrainHistory(list[float]):
    """The mean training loss of each epoch (a list, as before), plus ``history``: one
    dict per epoch with ``epoch``, ``loss``, ``lr`` (the last step's), ``steps``,
    ``batch_losses``, and ``val_loss``/``val_capacity``/``val_alpha`` (held-out loss,
    mean capacity in nats per element, mean mask logit) when there is held-out data, else
    ``alpha`` (the mean mask logit on the last training batch)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.history: list[dict[str, Any]] = []


def learning_rate(lr: float, step: int, total: int | None, schedule: str) -> float:
    """The rate of step ``step`` (0-based) of ``total`` (``None``: not known yet)."""
    if schedule == "constant":
        return float(lr)
    warmup = WARMUP_STEPS_UNKNOWN if total is None else max(1, round(WARMUP_FRACTION * total))
    if step < warmup:
        return float(lr) * (step + 1) / (warmup + 1)
    if total is None:
        return float(lr)
    progress = min(1.0, (step - warmup + 0.5) / max(1, total - warmup))
    return float(lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _length(batches: Any) -> int | None:
    try:
        return int(len(batches))
    except TypeError:
        return None


def _holdout_period(validation: Any) -> int:
    """For a fraction: hold out every ``k``-th batch (``k >= 2``); else 0."""
    if validation is None or not isinstance(validation, (int, float)):
        return 0
    if isinstance(validation, bool) or not 0 < validation < 1:
        raise ValueError(
            f"validation must be a fraction in (0, 1), held-out batches or None, got {validation!r}"
        )
    return max(2, round(1 / validation))


def _not_converged(records: list[dict[str, Any]], steps: int) -> str | None:
    """Why the training in ``records`` has clearly not converged, or ``None``."""
    last = records[-1]
    alpha = last.get("val_alpha", last.get("alpha"))
    if alpha is not None and alpha > INITIAL_BIAS - 0.25:
        return (
            f"after {steps} steps the mask still lets almost everything pass (mean alpha "
            f"{alpha:.2f}, initially {INITIAL_BIAS:g})"
        )
    key = "val_loss" if "val_loss" in last else "loss"
    if len(records) >= 2:
        before, now = records[-2][key], last[key]
        if before > 0 and now < 0.8 * before:
            what = "held-out" if key == "val_loss" else "training"
            return f"the {what} loss was still falling steeply in the last epoch ({before:.4g} -> {now:.4g})"
    return None


def _split_of(dist: Collectives, backend: Backend, batches: Iterable[TrainBatch]) -> str:
    """``"shared"`` when every process's first training batch is the same, else ``"own"``."""
    first = next(iter(batches), None)
    mine = None if first is None else describe(backend, first[0])
    return "shared" if len(set(dist.all_gather(mine))) == 1 and mine is not None else "own"


def _rows_of(dist: Collectives, batch: TrainBatch, split: str | None) -> slice:
    """The rows of a training batch this process trains on: an equal share of a batch
    that every process holds, or all of its own batch."""
    if split != "shared":
        return slice(0, int(batch[0].shape[0]))
    n = int(batch[0].shape[0])
    shards, rank = dist.processes, dist.rank
    return slice(rank * n // shards, (rank + 1) * n // shards)


def _rows(batch: TrainBatch, rows: slice) -> TrainBatch:
    x, targets = batch
    if rows == slice(0, int(x.shape[0])) or rows == slice(None):
        return batch
    if targets is not None and hasattr(targets, "__getitem__") and len(targets) == int(x.shape[0]):
        targets = targets[rows]
    return x[rows, ...], targets


def _summed_step(
    dist: Collectives, backend: Backend, local_step: Callable[[], tuple[Any, ...]]
) -> tuple[float, Any, int, Any]:
    """One training step shared by the processes: the loss and gradient of the whole
    batch, the row-weighted sum of every process's (the same sum, in rank order, on every
    process)."""
    kept: dict[str, Any] = {}

    def work() -> tuple[float, Any, int]:
        value, grad, n, local_inputs = local_step()
        kept["grad"], kept["inputs"] = grad, local_inputs
        return float(value), None if grad is None else np.asarray(backend.to_numpy(grad)), n

    parts = exchange(dist, work)
    if any(n == 0 for _, _, n in parts):  # known to every process: all raise
        raise ValueError(
            f"a process got no rows of a training batch of {sum(n for _, _, n in parts)}: give "
            f"batches of at least as many rows as there are processes ({dist.processes})"
        )
    total = sum(n for _, _, n in parts)
    value = sum(v * n for v, _, n in parts) / total
    grad = sum(g.astype(np.float64) * (n / total) for _, g, n in parts)
    return value, backend.from_numpy(np.asarray(grad), like=kept["grad"]), total, kept["inputs"]


def _check_train_settings(epochs: int, lr: float, beta: float, schedule: str) -> None:
    """Refuse settings of :meth:`ReadoutBottleneck.train` that cannot train."""
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _no_batches(bar: Any, epoch: int, skipped: list[TrainBatch], every: int) -> NoReturn:
    """Close the epoch's progress bar and say why it trained on nothing."""
    if bar is not None:
        bar.close()
    if skipped:
        raise ValueError(
            f"the data yielded no batches in epoch {epoch + 1} to train on: "
            f"every {every}th batch is held out (validation); give more "
            "batches or validation=None"
        )
    raise ValueError(
        f"the data yielded no batches in epoch {epoch + 1}; give data that can "
        "be iterated once per epoch (a list or a DataLoader, not a generator)"
    )


def _check_estimate_formats(state: Mapping[str, np.ndarray], remedy: str) -> None:
    """Refuse a readout state holding an estimate without the current format mark."""
    for prefix in sorted(
        {
            k.rsplit(".", 1)[0] + "."
            for k in state
            if k.startswith(("readout.", "bottleneck.")) and k.endswith(".mean")
        }
    ):
        check_format(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
            (ESTIMATE_FORMAT, MASKED_ESTIMATE_FORMAT),
            f"estimate {prefix[:-1]!r} in the readout state",
            remedy,
        )


def _saved_head_params(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The head's saved parameters (``head.*``), refused unless finite numbers."""
    head_params = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    for name, value in head_params.items():
        if value.dtype.kind not in "iuf" or not np.all(np.isfinite(value)):
            raise SavedStateError(
                f"the readout head's {name!r} holds {value.dtype} values "
                "that are not finite numbers; train the readout again"
            )
    return head_params


def _saved_config(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The settings saved with a readout (``{}`` when the state has none)."""
    try:
        config: dict[str, Any] = json.loads(str(state.get("config", "{}")))
    except json.JSONDecodeError:
        raise SavedStateError(
            "the readout state's 'config' is not the JSON that save() "
            "writes; train and save the readout again"
        ) from None
    return config


@dataclasses.dataclass
class _TrainRun:
    """One call of :meth:`ReadoutBottleneck.train`: its settings, and the state kept from
    step to step (the noise generator, the steps made, the steps per epoch once known)."""

    batch_loss: Callable[..., Any]
    model_loss: Callable[[Any, Any], Any] | None
    lr: float
    schedule: str
    epochs: int
    every: int
    per_epoch: int | None
    seed: int | None
    dist: Collectives | None
    split: str | None
    generator: Any = None
    step: int = 0


class ReadoutBottleneck:
    """A Readout Bottleneck on one layer of a frozen model, for any backend.

    Framework fronts (``iba_torch.IBAReadout``, ``iba_tf.IBAReadout``) convert data and
    call :meth:`estimate`, :meth:`train` and :meth:`analyze`.  Hooks are put on the model
    only while one of these runs and are always removed afterwards.

    Args:
        backend: the model's backend.
        model: the frozen model; :meth:`Backend.call` runs it.
        layer: the bottleneck layer (object or name, as :meth:`Backend.attach` accepts).
        readout_layers: layers whose outputs feed the head (objects or names); the
            bottleneck layer may be one of them.
        bottleneck: the :class:`Bottleneck` that holds the bottleneck layer's statistics,
            smoothing ``sigma``, ``min_std``, ``active_neurons_threshold`` and ``relu``.
        seed: seed of the head's initial weights.
        labels: names of the readout layers for messages (default: derived from the layers).
        progbar: show tqdm progress bars.
    """

    def __init__(
        self,
        backend: Backend,
        model: Any,
        layer: Any,
        readout_layers: Sequence[Any],
        *,
        bottleneck: Bottleneck | None = None,
        seed: int | None = 0,
        labels: Sequence[str] | None = None,
        progbar: bool = False,
    ) -> None:
        readout_layers = list(readout_layers)
        if not readout_layers:
            raise ValueError("give at least one readout layer")
        self.backend = backend
        self.model = model
        self.layer = layer
        self.readout_layers = readout_layers
        self.bottleneck = bottleneck if bottleneck is not None else Bottleneck()
        self.bottleneck.backend = backend
        self.seed = seed
        self.progbar = bool(progbar)
        labels = [_describe(r) for r in readout_layers] if labels is None else list(labels)
        if len(labels) != len(readout_layers):
            raise ValueError(f"got {len(labels)} labels for {len(readout_layers)} readout layers")
        self.labels = labels
        #: One estimate of the feature statistics per readout layer (channels-first).
        self.estimators = [Estimator() for _ in readout_layers]
        #: The head, built once the feature shapes are known (after estimate or load).
        self.head: ReadoutHead | None = None
        #: Training steps the head's parameters have seen (0: untrained).
        self.steps = 0
        #: Mask logits ``(N, C, ...)`` of the last :meth:`analyze`.
        self.alpha: Any = None
        self._last_features: Any = None
        self._params: Any = None  # flat parameters: NumPy, or the backend's after first use
        self._adam: AdamState | None = None
        self._recorders = [FeatureRecorder(f"readout layer {lbl}") for lbl in labels]
        self._stats_cache: dict[Any, list[tuple[Any, Any]]] = {}
        #: The :class:`TrainHistory` of the last :meth:`train` call, or ``None``.
        self.history: TrainHistory | None = None

    # -- hooks and the first pass ----------------------------------------------------
    @contextlib.contextmanager
    def attached(self) -> Iterator[ReadoutBottleneck]:
        """Context: hooks on the bottleneck layer and every readout layer (removed on exit)."""
        backend, model = self.backend, self.model
        with contextlib.ExitStack() as stack:
            hooks: list[tuple[Any, Callable[[Any], Any]]] = [
                (self.layer, self.bottleneck),
                *zip(self.readout_layers, self._recorders, strict=True),
            ]
            for layer, hook in hooks:
                layout = layer_layout(backend, model, layer, None)
                handle = backend.attach(model, layer, in_layout(backend, hook, layout))
                stack.callback(handle.remove)
            yield self

    def record(self, x: Any) -> tuple[Any, list[Any], Any]:
        """First pass (inside :meth:`attached`): ``(output, readout features, bottleneck
        features)``, all cut from any gradient graph."""
        bn = self.bottleneck
        for r in self._recorders:
            r.start(self.backend)
        try:
            with bn.recording():
                output = self.backend.call(self.model, x)
                bn_features = bn.take_recorded()
        finally:
            for r in self._recorders:
                r.stop()
        features = [r.take() for r in self._recorders]
        for r in self._recorders:
            r.features = []
        n = int(bn_features.shape[0])
        for label, f in zip(self.labels, features, strict=True):
            if int(f.shape[0]) != n:
                raise ValueError(
                    f"readout layer {label} gave a batch of {f.shape[0]}, the "
                    f"bottleneck layer {n}; the model must keep the batch axis first"
                )
        return self.backend.stop_gradient(output), features, bn_features

    # -- statistics ------------------------------------------------------------------
    def has_statistics(self) -> bool:
        """Whether every readout layer and the bottleneck layer have statistics."""
        return self.bottleneck.has_statistics() and all(e.n > 0 for e in self.estimators)

    def estimate(
        self,
        batches: Iterable[Any],
        *,
        n_samples: int = 10000,
        progbar: bool | None = None,
        reset: bool = True,
    ) -> list[Estimator]:
        """Estimate mean/std of the bottleneck layer and of every readout layer.

        ``batches`` yields model inputs in the backend's type.  Stops after
        ``n_samples`` samples; warns (:class:`FewSamplesWarning`) below 1,000.  Builds
        the head once the shapes are known (a head of matching shape is kept).
        """
        bn = self.bottleneck
        if reset:
            bn.estimator.reset()
            for e in self.estimators:
                e.reset()

        def record(x: Any) -> list[Any]:
            _, features, bn_features = self.record(x)
            return [bn_features, *features]

        with self.attached():
            estimate_loop(
                self.backend,
                batches,
                record,
                [bn.estimator, *self.estimators],
                n_samples=n_samples,
                progbar=self.progbar if progbar is None else progbar,
            )
        self._stats_cache.clear()
        self._build_head()
        return self.estimators

    def feature_shapes(self) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """Channels-first per-sample shapes: ``(bottleneck, [readout layers])``."""
        if not self.has_statistics():
            raise RuntimeError(
                "the readout has no feature statistics: call estimate() first (or load a trained readout)"
            )
        bn_shape = tuple(int(s) for s in self.bottleneck.statistics()[0].shape)
        return bn_shape, [tuple(e.shape or ()) for e in self.estimators]

    def _build_head(self) -> None:
        bn_shape, shapes = self.feature_shapes()
        for label, shape in zip(self.labels, shapes, strict=True):
            if len(shape) > 1 and len(shape) != len(bn_shape):
                raise ValueError(
                    f"readout layer {label} gives features of shape {shape}: {len(shape) - 1} "
                    f"spatial axes, but the bottleneck layer's {bn_shape} has "
                    f"{len(bn_shape) - 1}; use vectors or maps like the bottleneck's"
                )
        in_channels = sum(s[0] for s in shapes)
        head = ReadoutHead(in_channels, bn_shape[0])
        if self.head is None or head.layout != self.head.layout:
            self.head = head
            self._params = head.init(self.seed)
            self._adam = None
            self.steps = 0

    def _readout_stats(self, like: Any) -> list[tuple[Any, Any]]:
        key = (type(like), str(device(like)), str(like.dtype))
        cached = self._stats_cache.get(key)
        if cached is None:
            min_std = self.bottleneck.min_std
            cached = []
            for est in self.estimators:
                std = np.maximum(est.std(), min_std)
                std = np.where(std > 0, std, 1.0)  # constant features (min_std=0): r = 0
                cached.append(
                    (self.backend.from_numpy(est.mean(), like=like), self.backend.from_numpy(std, like=like))
                )
            self._stats_cache[key] = cached
        return cached

    def readout_input(self, features: Sequence[Any], bn_features: Any) -> Any:
        """The head's input for recorded features (see :func:`readout_input`)."""
        _, shapes = self.feature_shapes()
        for label, f, shape in zip(self.labels, features, shapes, strict=True):
            got = tuple(int(s) for s in f.shape[1:])
            if got != shape:
                raise ValueError(
                    f"readout layer {label} gives features of shape {got} per sample but its "
                    f"statistics (and the head) were made for {shape}; estimate() again for "
                    "this model"
                )
        stats = self._readout_stats(bn_features)
        return readout_input(
            features,
            [m for m, _ in stats],
            [s for _, s in stats],
            tuple(int(s) for s in bn_features.shape[2:]),
        )

    # -- parameters ------------------------------------------------------------------
    def _params_like(self, like: Any) -> Any:
        p = self._params
        if (
            isinstance(p, np.ndarray)
            or type(p) is not type(like)
            or p.dtype != like.dtype
            or str(device(p)) != str(device(like))
        ):
            p = self.backend.from_numpy(
                np.asarray(self.backend.to_numpy(p) if not isinstance(p, np.ndarray) else p), like=like
            )
            self._params = p
            if self._adam is not None and (
                type(self._adam.m) is not type(p) or self._adam.m.dtype != p.dtype
            ):
                self._adam = None
        return p

    def _require_head(self) -> ReadoutHead:
        if self.head is None:
            raise RuntimeError(
                "the readout has no head yet: call estimate() on some data first (or load a trained readout)"
            )
        return self.head

    def predict_alpha(self, x: Any) -> tuple[Any, Any]:
        """One forward pass: ``(alpha, bottleneck features)`` for inputs ``x``."""
        head = self._require_head()
        with self.attached():
            _, features, bn_features = self.record(x)
        inputs = self.readout_input(features, bn_features)
        return head(self._params_like(bn_features), inputs), bn_features

    # -- training --------------------------------------------------------------------
    def loss(
        self,
        params: Any,
        x: Any,
        inputs: Any,
        bn_features: Any,
        targets: Any,
        noise: Any,
        *,
        beta: float,
        model_loss: Callable[[Any, Any], Any] | None = None,
    ) -> Any:
        """Training loss for one batch (inside :meth:`attached`): model loss of the
        restricted second pass plus ``beta`` times the mean capacity (nats per element).

        ``inputs`` and ``bn_features`` come from the first pass; ``noise`` is a standard
        normal draw shaped like ``bn_features``.  ``targets`` go to ``model_loss(output,
        targets)``; without a model loss they are one-hot rows (:func:`one_hot_targets`)
        for the cross-entropy.  Differentiable in ``params``; pure array code, so a
        backend may compile it.
        """
        head = self._require_head()
        xp = namespace(bn_features)
        alpha = head(params, inputs)
        bn = self.bottleneck
        with bn.restricting(alpha, noise=noise):
            output = self.backend.call(self.model, x)
        if model_loss is None:
            model_term = cross_entropy(output, targets)
        else:
            model_term = model_loss(output, targets)
        if getattr(model_term, "ndim", 0) != 0:
            raise ValueError(
                f"the model loss must be a scalar (the mean over the batch), got "
                f"shape {tuple(model_term.shape)}"
            )
        return model_term + beta * xp.mean(bn.capacity(bn_features, alpha))

    def _batch(self, batch: TrainBatch, model_loss: Any) -> tuple[Any, Any, Any, Any]:
        x, targets = batch
        output, features, bn_features = self.record(x)
        if model_loss is None:
            if targets is None:
                out = self.backend.to_numpy(output)
                if out.ndim != 2:
                    raise ValueError(
                        "without targets the readout explains the predicted "
                        f"class, which needs logits (B, K); the model gives "
                        f"{out.shape}"
                    )
                targets = np.argmax(out, axis=1)
            targets = one_hot_targets(output, targets)
        return x, self.readout_input(features, bn_features), bn_features, targets

    def train(
        self,
        batches: Iterable[TrainBatch],
        *,
        epochs: int = 1,
        beta: float = 10.0,
        lr: float = READOUT_LR,
        schedule: str = "constant",
        validation: float | Iterable[TrainBatch] | None = None,
        model_loss: Callable[[Any, Any], Any] | None = None,
        seed: int | None = None,
        progbar: bool | None = None,
        compile: bool | Callable[[Callable[..., Any]], Callable[..., Any]] = False,
        warn: bool = True,
        distributed: bool | str | None = None,
    ) -> TrainHistory:
        """Train the head with Adam; returns the mean training loss of each epoch
        (a :class:`TrainHistory`: a list, with the per-epoch records in ``.history``).

        ``batches`` yields ``(x, targets)`` (:data:`TrainBatch`) and is iterated once per
        epoch, so it must be re-iterable (a list, a ``DataLoader``).  The loss is
        ``model_loss(output, targets)`` (default: the target-class cross-entropy, each
        sample against its own target) plus ``beta`` times the mean capacity.  ``seed``
        makes the noise reproducible.  The model stays frozen; Adam's state carries over
        between calls.

        Learning rate: ``lr`` is the peak of the ``schedule``: ``"cosine"`` (the fronts'
        default) rises linearly over the first 5% of the steps and then decays to zero
        along a cosine; ``"constant"`` (this method's default, for recipes tuned with a
        fixed rate) keeps it, as the reference did.  The default :data:`READOUT_LR` (1e-2)
        replaces the reference's 1e-5, which suits about ten epochs over ImageNet but
        barely moves the head on a few thousand images; with the cosine decay, the same
        rate settles on large data sets too.  The number of steps is
        ``epochs * len(batches)`` (counted in the first epoch when ``batches`` has no
        length; the rate then holds after the warm-up until it is known).

        ``validation``: held-out ``(x, targets)`` batches, or a fraction ``f`` in
        ``(0, 1)``: every ``round(1/f)``-th batch of ``batches`` is then held out of
        training (with a loader that shuffles, these differ between epochs; pass separate
        batches for a strict held-out set).  After each epoch the held-out loss and mean
        capacity (nats per element, noise seeded by 0) are measured and shown in the
        progress bar.  :class:`NotConvergedWarning` is issued (unless ``warn=False``)
        when training has clearly not converged: the masks still let almost everything
        pass as at initialisation, or the (held-out) loss fell by more than 20% over the
        last epoch.

        ``compile=True`` runs the second pass and its gradient through
        :meth:`Backend.compile` (or through ``compile`` itself when it is a callable, e.g.
        ``tf.function`` with options); ``model_loss`` must then be traceable.  Compiling
        happens once per call (and per batch shape).

        Under the framework's distributed runtime (see
        :func:`~iba_core.engines.data_parallel`) the processes share each step: when every
        process is given the same batches (``distributed="shared"``), each takes an equal
        share of each batch's rows (and of its noise); when each reads its own
        (``"own"``, e.g. through a ``DistributedSampler``), each takes its batch.  The
        gradients are summed over the processes, weighted by their rows, so every process
        makes the same update, equal to one process's on the whole batch to round-off.
        ``None`` tells the two apart by the first batch.
        """
        _check_train_settings(epochs, lr, beta, schedule)
        every = _holdout_period(validation)
        # A number is a fraction (``every`` > 0); otherwise held-out batches or None.
        held_out = None if every or validation is None or isinstance(validation, (int, float)) else validation
        self._require_statistics()
        progbar = self.progbar if progbar is None else progbar
        backend = self.backend
        epochs = int(epochs)
        per_epoch = _length(batches)
        if per_epoch is not None and every:
            per_epoch -= per_epoch // every
        history = TrainHistory()
        start_steps = self.steps
        dist = collectives(backend, distributed)
        split = None
        if dist is not None:
            split = distributed if isinstance(distributed, str) else _split_of(dist, backend, batches)
        run = _TrainRun(
            batch_loss=self._batch_loss(beta, model_loss, compile),
            model_loss=model_loss,
            lr=lr,
            schedule=schedule,
            epochs=epochs,
            every=every,
            per_epoch=per_epoch,
            seed=seed,
            dist=dist,
            split=split,
        )
        with self.attached():
            for epoch in range(epochs):
                record = self._train_epoch(run, batches, epoch, beta, held_out, progbar)
                history.append(record["loss"])
                history.history.append(record)
        self.history = history
        if warn:
            reason = _not_converged(history.history, self.steps - start_steps)
            if reason:
                warnings.warn(
                    NotConvergedWarning(
                        f"the readout has not converged: {reason}. Train for more epochs or with "
                        f"a larger lr (now {lr:g}, schedule {schedule!r}), or on more data; "
                        "warn=False silences this"
                    ),
                    stacklevel=_caller_level(),
                )
        return history

    def _batch_loss(
        self,
        beta: float,
        model_loss: Callable[[Any, Any], Any] | None,
        compile: bool | Callable[[Callable[..., Any]], Callable[..., Any]],
    ) -> Callable[..., Any]:
        """:meth:`loss` as a function of ``(params, x, inputs, bn_features, targets,
        noise)``, compiled as ``train``'s ``compile`` asks."""

        def batch_loss(p: Any, x: Any, inputs: Any, bn_features: Any, targets: Any, noise: Any) -> Any:
            return self.loss(p, x, inputs, bn_features, targets, noise, beta=beta, model_loss=model_loss)

        if callable(compile):
            return compile(batch_loss)
        if compile:
            return self.backend.compile(batch_loss)
        return batch_loss

    def _train_epoch(
        self,
        run: _TrainRun,
        batches: Iterable[TrainBatch],
        epoch: int,
        beta: float,
        held_out: Iterable[TrainBatch] | None,
        progbar: bool,
    ) -> dict[str, Any]:
        """One epoch of :meth:`train` (inside :meth:`attached`): its record for
        :class:`TrainHistory`."""
        total, count, losses, rate = 0.0, 0, [], float(run.lr)
        skipped: list[TrainBatch] = []
        inputs = None
        shown = progbar and (run.dist is None or run.dist.is_main)  # one bar: rank 0's
        bar = _progress(shown, desc=f"train epoch {epoch + 1}/{run.epochs}", unit="batch")
        for i, batch in enumerate(batches):
            if run.every and i % run.every == run.every - 1:
                skipped.append(batch)
                continue
            value, n, rate, inputs = self._train_step(run, batch)
            total, count = total + value * n, count + n
            losses.append(float(value))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}", lr=f"{rate:.2g}")
        if count == 0:
            _no_batches(bar, epoch, skipped, run.every)
        if run.per_epoch is None:
            run.per_epoch = len(losses)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": total / count,
            "lr": rate,
            "steps": len(losses),
        }
        check = skipped if run.every else held_out
        if check is not None and (skipped or not run.every):
            val_loss, val_cap, val_alpha = self._held_out(check, beta, run.model_loss)
            record.update(val_loss=val_loss, val_capacity=val_cap, val_alpha=val_alpha)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.4g}",
                    val_loss=f"{val_loss:.4g}",
                    val_capacity=f"{val_cap:.3g}",
                )
        else:
            record["alpha"] = self._alpha_mean(inputs)
        if bar is not None:
            bar.close()
        record["batch_losses"] = losses
        return record

    def _train_step(self, run: _TrainRun, batch: TrainBatch) -> tuple[Any, int, float, Any]:
        """One Adam step on one training batch (shared by the processes under a
        distributed run): ``(loss, rows, learning rate, the head's inputs)``."""
        if run.dist is None:
            value, grad, n, inputs = self._local_step(run, batch, slice(None))
        else:
            rows = _rows_of(run.dist, batch, run.split)
            local_step = functools.partial(self._local_step, run, batch, rows)
            value, grad, n, inputs = _summed_step(run.dist, self.backend, local_step)
        params = self._params_like(grad)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss became {value} at step {self.steps}; lower lr "
                "or check the model loss and the feature statistics"
            )
        if self._adam is None:
            self._adam = adam_init(params)
        total_steps = None if run.per_epoch is None else run.per_epoch * run.epochs
        rate = learning_rate(run.lr, run.step, total_steps, run.schedule)
        params, self._adam = adam_update(params, grad, self._adam, lr=rate)
        self._params = self.backend.stop_gradient(params)
        self.steps += 1
        run.step += 1
        return value, n, rate, inputs

    def _local_step(self, run: _TrainRun, batch: TrainBatch, rows: slice) -> tuple[Any, ...]:
        """``(loss, gradient, rows, the head's inputs)`` of this process's ``rows`` of a
        training batch (``(0.0, None, 0, None)`` when it has none)."""
        backend = self.backend
        if rows.start is not None and rows.start == rows.stop:
            return 0.0, None, 0, None
        x, inputs, bn_features, targets = self._batch(_rows(batch, rows), run.model_loss)
        params = self._params_like(bn_features)
        if run.seed is not None and run.generator is None:
            run.generator = backend.make_generator(int(run.seed), bn_features)
        # The noise of the whole batch, as one process draws it, then these rows.  Drawn
        # through draw(), which passes a functional key on (JAX) so each step differs.
        whole = int(batch[0].shape[0]) if run.split == "shared" else int(bn_features.shape[0])
        noise, run.generator = backend.draw(
            (whole, *tuple(bn_features.shape)[1:]), bn_features, run.generator
        )
        noise = noise[rows if run.split == "shared" else slice(None), ...]

        def fn(
            p: Any,
            x: Any = x,
            inputs: Any = inputs,
            bn_features: Any = bn_features,
            targets: Any = targets,
            noise: Any = noise,
        ) -> Any:
            return run.batch_loss(p, x, inputs, bn_features, targets, noise)

        value, grad = backend.value_and_grad(fn, params)
        return value, grad, int(bn_features.shape[0]), inputs

    def _alpha_mean(self, inputs: Any) -> float:
        """Mean mask logit of the head on one batch of its inputs."""
        head = self._require_head()
        alpha = head(self._params_like(inputs), inputs)
        return float(np.mean(self.backend.to_numpy(self.backend.stop_gradient(alpha))))

    def _held_out(
        self, batches: Iterable[TrainBatch], beta: float, model_loss: Callable[[Any, Any], Any] | None
    ) -> tuple[float, float, float]:
        """``(loss, mean capacity in nats per element, mean alpha)`` over held-out batches
        (inside :meth:`attached`), with noise seeded by 0 so epochs compare fairly."""
        backend = self.backend
        head = self._require_head()
        generator = None
        loss = cap = alpha_sum = 0.0
        count = 0
        for batch in batches:
            x, inputs, bn_features, targets = self._batch(batch, model_loss)
            if generator is None:
                generator = backend.make_generator(0, bn_features)
            noise, generator = backend.draw(tuple(bn_features.shape), bn_features, generator)
            params = self._params_like(bn_features)
            alpha = backend.stop_gradient(head(params, inputs))
            value = self.loss(
                params, x, inputs, bn_features, targets, noise, beta=beta, model_loss=model_loss
            )
            c = self.bottleneck.capacity(bn_features, alpha)
            n = int(bn_features.shape[0])
            loss += float(backend.to_numpy(backend.stop_gradient(value))) * n
            cap += float(np.mean(backend.to_numpy(backend.stop_gradient(c)))) * n
            alpha_sum += float(np.mean(backend.to_numpy(alpha))) * n
            count += n
        if count == 0:
            raise ValueError("the validation data yielded no batches")
        return loss / count, cap / count, alpha_sum / count

    def evaluate(
        self,
        batches: Iterable[TrainBatch],
        *,
        beta: float = 10.0,
        model_loss: Callable[[Any, Any], Any] | None = None,
        seed: int | None = 0,
    ) -> float:
        """Mean training loss over ``batches`` without updating (noise seeded by ``seed``)."""
        self._require_statistics()
        backend = self.backend
        generator = None
        total, count = 0.0, 0
        with self.attached():
            for batch in batches:
                x, inputs, bn_features, targets = self._batch(batch, model_loss)
                if seed is not None and generator is None:
                    generator = backend.make_generator(int(seed), bn_features)
                noise, generator = backend.draw(tuple(bn_features.shape), bn_features, generator)
                value = self.loss(
                    self._params_like(bn_features),
                    x,
                    inputs,
                    bn_features,
                    targets,
                    noise,
                    beta=beta,
                    model_loss=model_loss,
                )
                n = int(bn_features.shape[0])
                total += float(backend.to_numpy(value)) * n
                count += n
        if count == 0:
            raise ValueError("the data yielded no batches")
        return total / count

    def _require_statistics(self) -> None:
        if not self.has_statistics():
            raise RuntimeError(
                "the readout has no feature statistics: call estimate() on some "
                "data first (or load a trained readout)"
            )
        self._require_head()

    # -- explanation -----------------------------------------------------------------
    def analyze(self, x: Any) -> Any:
        """Capacity ``(N, C, ...)`` in nats per element from one forward pass over ``x``."""
        self._require_statistics()
        if self.steps == 0:
            raise RuntimeError(
                "the readout is not trained yet: train it first (train() in "
                "PyTorch, fit() in Keras) or load trained weights"
            )
        alpha, bn_features = self.predict_alpha(x)
        self.alpha = self.backend.stop_gradient(alpha)
        self._last_features = bn_features
        return self.bottleneck.capacity(bn_features, self.alpha)

    def capacity(self) -> Any:
        """Capacity ``(N, C, ...)`` in nats per element of the last :meth:`analyze`."""
        if self.alpha is None:
            raise RuntimeError("nothing analysed yet: call analyze() first")
        return self.bottleneck.capacity(self._last_features, self.alpha)

    # -- persistence -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Settings that change the maps; saved with the weights and compared on load."""
        bn = self.bottleneck
        return {
            "sigma": bn.sigma,
            "min_std": bn.min_std,
            "active_neurons_threshold": bn.active_neurons_threshold,
            "relu": bn.relu,
            "n_readout_layers": len(self.readout_layers),
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything a trained readout needs, as NumPy arrays (framework-independent).

        Keys: ``head.w1`` ... ``head.b3`` (see :class:`ReadoutHead`), ``readout.<i>.*``
        (the estimate of readout layer ``i``), ``bottleneck.*`` (the bottleneck layer's
        estimate, and its given mean/std if any), ``steps`` and ``config``.
        """
        head = self._require_head()
        bn = self.bottleneck
        params = self._params
        flat = params if isinstance(params, np.ndarray) else self.backend.to_numpy(params)
        state: dict[str, np.ndarray] = {
            "format": np.asarray(_FORMAT),
            "config": np.asarray(json.dumps(self.config(), sort_keys=True)),
            "steps": np.asarray(self.steps, dtype=np.int64),
        }
        state.update({f"head.{k}": np.array(v) for k, v in head.unpack(np.asarray(flat)).items()})
        for i, est in enumerate(self.estimators):
            state.update({f"readout.{i}.{k}": v for k, v in est.state_dict().items()})
        if bn.estimator.n > 0:
            state.update({f"bottleneck.{k}": v for k, v in bn.estimator.state_dict().items()})
        if bn.feature_mean is not None:
            state["bottleneck.feature_mean"] = np.array(bn.feature_mean)
        if bn.feature_std is not None:
            state["bottleneck.feature_std"] = np.array(bn.feature_std)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (of any backend), validating every shape.

        Raises ``ValueError`` when the weights do not fit: another number of readout
        layers, other feature shapes than this readout's estimates, or a head whose
        shapes do not match the statistics.
        """
        state = {k: np.asarray(v) for k, v in state.items()}
        remedy = "train the readout again (estimate() and train()/fit()) and save() it"
        check_format(state, (_FORMAT,), "readout state", remedy)
        _check_estimate_formats(state, remedy)
        estimators, shapes = self._saved_readout_estimators(state)
        bn_state = {
            k[len("bottleneck.") :]: v
            for k, v in state.items()
            if k.startswith("bottleneck.")
            and k[len("bottleneck.") :] in ("format", "n", "mean", "m2", "nonzero", "layer", "layout")
        }
        bn = self.bottleneck
        bn_est = Estimator()
        old_bn = bn.statistics()[0].shape if bn.has_statistics() else None
        if bn_state:
            bn_est.load_state_dict(bn_state, expected_shape=old_bn)
        given = {
            k: np.asarray(state[f"bottleneck.{k}"], dtype=np.float64)
            for k in ("feature_mean", "feature_std")
            if f"bottleneck.{k}" in state
        }
        bn_shape = (
            bn_est.shape
            if bn_est.n > 0
            else (given["feature_mean"].shape if "feature_mean" in given else None)
        )
        if bn_shape is None:
            raise ValueError("the state holds no statistics of the bottleneck layer")
        if old_bn is not None and tuple(bn_shape) != tuple(old_bn):
            raise ValueError(
                f"the weights were made for bottleneck features of shape "
                f"{tuple(bn_shape)}, this layer gives {tuple(old_bn)}"
            )
        head = ReadoutHead(sum(s[0] for s in shapes), int(bn_shape[0]))
        flat = head.pack(_saved_head_params(state))
        saved_config = _saved_config(state)
        differs = {
            k: (v, saved_config[k])
            for k, v in self.config().items()
            if k in saved_config and saved_config[k] != v
        }
        if differs:
            warnings.warn(
                f"the readout was trained with other settings (now, saved): {differs}; its maps will differ",
                UserWarning,
                stacklevel=2,
            )
        # Everything validated: commit.
        self.estimators = estimators
        bn.estimator = bn_est
        bn.feature_mean = given.get("feature_mean")
        bn.feature_std = given.get("feature_std")
        self.head, self._params, self._adam = head, flat, None
        self.steps = int(state.get("steps", 1))
        self._stats_cache.clear()

    def _saved_readout_estimators(
        self, state: Mapping[str, np.ndarray]
    ) -> tuple[list[Estimator], list[tuple[int, ...]]]:
        """The estimate of each readout layer in ``state`` and its feature shape: one per
        readout layer of this readout, of the shape of its current estimate (if any)."""
        n_layers = len(self.readout_layers)
        saved = {int(k.split(".")[1]) for k in state if k.startswith("readout.")}
        if saved != set(range(n_layers)):
            raise ValueError(
                f"the weights were trained with {len(saved)} readout layers, this readout has {n_layers}"
            )
        estimators: list[Estimator] = []
        shapes: list[tuple[int, ...]] = []
        old_shapes = [e.shape if e.n > 0 else None for e in self.estimators]
        for i in range(n_layers):
            est = Estimator()
            est.load_state_dict(
                {k[len(f"readout.{i}.") :]: v for k, v in state.items() if k.startswith(f"readout.{i}.")},
                expected_shape=old_shapes[i],
            )
            assert est.shape is not None  # a loaded estimate (n >= 1) has its shape
            estimators.append(est)
            shapes.append(est.shape)
        return estimators, shapes

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` to an ``.npz`` file; returns the file written
        (``.npz`` is appended to a name without it, as ``np.savez`` does)."""
        file = save_target(path)
        state: dict[str, Any] = self.state_dict()
        np.savez(file, **state)
        return file

    def load(self, path: str | os.PathLike) -> None:
        """Read weights written by :meth:`save` (any backend); see :meth:`load_state_dict`.

        ``path`` may omit the ``.npz`` suffix.  Damaged files, files of another format
        version and weights that do not fit raise :class:`SavedStateError` (a
        ``ValueError``) naming the file; pickles are never loaded.
        """
        file, state = read_npz(path, "readout", "IBAReadout.save()")
        try:
            self.load_state_dict(state)
        except ValueError as exc:
            raise SavedStateError(f"cannot use the readout {file_name(file)!r}: {exc}") from None


class ReadoutFront:
    """What the PyTorch and Keras ``IBAReadout`` share: delegation to ``self._readout``.

    A front sets ``_readout`` (a :class:`ReadoutBottleneck`), ``layer_name``,
    ``readout_names`` and ``steps``; persistence goes through NumPy state, so weights move
    freely between backends.
    """

    _readout: ReadoutBottleneck
    layer_name: str
    readout_names: list[str]

    def _build(
        self,
        backend: Backend,
        model: Any,
        layer: Any,
        layer_name: str,
        layers: Sequence[Any],
        names: Sequence[str],
        *,
        seed: int | None,
        progbar: bool,
        **settings: Any,
    ) -> None:
        """Make the core readout: ``settings`` are the bottleneck's (sigma, beta, ...)."""
        self.layer_name = layer_name
        self.readout_names = list(names)
        self._readout = ReadoutBottleneck(
            backend,
            model,
            layer,
            list(layers),
            bottleneck=Bottleneck(progbar=progbar, **settings),
            seed=seed,
            labels=[repr(n) for n in self.readout_names],
            progbar=progbar,
        )

    @property
    def model(self) -> Any:
        """The explained model."""
        return self._readout.model

    @property
    def bottleneck(self) -> Bottleneck:
        """The core :class:`iba_core.Bottleneck` at the attach layer."""
        return self._readout.bottleneck

    @property
    def readout(self) -> ReadoutBottleneck:
        """The core :class:`iba_core.ReadoutBottleneck`."""
        return self._readout

    @property
    def estimator(self) -> Estimator:
        """Statistics of the attach layer's features (channels-first)."""
        return self._readout.bottleneck.estimator

    @property
    def readout_estimators(self) -> list[Estimator]:
        """Statistics of each readout layer's features (channels-first)."""
        return self._readout.estimators

    @property
    def steps(self) -> int:
        """Training steps the readout network has taken (0: untrained)."""
        return self._readout.steps

    @property
    def history(self) -> TrainHistory | None:
        """The last training's per-epoch losses; ``history.history``: one dict per epoch
        (training and held-out loss, held-out mean capacity, learning rate)."""
        return self._readout.history

    def capacity(self) -> Any:
        """Capacity of the last ``analyze``, ``(N, C, ...)`` channels-first, nats."""
        return self._readout.capacity()

    def _maps(self, x: Any, mode: str, channels_last: bool) -> np.ndarray:
        """Maps of one forward pass over ``x``, NumPy, bits: ``(H, W)`` for one input
        else ``(N, H, W)`` (``mode="capacity"``: at the feature map's resolution)."""
        if mode not in ("saliency", "capacity"):
            raise ValueError(f"mode must be 'saliency' or 'capacity', got {mode!r}")
        ro = self._readout
        x = prepared_inputs(ro.backend, x, ro.model)
        with ro.backend.frozen(ro.model):
            cap = ro.analyze(x)
        out = ro.backend.to_numpy(
            explanation_maps(cap, tuple(int(s) for s in x.shape), mode, channels_last=channels_last)
        )
        return out[0] if out.shape[0] == 1 else out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The readout network's weights and all feature statistics, as NumPy arrays."""
        return self._readout.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> Any:
        """Load :meth:`state_dict` output (from either backend); shapes are validated."""
        self._readout.load_state_dict(state)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights and statistics to an ``.npz`` file; returns the file written
        (``.npz`` is appended to a name without it; :meth:`load` finds it by either name)."""
        return self._readout.save(path)

    def load(self, path: str | os.PathLike) -> Any:
        """Read a file written by :meth:`save` (by either backend); returns self."""
        self._readout.load(path)
        return self

    def __repr__(self) -> str:
        return (
            f"IBAReadout(attach_layer={self.layer_name!r}, readout_layers="
            f"{self.readout_names!r}, head={self._readout.head}, steps={self.steps})"
        )
