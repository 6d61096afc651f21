"""The PyTorch front: reference API, options, bad input, and the model left untouched."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")]

from copies_helper import analyze_with_copies_at_the_input  # noqa: E402
from iba_core import Estimator  # noqa: E402
from iba_torch import IBA, plot_saliency_map  # noqa: E402

nn = torch.nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 6, 3, padding=1))
    model.add_module("bn", nn.BatchNorm2d(6))
    model.add_module("relu1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(6, 8, 3, padding=1, stride=2))
    model.add_module("relu2", nn.ReLU())
    model.add_module("drop", nn.Dropout(0.5))
    model.add_module("pool", nn.AdaptiveAvgPool2d(2))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(32, 4))
    return model


def loader(n_batches: int = 4, batch: int = 16, with_labels: bool = True):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n_batches):
        x = torch.randn(batch, 3, 12, 12, generator=gen)
        yield (x, torch.zeros(batch, dtype=torch.long)) if with_labels else x


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def iba(model):
    iba = IBA(model.conv2)
    iba.estimate(model, loader())
    return iba


def images(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(5))


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"] == 0
    for a, b in zip(after["grad"], before["grad"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for k in before["state"]:
        assert torch.equal(after["state"][k], before["state"][k]), k


class TestReferenceAPI:
    def test_one_image_gives_an_hw_map_in_bits(self, model, iba):
        x = images(1)
        smap = iba.analyze(x, target=2, model=model, seed=0)
        assert isinstance(smap, np.ndarray) and smap.shape == (12, 12)
        total_bits = float(iba.capacity().sum()) / math.log(2)
        assert smap.min() >= 0 and total_bits > 0
        np.testing.assert_allclose(smap.sum(), total_bits, rtol=1e-5)

    def test_closure_form_equals_target_form(self, model, iba):
        x = images(1)
        model.eval()
        loss = lambda b: nn.functional.cross_entropy(model(b), torch.full((len(b),), 2))
        a = iba.analyze(x, loss, seed=3)
        b = iba.analyze(x, target=2, model=model, seed=3)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    def test_batch_of_images_gives_n_maps(self, model, iba):
        smaps = iba.analyze(images(3), target=[0, 1, 2], model=model, seed=0)
        assert smaps.shape == (3, 12, 12)
        assert not np.allclose(smaps[0], smaps[1])

    def test_inputs_go_through_the_model_a_few_at_a_time(self, model, iba):
        passes = []
        handle = model.fc.register_forward_hook(lambda m, i, o: passes.append(o.shape[0]))
        try:
            maps = iba.analyze(
                images(5),
                target=[0, 1, 2, 3, 0],
                model=model,
                seed=0,
                inputs_per_pass=2,
                optimization_steps=2,
            )
        finally:
            handle.remove()
        assert maps.shape == (5, 12, 12)
        # Clean passes of 2 + 2 + 1 inputs (their logits: the targets' class count; no more
        # inputs at once than an optimisation pass), the check of the model cut after the
        # layer on the 5, then 2 steps each of 2 + 2 + 1 inputs, 10 copies each (the
        # user's hook on a layer after the cut still runs).
        assert passes == [2, 2, 1, 5] + [20] * 2 + [20] * 2 + [10] * 2
        again = iba.analyze(images(5)[4:], target=0, model=model, seed=4, optimization_steps=2)
        np.testing.assert_allclose(maps[4], again, rtol=1e-4, atol=1e-6)

    def test_a_cpu_pass_holds_one_inputs_copies(self, model, iba):
        passes = []
        handle = model.fc.register_forward_hook(lambda m, i, o: passes.append(o.shape[0]))
        try:
            maps = iba.analyze(images(3), target=[0, 1, 2], model=model, seed=0, optimization_steps=2)
        finally:
            handle.remove()
        # Clean passes of one input, the check of the cut on the 3, then each input's 2
        # steps on its 10 copies: the memory of one input's pass, whatever the number.
        assert passes == [1, 1, 1, 3] + [10] * 2 * 3
        again = iba.analyze(
            images(3), target=[0, 1, 2], model=model, seed=0, optimization_steps=2, inputs_per_pass=3
        )
        np.testing.assert_allclose(maps, again, rtol=1e-4, atol=1e-6)

    def test_a_loss_function_gets_all_inputs_copies_at_once(self, model, iba):
        # Its targets are its own: passes of one input would hand it a tenth of its rows.
        rows = torch.tensor([0, 1, 2, 3, 0]).repeat_interleave(10)
        sizes = []

        def loss(batch):
            sizes.append(batch.shape[0])
            return torch.nn.functional.cross_entropy(model(batch), rows)

        maps = iba.analyze(images(5), loss, seed=0, optimization_steps=2)
        assert sizes[1:] == [50, 50]  # after the recording pass, every step on all copies
        targeted = iba.analyze(images(5), target=[0, 1, 2, 3, 0], model=model, seed=0, optimization_steps=2)
        np.testing.assert_allclose(maps, targeted, rtol=1e-4, atol=1e-6)

    def test_capacity_mode_is_at_feature_resolution(self, model, iba):
        cap = iba.analyze(images(1), target=1, model=model, mode="capacity", seed=0)
        assert cap.shape == (6, 6)
        np.testing.assert_allclose(cap.sum(), float(iba.capacity().sum()) / math.log(2), rtol=1e-5)

    def test_model_and_layer_name_form(self, model):
        iba = IBA(model, "conv2")
        iba.estimate(model, loader(with_labels=False))
        assert iba.estimator.shape == (8, 6, 6)
        assert iba.analyze(images(1), target=0, seed=0).shape == (12, 12)  # model remembered

    def test_as_a_layer_of_the_model(self):
        base = make_model()
        iba = IBA()
        model = nn.Sequential(
            base.conv1, base.relu1, base.conv2, iba, base.relu2, base.pool, base.flat, base.fc
        )
        x = images(2)
        clean = model(x)
        iba.estimate(model, loader())
        torch.testing.assert_close(model(x), clean, rtol=0, atol=0)  # identity when idle
        smaps = iba.analyze(x, target=[0, 1], model=model, seed=0)
        assert smaps.shape == (2, 12, 12) and np.all(smaps >= 0)

    def test_restrict_flow_uses_the_last_mask(self, model, iba):
        model.eval()
        x = images(1)
        iba.analyze(x, target=1, model=model, seed=0, beta=100)
        clean = model(x)
        with iba.restrict_flow():
            noisy = model(x)
        assert not torch.allclose(clean, noisy)
        torch.testing.assert_close(model(x), clean, rtol=0, atol=0)

    def test_interrupt_execution_stops_after_the_layer(self, model, iba):
        ran = []
        handle = model.fc.register_forward_hook(lambda *a: ran.append(1))
        try:
            with iba.interrupt_execution():
                model(images(2))
            assert ran == []
            assert iba.bottleneck.recorded == []  # context closed: recording cleared
        finally:
            handle.remove()

    def test_reset_estimate_and_detach(self, model, iba):
        iba.reset_estimate()
        with pytest.raises(RuntimeError, match="estimate"):
            iba.analyze(images(1), target=0, model=model)
        iba.detach()
        with pytest.raises(RuntimeError, match="detached"):
            iba.estimate(model, loader())

    def test_progress_bars(self, model, capsys):
        iba = IBA(model.conv2, progbar=True)
        iba.estimate(model, loader(), n_samples=40)
        iba.analyze(images(1), target=0, model=model, optimization_steps=2)
        err = capsys.readouterr().err
        assert "estimate" in err and "40/40" in err and "analyze" in err and "2/2" in err

    def test_plot_returns_axes(self, model, iba):
        import matplotlib

        matplotlib.use("Agg")
        smap = iba.analyze(images(1), target=0, model=model, seed=0)
        ax = plot_saliency_map(smap, img=images(1)[0])
        assert ax.images and ax.images[-1].get_array().shape[:2] == (12, 12)
        with pytest.raises(ValueError, match=r"\(H, W\)"):
            plot_saliency_map(np.zeros((2, 3, 4)))


class TestOptions:
    def test_bottleneck_on_a_layers_input(self, model):
        iba = IBA(model.relu2, input_or_output="input")
        iba.estimate(model, loader())
        assert iba.estimator.shape == (8, 6, 6)
        smap = iba.analyze(images(1), target=0, model=model, seed=0)
        assert smap.shape == (12, 12) and np.isfinite(smap).all()

    def test_min_std_zero_with_constant_features(self):
        model = make_model()
        with torch.no_grad():
            model.conv2.weight[0].zero_()
            model.conv2.bias[0] = 0.5  # channel 0 is constant: std 0
        iba = IBA(model.conv2, min_std=0)
        iba.estimate(model, loader())
        _, std, active = iba.bottleneck.statistics()
        assert np.all(active[0] == 0) and np.all(std > 0)
        cap = iba.analyze(images(1), target=0, model=model, mode="capacity", seed=0)
        assert np.isfinite(cap).all()
        assert float(iba.capacity()[0, 0].abs().sum()) == 0.0

    @pytest.mark.parametrize("size", [1, 2])
    def test_tiny_feature_maps(self, size):
        model = make_model()
        iba = IBA(model.pool)
        model.pool.output_size = size
        model.fc = nn.Linear(8 * size * size, 4)
        iba.estimate(model, loader())
        smap = iba.analyze(images(1), target=0, model=model, seed=0)
        assert smap.shape == (12, 12) and np.isfinite(smap).all() and smap.sum() > 0

    def test_user_given_statistics_need_no_estimate(self, model):
        mean, std = np.zeros((8, 6, 6)), np.full((8, 6, 6), 0.5)
        iba = IBA(model.conv2, feature_mean=mean, feature_std=std)
        smap = iba.analyze(images(1), target=0, model=model, seed=0)
        assert np.isfinite(smap).all() and smap.sum() > 0
        _, used_std, _ = iba.bottleneck.statistics()
        np.testing.assert_array_equal(used_std, 0.5)

    def test_a_loaded_estimator(self, model, iba, tmp_path):
        iba.estimator.save(tmp_path / "e.npz")
        other = IBA(model.conv2, estimator=Estimator.load(tmp_path / "e.npz"))
        a = iba.analyze(images(1), target=0, model=model, seed=0)
        b = other.analyze(images(1), target=0, model=model, seed=0)
        np.testing.assert_array_equal(a, b)

    def test_a_torch_generator_drives_the_noise(self, model, iba):
        maps = [
            iba.analyze(images(1), target=0, model=model, seed=torch.Generator().manual_seed(s))
            for s in (1, 1, 2)
        ]
        np.testing.assert_array_equal(maps[0], maps[1])
        assert not np.array_equal(maps[0], maps[2])

    def test_float64_model(self):
        model = make_model().double()
        iba = IBA(model.conv2)
        iba.estimate(model, (x.double() for x, _ in loader()))
        smap = iba.analyze(images(1).double(), target=0, model=model, seed=0)
        assert smap.dtype == np.float64 and smap.sum() > 0


class TestBadInput:
    def test_analyze_before_estimate(self, model):
        with pytest.raises(RuntimeError, match=r"call estimate\(model, dataloader\)"):
            IBA(model.conv2).analyze(images(1), target=0, model=model)

    def test_unknown_layer_name(self, model):
        with pytest.raises(LookupError, match="'conv9' not found.*conv2"):
            IBA(model, "conv9")

    def test_closure_that_never_runs_the_layer(self, model, iba):
        with pytest.raises(RuntimeError, match="never ran the bottleneck layer"):
            iba.analyze(images(1), lambda x: x.sum())

    def test_layer_outside_the_model(self, model):
        other = make_model()
        iba = IBA(other.conv2)
        with pytest.raises(RuntimeError, match="never ran in the forward pass"):
            iba.estimate(model, loader())

    def test_non_scalar_loss(self, model, iba):
        with pytest.raises(ValueError, match="scalar"):
            iba.analyze(images(1), lambda x: model(x))

    def test_non_finite_loss(self, model, iba):
        with pytest.raises(FloatingPointError, match="nan"):
            iba.analyze(images(1), lambda x: model(x).sum() * float("nan"))

    def test_wrong_rank(self, model, iba):
        with pytest.raises(ValueError, match=r"add a batch axis"):
            iba.analyze(torch.zeros(12), target=0, model=model)

    def test_estimate_of_another_shape(self, model):
        iba = IBA(model.conv2, feature_mean=np.zeros((8, 5, 5)), feature_std=np.ones((8, 5, 5)))
        with pytest.raises(ValueError, match=r"\(8, 6, 6\).*\(8, 5, 5\)"):
            iba.analyze(images(1), target=0, model=model)

    def test_nan_features_during_estimation(self, model):
        def bad():
            yield torch.full((4, 3, 12, 12), float("nan"))

        with pytest.raises(ValueError, match="NaN/inf"):
            IBA(model.conv2).estimate(model, bad())

    def test_target_out_of_range(self, model, iba):
        with pytest.raises(ValueError, match=r"target 7 out of range: the model returns 4 classes \(0..3\)"):
            iba.analyze(images(1), target=7, model=model)

    def test_bad_arguments(self, model):
        with pytest.raises(ValueError, match="batch_size"):
            IBA(model.conv2, batch_size=0)
        with pytest.raises(TypeError, match="torch.nn.Module"):
            IBA("conv2")
        with pytest.raises(ValueError, match="give exactly one of target=.*got none"):
            IBA(model.conv2, feature_mean=np.zeros((8, 6, 6)), feature_std=np.ones((8, 6, 6))).analyze(
                images(1)
            )


class Residual(nn.Module):
    """A skip connection around the bottleneck layer (``conv2``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.fc(torch.relu(self.conv2(h) + h).mean(dim=(2, 3)))


class BatchMean(nn.Module):
    """Reshapes by its input's batch size after the layer: more rows there change the
    output's meaning without an error."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_model()

    def forward(self, x):
        b = x.shape[0]
        inner = self.inner
        h = inner.relu2(inner.conv2(inner.relu1(inner.bn(inner.conv1(x)))))
        h = h.reshape(b, -1, *h.shape[1:]).mean(dim=1)
        return inner.fc(inner.flat(inner.pool(h)))


class TestCopiesAtTheLayer:
    """``analyze(target=...)`` makes the noisy copies at the layer, or falls back."""

    def test_the_layers_before_the_bottleneck_run_once_per_input(self, model, iba):
        rows = []
        model.conv1.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        # One pass of both inputs (a CPU's passes hold one input by default).
        kw = dict(target=[1, 3], model=model, seed=4, optimization_steps=3, inputs_per_pass=2)
        smaps = iba.analyze(images(2), **kw)
        assert iba.bottleneck.copies_made_at == "layer"
        # The clean pass (logits and the layer's features) only: the steps run the model
        # after the layer (tests/test_split.py).
        assert rows == [2]
        rows.clear()
        expected = analyze_with_copies_at_the_input(iba, images(2), **kw)
        assert rows == [2, 20, 20, 20]  # the clean pass, three steps
        # float32: the layers before run on 2 instead of 20 rows (round-off only),
        # amplified a little by three Adam steps.
        np.testing.assert_allclose(smaps, expected, rtol=1e-4, atol=1e-6)

    def test_a_skip_connection_around_the_layer(self):
        model = Residual()
        iba = IBA(model.conv2)
        iba.estimate(model, loader())
        # One input: its features broadcast against its ten noisy copies, as they should.
        one = iba.analyze(images(1), target=1, model=model, seed=0, optimization_steps=3)
        assert iba.bottleneck.copies_made_at == "layer"
        expected = analyze_with_copies_at_the_input(
            iba, images(1), target=1, model=model, seed=0, optimization_steps=3
        )
        np.testing.assert_allclose(one, expected, rtol=1e-4, atol=1e-6)
        # Two inputs in one pass: 2 and 20 rows do not add up, so the copies are made at
        # the input.
        kw = dict(target=[1, 2], model=model, seed=0, optimization_steps=3, inputs_per_pass=2)
        two = iba.analyze(images(2), **kw)
        assert iba.bottleneck.copies_made_at == "input"
        expected = analyze_with_copies_at_the_input(iba, images(2), **kw)
        np.testing.assert_array_equal(two, expected)
        # In passes of one input (a CPU's default) each input's features broadcast.
        one_by_one = iba.analyze(images(2), target=[1, 2], model=model, seed=0, optimization_steps=3)
        assert iba.bottleneck.copies_made_at == "layer"
        np.testing.assert_allclose(one_by_one, expected, rtol=1e-4, atol=1e-6)

    def test_a_model_that_reshapes_by_its_batch_size_is_caught(self):
        model = BatchMean()
        iba = IBA(model.inner.conv2)
        iba.estimate(model, loader())
        smap = iba.analyze(images(1), target=2, model=model, seed=1, optimization_steps=3)
        assert iba.bottleneck.copies_made_at == "input"  # one output row for ten copies
        expected = analyze_with_copies_at_the_input(
            iba, images(1), target=2, model=model, seed=1, optimization_steps=3
        )
        np.testing.assert_array_equal(smap, expected)


class TestModelUntouched:
    def test_after_estimate_and_analyze(self, model):
        model.train()  # a user's model in training mode, with gradients lying around
        model.fc.weight.grad = torch.ones_like(model.fc.weight)
        model.conv1.weight.requires_grad_(False)
        x = images(2)
        before = snapshot(model)
        with torch.no_grad():
            torch.manual_seed(0)
            out_before = model.eval()(x)
            model.train()
            before = snapshot(model)
        iba = IBA(model.conv2)
        iba.estimate(model, loader())
        iba.analyze(x, target=[0, 1], model=model, seed=0)
        with iba.restrict_flow():
            pass
        assert_unchanged(model, before)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), out_before, rtol=0, atol=0)

    @pytest.mark.parametrize("where", ["estimate", "analyze-closure", "analyze-loss"])
    def test_after_an_exception(self, model, where):
        model.train()
        before = snapshot(model)
        iba = IBA(model.conv2)

        def exploding():
            yield next(loader())[0]
            raise KeyboardInterrupt

        if where == "estimate":
            with pytest.raises(KeyboardInterrupt):
                iba.estimate(model, exploding())
        else:
            iba.estimate(model, loader())
            before = snapshot(model)

            def loss(x):
                out = model(x)
                if where == "analyze-closure":
                    raise RuntimeError("boom")
                return out.sum() * float("inf")

            with pytest.raises((RuntimeError, FloatingPointError)):
                iba.analyze(images(1), loss, model=model)
        assert_unchanged(model, before)
        assert iba.bottleneck._mode == "pass"

    def test_no_weight_gradients_are_computed(self, model, iba):
        seen = []
        for p in model.parameters():
            p.register_hook(lambda g: seen.append(g))
        iba.analyze(images(1), target=0, model=model)
        assert seen == []
        assert all(p.grad is None for p in model.parameters())


def test_no_warning_spam_from_tensor_conversion(model, iba):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iba.analyze(images(1), target=0, model=model, seed=0)
