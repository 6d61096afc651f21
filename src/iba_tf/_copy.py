"""``IBACopy`` and ``IBACopyInnvestigate``: a bottleneck in a copy of an existing Keras model."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from iba_core.engines import PerSampleFront, input_batches
from iba_core.math import (
    Estimator,
    SavedStateError,
    check_format,
    file_name,
    read_npz,
    save_target,
)

from ._layer import BACKEND, IBALayer, as_input

try:  # the class of models built with the functional API (keras.Model(inputs, outputs))
    from keras.src.models.functional import Functional
except ImportError:  # pragma: no cover - Keras 3 has it; keep a readable error otherwise
    Functional = None


# -- model surgery -------------------------------------------------------------------------
def _kind(model: Any) -> str:
    """``"sequential"``, ``"functional"``, or raise for anything Keras cannot copy."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if isinstance(model, keras.Sequential):
        return "sequential"
    if Functional is not None and isinstance(model, Functional):
        return "functional"
    raise TypeError(
        f"{type(model).__name__} is a subclassed Keras model: its layer graph is Python code "
        "that cannot be copied. Put an iba_tf.IBALayer into the model's call() instead "
        "(or attach a hook with iba_tf.TFBackend().attach(model, layer_name, hook))."
    )


def _sequential_input(model: keras.Sequential) -> Any:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"the Sequential model {model.name!r} has no known input shape; build it first "
            "(start it with keras.Input(shape), call model.build(input_shape) or call it on "
            "a batch)"
        )
    spec = inputs[0]
    return keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=spec.name)


def _top_level_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    if not isinstance(name, str):
        raise TypeError(f"layer_name must be a layer name (str), got {type(name).__name__}")
    for layer in model.layers:
        if layer.name == name:
            return layer
    names = [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    raise LookupError(f"layer {name!r} not found in model {model.name!r}; its layers are: {names}")


def _insert_after(
    model: keras.Model, target: keras.layers.Layer, inserted: keras.layers.Layer
) -> keras.Model:
    """A new Functional model running ``model``'s own layers with ``inserted`` applied to
    the output of ``target``.  The layer objects (hence the weights) are shared."""
    kind = _kind(model)
    if kind == "sequential":
        inputs = x = _sequential_input(model)
        for layer in model.layers:
            x = layer(x)
            if layer is target:
                x = inserted(x)
        return keras.Model(inputs, x, name=f"{model.name}_iba")

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        out = layer(*args, **kwargs)
        return inserted(out) if layer is target else out

    copy = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call_function)
    if inserted not in copy.layers:
        raise ValueError(
            f"layer {target.name!r} is not on the path from the model's inputs to "
            "its outputs; choose a layer the model runs"
        )
    return keras.Model(copy.input, copy.output, name=f"{model.name}_iba")


def _is_softmax(fn: Any) -> bool:
    return fn is keras.activations.softmax or getattr(fn, "__name__", None) == "softmax"


def _output_node(model: keras.Model) -> tuple[keras.layers.Layer, Any]:
    """The layer that produces the model's single output, and that output's input tensor."""
    kind = _kind(model)
    if len(model.outputs) != 1:
        raise ValueError(f"expected a model with one output, got {len(model.outputs)}")
    if kind == "sequential":
        return model.layers[-1], None
    operation, node_index, _ = model.outputs[0]._keras_history
    node = operation._inbound_nodes[node_index]
    return operation, node.input_tensors[0]


def ends_in_softmax(model: keras.Model) -> bool:
    """Whether the model's output layer is a softmax (a ``Softmax`` layer, or any layer
    with ``activation="softmax"``)."""
    layer, _ = _output_node(model)
    return isinstance(layer, keras.layers.Softmax) or _is_softmax(getattr(layer, "activation", None))


def model_wo_softmax(model: keras.Model) -> keras.Model:
    """``model`` without its final softmax: a model returning logits.

    A final ``Softmax``/``Activation("softmax")`` layer is dropped; a final layer with
    ``activation="softmax"`` (e.g. ``Dense``) is replaced by a copy with a linear
    activation and equal weights (copied).  Every other layer is shared with ``model``,
    which stays unchanged.  A model not ending in softmax is returned as it is.
    """
    if not ends_in_softmax(model):
        return model
    last, last_input = _output_node(model)
    if _kind(model) == "sequential":
        inputs = x = _sequential_input(model)
        for layer in model.layers[:-1]:
            x = layer(x)
        last_input = x
    else:
        inputs = model.input
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        outputs = last_input
    else:
        config = {**last.get_config(), "activation": "linear", "name": f"{last.name}_logits"}
        linear = type(last).from_config(config)
        outputs = linear(last_input)
        linear.set_weights(last.get_weights())
    return keras.Model(inputs, outputs, name=f"{model.name}_wo_softmax")


