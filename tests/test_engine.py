"""The per-sample engine through every front: each test is a defect a new user met.

Fronts: ``iba_torch.IBA`` at a layer object with a loss closure (``torch-layer+closure``)
or with ``target=`` and ``model=`` (``torch-layer+target``), ``IBA(model, "name")``
(``torch-named+target``), the generic ``iba_core.IBA`` on PyTorch (``torch-generic+...``),
``iba_tf.IBALayer`` inside a Keras model (``tf-layer+...``), ``iba_tf.IBACopy``
(``tf-copy+...``), ``IBACopyInnvestigate`` (``tf-innv+...``) and the generic front on the
array-api-strict test backend (``strict-generic+...``).

Tolerances: maps computed twice by the same float32 code path on the CPU are compared
exactly (``EXACT``; the same operations in the same order give the same bits).  Two code
paths that differ only in where float32 operations are grouped (copies made at the layer
vs. at the input, a compiled vs. an eager step) are compared at ``ROUNDOFF`` (float32 has
~7 significant digits; 2-3 Adam steps keep round-off near that level).  float64 results
(the strict backend, NumPy recomputations) are compared tighter or at the float32 level
of the quantity they are compared with.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

import iba_core
from iba_core import Estimator, FewSamplesWarning

pytestmark = pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")

LN2 = math.log(2.0)
#: Same float32 code path twice: bit-identical.
EXACT = dict(rtol=0, atol=0)
#: float32 code paths that group operations differently (see the module docstring).
ROUNDOFF = dict(rtol=1e-4, atol=1e-6)
#: Few Adam steps and noisy copies, so the module runs in seconds; a small beta and a
#: half-open start, so that within 3 steps the mask depends on the model and the target
#: (with the defaults, beta=10 and alpha=5, Adam's first steps move every mask element
#: alike and the maps hardly depend on anything).
FAST = dict(optimization_steps=3, batch_size=3, beta=0.1, initial_alpha=1.0)
#: The strict backend differentiates by finite differences: keep the work tiny.
STRICT_FAST = dict(optimization_steps=2, batch_size=2, beta=0.1, initial_alpha=1.0)
N_CLASSES = 5

BAD_SETTINGS = [
    {"beta": -1},
    {"lr": 0},
    {"optimization_steps": -3},
    {"optimization_steps": 2.5},
    {"min_std": -1},
    {"batch_size": 0},
    {"active_neurons_threshold": 1.5},
]


def _bad_id(bad: dict) -> str:
    ((k, v),) = bad.items()
    return f"{k}={v}"


def _torch():
    return pytest.importorskip("torch")


def _tf():
    pytest.importorskip("keras")
    return pytest.importorskip("tensorflow")


def _models():
    _torch()
    import engine_models

    return engine_models


def to_np(t) -> np.ndarray:
    """Any backend's array as NumPy."""
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy()
    if hasattr(t, "numpy"):
        return np.asarray(t.numpy())
    return np.from_dlpack(t).copy()


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def config_error(**bad) -> str:
    """The constructor's message for a bad setting."""
    with pytest.raises(ValueError) as info:
        iba_core.IBAConfig(**bad)
    return str(info.value)


def capacity_fn():
    try:
        from iba_core.math import capacity
    except ImportError:  # iba_core before it had the math subpackage
        from iba_core import capacity
    return capacity


def param(kind: str, *more):
    """A ``pytest.param`` for a front kind (and more values), marked with its framework."""
    framework = kind.split("-", 1)[0]
    marks = {"torch": [pytest.mark.torch], "tf": [pytest.mark.tf]}.get(framework, [])
    values = (kind, *more) if more else kind
    return pytest.param(values, marks=marks, id="-".join([kind, *map(str, more)]))


