"""The model cut after the bottleneck layer (``Backend.split_after``, ``torch.fx``).

With ``target=``, an explanation runs the layers before the bottleneck once (the clean
pass) and only the layers after it in its steps, wherever the model can be cut there.
Every other model keeps running whole, with the same maps.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from iba_torch import IBA  # noqa: E402
from iba_torch._backend import TorchBackend  # noqa: E402
from iba_torch._split import split_after  # noqa: E402


@pytest.fixture(autouse=True)
def _passes_of_several_inputs(monkeypatch):
    """These tests count the model's runs in passes of several inputs (a CPU's passes
    hold one input by default: tests/test_torch_iba.py)."""
    monkeypatch.setattr(TorchBackend, "pass_size", lambda self, like: 32)


pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore:the statistics rest on")]

# float32 maps of two paths that compute the same features on the same rows.
SAME = {"rtol": 1e-5, "atol": 1e-7}


class Block(nn.Module):
    """A residual block of the model's own class (kept whole by the cut)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class Staged(nn.Module):
    """ResNet-like: stem, two stages of residual blocks, pooling, classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(Block(6), Block(6))
        self.stage2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), Block(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class SkipAround(nn.Module):
    """A skip connection around the layer (``conv2``): the output needs the input twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.fc(torch.relu(self.conv2(h) + h).mean(dim=(2, 3)))


class Branchy(nn.Module):
    """Control flow on a tensor's value: ``torch.fx`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        if h.sum() > -1e9:  # always true, but only known at run time
            h = torch.relu(h)
        return self.fc(h.mean(dim=(2, 3)))


def sequential() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).eval()


def images(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def batches():
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        yield torch.randn(16, 3, 8, 8, generator=gen)


def explainer(model: nn.Module, layer: nn.Module) -> IBA:
    iba = IBA(layer)
    iba.estimate(model, batches(), progbar=False)
    return iba


def whole_model_maps(iba: IBA, *args, **kwargs) -> np.ndarray:
    iba.engine.split_model = False
    try:
        return iba.analyze(*args, **kwargs)
    finally:
        del iba.engine.split_model


def counting(module: nn.Module) -> list[int]:
    rows: list[int] = []
    module.register_forward_hook(lambda m, i, o: rows.append(int(o.shape[0])))
    return rows


CASES = {
    # name: (model factory, the layer, whether the model can be cut after it)
    "sequential": (sequential, lambda m: m[2], True),
    "after a stage": (Staged, lambda m: m.stage1, True),
    "a layer in a stage": (Staged, lambda m: m.stage2[0], True),
    "a layer inside a block": (Staged, lambda m: m.stage1[1].conv, False),
    "skip around the layer": (SkipAround, lambda m: m.conv2, False),
    "not traceable": (Branchy, lambda m: m.conv2, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_where_the_model_can_be_cut(name):
    make, layer_of, cut = CASES[name]
    model = make().eval()
    tail = split_after(model, layer_of(model))
    assert (tail is not None) == cut
    if tail is not None:  # the cut model gives the model's output from the layer's output
        x = images(4)
        features = []
        handle = layer_of(model).register_forward_hook(lambda m, i, o: features.append(o))
        with torch.no_grad():
            expected = model(x)
        handle.remove()
        with torch.no_grad():
            torch.testing.assert_close(tail(features[0]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_maps_are_those_of_the_whole_model(name):
    make, layer_of, cut = CASES[name]
    model = make().eval()
    layer = layer_of(model)
    iba = explainer(model, layer)
    x = images(3)
    before = counting(model.stem[0] if isinstance(model, Staged) else next(model.children()))
    maps = iba.analyze(x, target=[0, 1, 4], model=model, seed=2, optimization_steps=4)
    # The first layer runs once per explanation when cut (the clean pass; the check of the
    # cut and the steps start from the recorded features), in every step too when not.
    if cut:
        assert before == [3]
    else:
        assert before[0] == 3 and len(before) >= 5
    expected = whole_model_maps(iba, x, target=[0, 1, 4], model=model, seed=2, optimization_steps=4)
    np.testing.assert_allclose(maps, expected, **SAME)
    assert not layer._forward_hooks  # nothing left on the user's model


def test_the_layers_after_the_cut_see_every_noisy_copy():
    model = sequential()
    iba = explainer(model, model[2])
    rows = counting(model[5])
    iba.analyze(images(2), target="predicted", model=model, seed=0, optimization_steps=3)
    # The clean pass, the check of the cut, then three steps on 2 x 10 noisy copies.
    assert rows == [2, 2, 20, 20, 20]


def test_a_changed_model_is_not_explained_with_an_old_cut():
    model = sequential()
    iba = explainer(model, model[2])
    x = images(2)
    old = iba.analyze(x, target=1, model=model, seed=0, optimization_steps=10)  # cut traced
    torch.manual_seed(9)
    model[5] = nn.Linear(8 * 4 * 4, 5)  # the traced cut still holds the old classifier
    maps = iba.analyze(x, target=1, model=model, seed=0, optimization_steps=10)
    expected = whole_model_maps(iba, x, target=1, model=model, seed=0, optimization_steps=10)
    np.testing.assert_allclose(maps, expected, **SAME)
    assert not np.allclose(maps, old, rtol=1e-3)  # the new classifier changes the maps


def test_other_loss_forms_run_the_whole_model():
    model = sequential()
    iba = explainer(model, model[2])
    first = counting(model[0])
    x = images(2)
    target = torch.tensor([1, 3])

    def closure(batch):
        return nn.functional.cross_entropy(model(batch), target.repeat_interleave(10))

    iba.analyze(x, closure, seed=0, optimization_steps=2)
    assert first == [2, 20, 20]  # the recording pass, then every step on the copies
    first.clear()
    a = iba.analyze(x, target=[1, 3], model=model, seed=0, optimization_steps=2)
    assert first == [2]
    b = iba.analyze(x, closure, seed=0, optimization_steps=2)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # copies at the input: round-off


class ReplacingBackend(TorchBackend):
    """PyTorch without its own cut, declaring that compiled functions leave unused work
    out (``Backend.prunes_unused``): the engine then cuts the model itself, by replacing
    the layer's output in a run on zeros.  (Eager PyTorch prunes nothing, so here the
    layers before still run, on zeros; the maps must not depend on it.)"""

    prunes_unused = True

    def __init__(self) -> None:
        super().__init__()
        self.runs_on_zeros = 0

    def split_after(self, model, layer):
        return None

    def call(self, model, x):
        self.runs_on_zeros += int(not torch.any(x != 0))
        return super().call(model, x)


@pytest.mark.parametrize("name", list(CASES))
def test_the_engines_own_cut_gives_the_whole_models_maps(name):
    from iba_core.engines import PerSampleBottleneck

    make, layer_of, _ = CASES[name]
    model = make().eval()
    backend = ReplacingBackend()
    engine = PerSampleBottleneck(backend, model, layer_of(model), optimization_steps=4)
    engine.estimate(batches(), progbar=False)
    x = images(3)
    maps = engine.analyze(x, target=[0, 1, 4], seed=2).numpy()
    # The cut is checked once against the clean pass; where it holds (no path around the
    # layer: torch.fx is not needed, so the untraceable model is cut too) the 4 steps use it.
    holds = name not in ("a layer inside a block", "skip around the layer")
    assert backend.runs_on_zeros == (5 if holds else 1)
    engine.split_model = False
    expected = engine.analyze(x, target=[0, 1, 4], seed=2).numpy()
    np.testing.assert_allclose(maps, expected, **SAME)
    assert not layer_of(model)._forward_hooks  # nothing left on the user's model
