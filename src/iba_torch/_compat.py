"""PyTorch helpers kept for users of the reference library (``IBA.pytorch``)."""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["insert_into_sequential"]


def insert_into_sequential(
    sequential: torch.nn.Sequential, layer: torch.nn.Module, idx: int, name: str = "iba"
) -> torch.nn.Sequential:
    """A new ``nn.Sequential`` with ``layer`` inserted before position ``idx`` of ``sequential``.

    ``idx`` follows ``list.insert`` (negative counts from the end).  The modules are the
    same objects (weights are shared, nothing is copied) and ``sequential`` itself is not
    changed.  Children named by position (``0, 1, ...``) are renumbered, as in the
    reference library, so ``new[idx]`` is ``layer``; children with names of their own
    keep them and ``layer`` is called ``name``.  ``iba_torch.IBA()`` created without a
    layer is such a module: the identity until a bottleneck is active.
    """
    if not isinstance(sequential, torch.nn.Sequential):
        raise TypeError(f"sequential must be a torch.nn.Sequential, got {type(sequential).__name__}")
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
    children = list(sequential.named_children())
    if any(module is layer for _, module in children):
        raise ValueError("layer is already a child of sequential; insert a new module")
    if all(child.isdigit() for child, _ in children):
        modules = [module for _, module in children]
        modules.insert(idx, layer)
        return torch.nn.Sequential(*modules)
    if name in dict(children):
        raise ValueError(f"sequential already has a child called {name!r}; pass another name=")
    children.insert(idx, (name, layer))
    return torch.nn.Sequential(OrderedDict(children))