# -- fronts -------------------------------------------------------------------------------
class TorchFront:
    """A PyTorch front of one kind on one model (see the module docstring)."""

    framework = "torch"

    def __init__(
        self,
        kind: str,
        layer: str = "conv2",
        model=None,
        train: bool = False,
        tripwire: bool = False,
        pause: bool = False,
        **settings,
    ):
        self.torch = _torch()
        self.m = _models()
        self.kind, self.layer = kind, layer
        self.how, self.uses = kind.split("-", 1)[1].split("+")
        self.model = (
            model if model is not None else self.m.classifier(train=train, tripwire=tripwire, pause=pause)
        )
        self.settings = {**FAST, **settings}
        from iba_torch import IBA

        if self.how == "layer":
            self.iba = IBA(self.module(), **self.settings)
        elif self.how == "named":
            self.iba = IBA(self.model, layer, **self.settings)
        else:
            self.iba = iba_core.IBA(self.model, layer, **self.settings)

    def fresh(self, **settings) -> TorchFront:
        """Another front of the same kind on the same model."""
        return TorchFront(self.kind, self.layer, self.model, **{**self.settings, **settings})

    @property
    def config(self):
        return self.iba.config

    def module(self):
        return dict(self.model.named_modules())[self.layer]

    def inputs(self, n: int, seed: int, scale: float = 1.0, shift: float = 0.0):
        return self.m.images(n, seed, scale, shift)

    def estimate(self, data):
        if self.how == "generic":
            return self.iba.estimate(data, batch_size=16)
        return self.iba.estimate(self.model, [data[i : i + 16] for i in range(0, len(data), 16)])

    def loss_ce(self, target):
        torch, model = self.torch, self.model

        def loss(batch):
            labels = torch.full((batch.shape[0],), int(target), dtype=torch.long)
            return torch.nn.functional.cross_entropy(model(batch), labels)

        return loss

    def analyze(self, x, target=2, **kw):
        if self.uses == "closure":
            return self.analyze_loss(x, self.loss_ce(target), **kw)
        if self.how == "layer":
            return self.iba.analyze(x, target=target, model=self.model, **kw)
        return self.iba.analyze(x, target=target, **kw)

    def analyze_loss(self, x, loss, **kw):
        """A loss closure of the batch (copies at the input)."""
        if self.how == "generic":
            return self.iba.analyze(x, loss=loss, **kw)
        return self.iba.analyze(x, loss, **kw)

    def broken_loss(self, how: str, target=2):
        torch, model = self.torch, self.model
        ce = self.loss_ce(target)
        if how == "detached":
            return lambda b: ce(b).detach()
        if how == "python-float":
            return lambda b: ce(b).item()

        def constant(b):
            model(b)
            return torch.tensor(1.0)

        return constant

    def analyze_all_reference(self, x, probs, **kw):
        """``target="all"`` written as a closure: the cross-entropy to the clean class
        distribution of each input, with the copies made at the input."""
        torch, model = self.torch, self.model
        p = torch.as_tensor(probs, dtype=torch.float32)

        def loss(batch):
            rows = p.repeat_interleave(batch.shape[0] // p.shape[0], dim=0)
            logp = torch.log_softmax(model(batch), dim=1)
            return -(rows * logp).sum(dim=1).mean()

        return self.analyze_loss(x, loss, **kw)

    def logits(self, x) -> np.ndarray:
        with self.torch.no_grad():
            return to_np(self.model(x))

    def int_tensor(self, v: int):
        return self.torch.tensor(v)

    def features(self, x) -> np.ndarray:
        """The layer's clean features ``(N, C, ...)``."""
        seen = []
        handle = self.module().register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        try:
            with self.torch.no_grad():
                self.model(x)
        finally:
            handle.remove()
        return to_np(seen[0]).astype(np.float64)

    def restricted(self, x, alpha_value: float, draws: int) -> np.ndarray:
        """The layer's output inside ``restrict_flow`` with constant mask logits, for
        ``draws`` copies of the input ``x``: ``(draws, C, ...)``."""
        torch = self.torch
        alpha = torch.full((1, *self.iba.estimator.shape), float(alpha_value))
        seen = []
        with self.iba.restrict_flow(alpha):
            # Registered after the bottleneck's hook, so it sees the replaced output.
            handle = self.module().register_forward_hook(lambda m, i, o: seen.append(o.detach()))
            try:
                with torch.no_grad():
                    self.model(x.repeat(draws, 1, 1, 1))
            finally:
                handle.remove()
        return to_np(seen[0]).astype(np.float64)

    def snapshot(self) -> dict:
        torch = self.torch
        return {
            "training": [(n, m.training) for n, m in self.model.named_modules()],
            "requires_grad": [(n, p.requires_grad) for n, p in self.model.named_parameters()],
            "state": {k: v.clone() for k, v in self.model.state_dict().items()},
            "global_pre_hooks": len(torch.nn.modules.module._global_forward_pre_hooks),
            "global_hooks": len(torch.nn.modules.module._global_forward_hooks),
        }

    def check_unchanged(self, before: dict) -> None:
        after = self.snapshot()
        assert after["training"] == before["training"], "training flags not restored"
        assert after["requires_grad"] == before["requires_grad"], "requires_grad not restored"
        for k, v in before["state"].items():
            assert self.torch.equal(after["state"][k], v), f"{k} changed"
        assert after["global_pre_hooks"] == before["global_pre_hooks"], "a global pre-hook left"
        assert after["global_hooks"] == before["global_hooks"], "a global hook left"
        for name, m in self.model.named_modules():
            assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
            assert not m._backward_hooks, f"backward hook left on {name!r}"
        for name, p in self.model.named_parameters():
            assert p.grad is None, f"{name} got a gradient"


class KerasFront:
    """A Keras front of one kind: ``layer`` (an ``IBALayer`` after ``layer`` in the user's
    model), ``copy`` (``IBACopy``) or ``innv`` (``IBACopyInnvestigate``, ``+index`` or
    ``+all``)."""

    framework = "tf"

    def __init__(self, kind: str, layer: str = "conv2", layers=None, model=None, **settings):
        self.tf = _tf()
        import keras

        from iba_tf import IBACopy, IBACopyInnvestigate, IBALayer

        self.keras = keras
        self.kind, self.layer = kind, layer
        self.how, self.uses = kind.split("-", 1)[1].split("+")
        self.layers = layers if layers is not None else keras_layers()
        self.settings = {**FAST, **settings}
        if self.how == "layer":
            self.iba = IBALayer(name="iba", **self.settings)
            self.model = keras_chain(self.layers, self.iba, after=layer)
        else:
            self.model = model if model is not None else keras_chain(self.layers)
            if self.how == "copy":
                self.iba = IBACopy(self.model, layer, **self.settings)
            else:
                self.iba = IBACopyInnvestigate(
                    self.model, neuron_selection_mode=self.uses, feature_name=layer, **self.settings
                )

    def fresh(self, **settings) -> KerasFront:
        """Another front of the same kind on the same layers (the same weights)."""
        model = None if self.how == "layer" else self.model
        return KerasFront(self.kind, self.layer, self.layers, model, **{**self.settings, **settings})

    @property
    def iba_layer(self):
        return self.iba if self.how == "layer" else self.iba.iba_layer

    @property
    def config(self):
        return self.iba_layer.config

    def inputs(self, n: int, seed: int, scale: float = 1.0, shift: float = 0.0):
        x = np.random.default_rng(seed).standard_normal((n, 8, 8, 3)) * scale + shift
        return x.astype("float32")

    def estimate(self, data):
        if self.how == "layer":
            return self.iba.estimate(self.model, data, batch_size=16)
        return self.iba.estimate(data, batch_size=16)

    def loss_ce(self, target):
        """A loss of the batch (IBALayer) or of the model's outputs (the copies)."""
        tf, model = self.tf, self.model

        def ce(logits):
            labels = tf.fill([tf.shape(logits)[0]], int(target))
            return tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            )

        if self.how == "layer":
            return lambda batch: ce(model(batch))
        return ce

    def analyze(self, x, target=2, **kw):
        if self.how == "layer":
            if self.uses == "closure":
                return self.iba.analyze(x, self.loss_ce(target), model=self.model, **kw)
            return self.iba.analyze(x, model=self.model, target=target, **kw)
        if self.how == "copy":
            if self.uses == "loss":
                return self.iba.analyze(x, self.loss_ce(target), **kw)
            return self.iba.analyze(x, target=target, **kw)
        if self.uses == "index":
            return self.iba.analyze(x, neuron_selection=target, **kw)
        assert target == "all", "IBACopyInnvestigate('all') explains all classes"
        return self.iba.analyze(x, **kw)

    def analyze_loss(self, x, loss, **kw):
        if self.how == "layer":
            return self.iba.analyze(x, loss, model=self.model, **kw)
        from iba_tf import IBACopy

        return IBACopy.analyze(self.iba, x, loss, **kw)

    def broken_loss(self, how: str, target=2):
        tf, model = self.tf, self.model
        ce = self.loss_ce(target)
        if how == "detached":
            return lambda b: tf.stop_gradient(ce(b))
        if how == "python-float":
            return lambda b: float(ce(b))
        if self.how == "layer":

            def constant(b):
                model(b)
                return tf.constant(1.0)
        else:

            def constant(outputs):
                return tf.constant(1.0)

        return constant

    def analyze_all_reference(self, x, probs, **kw):
        tf, model = self.tf, self.model
        p = np.asarray(probs, dtype=np.float32)

        def ce(logits):
            rows = tf.repeat(tf.constant(p), int(logits.shape[0]) // p.shape[0], axis=0)
            return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=rows, logits=logits))

        if self.how == "layer":
            return self.iba.analyze(x, lambda b: ce(model(b)), model=model, **kw)
        # The copies' loss gets the outputs; make the copies at the input, as a closure's.
        bn = self.iba.bottleneck
        explain = bn.explain
        bn.explain = lambda *a, **k: explain(*a, **{**k, "copies": "input"})
        try:
            return self.analyze_loss(x, ce, **kw)
        finally:
            del bn.explain

    def logits(self, x) -> np.ndarray:
        return to_np(self.model(x, training=False))

    def int_tensor(self, v: int):
        return self.tf.constant(v)

    def _up_to_layer(self, x):
        """The layer's features, channels-last, from running the shared layers eagerly."""
        h = self.tf.convert_to_tensor(x)
        for layer in self.layers:
            h = layer(h, training=False)
            if layer.name == self.layer:
                return h
        raise AssertionError(f"no layer {self.layer!r}")

    def features(self, x) -> np.ndarray:
        return np.moveaxis(to_np(self._up_to_layer(x)), -1, 1).astype(np.float64)

    def restricted(self, x, alpha_value: float, draws: int) -> np.ndarray:
        tf = self.tf
        alpha = tf.fill((1, *self.iba.estimator.shape), float(alpha_value))
        features = self._up_to_layer(np.repeat(x, draws, axis=0))
        with self.iba.restrict_flow(alpha):
            out = to_np(self.iba_layer(features))
        return np.moveaxis(out, -1, 1).astype(np.float64)

    def models(self) -> list:
        return [self.model] + ([] if self.how == "layer" else [self.iba.model])

    def snapshot(self) -> dict:
        snap = {}
        for model in self.models():
            layers = [model, *model.layers]
            snap[model.name] = {
                "weights": [w.copy() for w in model.get_weights()],
                "layer_flags": [(layer.name, layer.trainable) for layer in layers],
                "variable_flags": [(v.path, v.trainable) for v in model.variables],
            }
        return snap

    def check_unchanged(self, before: dict) -> None:
        after = self.snapshot()
        for name, b in before.items():
            a = after[name]
            assert a["layer_flags"] == b["layer_flags"], f"{name}: layer trainable flags"
            assert a["variable_flags"] == b["variable_flags"], f"{name}: variable flags"
            assert len(a["weights"]) == len(b["weights"])
            for i, (wa, wb) in enumerate(zip(a["weights"], b["weights"], strict=True)):
                np.testing.assert_array_equal(wa, wb, err_msg=f"{name}: weight {i} changed")
        for model in self.models():
            for layer in model.layers:
                assert "call" not in layer.__dict__, f"layer {layer.name!r} left patched"


