"""Small helpers every backend package needs, written once."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
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
    Unknown names raise ``LookupError`` listing the model's layers.
    """
    if isinstance(layer, layer_type):
        return layer
    if not isinstance(layer, str):
        kinds = layer_type if isinstance(layer_type, tuple) else (layer_type,)
        raise TypeError(
            f"layer must be a {' or '.join(k.__qualname__ for k in kinds)} or a "
            f"layer name, got {type(layer).__name__}"
        )
    if model is None:
        raise ValueError(f"layer {layer!r} is given by name, so the model is needed to find it")
    layers = named_layers(model)
    if layer not in layers:
        raise LookupError(f"layer {layer!r} not found in {where}; its layers are: {list(layers)}")
    return layers[layer]


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
