"""What the PyTorch backend adds for the ``iba`` command (``iba demo|explain|layers``).

Models are named by ``package.module:factory`` or ``file.py:factory`` (a callable
returning a ``torch.nn.Module``), optionally with a state dict (``--weights`` ``.pt``,
``.pth`` or ``.npz``).  Every mistake is a one-line :class:`iba_core.UsageError`.
:class:`TorchCliMixin` is mixed into :class:`iba_torch.TorchBackend`; this module imports
nothing from the backend module, which imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from iba_core.apps.loading import first_line, model_from_factory
from iba_core.contract import InputSpec, UsageError

from . import _plugin

__all__ = ["TorchCliMixin"]

#: Suffixes of model files that are Keras' rather than a Python factory with a colon.


def _device(device: str | None) -> torch.device | None:
    """``--device`` as a usable ``torch.device`` (a tiny allocation proves it)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except Exception as exc:
        raise UsageError(f"--device {device!r} is not usable: {first_line(exc)}") from None
    return dev


def _load_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"--weights: no such file: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path) as data:
                return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except OSError as exc:
            raise UsageError(f"cannot read --weights {path}: {exc.strerror or exc}") from None
        except Exception as exc:
            raise UsageError(f"--weights {path}: not a readable .npz ({first_line(exc)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise UsageError(f"cannot read --weights {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise UsageError(
            f"--weights {path}: not a PyTorch state_dict file readable with "
            f"weights_only=True ({first_line(exc)})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(
            f"--weights {path}: holds a {type(state).__name__}, not a state_dict "
            "(a dict of tensors, as written by torch.save(model.state_dict(), ...))"
        )
    return state


def _model_device(model: torch.nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return None


class TorchCliMixin:
    """The optional command-line methods of :class:`iba_core.Backend`, for PyTorch."""

    def claims_model(self, spec: str) -> bool:
        """A ``module:factory`` spec (with a colon), unless it names a Keras file."""
        return _plugin.claims_model(spec)

    def load_model(self, spec: str, weights: str | None = None, device: str | None = None) -> torch.nn.Module:
        dev = _device(device)
        model = model_from_factory(spec, torch.nn.Module, "torch.nn.Module")
        if weights is not None:
            state = _load_state_dict(Path(weights))
            try:
                model.load_state_dict(state)
            except Exception as exc:
                raise UsageError(f"--weights {weights} does not fit the model: {first_line(exc)}") from None
        if dev is not None:
            model = model.to(dev)
        return model.eval()

    def demo_model(self, device: str | None = None) -> torch.nn.Module:
        from ._demo import demo_cnn

        return _demo_on(device, demo_cnn)

    def demo_text_model(self, device: str | None = None) -> torch.nn.Module:
        from ._text import text_model

        return _demo_on(device, text_model)

    def describe_input(self, model: Any) -> InputSpec:
        """Channels from the first 2-D convolution; PyTorch modules declare no size."""
        channels = None
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.LazyConv2d)) and m.in_channels:
                channels = int(m.in_channels)
                break
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear, torch.nn.Conv3d)):
                break
        return InputSpec(channels=channels, size=None, channels_last=False)

    def to_device(self, x: Any, model: Any) -> Any:
        device = _model_device(model) if isinstance(model, torch.nn.Module) else None
        return x if device is None or not isinstance(x, torch.Tensor) else x.to(device)


def _demo_on(device: str | None, make: Any) -> torch.nn.Module:
    """A demo network from ``make()`` on ``device``.  The demo networks are tiny: one thread
    is as fast as several on an idle machine and many times faster on a busy one, where
    OpenMP threads wait for each other."""
    dev = _device(device)
    torch.set_num_threads(1)
    model = make()
    return model.to(dev) if dev is not None else model