def keras_layers():
    """8x8x3 -> conv1 -> bn -> relu1 -> conv2 (stride 2: 4x4x6) -> relu2 -> drop -> gap
    -> fc (5 logits): layer objects, shared by every model built from them."""
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    layers = [
        L.Conv2D(4, 3, padding="same", name="conv1"),
        L.BatchNormalization(name="bn"),
        L.ReLU(name="relu1"),
        L.Conv2D(6, 3, strides=2, padding="same", name="conv2"),
        L.ReLU(name="relu2"),
        L.Dropout(0.5, name="drop"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(N_CLASSES, name="fc"),
    ]
    keras_chain(layers)  # builds the weights
    bn = layers[1]
    # Non-trivial moving statistics: training and inference mode differ.
    bn.moving_mean.assign(np.linspace(-0.3, 0.3, 4))
    bn.moving_variance.assign(np.linspace(0.5, 1.5, 4))
    return layers


def keras_chain(layers, iba=None, after: str = "conv2"):
    """A Functional model running ``layers`` in a row, with ``iba`` after ``after``."""
    import keras

    inputs = keras.Input((8, 8, 3), name="image")
    x = inputs
    for layer in layers:
        x = layer(x)
        if iba is not None and layer.name == after:
            x = iba(x)
    return keras.Model(inputs, x, name="clf" if iba is None else "clf_with_iba")


class StrictFront:
    """The generic front on the array-api-strict test backend (float64, finite
    differences)."""

    framework = "strict"

    def __init__(self, kind: str, layer: str = "pool", model=None, **settings):
        import array_api_strict as xp

        from strict_backend import StrictModel

        self.xp = xp
        self.kind, self.layer = kind, layer
        self.uses = kind.split("+")[1]
        self.model = model if model is not None else StrictModel()
        self.settings = {**STRICT_FAST, **settings}
        self.iba = iba_core.IBA(self.model, layer, **self.settings)

    def fresh(self, **settings) -> StrictFront:
        return StrictFront(self.kind, self.layer, self.model, **{**self.settings, **settings})

    @property
    def config(self):
        return self.iba.config

    def inputs(self, n: int, seed: int, scale: float = 1.0, shift: float = 0.0):
        x = np.random.default_rng(seed).standard_normal((n, 3, 6, 6)) * scale + shift
        return self.xp.asarray(x)

    def estimate(self, data):
        # A NumPy array of inputs (the backend's own arrays: see
        # test_the_strict_front_estimates_from_the_backends_arrays).
        return self.iba.estimate(to_np(data), batch_size=16)

    def loss_ce(self, target):
        from iba_core.math import cross_entropy

        xp, model = self.xp, self.model

        def loss(batch):
            logits = model(batch)
            onehot = np.eye(N_CLASSES)[np.full(batch.shape[0], int(target))]
            return cross_entropy(logits, xp.asarray(onehot, dtype=logits.dtype))

        return loss

    def analyze(self, x, target=2, **kw):
        if self.uses == "closure":
            return self.iba.analyze(x, loss=self.loss_ce(target), **kw)
        return self.iba.analyze(x, target=target, **kw)

    def analyze_loss(self, x, loss, **kw):
        return self.iba.analyze(x, loss=loss, **kw)

    def broken_loss(self, how: str, target=2):
        ce = self.loss_ce(target)
        if how == "python-float":
            return lambda b: float(to_np(ce(b)))
        raise AssertionError("finite differences cannot see a detached or constant loss")

    def analyze_all_reference(self, x, probs, **kw):
        from iba_core.math import cross_entropy

        xp, model = self.xp, self.model

        def loss(batch):
            rows = np.repeat(probs, batch.shape[0] // probs.shape[0], axis=0)
            return cross_entropy(model(batch), xp.asarray(rows))

        return self.analyze_loss(x, loss, **kw)

    def logits(self, x) -> np.ndarray:
        return to_np(self.model(x))

    def int_tensor(self, v: int):
        return self.xp.asarray(v)

    def _capture(self, x) -> np.ndarray:
        seen = []

        def capture(features):
            seen.append(to_np(features))

        hooks = self.model.hooks[self.layer]
        hooks.append(capture)  # after any bottleneck hook: sees the replaced output
        try:
            self.model(x)
        finally:
            hooks.remove(capture)
        return seen[0]

    def features(self, x) -> np.ndarray:
        return self._capture(x).astype(np.float64)

    def restricted(self, x, alpha_value: float, draws: int) -> np.ndarray:
        xp = self.xp
        alpha = xp.full((1, *self.iba.estimator.shape), float(alpha_value), dtype=xp.float64)
        many = xp.asarray(np.repeat(to_np(x), draws, axis=0))
        with self.iba.restrict_flow(alpha):
            return self._capture(many).astype(np.float64)

    def snapshot(self) -> dict:
        m = self.model
        return {"weights": [to_np(w).copy() for w in (m.w_conv, m.b_conv, m.w_fc)]}

    def check_unchanged(self, before: dict) -> None:
        m = self.model
        for wa, wb in zip((m.w_conv, m.b_conv, m.w_fc), before["weights"], strict=True):
            np.testing.assert_array_equal(to_np(wa), wb)
        for name, hooks in m.hooks.items():
            assert not hooks, f"hook left on {name!r}"


@pytest.fixture
def make_front(request):
    """``make_front(kind, **options)``: a front of that kind on a new model."""

    def make(kind: str, **options):
        framework = kind.split("-", 1)[0]
        strict_layer = options.pop("strict_layer", None)
        if framework == "torch":
            return TorchFront(kind, **options)
        if framework == "tf":
            return KerasFront(kind, **options)
        request.getfixturevalue("strict_plugin")
        options.pop("train", None)
        # The strict model's counterparts: "pool" (few elements: cheap finite differences)
        # for conv2, "relu" (zero in part of the samples) where post-ReLU features matter.
        layer = options.pop("layer", "conv2")
        options["layer"] = strict_layer or {"conv2": "pool", "relu2": "relu"}.get(layer, layer)
        return StrictFront(kind, **options)

    return make


def estimation_sets(front):
    """Two estimation sets of the same size from different distributions."""
    return front.inputs(48, seed=100), front.inputs(48, seed=200, scale=2.0, shift=0.5)


# -- 1. the model is frozen while the engine works ------------------------------------------
TORCH_KINDS = [
    "torch-layer+closure",
    "torch-layer+target",
    "torch-named+target",
    "torch-generic+target",
    "torch-generic+closure",
]


@pytest.mark.torch
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_torch_model_in_train_mode_is_frozen_and_restored(kind, make_front):
    """BatchNorm statistics kept, dropout off, every flag restored, no hook left."""
    m = _models()
    f = make_front(kind, train=True)
    f.estimate(f.inputs(48, seed=100))
    before = f.snapshot()
    x = f.inputs(1, seed=1)
    first = f.analyze(x, target=2, seed=0)
    f.check_unchanged(before)  # running_mean/var, training flags, requires_grad, hooks
    # Dropout active would draw from the global RNG: the same seed would not repeat.
    np.testing.assert_allclose(f.analyze(x, target=2, seed=0), first, **EXACT)
    # The map is that of the same model in eval mode (BatchNorm on running statistics).
    twin = m.classifier(train=False)
    twin.load_state_dict(f.model.state_dict())
    g = TorchFront(kind, f.layer, twin, estimator=f.iba.estimator)
    np.testing.assert_allclose(g.analyze(x, target=2, seed=0), first, **EXACT)
    f.check_unchanged(before)


@pytest.mark.torch
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_torch_flags_and_hooks_restored_when_the_loss_raises(kind, make_front):
    """A closure raising midway (or the model raising, for target=): flags restored,
    no hook left, nothing global left, and the next analysis is unaffected."""
    f = make_front(kind, train=True, tripwire=True)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(1, seed=1)
    before = f.snapshot()
    if f.uses == "closure":
        calls = []
        ce = f.loss_ce(2)

        def loss(batch):
            value = ce(batch)  # the model ran (frozen) ...
            calls.append(1)
            if len(calls) == 2:  # ... and the second step fails
                raise RuntimeError("closure failed")
            return value

        with pytest.raises(RuntimeError, match="closure failed"):
            f.analyze_loss(x, loss, seed=0)
    else:
        # The clean pass, the check of the model cut after the layer and the first step
        # run, the second step raises (a failing first step is retried with the copies at
        # the input, by design).
        f.model.trip.arm(4)
        with pytest.raises(RuntimeError, match="tripwire"):
            f.analyze(x, target=2, seed=0)
    f.check_unchanged(before)
    again = f.analyze(x, target=2, seed=0)
    reference = f.fresh(estimator=f.iba.estimator).analyze(x, target=2, seed=0)
    np.testing.assert_allclose(again, reference, **EXACT)
    f.check_unchanged(before)


KERAS_FREEZE_KINDS = ["tf-layer+target", "tf-layer+closure", "tf-copy+target", "tf-copy+loss"]


@pytest.mark.tf
@pytest.mark.parametrize("kind", KERAS_FREEZE_KINDS)
def test_keras_model_is_frozen_and_restored(kind, make_front):
    """Moving statistics kept (also when a closure asks for training=True), dropout off,
    each layer's and variable's trainable flag restored, no layer left patched."""
    f = make_front(kind)
    tf = f.tf
    f.model.get_layer("fc").trainable = False  # mixed flags: each must come back as it was
    f.model.get_layer("conv1").bias.trainable = False
    f.estimate(f.inputs(48, seed=100))
    before = f.snapshot()
    x = f.inputs(1, seed=1)
    if f.uses == "closure":
        model = f.model

        def loss(batch):  # a training-mode call: frozen BatchNorm must still not update
            logits = model(batch, training=True)
            labels = tf.fill([tf.shape(logits)[0]], 2)
            return tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            )

        f.analyze_loss(x, loss, seed=0)
    else:
        first = f.analyze(x, target=2, seed=0)
        np.testing.assert_allclose(f.analyze(x, target=2, seed=0), first, **EXACT)
    f.check_unchanged(before)


@pytest.mark.tf
@pytest.mark.parametrize("kind", ["tf-layer+closure", "tf-copy+loss"])
def test_keras_flags_restored_when_the_loss_raises(kind, make_front):
    f = make_front(kind)
    f.model.get_layer("fc").trainable = False
    f.estimate(f.inputs(48, seed=100))
    before = f.snapshot()
    x = f.inputs(1, seed=1)
    calls = []
    ce = f.loss_ce(2)

    def loss(arg):
        value = ce(arg)  # the model ran (frozen) ...
        calls.append(1)
        if len(calls) == 2:  # ... and the second step fails
            raise RuntimeError("loss failed")
        return value

    with pytest.raises(RuntimeError, match="loss failed"):
        f.analyze_loss(x, loss, seed=0)
    f.check_unchanged(before)
    f.analyze(x, target=2, seed=0)  # works again
    f.check_unchanged(before)


# -- 2. per-call overrides are validated like the constructor ---------------------------------
OVERRIDE_KINDS = [
    "torch-layer+closure",
    "torch-layer+target",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "strict-generic+target",
]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=_bad_id)
@pytest.mark.parametrize("kind", [param(k) for k in OVERRIDE_KINDS])
def test_bad_override_is_refused_like_the_constructor(kind, bad, make_front):
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(1, seed=1)
    before = f.snapshot()
    ((name, _),) = bad.items()
    with pytest.raises(ValueError) as info:
        f.analyze(x, target=2, seed=0, **bad)
    assert name in str(info.value)
    assert str(info.value) == config_error(**bad)
    f.check_unchanged(before)
    assert f.config == iba_core.IBAConfig(**f.settings)  # the live settings are kept


