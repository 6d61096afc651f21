"""``IBALayer``: the Per-Sample Bottleneck as a Keras layer, and the helpers the fronts share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from iba_core.engines import (
    MULTI_INPUT,
    PerSampleBottleneck,
    PerSampleFront,
    analysis_options,
    estimation_batches,
    refuse_multi_input,
    settings_of,
)
from iba_core.math import Estimator, inject_folded

from ._backend import TFBackend, is_channels_last, to_channels_first, to_channels_last

BACKEND = TFBackend()


def _model_inputs(model: Any) -> Any:
    """``model.inputs``, or ``None`` when the model does not declare them."""
    try:
        return model.inputs if model is not None else None
    except (AttributeError, ValueError):  # e.g. a Sequential model that is not built
        return None


def as_input(x: Any, model: Any = None) -> tf.Tensor:
    """``x`` as a tensor; floating NumPy data takes the model's (single) input dtype.

    Several inputs (a list/tuple/dict of arrays, or a model with several inputs) are
    refused: multi-input models are not supported yet.
    """
    refuse_multi_input(x)
    n_inputs = len(_model_inputs(model) or ())
    if n_inputs > 1:
        raise ValueError(
            f"{MULTI_INPUT}; model {getattr(model, 'name', '?')!r} has {n_inputs} "
            "inputs. Wrap it in a model that takes one tensor (e.g. split one "
            "concatenated input inside the wrapper) and explain that"
        )
    if isinstance(x, (tf.Tensor, tf.Variable)):
        return tf.convert_to_tensor(x)
    arr = np.asarray(x)
    dtype = None
    inputs = _model_inputs(model)
    if arr.dtype.kind == "f" and inputs and len(inputs) == 1:
        dtype = tf.as_dtype(inputs[0].dtype)
    return tf.convert_to_tensor(arr, dtype=dtype)


# -- the layer -----------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="iba")
class IBALayer(keras.layers.Layer, PerSampleFront):
    """Per-Sample Information Bottleneck as a Keras layer you put into your own model.

    It is the identity (also while the model trains, and inside ``model.fit``/``predict``)
    unless a bottleneck is active: while :meth:`estimate` runs it records its input, while
    :meth:`analyze` runs or inside :meth:`restrict_flow` it replaces part of the signal
    by noise.  Inside :meth:`restrict_flow` *every* call is restricted, in inference and
    in training alike (``model(x)``, ``predict``, ``evaluate``, ``fit`` and a user's
    ``tf.function``): the restriction is held in ``tf.Variable``s that traced functions
    read when they run, so a function traced outside the block is restricted inside it,
    and one traced inside is clean again after it.  Example::

        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(32, 3, activation="relu")(inputs)
        iba = IBALayer(name="iba")
        x = iba(x)
        ...
        model = keras.Model(inputs, logits)
        iba.estimate(model, x_train)              # feature mean/std, ~10,000 samples
        smap = iba.analyze(x_test[:1], model=model, target=3)   # (H, W), bits per pixel

    Arguments and defaults are the reference library's (see :class:`iba_core.IBAConfig`);
    ``beta``, ``sigma``, ... are live attributes, validated like the constructor.
    ``data_format`` is the layout of the layer's input (default: Keras'
    ``image_data_format()``, i.e. channels-last); internally, and in :attr:`estimator`,
    :meth:`capacity` and ``alpha``, features are channels-first ``(N, C, ...)``.
    ``feature_mean``/``feature_std`` (or ``feature_mean_std=(mean, std)``) are given per
    sample in the layer's own layout, e.g. ``(h, w, C)``.  The layer has no weights and
    never casts its input (``autocast=False``).
    """

    def __init__(
        self,
        sigma: float | None = 1.0,
        beta: float = 10.0,
        min_std: float = 0.01,
        optimization_steps: int = 10,
        lr: float = 1.0,
        batch_size: int = 10,
        initial_alpha: float = 5.0,
        active_neurons_threshold: float = 0.01,
        relu: bool = False,
        feature_mean: Any = None,
        feature_std: Any = None,
        feature_mean_std: tuple[Any, Any] | None = None,
        estimator: Estimator | None = None,
        progbar: bool = False,
        data_format: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if data_format is not None:
            is_channels_last(None, data_format)  # validates
        self.data_format = data_format
        if feature_mean_std is not None:
            if feature_mean is not None or feature_std is not None:
                raise ValueError("give feature_mean_std or feature_mean/feature_std, not both")
            feature_mean, feature_std = feature_mean_std
        layout = "channels_last" if self.channels_last else "channels_first"
        self._engine = PerSampleBottleneck(
            BACKEND,
            None,
            None,
            estimate_hint="estimate(model, data)",
            layer_name=self.name,
            layout=layout,
            input_layout=layout,  # a model is built in one layout
            feature_mean=self._channels_first_stat(feature_mean),
            feature_std=self._channels_first_stat(feature_std),
            estimator=estimator,
            **settings_of(locals()),
        )
        self.supports_masking = True
        # Not a Keras weight (the layer has none): a plain object the tracker ignores.
        self.__dict__["_flow"] = _FlowState()
        self._engine.flow_restrictor = self._restricting
        # Explanations may run only the model after this layer (Backend.split_after).
        self._engine.split_layer = self

    @property
    def channels_last(self) -> bool:
        """Whether the layer's input is ``(N, ..., C)``."""
        return is_channels_last(None, self.data_format)

    def _channels_first_stat(self, a: Any) -> np.ndarray | None:
        if a is None:
            return None
        a = np.asarray(BACKEND.to_numpy(a) if tf.is_tensor(a) else a, dtype=np.float64)
        return np.moveaxis(a, -1, 0) if self.channels_last and a.ndim >= 2 else a

    # -- the Keras layer ---------------------------------------------------------------
    def call(self, inputs: Any) -> Any:
        """Identity unless a bottleneck is active.

        The engine's own passes (estimation, the optimisation) run eagerly or in the
        engine's compiled step and go through its Python hook; every other call reads the
        restriction flag, a ``tf.Variable``, when it runs (see :meth:`restrict_flow`).
        """
        if self._engine.bottleneck.busy:
            out = self._engine.hook(inputs)
            return inputs if out is None else out
        flow = self.__dict__["_flow"]
        # The mask terms are read outside the branch: constants of it, not variables whose
        # (unknown) shape a gradient through the branch would have to know.
        terms = tuple(tf.stop_gradient(v.read_value()) for v in flow.terms(inputs.shape.rank))
        return tf.cond(flow.on, lambda: self._restricted(inputs, flow, *terms), lambda: inputs)

    def _restricted(self, inputs: Any, flow: _FlowState, lam: Any, shift: Any, scale: Any) -> Any:
        """``inputs`` through the bottleneck with the mask terms held in ``flow`` and
        fresh noise drawn in the graph; computed in float32, returned in the input's
        dtype and shape."""
        x = tf.cast(inputs, tf.float32)
        channels_last = self.channels_last and inputs.shape.rank is not None and inputs.shape.rank >= 3
        if channels_last:
            x = to_channels_first(x)
        rows, n = tf.shape(lam)[0], tf.shape(x)[0]
        check = tf.debugging.Assert(
            tf.logical_or(tf.equal(rows, 1), tf.equal(rows, n)),
            [
                "restrict_flow(): the mask holds",
                rows,
                "inputs but the batch has",
                n,
                "; run the model on the explained inputs, or give one mask to broadcast",
            ],
        )
        with tf.control_dependencies([check]):
            eps = flow.generator.normal(tf.shape(x), dtype=tf.float32)
        z = inject_folded(x, lam, shift, scale, eps)  # the core's injection
        z = tf.where(flow.relu, tf.maximum(z, 0.0), z)  # relu: a flag read at run time
        if channels_last:
            z = to_channels_last(z)
        return tf.ensure_shape(tf.cast(z, inputs.dtype), inputs.shape)

    @contextlib.contextmanager
    def _restricting(self, alpha: Any = None) -> Iterator[None]:
        """Context: the restriction variables hold the mask terms of ``alpha`` (default:
        the last explanation's), with that explanation's settings; the flag is on."""
        bn = self._engine.bottleneck
        padding = bn.last_padding if alpha is None else None  # the last analysis' attention mask
        alpha = bn.alpha if alpha is None else alpha
        if alpha is None:
            raise RuntimeError(
                "no mask to restrict the flow with: call analyze() first (or "
                "give alpha, channels-first mask logits (N, C, ...))"
            )
        if len(getattr(self, "_inbound_nodes", ())) > 1:
            raise RuntimeError(
                f"the bottleneck layer {self.name!r} is called {len(self._inbound_nodes)} "
                "times in the model, so restrict_flow() would add noise several times per "
                "forward pass; use one IBALayer per place in the model"
            )
        config = bn.last_config or bn.config
        alpha = tf.cast(tf.convert_to_tensor(BACKEND.to_numpy(alpha)), tf.float32)
        if alpha.shape.rank < 2:
            raise ValueError(f"alpha must be mask logits (N, C, ...), got shape {tuple(alpha.shape)}")
        terms = list(bn.mask_terms(alpha, padding=padding))
        flow = self.__dict__["_flow"]
        if flow.rank is None:
            flow.terms(alpha.shape.rank)
        if alpha.shape.rank != flow.rank:
            raise ValueError(
                f"alpha has shape {tuple(alpha.shape)} but the layer's features "
                f"have rank {flow.rank}; give channels-first logits (N, C, ...)"
            )
        saved = flow.values()
        try:
            flow.assign(*terms, relu=config.relu, on=True)
            yield
        finally:
            flow.assign(*saved)

    @contextlib.contextmanager
    def restrict_flow(self, alpha: Any = None) -> Any:
        """Within the context, every call of the layer adds noise with the mask of the last
        ``analyze`` (or ``alpha``, channels-first ``(N, C, ...)`` logits) and the settings
        of that analysis: fresh noise on every call.

        The restriction is read at run time, so it holds for ``model(x)``,
        ``model.predict``, ``evaluate``, ``fit`` (training too: the layer is restricted
        inside the block whatever ``training`` is) and any ``tf.function``, whenever they
        were traced; after the block all of them are clean again.  The model is not
        frozen by the layer: ``fit`` inside the block trains it on restricted features.  A
        layer the model calls more than once is refused.
        """
        with self._engine.restrict_flow(alpha):
            yield self

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_output_spec(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask

    def get_config(self) -> dict[str, Any]:
        """Hyperparameters only; the estimate is saved with ``estimator.save(path)``."""
        settings = self.config.as_dict()
        settings.pop("compile")
        return {**super().get_config(), **settings, "data_format": self.data_format}

    # -- statistics ----------------------------------------------------------------------
    def estimate(
        self,
        model: keras.Model,
        data: Any,
        n_samples: int = 10000,
        batch_size: int = 32,
        progbar: bool | None = None,
        reset: bool = True,
        attention_mask: Any = None,
    ) -> Estimator:
        """Estimate the mean and std of this layer's input over ``data``.

        ``model`` is the model that contains this layer; ``data`` is a NumPy array (cut
        into batches of ``batch_size``), a ``tf.data.Dataset`` or a generator of ``x`` or
        ``(x, y)`` batches.  The model runs in inference mode and only up to this layer.
        Stops after ``n_samples`` samples.

        Padded sequences: an array of token ids with ``attention_mask`` ``(N, T)`` (1 =
        real token, 0 = padding), or batches ``{"input_ids": ids, "attention_mask": mask}``
        (alone or as the ``x`` of ``(x, y)``, as a Hugging Face tokenizer makes them).  The
        model is called with the ids alone, and each position's mean and std are taken
        over the sequences in which it is real (see
        :func:`iba_core.engines.estimation_batches`).
        """
        batches = estimation_batches(
            data,
            batch_size,
            attention_mask=attention_mask,
            backend=BACKEND,
            convert=lambda b: as_input(b, model),
        )
        with self._engine.using(model):
            return self._engine.estimate(batches, n_samples=n_samples, progbar=progbar, reset=reset)

    fit = estimate

    # -- explanation ----------------------------------------------------------------------
    def analyze(
        self,
        x: Any,
        model_loss_fn: Callable[[Any], Any] | None = None,
        *,
        model: keras.Model | None = None,
        target: Any = None,
        mode: str = "saliency",
        seed: int | None = None,
        noise: str = "backend",
        inputs_per_pass: int | None = None,
        **overrides: Any,
    ) -> np.ndarray:
        """Explain a batch of inputs ``x`` ``(N, H, W, C)``; returns NumPy maps in bits.

        Give ``model_loss_fn(batch) -> scalar`` (it runs the model on ``batch`` and
        returns the mean loss, e.g. the target-class cross-entropy; the batch holds each
        input ``batch_size`` times in a row), or ``model=`` and ``target=`` (class
        indices, ``"predicted"`` or ``"all"``) for a classifier returning logits.  All
        ``N`` inputs are optimised together, one mask each.  Returns ``(H, W)`` for one
        input, else ``(N, H, W)`` (``mode="capacity"``: feature-map resolution).
        ``**overrides``: ``beta``, ``optimization_steps``, ``lr``, ``batch_size``,
        ``min_std``, ``active_neurons_threshold``, ``progbar``, validated like the
        constructor's.
        """
        model = model if model is not None else self._engine.model
        with self._engine.using(model):
            return self._maps(
                as_input(x, model), target=target, loss=model_loss_fn, **analysis_options(locals())
            )


class _FlowState:
    """What a traced function reads to restrict an :class:`IBALayer`: the flag, the mask
    terms ``lambda * active``, ``(1 - lambda) * mean * active`` and ``(1 - lambda) * std *
    active`` (channels-first ``(N, C, ...)``, float32, any shape), the ReLU setting, and
    the noise generator."""

    def __init__(self) -> None:
        with tf.init_scope():  # eager variables even if the layer is made while tracing
            self.on = tf.Variable(False, trainable=False, name="iba_restrict")
            self.relu = tf.Variable(False, trainable=False, name="iba_relu")
            self.generator = tf.random.Generator.from_non_deterministic_state()
        self.rank: int | None = None

    def terms(self, rank: int | None) -> tuple[Any, Any, Any]:
        """The mask variables, made on first use with the features' rank (any sizes: the
        mask's batch and the feature map's size may change, the rank may not)."""
        if rank is None:
            raise ValueError("the IBALayer's input has an unknown rank")
        if self.rank is None:
            with tf.init_scope():
                self.lam, self.shift, self.scale = (
                    tf.Variable(
                        tf.zeros((1,) * rank),
                        trainable=False,
                        shape=tf.TensorShape([None] * rank),
                        name=f"iba_{n}",
                    )
                    for n in ("lambda", "shift", "scale")
                )
            self.rank = rank
        elif rank != self.rank:
            raise ValueError(
                f"the IBALayer saw inputs of rank {self.rank} before and now of "
                f"rank {rank}; use one IBALayer per place in a model"
            )
        return self.lam, self.shift, self.scale

    def values(self) -> tuple[Any, ...]:
        return (
            *(tf.identity(v) for v in self.terms(self.rank)),
            bool(self.relu.numpy()),
            bool(self.on.numpy()),
        )

    def assign(self, lam: Any, shift: Any, scale: Any, relu: bool, on: bool) -> None:
        self.terms(len(lam.shape))
        self.lam.assign(lam)
        self.shift.assign(shift)
        self.scale.assign(scale)
        self.relu.assign(bool(relu))
        self.on.assign(bool(on))
