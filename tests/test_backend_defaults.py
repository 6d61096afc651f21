"""The pieces of the backend contract that a backend gets written once in the core:
functional-key draws, layers by name, hook lists, flags set and restored, and the
factory-import check of plugins' ``claims``."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from iba_core import Backend, FewSamplesWarning
from iba_core.apps.loading import factory_imports
from iba_core.contract import HookList, assigned
from iba_core.engines import ReadoutBottleneck
from iba_core.testing._readout_suite import blob_images, readout_reference_weights


# -- functional keys -------------------------------------------------------------------
class _Minimal(Backend):
    """The abstract methods only, enough to ask the defaults."""

    name = "minimal"

    def namespace(self) -> Any:
        return np

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, like: Any = None) -> Any:
        return np.asarray(a, dtype=None if like is None else like.dtype)

    def value_and_grad(self, fn: Any, param: Any, *operands: Any) -> tuple[float, Any]:
        raise NotImplementedError

    def attach(self, model: Any, layer: Any, hook: Any, *, on_input: bool = False) -> Any:
        raise NotImplementedError

    def call(self, model: Any, x: Any) -> Any:
        return model(x)


class _IntegerKeys:
    """Functional keys that are integers: a draw with key k is NumPy's with seed k, and the
    next key is k + 1.  Records the keys drawn with."""

    functional_keys = True
    standard_normal = Backend.standard_normal  # the contract's default, over a framework's

    def __init__(self) -> None:
        self.keys: list[int] = []

    def make_generator(self, seed: int, like: Any) -> Any:
        return int(seed)

    def draw_keyed(self, shape: tuple[int, ...], like: Any, key: Any) -> tuple[Any, Any]:
        self.keys.append(key)
        sample = np.random.default_rng(key).standard_normal(shape)
        return self.from_numpy(sample, like=like), key + 1  # type: ignore[attr-defined]


class _Keyed(_IntegerKeys, _Minimal):
    pass


def test_functional_keys_draw_through_draw_keyed_and_pass_the_key_on() -> None:
    backend, like = _Keyed(), np.zeros(1, np.float32)
    sample, key = backend.draw((3, 4), like, 7)
    np.testing.assert_array_equal(sample, np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32))
    assert key == 8 and sample.dtype == np.float32
    # standard_normal is the draw's sample: the same key, the same numbers.
    np.testing.assert_array_equal(backend.standard_normal((3, 4), like, 7), sample)


def test_functional_keys_without_a_generator_draw_from_a_fresh_key() -> None:
    backend, like = _Keyed(), np.zeros(1)
    (a, next_a), (b, _) = backend.draw((50,), like), backend.draw((50,), like)
    assert not np.any(a == b), "two unseeded draws repeated their numbers"
    assert next_a == backend.keys[0] + 1  # the key to go on with is returned
    assert backend.keys[0] != backend.keys[1]


def test_stateful_draw_returns_the_same_generator() -> None:
    class Stateful(_Minimal):
        def standard_normal(self, shape: tuple[int, ...], like: Any, generator: Any = None) -> Any:
            return generator.standard_normal(shape)

    rng = np.random.default_rng(0)
    sample, same = Stateful().draw((2, 2), np.zeros(1), rng)
    assert same is rng
    np.testing.assert_array_equal(sample, np.random.default_rng(0).standard_normal((2, 2)))


def test_a_backend_without_draws_says_what_to_implement() -> None:
    with pytest.raises(NotImplementedError, match="neither standard_normal nor.*draw_keyed"):
        _Minimal().draw((2,), np.zeros(1))

    class KeysOnly(_Minimal):
        functional_keys = True

        def make_generator(self, seed: int, like: Any) -> Any:
            return seed

    with pytest.raises(NotImplementedError, match="functional_keys but has no draw_keyed"):
        KeysOnly().standard_normal((2,), np.zeros(1))


# -- the readout draws through draw(): a new key every step -----------------------------
torch = pytest.importorskip("torch")
from test_readout_torch import make_model  # noqa: E402  (the readout suite's network)


def _torch_keyed() -> Any:
    from iba_torch import TorchBackend

    class KeyedTorch(_IntegerKeys, TorchBackend):
        pass

    return KeyedTorch()


def _trained_keys(seed: int) -> tuple[list[int], list[int]]:
    """The keys a seeded readout drew with in three training steps, then in an evaluation
    of two batches."""
    backend, model = _torch_keyed(), make_model(readout_reference_weights())
    images, labels = blob_images(48, 1)
    batches = [
        (torch.as_tensor(images[i : i + 16]), torch.as_tensor(labels[i : i + 16])) for i in (0, 16, 32)
    ]
    readout = ReadoutBottleneck(backend, model, "relu2", ["relu2", "relu3", "logits"])
    with backend.frozen(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        readout.estimate(x for x, _ in batches)
        backend.keys.clear()
        readout.train(batches, epochs=1, seed=seed, warn=False)
        train_keys = list(backend.keys)
        backend.keys.clear()
        readout.evaluate(batches[:2], seed=seed)
    return train_keys, list(backend.keys)


def test_a_seeded_readout_draws_new_noise_each_step_with_functional_keys() -> None:
    train, evaluation = _trained_keys(5)
    # Every step (and every evaluated batch) goes on with the key the last draw returned;
    # drawing with the seed's key each time would repeat one noise in every step.
    assert train == [5, 6, 7]
    assert evaluation == [5, 6]
    assert _trained_keys(5) == (train, evaluation)


# -- layers by name ------------------------------------------------------------------------
class _Layer:
    pass


class _Conv(_Layer):
    pass


class _Named(_Minimal):
    layer_type = _Layer

    def named_layers(self, model: Any) -> dict[str, Any]:
        return dict(model)


def test_layer_defaults_read_named_layers() -> None:
    conv, act = _Conv(), _Layer()
    backend, model = _Named(), {"block.conv": conv, "act": act}
    assert backend.layer_names(model) == ["block.conv", "act"]
    assert backend.layer_kind(model, "block.conv") == "_Conv"
    assert backend.layer_kind(model, "missing") is None
    assert backend.resolve(model, "act") is act
    assert backend.resolve(None, conv) is conv  # a layer object needs no model
    with pytest.raises(
        LookupError, match=r"'conv' not found in the model; its layers are: \['block.conv', 'act'\]"
    ):
        backend.resolve(model, "conv")
    with pytest.raises(TypeError, match="layer must be a _Layer or a layer name, got int"):
        backend.resolve(model, 3)


def test_layer_defaults_without_named_layers() -> None:
    backend = _Minimal()
    assert backend.layer_names(object()) == [] and backend.layer_kind(object(), "x") is None
    with pytest.raises(TypeError, match="layer must be a layer name, got _Layer"):
        backend.resolve({}, _Layer())
    with pytest.raises(LookupError, match="its layers are: \\[\\]"):
        backend.resolve({}, "x")


# -- hook lists ----------------------------------------------------------------------------
def test_hook_list_runs_in_order_and_survives_removal_in_any_order() -> None:
    removed: list[int] = []
    hooks = HookList(lambda h: removed.append(len(h.entries)))
    double = hooks.add(lambda x: x * 2)
    keep = hooks.add(lambda x: None)  # None: the features pass unchanged
    plus = hooks.add(lambda x: x + 1)
    shift = hooks.add(lambda x: x - 100, on_input=True)
    assert hooks.run(3) == 7 and hooks.run(3, on_input=True) == -97
    double.remove()
    assert hooks.run(3) == 4 and removed == [3]
    double.remove()  # a second removal changes nothing
    assert removed == [3] and hooks.run(3) == 4
    for handle in (shift, plus, keep):
        handle.remove()
    assert removed == [3, 2, 1, 0] and hooks.entries == [] and hooks.run(3) == 3


# -- flags set and restored ----------------------------------------------------------------
class _Flags:
    def __init__(self, **flags: Any) -> None:
        self.__dict__.update(flags)


def test_assigned_sets_the_flags_objects_have_and_restores_them_on_an_error() -> None:
    a, b = _Flags(training=True, frozen=False), _Flags(training=False)
    setter_calls: list[tuple[str, Any]] = []

    def setter(obj: Any, name: str, value: Any) -> None:
        setter_calls.append((name, value))
        object.__setattr__(obj, name, value)

    with pytest.raises(RuntimeError), assigned([a, b], {"training": False, "frozen": True}, setter):
        assert (a.training, a.frozen, b.training) == (False, True, False)
        assert not hasattr(b, "frozen")  # only the flags an object has
        raise RuntimeError("inside")
    assert (a.training, a.frozen, b.training) == (True, False, False)
    # Set: a.training, a.frozen, b.training; restored: a's two (b's did not change).
    assert setter_calls[:3] == [("training", False), ("frozen", True), ("training", False)]
    assert setter_calls[3:] == [("training", True), ("frozen", False)]


# -- claims by the imports of a factory's source ---------------------------------------------
def test_factory_imports_reads_a_file_or_module_without_running_it(tmp_path: Any, monkeypatch: Any) -> None:
    source = "import os\nfrom flax import nnx\nimport jax.numpy as jnp\nraise SystemExit('not run')\n"
    (tmp_path / "net.py").write_text(source)
    assert factory_imports(f"{tmp_path / 'net.py'}:make") == {"os", "flax", "jax"}
    monkeypatch.syspath_prepend(str(tmp_path))
    assert factory_imports("net:make") == {"os", "flax", "jax"}
    assert factory_imports(str(tmp_path / "net.py")) == set()  # not a factory spec
    assert factory_imports(f"{tmp_path / 'missing.py'}:make") == set()
    assert factory_imports("no_such_module_here:make") == set()
    assert factory_imports("model.keras") == set()


# -- a traceable gradient: value_and_grad and the compiled step from it -------------------
class _Analytic(_Minimal):
    """A backend whose ``gradient`` knows the derivative of the quadratic losses below, and
    whose ``compile`` records what it is given."""

    value_and_grad = Backend.value_and_grad  # the contract's default, over _Minimal's

    def __init__(self) -> None:
        self.compiled: list[Any] = []

    def gradient(self, fn: Any, param: Any, *operands: Any) -> tuple[Any, Any]:
        (target,) = operands
        return np.asarray(fn(param, target)), 2.0 * (param - target)

    def compile(self, fn: Any) -> Any:
        self.compiled.append(fn)
        return fn


def _quadratic(p: Any, target: Any) -> Any:
    return float(np.sum((p - target) ** 2))


def test_value_and_grad_and_the_compiled_step_come_from_gradient():
    backend = _Analytic()
    param, target = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    value, grad = backend.value_and_grad(_quadratic, param, target)
    assert isinstance(value, float) and value == pytest.approx(0.25 + 4.0)
    np.testing.assert_allclose(grad, [1.0, -4.0])

    def update(p: Any, g: Any, lr: Any) -> tuple[Any, Any]:
        return p - lr * g, lr * 0.5

    step = backend.compile_step(_quadratic, update)
    assert step is not None and backend.compiled == [step]  # compiled once, whole
    value, new_param, state = step(param, (np.float64(0.1),), (target,))
    assert float(value) == pytest.approx(4.25)
    np.testing.assert_allclose(new_param, [0.9, -1.6])
    assert state == (pytest.approx(0.05),)


def test_without_gradient_nothing_is_compiled_and_value_and_grad_is_required():
    class Plain(_Minimal):
        value_and_grad = Backend.value_and_grad

    backend = Plain()
    assert backend.compile_step(_quadratic, lambda p, g: (p,)) is None
    with pytest.raises(NotImplementedError, match="neither value_and_grad nor gradient"):
        backend.value_and_grad(_quadratic, np.zeros(2), np.zeros(2))