# -- 3. statistics follow every new estimate -------------------------------------------------
STATS_KINDS = [
    "torch-layer+closure",
    "torch-layer+target",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "strict-generic+target",
]


@pytest.mark.parametrize("kind", [param(k) for k in STATS_KINDS])
def test_a_new_estimate_of_the_same_size_replaces_the_old(kind, make_front):
    f = make_front(kind)
    a, b = estimation_sets(f)
    x = f.inputs(1, seed=1)
    f.estimate(a)
    on_a = f.analyze(x, seed=0)
    f.estimate(b)
    on_b = f.analyze(x, seed=0)
    g = f.fresh()
    g.estimate(b)
    np.testing.assert_allclose(on_b, g.analyze(x, seed=0), **EXACT)
    assert not np.allclose(on_a, on_b, rtol=1e-2), "the two estimates give the same map"


@pytest.mark.parametrize("kind", [param(k) for k in STATS_KINDS])
def test_an_assigned_estimator_takes_effect(kind, make_front):
    f = make_front(kind)
    a, b = estimation_sets(f)
    x = f.inputs(1, seed=1)
    f.estimate(a)
    on_a = f.analyze(x, seed=0)
    g = f.fresh()
    g.estimate(b)
    on_b = g.analyze(x, seed=0)
    f.iba.estimator = g.iba.estimator
    np.testing.assert_allclose(f.analyze(x, seed=0), on_b, **EXACT)
    assert not np.allclose(on_a, on_b, rtol=1e-2)


