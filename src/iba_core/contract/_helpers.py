"""Small helpers every backend package needs, written once."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any


def resolve_layer(
    model: Any,
    layer: Any,
    layer_type: type | tuple[type, ...],
    named_layers: Callable[[Any], Mapping[str, Any]],
    where: str = "the model",
) -> Any:
    """A layer given directly (an instance of ``layer_type``), or found by name.

    ``named_layers(model)`` maps every name :meth:`Backend.attach` accepts to its layer.
    Unknown names raise ``LookupError`` listing the model's layers.  An empty
    ``layer_type`` takes names only.
    """
    if isinstance(layer, layer_type):
        return layer
    if not isinstance(layer, str):
        kinds = layer_type if isinstance(layer_type, tuple) else (layer_type,)
        objects = f"a {' or '.join(k.__qualname__ for k in kinds)} or " if kinds else ""
        raise TypeError(f"layer must be {objects}a layer name, got {type(layer).__name__}")
    if model is None:
        raise ValueError(f"layer {layer!r} is given by name, so the model is needed to find it")
    layers = named_layers(model)
    if layer not in layers:
        raise LookupError(f"layer {layer!r} not found in {where}; its layers are: {list(layers)}")
    return layers[layer]


class HookList:
    """The hooks on one layer, for a backend that runs them itself (from the layer's own
    call) rather than through a hook mechanism of its framework.

    :meth:`add` returns the hook's :class:`~iba_core.contract.Handle`.  Hooks run in the
    order attached (:meth:`run`), and removing one, in any order and any number of times,
    leaves the others working, as :meth:`Backend.attach` promises.  ``on_remove(hooks)`` is
    called after each removal, e.g. to restore the layer once ``hooks.entries`` is empty.
    """

    def __init__(self, on_remove: Callable[[HookList], None] | None = None) -> None:
        #: ``(hook, on_input)`` pairs, in the order attached.
        self.entries: list[tuple[Callable[[Any], Any], bool]] = []
        self._on_remove = on_remove

    def add(self, hook: Callable[[Any], Any], *, on_input: bool = False) -> _HookListHandle:
        entry = (hook, bool(on_input))
        self.entries.append(entry)
        return _HookListHandle(self, entry)

    def run(self, x: Any, *, on_input: bool = False) -> Any:
        """``x`` through the output hooks (or the input hooks) in turn; a hook that returns
        ``None`` leaves the features as they are."""
        for hook, is_input in list(self.entries):
            if is_input == on_input:
                out = hook(x)
                x = x if out is None else out
        return x

    def remove(self, entry: tuple[Callable[[Any], Any], bool]) -> None:
        """Take out the hook ``entry`` (one of :attr:`entries`); nothing if it is gone."""
        if any(e is entry for e in self.entries):
            self.entries = [e for e in self.entries if e is not entry]
            if self._on_remove is not None:
                self._on_remove(self)


class _HookListHandle:
    def __init__(self, hooks: HookList, entry: tuple[Callable[[Any], Any], bool]) -> None:
        self._hooks, self._entry = hooks, entry

    def remove(self) -> None:
        self._hooks.remove(self._entry)


@contextlib.contextmanager
def assigned(
    objects: Iterable[Any],
    values: Mapping[str, Any],
    setter: Callable[[Any, str, Any], None] = setattr,
) -> Iterator[None]:
    """A context in which each of ``objects`` has those attributes of ``values`` that it has
    set to their values (e.g. every submodule's inference flags, in :meth:`Backend.frozen`).

    On exit, also when an exception escapes, every attribute that differs from what it was
    is set back, object by object in the order given.  ``setter`` sets an attribute: ``setattr``,
    or e.g. ``object.__setattr__`` where a framework refuses ordinary assignment.
    """
    saved = [(obj, name, getattr(obj, name)) for obj in objects for name in values if hasattr(obj, name)]
    try:
        for obj, name, _ in saved:
            setter(obj, name, values[name])
        yield
    finally:
        for obj, name, value in saved:
            if getattr(obj, name) != value:
                setter(obj, name, value)


def lazy_exports(
    package: str, table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose attributes load on first access.

    ``table`` maps each public name to ``"module"`` (the name is that module's attribute
    of the same name) or ``"module:"`` (the name is the module itself).  A backend package
    uses it so that the plugin registry can import it without importing its framework.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, colon, _ = target.partition(":")
        module = importlib.import_module(module_name)
        value = module if colon else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
