"""The reference library's helpers kept here (iba_core.apps.compat, iba_torch._compat)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest

from iba_core.apps.compat import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    tensor_to_np_img,
    to_saliency_map,
    to_unit_interval,
)
from iba_core.math import saliency_map


def test_to_unit_interval_numpy() -> None:
    x = np.array([[2.0, 4.0], [3.0, 6.0]])
    np.testing.assert_allclose(to_unit_interval(x), [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(to_unit_interval(np.full((2, 3), 7.0)), np.zeros((2, 3)))


def test_to_saliency_map_sums_channels_in_bits_and_keeps_the_total() -> None:
    rng = np.random.default_rng(0)
    cap = rng.uniform(0, 2, size=(5, 4, 6))
    bits = to_saliency_map(cap)
    np.testing.assert_allclose(bits, cap.sum(0) / math.log(2), rtol=1e-12)
    big = to_saliency_map(cap, shape=(16, 24))
    assert big.shape == (16, 24)
    np.testing.assert_allclose(big.sum(), cap.sum() / math.log(2), rtol=1e-10)
    # the same operator as the engine's maps, and channels-last gives the same map
    np.testing.assert_allclose(big, np.asarray(saliency_map(cap[None], (16, 24)))[0], rtol=1e-12)
    np.testing.assert_allclose(to_saliency_map(np.moveaxis(cap, 0, -1), (16, 24), "channels_last"), big)
    batch = to_saliency_map(np.stack([cap, 2 * cap]), (16, 24))
    np.testing.assert_allclose(batch[1], 2 * big, rtol=1e-12)


def test_to_saliency_map_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="data_format"):
        to_saliency_map(np.ones((2, 3, 3)), data_format="NCHW")
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        to_saliency_map(np.ones((3, 3)))
    with pytest.raises(ValueError, match="height, width"):
        to_saliency_map(np.ones((2, 3, 3)), shape=(4,))


def test_tensor_to_np_img_undoes_the_normalisation() -> None:
    rng = np.random.default_rng(1)
    raw = rng.uniform(0, 1, size=(8, 5, 3))  # (H, W, C) in [0, 1]
    normalised = np.moveaxis((raw - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), -1, 0)
    np.testing.assert_allclose(tensor_to_np_img(normalised), raw, atol=1e-12)
    grey = rng.uniform(0, 1, size=(1, 4, 4))
    np.testing.assert_allclose(
        tensor_to_np_img((grey - 0.5) / 0.25, mean=0.5, std=0.25), np.moveaxis(grey, 0, -1)
    )
    with pytest.raises(ValueError, match="one per channel"):
        tensor_to_np_img(grey, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="index the batch"):
        tensor_to_np_img(grey[None])


@pytest.mark.torch
def test_torch_helpers_take_tensors_and_keep_type() -> None:
    torch = pytest.importorskip("torch")
    import iba_torch

    x = torch.tensor([[1.0, 3.0], [2.0, 5.0]], dtype=torch.float32)
    scaled = iba_torch.to_unit_interval(x)
    assert isinstance(scaled, torch.Tensor) and scaled.dtype == torch.float32
    torch.testing.assert_close(scaled, torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    img = torch.randn(3, 6, 7)
    out = iba_torch.tensor_to_np_img(img)
    assert isinstance(out, np.ndarray) and out.shape == (6, 7, 3)
    np.testing.assert_allclose(out[..., 1], img[1].double().numpy() * 0.224 + 0.456, rtol=0, atol=1e-12)
    cap = torch.rand(4, 3, 3, dtype=torch.float64)
    np.testing.assert_allclose(iba_torch.to_saliency_map(cap), cap.sum(0).numpy() / math.log(2))


@pytest.mark.torch
def test_insert_into_sequential() -> None:
    torch = pytest.importorskip("torch")
    from iba_torch import IBA, insert_into_sequential

    conv, relu, pool = torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
    seq = torch.nn.Sequential(conv, relu, pool)
    iba = IBA()
    new = insert_into_sequential(seq, iba, 2)
    assert list(new) == [conv, relu, iba, pool] and new[2] is iba
    assert list(seq) == [conv, relu, pool]  # the original is unchanged
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(new(x), seq(x))  # IBA() is the identity while inactive
    named = torch.nn.Sequential(OrderedDict([("conv", conv), ("relu", relu)]))
    new_named = insert_into_sequential(named, iba, -1, name="bottleneck")
    assert [n for n, _ in new_named.named_children()] == ["conv", "bottleneck", "relu"]
    with pytest.raises(ValueError, match="already has a child called 'conv'"):
        insert_into_sequential(named, torch.nn.Identity(), 0, name="conv")
    with pytest.raises(ValueError, match="already a child"):
        insert_into_sequential(seq, conv, 0)
    with pytest.raises(TypeError, match="nn.Sequential"):
        insert_into_sequential([conv], iba, 0)  # type: ignore[arg-type]


def test_compat_module_imports_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, iba_core.apps.compat, iba_torch; "
        "iba_torch.to_unit_interval; "  # a lazy export of the core helper
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
