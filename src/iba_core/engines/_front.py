"""What every per-sample front shares, and the front for any registered backend.

A front adapts names and data types to its framework's habits and delegates to a
:class:`PerSampleBottleneck`; :class:`PerSampleFront` holds everything that is the same
in every front (the reference library's settings as live attributes, statistics,
capacity, ``restrict_flow``, NumPy maps).  :class:`IBA` is that front for any backend,
so a plugin backend gets the whole workflow with no framework glue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..contract._backend import Backend
from ..math._estimator import Estimator
from ._bottleneck import Bottleneck
from ._config import FIELDS, IBAConfig, LiveSettings
from ._padding import MaskedBatch, checked_padding, with_inputs
from ._per_sample import PerSampleBottleneck


def settings_of(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`IBAConfig` fields among a front method's ``locals()``."""
    return {k: arguments[k] for k in FIELDS if k in arguments}


#: What a front's ``analyze`` hands to :meth:`PerSampleBottleneck.analyze` besides the
#: inputs, the target and the loss (see :func:`analysis_options`).
ANALYSIS_OPTIONS = ("mode", "seed", "noise", "inputs_per_pass", "attention_mask", "distributed")


def analysis_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's ``analyze`` options and settings among a front's ``locals()``."""
    return {
        **{k: arguments[k] for k in ANALYSIS_OPTIONS if k in arguments},
        **settings_of(arguments),
        **arguments.get("overrides", {}),
    }


MULTI_INPUT = (
    "multi-input models are not supported yet: the bottleneck explains a model "
    "that takes one input tensor (N, ...)"
)


def is_multi_input(x: Any) -> bool:
    """Whether ``x`` looks like the inputs of a multi-input model: a mapping, or a list or
    tuple of arrays/tensors (a nested list of numbers is one input)."""
    if isinstance(x, Mapping):
        return True
    if not isinstance(x, (list, tuple)):
        return False
    return any(
        len(tuple(getattr(e, "shape", ()))) > 0  # arrays, not 0-d scalars
        or (isinstance(e, (list, tuple, Mapping)) and is_multi_input(e))
        for e in x
    )


def refuse_multi_input(x: Any, what: str = "the model input") -> None:
    """Raise a clear ``ValueError`` when ``x`` is several model inputs (see
    :func:`is_multi_input`)."""
    if is_multi_input(x):
        kind = "a dict" if isinstance(x, Mapping) else f"a {type(x).__name__} of {len(x)} arrays"
        raise ValueError(
            f"{MULTI_INPUT}; {what} is {kind}. Wrap the model so that it takes "
            "one tensor (e.g. concatenate or stack the inputs inside a wrapper "
            "model) and explain that"
        )


def input_batches(data: Any, batch_size: int = 32) -> Iterator[Any]:
    """Model-input batches from ``data``.

    ``data`` is an array or tensor of inputs ``(N, ...)`` (cut into ``batch_size``), or
    any iterable of batches ``x`` or ``(x, y, ...)`` (a ``DataLoader``, a
    ``tf.data.Dataset``, a generator, a list), or a sequence with ``len`` and indexing
    (a Keras ``PyDataset``).  Yields the ``x`` of each batch.  Several inputs per batch
    (a dict, or an ``x`` that is itself a list/tuple/dict of arrays) are refused:
    multi-input models are not supported yet.
    """
    if isinstance(data, Mapping):
        refuse_multi_input(data, "the data")
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        yield from _array_batches(data, batch_size)
        return
    for element in _elements(data):
        if isinstance(element, (tuple, list)):
            if not element:
                raise ValueError("the data yielded an empty tuple; expected x or (x, y)")
            element = element[0]
        refuse_multi_input(element, "a batch's x")
        yield element


#: Keys of a mapping batch (Hugging Face style) besides ``input_ids`` and ``attention_mask``
#: that an estimate ignores: the labels.
LABEL_KEYS = ("labels", "label")


def estimation_batches(
    data: Any,
    batch_size: int = 32,
    *,
    attention_mask: Any = None,
    backend: Backend,
    convert: Callable[[Any], Any] | None = None,
) -> Iterator[Any]:
    """The batches ``estimate`` reads from ``data``: model inputs ``x``, or
    :class:`MaskedBatch` es ``(x, attention_mask)`` whose padded positions stay out of the
    feature statistics.

    ``data`` is one of

    - an array or tensor of inputs ``(N, ...)``, cut into ``batch_size``; with
      ``attention_mask`` ``(N, T)`` (1/True = real token, 0/False = padding) cut alike;
    - a mapping with ``"input_ids"`` ``(N, T)`` and ``"attention_mask"`` ``(N, T)`` (a
      tokenizer's output for the whole data set), cut the same way;
    - an iterable of batches (a ``DataLoader``, a ``tf.data.Dataset``, a generator, a
      list, a Keras ``PyDataset``), each ``x``, ``(x, y, ...)``, or a mapping
      ``{"input_ids": x, "attention_mask": m}`` (alone or as the ``x`` of a tuple; the
      keys ``"labels"``/``"label"`` are ignored), or a :class:`MaskedBatch`.  The masks
      of such data travel in its batches: ``attention_mask=`` is refused for it.

    The model is run on ``x`` (the ``input_ids``) alone; ``convert(x)`` (optional) turns
    each batch's inputs into what the model takes (e.g. a tensor on its device).  An
    ``attention_mask=`` given here is checked at once (shape, 0/1, a real token in every
    row), before any model pass.
    """
    batches = _estimation_batches(data, batch_size, attention_mask, backend)
    return batches if convert is None else (with_inputs(b, convert) for b in batches)


def _estimation_batches(data: Any, batch_size: int, attention_mask: Any, backend: Backend) -> Iterator[Any]:
    if isinstance(data, Mapping) and "input_ids" in data:
        x, mask = _mapping_inputs(data, "the data")
        if attention_mask is not None and mask is not None:
            raise ValueError(
                "the data holds an 'attention_mask' and attention_mask= was given too; give it once"
            )
        data, attention_mask = x, mask if attention_mask is None else attention_mask
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        if attention_mask is None:
            return _array_batches(data, batch_size)
        shape = tuple(data.shape)
        if len(shape) < 1 or shape[0] == 0:
            raise ValueError(f"expected a batch of inputs (N, ...), got shape {shape}")
        padding = checked_padding(backend, attention_mask, int(shape[0]), "estimate(attention_mask=)")
        return _with_rows(_array_batches(data, batch_size), padding)
    if attention_mask is not None:
        raise ValueError(
            "attention_mask= goes with data given as one array of inputs (N, T); data given "
            "in batches carries each batch's mask in the batch: a mapping {'input_ids': x, "
            "'attention_mask': mask} (alone or as the x of an (x, y) tuple)"
        )
    if isinstance(data, Mapping):
        refuse_multi_input(data, "the data")
    return (_estimation_batch(element) for element in _elements(data))


def _with_rows(batches: Iterator[Any], padding: np.ndarray) -> Iterator[MaskedBatch]:
    """Each batch of consecutive inputs with its rows of ``padding``."""
    start = 0
    for x in batches:
        stop = start + int(x.shape[0])
        yield MaskedBatch(x, padding[start:stop])
        start = stop


def _estimation_batch(element: Any) -> Any:
    """One batch of an iterable: ``x`` or a :class:`MaskedBatch` (see :func:`estimation_batches`)."""
    if isinstance(element, MaskedBatch):
        refuse_multi_input(element.inputs, "a batch's inputs")
        return element
    if isinstance(element, (tuple, list)):
        if not element:
            raise ValueError("the data yielded an empty tuple; expected x or (x, y)")
        element = element[0]
    if isinstance(element, Mapping):
        x, mask = _mapping_inputs(element, "a batch")
        return x if mask is None else MaskedBatch(x, mask)
    refuse_multi_input(element, "a batch's x")
    return element


def _mapping_inputs(data: Mapping[str, Any], what: str) -> tuple[Any, Any]:
    """``(input_ids, attention_mask or None)`` of a mapping; other keys than the labels
    are refused (the model is run on the ids alone)."""
    if "input_ids" not in data:
        refuse_multi_input(data, what)
    extra = sorted(set(data) - {"input_ids", "attention_mask", *LABEL_KEYS})
    if extra:
        raise ValueError(
            f"{what} holds {sorted(data)}: the model is run on 'input_ids' alone and "
            f"'attention_mask' marks the padding; leave out {extra} (e.g. "
            "return_token_type_ids=False in the tokenizer call), or wrap the model so that "
            "it takes one tensor"
        )
    refuse_multi_input(data["input_ids"], f"{what}'s input_ids")
    return data["input_ids"], data.get("attention_mask")


def _array_batches(data: Any, batch_size: int) -> Iterator[Any]:
    """An array or tensor of inputs ``(N, ...)`` cut into ``batch_size`` (the last one shorter)."""
    shape = tuple(data.shape)
    if len(shape) < 1 or shape[0] == 0:
        raise ValueError(f"expected a batch of inputs (N, ...), got shape {shape}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = int(shape[0])
    for start in range(0, n, int(batch_size)):
        yield data[start : min(n, start + int(batch_size)), ...]


def _elements(data: Any) -> Iterable[Any]:
    """The batches of an iterable, or of a sequence with ``len`` and indexing only."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not hasattr(data, "__iter__"):
        return (data[i] for i in range(len(data)))
    if isinstance(data, Iterable):
        return data
    raise TypeError(
        f"cannot iterate over data of type {type(data).__name__}; give an "
        "array of inputs or an iterable of batches x or (x, y)"
    )


class PerSampleFront(LiveSettings):
    """The part of every per-sample front that is the same for every framework.

    A front sets ``self._engine`` (a :class:`PerSampleBottleneck`) and adds its own
    constructor, ``estimate`` and ``analyze`` signatures.
    """

    _engine: PerSampleBottleneck

    @property
    def engine(self) -> PerSampleBottleneck:
        """The core :class:`iba_core.PerSampleBottleneck` doing the work."""
        return self._engine

    @property
    def bottleneck(self) -> Bottleneck:
        """The core :class:`iba_core.Bottleneck`: settings, statistics and the last mask."""
        return self._engine.bottleneck

    @property
    def config(self) -> IBAConfig:
        """The live settings, an :class:`iba_core.IBAConfig`."""
        return self._engine.config

    @config.setter
    def config(self, value: IBAConfig) -> None:
        self._engine.config = value

    @property
    def estimator(self) -> Estimator:
        """The running estimate of the feature statistics (channels-first)."""
        return self._engine.estimator

    @estimator.setter
    def estimator(self, value: Estimator) -> None:
        self._engine.estimator = value

    def reset_estimate(self) -> None:
        """Forget the estimated (and given) feature mean and std."""
        self._engine.bottleneck.reset_estimate()

    def capacity(self) -> Any:
        """Capacity of the last explanation, ``(N, C, ...)`` channels-first, nats per element
        (with the settings that explanation was made with)."""
        return self._engine.capacity()

    @contextlib.contextmanager
    def restrict_flow(self, alpha: Any = None) -> Iterator[Any]:
        """Within the context, the layer's features pass the bottleneck with the mask of
        the last ``analyze`` (or ``alpha``, channels-first logits), fresh noise on every
        call and the settings of that analysis; the model is frozen inside."""
        with self._engine.restrict_flow(alpha):
            yield self

    def _maps(self, x: Any, **kwargs: Any) -> np.ndarray:
        """``engine.analyze`` as NumPy: ``(N, ...)``, or the single map for one input."""
        maps = self._engine.backend.to_numpy(self._engine.analyze(x, **kwargs))
        return maps[0] if maps.shape[0] == 1 else maps


class IBA(PerSampleFront):
    """The Per-Sample Bottleneck for a model of any registered backend.

    ``IBA(model, "layer")`` finds the backend from the model's type (or give
    ``backend="name"``).  Data are the backend's tensors or NumPy arrays; maps come back
    as NumPy, bits per pixel.  Example with any backend::

        iba = IBA(model, "features.relu3")
        iba.estimate(train_images)                       # array (N, ...) or batches
        maps = iba.analyze(images, target=labels)        # (N, H, W), bits per pixel
        iba.plot(maps[0], images[0])

    Settings (``beta``, ``sigma``, ``optimization_steps``, ...) are those of
    :class:`iba_core.IBAConfig`; ``layout`` is the layer's feature layout
    (``"channels_first"`` or ``"channels_last"``; default: what the backend knows).
    """

    def __init__(
        self,
        model: Any,
        layer: Any,
        *,
        backend: Any = None,
        layout: str | None = None,
        on_input: bool = False,
        **settings: Any,
    ) -> None:
        unknown = sorted(set(settings) - set(FIELDS) - {"config", "feature_mean", "feature_std", "estimator"})
        if unknown:
            raise TypeError(f"unknown argument(s) {unknown}; the settings are: {list(FIELDS)}")
        self._engine = PerSampleBottleneck(
            backend, model, layer, layout=layout, on_input=on_input, **settings
        )

    @property
    def model(self) -> Any:
        """The explained model."""
        return self._engine.model

    def _tensor(self, x: Any) -> Any:
        refuse_multi_input(x)
        backend = self._engine.backend
        if isinstance(x, np.ndarray) or not backend.owns(x):
            a = np.asarray(x)
            x = backend.from_numpy(a.astype(np.float32) if a.dtype == np.float64 else a)
        return x

    def estimate(
        self,
        data: Any,
        *,
        n_samples: int = 10000,
        batch_size: int = 32,
        progbar: bool | None = None,
        reset: bool = True,
        distributed: bool | str | None = None,
        attention_mask: Any = None,
    ) -> Estimator:
        """Estimate the layer's feature mean and std over ``data`` (an array of inputs,
        cut into ``batch_size``, or an iterable of ``x`` / ``(x, y)`` batches).

        Sequences with padding: give ``attention_mask`` ``(N, T)`` (1 = real token, 0 =
        padding) with an array of inputs, or batches ``{"input_ids": x, "attention_mask":
        mask}``; each position's statistics are then taken over the sequences in which it
        is real (see :func:`iba_core.engines.estimation_batches`).
        ``distributed``: see :meth:`iba_core.PerSampleBottleneck.estimate` (data-parallel
        runs, README "Data sets larger than one device")."""
        batches = estimation_batches(
            data,
            batch_size,
            attention_mask=attention_mask,
            backend=self._engine.backend,
            convert=self._tensor,
        )
        return self._engine.estimate(
            batches, n_samples=n_samples, progbar=progbar, reset=reset, distributed=distributed
        )

    def analyze(
        self,
        x: Any,
        target: Any = None,
        *,
        loss: Callable[[Any], Any] | None = None,
        output_loss: Callable[[Any], Any] | None = None,
        mode: str = "saliency",
        seed: Any = None,
        noise: str = "backend",
        inputs_per_pass: int | None = None,
        attention_mask: Any = None,
        distributed: bool | None = None,
        **overrides: Any,
    ) -> np.ndarray:
        """Maps of a batch of inputs, NumPy, bits per pixel: ``(H, W)`` for one input, else
        ``(N, H, W)`` (sequences: ``(T,)`` / ``(N, T)``, bits per position).  See
        :meth:`iba_core.PerSampleBottleneck.analyze` for ``target``, ``loss``,
        ``output_loss``, ``mode``, ``seed``, ``noise``, ``attention_mask`` (``(N, T)``,
        1 = real token, 0 = padding: 0 bits there), ``distributed`` (data-parallel
        runs) and the overrides."""
        return self._maps(
            self._tensor(x),
            target=target,
            loss=loss,
            output_loss=output_loss,
            mode=mode,
            seed=seed,
            noise=noise,
            inputs_per_pass=inputs_per_pass,
            attention_mask=attention_mask,
            distributed=distributed,
            **overrides,
        )

    @staticmethod
    def plot(saliency_map: Any, img: Any = None, **kwargs: Any) -> Any:
        """Draw a map (optionally over its image) with :func:`iba_core.apps.plotting.
        plot_saliency_map`; returns the matplotlib axes."""
        from ..apps.plotting import plot_saliency_map

        return plot_saliency_map(saliency_map, img=img, **kwargs)

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"IBA(backend={self._engine.backend.name!r}, layer={self._engine.layer!r}, "
            f"beta={cfg.beta}, sigma={cfg.sigma}, steps={cfg.optimization_steps}, "
            f"estimated_samples={self.estimator.n})"
        )
