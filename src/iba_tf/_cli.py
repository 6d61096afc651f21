"""What the TensorFlow/Keras backend adds for the ``iba`` command (``iba demo|explain|layers``).

Models are ``.keras`` (or legacy ``.h5``) files, optionally with ``--weights`` from a
``.weights.h5`` file; a final softmax is removed (with a warning), since IBA explains
logits.  Every mistake is a one-line :class:`iba_core.UsageError`.  :class:`TFCliMixin`
is mixed into :class:`iba_tf.TFBackend`; this module imports nothing from the backend
module, which imports it.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from iba_core.apps.loading import first_line
from iba_core.contract import InputSpec, UsageError

from . import _plugin

__all__ = ["TFCliMixin"]


#: The device each model loaded for ``--device`` lives on; inputs are copied there.
_devices: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _device(device: str | None) -> str | None:
    """``--device`` (``cpu``, ``gpu:1``, ``/GPU:0``, ...) as the name of a logical device."""
    if device is None:
        return None
    wanted = device.upper().lstrip("/")
    wanted = wanted.split("DEVICE:")[-1]
    wanted = wanted if ":" in wanted else f"{wanted}:0"
    known = {d.name.split("device:")[-1].upper(): d.name for d in tf.config.list_logical_devices()}
    if wanted not in known:
        raise UsageError(
            f"--device {device!r} is not usable; TensorFlow sees: {', '.join(sorted(known)) or 'no devices'}"
        )
    return known[wanted]


def _on(device: str | None) -> contextlib.AbstractContextManager[Any]:
    return tf.device(device) if device is not None else contextlib.nullcontext()


class TFCliMixin:
    """The optional command-line methods of :class:`iba_core.Backend`, for Keras models."""

    def claims_model(self, spec: str) -> bool:
        """Keras model files: ``.keras``, ``.h5``, ``.hdf5``."""
        return _plugin.claims_model(spec)

    def load_model(self, spec: str, weights: str | None = None, device: str | None = None) -> keras.Model:
        from ._copy import ends_in_softmax, model_wo_softmax

        dev = _device(device)
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"no such model file: {path}")
        with _on(dev):
            try:
                model = keras.models.load_model(path, compile=False)
            except Exception as exc:
                raise UsageError(f"cannot load the Keras model {path}: {first_line(exc)}") from None
            if weights is not None:
                if not Path(weights).is_file():
                    raise UsageError(f"--weights: no such file: {weights}")
                try:
                    model.load_weights(weights)
                except Exception as exc:
                    raise UsageError(
                        f"--weights {weights} does not fit the model: {first_line(exc)}"
                    ) from None
            try:
                if ends_in_softmax(model):
                    print(
                        "iba: warning: the model ends in a softmax; explaining its logits "
                        "(the softmax is removed)",
                        file=sys.stderr,
                    )
                    model = model_wo_softmax(model)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"cannot use the Keras model {path}: {first_line(exc)}") from None
        if dev is not None:
            _devices[model] = dev
        return model

    def demo_model(self, device: str | None = None) -> keras.Model:
        from ._demo import demo_cnn

        return _built_on(device, demo_cnn)

    def demo_text_model(self, device: str | None = None) -> keras.Model:
        from ._text import text_model

        return _built_on(device, text_model)

    def describe_input(self, model: Any) -> InputSpec:
        """Channels and ``(H, W)`` from the model's declared input, channels-last."""
        try:
            shape = tuple(model.inputs[0].shape)
        except (AttributeError, IndexError, ValueError, TypeError):
            shape = ()
        channels = size = None
        if len(shape) == 4:
            if shape[-1] is not None:
                channels = int(shape[-1])
            if shape[1] is not None and shape[2] is not None:
                size = (int(shape[1]), int(shape[2]))
        return InputSpec(channels=channels, size=size, channels_last=True)

    def to_device(self, x: Any, model: Any) -> Any:
        """``x`` copied to the device the model was loaded onto with ``--device``."""
        try:
            dev = _devices.get(model)
        except TypeError:  # not weakly referenceable: nothing was recorded for it
            dev = None
        if dev is None or not tf.is_tensor(x):
            return x
        with tf.device(dev):
            return tf.identity(x)


def _built_on(device: str | None, make: Any) -> keras.Model:
    """``make()`` built on ``device`` (default: TensorFlow's choice), remembered for inputs."""
    dev = _device(device)
    with _on(dev):
        model = make()
    if dev is not None:
        _devices[model] = dev
    return model
