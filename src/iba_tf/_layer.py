"""``IBALayer``: the Per-Sample Bottleneck as a Keras layer, and the helpers the fronts share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from iba_core import Bottleneck, Estimator, check_output_rows, explanation_maps

from ._backend import TFBackend, is_channels_last, to_channels_first, to_channels_last

BACKEND = TFBackend()


# -- data --------------------------------------------------------------------------------
def _inputs_of(element: Any) -> Any:
    """The model input of one data element: ``x`` or the first entry of ``(x, y, ...)``."""
    if isinstance(element, (tuple, list)):
        if not element:
            raise ValueError("the data yielded an empty tuple; expected x or (x, y)")
        return element[0]
    return element


def iter_batches(data: Any, batch_size: int = 32) -> Iterator[Any]:
    """Model-input batches from a NumPy array or tensor (sliced into ``batch_size``), a
    ``tf.data.Dataset`` or any iterable (a generator, a ``keras.utils.PyDataset``) of
    batches ``x`` or ``(x, y, ...)``."""
    if isinstance(data, (np.ndarray, tf.Tensor)):
        if data.ndim < 1 or data.shape[0] == 0:
            raise ValueError(f"expected a batch of inputs (N, ...), got shape {tuple(data.shape)}")
        n = int(data.shape[0])
        for start in range(0, n, int(batch_size)):
            yield data[start:start + int(batch_size)]
        return
    if isinstance(data, tf.data.Dataset):
        for element in data:
            yield _inputs_of(element)
        return
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not hasattr(data, "__iter__"):
        for i in range(len(data)):  # Keras PyDataset-like sequences
            yield _inputs_of(data[i])
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"cannot iterate over data of type {type(data).__name__}; give a NumPy "
                        "array, a tf.data.Dataset or a generator of batches")
    for element in data:
        yield _inputs_of(element)


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


# -- losses ------------------------------------------------------------------------------
def classification_loss(target: Any, n: int) -> Callable[[Any], Any]:
    """``logits -> mean target-class cross-entropy`` for batches of ``n`` repeated inputs.

    ``target`` is one class index or one per input.  The model's loss, not the
    bottleneck's math: TensorFlow's fused sparse cross-entropy, labels made once per
    batch size.
    """
    targets = np.asarray(BACKEND.to_numpy(target) if tf.is_tensor(target) else target)
    if targets.dtype.kind not in "iu" and not (targets.dtype.kind == "f"
                                              and np.all(targets == np.round(targets))):
        raise ValueError(f"target must hold class indices, got {targets!r}")
    targets = targets.astype(np.int64).reshape(-1)
    if targets.size == 1:
        targets = np.repeat(targets, n)
    if targets.size != n:
        raise ValueError(f"target must be one class index or one per input ({n}), got "
                         f"{targets.size}")
    labels: dict[int, tf.Tensor] = {}

    def loss(logits: Any) -> Any:
        if logits.shape.rank != 2:
            raise ValueError("a target needs a classifier returning logits (B, K), got shape "
                             f"{tuple(logits.shape)}; give a loss function instead")
        k = int(logits.shape[1])
        if targets.min() < 0 or targets.max() >= k:
            raise ValueError(f"target {targets.tolist()} out of range for {k} classes")
        rows = int(logits.shape[0])
        if rows not in labels:
            labels[rows] = tf.constant(np.repeat(targets, rows // n))
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels[rows], logits=logits))

    return loss


def soft_target_loss(probabilities: Any, n: int) -> Callable[[Any], Any]:
    """``logits -> cross-entropy to the class distribution (N, K) of each input``.

    Up to a constant (the distribution's entropy) this is the KL divergence from the
    model's clean output distribution: every class is kept, not one.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    labels: dict[tuple[int, Any], tf.Tensor] = {}

    def loss(logits: Any) -> Any:
        key = (int(logits.shape[0]), logits.dtype)
        if key not in labels:
            labels[key] = tf.constant(np.repeat(probs, key[0] // n, axis=0), dtype=logits.dtype)
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
            labels=labels[key], logits=logits))

    return loss


def model_loss(model: Any, loss: Callable[[Any], Any], n: int, copies: int) -> Callable[[Any], Any]:
    """``batch -> loss(model(batch))`` for ``n`` inputs, checking that every output of the
    model holds ``copies`` rows per input (so the bottleneck may make the noisy copies at
    its layer: see ``copies`` in :meth:`iba_core.Bottleneck.optimize`)."""

    def run(batch: Any) -> Any:
        outputs = BACKEND.call(model, batch)
        for out in tf.nest.flatten(outputs):
            if tf.is_tensor(out) and out.shape.rank:
                check_output_rows(int(out.shape[0]), n, copies)
        return loss(outputs)

    return run


# -- the explanation, shared by every front --------------------------------------------
def per_input_targets(target: Any, n: int) -> np.ndarray:
    """One class index per input from an int, a sequence, an array or a tensor."""
    targets = np.asarray(BACKEND.to_numpy(target) if tf.is_tensor(target) else target)
    if targets.size not in (1, n):
        raise ValueError(f"target must be one class index or one per input ({n}), got "
                         f"{targets.size}")
    return np.broadcast_to(targets.reshape(-1), (n,))


def explain(
    bottleneck: Bottleneck,
    loss_for: Callable[[int, int], Callable[[Any], Any]],
    x: tf.Tensor,
    *,
    model: Any,
    channels_last: bool,
    mode: str = "saliency",
    fit_hint: str = "estimate()",
    min_std: float | None = None,
    active_neurons_threshold: float | None = None,
    **optimize_kwargs: Any,
) -> np.ndarray:
    """Run :meth:`Bottleneck.explain` with ``model`` frozen and return NumPy maps.

    ``loss_for(start, stop)`` gives the model loss function for inputs ``x[start:stop]``
    (the inputs go through the model a few at a time on the CPU).

    ``mode="saliency"``: bits per input pixel, ``(H, W)`` for one input else
    ``(N, H, W)``; ``mode="capacity"``: the channel-summed capacity in bits at the
    feature map's resolution.
    """
    if mode not in ("saliency", "capacity"):
        raise ValueError(f"mode must be 'saliency' or 'capacity', got {mode!r}")
    if x.shape.rank is None or x.shape.rank < 2:
        raise ValueError(f"inputs must be a batch (N, ...), e.g. (1, H, W, C) for one image; got "
                         f"shape {tuple(x.shape)}: add a batch axis with x[None]")
    if not bottleneck.has_statistics():
        raise RuntimeError(f"the bottleneck has no feature statistics yet: call {fit_hint} on "
                           "some data before analyze() (or give feature_mean and feature_std)")
    overrides = {"min_std": min_std, "active_neurons_threshold": active_neurons_threshold}
    saved = {k: getattr(bottleneck, k) for k, v in overrides.items() if v is not None}
    try:
        for k in saved:
            setattr(bottleneck, k, float(overrides[k]))
        with BACKEND.frozen(model):
            cap = bottleneck.explain(loss_for, x, **optimize_kwargs)
    finally:
        for k, v in saved.items():
            setattr(bottleneck, k, v)
    out = BACKEND.to_numpy(explanation_maps(cap, tuple(x.shape), mode,
                                            channels_last=channels_last))
    return out[0] if out.shape[0] == 1 else out


def check_finite_input(x: tf.Tensor) -> None:
    if x.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(x))):
        raise ValueError("the inputs contain NaN or inf; IBA needs finite inputs")


