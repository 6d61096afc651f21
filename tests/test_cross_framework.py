"""Same model, same seed, same answer: PyTorch, TensorFlow/Keras and JAX/Flax agree.

One small conv net is built in both frameworks with the same weights (Keras kernels are
``(kh, kw, in, out)``, PyTorch's ``(out, in, kh, kw)``; images are channels-last in Keras,
channels-first in PyTorch).  With the same estimation data and the backend-independent
noise source (``noise="numpy"`` with a seed: the same standard-normal draws on both sides)
the two backends must give the same estimate and the same saliency map.  The same net in
Flax NNX (kernels ``(kh, kw, in, out)`` like Keras, images channels-last), explained through
the generic front ``iba_core.IBA`` of the ``iba-jax`` plugin, must agree with PyTorch too;
those tests are skipped when the plugin is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = [
    pytest.mark.tf,
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning"),
]

import iba_core  # noqa: E402
from iba_tf import IBACopy  # noqa: E402
from iba_torch import IBA  # noqa: E402

jax_only = pytest.mark.skipif(
    "jax" not in iba_core.available_backends(),
    reason="the JAX backend is not installed (pip install ./plugins/iba-jax)",
)

N_CLASSES = 4


def weights(dtype: str) -> dict[str, np.ndarray]:
    """Channels-first (PyTorch-layout) weights of the shared architecture.

    Scaled up (x6 a fan-in normalised draw) so the logits are confident and the model
    term of the loss matters: the maps then carry ~100 bits and depend on the noise
    draw, which keeps the agreement tests from passing on a trivial map.
    """
    rng = np.random.default_rng(42)
    shapes = {"conv1": (6, 3, 3, 3), "conv2": (8, 6, 3, 3), "conv3": (8, 8, 3, 3), "fc": (N_CLASSES, 8)}
    out = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        out[name] = (rng.standard_normal(shape) * 6 / np.sqrt(fan_in)).astype(dtype)
        out[name + "_b"] = (rng.standard_normal(shape[0]) * 0.1).astype(dtype)
    return out


def torch_net(dtype: str) -> torch.nn.Module:
    """3x16x16 -> conv 6 -> ReLU -> avgpool -> conv 8 -> ReLU [index 4: 8x8x8] -> conv 8
    -> ReLU -> global average -> 4 logits."""
    w = weights(dtype)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, N_CLASSES),
    ).to(getattr(torch, dtype))
    with torch.no_grad():
        for idx, name in [(0, "conv1"), (3, "conv2"), (5, "conv3"), (9, "fc")]:
            net[idx].weight.copy_(torch.from_numpy(w[name]))
            net[idx].bias.copy_(torch.from_numpy(w[name + "_b"]))
    return net.eval()


def keras_net(dtype: str) -> keras.Model:
    """The same network, channels-last; 'relu2' is the bottleneck layer (8x8x8)."""
    w = weights(dtype)
    layers = keras.layers
    inputs = keras.Input((16, 16, 3), dtype=dtype)
    x = layers.Conv2D(6, 3, padding="same", dtype=dtype, name="conv1")(inputs)
    x = layers.ReLU(dtype=dtype, name="relu1")(x)
    x = layers.AveragePooling2D(2, dtype=dtype, name="pool")(x)
    x = layers.Conv2D(8, 3, padding="same", dtype=dtype, name="conv2")(x)
    x = layers.ReLU(dtype=dtype, name="relu2")(x)
    x = layers.Conv2D(8, 3, padding="same", dtype=dtype, name="conv3")(x)
    x = layers.ReLU(dtype=dtype, name="relu3")(x)
    x = layers.GlobalAveragePooling2D(dtype=dtype, name="gap")(x)
    outputs = layers.Dense(N_CLASSES, dtype=dtype, name="fc")(x)
    model = keras.Model(inputs, outputs)
    for name in ("conv1", "conv2", "conv3"):
        model.get_layer(name).set_weights([w[name].transpose(2, 3, 1, 0), w[name + "_b"]])
    model.get_layer("fc").set_weights([w["fc"].T, w["fc_b"]])
    return model


def data(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Estimation images and two images to explain, channels-first."""
    rng = np.random.default_rng(7)
    return (
        rng.standard_normal((96, 3, 16, 16)).astype(dtype),
        rng.standard_normal((2, 3, 16, 16)).astype(dtype),
    )


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def explain_torch(dtype: str, **kwargs):
    estimation, images = data(dtype)
    net = torch_net(dtype)
    iba_t = IBA(net[4])
    iba_t.estimate(net, [torch.from_numpy(estimation[i : i + 32]) for i in range(0, 96, 32)])
    map_t = iba_t.analyze(torch.from_numpy(images), target=[1, 3], model=net, seed=3, noise="numpy", **kwargs)
    return iba_t.estimator, map_t, iba_t.capacity().detach().numpy()