@pytest.mark.parametrize("kind", [param(k) for k in STATS_KINDS])
def test_an_assigned_feature_mean_takes_effect(kind, make_front):
    f = make_front(kind)
    a, _ = estimation_sets(f)
    x = f.inputs(1, seed=1)
    f.estimate(a)
    on_a = f.analyze(x, seed=0)  # the statistics are now cached
    shifted = f.iba.estimator.mean() + 1.0  # channels-first, like the estimator
    f.iba.bottleneck.feature_mean = shifted
    after = f.analyze(x, seed=0)
    # The constructor takes the mean in the layer's own layout (channels-last in Keras).
    given = np.moveaxis(shifted, 0, -1) if f.framework == "tf" else shifted
    g = f.fresh(feature_mean=given)
    g.estimate(a)
    np.testing.assert_allclose(after, g.analyze(x, seed=0), **EXACT)
    assert not np.allclose(on_a, after, rtol=1e-2)


# -- 4. capacity() and restrict_flow() use the settings of the last map ----------------------
CAPACITY_KINDS = [
    "torch-layer+closure",
    "torch-layer+target",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "strict-generic+target",
]
# 0.5: elements active in about half the samples (the strict model's ReLU) or fewer (the
# conv nets' relu2) change from active to inactive.
CAPACITY_OVERRIDES = [{"min_std": 0.5}, {"active_neurons_threshold": 0.5}]


@pytest.mark.parametrize("override", CAPACITY_OVERRIDES, ids=_bad_id)
@pytest.mark.parametrize("kind", [param(k) for k in CAPACITY_KINDS])
def test_capacity_uses_the_settings_of_the_last_map(kind, override, make_front):
    f = make_front(kind, layer="relu2")  # post-ReLU: the activity threshold matters
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(1, seed=1)
    bits = f.analyze(x, seed=0, mode="capacity", **override)
    capacity = to_np(f.iba.capacity()).astype(np.float64)
    # The map of the same call is the channel-summed capacity in bits (float32 sums).
    np.testing.assert_allclose(capacity[0].sum(axis=0) / LN2, bits, rtol=1e-5, atol=1e-6)
    # Recomputed in float64 from the estimate, with the override and without it.
    est, cfg = f.iba.estimator, iba_core.IBAConfig(**f.settings)
    features = f.features(x)
    alpha = to_np(f.iba.bottleneck.alpha).astype(np.float64)

    def recomputed(min_std, threshold):
        std = np.maximum(est.std(), min_std)
        return to_np(
            capacity_fn()(
                features, alpha, est.mean(), std, active=est.active_mask(threshold), sigma=cfg.sigma
            )
        )

    settings = {"min_std": cfg.min_std, "threshold": cfg.active_neurons_threshold}
    constructors = recomputed(**settings)
    key = "threshold" if "active_neurons_threshold" in override else "min_std"
    expected = recomputed(**{**settings, key: next(iter(override.values()))})
    assert not np.allclose(expected, constructors, rtol=1e-3), "the override changes nothing"
    # float32 capacity vs. a float64 recomputation from the same features and mask.
    np.testing.assert_allclose(capacity, expected, rtol=1e-4, atol=1e-6)


