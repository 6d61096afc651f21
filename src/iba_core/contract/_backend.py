"""The contract a backend fulfils: what the Array API cannot express."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from ._collectives import Collectives
from ._helpers import resolve_layer

FeatureHook = Callable[[Any], Any]
"""Called with a layer's features ``(N, ...)`` as the layer produces them; returns
replacement features (the same per-sample shape, a whole multiple of the rows), or
``None`` to leave them unchanged."""


class Handle(Protocol):
    """What :meth:`Backend.attach` returns; ``remove()`` takes the hook out again."""

    def remove(self) -> None: ...


#: The two layouts of feature maps (and of image inputs): ``(N, C, ...)`` or ``(N, ..., C)``.
LAYOUTS = ("channels_first", "channels_last")


class UsageError(Exception):
    """A problem with what the user gave (a file, a name, a value), not a bug.

    The ``iba`` command prints it as one line and exits with status 2; backends raise it
    from the optional command-line methods below.
    """

    exit_code = 2


class RunFailure(UsageError):
    """The input looked right but running failed (e.g. the loss became NaN): exit status 1."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a backend knows about a model's input (see :meth:`Backend.describe_input`).

    Attributes:
        channels: number of image channels, or ``None`` if the model does not say.
        size: ``(H, W)`` the model declares, or ``None``.
        channels_last: whether the model takes images ``(N, H, W, C)``.
    """

    channels: int | None = None
    size: tuple[int, int] | None = None
    channels_last: bool = False


class Backend(abc.ABC):
    """One deep-learning framework, seen by the core.

    A backend supplies only what the Array API standard lacks: a namespace for its
    tensors, random draws, gradients with respect to the bottleneck parameters, a way
    to put a hook on a layer of a model, and conversions.  Every algorithm and all of
    the explanation workflow live in the core.  Subclass it, implement the abstract
    methods and the random draws (:meth:`standard_normal`, or :meth:`draw_keyed` with
    :attr:`functional_keys`), and register an instance of :class:`BackendSpec` from an
    ``iba.backends`` entry point (see :mod:`iba_core.contract.hookspecs`).

    Everything a backend may declare is declared here, once, with its default.

    Class attributes:
        name: short name users pass to ``get_backend``.
        modules: top-level module names whose types this backend handles, e.g.
            ``("torch",)``.  Used to pick a backend from an object without importing
            any framework.
        channels_last: whether the framework's image inputs are ``(N, H, W, C)`` by
            default (Keras) rather than ``(N, C, H, W)`` (PyTorch).  The layout of a
            layer's *features* is a property of the layer: see :meth:`layer_layout`.
        compile_by_default: whether the engine compiles the whole optimisation step with
            :meth:`compile_step` unless told otherwise: worth it where eager operations
            are expensive and compiling is quick.
        prunes_unused: whether :meth:`compile` leaves out of a compiled function the work
            whose result it never uses (XLA does).  Where :meth:`split_after` cannot cut
            a model, the engine then cuts it itself: the whole model, compiled, on zeros,
            with the layer's output replaced by the features given, so the layers before
            the layer drop out of the program.
        functional_keys: whether the framework's random generators are functional keys
            (JAX) rather than stateful objects: the backend then implements
            :meth:`draw_keyed` instead of :meth:`standard_normal`, and :meth:`draw` passes
            each key on (a fresh one when none is given).
        layer_type: the class (or classes) of the layer objects :meth:`attach` takes,
            for :meth:`resolve` (e.g. ``torch.nn.Module``).
    """

    name: ClassVar[str] = ""
    modules: ClassVar[tuple[str, ...]] = ()
    channels_last: ClassVar[bool] = False
    compile_by_default: ClassVar[bool] = False
    prunes_unused: ClassVar[bool] = False
    functional_keys: ClassVar[bool] = False
    layer_type: ClassVar[type | tuple[type, ...]] = ()

    # -- arrays --------------------------------------------------------------------
    @abc.abstractmethod
    def namespace(self) -> Any:
        """The Array API namespace for this backend's tensors."""

    @abc.abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """Copy a tensor to host memory as NumPy (detached from any graph)."""

    @abc.abstractmethod
    def from_numpy(self, a: np.ndarray, like: Any = None) -> Any:
        """Make a tensor from NumPy on ``like``'s device (with ``like``'s dtype for floats)."""

    # -- random draws ---------------------------------------------------------------
    def standard_normal(self, shape: tuple[int, ...], like: Any, generator: Any = None) -> Any:
        """Draw ``N(0, 1)`` samples of ``shape`` on ``like``'s device and dtype.

        A backend with stateful generators implements this.  A ``generator`` from
        :meth:`make_generator` advances on every draw, so two successive draws differ (the
        conformance suite checks it); ``None`` draws from the framework's global state.
        With :attr:`functional_keys` the default returns :meth:`draw`'s sample.
        """
        if not self.functional_keys:
            raise NotImplementedError(
                f"backend {self.name!r} implements neither standard_normal nor, with "
                "functional_keys = True, draw_keyed"
            )
        return self.draw(shape, like, generator)[0]

    def draw_keyed(self, shape: tuple[int, ...], like: Any, key: Any) -> tuple[Any, Any]:
        """With :attr:`functional_keys`: ``N(0, 1)`` samples of ``shape`` on ``like``'s
        device and dtype drawn with ``key`` (from :meth:`make_generator`), and the key for
        the next draw (e.g. a split of ``key``).  The same key gives the same samples."""
        raise NotImplementedError(f"backend {self.name!r} declares functional_keys but has no draw_keyed")

    def make_generator(self, seed: int, like: Any) -> Any:
        """A seeded random generator (or key) for :meth:`draw` on ``like``'s device."""
        raise NotImplementedError(f"backend {self.name!r} has no seeded generator")

    def draw(self, shape: tuple[int, ...], like: Any, generator: Any = None) -> tuple[Any, Any]:
        """``N(0, 1)`` samples and the generator to use for the next draw.

        The engine draws only through this method.  Stateful generators: the samples of
        :meth:`standard_normal` and the same generator.  With :attr:`functional_keys`:
        :meth:`draw_keyed` with the key (``None``: a fresh key from :meth:`make_generator`
        with a random seed), which returns the next key.
        """
        if not self.functional_keys:
            return self.standard_normal(shape, like=like, generator=generator), generator
        if generator is None:
            generator = self.make_generator(int(np.random.SeedSequence().generate_state(1)[0]), like)
        return self.draw_keyed(shape, like, generator)

    def stop_gradient(self, x: Any) -> Any:
        """``x`` cut from the autograd graph."""
        return x

    # -- autograd ------------------------------------------------------------------
    def value_and_grad(self, fn: Callable[..., Any], param: Any, *operands: Any) -> tuple[float, Any]:
        """Evaluate scalar ``fn(param, *operands)`` and its gradient with respect to ``param``.

        Must not compute or accumulate gradients of model weights (the suite checks it).
        Returns the value as a Python float and the gradient as a tensor shaped like
        ``param``.  ``fn`` reads nothing but its arguments and the (frozen) model.  A
        backend implements this or :meth:`gradient` (then this is its value as a float).
        """
        if type(self).gradient is Backend.gradient:
            raise NotImplementedError(f"backend {self.name!r} implements neither value_and_grad nor gradient")
        value, grad = self.gradient(fn, param, *operands)
        return float(value), grad

    def gradient(self, fn: Callable[..., Any], param: Any, *operands: Any) -> tuple[Any, Any]:
        """:meth:`value_and_grad` as arrays (the value a 0-d tensor), written so that it
        can run inside compiled code (``jax.value_and_grad``, a ``tf.GradientTape``).  A
        backend that has it gets :meth:`value_and_grad` and :meth:`compile_step` from it."""
        raise NotImplementedError(f"backend {self.name!r} has no traceable gradient")

    def optimisation_step(self, fn: Callable[..., Any], update: Callable[..., Any]) -> Callable[..., Any]:
        """The step of :meth:`compile_step`, not compiled, from :meth:`gradient`."""

        def step(param: Any, state: tuple[Any, ...], operands: tuple[Any, ...]) -> Any:
            value, grad = self.gradient(fn, param, *operands)
            new_param, *new_state = update(param, grad, *state)
            return value, new_param, tuple(new_state)

        return step

    def compile_step(self, fn: Callable[..., Any], update: Callable[..., Any]) -> Callable[..., Any] | None:
        """One whole optimisation step, compiled: or ``None`` (not compiled).  The default
        compiles :meth:`optimisation_step` with :meth:`compile` where the backend has
        :meth:`gradient`, and returns ``None`` otherwise.

        Returns ``step(param, state, operands) -> (value, new_param, new_state)`` where
        ``value, grad`` are ``fn(param, *operands)`` and its gradient with respect to
        ``param`` only, and ``(new_param, *new_state) = update(param, grad, *state)``
        (the optimiser: Adam's moments and step scalars in ``state``, a tuple of arrays).
        ``fn`` and ``update`` read nothing but their arguments and the frozen model, so
        ``step`` may be traced once and called many times with new operands of the same
        shapes (``tf.function``, ``torch.compile``, ``jax.jit``); ``value`` may be a 0-d
        tensor.  The engine's loss is such an ``fn``: its operands are the standard noise,
        the inputs, the normalised features and statistics, and the targets.
        """
        if type(self).gradient is Backend.gradient:
            return None
        return self.compile(self.optimisation_step(fn, update))

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Optionally compile a pure array function; default: unchanged."""
        return fn

    def cross_entropy(self, logits: Any, probabilities: Any) -> Any:
        """Mean over rows of ``-sum_k probabilities[i, k] * log_softmax(logits)[i, k]``.

        The engine's target loss: ``probabilities`` ``(B, K)`` (a tensor like ``logits``)
        holds one-hot rows for class targets, or each input's class distribution for
        ``target="all"``.  The default is the core's Array API formula; a backend may use
        its framework's fused kernel.
        """
        from ..math import cross_entropy

        return cross_entropy(logits, probabilities)

    # -- models --------------------------------------------------------------------
    @abc.abstractmethod
    def attach(self, model: Any, layer: Any, hook: FeatureHook, *, on_input: bool = False) -> Handle:
        """Put ``hook`` on the output (or input) of ``layer`` in ``model``.

        The hook sees the features as the layer produces them (the engine handles the
        layout); it returns a replacement or ``None``.  A replacement may hold a whole
        multiple of the batch's rows (the engine's noisy copies).  ``layer`` is a layer
        object or its name; ``model`` may be ``None`` when a layer object is given.
        Unknown names raise ``LookupError`` listing the model's layers.  Hooks on one
        layer stack: they run in the order attached, and removing one in any order
        leaves the others working (the suite checks it).
        """

    @abc.abstractmethod
    def call(self, model: Any, x: Any) -> Any:
        """Run ``model`` on ``x`` in inference mode and return its output."""

    def frozen(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """Context in which ``model`` is in inference mode with weights not trainable.

        Every flag is restored on exit, also when an exception escapes (the suite checks
        it).  ``model`` may be ``None`` (only a layer is known): a backend then freezes
        whatever model runs inside the context, if it can.
        """
        return contextlib.nullcontext()

    def named_layers(self, model: Any) -> Mapping[str, Any]:
        """Every layer of ``model`` that :meth:`attach` accepts by name, by its name (empty
        by default).  :meth:`resolve`, :meth:`layer_names` and :meth:`layer_kind` read it."""
        return {}

    def resolve(self, model: Any, layer: Any) -> Any:
        """The layer object ``layer`` names: a :attr:`layer_type` given directly, or a name
        in :meth:`named_layers`; a wrong name raises ``LookupError`` listing the model's
        layers (see :func:`~iba_core.contract.resolve_layer`)."""
        return resolve_layer(model, layer, self.layer_type, self.named_layers)

    def layer_names(self, model: Any) -> list[str]:
        """Names of the layers of ``model`` that :meth:`attach` accepts: those of
        :meth:`named_layers` by default."""
        return list(self.named_layers(model))

    def layer_name(self, model: Any, layer: Any) -> str | None:
        """The name of ``layer`` (a name is returned as it is), saved with estimates;
        ``None`` if unknown.  The default reads a ``name`` attribute."""
        if isinstance(layer, str):
            return layer
        name = getattr(layer, "name", None)
        return name if isinstance(name, str) else None

    def layer_layout(self, model: Any, layer: Any) -> str | None:
        """The layout of ``layer``'s features where the framework says it for sure:
        ``"channels_first"``, ``"channels_last"``, or ``None`` (not known).

        Keras layers declare it (``data_format``); the engine otherwise assumes
        channels-first for images and asks the user for sequences.
        """
        return None

    def split_after(self, model: Any, layer: Any) -> Callable[[Any], Any] | None:
        """The model after ``layer``: a function of the layer's output (in the layer's own
        layout) that returns the model's output, or ``None`` (the default: not known).

        With it, an explanation runs the layers before the bottleneck once per input
        instead of once per optimisation step.  Return ``None`` wherever the model's output
        depends on its input other than through the layer (a skip connection around it),
        or the layer runs more than once; the engine also checks the result against the
        whole model on the clean pass and runs the whole model if they differ.
        """
        return None

    def pass_size(self, like: Any) -> int | None:
        """Suggested largest number of samples per model pass on ``like``'s device.

        Explaining many inputs splits them into passes of at most this many samples
        (inputs are independent, so the result is the same).  ``None``: no limit, the
        right answer on accelerators; CPU caches favour small passes.
        """
        return None

    # -- the iba command (optional) ------------------------------------------------------
    def claims_model(self, spec: str) -> bool:
        """Whether the ``iba`` command's MODEL argument ``spec`` names this backend's kind
        of model (e.g. a ``.keras`` file), so ``--backend auto`` can pick it.  A plugin
        can answer without importing its framework: :attr:`BackendSpec.claims`."""
        return False

    def load_model(self, spec: str, weights: str | None = None, device: str | None = None) -> Any:
        """The model named by ``spec`` for ``iba explain``/``iba layers``, in inference mode,
        on ``device``.  Raise :class:`UsageError` with a one-line message for mistakes."""
        raise UsageError(f"the {self.name} backend does not load models for the iba command")

    def demo_model(self, device: str | None = None) -> Any:
        """The pretrained demo CNN of ``iba demo`` (1x64x64 cluttered digits, 10 classes)."""
        raise UsageError(f"the {self.name} backend has no demo model")

    def demo_text_model(self, device: str | None = None) -> Any:
        """The pretrained transformer of ``iba demo --task text``: token ids ``(N, T)``
        (:mod:`iba_core.apps.text_task`, pad id 0) to logits ``(N, 4)``, with a layer
        ``"embeddings"`` of channels-last features ``(N, T, D)``."""
        raise UsageError(f"the {self.name} backend has no text demo model")

    def layer_kind(self, model: Any, layer: str) -> str | None:
        """What kind of layer ``layer`` is, for ``iba layers``: by default the class name of
        the layer :meth:`named_layers` gives it, ``None`` if unknown."""
        found = self.named_layers(model).get(layer)
        return None if found is None else type(found).__name__

    def describe_input(self, model: Any) -> InputSpec:
        """What ``model`` declares about its image input (channels, size, layout)."""
        return InputSpec(channels_last=self.channels_last)

    def to_device(self, x: Any, model: Any) -> Any:
        """``x`` on the device of ``model``'s weights (unchanged by default)."""
        return x

    # -- data-parallel runs (optional) -------------------------------------------------
    def distributed(self, init: bool = False) -> Collectives | None:
        """The :class:`~iba_core.contract.Collectives` of the framework's distributed
        runtime when this process is part of a data-parallel run of several shards (e.g.
        ``torch.distributed`` initialised with more than one process, or a
        ``tf.distribute`` strategy over several devices in scope); ``None`` otherwise
        (the default).  ``init=True`` (the ``iba`` command) lets the backend start the
        runtime from its launcher's environment (e.g. ``torchrun``'s variables)."""
        return None

    # -- detection -----------------------------------------------------------------
    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` (a tensor or model) belongs to this backend's framework.

        Looks only at the module names of the object's type and its bases, so no
        framework is imported to decide.
        """
        for klass in type(obj).__mro__:
            root = klass.__module__.split(".", 1)[0]
            if root in self.modules:
                return True
        return False

    def __repr__(self) -> str:
        return f"<iba backend {self.name!r}>"


@contextlib.contextmanager
def attached(
    backend: Backend, model: Any, layer: Any, hook: FeatureHook, *, on_input: bool = False
) -> Iterator[Handle]:
    """Context manager form of :meth:`Backend.attach`; the hook is removed on exit."""
    handle = backend.attach(model, layer, hook, on_input=on_input)
    try:
        yield handle
    finally:
        handle.remove()