# -- the layer -----------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="iba")
class IBALayer(keras.layers.Layer):
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

    Arguments and defaults are the reference library's (see :class:`iba_core.Bottleneck`).
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
        self._config = {
            "sigma": sigma, "beta": beta, "min_std": min_std,
            "optimization_steps": optimization_steps, "lr": lr, "batch_size": batch_size,
            "initial_alpha": initial_alpha, "active_neurons_threshold": active_neurons_threshold,
            "relu": relu, "progbar": progbar,
        }
        self.bottleneck = Bottleneck(
            **self._config,
            feature_mean=self._channels_first_stat(feature_mean),
            feature_std=self._channels_first_stat(feature_std),
            estimator=estimator,
        )
        self.bottleneck.backend = BACKEND
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
        channels_last = self.channels_last
        features = to_channels_first(inputs) if channels_last else inputs
        out = self.bottleneck(features)
        if out is None:
            return inputs
        return to_channels_last(out) if channels_last else out

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_output_spec(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask

    def get_config(self) -> dict[str, Any]:
        """Hyperparameters only; the estimate is saved with ``estimator.save(path)``."""
        return {**super().get_config(), **self._config, "data_format": self.data_format}

    # -- statistics ----------------------------------------------------------------------
    @property
    def estimator(self) -> Estimator:
        """The running estimate of the feature statistics (channels-first)."""
        return self.bottleneck.estimator

    def reset_estimate(self) -> None:
        """Forget the estimated (and given) feature mean and std."""
        self.bottleneck.reset_estimate()

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

        def run_batch(batch: Any) -> None:
            BACKEND.call(model, batch)

        with BACKEND.frozen(model):
            return self.bottleneck.estimate(run_batch, iter_batches(data, batch_size),
                                            n_samples=n_samples, progbar=progbar, reset=reset)

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
        beta: float | None = None,
        optimization_steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        min_std: float | None = None,
        active_neurons_threshold: float | None = None,
        seed: int | None = None,
        noise: str = "backend",
        progbar: bool | None = None,
        inputs_per_pass: int | None = None,
    ) -> np.ndarray:
        """Explain a batch of inputs ``x`` ``(N, H, W, C)``; returns NumPy maps in bits.

        Give ``model_loss_fn(batch) -> scalar`` (it runs the model on ``batch`` and
        returns the mean loss, e.g. the target-class cross-entropy; the batch holds each
        input ``batch_size`` times in a row), or ``model=`` and ``target=`` (one class
        index or one per input) for a classifier returning logits.  All ``N`` inputs are
        optimised together, one mask each.  Returns ``(H, W)`` for one input, else
        ``(N, H, W)`` (see ``mode`` in :func:`explain`).
        """
        x = as_input(x, model)
        check_finite_input(x)
        n = int(x.shape[0])
        if model_loss_fn is None:
            if target is None or model is None:
                raise ValueError("give model_loss_fn, or model= and target= for a classifier")
            targets = per_input_targets(target, n)
            copies = self.bottleneck.copies_per_input(batch_size)

            def loss_for(start: int, stop: int) -> Callable[[Any], Any]:
                return model_loss(model, classification_loss(targets[start:stop], stop - start),
                                  stop - start, copies)
            made_at = "layer"  # the output rows are checked: copies at the layer are safe
        elif target is not None:
            raise ValueError("give either model_loss_fn or target=, not both")
        else:
            def loss_for(start: int, stop: int) -> Callable[[Any], Any]:
                return model_loss_fn
            made_at = "input"  # the closure gets batch_size copies of each input, as before
        return explain(self.bottleneck, loss_for, x, model=model,
                       channels_last=self.channels_last, mode=mode,
                       fit_hint="estimate(model, data)", min_std=min_std,
                       active_neurons_threshold=active_neurons_threshold, beta=beta,
                       optimization_steps=optimization_steps, lr=lr, batch_size=batch_size,
                       seed=seed, noise=noise, progbar=progbar,
                       inputs_per_pass=inputs_per_pass, copies=made_at)

    def capacity(self) -> tf.Tensor:
        """Capacity of the last explanation, ``(N, C, ...)`` channels-first, nats per element."""
        return self.bottleneck.capacity()

    @contextlib.contextmanager
    def restrict_flow(self, alpha: Any = None) -> Iterator[IBALayer]:
        """Within the context, the layer adds noise with the mask of the last ``analyze``
        (or ``alpha``, channels-first ``(N, C, ...)`` logits): fresh noise on every call,
        also inside a ``tf.function`` traced within the context.

        Call the model directly (``model(x)``): ``model.predict`` reuses a function Keras
        traced before, which keeps whatever the layer did when it was traced.
        """
        with self.bottleneck.restricting(alpha):
            yield self
