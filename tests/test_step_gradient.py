"""The eager optimisation step chains the capacity term's gradient by hand
(``Bottleneck._eager_step``: autograd only through the model term); the whole-step path
(``Backend.compile_step``) differentiates the whole loss with the framework's autograd.
Both must give the same masks.  Here, in float64 PyTorch, a backend whose
``compile_step`` differentiates the whole loss op by op stands for the whole-step path,
and every setting the chain depends on is varied: smoothing or none, 2-D maps and
sequences with padding (smoothed per input), ReLU clamping, class targets and the
reference library's closure, several inputs in one pass.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from iba_core.engines import PerSampleBottleneck  # noqa: E402
from iba_torch._backend import TorchBackend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")

#: float64 on both paths: the same sums grouped differently, a few Adam steps.
TOL = dict(rtol=1e-9, atol=1e-12)
STEPS = dict(optimization_steps=4, batch_size=3, beta=0.3, initial_alpha=1.0, lr=0.5)


class WholeLossBackend(TorchBackend):
    """PyTorch, with the whole loss differentiated by autograd in each step (and
    nothing given to ``torch.compile``)."""

    def compile(self, fn):
        return fn

    def compile_step(self, fn, update):
        def step(param, state, operands):
            value, grad = self.value_and_grad(fn, param, *operands)
            new_param, *new_state = update(param, grad, *state)
            return value, new_param, tuple(new_state)

        return step


def _image_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).double()


def _sequence_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def _maps(backend, model, x, *, settings, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    engine = PerSampleBottleneck(backend, model, model[1], **{**STEPS, **settings})
    with torch.no_grad():
        engine.estimate([x], n_samples=len(x))
    maps = engine.analyze(x, mode="capacity", seed=3, noise="numpy", **kwargs)
    return maps.detach().numpy(), engine.bottleneck.alpha.detach().numpy()


CASES = {
    "image, smoothed": ("image", {}, {}),
    "image, no smoothing": ("image", {"sigma": None}, {}),
    "image, relu": ("image", {"relu": True}, {}),
    "image, closure": ("image", {}, {"closure": True}),
    "sequence, smoothed, padding": ("sequence", {"sigma": 1.5}, {"padding": True}),
    "sequence, no smoothing, padding": ("sequence", {"sigma": None}, {"padding": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eager_step_matches_whole_loss_autograd(case):
    kind, settings, how = CASES[case]
    rng = np.random.default_rng(0)
    if kind == "image":
        model, x = _image_model(), torch.from_numpy(rng.standard_normal((3, 2, 6, 6)))
    else:
        model, x = _sequence_model(), torch.from_numpy(rng.standard_normal((3, 2, 9)))
    kwargs: dict = {"target": [0, 2, 1]}
    if how.get("closure"):
        rows = torch.tensor([0, 2, 1]).repeat_interleave(STEPS["batch_size"])
        kwargs = {"loss": lambda batch: nn.functional.cross_entropy(model(batch), rows)}
    if how.get("padding"):
        mask = np.ones((3, 9))
        mask[1, 6:] = 0
        mask[2, 4:] = 0
        kwargs["attention_mask"] = mask
    # compile=True asks for the whole-step path; the default PyTorch path is the eager step.
    whole, whole_alpha = _maps(WholeLossBackend(), model, x, settings={**settings, "compile": True}, **kwargs)
    eager, eager_alpha = _maps(TorchBackend(), model, x, settings=settings, **kwargs)
    # The masks moved away from their start (the comparison would be empty otherwise).
    assert np.abs(eager_alpha - STEPS["initial_alpha"]).max() > 0.1
    np.testing.assert_allclose(eager_alpha, whole_alpha, **TOL)
    np.testing.assert_allclose(eager, whole, **TOL)
    if how.get("padding"):
        assert np.all(eager[1, 6:] == 0) and np.all(eager[2, 4:] == 0)