def explain_both(dtype: str, **kwargs):
    estimation, images = data(dtype)
    targets = [1, 3]
    est_t, map_t, cap_t = explain_torch(dtype, **kwargs)

    iba_k = IBACopy(keras_net(dtype), "relu2")
    iba_k.estimate(nhwc(estimation), batch_size=32)
    map_k = iba_k.analyze(nhwc(images), target=targets, seed=3, noise="numpy", **kwargs)
    cap_k = iba_k.capacity().numpy()
    return (est_t, map_t, cap_t), (iba_k.estimator, map_k, cap_k)


def test_models_agree_before_any_bottleneck():
    _, images = data("float64")
    logits_t = torch_net("float64")(torch.from_numpy(images)).detach().numpy()
    logits_k = keras_net("float64")(nhwc(images)).numpy()
    np.testing.assert_allclose(logits_k, logits_t, rtol=1e-12, atol=1e-13)


def test_same_estimate_and_saliency_map_float64():
    """float64 on both sides.

    float32 would not do for the map: Adam with lr=1 divides each gradient by its own
    running magnitude, so an element whose gradient is almost zero takes a full-size step
    in the direction of its round-off, and the two frameworks' different summation orders
    (im2col vs. oneDNN) could then move such elements differently.  In float64 the same
    amplification acts on round-off of ~1e-16: ten steps of it stay below 1e-9 relative
    (measured: 6e-15), far inside float32 round-off, the design target.
    """
    (est_t, map_t, cap_t), (est_k, map_k, cap_k) = explain_both("float64")
    assert est_t.n == est_k.n == 96
    assert est_k.shape == est_t.shape == (8, 8, 8)
    # The same float64 features summed in the same order: equal to a few ulps.
    np.testing.assert_allclose(est_k.mean(), est_t.mean(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(est_k.std(), est_t.std(), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(est_k.active_fraction(), est_t.active_fraction())

    assert map_t.shape == map_k.shape == (2, 16, 16)
    assert np.all(map_t.reshape(2, -1).sum(axis=1) > 10)  # a map far from trivial
    np.testing.assert_allclose(cap_k, cap_t, rtol=1e-9, atol=1e-12 * np.abs(cap_t).max())
    np.testing.assert_allclose(map_k, map_t, rtol=1e-9, atol=1e-12 * np.abs(map_t).max())


def test_float32_agrees_to_float32_round_off():
    """float32 models, as most users run them.

    The features differ by the frameworks' float32 round-off only (each goes through ~60
    multiply-adds: ~1e-6 relative) and the estimator's float64 accumulation adds nothing.
    The map may carry Adam's amplification of that round-off (see the float64 test); here
    no element's gradient is near zero except inactive ones (exactly zero on both sides),
    so the maps agree to ~2e-7 of their maximum (measured); 1e-4 leaves room for other
    CPUs' convolution algorithms while still catching any real disagreement (a different
    noise draw changes the map by ~10% of its maximum).
    """
    (est_t, map_t, _), (est_k, map_k, _) = explain_both("float32")
    scale = np.abs(est_t.mean()).max()
    np.testing.assert_allclose(est_k.mean(), est_t.mean(), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(est_k.std(), est_t.std(), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(map_k, map_t, rtol=0, atol=1e-4 * np.abs(map_t).max())
    np.testing.assert_allclose(map_k.reshape(2, -1).sum(axis=1), map_t.reshape(2, -1).sum(axis=1), rtol=1e-4)


def test_a_different_seed_gives_a_different_map():
    """The agreement above is not vacuous: the map depends on the noise."""
    _, images = data("float64")
    estimation, _ = data("float64")
    iba_k = IBACopy(keras_net("float64"), "relu2")
    iba_k.estimate(nhwc(estimation))
    a = iba_k.analyze(nhwc(images[:1]), target=1, seed=3, noise="numpy")
    b = iba_k.analyze(nhwc(images[:1]), target=1, seed=4, noise="numpy")
    assert a.sum() > 10
    assert np.max(np.abs(a - b)) > 3e-2 * np.abs(a).max()


# -- JAX / Flax NNX --------------------------------------------------------------------
def flax_net(dtype: str):
    """The same network in Flax NNX, channels-last; the submodule 'relu2' is the bottleneck
    layer (8x8x8)."""
    import jax.numpy as jnp
    from flax import nnx

    class Act(nnx.Module):
        def __call__(self, x):
            return nnx.relu(x)

    class Net(nnx.Module):
        def __init__(self) -> None:
            rngs, kw = nnx.Rngs(0), {"dtype": dtype, "param_dtype": dtype}
            self.conv1 = nnx.Conv(3, 6, (3, 3), padding=1, rngs=rngs, **kw)
            self.conv2 = nnx.Conv(6, 8, (3, 3), padding=1, rngs=rngs, **kw)
            self.conv3 = nnx.Conv(8, 8, (3, 3), padding=1, rngs=rngs, **kw)
            self.relu1, self.relu2, self.relu3 = Act(), Act(), Act()
            self.fc = nnx.Linear(8, N_CLASSES, rngs=rngs, **kw)

        def __call__(self, x):
            x = nnx.avg_pool(self.relu1(self.conv1(x)), (2, 2), strides=(2, 2))
            x = self.relu3(self.conv3(self.relu2(self.conv2(x))))
            return self.fc(x.mean(axis=(1, 2)))

    net, w = Net(), weights(dtype)
    for name in ("conv1", "conv2", "conv3"):
        getattr(net, name).kernel.set_value(jnp.asarray(w[name].transpose(2, 3, 1, 0)))
        getattr(net, name).bias.set_value(jnp.asarray(w[name + "_b"]))
    net.fc.kernel.set_value(jnp.asarray(w["fc"].T))
    net.fc.bias.set_value(jnp.asarray(w["fc_b"]))
    return net


@pytest.fixture
def jax_x64():
    """64-bit floats in JAX for the test (``jax_enable_x64``), switched back afterwards."""
    import jax

    saved = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", saved)


def explain_flax(dtype: str):
    import jax.numpy as jnp

    estimation, images = data(dtype)
    iba_j = iba_core.IBA(flax_net(dtype), "relu2")
    iba_j.estimate(jnp.asarray(nhwc(estimation)), batch_size=32)
    map_j = iba_j.analyze(jnp.asarray(nhwc(images)), target=[1, 3], seed=3, noise="numpy")
    return iba_j.estimator, map_j, np.asarray(iba_j.capacity())


@jax_only
def test_flax_agrees_with_pytorch_float64(jax_x64):
    """The float64 agreement of PyTorch and Keras above, for Flax through the generic front
    and the compiled (``jax.jit``) step."""
    est_t, map_t, cap_t = explain_torch("float64")
    est_j, map_j, cap_j = explain_flax("float64")
    assert est_j.n == 96 and est_j.shape == (8, 8, 8)
    np.testing.assert_allclose(est_j.mean(), est_t.mean(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(est_j.std(), est_t.std(), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(est_j.active_fraction(), est_t.active_fraction())
    assert map_j.shape == (2, 16, 16) and map_j.dtype == map_t.dtype
    np.testing.assert_allclose(cap_j, cap_t, rtol=1e-9, atol=1e-12 * np.abs(cap_t).max())
    np.testing.assert_allclose(map_j, map_t, rtol=1e-9, atol=1e-12 * np.abs(map_t).max())


@jax_only
def test_flax_agrees_with_pytorch_float32():
    """float32, to float32 round-off (see test_float32_agrees_to_float32_round_off)."""
    est_t, map_t, _ = explain_torch("float32")
    est_j, map_j, _ = explain_flax("float32")
    scale = np.abs(est_t.mean()).max()
    np.testing.assert_allclose(est_j.mean(), est_t.mean(), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(est_j.std(), est_t.std(), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(map_j, map_t, rtol=0, atol=1e-4 * np.abs(map_t).max())
    np.testing.assert_allclose(map_j.reshape(2, -1).sum(axis=1), map_t.reshape(2, -1).sum(axis=1), rtol=1e-4)
