"""The TensorFlow 2 / Keras 3 backend: tensors, ``tf.GradientTape`` and layer hooks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from iba_core import contract
from iba_core.contract import Backend, FeatureHook, Handle, HookList

from . import _namespace
from ._cli import TFCliMixin


# -- layouts ---------------------------------------------------------------------------
def to_channels_first(x: Any) -> Any:
    """``(N, ..., C) -> (N, C, ...)``; vectors ``(N, C)`` are returned unchanged."""
    rank = x.shape.rank
    if rank is None or rank <= 2:
        return x
    return tf.transpose(x, [0, rank - 1, *range(1, rank - 1)])


def to_channels_last(x: Any) -> Any:
    """``(N, C, ...) -> (N, ..., C)``; the inverse of :func:`to_channels_first`."""
    rank = x.shape.rank
    if rank is None or rank <= 2:
        return x
    return tf.transpose(x, [0, *range(2, rank), 1])


def is_channels_last(layer: Any = None, data_format: str | None = None) -> bool:
    """Whether features are ``(N, ..., C)``: an explicit ``data_format``, else the layer's
    own ``data_format`` (convolutions, pooling), else Keras' ``image_data_format()``."""
    fmt = data_format or getattr(layer, "data_format", None) or keras.config.image_data_format()
    if fmt not in ("channels_last", "channels_first"):
        raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {fmt!r}")
    return fmt == "channels_last"


#: Keras layers whose features run along the last axis (``(N, T, C)`` for sequences).
_LAST_AXIS_LAYERS: tuple[type, ...] = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
    keras.layers.MultiHeadAttention,
    keras.layers.LayerNormalization,
    keras.layers.RNN,
    keras.layers.LSTM,
    keras.layers.GRU,
    keras.layers.SimpleRNN,
)


# -- finding layers ----------------------------------------------------------------------
def all_layers(model: Any) -> list[keras.layers.Layer]:
    """Every layer of ``model``, nested ones included, each before its own sublayers
    (depth first, in the order the model lists them); input layers are left out."""
    found: list[keras.layers.Layer] = []
    seen: set[int] = set()

    def visit(layer: Any) -> None:
        children = getattr(layer, "_layers", None)
        if children is None:  # pragma: no cover - every Keras 3 layer has _layers
            children = getattr(layer, "layers", [])
        for child in children:
            if id(child) in seen:
                continue
            seen.add(id(child))
            if not isinstance(child, keras.layers.InputLayer):
                found.append(child)
            visit(child)

    visit(model)
    return found


def named_layers(model: Any) -> dict[str, keras.layers.Layer]:
    """Every layer of ``model`` by its name (the first of :func:`all_layers` with a name)."""
    found: dict[str, keras.layers.Layer] = {}
    for candidate in all_layers(model):
        found.setdefault(candidate.name, candidate)
    return found


def resolve_layer(model: Any, layer: Any) -> keras.layers.Layer:
    """A Keras layer given directly, or found by name anywhere in ``model``."""
    return contract.resolve_layer(
        model, layer, keras.layers.Layer, named_layers, where=f"model {getattr(model, 'name', '?')!r}"
    )


# -- hooks -------------------------------------------------------------------------------
class _Patch:
    """The instance-level ``call`` of one layer while hooks are attached to it.

    Keras calls ``self.call`` from ``Layer.__call__`` in eager mode, while tracing a
    ``tf.function`` and from Functional/Sequential graphs alike, so an instance attribute
    ``call`` shadowing the class method sees every forward pass.  Hooks run in attach
    order; when the last one is removed the instance attribute is deleted again (or the
    one that was there before is put back), which restores the layer exactly.
    """

    def __init__(self, layer: keras.layers.Layer) -> None:
        self.layer = layer
        self.had_own_call = "call" in layer.__dict__
        self.previous = layer.__dict__.get("call")
        self.original = layer.call  # bound method (or the previous instance attribute)
        self.hooks = HookList(self._removed)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        call._iba_patch = self  # type: ignore[attr-defined]
        self.function = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hooks = list(self.hooks.entries)
        if any(on_input for _, on_input in hooks):
            if args and isinstance(args[0], np.ndarray):  # e.g. model(numpy_batch)
                args = (tf.convert_to_tensor(args[0]), *args[1:])
            if not args or not tf.is_tensor(args[0]):
                raise TypeError(f"the first input of layer {self.layer.name!r} is not a tensor")
            x = args[0]
            for hook, on_input in hooks:
                if on_input:
                    x = _apply(hook, x, self.layer.name)
            args = (x, *args[1:])
        out = self.original(*args, **kwargs)
        if any(not on_input for _, on_input in hooks):
            if not tf.is_tensor(out):
                raise TypeError(
                    f"layer {self.layer.name!r} returns {type(out).__name__}, not a tensor; put "
                    "the bottleneck on a layer with a single tensor output"
                )
            for hook, on_input in hooks:
                if not on_input:
                    out = _apply(hook, out, self.layer.name)
        return out

    def _removed(self, hooks: HookList) -> None:
        if not hooks.entries:
            self.restore()

    def restore(self) -> None:
        if self.had_own_call:
            self.layer.call = self.previous
        else:
            del self.layer.call


