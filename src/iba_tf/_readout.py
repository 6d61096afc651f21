"""``IBAReadout``: the Readout Bottleneck for Keras models."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from iba_core.engines import READOUT_BETA, READOUT_LR, ReadoutFront, input_batches, settings_of
from iba_core.math import Estimator

from ._backend import all_layers, is_channels_last, resolve_layer
from ._layer import BACKEND, as_input


def _resolve(model: keras.Model, layer: Any, what: str) -> keras.layers.Layer:
    """The layer object; a clear error when it is not part of ``model``."""
    found = resolve_layer(model, layer)
    layers = all_layers(model)
    if not any(found is candidate for candidate in layers):
        raise ValueError(
            f"the {what} {found.name!r} is not a layer of model {model.name!r}; "
            f"its layers are: {[candidate.name for candidate in layers]}"
        )
    return found


def compile_loss(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``tf.function`` for the readout's training loss (the second pass and its gradient).

    AutoGraph is off: the loss has no data-dependent Python control flow, and converting
    the model's call tree took several times longer than tracing it (9.5 s against 2 s
    for a small CNN).  Each batch shape is traced once (a smaller last batch adds one
    trace): ``reduce_retracing`` would trace with an unknown batch size, which the
    bottleneck's shape arithmetic does not accept.
    """
    return tf.function(fn, autograph=False)


def _targets(y: Any) -> np.ndarray:
    """Class indices from labels: indices ``(B,)``, or one-hot / probabilities ``(B, K)``."""
    y = np.asarray(BACKEND.to_numpy(y) if tf.is_tensor(y) else y)
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1)
    return y.reshape(-1)


