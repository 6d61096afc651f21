"""Reliability of every front (issue 14): 16-bit models, Keras' mixed precision,
``restrict_flow`` read at run time by Keras' traced functions, multi-input models, layer
names through PyTorch wrappers, layers without a spatial axis, layers run twice, and
non-finite inputs.  Every refusal is checked for its type, for naming the fix, and for
leaving the user's model exactly as it was."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import iba_core  # noqa: E402
from iba_tf import IBACopy, IBALayer  # noqa: E402
from iba_torch import IBA  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")


# -- what "the model is left intact" means ----------------------------------------------
def torch_state(model: torch.nn.Module) -> dict:
    """Everything a refused call must leave as it was: weights and buffers (bitwise),
    training flags, ``requires_grad``, gradients and the hook counts of every module."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def assert_torch_intact(model: torch.nn.Module, before: dict) -> None:
    after = torch_state(model)
    assert after["dtypes"] == before["dtypes"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    for key in ("training", "requires_grad", "hooks"):
        assert after[key] == before[key], key
    for g0, g1 in zip(before["grad"], after["grad"], strict=True):
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1))


def keras_state(model: keras.Model, x: np.ndarray) -> dict:
    layers = [model, *model._flatten_layers(include_self=False)]
    return {
        "weights": [w.copy() for w in model.get_weights()],
        "trainable": [layer.trainable for layer in layers],
        "own_call": ["call" in layer.__dict__ for layer in layers],
        "output": np.asarray(model(x, training=False)),
    }


def assert_keras_intact(model: keras.Model, x: np.ndarray, before: dict) -> None:
    after = keras_state(model, x)
    assert len(after["weights"]) == len(before["weights"])
    for w0, w1 in zip(before["weights"], after["weights"], strict=True):
        assert np.array_equal(w0, w1)
    assert after["trainable"] == before["trainable"]
    assert not any(after["own_call"])
    assert np.array_equal(after["output"], before["output"])


# -- models -------------------------------------------------------------------------------
class TorchNet(torch.nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global average -> 4 logits; ``twice`` runs conv2
    two times per forward pass."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.twice = twice
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.flat = torch.nn.Flatten()
        self.fc = torch.nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        if self.twice:
            h = torch.relu(self.conv2(h))
        return self.fc(self.flat(h))


def torch_images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype("float32"))


