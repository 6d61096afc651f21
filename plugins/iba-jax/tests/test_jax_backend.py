"""What the JAX backend adds beyond the suites: the compiled step, the front, the plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iba_core import IBA, get_backend
from iba_core.apps.cli import main as iba_main
from iba_core.contract import backend_specs

from models import Act, ConformanceNet

pytestmark = pytest.mark.jax

TRACES: list[int] = []


class CountingNet(ConformanceNet):
    """Counts the runs of its Python code: under ``jax.jit`` only traces run it."""

    def __call__(self, x: Any) -> Any:
        TRACES.append(1)
        return super().__call__(x)


def _estimated(model: Any, **settings: Any) -> IBA:
    iba = IBA(model, "act", **settings)
    data = np.random.default_rng(0).standard_normal((64, 12, 12, 3)).astype(np.float32)
    with pytest.warns(UserWarning):
        iba.estimate(data)
    return iba


def _inputs(n: int, seed: int = 1) -> Any:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, 12, 12, 3)).astype(np.float32))


@pytest.fixture
def backend() -> Any:
    return get_backend("jax")


def test_the_step_is_compiled_once_per_input_shape() -> None:
    iba = _estimated(CountingNet(jnp.float32), optimization_steps=5)
    TRACES.clear()
    iba.analyze(_inputs(2), target=[0, 1], seed=0)
    first = len(TRACES)
    # The clean pass and the step are traced; the five steps run the compiled step.
    assert 2 <= first <= 3, first
    iba.analyze(_inputs(2, seed=2), target=[3, 4], seed=1)
    assert len(TRACES) == first, "a second call of the same shape traced again"
    iba.analyze(_inputs(3), target=[0, 1, 2], seed=0)
    assert len(TRACES) > first, "a new input shape must trace anew"


@pytest.fixture(params=[True, False], ids=["x64", "no_x64"])
def x64(request: Any) -> Any:
    """With and without ``jax_enable_x64`` (float32 models must not care)."""
    saved = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", saved)


def test_compiled_and_op_by_op_analyze_agree(x64: bool) -> None:
    maps = []
    for compile in (True, False):
        iba = _estimated(ConformanceNet(jnp.float32), optimization_steps=4, compile=compile)
        maps.append(iba.analyze(_inputs(2), target=[0, 3], seed=5))
    assert np.all(maps[0] > 0) and maps[0].dtype == np.float32
    # The same float32 arithmetic, fused by XLA: round-off amplified by four Adam steps.
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-3, atol=1e-6)


def test_compiled_step_reads_the_current_weights() -> None:
    """Weights are arguments of the compiled step, not constants frozen into it."""
    model = ConformanceNet(jnp.float32)
    iba = _estimated(model, optimization_steps=3)
    x = _inputs(1)
    before = iba.analyze(x, target=[2], seed=0)
    for _, var in nnx.to_flat_state(nnx.state(model.logits, nnx.Param)):
        var.set_value(var.get_value() * 3.0)
    after = iba.analyze(x, target=[2], seed=0)
    fresh = IBA(ConformanceNet(jnp.float32), "act", optimization_steps=3)
    for _, var in nnx.to_flat_state(nnx.state(fresh.model.logits, nnx.Param)):
        var.set_value(var.get_value() * 3.0)
    fresh.estimator = iba.estimator
    expected = fresh.analyze(x, target=[2], seed=0)
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-7)


def test_analyze_leaves_the_model_as_it_was_also_after_an_error() -> None:
    model = ConformanceNet(jnp.float32)
    iba = _estimated(model, optimization_steps=2)
    assert type(model.act) is Act and model.drop.deterministic is False
    iba.analyze(_inputs(1), target=[0])
    with pytest.raises(ValueError, match=r"out of range|class"):
        iba.analyze(_inputs(1), target=[7])
    assert type(model.act) is Act, "the hooked layer kept its hooked class"
    assert model.drop.deterministic is False, "dropout was left switched off"
    outputs = [np.asarray(get_backend("jax").call(model, _inputs(2))) for _ in range(2)]
    np.testing.assert_array_equal(outputs[0], outputs[1])  # inference mode in call


def test_draws_are_functional(backend: Any) -> None:
    like = jnp.zeros(1, jnp.float32)
    key = backend.make_generator(3, like)
    a, next_key = backend.draw((4, 5), like, key)
    again, _ = backend.draw((4, 5), like, key)  # the same key: the same numbers
    b, _ = backend.draw((4, 5), like, next_key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
    assert not np.any(np.asarray(a) == np.asarray(b))
    fresh = [np.asarray(backend.draw((4, 5), like, None)[0]) for _ in range(2)]
    assert not np.any(fresh[0] == fresh[1]), "unseeded draws must differ"
    # An unseeded draw hands back a key for the next one (no fresh entropy every step),
    # whose draw differs from the first.
    first, following = backend.draw((4, 5), like, None)
    assert following is not None
    assert not np.any(np.asarray(first) == np.asarray(backend.draw((4, 5), like, following)[0]))


def test_loss_without_gradient_path_is_refused(backend: Any) -> None:
    p = jnp.ones(3)
    with pytest.raises(ValueError, match="no gradient path"):
        backend.value_and_grad(lambda q: jnp.float32(2.0), p)
    with pytest.raises(ValueError, match="no gradient path"):
        backend.value_and_grad(lambda q: 2.0, p)
    value, grad = backend.value_and_grad(lambda q, a: jnp.sum(q * a), p, jnp.arange(3.0))
    assert value == 3.0
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 1.0, 2.0])


def test_layers_are_named_by_their_path(backend: Any) -> None:
    model = ConformanceNet(jnp.float32)
    names = backend.layer_names(model)
    assert {"conv1", "relu1", "conv2", "act", "drop", "logits"} <= set(names)
    assert backend.layer_kind(model, "conv2") == "Conv"
    with pytest.raises(LookupError, match="no_such"):
        IBA(model, "no_such")
    assert get_backend(model) is backend  # found from the model's type


def test_the_plugin_registers_through_its_entry_point_without_importing_jax() -> None:
    spec = backend_specs()["jax"]
    assert spec.loader == "iba_jax._backend:JaxBackend" and "flax" in spec.aliases
    code = "import sys, iba_core; iba_core.available_backends(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


FACTORY = """
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


