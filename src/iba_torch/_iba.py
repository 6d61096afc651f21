"""``IBA``: the Per-Sample Bottleneck for PyTorch models."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from iba_core.engines import (
    PerSampleBottleneck,
    PerSampleFront,
    analysis_options,
    estimation_batches,
    refuse_multi_input,
    settings_of,
)
from iba_core.math import Estimator

from ._backend import TorchBackend, model_device, resolve_layer

_BACKEND = TorchBackend()


# ``nn.Module.compile`` (a method) comes first in the MRO and shadows the ``compile`` setting;
# the setting stays reachable through ``iba.config`` (``iba.config.replace(compile=True)``).
class IBA(torch.nn.Module, PerSampleFront):  # type: ignore[misc]
    """Per-Sample Information Bottleneck for a PyTorch model.

    Two ways to place it:

    * at an existing layer: ``IBA(model.conv4)`` or ``IBA(model, "features.conv4")``.
      A hook goes onto the layer only while ``estimate``, ``analyze`` or a context
      manager runs, and is always removed afterwards;
    * as a layer of your own model: ``IBA()`` inserted e.g. with
      ``nn.Sequential(conv4, iba)``; it is the identity unless a bottleneck is active.

    Arguments and defaults are those of the reference library (see
    :class:`iba_core.IBAConfig` for their meaning), and so are the attributes ``beta``,
    ``sigma``, ``optimization_steps``, ``lr``, ``batch_size``, ``min_std``,
    ``initial_alpha``, ``active_neurons_threshold``, ``relu`` and ``progbar``: they read
    and write the live settings, validated like the constructor.  ``sigma`` is the
    smoothing std in feature-map pixels; ``input_or_output="input"`` restricts the
    layer's input instead of its output; ``layout`` is the layer's feature layout,
    ``"channels_first"`` (``(N, C, ...)``) or ``"channels_last"`` (``(N, ..., C)``).  By
    default it is inferred where the module's type says it for sure (``nn.Conv1d`` and
    pooling: channels-first; ``nn.Embedding``, ``nn.Linear``, batch-first transformer
    layers and Hugging Face blocks: channels-last); otherwise images are read
    channels-first and sequences ``(N, A, B)`` are refused until ``layout`` is given.
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
        layout: str | None = None,
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
        self.input_or_output = input_or_output
        # A plain attribute in __dict__, so the model and layer are not submodules of IBA.
        self.__dict__["_engine"] = PerSampleBottleneck(
            _BACKEND,
            model,
            layer,
            layout=layout,
            on_input=input_or_output == "input",
            estimate_hint="estimate(model, dataloader)",
            feature_mean=feature_mean,
            feature_std=feature_std,
            estimator=estimator,
            **settings_of(locals()),
        )

    # -- placement -----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, unless a bottleneck is active (when IBA is a layer of the model)."""
        out = self._engine.hook(x)
        return x if out is None else out

    def detach(self) -> None:
        """Forget the layer; later calls raise until a new ``IBA`` is made."""
        self.__dict__["_detached"] = True

    def _check_attached(self) -> None:
        if self.__dict__.get("_detached"):
            raise RuntimeError("this IBA was detached from its layer; create a new IBA")

    # -- statistics ----------------------------------------------------------------
    def estimate(
        self,
        model: torch.nn.Module,
        dataloader: Iterable[Any],
        device: Any = None,
        n_samples: int = 10000,
        progbar: bool | None = None,
        reset: bool = True,
        distributed: bool | str | None = None,
        attention_mask: Any = None,
    ) -> Estimator:
        """Estimate the mean and std of the layer's features over ``dataloader``.

        ``dataloader`` yields tensors or ``(x, y, ...)`` tuples (or is one tensor of
        inputs ``(N, ...)``, read in batches of 32).  The model runs in eval mode without
        gradients, only up to the bottleneck layer; its flags are restored.

        Padded sequences: batches ``{"input_ids": ids, "attention_mask": mask}`` (as a
        Hugging Face tokenizer or collator makes them; ``"labels"`` are ignored), or one
        tensor of ids with ``attention_mask`` ``(N, T)`` (1 = real token, 0 = padding).
        The model is called with the ids alone, and each position's mean and std are
        taken over the sequences in which it is real (see
        :func:`iba_core.engines.estimation_batches`).

        ``distributed=True`` under ``torch.distributed`` (``torchrun``): every process
        calls this and all end with the exact estimate over all processes' batches
        (``"shared"``: each process reads the same batches, which are dealt out;
        ``"own"``: each reads its own shard; ``True`` tells them apart).
        """
        self._check_attached()
        device = torch.device(device) if device is not None else model_device(model)

        def on_device(x: Any) -> torch.Tensor:
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"the data loader must yield tensors or (x, y) tuples, got {type(x).__name__}"
                )
            return x.to(device) if device is not None else x

        batches = estimation_batches(
            dataloader, attention_mask=attention_mask, backend=self._engine.backend, convert=on_device
        )
        with self._engine.using(model), torch.no_grad():
            return self._engine.estimate(
                batches, n_samples=n_samples, progbar=progbar, reset=reset, distributed=distributed
            )

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
        attention_mask: Any = None,
        distributed: bool | None = None,
    ) -> np.ndarray:
        """Explain a batch of inputs; returns NumPy maps in bits.

        ``input_t`` is ``(N, C, H, W)`` (or ``(N, ...)`` for other models).  Either give
        ``model_loss_fn(batch) -> scalar`` (the mean loss over the batch, e.g. the
        target-class cross-entropy; the batch holds each input ``batch_size`` times in a
        row), or ``target=`` and a model (``model=``, or the one given to the
        constructor): class indices (one, or one per input), ``"predicted"`` or ``"all"``
        (see :meth:`iba_core.PerSampleBottleneck.analyze`).  All N inputs are optimised
        together, one mask each; on the CPU they go through the model ``inputs_per_pass``
        at a time (the result is the same).  ``seed``: input ``i`` draws its noise from the
        stream ``seed + i``.  The model is in eval mode for the whole call.

        ``mode="saliency"``: ``(H, W)`` for ``N == 1`` else ``(N, H, W)``, bits per
        pixel, totalling the capacity; ``mode="capacity"``: the channel-summed capacity
        in bits at feature-map resolution.

        Sequences (token ids ``(N, T)``, never cast to float, or embeddings): maps are
        ``(N, T)`` bits per token; ``attention_mask`` ``(N, T)`` (1 = real token, 0 =
        padding, as Hugging Face's) gives padded tokens no noise and exactly 0 bits.  The
        layer's layout is inferred for known modules (``nn.Conv1d``: ``(N, C, T)``;
        ``nn.Embedding``, ``nn.Linear``, batch-first transformer layers: ``(N, T, C)``)
        and must be given as ``layout=`` otherwise.

        ``distributed=True`` under ``torch.distributed``: every process calls this with
        the same inputs, each explains its share and all get every map, in input order.
        """
        self._check_attached()
        refuse_multi_input(input_t, "input_t")
        if not isinstance(input_t, torch.Tensor):
            raise TypeError(f"input_t must be a torch.Tensor, got {type(input_t).__name__}")
        with self._engine.using(model):
            return self._maps(
                input_t.detach(), target=target, loss=model_loss_fn, **analysis_options(locals())
            )

    @contextlib.contextmanager
    def restrict_flow(self, alpha: torch.Tensor | None = None) -> Iterator[IBA]:
        """Within the context, the layer's output passes the bottleneck (fresh noise per call).

        Uses the mask and settings of the last ``analyze`` unless ``alpha`` is given.  A
        layer the model runs more than once per forward pass is refused (the noise would be
        added several times).
        """
        self._check_attached()
        engine = self._engine
        with engine.restrict_flow(alpha):
            if engine.model is not None and engine.layer is not None:
                yield self  # the engine counts per pass of the model
                return
            # Only the layer is known, or IBA is itself a module of the model: a pass begins
            # when a module runs outside any other.
            with _passes_of_any_model(engine.bottleneck):
                yield self

    @contextlib.contextmanager
    def interrupt_execution(self) -> Iterator[IBA]:
        """Within the context, a forward pass stops right after the bottleneck layer.

        The stop is silent; the recorded features are in ``self.bottleneck.recorded``.
        """
        self._check_attached()
        bn = self._engine.bottleneck
        with self._engine.session(), bn.recording(interrupt=True), bn.interruptible():
            yield self

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"beta={cfg.beta}, sigma={cfg.sigma}, steps={cfg.optimization_steps}, "
            f"batch_size={cfg.batch_size}, estimated_samples={self.estimator.n}"
        )


@contextlib.contextmanager
def _passes_of_any_model(bottleneck: Any) -> Iterator[None]:
    """Within the context (and the bottleneck's ``restricting``), tell the bottleneck when
    a forward pass of whatever model runs in this thread begins: when a module starts
    while no other runs, or when that outermost module starts again."""
    thread = threading.get_ident()
    state: dict[str, Any] = {"depth": 0, "root": None}
    with bottleneck.counting_passes() as new_pass:

        def pre(module: torch.nn.Module, _args: Any) -> None:
            if threading.get_ident() != thread:
                return
            if state["depth"] == 0 or module is state["root"]:
                state["depth"], state["root"] = 0, module
                new_pass()
            state["depth"] += 1

        def post(module: torch.nn.Module, _args: Any, _out: Any) -> None:
            if threading.get_ident() == thread and state["depth"] > 0:
                state["depth"] -= 1

        hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(pre),
            torch.nn.modules.module.register_module_forward_hook(post, always_call=True),
        ]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
