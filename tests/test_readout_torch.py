"""The Readout Bottleneck on PyTorch: the shared suite and the ``IBAReadout`` front."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

from iba_core import FewSamplesWarning
from iba_core.testing import ReadoutCase, ReadoutTests
from iba_core.testing._readout_suite import (
    BOTTLENECK_LAYER,
    READOUT_LAYERS,
    blob_images,
    readout_reference_weights,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: these models are tiny, and on a busy CPU extra threads only
    wait on each other (measured ten times slower).  Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """The suite's reference network (see ``readout_reference_weights``)."""
    nn = torch.nn
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 8, 3, stride=2, padding=1),
            relu2=nn.ReLU(),
            conv3=nn.Conv2d(8, 8, 3, stride=2, padding=1),
            relu3=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            logits=nn.Linear(8, 5),
        )
    )
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    return model.eval()


def to_inputs(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images)


def make_case() -> ReadoutCase:
    return ReadoutCase(
        backend="torch",
        make_model=make_model,
        to_inputs=to_inputs,
        layer_of=lambda model, name: dict(model.named_modules())[name],
    )


class TestTorchReadout(ReadoutTests):
    @pytest.fixture(scope="class")
    @classmethod
    def readout_case(cls) -> ReadoutCase:
        return make_case()


# -- the PyTorch front -------------------------------------------------------------------
def _loader(n: int, seed: int, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = blob_images(n, seed)
    return [
        (torch.as_tensor(images[i : i + batch]), torch.as_tensor(labels[i : i + batch]))
        for i in range(0, n, batch)
    ]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def trained_front() -> tuple[Any, torch.nn.Module]:
    from iba_torch import IBAReadout

    model = make_model(readout_reference_weights())
    readout = IBAReadout(model.relu2, [model.relu2, "relu3", model.logits], model)
    loader = _loader(128, 1)
    with pytest.warns(FewSamplesWarning):
        readout.estimate(model, loader)
    readout.train(model, loader, epochs=3, lr=3e-2, seed=0, warn=False)
    return readout, model


class TestIBAReadoutFront:
    def test_analyze_returns_numpy_maps_like_iba(self, trained_front: Any) -> None:
        readout, _ = trained_front
        x = torch.as_tensor(blob_images(3, 5)[0])
        maps = readout.analyze(x)
        assert isinstance(maps, np.ndarray) and maps.shape == (3, 12, 12)
        one = readout.analyze(x[:1])
        assert one.shape == (12, 12)
        np.testing.assert_allclose(one, maps[0], rtol=1e-5, atol=1e-7)
        cap = readout.analyze(x, mode="capacity")
        assert cap.shape == (3, 6, 6)
        np.testing.assert_allclose(cap.sum((1, 2)), maps.sum((1, 2)), rtol=1e-4)
        assert readout.capacity().shape == (3, 8, 6, 6)

    def test_model_flags_hooks_and_weights_unchanged(self) -> None:
        from iba_torch import IBAReadout

        model = make_model(readout_reference_weights())
        model.train()
        model.logits.weight.requires_grad_(False)
        flags = [
            (m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()
        ]
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.as_tensor(blob_images(4, 9)[0])
        with torch.no_grad():
            before = model.eval()(x).clone()
        model.train()
        readout = IBAReadout("relu2", list(READOUT_LAYERS), model)
        loader = _loader(64, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FewSamplesWarning)
            readout.estimate(model, loader)
        readout.train(model, loader, epochs=1, lr=1e-2, warn=False)
        readout.analyze(x)
        assert _hooks(model) == 0
        assert [
            (m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()
        ] == flags
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k])
        assert all(p.grad is None for p in model.parameters())
        with torch.no_grad():
            np.testing.assert_array_equal(model.eval()(x).numpy(), before.numpy())

    def test_a_failing_call_leaves_no_hook(self) -> None:
        from iba_torch import IBAReadout

        model = make_model(readout_reference_weights())
        readout = IBAReadout("relu2", list(READOUT_LAYERS), model)
        with pytest.raises(TypeError, match="tensors"):
            readout.estimate(model, [("not a tensor", 0)])
        assert _hooks(model) == 0

    def test_targets_are_indexed_per_sample(self, trained_front: Any) -> None:
        # Each batch's labels reach the loss in the batch's order, one per sample; without
        # labels, each input's predicted class is used.
        from iba_core.engines import target_cross_entropy

        readout, model = trained_front
        loader = _loader(40, 2, batch=16)
        seen: list[np.ndarray] = []

        def loss(output: torch.Tensor, targets: Any) -> torch.Tensor:
            seen.append(np.asarray(targets))
            return target_cross_entropy(output, targets)

        shuffled = [
            (x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]) for x, y in loader
        ]
        readout.evaluate(model, shuffled, beta=0)  # default loss: no error for any order
        readout.train(model, shuffled, epochs=1, lr=1e-9, model_loss_fn=loss)
        assert [s.tolist() for s in seen] == [y.tolist() for _, y in shuffled]
        # Without labels the default loss explains the predicted class: the same loss
        # (same noise seed) as with the predicted labels given.
        with torch.no_grad():
            predicted = [(x, model(x).argmax(1)) for x, _ in loader]
        unlabelled = readout.evaluate(model, [x for x, _ in loader], beta=0, seed=3)
        assert unlabelled == readout.evaluate(model, predicted, beta=0, seed=3)
        assert unlabelled != readout.evaluate(model, shuffled, beta=0, seed=3)

    def test_layers_not_in_the_model_are_refused(self) -> None:
        from iba_torch import IBAReadout

        model = make_model(readout_reference_weights())
        with pytest.raises(LookupError, match="conv9"):
            IBAReadout("relu2", ["relu3", "conv9"], model)
        stranger = torch.nn.ReLU()
        with pytest.raises(ValueError, match="not a submodule"):
            IBAReadout("relu2", [stranger], model)
        with pytest.raises(ValueError, match="not a submodule"):
            IBAReadout(stranger, ["relu3"], model)

    def test_analyze_before_training_is_refused(self) -> None:
        from iba_torch import IBAReadout

        model = make_model(readout_reference_weights())
        readout = IBAReadout("relu2", list(READOUT_LAYERS), model)
        x = torch.as_tensor(blob_images(2, 0)[0])
        with pytest.raises(RuntimeError, match="estimate"):
            readout.analyze(x)
        with pytest.raises(RuntimeError, match="estimate"):
            readout.train(model, _loader(32, 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FewSamplesWarning)
            readout.estimate(model, _loader(32, 0))
        with pytest.raises(RuntimeError, match="not trained"):
            readout.analyze(x)

    def test_save_load_round_trip(self, trained_front: Any, tmp_path: Any) -> None:
        from iba_torch import IBAReadout

        readout, model = trained_front
        x = torch.as_tensor(blob_images(4, 6)[0])
        path = tmp_path / "readout.npz"
        readout.save(path)
        loaded = IBAReadout("relu2", list(READOUT_LAYERS), model).load(path)
        np.testing.assert_array_equal(loaded.analyze(x), readout.analyze(x))
        again = IBAReadout("relu2", list(READOUT_LAYERS), model)
        again.load_state_dict(readout.state_dict())
        np.testing.assert_array_equal(again.analyze(x), readout.analyze(x))

    def test_wrong_weights_are_refused(self, trained_front: Any) -> None:
        from iba_torch import IBAReadout

        readout, model = trained_front
        state = readout.state_dict()
        other = IBAReadout("relu2", ["relu2", "logits"], model)
        with pytest.raises(ValueError, match="readout layers"):
            other.load_state_dict(state)
        state["head.w3"] = np.zeros((16, 4), dtype=np.float32)
        with pytest.raises(ValueError, match="'w3' has shape"):
            IBAReadout("relu2", list(READOUT_LAYERS), model).load_state_dict(state)

    def test_head_matches_torch_conv2d(self, trained_front: Any) -> None:
        # The head's matrix products are 1x1 convolutions: the same numbers as nn.Conv2d.
        readout, _ = trained_front
        head = readout.readout.head
        state = readout.state_dict()
        params = {name: state[f"head.{name}"] for name, _ in head.layout}
        convs = []
        for i in (1, 2, 3):
            w = torch.as_tensor(params[f"w{i}"].T.copy())[:, :, None, None]
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 1)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(torch.as_tensor(params[f"b{i}"]))
            convs.append(conv)
        net = torch.nn.Sequential(convs[0], torch.nn.ReLU(), convs[1], torch.nn.ReLU(), convs[2])
        x = torch.randn(2, head.in_channels, 6, 6, generator=torch.Generator().manual_seed(0))
        flat = torch.as_tensor(np.concatenate([params[n].ravel() for n, _ in head.layout]))
        with torch.no_grad():
            expected = net(x).clamp(-5, 5)
        np.testing.assert_allclose(head(flat, x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)

    def test_readout_input_matches_torch_interpolate(self) -> None:
        from iba_core.engines import readout_input

        x = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(1))
        one, zero = torch.ones(3, 3, 3), torch.zeros(3, 3, 3)
        got = readout_input([x], [zero], [one], (6, 6))
        expected = torch.nn.functional.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)

    def test_detach(self, trained_front: Any) -> None:
        from iba_torch import IBAReadout

        _, model = trained_front
        readout = IBAReadout(BOTTLENECK_LAYER, list(READOUT_LAYERS), model)
        readout.detach()
        assert _hooks(model) == 0
        with pytest.raises(RuntimeError, match="detached"):
            readout.estimate(model, _loader(32, 0))