def make():
    return Net()
"""


def _rgb_pngs(folder: Path, n: int, seed: int) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_iba_command_lists_layers_and_explains(tmp_path: Path, capsys: Any) -> None:
    factory = tmp_path / "flax_net.py"
    factory.write_text(textwrap.dedent(FACTORY))
    spec = f"{factory}:make"
    claims = backend_specs()["jax"].claims  # asked by --backend auto, imports no JAX
    assert claims is not None and claims(spec)
    torch_file = tmp_path / "torch_net.py"
    torch_file.write_text("import torch\n")
    assert not claims(f"{torch_file}:make") and not claims("no_such_module:make")
    assert iba_main(["layers", spec, "--backend", "jax"]) == 0
    listed = capsys.readouterr().out
    assert "conv" in listed and "Conv" in listed
    argv = ["explain", spec, "--backend", "jax", "--layer", "conv", "--steps", "2"]
    argv += ["--images", str(_rgb_pngs(tmp_path / "images", 2, seed=1))]
    argv += ["--estimate-from", str(_rgb_pngs(tmp_path / "estimate", 4, seed=2))]
    argv += ["--out", str(tmp_path / "out")]
    assert iba_main(argv) == 0, capsys.readouterr().err
    assert "explained 2 images at layer conv" in capsys.readouterr().out
    with np.load(tmp_path / "out" / "saliency_maps.npz") as f:
        maps = f["saliency_maps"]
    assert maps.shape == (2, 8, 8) and np.all(np.isfinite(maps)) and maps.sum() > 0


@pytest.mark.skipif(len(jax.devices("cpu")) < 1, reason="no CPU device")
def test_results_stay_on_the_inputs_device(backend: Any) -> None:
    device = jax.devices()[0]
    x = jax.device_put(_inputs(1), device)
    like = backend.from_numpy(np.zeros(3, np.float32), like=x)
    assert like.devices() == {device}
    sample, _ = backend.draw((2, 3), x, backend.make_generator(0, x))
    assert sample.devices() == {device}


class SkipNet(ConformanceNet):
    """ConformanceNet with a path around ``act``: the input's mean joins the logits."""

    def __call__(self, x: Any) -> Any:
        return super().__call__(x) + x.mean(axis=(1, 2, 3))[:, None]


def test_the_tail_is_the_model_after_the_layer(backend: Any) -> None:
    """The engine's own cut (``Backend.prunes_unused``): the model on zeros, compiled, with
    the layer's output replaced by the features given."""
    from iba_core.engines import PerSampleBottleneck

    assert backend.split_after(ConformanceNet(jnp.float32), "act") is None  # the core cuts
    x, seen = _inputs(3), []
    for model, agrees in ((ConformanceNet(jnp.float32), True), (SkipNet(jnp.float32), False)):
        engine = PerSampleBottleneck(backend, model, "act")
        engine._input_like = (tuple(x.shape[1:]), x.dtype)
        handle = backend.attach(model, "act", lambda f: seen.append(f))
        try:
            with backend.frozen(model):
                want = np.asarray(backend.call(model, x))
        finally:
            handle.remove()
        with engine.session():  # the engine's hook on the layer
            tail = engine._replacing_tail()
            assert tail is not None
            got, other = np.asarray(tail(seen[-1])), np.asarray(tail(seen[-1] * 0.5))
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6) == agrees  # the skip needs the input
        assert not np.allclose(other, got, atol=1e-3)  # the output follows the features given
        assert type(model.act) is Act  # the layer's own class again


@pytest.mark.parametrize("net", [ConformanceNet, SkipNet])
def test_the_steps_run_the_layers_before_the_bottleneck_once(net: type) -> None:
    """Op by op (``compile=False``) every step of the whole model runs conv1's Python; the
    compiled tail traces it once.  A path around the layer makes the engine run it all."""
    backend, maps, runs = get_backend("jax"), [], []
    for split in (True, False):
        iba = _estimated(net(jnp.float32), optimization_steps=6, compile=False)
        iba.engine.split_model = split
        handle = backend.attach(iba.model, "conv1", lambda f, split=split: runs.append(split))
        try:
            maps.append(np.asarray(iba.analyze(_inputs(2), target=[0, 3], seed=5)))
        finally:
            handle.remove()
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-7 * float(np.abs(maps[1]).max()))
    assert runs.count(False) >= 6  # the whole model in each step
    assert (runs.count(True) < 6) == (net is ConformanceNet)


def test_compiled_functions_fall_back_to_xla_defaults(monkeypatch: Any) -> None:
    from iba_jax import _backend

    assert _backend._compiler_options() == _backend._OPTIONS  # this XLA knows the option
    monkeypatch.setattr(_backend, "_OPTIONS", {"xla_no_such_option": ""})
    _backend._compiler_options.cache_clear()
    try:
        assert _backend._compiler_options() == {}
    finally:
        monkeypatch.undo()
        _backend._compiler_options.cache_clear()


def test_passes_fit_a_cpu_cache(backend: Any) -> None:
    # 80 samples a pass on a CPU: 8 inputs with the default 10 noise copies each.
    assert backend.pass_size(jnp.zeros(2, device=jax.devices("cpu")[0])) == 80