def _apply(hook: FeatureHook, x: Any, name: str) -> Any:
    out = hook(x)
    if out is None:
        return x
    # The batch may grow by a whole factor: the bottleneck may make each input's noisy
    # copies at the layer.
    rows, grown = x.shape[0], out.shape[0]
    whole = rows is None or grown is None or (grown >= rows and grown % max(rows, 1) == 0)
    if tuple(out.shape[1:]) != tuple(x.shape[1:]) or not whole:
        raise ValueError(
            f"the hook on layer {name!r} returned shape {tuple(out.shape)} for "
            f"features of shape {tuple(x.shape)}"
        )
    return out


def _active_patch(layer: keras.layers.Layer) -> _Patch | None:
    own = layer.__dict__.get("call")
    return getattr(own, "_iba_patch", None)


# -- compiled functions ------------------------------------------------------------------
class _Unsupported(Exception):
    """An argument :class:`Compiled` leaves to ``tf.function``'s own dispatch."""


def _signature(x: Any) -> Any:
    """What selects the graph of a call: the nesting of tuples and lists, each tensor's dtype
    and shape, and the other leaves (``None``, Python scalars, dtypes) by value."""
    if isinstance(x, tf.Tensor):
        return (x.dtype, tuple(x.shape))
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(_signature(e) for e in x))
    if x is None or isinstance(x, (bool, int, float, str, tf.DType)):
        return (type(x), x)
    raise _Unsupported


