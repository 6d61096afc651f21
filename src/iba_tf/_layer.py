"""``IBALayer``: the Per-Sample Bottleneck as a Keras layer, and the helpers the fronts share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from iba_core.engines import PerSampleBottleneck, PerSampleFront, input_batches, settings_of
from iba_core.math import Estimator

from ._backend import TFBackend, is_channels_last

BACKEND = TFBackend()


def as_input(x: Any, model: Any = None) -> tf.Tensor:
    """``x`` as a tensor; floating NumPy data takes the model's (single) input dtype."""
    if isinstance(x, (tf.Tensor, tf.Variable)):
        return tf.convert_to_tensor(x)
    arr = np.asarray(x)
    dtype = None
    try:
        inputs = model.inputs if model is not None else None
    except (AttributeError, ValueError):  # e.g. a Sequential model that is not built
        inputs = None
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
    by noise.  Example::

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
        sigma: float | None = 1.0, beta: float = 10.0, min_std: float = 0.01,
        optimization_steps: int = 10, lr: float = 1.0, batch_size: int = 10,
        initial_alpha: float = 5.0, active_neurons_threshold: float = 0.01,
        relu: bool = False,
        feature_mean: Any = None, feature_std: Any = None,
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
            BACKEND, None, None, estimate_hint="estimate(model, data)", layer_name=self.name,
            layout=layout, input_layout=layout,  # a model is built in one layout
            feature_mean=self._channels_first_stat(feature_mean),
            feature_std=self._channels_first_stat(feature_std), estimator=estimator,
            **settings_of(locals()),
        )
        self.supports_masking = True

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
        """Identity unless a bottleneck is active."""
        out = self._engine.hook(inputs)
        return inputs if out is None else out

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
    ) -> Estimator:
        """Estimate the mean and std of this layer's input over ``data``.

        ``model`` is the model that contains this layer; ``data`` is a NumPy array (cut
        into batches of ``batch_size``), a ``tf.data.Dataset`` or a generator of ``x`` or
        ``(x, y)`` batches.  The model runs in inference mode and only up to this layer.
        Stops after ``n_samples`` samples.
        """
        batches = (as_input(b, model) for b in input_batches(data, batch_size))
        with self._engine.using(model):
            return self._engine.estimate(batches, n_samples=n_samples, progbar=progbar,
                                         reset=reset)

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
            return self._maps(as_input(x, model), target=target, loss=model_loss_fn, mode=mode,
                              seed=seed, noise=noise, inputs_per_pass=inputs_per_pass,
                              **overrides)

    @contextlib.contextmanager
    def restrict_flow(self, alpha: Any = None) -> Any:
        """Within the context, the layer adds noise with the mask of the last ``analyze``
        (or ``alpha``, channels-first ``(N, C, ...)`` logits): fresh noise on every call,
        also inside a ``tf.function`` traced within the context.

        Call the model directly (``model(x)``): ``model.predict`` reuses a function Keras
        traced before, which keeps whatever the layer did when it was traced.
        """
        with self._engine.restrict_flow(alpha):
            yield self
