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
from ..contract._registry import get_backend
from ..math._capacity import explanation_maps
from ..math._estimator import Estimator
from ._bottleneck import Bottleneck
from ._config import IBAConfig
from ._layout import check_layout, in_layout

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
            (:meth:`Backend.layer_layout`), else channels-first.
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
        if layout is None and layer is not None:
            layout = backend.layer_layout(model, layer)
        self.layout = check_layout(layout or "channels_first")
        # The inputs' layout (for the size of saliency maps): as given, else the framework's.
        default_input = "channels_last" if backend.channels_last else "channels_first"
        self.input_layout = check_layout(input_layout or default_input, "input_layout")
        self._layer_name = layer_name
        self._hook = in_layout(backend, bottleneck, self.layout)
        if layer is not None:  # unknown layer names fail now, listing the model's layers
            backend.attach(model, layer, lambda f: None, on_input=self.on_input).remove()
        #: A front's own ``restrict_flow`` machinery (a context manager taking ``alpha``)
        #: for a bottleneck that is a layer of the model (Keras' ``IBALayer`` keeps the
        #: restriction in variables that traced functions read); ``None``: the hook's.
        self.flow_restrictor: Callable[[Any], Any] | None = None
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
    ) -> Estimator:
        """Estimate the mean and std of the layer's features over ``batches``.

        ``batches`` yields model inputs in the backend's type (``run(batch)`` runs the
        model on one batch if the inputs need more than ``Backend.call``).  The model runs
        frozen and only up to the layer.  Stops after ``n_samples`` samples; warns
        (:class:`FewSamplesWarning`) below 1,000.
        """
        if self.model is None and run is None:
            raise ValueError("estimate() needs the model that contains the layer")
        run = run if run is not None else self._run
        with self.session():
            estimator = self.bottleneck.estimate(
                run, batches, n_samples=n_samples, progbar=progbar, reset=reset
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

        ``mode="saliency"``: bits per input pixel at the input's size (totalling the
        capacity); ``"capacity"``: the channel-summed capacity in bits at the feature map's
        resolution.  ``seed``: input ``i`` draws from the noise stream ``seed + i``;
        ``noise``: ``"backend"`` or ``"numpy"``.  ``**overrides``: settings for this call
        (``beta=``, ``optimization_steps=``, ...), validated like the constructor's.
        """
        if mode not in ("saliency", "capacity"):
            raise ValueError(f"mode must be 'saliency' or 'capacity', got {mode!r}")
        cfg = self.config.override(**overrides)
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
        if mode == "saliency":
            self._check_spatial()
        x = self._prepare(x)
        n = int(x.shape[0])
        with self.session():
            soft: np.ndarray | None = None
            features = None
            if target is not None:
                compile_step = self.backend.compile_by_default if cfg.compile is None else cfg.compile
                soft, features = self._soft_targets(x, target, n, compile_step)
                loss_fn, copies = self._target_loss(), "layer"
            elif output_loss is not None:
                loss_fn, copies = self._output_loss(output_loss), "layer"
                compile_step = bool(cfg.compile)  # a user's loss is traced only when asked
            else:
                assert loss is not None  # exactly one of target, loss and output_loss
                loss_fn, copies, compile_step = loss, "input", bool(cfg.compile)
            if compile_step is None:
                compile_step = self.backend.compile_by_default
            cap = self.bottleneck.explain(
                lambda start, stop: loss_fn,
                x,
                targets=soft,
                inputs_per_pass=inputs_per_pass,
                seed=seed,
                config=cfg,
                noise=noise,
                copies=copies,
                compile_step=bool(compile_step),
                check_path=target is None,
                features=features,
            )
        return explanation_maps(
            cap, tuple(int(s) for s in x.shape), mode, channels_last=self.input_layout == "channels_last"
        )

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

    def _soft_targets(self, x: Any, target: Any, n: int, compiled: bool = False) -> tuple[np.ndarray, Any]:
        """The class distribution ``(N, K)`` each input is explained for (one-hot for class
        indices and ``"predicted"``), and the layer's features ``(N, C, ...)``, from one
        clean pass over the inputs."""
        backend = self.backend
        limit = backend.pass_size(x) or n
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
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            return p / p.sum(axis=1, keepdims=True), f
        if isinstance(target, str):  # "predicted"
            indices = z.argmax(axis=1)
        else:
            indices = class_indices(target, n)
            _check_in_range(indices, k)
        return np.eye(k, dtype=np.float64)[indices], f

    def _target_loss(self) -> Callable[..., Any]:
        """``(batch, target_rows) -> mean cross-entropy``: one function per engine, so a
        compiled step is reused from call to call."""
        cached = self._cached("target")
        if cached is not None:
            return cached
        backend, model = self.backend, self.model

        def target_loss(batch: Any, target_rows: Any) -> Any:
            logits = model_logits(backend.call(model, batch))
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

        return self._cache("target", target_loss)

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