class Compiled(tf.types.experimental.PolymorphicFunction):
    """``tf.function(fn)`` (no AutoGraph) whose eager calls skip its per-call dispatch.

    To find the graph of a call, a ``tf.function`` builds a trace type for every
    argument: about 0.25 ms for an optimisation step's dozen operands on a CPU, a tenth
    of a small network's whole step.  Here each eager call looks its
    graph up by :func:`_signature` and runs it directly; the graphs are the function's
    own (traced by ``get_concrete_function``, so retracing and ``reduce_retracing``
    behave as for the ``tf.function``).  Calls while tracing, under a distribution
    strategy, with keyword arguments or with other arguments (variables, dicts, objects)
    go through the ``tf.function``, as does every call where TensorFlow lacks the entry
    point used.
    """

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        #: The ``tf.function`` itself.
        self.function = tf.function(fn, autograph=False, **options)
        self._graphs: dict[Any, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or not tf.executing_eagerly() or tf.distribute.has_strategy():
            return self.function(*args, **kwargs)
        try:
            key = _signature(args)
        except _Unsupported:
            return self.function(*args)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._graph(args)
        if graph is False:  # no direct call for this signature: the tf.function's own
            return self.function(*args)
        tensors = [leaf for leaf in tf.nest.flatten(args) if isinstance(leaf, tf.Tensor)]
        return graph._call_flat(tensors, graph.captured_inputs)

    @property
    def function_type(self) -> Any:
        return self.function.function_type

    def get_concrete_function(self, *args: Any, **kwargs: Any) -> Any:
        return self.function.get_concrete_function(*args, **kwargs)

    def experimental_get_compiler_ir(self, *args: Any, **kwargs: Any) -> Any:
        return self.function.experimental_get_compiler_ir(*args, **kwargs)

    def _graph(self, args: tuple[Any, ...]) -> Any:
        if len(self._graphs) > 64:
            self._graphs.clear()
        graph = self.function.get_concrete_function(*args)
        tensors = [leaf for leaf in tf.nest.flatten(args) if isinstance(leaf, tf.Tensor)]
        inputs = graph.inputs[: len(graph.inputs) - len(graph.captured_inputs)]
        same = len(inputs) == len(tensors) and all(
            i.dtype == t.dtype and i.shape.is_compatible_with(t.shape)
            for i, t in zip(inputs, tensors, strict=True)
        )
        # ``_call_flat`` runs a traced graph on its flat tensor inputs (what the
        # tf.function does after its dispatch); a TensorFlow without it gets the dispatch.
        return graph if same and hasattr(graph, "_call_flat") else False


# -- the backend -------------------------------------------------------------------------
class TFBackend(TFCliMixin, Backend):
    """TensorFlow 2 with Keras 3: a small tf namespace, ``tf.GradientTape``, patched ``call``.

    Hooks see a layer's features as the layer produces them (the Keras default is
    channels-last, ``(N, h, w, C)`` or ``(N, T, C)``); :meth:`layer_layout` reports the
    layer's ``data_format`` and the engines convert to channels-first ``(N, C, ...)``.
    """

    name = "tf"
    modules = ("tensorflow", "keras")
    channels_last = True
    # Eager TensorFlow pays ~20-30 us per operation (and several more per broadcasting
    # gradient): the whole step, model included, runs as one traced function.
    compile_by_default = True

    # -- arrays ----------------------------------------------------------------------
    def namespace(self) -> Any:
        return _namespace

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        if hasattr(x, "numpy"):  # tensors, tf.Variable, keras.Variable
            return np.asarray(x.numpy())
        return np.asarray(tf.convert_to_tensor(x).numpy())

    def from_numpy(self, a: np.ndarray, like: Any = None) -> tf.Tensor:
        a = np.asarray(a)
        if like is None:
            return _namespace.asarray(a)
        dtype = like.dtype if a.dtype.kind == "f" else None
        return _namespace.asarray(a, dtype=dtype, device=getattr(like, "device", None))

    def standard_normal(self, shape: tuple[int, ...], like: Any, generator: Any = None) -> tf.Tensor:
        """``N(0, 1)`` draws in ``like``'s dtype and on its device: from ``generator`` (a
        ``tf.random.Generator``, as seeded by :meth:`make_generator`) or else from TensorFlow's
        global random state (``tf.random.set_seed`` makes them repeat) through
        :func:`box_muller`, about twice as fast on a CPU as ``tf.random.normal``."""
        shape = tuple(int(s) for s in shape)
        with _namespace._device_scope(getattr(like, "device", None)):
            if generator is not None:
                return generator.normal(shape, dtype=like.dtype)
            return box_muller(shape, like.dtype)

    def make_generator(self, seed: int, like: Any) -> tf.random.Generator:
        with _namespace._device_scope(getattr(like, "device", None)):
            return tf.random.Generator.from_seed(int(seed))

    def stop_gradient(self, x: Any) -> Any:
        return tf.stop_gradient(x)

    # -- autograd ---------------------------------------------------------------------
    def gradient(self, fn: Callable[..., Any], param: Any, *operands: Any) -> tuple[Any, Any]:
        """``fn(param, *operands)`` and its gradient; the tape watches ``param`` only, never
        weights."""
        return _value_and_grad(fn, tf.convert_to_tensor(param), *operands)

    def compile_step(self, fn: Callable[..., Any], update: Callable[..., Any]) -> Callable[..., Any] | None:
        """The whole step, gradient and Adam update included, as one ``tf.function`` (no
        AutoGraph: the step is straight-line code); traced once per operand shape."""
        return Compiled(self.optimisation_step(fn, update))

    def cross_entropy(self, logits: Any, labels: Any) -> Any:
        # TensorFlow's fused kernel takes class probabilities as labels.
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits))

    # -- models -----------------------------------------------------------------------
    def attach(self, model: Any, layer: Any, hook: FeatureHook, *, on_input: bool = False) -> Handle:
        """Run ``hook`` on the output (or first input) of ``layer`` on every call.

        The layer's instance gets a ``call`` attribute that wraps the class's ``call``;
        ``remove()`` deletes it again.  Works for Functional, Sequential and subclassed
        models, eagerly and while a ``tf.function`` is traced (a function traced before
        ``attach`` keeps its old graph; so does one traced while attached, after removal).
        """
        target = resolve_layer(model, layer)
        patch = _active_patch(target)
        if patch is None:
            patch = _Patch(target)
            target.call = patch.function
        return patch.hooks.add(hook, on_input=on_input)

    def layer_layout(self, model: Any, layer: Any) -> str | None:
        """The layer's ``data_format``; channels-last for layers that act on the last axis
        (``Dense``, ``Embedding``, attention, layer norms, recurrent layers: ``(N, T, C)``
        sequences whatever the image setting); else Keras' ``image_data_format()``."""
        if layer is None:
            return None
        target = resolve_layer(model, layer)
        if getattr(target, "data_format", None) is None and isinstance(target, _LAST_AXIS_LAYERS):
            return "channels_last"
        return "channels_last" if is_channels_last(target) else "channels_first"

    def call(self, model: Any, x: Any) -> Any:
        return model(x, training=False)

    @contextlib.contextmanager
    def frozen(self, model: Any) -> Iterator[Any]:
        """Every layer and variable not trainable (BatchNorm then always runs in inference
        mode); each layer's and variable's own flag is restored on exit."""
        if model is None:
            yield model
            return
        layers = [model, *all_layers(model)]
        layer_flags = [(layer, layer.trainable) for layer in layers]
        var_flags = [(v, v.trainable) for v in model.variables if hasattr(v, "trainable")]
        try:
            model.trainable = False
            yield model
        finally:
            for layer, flag in layer_flags:  # outer first: setting it cascades inwards
                layer.trainable = flag
            for v, flag in var_flags:
                if v.trainable != flag:
                    v.trainable = flag

    def named_layers(self, model: Any) -> dict[str, keras.layers.Layer]:
        return named_layers(model)

    def split_after(self, model: Any, layer: Any) -> Callable[[Any], Any] | None:
        """A Functional model from the layer's output to the model's outputs, or ``None``
        (a subclassed model, a layer called more than once or inside a nested model, a
        path from the input around the layer).  Building it records nodes on the model's
        layers; they are removed again, so the model is left as it was."""
        if not isinstance(model, keras.Model):
            return None
        inputs = [x for x in getattr(model, "_operations", ()) if isinstance(x, keras.layers.InputLayer)]
        layers = [model, *all_layers(model), *inputs]
        saved = [(x, list(x._inbound_nodes), list(x._outbound_nodes)) for x in layers]
        try:
            target = resolve_layer(model, layer)
            if len(target._inbound_nodes) != 1:
                return None
            tail = keras.Model(target.output, model.outputs)
        except Exception:  # Keras refuses: not a graph, or not connected through the layer
            return None
        finally:
            for x, inbound, outbound in saved:
                x._inbound_nodes[:] = inbound
                x._outbound_nodes[:] = outbound

        def run(features: Any) -> Any:
            return tail(features, training=False)

        compiled = Compiled(run, reduce_retracing=True)

        def after(features: Any) -> Any:
            # Called eagerly (the engine checks the cut against a clean pass), the layers run
            # as one compiled call instead of op by op; inside a traced step they are traced
            # in line with the rest of the step.
            return compiled(features) if tf.executing_eagerly() else run(features)

        return after

    def distributed(self, init: bool = False) -> Any:
        from ._distributed import collectives

        return collectives()

    def pass_size(self, like: Any) -> int | None:
        # CPU caches favour small passes (see iba_torch's backend); accelerators take all.
        device = str(getattr(like, "device", "") or "")
        return 32 if (not device or "CPU" in device.upper()) else None

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        # No AutoGraph: the core's step is straight-line array code, and converting it
        # only costs tracing time.  Shapes are relaxed after a retrace, so passes of
        # different sizes share one graph.
        return Compiled(fn, reduce_retracing=True)