class _Data:
    """``(x, y)`` batches for the core, iterated afresh for every epoch."""

    def __init__(
        self, x: Any, y: Any, batch_size: int, shuffle: bool, seed: int | None, model: keras.Model
    ) -> None:
        self.model = model
        self.batch_size = int(batch_size)
        self.rng = np.random.default_rng(seed) if shuffle else None
        self.arrays = isinstance(x, (np.ndarray, tf.Tensor))
        if self.arrays:
            self.x = as_input(x, model)
            if self.x.shape.rank is None or self.x.shape.rank < 2 or self.x.shape[0] == 0:
                raise ValueError(f"x must be a batch of inputs (N, ...), got shape {tuple(self.x.shape)}")
            self.y = None if y is None else _targets(y)
            if self.y is not None and self.y.shape[0] != self.x.shape[0]:
                raise ValueError(f"x holds {self.x.shape[0]} inputs but y {self.y.shape[0]} labels")
        else:
            if y is not None:
                raise ValueError(
                    "give y only with array inputs; a dataset or generator yields (x, y) batches"
                )
            self.x, self.y = x, None

    def __len__(self) -> int:
        if self.arrays:
            return -(-int(self.x.shape[0]) // self.batch_size)
        return len(self.x)  # TypeError when the data has no length

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self.arrays:
            n = int(self.x.shape[0])
            order = self.rng.permutation(n) if self.rng is not None else np.arange(n)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                xb = (
                    tf.gather(self.x, idx)
                    if self.rng is not None
                    else self.x[start : start + self.batch_size]
                )
                yield xb, None if self.y is None else self.y[idx]
            return
        data = self.x
        if isinstance(data, tf.data.Dataset) or hasattr(data, "__iter__"):
            elements = iter(data)
        else:  # Keras PyDataset-like sequences
            elements = (data[i] for i in range(len(data)))
        for element in elements:
            if isinstance(element, (tuple, list)):
                xb = as_input(element[0], self.model)
                yb = _targets(element[1]) if len(element) > 1 else None
            else:
                xb, yb = as_input(element, self.model), None
            yield xb, yb


class IBAReadout(ReadoutFront):
    """Readout Bottleneck for a Keras model: attribution maps from one forward pass.

    A small network (three 1x1 convolutions) reads the outputs of ``readout_layers`` and
    predicts the bottleneck's mask at ``attach_layer``; train it once with :meth:`fit`,
    then :meth:`analyze` explains a batch with one forward pass::

        readout = IBAReadout("block3_conv3", ["block3_conv3", "block4_conv3", "logits"], model)
        readout.estimate(x_train)                         # statistics of every layer
        readout.fit(x_train, y_train, epochs=10)          # y: class indices or one-hot
        maps = readout.analyze(x_test[:8])                # (8, H, W) NumPy, bits per pixel

    Layers are given by name or as layer objects of ``model`` (Functional, Sequential or
    subclassed).  The layers' ``call`` is wrapped only while a method runs; the model is
    left as it was.  Feature maps are channels-first inside (``estimator``, ``capacity``).
    Weights are plain NumPy arrays (:meth:`state_dict`, :meth:`save`): a readout trained
    here loads in ``iba_torch.IBAReadout`` for the same network, and vice versa.

    Args:
        attach_layer: where the bottleneck goes.
        readout_layers: layers the readout network reads (vectors such as logits are
            broadcast over the bottleneck's positions).
        model: the model that contains these layers; it must return logits ``(B, K)``
            unless :meth:`fit` gets a ``loss_fn``.
        sigma, min_std, active_neurons_threshold, relu: as for :class:`iba_tf.IBALayer`.
        beta: default weight of the mean capacity in the training loss.
        seed: seed of the readout network's initial weights.
        progbar: show progress bars.
    """

    def __init__(
        self,
        attach_layer: keras.layers.Layer | str,
        readout_layers: Sequence[keras.layers.Layer | str],
        model: keras.Model,
        sigma: float | None = 1.0,
        beta: float = READOUT_BETA,
        min_std: float = 0.01,
        active_neurons_threshold: float = 0.01,
        relu: bool = False,
        seed: int | None = 0,
        progbar: bool = False,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
        if isinstance(readout_layers, (str, keras.layers.Layer)):
            readout_layers = [readout_layers]
        layer = _resolve(model, attach_layer, "attach layer")
        layers = [_resolve(model, r, "readout layer") for r in readout_layers]
        self._channels_last = is_channels_last(layer)
        self._build(
            BACKEND,
            model,
            layer,
            layer.name,
            layers,
            [r.name for r in layers],
            seed=seed,
            **settings_of(locals()),
        )

    # -- statistics and training -----------------------------------------------------
    def estimate(
        self,
        data: Any,
        n_samples: int = 10000,
        batch_size: int = 32,
        progbar: bool | None = None,
        reset: bool = True,
    ) -> list[Estimator]:
        """Estimate mean and std of the attach layer and of every readout layer.

        ``data``: a NumPy array (cut into ``batch_size`` batches), a ``tf.data.Dataset``
        or a generator of ``x`` / ``(x, y)`` batches.  Returns the readout layers'
        estimators.
        """
        model = self.model
        batches = (as_input(b, model) for b in input_batches(data, batch_size))
        with BACKEND.frozen(model):
            return self._readout.estimate(batches, n_samples=n_samples, progbar=progbar, reset=reset)

    def fit(
        self,
        x: Any,
        y: Any = None,
        batch_size: int = 32,
        epochs: int = 10,
        beta: float | None = None,
        lr: float = READOUT_LR,
        verbose: int | bool = 0,
        shuffle: bool = True,
        seed: int | None = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        compile: bool = True,
        validation: Any = 0.1,
        schedule: str = "cosine",
        warn: bool = True,
    ) -> dict[str, list[float]]:
        """Train the readout network (the model stays frozen); returns ``{"loss": [...]}``,
        the mean training loss of each epoch, with ``"val_loss"`` and ``"val_capacity"``
        (held-out loss and mean capacity, nats per element) when data is held out.
        :attr:`history` keeps the full per-epoch records.

        ``x``/``y``: inputs and labels (class indices or one-hot) as arrays, cut into
        batches of ``batch_size`` and shuffled every epoch; or ``x`` alone, a
        ``tf.data.Dataset`` (or re-iterable sequence) of ``(x, y)`` or ``x`` batches.
        Without labels each input's predicted class is used.  The loss per batch is the
        target-class cross-entropy of the bottlenecked model plus ``beta`` times the mean
        capacity, minimised with Adam.  ``loss_fn(outputs, y) -> scalar`` replaces the
        cross-entropy; ``seed`` fixes the shuffling and the noise.

        ``lr`` is the peak of a warm-up + cosine ``schedule`` (``"constant"``: none).  The
        default 1e-2 replaces the reference's constant 1e-5 (batches of 32, about 10
        epochs over ImageNet), which on a few thousand images leaves the masks almost
        where they started; the decay keeps 1e-2 stable on large data sets too.

        ``validation``: a fraction (default 0.1: the last 10% of array inputs, taken
        before shuffling, as Keras' ``validation_split``; every 10th batch of a dataset),
        held-out data (``(x_val, y_val)`` arrays or a dataset of batches), or ``None``.
        A :class:`iba_core.engines.NotConvergedWarning` says when training has
        clearly not converged (``warn=False`` silences it).

        ``compile``: run the bottlenecked pass and its gradient as a ``tf.function``
        (traced once per call, in about as long as ten eager steps; each step is then
        several times faster).  Turn it off for models whose ``call`` has data-dependent
        Python control flow.
        """
        model = self.model
        beta = self.bottleneck.beta if beta is None else float(beta)
        data = _Data(x, y, batch_size, shuffle, seed, model)
        held_out: Any = None
        if isinstance(validation, (int, float)) and not isinstance(validation, bool):
            if not 0 < validation < 1:
                raise ValueError(
                    f"validation must be a fraction in (0, 1), held-out data or None, got {validation!r}"
                )
            held_out = validation
            n = int(data.x.shape[0]) if data.arrays else 0
            n_val = round(n * validation)
            if data.arrays and 1 <= n_val < n:
                keep = n - n_val
                held_out = _Data(
                    data.x[keep:], None if data.y is None else data.y[keep:], batch_size, False, None, model
                )
                data.x = data.x[:keep]
                data.y = None if data.y is None else data.y[:keep]
            elif data.arrays:
                held_out = None  # too few inputs to hold any out
        elif isinstance(validation, tuple) and len(validation) == 2:
            held_out = _Data(validation[0], validation[1], batch_size, False, None, model)
        elif validation is not None:
            held_out = _Data(validation, None, batch_size, False, None, model)
        with BACKEND.frozen(model):
            history = self._readout.train(
                data,
                epochs=epochs,
                beta=beta,
                lr=lr,
                model_loss=loss_fn,
                seed=seed,
                progbar=bool(verbose),
                compile=compile_loss if compile else False,
                validation=held_out,
                schedule=schedule,
                warn=warn,
            )
        out = {"loss": list(history)}
        for key in ("val_loss", "val_capacity"):
            if all(key in r for r in history.history):
                out[key] = [r[key] for r in history.history]
        return out

    def evaluate(
        self, x: Any, y: Any = None, batch_size: int = 32, beta: float | None = None, seed: int | None = 0
    ) -> float:
        """Mean training loss over the data, without training (noise seeded by ``seed``)."""
        model = self.model
        beta = self.bottleneck.beta if beta is None else float(beta)
        data = _Data(x, y, batch_size, False, None, model)
        with BACKEND.frozen(model):
            return self._readout.evaluate(data, beta=beta, seed=seed)

    # -- explanation -------------------------------------------------------------------
    def analyze(self, x: Any, mode: str = "saliency") -> np.ndarray:
        """Attribution maps for a batch ``x`` ``(N, H, W, C)`` from one forward pass.

        ``mode="saliency"``: ``(H, W)`` for one input, else ``(N, H, W)``, bits per pixel
        totalling the capacity; ``mode="capacity"``: the channel-summed capacity in bits at
        the feature map's resolution.  NumPy.
        """
        return self._maps(as_input(x, self.model), mode, channels_last=self._channels_last)
