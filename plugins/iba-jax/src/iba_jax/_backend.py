"""The JAX backend for Flax NNX models: ``jax.numpy``, keys, ``jax.value_and_grad``, ``jax.jit``.

A *layer* is a named submodule of an ``nnx.Module`` (``"conv2"``, ``"blocks.0.act"``: the
path of attributes and list indices), and hooks see what its ``__call__`` takes and
returns.  Flax images and features are channels-last (``(N, H, W, C)``, ``(N, T, C)``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iba_core.apps.loading import first_line, model_from_factory
from iba_core.contract import Backend, FeatureHook, Handle, HookList, InputSpec, UsageError, assigned

#: The flags ``Module.eval()`` sets: dropout off, batch norm on its running statistics.
_INFERENCE_FLAGS = {"deterministic": True, "use_running_average": True}

#: The hooks on each hooked layer, by the layer's ``id``.
_HOOKS: dict[int, HookList] = {}
_NO_HOOKS = HookList()
_HOOKED_CLASSES: dict[type, type] = {}
#: One object per distinct graph definition (see JaxBackend._split).
_GRAPHS: dict[Any, Any] = {}
#: Changes whenever a hook is attached or removed (a model's graph definition with it).
_HOOK_CHANGES = [0]
#: No YNNPACK fusions in compiled functions: XLA's CPU compiler fuses the sum of the mask's
#: gradient over the noisy copies into one that runs ten times slower than its own code.
_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _compiler_options() -> dict[str, str]:
    """:data:`_OPTIONS` where this XLA knows them, else none (its defaults)."""
    with contextlib.suppress(Exception):
        jax.jit(jnp.negative, compiler_options=_OPTIONS).lower(1.0).compile()
        return _OPTIONS
    return {}


def _hooked_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` runs the hooks of its instance.

    Python looks ``__call__`` up on the class, so a hooked layer gets this class, and its
    own class back when the last hook comes off.  One subclass per layer class keeps
    ``nnx.split``'s graph definition, hence ``jax.jit``'s cache, the same from call to call.
    """
    if cls not in _HOOKED_CLASSES:

        def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            hooks = _HOOKS.get(id(self), _NO_HOOKS)
            out = cls.__call__(self, hooks.run(x, on_input=True), *args, **kwargs)
            return hooks.run(out)

        hooked = type(cls)(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        _HOOKED_CLASSES[cls] = hooked
    return _HOOKED_CLASSES[cls]


def _removed(layer: Any, hooks: HookList) -> None:
    """After a hook on ``layer`` is removed: its own class back once it has none."""
    _HOOK_CHANGES[0] += 1
    if not hooks.entries and _HOOKS.get(id(layer)) is hooks:
        del _HOOKS[id(layer)]
        object.__setattr__(layer, "__class__", type(layer).__bases__[0])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key: Any, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
    """One compiled dispatch per draw (split and normal op by op took half a millisecond).
    Threefry's partitionable form compiles its counters as constants of the draw's shape
    (seconds on a CPU for a feature map); the classic form compiles in a tenth."""
    with jax.threefry_partitionable(False):
        key, sub = jax.random.split(key)
        return jax.random.normal(sub, shape, dtype=dtype), key


def _device(x: Any) -> Any:
    """The device of a concrete array; ``None`` for tracers and other objects."""
    concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    return next(iter(x.devices())) if concrete else None


class _Local(threading.local):
    def __init__(self) -> None:
        self.frozen: list[Any] = []  # the models inside frozen(), innermost last
        # Inside frozen(): each model's split (see JaxBackend._split), made once per
        # context instead of once per compiled call (the weights cannot change).
        self.splits: dict[int, tuple[int, Any, Any]] = {}
        self.copies: dict[int, Any] = {}  # while tracing: a model's copy holding traced weights


class JaxBackend(Backend):
    """JAX with Flax NNX models; every compiled function takes the weights as arguments."""

    name = "jax"
    modules = ("jax", "jaxlib", "flax")
    channels_last = True
    # Op-by-op JAX pays a dispatch per operation; a jitted step compiles in about a second.
    compile_by_default = True
    prunes_unused = True  # XLA leaves out what a compiled function never uses
    functional_keys = True  # make_generator gives a key; draw_keyed splits it
    layer_type = nnx.Module

    def __init__(self) -> None:
        self._local = _Local()

    # -- arrays ----------------------------------------------------------------------
    def namespace(self) -> Any:
        return jnp

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, like: Any = None) -> Any:
        a = np.asarray(a)
        dtype = like.dtype if like is not None and a.dtype.kind == "f" else None
        return jax.device_put(jnp.asarray(a, dtype=dtype), _device(like))

    # -- random draws: functional keys -------------------------------------------------
    def make_generator(self, seed: int, like: Any) -> Any:
        return jax.device_put(jax.random.key(np.uint32(seed)), _device(like))

    def draw_keyed(self, shape: tuple[int, ...], like: Any, key: Any) -> tuple[Any, Any]:
        """Draws with a split of ``key``, and the key for the next draw."""
        return _draw(key, tuple(int(s) for s in shape), like.dtype)

    # -- gradients and compilation --------------------------------------------------------
    def gradient(self, fn: Callable[..., Any], param: Any, *operands: Any) -> tuple[Any, Any]:
        """``jax.value_and_grad`` in ``param``; the core compiles the step from it."""

        def checked(p: Any) -> Any:
            out = fn(p, *operands)
            if not isinstance(out, jax.core.Tracer):  # computed without p
                raise ValueError(
                    f"the loss ({type(out).__name__}) has no gradient path to the mask; "
                    "compute it from the model's output on the batch it is given"
                )
            return out

        return jax.value_and_grad(checked)(param)

    def pass_size(self, like: Any) -> int | None:
        # CPU caches favour small passes, and each pass costs some eager work: 80 samples (8
        # inputs x 10 copies) explained 16 images of bench_speed's small net fastest on 2 cores
        # (10% faster than 32, 30% faster than all 160 at once).  Accelerators take all.
        return 80 if getattr(_device(like), "platform", "cpu") == "cpu" else None

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``jax.jit(fn)``, with the weights of the models in :meth:`frozen` as arguments.

        Arrays a jitted function reads from its closure become constants of the compiled
        program: kept forever (a later weight update would be ignored) and copied into it.
        So each call splits the frozen models into graph definition (static: a new one
        compiles anew) and weights, and the traced function runs :meth:`call` on copies
        merged from the traced weights; hooks on the originals' layers serve the copies.
        """
        local = self._local

        def traced(graphs: tuple[Any, ...], weights: list[Any], args: tuple[Any, ...]) -> Any:
            copies, aliases = {}, []
            for model, (graph, tree), leaves in zip(
                dict.fromkeys(local.frozen), graphs, weights, strict=True
            ):
                copies[id(model)] = copy = nnx.merge(graph, jax.tree.unflatten(tree, leaves))
                for (_, a), (_, b) in zip(nnx.iter_modules(model), nnx.iter_modules(copy), strict=True):
                    if id(a) in _HOOKS:
                        _HOOKS[id(b)] = _HOOKS[id(a)]
                        aliases.append(id(b))
            saved, local.copies = local.copies, copies
            try:
                return fn(*args)
            finally:
                local.copies = saved
                for key in aliases:
                    del _HOOKS[key]

        nested = jax.jit(traced, static_argnums=0)  # inside a trace: its options hold
        jitted: dict[tuple[int, ...], Callable[..., Any]] = {}  # by the graphs' ids

        def call(*args: Any) -> Any:
            if local.copies:  # inside traced(): part of that program
                return fn(*args)
            models = list(dict.fromkeys(local.frozen))  # traced() sees the same list
            graphs, weights = zip(*map(self._split, models), strict=True) if models else ((), ())
            if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
                return nested(tuple(graphs), list(weights), args)
            key = tuple(id(g) for g, _ in graphs)  # _GRAPHS holds them: the ids stay theirs
            if key not in jitted:
                jitted[key] = jax.jit(
                    functools.partial(traced, tuple(graphs)), compiler_options=_compiler_options()
                )
            return jitted[key](list(weights), args)

        return call

    def _split(self, model: Any) -> tuple[tuple[Any, Any], list[Any]]:
        """``((graph definition, weights' tree), weights' leaves)`` of a frozen model, made
        once per context and hook change.  Equal graph definitions share one object, so a
        compiled function finds its program by the object's id: hashing the definition as a
        static argument took about a millisecond per call, as did flattening NNX weights."""
        cached = self._local.splits.get(id(model))
        if cached is None or cached[0] != _HOOK_CHANGES[0]:
            graph, state = nnx.split(model)
            leaves, tree = jax.tree.flatten(state)
            cached = (_HOOK_CHANGES[0], (_GRAPHS.setdefault(graph, graph), tree), leaves)
            self._local.splits[id(model)] = cached
        return cached[1], cached[2]

    # -- models ------------------------------------------------------------------------
    def attach(self, model: Any, layer: Any, hook: FeatureHook, *, on_input: bool = False) -> Handle:
        target = self.resolve(model, layer)
        if id(target) not in _HOOKS:  # object.__setattr__: NNX refuses changes inside a JAX
            # trace, and the suite attaches hooks inside jax.value_and_grad; _removed undoes it.
            _HOOKS[id(target)] = HookList(functools.partial(_removed, target))
            object.__setattr__(target, "__class__", _hooked_class(type(target)))
        _HOOK_CHANGES[0] += 1
        return _HOOKS[id(target)].add(hook, on_input=on_input)

    def call(self, model: Any, x: Any) -> Any:
        copy = self._local.copies.get(id(model))
        if copy is not None:
            return copy(x)
        with self.frozen(model):
            return model(x)

    @contextlib.contextmanager
    def frozen(self, model: Any) -> Iterator[Any]:
        """Every submodule's ``deterministic`` and ``use_running_average`` set (as
        ``Module.eval()`` does) and restored on exit.  JAX computes no weight gradients
        unless asked, and :meth:`value_and_grad` asks for the parameter's only."""
        if model is None:
            yield model
            return
        modules = [m for _, m in nnx.iter_modules(model)]
        with assigned(modules, _INFERENCE_FLAGS, object.__setattr__):  # also inside a trace (see attach)
            self._local.frozen.append(model)
            try:
                yield model
            finally:
                self._local.frozen.pop()
                if model not in self._local.frozen:  # the weights may change from here on
                    self._local.splits.pop(id(model), None)

    def named_layers(self, model: Any) -> dict[str, Any]:
        """Every submodule of ``model`` by its dotted path (the root left out)."""
        return {".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if path}

    def layer_layout(self, model: Any, layer: Any) -> str | None:
        """The layer's ``data_format`` attribute if it declares one (a module that puts
        channels first), else ``"channels_last"``: Flax's convolutions, pooling, embeddings
        and attention all give ``(N, ..., C)``."""
        target = self.resolve(model, layer)
        return getattr(target, "data_format", "channels_last")

    # -- the iba command (which asks _plugin.claims_model for --backend auto) ----------------
    def load_model(self, spec: str, weights: str | None = None, device: str | None = None) -> Any:
        if weights is not None:
            raise UsageError("the jax backend reads no --weights file: load the weights in the factory")
        model = model_from_factory(spec, nnx.Module, "flax.nnx.Module")
        if device is not None:
            try:
                nnx.update(model, jax.device_put(nnx.state(model), jax.devices(device)[0]))
            except RuntimeError as exc:
                raise UsageError(f"--device {device!r} is not usable: {first_line(exc)}") from None
        return model

    def describe_input(self, model: Any) -> InputSpec:
        """Channels-last images; the channels of a convolution taking 1 or 3 (NNX lists
        submodules by name, not in call order, so the first one is not known)."""
        in_channels = [m.in_features for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
        return InputSpec(channels=next((c for c in in_channels if c in (1, 3)), None), channels_last=True)

    def to_device(self, x: Any, model: Any) -> Any:
        weights = jax.tree.leaves(nnx.state(model))
        return jax.device_put(x, _device(weights[0])) if weights else x