# -- IBACopy -------------------------------------------------------------------------------
class IBACopy(PerSampleFront):
    """Per-Sample Bottleneck in a copy of a Functional or Sequential Keras model.

    ``IBACopy(model, "conv3")`` builds a new Functional model (:attr:`model`) that runs
    the original model's own layer objects with an :class:`IBALayer` inserted after the
    layer named ``layer_name``.  The copy **shares the weights** of the original (no
    memory is duplicated, and later training of the original is seen by the copy); the
    original model's graph, weights, trainable flags and outputs are left untouched.
    Subclassed models cannot be copied: put an :class:`IBALayer` into them instead.

    Works for any task: :meth:`analyze` takes a loss function of the model's output.
    Keyword arguments are the :class:`IBALayer`'s (``beta``, ``sigma``, ``batch_size``...),
    and so are the live attributes (``iba.beta = 1``).
    """

    def __init__(self, model: keras.Model, layer_name: str, **iba_kwargs: Any) -> None:
        _kind(model)
        self.layer_name = layer_name
        self._original = model
        self._layer = _top_level_layer(model, layer_name)
        iba_kwargs.setdefault("data_format", getattr(self._layer, "data_format", None))
        taken = {layer.name for layer in model.layers}
        name = next(
            f"iba_{i}" if i else "iba" for i in itertools.count() if (f"iba_{i}" if i else "iba") not in taken
        )
        iba_kwargs.setdefault("name", name)
        #: The :class:`IBALayer` inside the copy.
        self.iba_layer = IBALayer(**iba_kwargs)
        #: The copy of the model, with :attr:`iba_layer` after the chosen layer.
        self.model = _insert_after(model, self._layer, self.iba_layer)
        self._engine = self.iba_layer.engine
        self._engine.model = self.model
        self._engine.layer_name = layer_name
        self._engine.estimate_hint = "estimate(data)"

    # -- statistics ----------------------------------------------------------------------
    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Channels-first per-sample shape of the features at the bottleneck."""
        shape = tuple(self.iba_layer.output.shape[1:])
        if self.iba_layer.channels_last and len(shape) >= 2:
            shape = (shape[-1], *shape[:-1])
        return shape

    def estimate(
        self,
        data: Any,
        n_samples: int = 10000,
        batch_size: int = 32,
        progbar: bool | None = None,
        reset: bool = True,
        attention_mask: Any = None,
    ) -> Estimator:
        """Estimate the mean and std of the features over ``data`` (a NumPy array, a
        ``tf.data.Dataset`` or a generator of ``x`` / ``(x, y)`` batches); padded sequences
        with ``attention_mask`` or mapping batches, see :meth:`IBALayer.estimate`."""
        return self.iba_layer.estimate(
            self.model,
            data,
            n_samples=n_samples,
            batch_size=batch_size,
            progbar=progbar,
            reset=reset,
            attention_mask=attention_mask,
        )

    # -- explanation -----------------------------------------------------------------------
    def analyze(
        self,
        x: Any,
        loss_fn: Callable[[Any], Any] | None = None,
        *,
        target: Any = None,
        mode: str = "saliency",
        **kwargs: Any,
    ) -> np.ndarray:
        """Explain a batch of inputs ``x`` ``(N, H, W, C)``; returns NumPy maps in bits.

        ``loss_fn(outputs) -> scalar`` gets the copy's outputs for ``batch_size`` noisy
        copies of each input, in a row, and returns the mean loss over them; or give
        ``target=`` (class indices, ``"predicted"`` or ``"all"``) for a model returning
        logits.  Returns ``(H, W)`` for one input, else ``(N, H, W)``.  Further keyword
        arguments (``beta``, ``optimization_steps``, ``lr``, ``batch_size``, ``min_std``,
        ``active_neurons_threshold``, ``seed``, ``noise``, ``progbar``,
        ``inputs_per_pass``) as in :meth:`IBALayer.analyze`.

        ``target=`` is refused (``ValueError``) for a model ending in a softmax: the
        cross-entropy would treat probabilities as logits.  Copy
        :func:`model_wo_softmax` of it instead, or pass a ``loss_fn`` of the outputs.
        """
        if target is not None and self._ends_in_softmax():
            raise ValueError(
                f"model {self._original.name!r} ends in a softmax, so target= would explain "
                "its probabilities as if they were logits. Build the copy from "
                "model_wo_softmax(model) (iba_tf.model_wo_softmax strips the softmax), or pass "
                "a loss_fn of the outputs instead of target=."
            )
        return self._maps(as_input(x, self.model), target=target, output_loss=loss_fn, mode=mode, **kwargs)

    def _ends_in_softmax(self) -> bool:
        try:
            return ends_in_softmax(self._original)
        except ValueError:  # several outputs: target= fails later with its own message
            return False

    def predict(self, x: Any, batch_size: int = 32) -> np.ndarray:
        """The copy's output on ``x`` without the bottleneck (equal to the original's)."""
        outs = [
            BACKEND.to_numpy(BACKEND.call(self.model, b))
            for b in input_batches(as_input(x, self.model), batch_size)
        ]
        return np.concatenate(outs)


# -- IBACopyInnvestigate -------------------------------------------------------------------
_MODES = ("max_activation", "index", "all")
#: Format mark of :meth:`IBACopyInnvestigate.save_npz` files (version 1 had none).
_COPY_FORMAT = "iba.copy_innvestigate/2"


class IBACopyInnvestigate(IBACopy):
    """Classifier wrapper with the `innvestigate <https://github.com/albermax/innvestigate>`_
    analyzer API: ``fit``, ``fit_generator``, ``analyze(X, neuron_selection)``.

    Args:
        model: a Functional or Sequential classifier returning **logits**; a model ending
            in softmax is refused (strip it with :func:`model_wo_softmax`).
        neuron_selection_mode: which class each input is explained for:
            ``"max_activation"`` the predicted class; ``"index"`` the class given to
            :meth:`analyze`; ``"all"`` every class at once (the model loss is the
            cross-entropy to the model's own class distribution for that input, so the
            bottleneck keeps what the whole output depends on).
        feature_name: the layer after which the bottleneck goes (a TF1-style tensor name
            such as ``"block3_conv2/Relu:0"`` is accepted and means its layer).
        estimator: an :class:`iba_core.Estimator` to start from.
        feature_mean_std: ``(mean, std)`` per sample in the layer's layout.
        **iba_kwargs: the :class:`IBALayer`'s hyperparameters.

    The copy shares the weights of ``model``, which is never modified.
    """

    def __init__(
        self,
        model: keras.Model,
        neuron_selection_mode: str = "max_activation",
        feature_name: str | None = None,
        estimator: Estimator | None = None,
        feature_mean_std: tuple[Any, Any] | None = None,
        **iba_kwargs: Any,
    ) -> None:
        if neuron_selection_mode not in _MODES:
            raise ValueError(f"neuron_selection_mode must be one of {_MODES}, got {neuron_selection_mode!r}")
        _kind(model)
        if ends_in_softmax(model):
            raise ValueError(
                f"model {model.name!r} ends in a softmax, but IBA needs the logits (the softmax "
                "saturates and hides the class evidence). Use model_wo_softmax(model) to strip it."
            )
        if feature_name is None:
            names = [layer.name for layer in model.layers]
            raise ValueError(
                f"give feature_name, the layer to put the bottleneck after; the model's layers are: {names}"
            )
        layer_name = self._layer_name(model, feature_name)
        super().__init__(
            model, layer_name, estimator=estimator, feature_mean_std=feature_mean_std, **iba_kwargs
        )
        self.neuron_selection_mode = neuron_selection_mode
        self.feature_name = feature_name

    @staticmethod
    def _layer_name(model: keras.Model, feature_name: str) -> str:
        names = {layer.name for layer in model.layers}
        if feature_name in names:
            return feature_name
        head = feature_name.split(":", 1)[0].split("/", 1)[0]
        return head if head in names else feature_name  # unknown names fail with a list

    # -- estimation -------------------------------------------------------------------------
    def fit(
        self, X: Any, batch_size: int = 32, n_samples: int | None = None, progbar: bool | None = None
    ) -> Estimator:
        """Add ``X`` (an array of inputs, a ``tf.data.Dataset`` or a generator) to the
        estimate of the feature mean and std.  Estimates accumulate over calls, as in the
        reference library; :meth:`reset_estimate` starts over.  ``n_samples`` caps the
        samples taken from ``X``."""
        limit = sys.maxsize if n_samples is None else self.estimator.n + int(n_samples)
        return self.iba_layer.estimate(
            self.model, X, n_samples=limit, batch_size=batch_size, progbar=progbar, reset=False
        )

    def fit_generator(
        self,
        generator: Any,
        steps_per_epoch: int | None = None,
        epochs: int = 1,
        verbose: int = 0,
        **_ignored: Any,
    ) -> Estimator:
        """Estimate from a generator of ``x`` or ``(x, y)`` batches, ``steps_per_epoch``
        batches per epoch (all of them if ``None``).  Accumulates like :meth:`fit`."""
        for _ in range(int(epochs)):
            batches = input_batches(generator)
            if steps_per_epoch is not None:
                batches = itertools.islice(batches, int(steps_per_epoch))
            self.iba_layer.estimate(
                self.model, batches, n_samples=sys.maxsize, progbar=bool(verbose), reset=False
            )
        return self.estimator

    # -- explanation --------------------------------------------------------------------------
    def predict(self, X: Any, batch_size: int = 32) -> np.ndarray:
        """The model's logits on ``X`` (no bottleneck)."""
        return super().predict(X, batch_size)

    def analyze(self, X: Any, neuron_selection: Any = None, **kwargs: Any) -> np.ndarray:  # type: ignore[override]
        """Saliency maps for a batch ``X`` ``(N, H, W, C)``: ``(H, W)`` for one input, else
        ``(N, H, W)``, bits per pixel.

        ``neuron_selection`` (mode ``"index"`` only): one class index or one per input.
        Further keyword arguments as in :meth:`IBACopy.analyze` (``seed``, ``beta``, ...).
        """
        mode = self.neuron_selection_mode
        if neuron_selection is not None and mode != "index":
            raise ValueError(
                f"only neuron_selection_mode='index' takes neuron_selection; this analyzer uses {mode!r}"
            )
        if neuron_selection is None and mode == "index":
            raise ValueError(
                "neuron_selection_mode='index' needs neuron_selection (a class index or one per input)"
            )
        target = {"index": neuron_selection, "max_activation": "predicted", "all": "all"}[mode]
        return super().analyze(X, target=target, **kwargs)

    # -- persistence ---------------------------------------------------------------------------
    def save_npz(self, fname: str | os.PathLike) -> None:
        """Write the estimate (or the given mean/std) and the settings to an ``.npz`` file.

        ``.npz`` is appended to a name without it, as ``np.savez`` does; :meth:`load_npz`
        finds the file under either name.  The file carries a format mark.
        """
        bn = self.bottleneck
        state: dict[str, Any] = {
            "format": np.asarray(_COPY_FORMAT),
            "class_name": np.asarray(type(self).__name__),
            "feature_name": np.asarray(self.layer_name),
            "neuron_selection_mode": np.asarray(self.neuron_selection_mode),
            "config": np.asarray(json.dumps(self.iba_layer.config.as_dict())),
        }
        if bn.estimator.n > 0:
            state.update({f"estimator_{k}": v for k, v in bn.estimator.state_dict().items()})
        if bn.feature_mean is not None:
            state["feature_mean"] = bn.feature_mean
        if bn.feature_std is not None:
            state["feature_std"] = bn.feature_std
        if len(state) == 5:
            raise RuntimeError("nothing to save: call fit(X) or fit_generator() first")
        np.savez(save_target(fname), **state)

    def load_npz(self, fname: str | os.PathLike) -> IBACopyInnvestigate:
        """Load an estimate written by :meth:`save_npz` for the same layer; returns self.

        Files without the current format mark (older versions), damaged files and files
        of another layer or shape raise :class:`iba_core.math.SavedStateError`
        (a ``ValueError``) naming the file; the analyzer is then left as it was.
        """
        file, state = read_npz(fname, "IBACopyInnvestigate estimate", "save_npz()")
        where = file_name(file)
        remedy = "fit() the analyzer again and save_npz() a new file"
        try:
            check_format(state, (_COPY_FORMAT,), "IBACopyInnvestigate file", remedy)
        except SavedStateError as exc:
            raise SavedStateError(f"cannot use {where!r}: {exc}") from None
        saved_layer = str(state.get("feature_name", ""))
        if saved_layer != self.layer_name:
            raise SavedStateError(
                f"{where!r} holds an estimate for layer {saved_layer!r}, not "
                f"{self.layer_name!r}; {remedy} for this layer"
            )
        est = {k[len("estimator_") :]: v for k, v in state.items() if k.startswith("estimator_")}
        shape = self.feature_shape
        estimator = Estimator()
        given: dict[str, np.ndarray | None] = {}
        try:
            if est:
                estimator.load_state_dict(est, expected_shape=shape)
            for key in ("feature_mean", "feature_std"):
                value = state.get(key)
                if value is not None:
                    if value.dtype.kind not in "iuf" or tuple(value.shape) != shape:
                        raise SavedStateError(
                            f"{key} has {value.dtype} values of shape "
                            f"{value.shape}; the layer needs numbers of shape "
                            f"{shape}"
                        )
                    value = np.asarray(value, dtype=np.float64)
                    if not np.all(np.isfinite(value)):
                        raise SavedStateError(f"{key} holds NaN/inf values")
                given[key] = value
        except ValueError as exc:
            raise SavedStateError(f"cannot use {where!r}: {exc}") from None
        bn = self.bottleneck
        if est:
            bn.estimator.load_state_dict(est, expected_shape=shape)
        else:
            bn.estimator.reset()
        bn.feature_mean, bn.feature_std = given["feature_mean"], given["feature_std"]
        return self