def keras_net(name: str = "net", seed: int = 0, with_iba: bool = False, twice: bool = False):
    """conv -> [IBALayer] -> conv -> flatten -> 4 logits (float32 logits)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    iba = IBALayer(name="iba") if with_iba else None
    if iba is not None:
        h = iba(h)
        if twice:
            h = iba(h)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    out = keras.layers.Dense(4, name="fc", dtype="float32")(h)
    return keras.Model(inputs, out, name=name), iba


def keras_images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 3)).astype("float32")


@contextlib.contextmanager
def global_policy(name: str):
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(saved)


# -- 1. 16-bit PyTorch models ----------------------------------------------------------------
def _torch_maps(model: torch.nn.Module, dtype: torch.dtype, loss: bool = False) -> np.ndarray:
    x = torch_images(32).to(dtype)
    iba = IBA(model, "conv2")
    iba.estimate(model, [x], progbar=False)
    if loss:
        labels = torch.tensor([0] * 10 + [1] * 10)

        def loss_fn(batch: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(batch), labels)

        return iba.analyze(x[:2], loss_fn, seed=0, noise="numpy")
    maps = iba.analyze(x[:2], target=[0, 1], seed=0, noise="numpy")
    with iba.restrict_flow():
        out = model(x[:2])
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    return maps


# Features of a 16-bit model are the float32 model's rounded to 8 (bfloat16) or 11
# (float16) significant bits (relative 2**-8, 2**-11 per operation, a few operations
# deep); the optimisation in float32 follows them smoothly, so the maps agree with the
# float32 model's to a few per cent (bfloat16) or a fraction of a per cent (float16) of
# their largest value.
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("loss", [False, True], ids=["target", "loss_fn"])
def test_torch_16_bit_models(dtype: torch.dtype, tol: float, loss: bool) -> None:
    reference = _torch_maps(TorchNet(), torch.float32, loss)
    model = TorchNet().to(dtype)
    before = torch_state(model)
    maps = _torch_maps(model, dtype, loss)
    assert maps.dtype == np.float32 and maps.shape == reference.shape == (2, 8, 8)
    assert np.all(np.isfinite(maps)) and np.all(maps >= 0)
    np.testing.assert_allclose(maps, reference, atol=tol * reference.max(), rtol=0)
    assert_torch_intact(model, before)


# -- 2. Keras mixed precision ----------------------------------------------------------------
# mixed_float16 computes in float16 (11 significant bits): maps agree with the float32
# model's to about a per cent of their largest value.
def test_keras_mixed_float16_ibalayer_and_ibacopy() -> None:
    x = keras_images(32)
    model32, iba32 = keras_net(with_iba=True)
    iba32.estimate(model32, x, progbar=False)
    reference = iba32.analyze(x[:2], model=model32, target=[0, 1], seed=0, noise="numpy")
    with global_policy("mixed_float16"):
        model, iba = keras_net(with_iba=True)
        assert iba.compute_dtype == "float16"
        iba.estimate(model, x, progbar=False)
        maps = iba.analyze(x[:2], model=model, target=[0, 1], seed=0, noise="numpy")
        clean = model.predict(x[:2], verbose=0)
        with iba.restrict_flow():
            noisy = model(x[:2])
        plain, _ = keras_net()
        before = keras_state(plain, x[:2])
        copied = IBACopy(plain, "conv1")
        copied.estimate(x, progbar=False)
        copy_maps = copied.analyze(x[:2], target=[0, 1], seed=0, noise="numpy")
        assert_keras_intact(plain, x[:2], before)
    for m in (maps, copy_maps):
        assert np.all(np.isfinite(m)) and np.all(m >= 0) and m.shape == (2, 8, 8)
        np.testing.assert_allclose(m, reference, atol=0.01 * reference.max(), rtol=0)
    assert np.all(np.isfinite(noisy)) and not np.allclose(noisy, clean)


# -- 3. Keras restrict_flow is read at run time ------------------------------------------------
@pytest.fixture(scope="module")
def keras_explained():
    model, iba = keras_net(with_iba=True)
    x = keras_images(32)
    iba.estimate(model, x, progbar=False)
    iba.analyze(x[:2], model=model, target=[0, 1], seed=0)
    return model, iba, x[:2]


def test_keras_predict_first_traced_inside_is_clean_after(keras_explained) -> None:
    _model, iba, x = keras_explained
    fresh, fresh_iba = keras_net(with_iba=True)
    fresh_iba.estimator, fresh_iba.bottleneck.alpha = iba.estimator, iba.bottleneck.alpha
    fresh_iba.bottleneck.last_config = iba.bottleneck.last_config
    clean = np.asarray(fresh(x, training=False))
    with fresh_iba.restrict_flow():
        first = fresh.predict(x, verbose=0)  # Keras traces predict here
        second = fresh.predict(x, verbose=0)
    assert not np.allclose(first, clean) and not np.allclose(first, second)
    assert np.array_equal(fresh.predict(x, verbose=0), clean)


def test_keras_functions_traced_outside_are_noisy_inside(keras_explained) -> None:
    model, iba, x = keras_explained
    y = np.array([0, 1])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    user_fn = tf.function(lambda t: model(t, training=False))

    def run_all() -> dict:
        return {
            "predict": model.predict(x, verbose=0),
            "evaluate": model.evaluate(x, y, verbose=0),
            "fit": model.fit(x, y, epochs=1, batch_size=2, verbose=0).history["loss"][0],
            "tf.function": np.asarray(user_fn(tf.constant(x))),
        }

    clean = run_all()  # every function traced while clean
    weights = [w.copy() for w in model.get_weights()]
    with iba.restrict_flow():
        noisy = run_all()
    for kind in clean:
        assert not np.allclose(noisy[kind], clean[kind]), kind
    again = run_all()
    for kind in clean:  # outside the block: bit-identical to before
        assert np.array_equal(again[kind], clean[kind]), kind
    # An explanation after predict was traced leaves that function clean.
    iba.analyze(x, model=model, target=[1, 0], seed=1, optimization_steps=2)
    assert np.array_equal(model.predict(x, verbose=0), clean["predict"])
    for w0, w1 in zip(weights, model.get_weights(), strict=True):
        assert np.array_equal(w0, w1)


def test_keras_restrict_flow_batch_mismatch_is_named(keras_explained) -> None:
    model, iba, x = keras_explained
    with iba.restrict_flow(), pytest.raises(tf.errors.InvalidArgumentError, match="mask holds"):
        model(np.concatenate([x, x, x]))


# -- 4. multi-input models ---------------------------------------------------------------------
class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv(a) + (0 if b is None else self.conv(b))
        return self.fc(h.mean((2, 3)))


def test_torch_multi_input_refused() -> None:
    model = TwoInputs()
    a, b = torch_images(4), torch_images(4, seed=2)
    before = torch_state(model)
    iba = IBA(model, "conv")
    generic = iba_core.IBA(model, "conv")
    calls = [
        lambda: iba.estimate(model, [((a, b), torch.zeros(4))]),
        lambda: iba.estimate(model, [{"a": a, "b": b}]),
        lambda: iba.analyze([a, b], target=0),
        lambda: generic.estimate({"a": a, "b": b}),
        lambda: generic.analyze([a, b], target=0),
        lambda: generic.analyze({"a": a, "b": b}, target=0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="multi-input models are not supported yet.*Wrap"):
            call()
    assert_torch_intact(model, before)


def test_keras_multi_input_refused() -> None:
    keras.utils.set_random_seed(0)
    ia, ib_ = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")
    h = keras.layers.Add()([conv(ia), keras.layers.Conv2D(4, 1, name="side")(ib_)])
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model([ia, ib_], out)
    a, b = keras_images(4), keras_images(4, seed=2)
    before = keras_state(model, [a, b])
    copied = IBACopy(model, "conv")
    generic = iba_core.IBA(model, "conv")
    calls = [
        lambda: copied.estimate([a, b]),
        lambda: copied.estimate(tf.data.Dataset.from_tensor_slices(((a, b), np.zeros(4))).batch(2)),
        lambda: copied.analyze([a, b], target=0),
        lambda: copied.analyze(a, target=0),  # one array for a model of two inputs
        lambda: generic.analyze({"a": a, "b": b}, target=0),
        lambda: generic.estimate(tf.data.Dataset.from_tensor_slices({"a": a, "b": b}).batch(2)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="multi-input models are not supported yet.*Wrap"):
            call()
    after = keras_state(model, [a, b])
    assert not any(after["own_call"]) and after["trainable"] == before["trainable"]
    assert np.array_equal(after["output"], before["output"])


# -- 5. layer names through PyTorch wrappers ----------------------------------------------------
def test_torch_layer_names_through_data_parallel() -> None:
    model = TorchNet()
    wrapped = torch.nn.DataParallel(model)  # runs the module itself without GPUs
    before = torch_state(wrapped)
    iba = IBA(wrapped, "conv2")
    assert iba.engine.layer is model.conv2 and iba.engine.layer_name == "conv2"
    assert IBA(wrapped, "module.conv2").engine.layer is model.conv2
    x = torch_images(16)
    estimator = iba.estimate(wrapped, [x], progbar=False)
    assert estimator.layer == "conv2"  # the same estimate serves the unwrapped model
    maps = iba.analyze(x[:1], target=0, seed=0)
    direct = IBA(model, "conv2", estimator=estimator).analyze(x[:1], target=0, seed=0)
    np.testing.assert_array_equal(maps, direct)
    with pytest.raises(LookupError) as info:
        IBA(wrapped, "conv3")
    message = str(info.value)
    assert "'conv2'" in message and "module.conv2" not in message and "DataParallel" in message
    assert_torch_intact(wrapped, before)


def test_torch_layer_names_through_compile_wrapper() -> None:
    # torch.compile's OptimizedModule keeps the model as _orig_mod; building a real one
    # costs seconds, and the names need only named_modules: a stand-in of that class name.
    class OptimizedModule(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._orig_mod(x)

    model = TorchNet()
    wrapped = OptimizedModule(model)
    assert IBA(wrapped, "conv1").engine.layer is model.conv1
    assert IBA(wrapped, "_orig_mod.conv1").engine.layer is model.conv1
    many = OptimizedModule(torch.nn.Sequential(*[torch.nn.ReLU() for _ in range(60)]))
    with pytest.raises(LookupError) as info:
        IBA(many, "41x")
    message = str(info.value)
    assert "60 layers" in message and "'41'" in message and "_orig_mod" in message
    assert len(message) < 400  # the closest names, not all sixty


# -- 6. layers without a spatial or sequence axis ------------------------------------------------
def test_saliency_of_vector_features_refused_every_front() -> None:
    torch_model = TorchNet()
    x = torch_images(16)
    before = torch_state(torch_model)
    torch_iba = IBA(torch_model, "flat")
    torch_iba.estimate(torch_model, [x], progbar=False)
    generic = iba_core.IBA(torch_model, "fc")
    generic.estimate(x)
    kx = keras_images(16)
    kmodel, _ = keras_net()
    kbefore = keras_state(kmodel, kx[:2])
    copied = IBACopy(kmodel, "flat")
    copied.estimate(kx, progbar=False)
    for analyze in (
        lambda **kw: torch_iba.analyze(x[:2], target=[0, 1], **kw),
        lambda **kw: generic.analyze(x[:2], target=[0, 1], **kw),
        lambda **kw: copied.analyze(kx[:2], target=[0, 1], **kw),
    ):
        with pytest.raises(ValueError, match="no spatial or sequence axis.*mode='capacity'"):
            analyze()
        capacity = analyze(mode="capacity", optimization_steps=2)
        assert capacity.ndim == 2 and np.all(np.isfinite(capacity))
    assert_torch_intact(torch_model, before)
    assert_keras_intact(kmodel, kx[:2], kbefore)


# -- 7. a layer the model runs twice -------------------------------------------------------------
def test_torch_layer_run_twice_refused() -> None:
    model = TorchNet(twice=True)
    x = torch_images(16)
    for iba in (IBA(model, "conv2"), IBA(model.conv2)):
        iba.estimate(model, [x], progbar=False)
        before = torch_state(model)
        with pytest.raises(RuntimeError, match="more than once in one forward pass.*exactly once"):
            iba.analyze(x[:1], lambda b: model(b).logsumexp(1).mean(), optimization_steps=1)
        assert_torch_intact(model, before)
        iba.bottleneck.alpha = torch.zeros(1, 8, 8, 8)
        with pytest.raises(RuntimeError, match="more than once in one forward pass.*exactly once"):
            with iba.restrict_flow():
                model(x[:1])
        assert_torch_intact(model, before)
    once = TorchNet()
    for iba in (IBA(once, "conv2"), IBA(once.conv2)):
        iba.estimate(once, [x], progbar=False)
        iba.analyze(x[:1], target=0, optimization_steps=1, model=once)
        with iba.restrict_flow():  # many passes, each running the layer once
            outs = [once(x[:1]) for _ in range(3)]
        assert not torch.equal(outs[0], outs[1])


def test_keras_layer_run_twice_refused() -> None:
    model, iba = keras_net(with_iba=True, twice=True)
    x = keras_images(16)
    iba.estimate(model, x, progbar=False)
    before = keras_state(model, x[:1])
    with pytest.raises(RuntimeError, match="ran 2 times in one forward pass.*exactly once"):
        iba.analyze(x[:1], model=model, target=0, optimization_steps=1)
    iba.bottleneck.alpha = tf.zeros((1, 6, 8, 8))
    with pytest.raises(RuntimeError, match="called 2 times.*one IBALayer per place"):
        with iba.restrict_flow():
            pass
    assert_keras_intact(model, x[:1], before)


# -- 8. non-finite inputs ------------------------------------------------------------------------
def test_nan_inputs_named_every_front() -> None:
    model = TorchNet()
    x = torch_images(16)
    iba = IBA(model, "conv2")
    iba.estimate(model, [x], progbar=False)
    bad = x[:1].clone()
    bad[0, 0, 0, 0] = float("nan")
    before = torch_state(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        iba.analyze(bad, target=0)
    assert_torch_intact(model, before)

    kx = keras_images(16)
    kbad = kx[:1].copy()
    kbad[0, 0, 0, 0] = np.inf
    kmodel, kiba = keras_net(with_iba=True)
    kiba.estimate(kmodel, kx, progbar=False)
    plain, _ = keras_net()
    kbefore = keras_state(plain, kx[:1])
    copied = IBACopy(plain, "conv1")
    copied.estimate(kx, progbar=False)
    for analyze in (
        lambda: kiba.analyze(kbad, model=kmodel, target=0),
        lambda: copied.analyze(kbad, target=0),
    ):
        with pytest.raises(ValueError, match="NaN or inf"):
            analyze()
    assert_keras_intact(plain, kx[:1], kbefore)
    assert "call" not in kiba.__dict__ and not any("call" in layer.__dict__ for layer in kmodel.layers)


def test_refusals_leave_a_deep_copy_equal() -> None:
    """A refused call changes nothing a deep copy would see (a summary of the above)."""
    model = TorchNet(twice=True)
    twin = copy.deepcopy(model)
    iba = IBA(model, "flat")
    iba.estimate(model, [torch_images(8)], progbar=False)
    with pytest.raises(ValueError):
        iba.analyze(torch_images(1), target=0)
    for p, q in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_generic_front_restrict_flow_counts_passes_of_a_keras_model() -> None:
    """The engine hooks the model's own input to know where passes begin: a Keras model
    called on NumPy still runs, and is clean and unpatched after the block."""
    model, _ = keras_net()
    x = keras_images(16)
    iba = iba_core.IBA(model, "conv1")
    iba.estimate(x)
    iba.analyze(x[:2], target=[0, 1], optimization_steps=2)
    before = keras_state(model, x[:2])
    with iba.restrict_flow():
        noisy = [np.asarray(model(x[:2])) for _ in range(2)]  # one pass each: allowed
    assert not np.allclose(noisy[0], before["output"]) and not np.allclose(*noisy)
    assert_keras_intact(model, x[:2], before)


def test_torch_layer_names_through_a_real_compile_wrapper() -> None:
    # Building the wrapper imports torch's compiler (a few seconds); it is never run here.
    model = TorchNet()
    wrapped = torch.compile(model)
    assert IBA(wrapped, "conv1").engine.layer is model.conv1
    with pytest.raises(LookupError, match=r"'conv9' not found.*conv1"):
        IBA(wrapped, "conv9")


def test_torch_iba_module_inserted_twice_is_refused_by_restrict_flow() -> None:
    iba = IBA()

    class Net(torch.nn.Module):
        def __init__(self, twice: bool) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.iba, self.fc, self.twice = iba, torch.nn.Linear(4, 2), twice

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.iba(torch.relu(self.conv(x)))
            if self.twice:
                h = self.iba(h)
            return self.fc(h.mean(dim=(2, 3)))

    once, twice = Net(False), Net(True)
    twice.load_state_dict(once.state_dict())
    x = torch_images(16)
    with pytest.warns(iba_core.FewSamplesWarning):
        iba.estimate(once, [x])
    iba.analyze(x[:1], target=1, model=once, optimization_steps=1)
    with iba.restrict_flow():  # many passes of a model that calls it once: fine
        once(x[:1])
        once(x[:1])
    before = torch_state(twice)
    with pytest.raises(RuntimeError, match="more than once in one forward pass"), iba.restrict_flow():
        twice(x[:1])
    assert_torch_intact(twice, before)


def test_nan_inputs_named_by_both_readout_fronts() -> None:
    # The readout's one-pass analyze goes through the same input check as the per-sample
    # fronts: the error comes before any pass (and before "not trained yet").
    from iba_tf import IBAReadout as KerasReadout
    from iba_torch import IBAReadout as TorchReadout

    model = TorchNet()
    x = torch_images(16)
    readout = TorchReadout("conv1", ["conv2", "fc"], model)
    with pytest.warns(iba_core.FewSamplesWarning):
        readout.estimate(model, [x])
    bad = x[:1].clone()
    bad[0, 1, 2, 3] = float("inf")
    before = torch_state(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        readout.analyze(bad)
    assert_torch_intact(model, before)

    kmodel, _ = keras_net()
    kx = keras_images(16)
    kreadout = KerasReadout("conv1", ["conv2", "fc"], kmodel)
    with pytest.warns(iba_core.FewSamplesWarning):
        kreadout.estimate(kx)
    kbad = kx[:1].copy()
    kbad[0, 0, 0, 0] = np.nan
    kbefore = keras_state(kmodel, kx[:1])
    with pytest.raises(ValueError, match="NaN or inf"):
        kreadout.analyze(kbad)
    assert_keras_intact(kmodel, kx[:1], kbefore)
