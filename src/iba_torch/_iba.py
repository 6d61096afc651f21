"""``IBA``: the Per-Sample Bottleneck for PyTorch models."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from iba_core import Bottleneck, Estimator, check_output_rows, explanation_maps

from ._backend import TorchBackend, model_device, resolve_layer

_BACKEND = TorchBackend()


class IBA(torch.nn.Module):
    """Per-Sample Information Bottleneck for a PyTorch model.

    Two ways to place it:

    * at an existing layer: ``IBA(model.conv4)`` or ``IBA(model, "features.conv4")``.
      A hook goes onto the layer only while ``estimate``, ``analyze`` or a context
      manager runs, and is always removed afterwards;
    * as a layer of your own model: ``IBA()`` inserted e.g. with
      ``nn.Sequential(conv4, iba)``; it is the identity unless a bottleneck is active.

    Arguments and defaults are those of the reference library (see :class:`iba_core.Bottleneck`
    for their meaning); ``sigma`` is the smoothing std in feature-map pixels and
    ``input_or_output="input"`` restricts the layer's input instead of its output.
    """

    def __init__(
        self,
        layer: torch.nn.Module | None = None,
        sigma: float | None = 1.0,
        beta: float = 10,
        min_std: float = 0.01,
        optimization_steps: int = 10,
        lr: float = 1,
        batch_size: int = 10,
        initial_alpha: float = 5.0,
        active_neurons_threshold: float = 0.01,
        feature_mean: Any = None,
        feature_std: Any = None,
        estimator: Estimator | None = None,
        progbar: bool = False,
        input_or_output: str = "output",
        relu: bool = False,
    ) -> None:
        super().__init__()
        model = None
        if isinstance(layer, torch.nn.Module) and isinstance(sigma, str):
            model, layer, sigma = layer, resolve_layer(layer, sigma), 1.0
        if input_or_output not in ("input", "output"):
            raise ValueError(f"input_or_output must be 'input' or 'output', got {input_or_output!r}")
        if layer is not None and not isinstance(layer, torch.nn.Module):
            raise TypeError(
                "layer must be a torch.nn.Module (or give the model and the layer name: "
                f"IBA(model, 'name')), got {type(layer).__name__}"
            )
        # Plain attributes in __dict__, so neither is registered as a submodule of IBA.
        self.__dict__["_layer"] = layer
        self.__dict__["_model"] = model
        self.input_or_output = input_or_output
        self.bottleneck = Bottleneck(
            sigma=sigma, beta=beta, min_std=min_std, optimization_steps=optimization_steps,
            lr=lr, batch_size=batch_size, initial_alpha=initial_alpha,
            active_neurons_threshold=active_neurons_threshold, relu=relu,
            feature_mean=feature_mean, feature_std=feature_std, estimator=estimator,
            progbar=progbar,
        )
        self.bottleneck.backend = _BACKEND

    # -- placement -----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, unless a bottleneck is active (when IBA is a layer of the model)."""
        out = self.bottleneck(x)
        return x if out is None else out

    @contextlib.contextmanager
    def _hooked(self) -> Iterator[None]:
        if self._layer is None:  # IBA is itself a layer of the model
            yield
            return
        handle = _BACKEND.attach(None, self._layer, self.bottleneck,
                                 on_input=self.input_or_output == "input")
        try:
            yield
        finally:
            handle.remove()

    def detach(self) -> None:
        """Forget the layer; later calls raise until a new ``IBA`` is made."""
        self.__dict__["_layer"] = None
        self.__dict__["_detached"] = True

    def _check_attached(self) -> None:
        if self.__dict__.get("_detached"):
            raise RuntimeError("this IBA was detached from its layer; create a new IBA")

    # -- statistics ----------------------------------------------------------------
    @property
    def estimator(self) -> Estimator:
        """The running estimate of the feature statistics."""
        return self.bottleneck.estimator

    def reset_estimate(self) -> None:
        """Forget the estimated (and given) feature mean and std."""
        self.bottleneck.reset_estimate()

    def estimate(
        self,
        model: torch.nn.Module,
        dataloader: Iterable[Any],
        device: Any = None,
        n_samples: int = 10000,
        progbar: bool | None = None,
        reset: bool = True,
    ) -> Estimator:
        """Estimate the mean and std of the layer's features over ``dataloader``.

        ``dataloader`` yields tensors or ``(x, y, ...)`` tuples.  The model runs in eval
        mode without gradients, only up to the bottleneck layer; its flags are restored.
        """
        self._check_attached()
        device = torch.device(device) if device is not None else model_device(model)

        def run_batch(batch: Any) -> None:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"the data loader must yield tensors or (x, y) tuples, got "
                                f"{type(x).__name__}")
            model(x.to(device) if device is not None else x)

        with self._hooked(), _BACKEND.frozen(model), torch.no_grad():
            return self.bottleneck.estimate(run_batch, dataloader, n_samples=n_samples,
                                            progbar=progbar, reset=reset)

    # -- explanation ---------------------------------------------------------------
    def analyze(
        self,
        input_t: torch.Tensor,
        model_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mode: str = "saliency",
        beta: float | None = None,
        optimization_steps: int | None = None,
        min_std: float | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        active_neurons_threshold: float | None = None,
        *,
        target: Any = None,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        noise: str = "backend",
        progbar: bool | None = None,
        inputs_per_pass: int | None = None,
    ) -> np.ndarray:
        """Explain a batch of inputs; returns NumPy maps in bits.

        ``input_t`` is ``(N, C, H, W)`` (or ``(N, ...)`` for other models).  Either give
        ``model_loss_fn(batch) -> scalar`` (the mean loss over the batch, e.g. the
        target-class cross-entropy), or ``target=`` (an int or one per input) and
        ``model=`` for a classifier.  All N inputs are optimised together, one mask each;
        on the CPU they go through the model ``inputs_per_pass`` at a time (default: about
        32 samples per pass, which caches favour; the result is the same either way).
        ``seed``: input ``i`` draws its noise from the stream ``seed + i``.

        ``mode="saliency"``: ``(H, W)`` for ``N == 1`` else ``(N, H, W)``, bits per
        pixel, totalling the capacity; ``mode="capacity"``: the channel-summed capacity
        in bits at feature-map resolution.
        """
        self._check_attached()
        if mode not in ("saliency", "capacity"):
            raise ValueError(f"mode must be 'saliency' or 'capacity', got {mode!r}")
        if not isinstance(input_t, torch.Tensor):
            raise TypeError(f"input_t must be a torch.Tensor, got {type(input_t).__name__}")
        if input_t.ndim < 2:
            raise ValueError(
                f"input_t must be a batch (N, ...), e.g. (1, C, H, W) for one image; got shape "
                f"{tuple(input_t.shape)}: add a batch axis with input_t[None]"
            )
        model = model if model is not None else self._model
        n = int(input_t.shape[0])
        if model_loss_fn is None:
            if target is None or model is None:
                raise ValueError("give model_loss_fn, or target= and model= for a classifier")
            targets = _per_input_targets(target, n)
            copies_per_input = self.bottleneck.copies_per_input(batch_size)

            def loss_for(start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
                return _classification_loss(model, targets[start:stop], copies_per_input)
            # Our own loss checks the model's output rows: the noisy copies can be made at
            # the layer, so the layers before it run once per input (see Bottleneck.optimize).
            copies = "layer"
        elif target is not None:
            raise ValueError("give either model_loss_fn or target=, not both")
        else:
            def loss_for(start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
                return model_loss_fn
            copies = "input"  # the closure gets batch_size copies of each input, as before
        device = model_device(model)
        if device is not None and input_t.device != device:
            input_t = input_t.to(device)

        bn = self.bottleneck
        overrides = {"min_std": min_std, "active_neurons_threshold": active_neurons_threshold}
        saved = {k: getattr(bn, k) for k, v in overrides.items() if v is not None}
        try:
            for k in saved:
                setattr(bn, k, float(overrides[k]))
            with self._hooked(), _BACKEND.frozen(model):
                cap = bn.explain(loss_for, input_t.detach(), inputs_per_pass=inputs_per_pass,
                                 beta=beta, optimization_steps=optimization_steps, lr=lr,
                                 batch_size=batch_size, seed=seed, noise=noise, progbar=progbar,
                                 copies=copies)
        finally:
            for k, v in saved.items():
                setattr(bn, k, v)
        out = _BACKEND.to_numpy(explanation_maps(cap, tuple(input_t.shape), mode))
        return out[0] if out.shape[0] == 1 else out

    def capacity(self) -> torch.Tensor:
        """Capacity of the last explanation, ``(N, C, ...)``, nats per element."""
        return self.bottleneck.capacity()

    @contextlib.contextmanager
    def restrict_flow(self, alpha: torch.Tensor | None = None) -> Iterator[IBA]:
        """Within the context, the layer's output passes the bottleneck (fresh noise per call).

        Uses the mask of the last ``analyze`` unless ``alpha`` is given.
        """
        self._check_attached()
        with self._hooked(), self.bottleneck.restricting(alpha):
            yield self

    @contextlib.contextmanager
    def interrupt_execution(self) -> Iterator[IBA]:
        """Within the context, a forward pass stops right after the bottleneck layer.

        The stop is silent; the recorded features are in ``self.bottleneck.recorded``.
        """
        self._check_attached()
        with self._hooked(), self.bottleneck.recording(interrupt=True):
            with self.bottleneck.interruptible():
                yield self

    def extra_repr(self) -> str:
        bn = self.bottleneck
        return (f"beta={bn.beta}, sigma={bn.sigma}, steps={bn.optimization_steps}, "
                f"batch_size={bn.batch_size}, estimated_samples={bn.estimator.n}")


def _per_input_targets(target: Any, n: int) -> np.ndarray:
    """One class index per input from an int, a sequence or a tensor."""
    targets = np.asarray(target.detach().cpu() if isinstance(target, torch.Tensor) else target)
    if targets.size not in (1, n):
        raise ValueError(f"target must be one class index or one per input ({n}), got "
                         f"{targets.size}")
    return np.broadcast_to(targets.astype(np.int64).reshape(-1), (n,))


def _classification_loss(model: torch.nn.Module, targets: np.ndarray,
                         copies: int) -> Callable[[Any], Any]:
    """Mean target-class cross-entropy of ``model`` over ``copies`` noisy copies per input."""
    n = len(targets)
    labels: dict[torch.device, torch.Tensor] = {}  # made once per device, not every step

    def loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch)
        if logits.ndim != 2:
            raise ValueError(f"target= needs a classifier returning logits (B, K), got shape "
                             f"{tuple(logits.shape)}; pass a model_loss_fn instead")
        k = int(logits.shape[1])
        if targets.min() < 0 or targets.max() >= k:
            raise ValueError(f"target {targets.tolist()} out of range for {k} classes")
        check_output_rows(int(logits.shape[0]), n, copies)
        if logits.device not in labels:
            labels[logits.device] = torch.as_tensor(np.repeat(targets, copies),
                                                    device=logits.device)
        # The model's loss, not the bottleneck's math: PyTorch's fused cross-entropy.
        return torch.nn.functional.cross_entropy(logits, labels[logits.device])

    return loss
