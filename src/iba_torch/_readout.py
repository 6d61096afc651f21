"""``IBAReadout``: the Readout Bottleneck for PyTorch models."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from iba_core.engines import READOUT_BETA, READOUT_LR, ReadoutFront, TrainHistory, settings_of
from iba_core.math import Estimator

from ._backend import TorchBackend, model_device, resolve_layer

_BACKEND = TorchBackend()


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _resolve(model: torch.nn.Module, layer: Any, what: str) -> tuple[torch.nn.Module, str]:
    """The module and its dotted name; a clear error when it is not part of ``model``."""
    module = resolve_layer(model, layer)
    name = layer if isinstance(layer, str) else _module_name(model, module)
    if name is None or name == "":
        raise ValueError(
            f"the {what} {type(module).__name__} is not a submodule of the model; give one of "
            f"the model's layers (by object or name): {[n for n, _ in model.named_modules() if n]}"
        )
    return module, name


class IBAReadout(ReadoutFront):
    """Readout Bottleneck for a PyTorch model: attribution maps from one forward pass.

    A small network (three 1x1 convolutions) reads the features of ``readout_layers``
    and predicts the bottleneck's mask at ``attach_layer``; it is trained once on a data
    set (:meth:`train`) and then explains a batch with one forward pass (:meth:`analyze`)::

        readout = IBAReadout(model.layer2, [model.layer2, model.layer3, model.fc], model)
        readout.estimate(model, train_loader)             # statistics of every layer
        readout.train(model, train_loader, epochs=10)     # (x, y) batches, y: class index
        maps = readout.analyze(images)                    # (N, H, W) NumPy, bits per pixel

    Layers are modules or their dotted names in ``model``.  Hooks are put on the model
    only while a method runs; the model's weights, flags and outputs are left as they
    were.  Weights are plain NumPy arrays (:meth:`state_dict`, :meth:`save`): a readout
    trained here loads in ``iba_tf.IBAReadout`` for the same network, and vice versa.

    The bottleneck goes at ``attach_layer``; the readout network reads the features of
    ``readout_layers`` (vectors such as logits are broadcast over the bottleneck's
    positions); all are modules of ``model`` (objects or dotted names).  ``sigma``,
    ``min_std``, ``active_neurons_threshold`` and ``relu`` are as for
    :class:`iba_torch.IBA`; ``beta`` is the default weight of the mean capacity in the
    training loss, ``seed`` seeds the readout network's initial weights, and ``progbar``
    shows progress bars.
    """

    def __init__(
        self,
        attach_layer: torch.nn.Module | str,
        readout_layers: Sequence[torch.nn.Module | str],
        model: torch.nn.Module,
        sigma: float | None = 1.0,
        beta: float = READOUT_BETA,
        min_std: float = 0.01,
        active_neurons_threshold: float = 0.01,
        relu: bool = False,
        seed: int | None = 0,
        progbar: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(readout_layers, (str, torch.nn.Module)):
            readout_layers = [readout_layers]
        layer, layer_name = _resolve(model, attach_layer, "attach layer")
        resolved = [_resolve(model, r, "readout layer") for r in readout_layers]
        self._build(
            _BACKEND,
            model,
            layer,
            layer_name,
            [m for m, _ in resolved],
            [name for _, name in resolved],
            seed=seed,
            **settings_of(locals()),
        )
        self._detached = False

    def detach(self) -> None:
        """Forget the model; later calls raise until a new ``IBAReadout`` is made.

        No hook stays on the model between calls, so there is nothing to remove.
        """
        self._detached = True

    def _check(self, model: torch.nn.Module | None) -> torch.nn.Module:
        if self._detached:
            raise RuntimeError("this IBAReadout was detached; create a new one")
        if model is not None and model is not self._readout.model:
            raise ValueError(
                "the readout was created for another model; pass the same model "
                "(or none) to estimate()/train()"
            )
        return self._readout.model

    # -- data --------------------------------------------------------------------------
    @staticmethod
    def _inputs(batch: Any, device: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the data loader must yield tensors or (x, y) tuples, got {type(x).__name__}")
        return x.to(device) if device is not None else x

    def _train_batches(self, dataloader: Iterable[Any], device: Any) -> Iterable[tuple[Any, Any]]:
        outer = self

        class Batches:
            def __len__(self) -> int:
                return len(dataloader)  # type: ignore[arg-type]  # TypeError when it has no length

            def __iter__(self) -> Iterator[tuple[Any, Any]]:
                for batch in dataloader:
                    x = outer._inputs(batch, device)
                    y = None
                    if isinstance(batch, (tuple, list)) and len(batch) > 1:
                        y = batch[1]
                        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
                    yield x, y

        return Batches()

    # -- statistics and training -----------------------------------------------------
    def estimate(
        self,
        model: torch.nn.Module | None,
        dataloader: Iterable[Any],
        device: Any = None,
        n_samples: int = 10000,
        progbar: bool | None = None,
        reset: bool = True,
    ) -> list[Estimator]:
        """Estimate mean and std of the attach layer and of every readout layer.

        ``dataloader`` yields tensors or ``(x, y, ...)`` tuples; the model runs in eval
        mode without gradients (its flags are restored).  Returns the readout layers'
        estimators.
        """
        model = self._check(model)
        device = torch.device(device) if device is not None else model_device(model)
        batches = (self._inputs(b, device) for b in dataloader)
        with _BACKEND.frozen(model), torch.no_grad():
            return self._readout.estimate(batches, n_samples=n_samples, progbar=progbar, reset=reset)

    def train(
        self,
        model: torch.nn.Module | None,
        dataloader: Iterable[Any],
        epochs: int = 10,
        beta: float | None = None,
        lr: float = READOUT_LR,
        progbar: bool | None = None,
        device: Any = None,
        model_loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        seed: int | None = None,
        validation: float | Iterable[Any] | None = 0.1,
        schedule: str = "cosine",
        warn: bool = True,
        distributed: bool | str | None = None,
    ) -> TrainHistory:
        """Train the readout network (the model stays frozen); returns each epoch's mean
        training loss, a list whose ``history`` attribute holds one dict per epoch (also
        kept as :attr:`history`).

        ``dataloader`` yields ``(x, y)`` with ``y`` the class index of each sample (or
        ``x`` alone: each input's predicted class is used).  The loss per batch is the
        target-class cross-entropy of the bottlenecked model plus ``beta`` times the mean
        capacity, minimised with Adam.  ``model_loss_fn(output, y) -> scalar`` replaces the
        cross-entropy.  ``seed`` makes the noise reproducible.  The loader is iterated
        once per epoch.

        ``lr`` is the peak of a warm-up + cosine ``schedule`` (``"constant"``: none).  The
        default 1e-2 replaces the reference's constant 1e-5 (batches of 32, about 10
        epochs over ImageNet), which on a few thousand images leaves the masks almost
        where they started; the decay keeps 1e-2 stable on large data sets too.

        ``validation``: a held-out loader of ``(x, y)`` batches, or a fraction (default
        0.1: every 10th batch of ``dataloader`` is held out of training, none with fewer
        than 10 batches; with a shuffling loader these differ between epochs) or ``None``.
        The held-out loss and mean
        capacity are shown in the progress bar and recorded in the history.  A
        :class:`iba_core.engines.NotConvergedWarning` says when training has
        clearly not converged (``warn=False`` silences it).

        ``distributed=True`` under ``torch.distributed``: every process calls this and
        takes its share of every batch; the gradients are summed across processes, so
        each makes the update one process would make on the whole batch.
        """
        model = self._check(model)
        device = torch.device(device) if device is not None else model_device(model)
        beta = self.bottleneck.beta if beta is None else float(beta)
        if validation is not None and not isinstance(validation, (int, float)):
            validation = self._train_batches(validation, device)
        with _BACKEND.frozen(model):
            history = self._readout.train(
                self._train_batches(dataloader, device),
                epochs=epochs,
                beta=beta,
                lr=lr,
                model_loss=model_loss_fn,
                seed=seed,
                progbar=progbar,
                validation=validation,
                schedule=schedule,
                warn=warn,
                distributed=distributed,
            )
        return history

    def evaluate(
        self,
        model: torch.nn.Module | None,
        dataloader: Iterable[Any],
        beta: float | None = None,
        seed: int | None = 0,
        device: Any = None,
    ) -> float:
        """Mean training loss over ``dataloader`` without training (noise seeded by ``seed``)."""
        model = self._check(model)
        device = torch.device(device) if device is not None else model_device(model)
        beta = self.bottleneck.beta if beta is None else float(beta)
        with _BACKEND.frozen(model), torch.no_grad():
            return self._readout.evaluate(self._train_batches(dataloader, device), beta=beta, seed=seed)

    # -- explanation -------------------------------------------------------------------
    def analyze(self, input_t: torch.Tensor, mode: str = "saliency") -> np.ndarray:
        """Attribution maps for a batch from one forward pass; NumPy, in bits.

        ``mode="saliency"``: ``(H, W)`` for one input else ``(N, H, W)``, bits per pixel
        totalling the capacity (as :meth:`iba_torch.IBA.analyze`); ``mode="capacity"``:
        the channel-summed capacity in bits at feature-map resolution.
        """
        self._check(None)
        if not isinstance(input_t, torch.Tensor):
            raise TypeError(f"input_t must be a torch.Tensor, got {type(input_t).__name__}")
        return self._maps(input_t.detach(), mode, channels_last=False)
