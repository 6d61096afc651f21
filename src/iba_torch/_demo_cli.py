"""The PyTorch runner behind ``iba demo`` / ``iba explain`` / ``iba layers``.

Loads models (``package.module:factory`` or ``file.py:factory`` plus an optional state
dict), lists layers, and drives :class:`iba_torch.IBA` with NumPy arrays in and out.
User mistakes are raised as :class:`iba_core.cli.CliError` with a one-line message.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iba_core import Estimator, FewSamplesWarning
from iba_core.cli import CliError, CliFailure

from ._iba import IBA

__all__ = ["Runner"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def import_factory(spec: str) -> Any:
    """The object named by ``module:attr`` (``attr`` may be dotted; ``module`` may be a
    ``.py`` file).  The current folder is importable, as with ``python -m``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"model spec {spec!r} must look like 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name), spec)
        else:
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except ModuleNotFoundError as exc:
        raise CliError(f"model spec {spec!r}: cannot import {module_name!r} "
                       f"({_first_line(exc)})") from None
    except Exception as exc:
        raise CliError(f"model spec {spec!r}: importing {module_name!r} failed with "
                       f"{_first_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"model spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise CliError(f"model spec {spec!r}: no such file: {path}")
    mod_spec = importlib.util.spec_from_file_location(path.stem, path)
    if mod_spec is None or mod_spec.loader is None:
        raise CliError(f"model spec {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[path.stem] = module
    mod_spec.loader.exec_module(module)
    return module


def _load_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CliError(f"--weights: no such file: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path) as data:
                return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except OSError as exc:
            raise CliError(f"cannot read --weights {path}: {exc.strerror or exc}") from None
        except Exception as exc:
            raise CliError(f"--weights {path}: not a readable .npz ({_first_line(exc)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CliError(f"cannot read --weights {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise CliError(f"--weights {path}: not a PyTorch state_dict file readable with "
                       f"weights_only=True ({_first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict "
                       "(a dict of tensors, as written by torch.save(model.state_dict(), ...))")
    return state


def run_model(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` in eval mode without gradients; a failure becomes a :class:`CliError`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    except Exception as exc:
        raise CliError(f"the model failed on input of shape {tuple(x.shape)}: "
                       f"{_first_line(exc)} (check --size and --channels)") from None
    finally:
        model.train(was_training)


class Session:
    """A model with an :class:`IBA` at one layer, driven with NumPy arrays."""

    def __init__(self, model: torch.nn.Module, layer: str, sample: np.ndarray,
                 device: torch.device | None, **settings: Any) -> None:
        self.model, self.layer, self.device = model, layer, device
        modules = dict(model.named_modules())
        if not layer or layer not in modules:
            names = [n for n in modules if n]
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40
                                              else "")
            raise CliError(f"layer {layer!r} not found in the model; its layers are: {shown} "
                           "(see 'iba layers MODEL' for their output shapes)")
        self.iba = IBA(modules[layer], **settings)
        self.feature_shape = self._feature_shape(modules[layer], sample)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t.to(self.device) if self.device is not None else t

    def _feature_shape(self, module: torch.nn.Module, sample: np.ndarray) -> tuple[int, ...]:
        shapes: list[Any] = []

        def hook(_m: Any, _a: Any, out: Any) -> None:
            shapes.append(tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out))

        handle = module.register_forward_hook(hook)
        try:
            self._forward(sample)
        finally:
            handle.remove()
        if not shapes:
            raise CliError(f"layer {self.layer!r} is not used when the model runs; choose "
                           "another (see 'iba layers MODEL')")
        if not isinstance(shapes[0], tuple):
            raise CliError(f"layer {self.layer!r} returns a {shapes[0].__name__}, not a tensor; "
                           "choose a layer with a single tensor output")
        if len(shapes) > 1:
            raise CliError(f"layer {self.layer!r} runs {len(shapes)} times per forward pass; "
                           "choose a layer the model calls once")
        return shapes[0]

    def _forward(self, x: np.ndarray) -> Any:
        return run_model(self.model, self._tensor(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)`` as NumPy, in batches of 64."""
        outs = []
        for i in range(0, len(x), 64):
            out = self._forward(x[i:i + 64])
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise CliError(f"the model returns {shape}; iba explain needs a classifier "
                               "returning logits of shape (N, classes)")
            outs.append(out.detach().cpu().numpy())
        return np.concatenate(outs)

    def estimate(self, batches: Iterable[np.ndarray], n_samples: int, progbar: bool) -> Estimator:
        with warnings.catch_warnings():
            warnings.simplefilter("default", FewSamplesWarning)
            return self.iba.estimate(self.model, (self._tensor(b) for b in batches),
                                     n_samples=n_samples,
                                     progbar=progbar and sys.stderr.isatty())

    def set_estimator(self, estimator: Estimator) -> None:
        self.iba.bottleneck.estimator = estimator

    def estimator(self) -> Estimator:
        return self.iba.estimator

    def explain(self, x: np.ndarray, targets: np.ndarray, seed: int | None,
                noise: str = "backend") -> np.ndarray:
        """Saliency maps ``(N, H, W)`` in bits per pixel, all N inputs in one call."""
        try:
            maps = self.iba.analyze(self._tensor(x), target=np.asarray(targets),
                                    model=self.model, seed=seed, noise=noise)
        except FloatingPointError as exc:
            raise CliFailure(str(exc)) from None
        return maps[None] if maps.ndim == 2 else maps


class Runner:
    """PyTorch for the ``iba`` command (see :class:`iba_core.cli.Runner`)."""

    name = "torch"
    channels_last = False

    def __init__(self, device: str | None = None) -> None:
        self.device = None
        if device is not None:
            try:
                self.device = torch.device(device)
                torch.empty(0, device=self.device)
            except Exception as exc:
                raise CliError(f"--device {device!r} is not usable: {_first_line(exc)}") from None

    def demo_model(self) -> torch.nn.Module:
        from ._demo import demo_cnn

        # The demo network is tiny: one thread is as fast as several on an idle machine and
        # many times faster on a busy one, where OpenMP threads wait for each other.
        torch.set_num_threads(1)
        model = demo_cnn()
        return model.to(self.device) if self.device is not None else model

    def load_model(self, spec: str, weights: str | None, device: str | None) -> torch.nn.Module:
        factory = import_factory(spec)
        if not callable(factory):
            raise CliError(f"model spec {spec!r} names a {type(factory).__name__}, not a "
                           "callable returning the model")
        if isinstance(factory, torch.nn.Module):
            model = factory
        else:
            try:
                model = factory()
            except Exception as exc:
                raise CliError(f"model spec {spec!r}: calling the factory failed with "
                               f"{_first_line(exc)}") from None
        if not isinstance(model, torch.nn.Module):
            raise CliError(f"model spec {spec!r} returned a {type(model).__name__}, not a "
                           "torch.nn.Module")
        if weights is not None:
            state = _load_state_dict(Path(weights))
            try:
                model.load_state_dict(state)
            except Exception as exc:
                raise CliError(f"--weights {weights} does not fit the model: "
                               f"{_first_line(exc)}") from None
        if self.device is not None:
            model = model.to(self.device)
        return model.eval()

    def image_size(self, model: torch.nn.Module) -> tuple[int, int] | None:
        """PyTorch modules do not declare an input size."""
        return None

    def input_channels(self, model: torch.nn.Module) -> int | None:
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.LazyConv2d)) and m.in_channels:
                return int(m.in_channels)
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear, torch.nn.Conv3d)):
                return None
        return None

    def layer_table(self, model: torch.nn.Module, input_shape: tuple[int, ...]
                    ) -> list[tuple[str, str, str]]:
        named = [(n, m) for n, m in model.named_modules() if n]
        shapes: dict[str, str] = {}
        handles = []
        for name, module in named:
            def hook(_m: Any, _a: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor):
                    shape = str(tuple(out.shape[1:]))
                else:
                    shape = type(out).__name__
                shapes[name] = shape if name not in shapes else f"{shapes[name]} (called again)"
            handles.append(module.register_forward_hook(hook))
        x = torch.zeros((1, *input_shape), device=self.device)
        try:
            run_model(model, x)
        finally:
            for h in handles:
                h.remove()
        return [(n, type(m).__name__, shapes.get(n, "-")) for n, m in named]

    def session(self, model: torch.nn.Module, layer: str, sample: np.ndarray,
                **settings: Any) -> Session:
        return Session(model, layer, sample, self.device, **settings)