RESTRICT_KINDS = [
    "torch-layer+target",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "strict-generic+target",
]


@pytest.mark.parametrize("kind", [param(k) for k in RESTRICT_KINDS])
def test_restrict_flow_uses_the_settings_of_the_last_map(kind, make_front):
    """A closed mask turns the features into pure noise mean + std * eps, with std
    clamped at min_std: the spread over draws shows which min_std is used."""
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(1, seed=1)
    est = f.iba.estimator
    assert est.std().max() < 10  # far below the override
    f.analyze(x, seed=0, min_std=50.0, optimization_steps=1)
    draws = f.restricted(x, -20.0, draws=256)  # sigmoid(-20) ~ 2e-9: signal closed
    spread = draws.std(axis=0)
    active = est.active_mask(0.01) > 0  # the default activity threshold
    # 256 draws: the sample std is within ~4.4% (one sigma) of 50; 20% is > 4 sigma.
    np.testing.assert_allclose(spread[active], 50.0, rtol=0.2)
    np.testing.assert_array_equal(spread[~active], 0.0)


# -- 5. the settings are live attributes ------------------------------------------------------
ATTRIBUTES = [
    ("beta", 1.0),
    ("optimization_steps", 1),
    ("sigma", None),
    ("lr", 0.3),
    ("batch_size", 2),
    ("min_std", 0.5),
    ("initial_alpha", 3.0),
    ("active_neurons_threshold", 0.3),
    ("relu", True),
    ("progbar", True),
]
BAD_ATTRIBUTES = [
    ("beta", -1),
    ("lr", 0),
    ("optimization_steps", 2.5),
    ("batch_size", 0),
    ("min_std", -1),
    ("active_neurons_threshold", 1.5),
    ("sigma", -1.0),
    ("initial_alpha", float("nan")),
    ("relu", "yes"),
    ("progbar", 2),
]
ATTRIBUTE_KINDS = [
    "torch-layer+target",
    "torch-layer+closure",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "strict-generic+target",
]


@pytest.mark.parametrize("kind", [param(k) for k in ATTRIBUTE_KINDS])
def test_assigned_attributes_act_like_constructor_arguments(kind, make_front):
    f = make_front(kind, layer="relu2", strict_layer="pool")
    f.estimate(f.inputs(48, seed=100))
    est = f.iba.estimator
    x = f.inputs(1, seed=1)
    default = f.analyze(x, seed=0)
    problems = []
    for name, value in ATTRIBUTES:
        if f.framework == "strict" and name == "batch_size":
            value = 1  # the strict front's default is 2
        assigned = f.fresh(estimator=est)
        setattr(assigned.iba, name, value)
        if getattr(assigned.iba, name) != value:
            problems.append(f"{name}: reads back {getattr(assigned.iba, name)!r}")
        built = f.fresh(estimator=est, **{name: value})
        got, want = assigned.analyze(x, seed=0), built.analyze(x, seed=0)
        if not np.array_equal(got, want):
            problems.append(
                f"{name}={value!r}: the assignment is ignored (max difference {np.abs(got - want).max():.3g})"
            )
        # The strict model's pooled features are positive and active in nearly every
        # sample: the activity threshold and the clamp at zero change nothing there.
        insensitive = f.framework == "strict" and name in ("active_neurons_threshold", "relu")
        if name != "progbar" and not insensitive and np.allclose(want, default, rtol=1e-3):
            problems.append(f"{name}={value!r} changes nothing even in the constructor")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("kind", [param(k) for k in ATTRIBUTE_KINDS])
def test_bad_attribute_values_are_refused_like_the_constructor(kind, make_front):
    f = make_front(kind)
    problems = []
    for name, value in BAD_ATTRIBUTES:
        old = getattr(f.iba, name, "<missing>")
        try:
            setattr(f.iba, name, value)
        except ValueError as exc:
            if str(exc) != config_error(**{name: value}):
                problems.append(f"{name}={value!r}: message {exc} differs from the constructor's")
        else:
            problems.append(f"{name}={value!r} accepted")
        now = getattr(f.iba, name, "<missing>")
        if now != old:
            problems.append(f"{name} became {now!r} after a refused assignment")
    assert not problems, "; ".join(problems)


# -- 6. targets ----------------------------------------------------------------------------
TARGET_KINDS = [
    "torch-layer+target",
    "torch-named+target",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "tf-innv+index",
    "strict-generic+target",
]
BAD_TARGETS = {
    "1.7": 1.7,
    "string": "3",
    "bool": True,
    "half": [0.5, 1],
    "out-of-range": 7,
    "count": [0, 1, 2],
}


@pytest.mark.parametrize("target", list(BAD_TARGETS), ids=list(BAD_TARGETS))
@pytest.mark.parametrize("kind", [param(k) for k in TARGET_KINDS])
def test_bad_targets_are_refused(kind, target, make_front):
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(2, seed=1)  # two inputs: [0.5, 1] has the right count, [0, 1, 2] not
    before = f.snapshot()
    with pytest.raises(ValueError, match="target"):
        f.analyze(x, target=BAD_TARGETS[target], seed=0)
    f.check_unchanged(before)


@pytest.mark.parametrize("kind", [param(k) for k in TARGET_KINDS])
def test_integral_targets_of_any_type_are_accepted(kind, make_front):
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(2, seed=1)
    reference = f.analyze(x, target=3, seed=0)
    assert not np.allclose(reference, f.analyze(x, target=0, seed=0), rtol=1e-3)
    for target in (3.0, np.int64(3), f.int_tensor(3), [3, 3], np.array([3.0, 3.0])):
        np.testing.assert_allclose(
            f.analyze(x, target=target, seed=0), reference, **EXACT, err_msg=f"target={target!r}"
        )


PREDICTED_KINDS = [
    "torch-layer+target",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "strict-generic+target",
]


@pytest.mark.parametrize("kind", [param(k) for k in PREDICTED_KINDS])
def test_predicted_is_the_argmax_class_and_all_gives_maps(kind, make_front):
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(2, seed=1)
    classes = f.logits(x).argmax(axis=1)
    predicted = f.analyze(x, target="predicted", seed=0)
    np.testing.assert_allclose(predicted, f.analyze(x, target=classes.tolist(), seed=0), **EXACT)
    others = ((classes + 1) % N_CLASSES).tolist()
    assert not np.allclose(predicted, f.analyze(x, target=others, seed=0), rtol=1e-3)
    maps = f.analyze(x, target="all", seed=0)
    size = (6, 6) if f.framework == "strict" else (8, 8)
    assert maps.shape == (2, *size)
    assert np.all(np.isfinite(maps)) and maps.min() >= 0
    total = to_np(f.iba.capacity()).astype(np.float64).sum(axis=tuple(range(1, 4))) / LN2
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), total, rtol=1e-4)


