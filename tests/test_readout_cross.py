"""A readout trained on one framework, loaded on the other, gives the same maps.

The suite's reference network is built in PyTorch and in Keras from the same NumPy
weights; the readout's state (head weights and feature statistics) is plain NumPy, so
it moves between them as it is.  Needs both frameworks.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from iba_core import FewSamplesWarning, ReadoutBottleneck, get_backend
from iba_core.math import saliency_map
from iba_core.testing._readout_suite import (
    BOTTLENECK_LAYER,
    IMAGE_SIZE,
    READOUT_LAYERS,
    blob_images,
    estimate,
    readout_reference_weights,
)

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytestmark = [pytest.mark.torch, pytest.mark.tf]

from test_readout_tf import make_case as tf_case  # noqa: E402
from test_readout_torch import make_case as torch_case  # noqa: E402

# Same float32 network in two frameworks: features agree to a few ulps, which the head
# and the capacity (a sum of squares and logs) carry through: ~2e-7 relative measured.
TOL = {"rtol": 2e-5, "atol": 2e-6}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained(case: Any, epochs: int = 2) -> tuple[ReadoutBottleneck, Any]:
    backend = get_backend(case.backend)
    model = case.make_model(readout_reference_weights())
    readout = ReadoutBottleneck(backend, model, BOTTLENECK_LAYER, list(READOUT_LAYERS))
    batches = estimate(readout, case, n=64)
    with backend.frozen(model):
        readout.train(batches, epochs=epochs, lr=3e-2, seed=0)
    return readout, model


def _maps(readout: ReadoutBottleneck, case: Any, images: np.ndarray) -> tuple[np.ndarray, ...]:
    backend = readout.backend
    with backend.frozen(readout.model):
        cap = readout.analyze(case.to_inputs(images))
    return (backend.to_numpy(saliency_map(cap, IMAGE_SIZE)), backend.to_numpy(readout.alpha))


@pytest.mark.parametrize(
    "source, target", [(torch_case, tf_case), (tf_case, torch_case)], ids=["torch-to-tf", "tf-to-torch"]
)
def test_weights_move_between_frameworks(source: Any, target: Any) -> None:
    src_case, dst_case = source(), target()
    readout, _ = _trained(src_case)
    images = blob_images(6, 11)[0]
    expected_maps, expected_alpha = _maps(readout, src_case, images)

    dst_model = dst_case.make_model(readout_reference_weights())
    dst = ReadoutBottleneck(get_backend(dst_case.backend), dst_model, BOTTLENECK_LAYER, list(READOUT_LAYERS))
    dst.load_state_dict(readout.state_dict())
    maps, alpha = _maps(dst, dst_case, images)
    assert maps.shape == expected_maps.shape == (6, *IMAGE_SIZE)
    np.testing.assert_allclose(alpha, expected_alpha, **TOL)
    np.testing.assert_allclose(maps, expected_maps, rtol=2e-5, atol=1e-6 * expected_maps.max())
    # The maps are not trivial: they differ between images.
    assert np.std(expected_maps.reshape(6, -1).sum(1)) > 0


def test_fronts_share_the_npz_file(tmp_path: Any) -> None:
    """``iba_torch.IBAReadout.save`` -> ``iba_tf.IBAReadout.load``, channels-last inputs."""
    import iba_tf
    import iba_torch

    torch_model = torch_case().make_model(readout_reference_weights())
    keras_model = tf_case().make_model(readout_reference_weights())
    images, labels = blob_images(64, 1)
    loader = [(torch.as_tensor(images[i : i + 32]), torch.as_tensor(labels[i : i + 32])) for i in (0, 32)]
    readout = iba_torch.IBAReadout("relu2", list(READOUT_LAYERS), torch_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        readout.estimate(torch_model, loader)
    readout.train(torch_model, loader, epochs=2, lr=3e-2, seed=0)
    path = tmp_path / "readout.npz"
    readout.save(path)

    keras_readout = iba_tf.IBAReadout("relu2", list(READOUT_LAYERS), keras_model).load(path)
    test = blob_images(3, 12)[0]
    expected = readout.analyze(torch.as_tensor(test))
    got = keras_readout.analyze(np.transpose(test, (0, 2, 3, 1)))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6 * expected.max())
    assert keras_readout.steps == readout.steps == 4
