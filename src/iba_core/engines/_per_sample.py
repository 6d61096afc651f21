"""The per-sample engine: the whole explanation workflow, written once for every backend.

Everything between "the user called analyze" and "a map came back" lives here: the
targets and their validation, the loss modes (a target class, the whole output
distribution, a user's loss), where the noisy copies are made, per-call overrides
validated like the constructor, the model frozen for the whole call, the layout of the
layer's features, a lock per model, and the output maps.  Framework fronts adapt names
and data types and delegate; :class:`iba_core.IBA` serves any registered backend.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..contract._backend import Backend
from ..contract._collectives import Collectives
from ..contract._registry import get_backend
from ..math._capacity import explanation_maps
from ..math._estimator import Estimator
from ._bottleneck import Bottleneck, is_half
from ._config import IBAConfig
from ._distributed import clean_chunk, collectives, rows_of, seeds_of, shard_unit, sharded_analyze
from ._layout import check_layout, in_layout, layer_layout
from ._padding import padding_mask

#: What ``target=`` accepts besides class indices.
TARGET_MODES = ("predicted", "all")


# -- model outputs and targets -------------------------------------------------------
def model_logits(output: Any) -> Any:
    """The logits in a model's output.

    A tensor is returned as it is; an output object with a ``logits`` attribute (e.g. a
    ``transformers`` ``SequenceClassifierOutput``) or a mapping with a ``"logits"`` key
    gives that; a tuple or list gives its first element.
    """
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise ValueError(
            f"the model returned a mapping without 'logits' (keys: {list(output)}); "
            "give a loss function instead of target="
        )
    logits = getattr(output, "logits", None)
    if logits is not None and hasattr(logits, "shape"):
        return logits
    if isinstance(output, (tuple, list)):
        if not output:
            raise ValueError("the model returned an empty tuple")
        return model_logits(output[0])
    if not hasattr(output, "shape"):
        raise ValueError(
            f"the model returned a {type(output).__name__}, not logits; give a "
            "loss function instead of target="
        )
    return output


def _leaves(output: Any) -> list[Any]:
    """The arrays in a (nested) model output."""
    if isinstance(output, Mapping):
        return [leaf for v in output.values() for leaf in _leaves(v)]
    if isinstance(output, (tuple, list)):
        return [leaf for v in output for leaf in _leaves(v)]
    logits = getattr(output, "logits", None)
    if logits is not None and hasattr(logits, "shape") and not hasattr(output, "ndim"):
        return [logits]
    return [output] if hasattr(output, "shape") else []


def class_indices(target: Any, n: int) -> np.ndarray:
    """One integer class index per input, ``(n,)`` int64, from ``target``.

    ``target`` is an integer, or a sequence/array/tensor of ``n`` integers; integral
    floats (``3.0``) are accepted, anything else (``1.7``, ``"3"``, ``True``) is refused.
    """
    if isinstance(target, (str, bytes)):
        raise ValueError(
            f"target must be integer class indices, {' or '.join(map(repr, TARGET_MODES))}"
            f"; got the string {target!r}"
        )
    if isinstance(target, bool) or isinstance(target, np.bool_):
        raise ValueError(f"target must be integer class indices, got {target!r}")
    if isinstance(target, numbers.Number) and not isinstance(target, numbers.Real):
        raise ValueError(f"target must be integer class indices, got {target!r}")
    if hasattr(target, "shape") and not isinstance(target, np.ndarray):
        from ..math._xp import to_numpy

        target = to_numpy(target)
    a = np.asarray(target)
    if a.dtype.kind == "b" or a.dtype.kind not in "iuf":
        raise ValueError(f"target must be integer class indices, got {target!r} (dtype {a.dtype})")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise ValueError(
            f"target must be integer class indices, got {a.reshape(-1).tolist()} (not whole numbers)"
        )
    a = a.astype(np.int64).reshape(-1)
    if a.size not in (1, n):
        raise ValueError(f"target must be one class index or one per input ({n}), got {a.size}")
    return np.broadcast_to(a, (n,)).copy()


def _check_in_range(targets: np.ndarray, n_classes: int) -> None:
    bad = sorted({int(t) for t in targets if not 0 <= t < n_classes})
    if bad:
        raise ValueError(
            f"target {bad if len(bad) > 1 else bad[0]} out of range: the model "
            f"returns {n_classes} classes (0..{n_classes - 1})"
        )


def prepared_inputs(backend: Backend, x: Any, model: Any = None) -> Any:
    """``x`` checked (a non-empty batch ``(N, ...)`` of finite values) and on ``model``'s
    device: what every engine does with the inputs it explains."""
    from ._front import refuse_multi_input

    refuse_multi_input(x)
    if not hasattr(x, "shape") or len(tuple(x.shape)) < 2:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(
            f"inputs must be a batch (N, ...), e.g. one image as (1, C, H, W) or "
            f"(1, H, W, C); got {shape}: add a batch axis with x[None]"
        )
    if int(x.shape[0]) < 1:
        raise ValueError("analyze() needs at least one input")
    if model is not None:
        x = backend.to_device(x, model)
    a = backend.to_numpy(x)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError("the inputs contain NaN or inf; IBA needs finite inputs")
    return x


# -- one lock per model ---------------------------------------------------------------
_LOCKS_GUARD = threading.Lock()
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_BY_ID: dict[int, threading.RLock] = {}


def _no_tail(features: Any) -> Any:  # the cache's "the backend cannot cut this model"
    raise AssertionError("never called")


def model_lock(obj: Any) -> threading.RLock:
    """The lock of ``obj`` (a model, or a layer when no model is known).

    Explanations hook the model and change its flags while they run, so two threads
    explaining with the same model take turns; both get correct maps.
    """
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(obj)
            if lock is None:
                lock = _LOCKS[obj] = threading.RLock()
        except TypeError:  # neither hashable nor weakly referable: by identity
            lock = _LOCKS_BY_ID.setdefault(id(obj), threading.RLock())
        return lock


# -- the engine ---------------------------------------------------------------------
class PerSampleBottleneck:
    """A Per-Sample Bottleneck at one layer of a model, for any backend.

    Args:
        backend: a :class:`Backend`, its name, or ``None`` to find it from ``model``.
        model: the model (frozen while the engine works); ``None`` when only the layer
            is known (the backend then freezes whatever model runs, if it can).
        layer: the layer (object or name) whose output (or input, ``on_input=True``) goes
            through the bottleneck; ``None`` when the bottleneck is itself a layer of the
            model whose forward calls :meth:`hook`.
        layout: ``"channels_first"`` (``(N, C, ...)``) or ``"channels_last"`` (``(N, ...,
            C)``) features; default: what the backend knows about the layer
            (:meth:`Backend.layer_layout`), else channels-first for images while sequence
            features ``(N, A, B)`` are refused until it is given (see :attr:`layout_known`).
        input_layout: layout of the model's inputs, for the size of saliency maps;
            default: the backend's (:attr:`Backend.channels_last`).
        bottleneck: a :class:`Bottleneck` to use (statistics, settings), else a new one.
        layer_name: the layer's name for saved estimates (default: the backend's
            :meth:`~Backend.layer_name`).
        estimate_hint: how the user estimates, for error messages (e.g. ``"estimate()"``).
        **settings: :class:`IBAConfig` fields, and ``config``, ``feature_mean``,
            ``feature_std``, ``estimator`` as for :class:`Bottleneck`.
    """

    def __init__(
        self,
        backend: Backend | str | None,
        model: Any,
        layer: Any = None,
        *,
        layout: str | None = None,
        input_layout: str | None = None,
        on_input: bool = False,
        bottleneck: Bottleneck | None = None,
        estimate_hint: str = "estimate()",
        layer_name: str | None = None,
        **settings: Any,
    ) -> None:
        if backend is None:
            if model is None:
                raise ValueError("give the backend, or a model to find it from")
            backend = get_backend(model)
        elif not isinstance(backend, Backend):
            backend = get_backend(backend)
        self.backend: Backend = backend
        self.model = model
        self.layer = layer
        self.on_input = bool(on_input)
        self.estimate_hint = estimate_hint
        if bottleneck is None:
            bottleneck = Bottleneck(**settings)
        elif settings:
            raise TypeError("give either bottleneck= or settings, not both")
        bottleneck.backend = backend
        #: The core :class:`Bottleneck`: settings, statistics, last mask.
        self.bottleneck = bottleneck
        layout = layer_layout(backend, model, layer, layout)
        #: Whether the layer's layout is declared or known to the backend.  An unknown one
        #: reads images channels-first and refuses sequences (see :func:`in_layout`).
        self.layout_known = layout is not None
        self.layout = layout or "channels_first"
        # The inputs' layout (for the size of saliency maps): as given, else the framework's.
        default_input = "channels_last" if backend.channels_last else "channels_first"
        self.input_layout = check_layout(input_layout or default_input, "input_layout")
        self._input_layout_given = input_layout is not None
        self._layer_name = layer_name
        self._hook = in_layout(
            backend,
            bottleneck,
            layout,
            label=f"layer {self.layer_name!r}" if self.layer_name else "the bottleneck layer",
            busy=lambda: bottleneck.busy,
        )
        if layer is not None:  # unknown layer names fail now, listing the model's layers
            backend.attach(model, layer, lambda f: None, on_input=self.on_input).remove()
        #: A front's own ``restrict_flow`` machinery (a context manager taking ``alpha``)
        #: for a bottleneck that is a layer of the model (Keras' ``IBALayer`` keeps the
        #: restriction in variables that traced functions read); ``None``: the hook's.
        self.flow_restrictor: Callable[[Any], Any] | None = None
        # What the hook returns instead of the layer's output while the engine's own cut
        # runs, and the per-sample shape and dtype of the model's last inputs.
        self._replacement: Any = None
        self._input_like: tuple[tuple[int, ...], Any] | None = None
        # Stable functions (so compiled steps are reused), by kind and model.
        self._loss_cache: dict[tuple[Any, int], tuple[Any, Callable[..., Any]]] = {}

    @property
    def layer_name(self) -> str | None:
        """The layer's name, saved with estimates (an estimate is refused for another
        layer); ``None`` when neither given nor known to the backend."""
        if self._layer_name is not None or self.layer is None:
            return self._layer_name
        return self.backend.layer_name(self.model, self.layer)

    @layer_name.setter
    def layer_name(self, value: str | None) -> None:
        self._layer_name = value

    # -- settings and statistics ---------------------------------------------------------
    @property
    def config(self) -> IBAConfig:
        """The live settings (assign an :class:`IBAConfig` or use :meth:`configure`)."""
        return self.bottleneck.config

    @config.setter
    def config(self, value: IBAConfig) -> None:
        if not isinstance(value, IBAConfig):
            raise TypeError(f"config must be an IBAConfig, got {type(value).__name__}")
        self.bottleneck.config = value

    def configure(self, **changes: Any) -> IBAConfig:
        """Change settings (validated like the constructor); returns the new settings."""
        self.bottleneck.config = self.bottleneck.config.replace(**changes)
        return self.bottleneck.config

    @property
    def estimator(self) -> Estimator:
        """The running estimate of the layer's feature statistics (channels-first)."""
        return self.bottleneck.estimator

    @estimator.setter
    def estimator(self, value: Estimator) -> None:
        if not isinstance(value, Estimator):
            raise TypeError(f"estimator must be an iba_core.Estimator, got {type(value).__name__}")
        if value.layer is not None and self.layer_name is not None and value.layer != self.layer_name:
            raise ValueError(
                f"the estimate was made for layer {value.layer!r}, not "
                f"{self.layer_name!r}; estimate again for this layer"
            )
        self.bottleneck.estimator = value

    # -- the hook and the session -----------------------------------------------------
    def hook(self, features: Any) -> Any:
        """The layer hook: features in the layer's layout; replacement or ``None``."""
        if self._replacement is not None:  # the engine's own cut (see _replacing_tail)
            return self._replacement
        return self._hook(features)

    @contextlib.contextmanager
    def attached(self) -> Iterator[PerSampleBottleneck]:
        """Context: the hook on the layer (nothing to do when the bottleneck is a layer)."""
        if self.layer is None:
            yield self
            return
        handle = self.backend.attach(self.model, self.layer, self.hook, on_input=self.on_input)
        try:
            yield self
        finally:
            handle.remove()

    @contextlib.contextmanager
    def session(self) -> Iterator[PerSampleBottleneck]:
        """Context of every engine call: the model's lock, the model frozen, the hook on.

        On exit the hook is removed and every flag restored, also after an exception.
        """
        key = (
            self.model
            if self.model is not None
            else (self.layer if self.layer is not None and not isinstance(self.layer, str) else self)
        )
        with model_lock(key), self.backend.frozen(self.model), self.attached():
            yield self

    @contextlib.contextmanager
    def using(self, model: Any) -> Iterator[PerSampleBottleneck]:
        """Context: explain with ``model`` instead of the engine's own (``None``: no change)."""
        if model is None:
            yield self
            return
        # Under the model's lock: another thread may be swapping the same model in and out.
        with model_lock(model):
            saved, self.model = self.model, model
            try:
                yield self
            finally:
                self.model = saved

    def _run(self, x: Any) -> Any:
        return self.backend.call(self.model, x)

    def _prepare(self, x: Any) -> Any:
        return prepared_inputs(self.backend, x, self.model)

    def feature_shape(self, x: Any) -> tuple[int, ...]:
        """Channels-first per-sample shape of the layer's features, from one pass over ``x``."""
        with self.session():
            return tuple(int(s) for s in self.bottleneck.record(lambda: self._run(x)).shape[1:])

    # -- estimation -----------------------------------------------------------------
    def estimate(
        self,
        batches: Iterable[Any],
        *,
        n_samples: int = 10000,
        progbar: bool | None = None,
        reset: bool = True,
        run: Callable[[Any], Any] | None = None,
        distributed: bool | str | None = None,
    ) -> Estimator:
        """Estimate the mean and std of the layer's features over ``batches``.

        ``batches`` yields model inputs in the backend's type (``run(batch)`` runs the
        model on one batch if the inputs need more than ``Backend.call``), or
        :class:`~iba_core.engines.MaskedBatch` es ``(inputs, attention_mask)`` of
        sequences: the model runs on the inputs, and each position's statistics are taken
        over the sequences in which the mask marks it real (1 = real token, 0 = padding,
        ``(B, T)`` over the layer's positions; positions that were never real get their
        channel's statistics over all real positions, with an
        :class:`~iba_core.engines.UnseenPositionsWarning`).  The model runs
        frozen and only up to the layer.  Stops after ``n_samples`` samples; warns
        (:class:`FewSamplesWarning`) below 1,000.  Under the framework's distributed
        runtime the shards share the batches and every process ends with the same merged
        estimate (``distributed``: see :func:`~iba_core.engines.estimate_loop`).
        """
        if self.model is None and run is None:
            raise ValueError("estimate() needs the model that contains the layer")
        run = run if run is not None else self._run
        # Named before estimating, so processes of a data-parallel run can compare layers.
        self.bottleneck.estimator.layer, self.bottleneck.estimator.layout = self.layer_name, self.layout
        with self.session():
            estimator = self.bottleneck.estimate(
                run, batches, n_samples=n_samples, progbar=progbar, reset=reset, distributed=distributed
            )
        estimator.layer, estimator.layout = self.layer_name, self.layout
        return estimator

    # -- explanation ----------------------------------------------------------------
    def analyze(
        self,
        x: Any,
        *,
        target: Any = None,
        loss: Callable[[Any], Any] | None = None,
        output_loss: Callable[[Any], Any] | None = None,
        mode: str = "saliency",
        seed: Any = None,
        noise: str = "backend",
        inputs_per_pass: int | None = None,
        attention_mask: Any = None,
        distributed: bool | None = None,
        **overrides: Any,
    ) -> Any:
        """Explain a batch of ``N`` inputs; returns maps ``(N, ...)`` in bits (backend type).

        Exactly one way to say what is explained:

        - ``target=``: class indices (one, or one per input), ``"predicted"`` (each
          input's predicted class) or ``"all"`` (the model's whole output distribution
          for each input: the loss is the cross-entropy to it).  The model must return
          logits ``(B, K)`` (or an output with ``.logits``, or a tuple whose first element
          is the logits).  The noisy copies are made at the layer.
        - ``output_loss(outputs) -> scalar``: the mean loss of the model's outputs for
          ``batch_size`` noisy copies of each input, in a row; copies made at the layer.
        - ``loss(batch) -> scalar``: runs the model on a batch holding each input
          ``batch_size`` times in a row and returns the mean loss (the reference
          library's closure); copies made at the input.

        A loss function holds its own targets, so it gets the copies of all ``N`` inputs
        in one pass, in one process (with ``inputs_per_pass=k`` it gets ``k`` inputs'
        copies at a time, and must then work on any rows).  ``target=`` explanations go
        in passes of the backend's :meth:`~iba_core.Backend.pass_size` (a CPU's hold one
        input) and are shared out in data-parallel runs.

        ``mode="saliency"``: bits per input pixel at the input's size (totalling the
        capacity); ``"capacity"``: the channel-summed capacity in bits at the feature map's
        resolution.  ``seed``: input ``i`` draws from the noise stream ``seed + i``;
        ``noise``: ``"backend"`` or ``"numpy"``.  ``**overrides``: settings for this call
        (``beta=``, ``optimization_steps=``, ...), validated like the constructor's.

        Sequences: features ``(N, C, T)`` or ``(N, T, C)`` give per-position maps ``(N, T)``
        (at the input's length in ``"saliency"`` mode; token ids ``(N, T)`` are used as
        they are, never cast to float).  ``attention_mask``: array-like ``(N, T)`` over the
        layer's positions, 1/True for real tokens and 0/False for padding (as Hugging
        Face's): padded positions get no noise and exactly 0 bits, so inputs of different
        lengths, padded to one length, are explained in one call.  The model is still
        called with ``x`` alone (a model that needs the mask derives it from the ids).

        Under the framework's distributed runtime (``torchrun``, a ``tf.distribute``
        strategy in scope) every process calls ``analyze`` with the same inputs: each
        shard explains its share of the inputs (whole clean passes, see
        :func:`~iba_core.engines._distributed.clean_chunk`) and the maps are gathered in
        input order on every process (the same maps as one process makes with the same
        seed).
        Processes given different inputs each explain their own.  ``distributed``:
        ``False`` works alone, see :func:`~iba_core.engines.data_parallel`.
        """
        if mode not in ("saliency", "capacity"):
            raise ValueError(f"mode must be 'saliency' or 'capacity', got {mode!r}")
        cfg = self.config.override(**overrides)
        self._check_request(target, loss, output_loss)
        if mode == "saliency":
            self._check_spatial()
        x = self._prepare(x)
        n = int(x.shape[0])
        if target is None and inputs_per_pass is None:
            # A loss function of the user's holds its own targets for the copies of all the
            # inputs: it gets them in one pass, and one process makes them all.
            inputs_per_pass, distributed = n, False
        dist = collectives(self.backend, distributed)
        if dist is not None:
            options = locals()
            return self._analyze_sharded(dist, x, target, seed, inputs_per_pass, cfg, attention_mask, options)
        padding = None if attention_mask is None else padding_mask(self.backend, attention_mask, n)
        with self.session():
            loss_fn, copies, compile_step, soft, features, batch = self._optimised_loss(
                x, target, loss, output_loss, cfg, inputs_per_pass
            )
            cap = self.bottleneck.explain(
                lambda start, stop: loss_fn,
                batch,
                targets=soft,
                inputs_per_pass=inputs_per_pass,
                seed=seed,
                config=cfg,
                noise=noise,
                copies=copies,
                compile_step=bool(compile_step),
                check_path=target is None,
                features=features,
                padding=padding,
            )
        return self._maps_of(cap, x, mode, padding)

    def _check_request(self, target: Any, loss: Any, output_loss: Any) -> None:
        """Refuse an :meth:`analyze` call that does not say, in exactly one way, what is
        explained, or that cannot run yet."""
        given = [
            k for k, v in (("target", target), ("loss", loss), ("output_loss", output_loss)) if v is not None
        ]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(
                f"give exactly one of target=, a loss function of the batch, or a "
                f"loss function of the model's outputs; got {what}"
            )
        needs_model = target is not None or output_loss is not None
        if needs_model and self.model is None:
            raise ValueError(
                f"{given[0]}= needs the model: give model= (or build the bottleneck with the model)"
            )
        if loss is not None and not callable(loss):
            raise TypeError(f"the loss must be callable, got {type(loss).__name__}")
        if output_loss is not None and not callable(output_loss):
            raise TypeError(f"the loss must be callable, got {type(output_loss).__name__}")
        if not self.bottleneck.has_statistics():
            raise RuntimeError(
                f"the bottleneck has no feature statistics yet: call "
                f"{self.estimate_hint} on some data before analyze() (or give "
                "feature_mean and feature_std)"
            )
        if isinstance(target, str) and target not in TARGET_MODES:
            class_indices(target, 1)  # raises with the list of what is accepted

    def _optimised_loss(
        self,
        x: Any,
        target: Any,
        loss: Callable[[Any], Any] | None,
        output_loss: Callable[[Any], Any] | None,
        cfg: IBAConfig,
        inputs_per_pass: int | None,
    ) -> tuple[Callable[..., Any], str, bool, np.ndarray | None, Any, Any]:
        """What the optimisation of :meth:`analyze` runs (inside :meth:`session`):
        ``(loss function, where the copies are made, whether the step is compiled, the
        soft targets, the layer's features, the batch the steps start from)``."""
        n = int(x.shape[0])
        soft: np.ndarray | None = None
        features, batch = None, x
        if target is not None:
            compile_step = self.backend.compile_by_default if cfg.compile is None else cfg.compile
            chunk = clean_chunk(self.backend, x, cfg.batch_size, inputs_per_pass)
            soft, features, logits = self._soft_targets(x, target, n, compile_step, chunk)
            self._input_like = (tuple(int(k) for k in x.shape[1:]), x.dtype)
            tail = self._tail(features, logits)
            loss_fn, copies = self._target_loss(tail), "layer"
            if tail is not None:  # the steps start from the features: no layer before
                batch = self._layer_features(features)
        elif output_loss is not None:
            loss_fn, copies = self._output_loss(output_loss), "layer"
            compile_step = bool(cfg.compile)  # a user's loss is traced only when asked
        else:
            assert loss is not None  # exactly one of target, loss and output_loss
            loss_fn, copies, compile_step = loss, "input", bool(cfg.compile)
        if compile_step is None:
            compile_step = self.backend.compile_by_default
        return loss_fn, copies, bool(compile_step), soft, features, batch

    def _maps_of(self, cap: Any, x: Any, mode: str, padding: np.ndarray | None) -> Any:
        """The maps of :meth:`analyze` from the capacity ``cap`` (nats) of inputs ``x``."""
        input_layout = self.input_layout
        if cap.ndim == 3 and len(tuple(x.shape)) == 3 and not self._input_layout_given:
            input_layout = self.layout  # a sequence model keeps one layout from its input on
        maps = explanation_maps(
            cap, tuple(int(s) for s in x.shape), mode, channels_last=input_layout == "channels_last"
        )
        if padding is not None and tuple(maps.shape) == padding.shape:
            # Exactly 0 bits on padding also after a resize to the input's length.
            maps = maps * self.backend.from_numpy(padding, like=maps)
        return maps

    def _analyze_sharded(
        self,
        dist: Collectives,
        x: Any,
        target: Any,
        seed: Any,
        inputs_per_pass: int | None,
        cfg: IBAConfig,
        attention_mask: Any,
        arguments: dict[str, Any],
    ) -> Any:
        """:meth:`analyze` of ``x`` shared out over the shards of ``dist``, maps gathered
        in input order (see :mod:`iba_core.engines._distributed`)."""
        options = {k: arguments[k] for k in ("loss", "output_loss", "mode", "noise")}
        options.update(arguments["overrides"], distributed=False)
        backend, n = self.backend, int(x.shape[0])
        unit, k = shard_unit(backend, x, cfg.batch_size, inputs_per_pass, dist.shards)

        def explain_part(start: int, stop: int) -> Any:
            return self.analyze(
                x[start:stop, ...],
                target=rows_of(target, n, start, stop, backend),
                seed=seeds_of(seed, start, stop, n, backend),
                attention_mask=rows_of(attention_mask, n, start, stop, backend),
                inputs_per_pass=k,
                **options,
            )

        def explain_alone() -> Any:
            return self.analyze(
                x,
                target=target,
                seed=seed,
                attention_mask=attention_mask,
                inputs_per_pass=inputs_per_pass,
                **options,
            )

        given = (target, seed, attention_mask, inputs_per_pass, options)
        maps = sharded_analyze(
            dist, backend, x, unit=unit, explain_part=explain_part, explain_alone=explain_alone, given=given
        )
        # The masks and features stay with the shards that made them.
        self.bottleneck.alpha = self.bottleneck._last_features = None
        return maps

    def _check_spatial(self) -> None:
        """Refuse saliency maps for a layer whose features have no spatial or sequence
        axis (``(N, C)``, e.g. after ``Flatten`` or a dense layer)."""
        shape = tuple(self.bottleneck.statistics()[0].shape)
        if len(shape) < 2:
            raise ValueError(
                f"the layer's features have no spatial or sequence axis (per-sample shape "
                f"{shape}, e.g. the output of Flatten or a dense/linear layer), so there is no "
                "saliency map over the input to make; use mode='capacity' (the capacity of "
                "each feature, in bits) or put the bottleneck on a convolutional or sequence "
                "layer"
            )

    def _clean_pass(self, compiled: bool) -> Callable[[Any], tuple[Any, Any]]:
        """``x -> (logits, the layer's features)``: one pass without noise, compiled (once
        per engine and input shape) when the step is."""
        cached = self._cached(("clean", compiled))
        if cached is not None:
            return cached
        bn, backend, model = self.bottleneck, self.backend, self.model

        def clean(x: Any) -> tuple[Any, Any]:
            with bn.recording():
                out = model_logits(backend.call(model, x))
                return out, bn.take_recorded()

        return self._cache(("clean", compiled), backend.compile(clean) if compiled else clean)

    def _cached(self, kind: Any) -> Callable[..., Any] | None:
        """A function made for this engine's current model (a compiled function keeps the
        model it was traced with, so each model gets its own)."""
        entry = self._loss_cache.get((kind, id(self.model)))
        return entry[1] if entry is not None and entry[0] is self.model else None

    def _cache(self, kind: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        if len(self._loss_cache) > 32:
            self._loss_cache.clear()
        self._loss_cache[(kind, id(self.model))] = (self.model, fn)
        return fn

    def _soft_targets(
        self, x: Any, target: Any, n: int, compiled: bool = False, chunk: int | None = None
    ) -> tuple[np.ndarray, Any, np.ndarray]:
        """The class distribution ``(N, K)`` each input is explained for (one-hot for class
        indices and ``"predicted"``), the layer's features ``(N, C, ...)`` and the logits
        (NumPy, float64), from one clean pass over the inputs, ``chunk`` inputs at a time
        (default: the backend's :meth:`~Backend.pass_size`)."""
        backend = self.backend
        limit = chunk or backend.pass_size(x) or n
        clean = self._clean_pass(compiled)
        logits, features = [], []
        for start in range(0, n, limit):
            out, f = clean(x[start : min(n, start + limit), ...])
            features.append(f)
            if len(tuple(out.shape)) != 2:
                raise ValueError(
                    f"target= needs a classifier returning logits (B, K), got shape "
                    f"{tuple(out.shape)}; give a loss function instead"
                )
            logits.append(backend.to_numpy(out).astype(np.float64))
        z = np.concatenate(logits)
        if z.shape[0] != n:
            raise ValueError(
                f"the model returned {z.shape[0]} rows of logits for {n} inputs; "
                "it must keep the batch axis first"
            )
        k = z.shape[1]
        f = features[0] if len(features) == 1 else backend.namespace().concat(features, axis=0)
        if isinstance(target, str) and target == "all":
            p = np.exp(z - z.max(axis=1, keepdims=True))
            return p / p.sum(axis=1, keepdims=True), f, z
        if isinstance(target, str):  # "predicted"
            indices = z.argmax(axis=1)
        else:
            indices = class_indices(target, n)
            _check_in_range(indices, k)
        return np.eye(k, dtype=np.float64)[indices], f, z

    #: Whether a ``target=`` explanation may run only the part of the model after the
    #: layer in its steps, where the backend can cut the model there
    #: (:meth:`Backend.split_after`); the layers before it then run once per input.
    split_model: bool = True
    #: Where the model may be cut when the bottleneck is itself a layer of the model
    #: (``layer=None``): that layer (set by such a layer, e.g. Keras' ``IBALayer``).
    split_layer: Any = None

    def _tail(self, features: Any, logits: np.ndarray) -> Callable[[Any], Any] | None:
        """The model after the layer (a function of the layer's raw features), if the
        backend can cut the model there and the cut reproduces the clean pass's logits."""
        layer = self.split_layer if self.layer is None else self.layer
        if not self.split_model or layer is None or self.on_input or self.model is None:
            return None
        tail = self._cached("tail")
        if tail is None:
            cut = self.backend.split_after(self.model, layer) or self._replacing_tail()
            tail = self._cache("tail", cut or _no_tail)
        if tail is _no_tail:
            return None
        # Checked on every call (a cut traced earlier could miss a change to the model):
        # one pass of the layers after the bottleneck over the first inputs.
        rows = min(int(features.shape[0]), self.backend.pass_size(features) or int(features.shape[0]))
        try:
            out = model_logits(tail(self._layer_features(features[:rows, ...])))
            got = self.backend.to_numpy(out).astype(np.float64)
        except Exception:
            return None
        want = logits[:rows]
        if got.shape != want.shape or not np.isfinite(want).all():
            return None
        tol = 3e-2 if is_half(features.dtype) else 3.5e-4  # ~sqrt(eps) of the model's dtype
        if not np.allclose(got, want, rtol=tol, atol=tol * (1.0 + float(np.abs(want).max(initial=0.0)))):
            return None
        return tail

    def _replacing_tail(self) -> Callable[[Any], Any] | None:
        """The model after the layer, for a backend whose compiled functions leave unused
        work out (:attr:`Backend.prunes_unused`): the whole model on zeros shaped like the
        last inputs, with the hook returning the features given instead of the layer's
        output, compiled.  ``None`` elsewhere, and when the bottleneck is a layer of the
        model (its hook is not the engine's to replace)."""
        if not self.backend.prunes_unused or self.layer is None:
            return None
        backend, model = self.backend, self.model

        def tail(features: Any) -> Any:
            assert self._input_like is not None  # set by every explanation with a target
            shape, dtype = self._input_like
            zeros = backend.namespace().zeros((int(features.shape[0]), *shape), dtype=dtype)
            saved, self._replacement = self._replacement, features
            try:
                return backend.call(model, zeros)
            finally:
                self._replacement = saved

        return backend.compile(tail)

    def _layer_features(self, features: Any) -> Any:
        """Channels-first features back in the layer's own layout."""
        rank = features.ndim
        if self.layout == "channels_first" or rank < 3:
            return features
        return self.backend.namespace().permute_dims(features, (0, *range(2, rank), 1))

    def _target_loss(self, tail: Callable[[Any], Any] | None = None) -> Callable[..., Any]:
        """``(batch, target_rows) -> mean cross-entropy``: one function per engine, so a
        compiled step is reused from call to call.  With ``tail`` (the model after the
        layer), ``batch`` holds the layer's features and the step runs the bottleneck and
        the tail only."""
        kind = "target" if tail is None else "target after the layer"
        cached = self._cached(kind)
        if cached is not None:
            return cached
        backend, model, hook = self.backend, self.model, self.hook

        def forward(batch: Any) -> Any:
            if tail is None:
                return backend.call(model, batch)
            noisy = hook(batch)
            return tail(batch if noisy is None else noisy)

        def target_loss(batch: Any, target_rows: Any) -> Any:
            logits = model_logits(forward(batch))
            if target_rows is None:  # the first, recording pass never gets here
                return logits
            if len(tuple(logits.shape)) != 2:
                raise ValueError(
                    f"target= needs a classifier returning logits (B, K), got "
                    f"shape {tuple(logits.shape)}; give a loss function instead"
                )
            rows, expected = int(logits.shape[0]), int(target_rows.shape[0])
            if rows != expected:
                raise ValueError(
                    f"the model returned {rows} output rows for {expected} noisy "
                    "samples; the model must keep the batch axis first"
                )
            if str(logits.dtype) != str(target_rows.dtype):  # a 16-bit model: float32 loss
                logits = backend.namespace().astype(logits, target_rows.dtype)
            return backend.cross_entropy(logits, target_rows)

        return self._cache(kind, target_loss)

    def _output_loss(self, output_loss: Callable[[Any], Any]) -> Callable[..., Any]:
        run = self.backend.call
        model = self.model
        bn = self.bottleneck

        def loss(batch: Any) -> Any:
            outputs = run(model, batch)
            expected = bn.expected_rows
            if expected is not None:
                for leaf in _leaves(outputs):
                    if len(tuple(leaf.shape)) and int(leaf.shape[0]) != expected:
                        raise ValueError(
                            f"the model returned {int(leaf.shape[0])} output rows for {expected} "
                            "noisy samples; the model must keep the batch axis first"
                        )
            return output_loss(outputs)

        return loss

    def capacity(self) -> Any:
        """Capacity ``(N, C, ...)`` of the last explanation, nats per element, channels-first,
        with the settings that explanation was made with."""
        return self.bottleneck.capacity()

    @contextlib.contextmanager
    def restrict_flow(self, alpha: Any = None) -> Iterator[PerSampleBottleneck]:
        """Context: the layer's features pass the bottleneck with the last mask (or
        ``alpha``, channels-first logits) and fresh noise on every call, with the settings
        of the last explanation.  The model is frozen inside."""
        with self.session():
            if self.flow_restrictor is not None:
                with self.flow_restrictor(alpha):
                    yield self
                return
            with self.bottleneck.restricting(alpha), self._passes_counted():
                yield self

    @contextlib.contextmanager
    def _passes_counted(self) -> Iterator[None]:
        """Context: the hook refuses a layer that runs twice in one forward pass of the
        model, where the backend can hook the model's own input (every pass begins there);
        elsewhere (no model known, or a backend that hooks layer outputs only) nothing."""
        if self.model is None or self.layer is None:
            yield
            return
        with self.bottleneck.counting_passes() as new_pass:
            try:
                handle = self.backend.attach(self.model, self.model, lambda _x: new_pass(), on_input=True)
            except (NotImplementedError, LookupError, TypeError, ValueError):
                handle = None
            if handle is None:
                self.bottleneck._per_pass = False
            try:
                yield
            finally:
                if handle is not None:
                    handle.remove()