def box_muller(shape: tuple[int, ...], dtype: Any = tf.float32) -> tf.Tensor:
    """``N(0, 1)`` draws of ``shape`` from TensorFlow's global random state.

    One small seed is drawn eagerly with ``tf.random.uniform`` (so ``tf.random.set_seed``
    repeats the sequence, as it does for ``tf.random.normal``); a compiled function turns
    it into uniforms and those into normals with the Box-Muller transform, using
    vectorised ``log``, ``sqrt``, ``cos`` and ``sin``: on a CPU about half the time of
    ``tf.random.normal``, whose kernel transforms one pair at a time.  16-bit dtypes are
    drawn in float32 and cast.
    """
    dtype = tf.as_dtype(dtype)
    work = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype
    seed = tf.random.uniform((2,), minval=-(2**31), maxval=2**31 - 1, dtype=tf.int32)
    z = _box_muller_fn(tf.constant(shape, dtype=tf.int64), seed, work)
    return z if work == dtype else tf.cast(z, dtype)


def _box_muller(shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    n = tf.reduce_prod(shape)
    pairs = (n + 1) // 2
    u = tf.random.stateless_uniform(tf.stack([tf.constant(2, tf.int64), pairs]), seed, dtype=dtype)
    # 1 - u lies in (0, 1]: the logarithm stays finite.
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u[0]))
    angle = (2.0 * math.pi) * u[1]
    z = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.reshape(z[:n], shape)


# One trace per dtype: the shape is a tensor operand.
_box_muller_fn = Compiled(_box_muller, reduce_retracing=True)


def _value_and_grad(fn: Callable[..., Any], param: Any, *operands: Any) -> tuple[Any, Any]:
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(param)
        value = fn(param, *operands)
    if not tf.is_tensor(value):
        raise ValueError(
            f"the loss returned a {type(value).__name__}, not a tensor; it must be computed "
            "from the model's output on the batch it is given"
        )
    grad = tape.gradient(value, param)
    if grad is None:
        raise ValueError(
            "the loss has no gradient path to the bottleneck's mask (it is cut with "
            "stop_gradient, a constant, or computed without the model); the loss must be "
            "computed from the model's output on the batch it is given"
        )
    return value, grad
