"""The TensorFlow/Keras runner behind ``iba demo`` / ``iba explain`` / ``iba layers``.

Loads ``.keras`` models (optionally ``--weights`` from a ``.weights.h5`` file), lists
their layers, and drives :class:`iba_tf.IBACopy` with NumPy arrays in and out.  User
mistakes are raised as :class:`iba_core.cli.CliError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from iba_core import Estimator, FewSamplesWarning
from iba_core.cli import CliError, CliFailure

from ._copy import IBACopy, ends_in_softmax, model_wo_softmax

__all__ = ["Runner"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Session:
    """A Keras model with an :class:`IBACopy` at one top-level layer, NumPy in and out."""

    def __init__(self, model: keras.Model, layer: str, sample: np.ndarray, device: Any,
                 **settings: Any) -> None:
        self.device = device
        names = [lay.name for lay in model.layers
                 if not isinstance(lay, keras.layers.InputLayer)]
        if layer not in names:
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40
                                              else "")
            raise CliError(f"layer {layer!r} not found in the model; its layers are: {shown} "
                           "(see 'iba layers MODEL' for their output shapes)")
        try:
            self.iba = IBACopy(model, layer, **settings)
        except (TypeError, ValueError) as exc:
            raise CliError(f"cannot put a bottleneck after layer {layer!r}: "
                           f"{_first_line(exc)}") from None
        self.feature_shape = tuple(int(s) for s in self.iba.feature_shape)
        with self._on_device():
            self._run(sample)

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        return tf.device(self.device) if self.device is not None else contextlib.nullcontext()

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self.iba.predict(np.asarray(x, dtype=np.float32), batch_size=64))
        except Exception as exc:
            raise CliError(f"the model failed on input of shape {tuple(x.shape)}: "
                           f"{_first_line(exc)} (check --size and --channels)") from None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)`` as NumPy."""
        with self._on_device():
            out = self._run(x)
        if out.ndim != 2:
            raise CliError(f"the model returns {out.shape}; iba explain needs a classifier "
                           "returning logits of shape (N, classes)")
        return out

    def estimate(self, batches: Iterable[np.ndarray], n_samples: int, progbar: bool) -> Estimator:
        with warnings.catch_warnings(), self._on_device():
            warnings.simplefilter("default", FewSamplesWarning)
            return self.iba.estimate((np.asarray(b, dtype=np.float32) for b in batches),
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
            with self._on_device():
                maps = self.iba.analyze(np.asarray(x, dtype=np.float32),
                                        target=np.asarray(targets), seed=seed, noise=noise)
        except FloatingPointError as exc:
            raise CliFailure(str(exc)) from None
        return maps[None] if maps.ndim == 2 else maps


class Runner:
    """TensorFlow/Keras for the ``iba`` command (see :class:`iba_core.cli.Runner`)."""

    name = "tensorflow"
    channels_last = True

    def __init__(self, device: str | None = None) -> None:
        self.device = None
        if device is not None:
            wanted = device.upper().lstrip("/")
            wanted = wanted if ":" in wanted else f"{wanted}:0"
            known = {d.name.split("device:")[-1].upper(): d.name
                     for d in tf.config.list_logical_devices()}
            if wanted not in known:
                raise CliError(f"--device {device!r} is not usable; TensorFlow sees: "
                               f"{', '.join(sorted(known)) or 'no devices'}")
            self.device = known[wanted]

    def demo_model(self) -> keras.Model:
        from ._demo import demo_cnn

        return demo_cnn()

    def load_model(self, spec: str, weights: str | None, device: str | None) -> keras.Model:
        path = Path(spec)
        if not path.is_file():
            raise CliError(f"no such model file: {path}")
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise CliError(f"cannot load the Keras model {path}: {_first_line(exc)}") from None
        if weights is not None:
            if not Path(weights).is_file():
                raise CliError(f"--weights: no such file: {weights}")
            try:
                model.load_weights(weights)
            except Exception as exc:
                raise CliError(f"--weights {weights} does not fit the model: "
                               f"{_first_line(exc)}") from None
        try:
            if ends_in_softmax(model):
                print("iba: warning: the model ends in a softmax; explaining its logits (the "
                      "softmax is removed)", file=sys.stderr)
                model = model_wo_softmax(model)
        except (TypeError, ValueError) as exc:
            raise CliError(f"cannot use the Keras model {path}: {_first_line(exc)}") from None
        return model

    def input_channels(self, model: keras.Model) -> int | None:
        try:
            shape = model.inputs[0].shape
        except (AttributeError, IndexError, ValueError):
            return None
        return int(shape[-1]) if len(shape) == 4 and shape[-1] is not None else None

    def image_size(self, model: keras.Model) -> tuple[int, int] | None:
        """The ``(H, W)`` the model's input declares, if it declares one."""
        try:
            shape = tuple(model.inputs[0].shape)
        except (AttributeError, IndexError, ValueError):
            return None
        if len(shape) == 4 and shape[1] is not None and shape[2] is not None:
            return int(shape[1]), int(shape[2])
        return None

    def layer_table(self, model: keras.Model, input_shape: tuple[int, ...]
                    ) -> list[tuple[str, str, str]]:
        rows = []
        for layer in _top_level(model):
            try:
                shape = str(tuple(layer.output.shape[1:]))
            except (AttributeError, ValueError):
                shape = "-"
            rows.append((layer.name, type(layer).__name__, shape))
        return rows

    def session(self, model: keras.Model, layer: str, sample: np.ndarray,
                **settings: Any) -> Session:
        return Session(model, layer, sample, self.device, **settings)


def _top_level(model: keras.Model) -> Iterator[Any]:
    for layer in model.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            yield layer
