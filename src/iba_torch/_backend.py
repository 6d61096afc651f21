"""The PyTorch backend: tensors, autograd and forward hooks for the core."""

from __future__ import annotations

import contextlib
import difflib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import array_api_compat.torch as torch_xp
import numpy as np
import torch

from iba_core import contract
from iba_core.contract import Backend, FeatureHook, Handle, assigned

from ._cli import TorchCliMixin

#: Samples per model pass on the CPU when many inputs are explained at once: one input's
#: noisy copies (10 by default), so that the memory of a call on many inputs stays near
#: one input's (benchmarks/bench_speed.py, small network: 16 images take 1.3x one image's
#: peak against 3.2x with passes of 3 inputs, for about 10 % more time; the same on the
#: ResNet-style network).  ``inputs_per_pass=`` chooses otherwise.
CPU_PASS_SIZE = 10


#: How many layer names an error message lists before it shortens the list.
MAX_LISTED = 20


def unwrapped(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """``(prefix, inner model)`` of a model in wrappers that prefix its layer names:
    ``torch.compile``'s ``OptimizedModule`` (``"_orig_mod."``) and ``nn.DataParallel`` /
    ``DistributedDataParallel`` (``"module."``), nested in any order; ``("", model)``
    for a plain model."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    prefix = ""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module) and type(model).__name__ == "OptimizedModule":
            prefix, model = prefix + "_orig_mod.", inner
        elif isinstance(model, parallel) and isinstance(model.module, torch.nn.Module):
            prefix, model = prefix + "module.", model.module
        else:
            return prefix, model


def named_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every named module of ``model`` by its full dotted name."""
    return {n: m for n, m in model.named_modules() if n}


def listed_names(names: list[str], wanted: str) -> str:
    """``names`` for an error message: all of them when few, else the closest to
    ``wanted`` and how many there are."""
    if len(names) <= MAX_LISTED:
        return f"its layers are: {names}"
    close = difflib.get_close_matches(wanted, names, n=8, cutoff=0.3)
    shown = close or names[: MAX_LISTED // 2]
    what = "the closest names" if close else "the first"
    return (
        f"it has {len(names)} layers ({what}: {shown}); list them all with "
        "[n for n, _ in model.named_modules()]"
    )


def resolve_layer(model: torch.nn.Module | None, layer: Any) -> torch.nn.Module:
    """A module given directly, or looked up by its dotted name in ``model``.

    In a wrapped model (``torch.compile``, ``nn.DataParallel``) the name is tried as
    given and then with the wrapper's prefix, so ``"layer3"`` finds
    ``"_orig_mod.layer3"`` or ``"module.layer3"``.
    """
    if isinstance(layer, torch.nn.Module) or not isinstance(layer, str) or model is None:
        return contract.resolve_layer(model, layer, torch.nn.Module, named_layers)
    layers = named_layers(model)
    found = layers.get(layer)
    prefix, inner = unwrapped(model)
    if found is None and prefix:
        found = layers.get(prefix + layer)
    if found is None:
        names = [
            n[len(prefix) :] if n.startswith(prefix) else n
            for n in layers
            if n.startswith(prefix) and n != prefix.rstrip(".")
        ]
        wrapped = (
            (
                f" (a {type(model).__name__} wrapping {type(inner).__name__}; names "
                f"are given without its prefix {prefix!r})"
            )
            if prefix
            else ""
        )
        raise LookupError(
            f"layer {layer!r} not found in the model{wrapped}; {listed_names(names or list(layers), layer)}"
        )
    return found


class _HookHandle:
    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def remove(self) -> None:
        self._handle.remove()


class TorchBackend(TorchCliMixin, Backend):
    """PyTorch: array-api-compat's torch namespace, ``torch.autograd.grad``, module hooks."""

    name = "torch"
    modules = ("torch",)

    def namespace(self) -> Any:
        return torch_xp

    def to_numpy(self, x: Any) -> np.ndarray:
        x = x.detach()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: float32 holds it exactly
            x = x.float()
        return x.cpu().numpy()

    def from_numpy(self, a: np.ndarray, like: Any = None) -> torch.Tensor:
        if like is None:
            return torch.as_tensor(a)
        dtype = like.dtype if np.issubdtype(np.asarray(a).dtype, np.floating) else None
        return torch.as_tensor(a, device=like.device, dtype=dtype)

    def standard_normal(self, shape: tuple[int, ...], like: Any, generator: Any = None) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

    def make_generator(self, seed: int, like: Any) -> torch.Generator:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(int(seed))
        return gen

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    def value_and_grad(self, fn: Callable[..., Any], param: Any, *operands: Any) -> tuple[float, Any]:
        p = param.detach().requires_grad_(True)
        with torch.enable_grad():
            value = fn(p, *operands)
            if not isinstance(value, torch.Tensor) or not value.requires_grad:
                raise ValueError(
                    "the loss has no gradient path to the bottleneck's mask (it is detached, a "
                    "Python number, or computed without the model); the loss must be computed "
                    "from the model's output on the batch it is given"
                )
            (grad,) = torch.autograd.grad(value, p)
        return float(value.detach()), grad

    def cross_entropy(self, logits: Any, labels: Any) -> Any:
        # PyTorch's fused kernel takes class probabilities as targets.
        return torch.nn.functional.cross_entropy(logits, labels)

    def to_device(self, x: Any, model: Any) -> Any:
        device = model_device(model)
        return x if device is None or x.device == device else x.to(device)

    def attach(self, model: Any, layer: Any, hook: FeatureHook, *, on_input: bool = False) -> Handle:
        module = resolve_layer(model, layer)
        if on_input:

            def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
                if not args or not isinstance(args[0], torch.Tensor):
                    raise TypeError("the bottleneck layer's first input is not a tensor")
                out = hook(args[0])
                return None if out is None else (out, *args[1:])

            return _HookHandle(module.register_forward_pre_hook(pre_hook))

        def forward_hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return hook(output)
            # Encoder layers (nn.MultiheadAttention, RNNs, Hugging Face-style blocks) return
            # a tuple whose first element is the features; the rest passes unchanged.
            if type(output) in (tuple, list) and output and isinstance(output[0], torch.Tensor):
                out = hook(output[0])
                return None if out is None else type(output)((out, *output[1:]))
            raise TypeError(
                f"the bottleneck layer returns {type(output).__name__}, not a tensor (or a "
                "tuple whose first element is the features); put the bottleneck on a layer "
                "with a tensor output"
            )

        return _HookHandle(module.register_forward_hook(forward_hook))

    def call(self, model: Any, x: Any) -> Any:
        return model(x)

    @contextlib.contextmanager
    def frozen(self, model: Any) -> Iterator[Any]:
        """Eval mode and ``requires_grad=False`` on every parameter; all restored on exit.

        With ``model=None`` (only a layer is known), every module that runs in this thread
        inside the context is put in eval mode just before it runs, and restored on exit.
        """
        if model is None:
            with _freeze_what_runs():
                yield model
            return
        # The flags model.eval() and requires_grad_(False) set, on every module and parameter.
        with (
            assigned(model.modules(), {"training": False}),
            assigned(model.parameters(), {"requires_grad": False}),
        ):
            yield model

    def layer_name(self, model: Any, layer: Any) -> str | None:
        """The layer's dotted name, without a wrapper's prefix (``torch.compile``,
        ``nn.DataParallel``): estimates are shared by the model and its wrappers."""
        if model is None:
            return layer if isinstance(layer, str) else None
        prefix, inner = unwrapped(model)
        if isinstance(layer, str):
            if prefix and layer.startswith(prefix) and layer not in named_layers(inner):
                return layer[len(prefix) :]
            return layer
        return next((n for n, m in inner.named_modules() if m is layer and n), None)

    def named_layers(self, model: Any) -> dict[str, torch.nn.Module]:
        return named_layers(model)

    def layer_layout(self, model: Any, layer: Any) -> str | None:
        """The layout of a module's features where its type says it for sure (see
        :func:`module_layout`); ``None`` otherwise (images are then read channels-first,
        sequences refused until ``layout=`` is given)."""
        if layer is None:
            return None
        return module_layout(model, resolve_layer(model, layer))

    def split_after(self, model: Any, layer: Any) -> Callable[[Any], Any] | None:
        """The model after the layer, traced with ``torch.fx`` (``None`` if it cannot be)."""
        from ._split import split_after

        if not isinstance(model, torch.nn.Module) or type(model).__name__ == "OptimizedModule":
            return None
        return split_after(model, resolve_layer(model, layer))

    def distributed(self, init: bool = False) -> Any:
        from ._distributed import collectives

        return collectives(init)

    def pass_size(self, like: Any) -> int | None:
        # Small passes also suit a CPU's caches: on 2 cores the per-sample cost of a small
        # conv net grows ~2x from batches of 20 to 160 (benchmarks/bench_torch.py).
        return CPU_PASS_SIZE if like.device.type == "cpu" else None

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(fn)


# -- layouts of sequence features ----------------------------------------------------
_nn = torch.nn
#: Modules whose rank-3 output is ``(N, C, T)``.
_CHANNELS_FIRST: tuple[type, ...] = (
    _nn.Conv1d,
    _nn.ConvTranspose1d,
    _nn.MaxPool1d,
    _nn.AvgPool1d,
    _nn.AdaptiveAvgPool1d,
    _nn.AdaptiveMaxPool1d,
    _nn.LPPool1d,
    _nn.BatchNorm1d,
    _nn.InstanceNorm1d,
    _nn.ConstantPad1d,
    _nn.ReflectionPad1d,
    _nn.ReplicationPad1d,
    _nn.Upsample,
    _nn.Conv2d,
    _nn.Conv3d,
    _nn.ConvTranspose2d,
    _nn.BatchNorm2d,
    _nn.MaxPool2d,
    _nn.AvgPool2d,
)
#: Modules that act on the last axis, so a rank-3 output is ``(N, T, C)``.
_CHANNELS_LAST: tuple[type, ...] = (_nn.Embedding, _nn.Linear, _nn.Bilinear)
#: Norms over the last axis when their ``normalized_shape`` has one entry.
_LAST_AXIS_NORMS: tuple[type, ...] = (_nn.LayerNorm, _nn.RMSNorm)
#: Batch-first-aware sequence modules: ``(N, T, C)`` with ``batch_first=True``.
_BATCH_FIRST: tuple[type, ...] = (
    _nn.TransformerEncoderLayer,
    _nn.TransformerDecoderLayer,
    _nn.TransformerEncoder,
    _nn.TransformerDecoder,
    _nn.Transformer,
    _nn.MultiheadAttention,
    _nn.RNNBase,
)
#: Modules that keep the layout of their input (element-wise or shape-preserving).
_KEEPS_LAYOUT: tuple[type, ...] = (
    _nn.Identity,
    _nn.Dropout,
    _nn.ReLU,
    _nn.ReLU6,
    _nn.LeakyReLU,
    _nn.PReLU,
    _nn.ELU,
    _nn.SELU,
    _nn.CELU,
    _nn.GELU,
    _nn.SiLU,
    _nn.Mish,
    _nn.Tanh,
    _nn.Sigmoid,
    _nn.Hardtanh,
    _nn.Hardswish,
    _nn.Hardsigmoid,
    _nn.Softplus,
)
#: Class names of Hugging Face ``transformers`` blocks whose hidden states are
#: ``(N, T, C)`` (recognised by module path and name, without importing the package).
_HF_BLOCK = ("Embeddings", "Layer", "Block", "Attention", "SelfOutput", "Output", "Intermediate", "Encoder")
_HF_CONV = ("Conv", "FeatureEncoder", "FeatureExtractor", "FeatureProjection", "Pool")


def module_layout(model: Any, module: torch.nn.Module) -> str | None:
    """The layout of ``module``'s rank-3 features where it is safe to say.

    Channels-first for 1-D convolutions, pooling and batch norm (``(N, C, T)``);
    channels-last for embeddings, linear layers, layer norms, batch-first transformer
    layers, attention and RNNs, and Hugging Face ``transformers`` blocks (``(N, T, C)``);
    an activation or dropout in an ``nn.Sequential`` takes the layout of the module before
    it.  A sequence-first module (``batch_first=False``) is refused: its features do not
    have the batch axis first.  ``None`` for anything else.
    """
    if isinstance(module, _BATCH_FIRST):
        first = _batch_first(module)
        if first is False:
            raise ValueError(
                f"{type(module).__name__} has batch_first=False: its features are (T, N, C), "
                "without the batch axis first; build it with batch_first=True (the weights "
                "are the same) to explain it"
            )
        return "channels_last" if first else None
    if isinstance(module, _CHANNELS_FIRST):
        return "channels_first"
    if isinstance(module, _CHANNELS_LAST):
        return "channels_last"
    if isinstance(module, _LAST_AXIS_NORMS):
        shape = module.normalized_shape
        return "channels_last" if isinstance(shape, (tuple, list)) and len(shape) == 1 else None
    kind = type(module)
    if kind.__module__.startswith("transformers."):
        name = kind.__name__
        if name.endswith(_HF_BLOCK) and not any(part in name for part in _HF_CONV):
            return "channels_last"
        return None
    if isinstance(module, _KEEPS_LAYOUT) and model is not None:
        return _layout_before(model, module)
    return None


def _batch_first(module: torch.nn.Module) -> bool | None:
    if isinstance(module, (_nn.TransformerEncoder, _nn.TransformerDecoder)):
        first = module.layers[0] if len(module.layers) else None
        return None if first is None else _batch_first(first)
    if isinstance(module, _nn.Transformer):
        return _batch_first(module.encoder)
    if isinstance(module, (_nn.TransformerEncoderLayer, _nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    value = getattr(module, "batch_first", None)
    return None if value is None else bool(value)


def _layout_before(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """The layout of the module that feeds ``module`` in the ``nn.Sequential`` holding it
    (skipping other layout-keeping modules); ``None`` when there is none to look at."""
    for parent in model.modules():
        if not isinstance(parent, _nn.Sequential):
            continue
        children = list(parent)
        if not any(c is module for c in children):
            continue
        index = next(i for i, c in enumerate(children) if c is module)
        for before in reversed(children[:index]):
            if isinstance(before, _KEEPS_LAYOUT):
                continue
            while isinstance(before, _nn.Sequential) and len(before):
                before = before[-1]
            try:
                return module_layout(model, before)
            except ValueError:
                return None
        return None
    return None


def model_device(model: torch.nn.Module | None) -> torch.device | None:
    """Device of the model's first parameter or buffer, or ``None``."""
    if model is None:
        return None
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return None


@contextlib.contextmanager
def _freeze_what_runs() -> Iterator[None]:
    """Put every module that runs in this thread into eval mode (and its parameters out of
    autograd) just before it runs; restore all of them on exit."""
    thread = threading.get_ident()
    seen: dict[torch.nn.Module, bool] = {}
    params: dict[torch.nn.Parameter, bool] = {}

    def pre_hook(module: torch.nn.Module, _args: Any) -> None:
        if threading.get_ident() != thread or module in seen:
            return
        seen[module] = module.training
        module.training = False
        for p in module.parameters(recurse=False):
            if p not in params:
                params[p] = p.requires_grad
                p.requires_grad_(False)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        for m, training in seen.items():
            m.training = training
        for p, flag in params.items():
            p.requires_grad_(flag)
