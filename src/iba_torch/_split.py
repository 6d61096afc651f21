"""The part of a PyTorch model after a layer, cut out with ``torch.fx``.

The Per-Sample Bottleneck's optimisation runs the model ten times per input, but only the
layers after the bottleneck see anything new (the noise); the layers before it give the
same features every time.  If the model can be traced and the layer's output is the only
way from the input to the model's output, the part after the layer becomes its own module
and the engine runs the layers before it once per explanation.  Anything else (a model
that does not trace, a layer called twice, a skip connection around the layer) gives
``None`` and the engine keeps running the whole model.
"""

from __future__ import annotations

import torch
from torch import fx


class _CutTracer(fx.Tracer):
    """Traces the model's own ``forward`` and the ``nn.Sequential`` containers in it; every
    other module (``layer`` included) is kept as one call, so it runs for real, with any
    side effects of its ``forward``, each time the cut model runs."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self._layer = layer

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return m is self._layer or type(m) is not torch.nn.Sequential


def _needed(output: fx.Node, cut: fx.Node) -> set[fx.Node] | None:
    """The nodes the output needs, up to ``cut``; ``None`` if it also needs an input."""
    needed: set[fx.Node] = set()
    todo = [output]
    while todo:
        node = todo.pop()
        if node in needed or node is cut:
            continue
        if node.op == "placeholder":
            return None  # a path from the input around the layer
        needed.add(node)
        todo.extend(node.all_input_nodes)
    return needed


def split_after(model: torch.nn.Module, layer: torch.nn.Module) -> torch.nn.Module | None:
    """A module computing ``model``'s output from ``layer``'s output, or ``None``.

    The module shares the model's submodules and weights.  ``None`` when the model does
    not trace with ``torch.fx``, runs the layer other than exactly once or only inside
    another module (a block of the model's own class), or reaches its output from its input
    other than through the layer.  The model's own ``forward`` is traced once here: Python
    it runs besides tensor operations (a counter, a branch on an attribute) runs at this
    time only; the engine compares the cut model's output with the whole model's on every
    explanation and uses it only when they agree.
    """
    names = [name for name, m in model.named_modules() if m is layer]
    if len(names) != 1 or not names[0]:
        return None
    try:
        graph = _CutTracer(layer).trace(model)
    except Exception:  # not traceable (data-dependent control flow, ...): no cut
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == names[0]]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(calls) != 1 or len(outputs) != 1:
        return None
    cut = calls[0]
    needed = _needed(outputs[0], cut)
    if needed is None:
        return None
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {cut: tail.placeholder("features")}
    for node in graph.nodes:  # in order, so every node's inputs are already copied
        if node in needed:
            env[node] = tail.node_copy(node, lambda n: env[n])
    try:
        module = fx.GraphModule(model, tail)
    except Exception:
        return None
    return module
