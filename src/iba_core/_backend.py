"""The contract a backend fulfils: what the Array API cannot express."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

import numpy as np

FeatureHook = Callable[[Any], Any]
"""Called with a layer's features, channels-first ``(N, C, ...)``; returns replacement
features of the same shape, or ``None`` to leave them unchanged."""


class Handle(Protocol):
    """What :meth:`Backend.attach` returns; ``remove()`` takes the hook out again."""

    def remove(self) -> None: ...


class Backend(abc.ABC):
    """One deep-learning framework, seen by the core.

    A backend supplies only what the Array API standard lacks: a namespace for its
    tensors, random draws, gradients with respect to the bottleneck parameters, a way
    to put a hook on a layer of a model, and conversions.  Every algorithm lives in the
    core.  Subclass it, implement the abstract methods, and register an instance of
    :class:`BackendSpec` from an ``iba.backends`` entry point (see :mod:`iba_core.hookspecs`).

    Class attributes:
        name: short name users pass to ``get_backend``.
        modules: top-level module names whose types this backend handles, e.g.
            ``("torch",)``.  Used to pick a backend from an object without importing
            any framework.
        channels_last: whether the framework's feature maps are ``(N, ..., C)``; the
            backend converts to channels-first for the core in :meth:`attach`.
    """

    name: ClassVar[str] = ""
    modules: ClassVar[tuple[str, ...]] = ()

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

    @abc.abstractmethod
    def standard_normal(self, shape: tuple[int, ...], like: Any, generator: Any = None) -> Any:
        """Draw ``N(0, 1)`` samples of ``shape`` on ``like``'s device and dtype."""

    def make_generator(self, seed: int, like: Any) -> Any:
        """A seeded random generator for :meth:`standard_normal` on ``like``'s device."""
        raise NotImplementedError(f"backend {self.name!r} has no seeded generator")

    def stop_gradient(self, x: Any) -> Any:
        """``x`` cut from the autograd graph."""
        return x

    # -- autograd ------------------------------------------------------------------
    @abc.abstractmethod
    def value_and_grad(self, fn: Callable[[Any], Any], param: Any) -> tuple[float, Any]:
        """Evaluate scalar ``fn(param)`` and its gradient with respect to ``param`` only.

        Must not compute or accumulate gradients of model weights.  Returns the value
        as a Python float and the gradient as a tensor shaped like ``param``.
        """

    # -- models --------------------------------------------------------------------
    @abc.abstractmethod
    def attach(self, model: Any, layer: Any, hook: FeatureHook, *, on_input: bool = False) -> Handle:
        """Put ``hook`` on the output (or input) of ``layer`` in ``model``.

        ``layer`` is a layer object or its name; ``model`` may be ``None`` when a layer
        object is given.  Unknown names raise ``LookupError`` listing the model's layers.
        """

    @abc.abstractmethod
    def call(self, model: Any, x: Any) -> Any:
        """Run ``model`` on ``x`` in inference mode and return its output."""

    def frozen(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """Context in which ``model`` is in inference mode with weights not trainable.

        Every flag is restored on exit, also when an exception escapes.
        """
        return contextlib.nullcontext()

    def layer_names(self, model: Any) -> list[str]:
        """Names of the layers of ``model`` that :meth:`attach` accepts."""
        return []

    def pass_size(self, like: Any) -> int | None:
        """Suggested largest number of samples per model pass on ``like``'s device.

        Explaining many inputs splits them into passes of at most this many samples
        (inputs are independent, so the result is the same).  ``None``: no limit, the
        right answer on accelerators; CPU caches favour small passes.
        """
        return None

    #: Whether bottlenecks compile the pure array parts of each optimisation step by
    #: default (see ``compile`` in :class:`iba_core.Bottleneck`): worth it where eager
    #: operations are expensive and compiling is quick.
    compile_by_default: bool = False

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Optionally compile ``fn`` (``torch.compile``, ``tf.function``); default: unchanged."""
        return fn

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