# -- 7. a loss without a gradient path is refused ----------------------------------------------
NO_PATH = [
    param(k, how)
    for k in ("torch-layer+closure", "torch-generic+closure", "tf-layer+closure", "tf-copy+loss")
    for how in ("detached", "python-float", "constant")
]
NO_PATH.append(param("strict-generic+closure", "python-float"))


@pytest.mark.parametrize("kind_how", NO_PATH)
def test_a_loss_without_gradient_path_is_refused(kind_how, make_front):
    kind, how = kind_how
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(1, seed=1)
    before = f.snapshot()
    with pytest.raises(ValueError, match="gradient path|scalar tensor"):
        f.analyze_loss(x, f.broken_loss(how), seed=0)
    f.check_unchanged(before)


# -- 8. target="all" -----------------------------------------------------------------------
ALL_KINDS = [
    "torch-layer+target",
    "torch-named+target",
    "torch-generic+target",
    "tf-layer+target",
    "tf-copy+target",
    "tf-innv+all",
    "strict-generic+target",
]


@pytest.mark.parametrize("kind", [param(k) for k in ALL_KINDS])
def test_all_is_the_cross_entropy_to_the_clean_distribution(kind, make_front):
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    x = f.inputs(2, seed=1)
    probs = softmax(f.logits(x))
    got = f.analyze(x, target="all", seed=0)
    want = f.analyze_all_reference(x, probs, seed=0)
    # Copies at the layer vs. at the input (and compiled vs. eager in TF): float32
    # round-off only (the strict backend computes in float64, well within it).
    np.testing.assert_allclose(got, want, **ROUNDOFF)
    if f.kind != "tf-innv+all":  # not the map of a single class: every class is kept
        single = f.analyze(x, target=int(probs[0].argmin()), seed=0)
        assert not np.allclose(got, single, rtol=1e-3)


# -- 9. model outputs that are not a tensor -----------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("how", ["named", "layer+model", "generic"])
@pytest.mark.parametrize("wrapper", ["object", "dict", "tuple"])
def test_outputs_with_logits_work_with_targets(wrapper, how):
    m = _models()
    from iba_torch import IBA

    inner = m.classifier()
    wrapped = m.WRAPPERS[wrapper](inner).eval()
    plain = IBA(inner, "conv2", **FAST)
    est = plain.estimate(inner, [m.images(16, seed=100 + i) for i in range(3)])
    x = m.images(2, seed=1)
    if how == "named":
        iba = IBA(wrapped, "inner.conv2", estimator=est, **FAST)
        run = lambda **kw: iba.analyze(x, **kw)
    elif how == "layer+model":
        iba = IBA(inner.conv2, estimator=est, **FAST)
        run = lambda **kw: iba.analyze(x, model=wrapped, **kw)
    else:
        iba = iba_core.IBA(wrapped, "inner.conv2", estimator=est, **FAST)
        run = lambda **kw: iba.analyze(x, **kw)
    for target in (2, [1, 4], "predicted"):
        np.testing.assert_allclose(
            run(target=target, seed=0),
            plain.analyze(x, target=target, seed=0),
            **EXACT,
            err_msg=f"target={target!r}",
        )


# -- 10. threads ---------------------------------------------------------------------------
def _in_two_threads(work) -> list:
    """Run ``work(i)`` for i = 0, 1 in two threads started together; re-raise errors."""
    errors, results = [], [None, None]
    barrier = threading.Barrier(2)

    def run(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"explainer-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    if errors:
        raise errors[0]
    return results


THREAD_KINDS = [
    "torch-named+target",
    "torch-layer+target",
    "torch-layer+closure",
    "torch-generic+target",
    "tf-copy+target",
]


@pytest.mark.parametrize("kind", [param(k) for k in THREAD_KINDS])
def test_two_threads_get_the_single_threaded_maps(kind, make_front):
    # PyTorch: a model in train mode, with a short sleep in each forward pass so the
    # threads interleave within each analysis (Keras' compiled step leaves no such gap).
    options = {"train": True, "pause": True} if kind.startswith("torch") else {}
    f = make_front(kind, **options)
    f.estimate(f.inputs(48, seed=100))
    xs, targets = [f.inputs(1, seed=11), f.inputs(1, seed=12)], [1, 3]
    alone = {(i, s): f.analyze(xs[i], target=targets[i], seed=s) for i in (0, 1) for s in (0, 1)}
    before = f.snapshot()

    first_inside, second_started = threading.Event(), threading.Event()
    second_first_done = threading.Event()
    if f.framework == "torch":
        # Thread 0's first analysis waits inside the model until thread 1 has started its
        # own and had time to reach the model's lock, and thread 0 goes on only when
        # thread 1's first analysis is over: the first calls overlap for sure, and what
        # thread 0's call leaves behind is what thread 1's sees.
        def gate():
            if threading.current_thread().name == "explainer-0" and not first_inside.is_set():
                first_inside.set()
                second_started.wait(10)
                time.sleep(0.05)
            else:
                time.sleep(0.002)

        f.model.pause.gate = gate
    else:
        first_inside.set()

    def work(i):
        def call(k):
            return k % 2, f.analyze(xs[i], target=targets[i], seed=k % 2)

        if i == 0:
            maps = [call(0)]
            second_first_done.wait(30)
        else:
            first_inside.wait(10)
            second_started.set()
            try:
                maps = [call(0)]
            finally:
                second_first_done.set()
        return maps + [call(k) for k in range(1, 12)]

    for i, maps in enumerate(_in_two_threads(work)):
        for seed, got in maps:
            np.testing.assert_allclose(got, alone[(i, seed)], **EXACT)
    f.check_unchanged(before)


# -- 11. a plugin backend gets the whole workflow -------------------------------------------
def test_the_strict_backend_gets_the_whole_workflow(strict_plugin):
    import array_api_strict as xp

    from strict_backend import StrictModel

    model = StrictModel()
    iba = iba_core.IBA(model, "pool", **STRICT_FAST)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((40, 3, 6, 6))  # a NumPy array of inputs
    with pytest.warns(FewSamplesWarning):
        est = iba.estimate(data, batch_size=16)
    assert est.n == 40 and est.shape == (6, 3, 3)
    x = xp.asarray(rng.standard_normal((1, 3, 6, 6)))
    closure = StrictFront("strict-generic+closure", model=model).loss_ce(1)
    for how, kwargs in (
        ("target", {"target": 1}),
        ("predicted", {"target": "predicted"}),
        ("closure", {"loss": closure}),
    ):
        smap = iba.analyze(x, seed=0, **kwargs)
        assert smap.shape == (6, 6), how
        assert smap.min() >= 0, how
        cap = to_np(iba.capacity())
        assert cap.shape == (1, 6, 3, 3), how
        # float64 throughout: the map totals the capacity in bits to round-off.
        np.testing.assert_allclose(smap.sum(), cap.sum() / LN2, rtol=1e-9, err_msg=how)
    x2 = xp.asarray(rng.standard_normal((2, 3, 6, 6)))
    assert iba.analyze(x2, target=[0, 4], seed=0).shape == (2, 6, 6)
    clean = to_np(model(x2))
    with iba.restrict_flow():  # the last mask: that of x2
        noisy = to_np(model(x2))
    assert noisy.shape == clean.shape and not np.allclose(noisy, clean)
    np.testing.assert_array_equal(to_np(model(x2)), clean)
    assert all(not hooks for hooks in model.hooks.values())


def test_the_strict_front_estimates_from_the_backends_arrays(strict_plugin):
    """An array of inputs in the backend's own type is cut into batches the Array API
    way (``x[a:b, ...]``) and estimates what the same NumPy array does."""
    import array_api_strict as xp

    from strict_backend import StrictModel

    data = np.random.default_rng(0).standard_normal((40, 3, 6, 6))
    from_numpy = iba_core.IBA(StrictModel(), "pool").estimate(data, batch_size=16)
    own = iba_core.IBA(StrictModel(), "pool").estimate(xp.asarray(data), batch_size=16)
    assert own.n == from_numpy.n == 40
    # The NumPy array is cast to float32 on the way in, the strict array is not.
    np.testing.assert_allclose(own.mean(), from_numpy.mean(), rtol=1e-5, atol=1e-6)


# -- 12. the layout is declared per layer -----------------------------------------------------
@pytest.mark.torch
def test_a_channels_last_layer_gives_the_channels_first_map():
    m = _models()
    from iba_torch import IBA

    model = m.classifier()
    twin = m.channels_last_twin(model)
    data = m.images(48, seed=100)
    x = m.images(1, seed=1)
    with pytest.raises(ValueError, match="layout"):
        iba_core.IBA(twin, "to_nhwc", layout="nchw")
    with pytest.raises(ValueError, match="layout"):
        IBA(twin.to_nhwc, layout="nchw")
    first = iba_core.IBA(model, "conv2", **FAST)
    first.estimate(data, batch_size=16)
    want = first.analyze(x, target=2, seed=0)
    last = iba_core.IBA(twin, "to_nhwc", layout="channels_last", **FAST)
    last.estimate(data, batch_size=16)
    assert last.estimator.shape == first.estimator.shape == (6, 4, 4)  # stored channels-first
    # float64 statistics of the same float32 features in another memory order.
    np.testing.assert_allclose(last.estimator.mean(), first.estimator.mean(), rtol=1e-12)
    np.testing.assert_allclose(last.analyze(x, target=2, seed=0), want, **ROUNDOFF)
    front = IBA(twin.to_nhwc, layout="channels_last", estimator=last.estimator, **FAST)
    np.testing.assert_allclose(front.analyze(x, target=2, model=twin, seed=0), want, **ROUNDOFF)


# -- 13. saved estimates record their layer ---------------------------------------------------
LAYER_RECORD_KINDS = ["torch-named+target", "torch-generic+target", "tf-copy+target", "strict-generic+target"]


@pytest.mark.parametrize("kind", [param(k) for k in LAYER_RECORD_KINDS])
def test_saved_estimates_record_their_layer(kind, make_front, tmp_path):
    f = make_front(kind)
    f.estimate(f.inputs(48, seed=100))
    path = tmp_path / "estimate.npz"
    f.iba.estimator.save(path)
    with np.load(path) as saved:
        assert "layer" in saved.files, "the saved estimate does not name its layer"
        assert str(saved["layer"]) == f.layer
    with pytest.raises(ValueError, match="layer"):
        Estimator.load(path, expected_layer="other")
    loaded = Estimator.load(path, expected_layer=f.layer)
    np.testing.assert_array_equal(loaded.mean(), f.iba.estimator.mean())
    # Estimates of two layers with the same feature shape cannot be merged.
    one, two = {"torch": ("conv2", "relu2"), "tf": ("conv2", "relu2"), "strict": ("conv", "relu")}[
        f.framework
    ]
    estimates = []
    for layer in (one, two):
        g = make_front(kind, layer=layer)
        g.estimate(g.inputs(48, seed=100))
        estimates.append(g.iba.estimator)
    assert estimates[0].shape == estimates[1].shape
    with pytest.raises(ValueError, match="layer"):
        estimates[0].merge(estimates[1])


# -- 11. a loss function of the user's ----------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("form", ["loss", "output_loss"])
def test_a_loss_function_gets_all_inputs_copies_in_one_pass(form):
    """On a CPU ``target=`` explanations go in passes (3 inputs of 3 copies here); a loss
    function holds its own targets for every copy, so it sees all of them at once, through
    the generic front too, and explains as ``target=`` does."""
    import torch

    m = _models()
    model = m.classifier()
    iba = iba_core.IBA(model, "conv2", **FAST)
    iba.estimate([m.images(16, seed=100 + i) for i in range(3)])
    x, targets = m.images(5, seed=1), [0, 1, 2, 3, 4]
    rows = torch.tensor(targets).repeat_interleave(FAST["batch_size"])
    seen = []

    def of_outputs(logits):
        seen.append(int(logits.shape[0]))
        return torch.nn.functional.cross_entropy(logits, rows)

    if form == "loss":
        maps = iba.analyze(x, loss=lambda batch: of_outputs(model(batch)), seed=0)
    else:
        maps = iba.analyze(x, output_loss=of_outputs, seed=0)
    assert set(seen) == {5 * FAST["batch_size"]}  # every step on all 15 copies
    np.testing.assert_allclose(maps, iba.analyze(x, target=targets, seed=0), **ROUNDOFF)
