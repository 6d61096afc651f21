"""Abstract conformance tests of the Readout Bottleneck on a backend.

A backend builds the suite's reference network (:func:`readout_reference_weights`, see
:class:`ReadoutCase`) in its framework, provides a class-scoped ``readout_case`` fixture
(a classmethod: see :mod:`iba_core.testing` on fixtures in classes) and inherits
:class:`ReadoutTests`::

    class TestMyReadout(ReadoutTests):
        @pytest.fixture(scope="class")
        @classmethod
        def readout_case(cls):
            return ReadoutCase(backend="mybackend", make_model=..., to_inputs=...,
                               layer_of=...)

The data are small coloured blobs on a faint noise background; the reference network
classifies a blob's colour wherever it is, so an attribution map should light up the
blob.  The readout is trained once per class (a few seconds) and shared by the tests.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ..contract import Backend, get_backend
from ..engines import (
    Bottleneck,
    FewSamplesWarning,
    ReadoutBottleneck,
    ReadoutHead,
    readout_input,
    target_cross_entropy,
)
from ..math import saliency_map
from ._suite import bottleneck_on

#: Colours of the five classes (unit RGB vectors).
BLOB_COLOURS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=np.float64)
BLOB_COLOURS /= np.linalg.norm(BLOB_COLOURS, axis=1, keepdims=True)
N_CLASSES = 5
IMAGE_SIZE = (12, 12)
#: The bottleneck layer, the readout layers, and their channels-first feature shapes.
BOTTLENECK_LAYER = "relu2"
READOUT_LAYERS = ("relu2", "relu3", "logits")
FEATURE_SHAPES = {"relu2": (8, 6, 6), "relu3": (8, 3, 3), "logits": (5,)}

# Training recipe of the suite (the reference's lr of 1e-5 needs far more steps than a
# unit test can afford).
TRAIN_IMAGES, TRAIN_BATCH, TRAIN_EPOCHS, TRAIN_LR = 256, 32, 16, 2e-2
HELD_OUT = 8


def readout_reference_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights of the suite's reference network, PyTorch layout.

    The network, channels-first input ``(N, 3, 12, 12)``::

        conv1   3 -> 8, 3x3, padding 1            relu1
        conv2   8 -> 8, 3x3, stride 2, padding 1  relu2   (8, 6, 6)  <- the bottleneck
        conv3   8 -> 8, 3x3, stride 2, padding 1  relu3   (8, 3, 3)
        global average pooling, logits 8 -> 5                (5,)

    Padding is 1 on every side (in Keras: ``ZeroPadding2D(1)`` and a ``"valid"``
    convolution).  Convolution weights are ``(out, in, kh, kw)``, the dense layer's
    ``(out, in)``.  Filters 0-4 of ``conv1`` detect the five class colours, ``conv2`` and
    ``conv3`` mostly pass each channel on, and logit ``k`` reads channel ``k``: a
    classifier of the blob's colour, built rather than trained so every backend gets it
    exactly.
    """
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    centre = np.array([[0.3, 0.5, 0.3], [0.5, 1.0, 0.5], [0.3, 0.5, 0.3]])
    conv1 = rng.standard_normal((8, 3, 3, 3)) * 0.05
    conv1[:5] += BLOB_COLOURS[:, :, None, None] * centre
    w["conv1.weight"] = conv1
    w["conv1.bias"] = np.concatenate([np.full(5, -0.5), rng.standard_normal(3) * 0.1])
    for name in ("conv2", "conv3"):
        conv = rng.standard_normal((8, 8, 3, 3)) * 0.05
        conv[np.arange(8), np.arange(8)] += 0.4
        w[f"{name}.weight"], w[f"{name}.bias"] = conv, np.zeros(8)
    logits = rng.standard_normal((N_CLASSES, 8)) * 0.1
    logits[:, :N_CLASSES] += np.eye(N_CLASSES) * 10.0
    w["logits.weight"], w["logits.bias"] = logits, np.zeros(N_CLASSES)
    return {k: v.astype(np.float32) for k, v in w.items()}


def blob_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, 3, 12, 12)`` float32 (channels-first) and their class labels.

    Each holds one Gaussian blob (std 1.5 px, amplitude 2) in its class's colour at a
    random position, on a background of N(0, 0.1^2) noise.
    """
    rng = np.random.default_rng(seed)
    h, w = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    images = rng.standard_normal((n, 3, h, w)) * 0.1
    labels = rng.integers(0, N_CLASSES, n)
    for i in range(n):
        cy, cx = rng.uniform(1, h - 1), rng.uniform(1, w - 1)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
        images[i] += 2.0 * BLOB_COLOURS[labels[i]][:, None, None] * blob
    return images.astype(np.float32), labels.astype(np.int64)


@dataclasses.dataclass
class ReadoutCase:
    """What a backend supplies to :class:`ReadoutTests`.

    Attributes:
        backend: the registered backend name.
        make_model: ``weights -> model``: the reference network (see
            :func:`readout_reference_weights`) with these weights, returning logits, with
            layers named ``relu2``, ``relu3`` and ``logits`` (others as the framework likes).
        to_inputs: ``images -> inputs``: NumPy ``(N, 3, 12, 12)`` channels-first images as
            the model's input (a channels-last framework transposes them).
        layer_of: ``(model, name) -> layer object``.
        train_options: extra keyword arguments of :meth:`ReadoutBottleneck.train` for
            the suite's training run (e.g. ``{"compile": ...}``).
        float64: whether the backend computes in float64; the float64 checks of the
            readout's pieces are skipped (and the gradient checked in float32) otherwise.
    """

    backend: str
    make_model: Callable[[dict[str, np.ndarray]], Any]
    to_inputs: Callable[[np.ndarray], Any]
    layer_of: Callable[[Any, str], Any]
    train_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    float64: bool = True


@dataclasses.dataclass
class TrainedReadout:
    """A readout trained by the suite, and what the tests compare."""

    readout: ReadoutBottleneck
    model: Any
    history: list[float]
    loss_before: float
    loss_after: float
    readout_maps: np.ndarray
    per_sample_maps: np.ndarray
    correlations: np.ndarray
    held_out: Any


def make_readout(case: ReadoutCase, model: Any, **kwargs: Any) -> ReadoutBottleneck:
    return ReadoutBottleneck(
        get_backend(case.backend), model, BOTTLENECK_LAYER, list(READOUT_LAYERS), **kwargs
    )


def estimate(readout: ReadoutBottleneck, case: ReadoutCase, n: int | None = None, seed: int = 1) -> list[Any]:
    """Estimate on ``n`` training images (default: the recipe's); returns the batches."""
    n = TRAIN_IMAGES if n is None else n
    images, labels = blob_images(n, seed)
    batches = [
        (case.to_inputs(images[i : i + TRAIN_BATCH]), labels[i : i + TRAIN_BATCH])
        for i in range(0, n, TRAIN_BATCH)
    ]
    backend = readout.backend
    with backend.frozen(readout.model), warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        readout.estimate(x for x, _ in batches)
    return batches


def train_reference_readout(case: ReadoutCase) -> TrainedReadout:
    """Estimate, train and explain with the suite's recipe; used by the tests and by the
    cross-backend test."""
    backend = get_backend(case.backend)
    model = case.make_model(readout_reference_weights())
    readout = make_readout(case, model)
    batches = estimate(readout, case)
    eval_images, eval_labels = blob_images(64, 2)
    evaluation = [(case.to_inputs(eval_images), eval_labels)]
    with backend.frozen(model):
        before = readout.evaluate(evaluation, seed=0)
        history = readout.train(batches, epochs=TRAIN_EPOCHS, lr=TRAIN_LR, seed=0, **case.train_options)
        after = readout.evaluate(evaluation, seed=0)
    images, labels = blob_images(HELD_OUT, 3)
    x = case.to_inputs(images)
    with backend.frozen(model):
        readout_maps = backend.to_numpy(saliency_map(readout.analyze(x), IMAGE_SIZE))
    per_sample = per_sample_maps(backend, model, readout.bottleneck, x, labels)
    corr = np.array(
        [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(readout_maps, per_sample, strict=True)]
    )
    return TrainedReadout(readout, model, history, before, after, readout_maps, per_sample, corr, x)


def per_sample_maps(
    backend: Backend, model: Any, bottleneck: Bottleneck, x: Any, labels: np.ndarray
) -> np.ndarray:
    """Per-Sample Bottleneck maps (reference settings) for the same layer and statistics."""
    n = len(labels)

    def loss(batch: Any) -> Any:
        logits = backend.call(model, batch)
        return target_cross_entropy(logits, np.repeat(labels, int(logits.shape[0]) // n))

    with bottleneck_on(backend, model, BOTTLENECK_LAYER, bottleneck), backend.frozen(model):
        cap = bottleneck.optimize(loss, x, seed=0)
    return backend.to_numpy(saliency_map(cap, IMAGE_SIZE))


def _bilinear_reference(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixel-centre bilinear resize of the last two axes, clamped at the borders."""

    def weights(n_out: int, n_in: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = np.clip((i + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
            lo = int(np.floor(src))
            hi = min(lo + 1, n_in - 1)
            m[i, lo] += 1 - (src - lo)
            m[i, hi] += src - lo
        return m

    rows, cols = weights(size[0], a.shape[-2]), weights(size[1], a.shape[-1])
    return np.einsum("ij,...jk,lk->...il", rows, a, cols)


def _head_reference(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Three 1x1 convolutions written per pixel with einsum, ReLU, clamp to [-5, 5]."""
    h = np.einsum("nc...,cd->nd...", x, params["w1"])
    h = np.maximum(h + params["b1"].reshape(-1, *([1] * (x.ndim - 2))), 0)
    h = np.einsum("nc...,cd->nd...", h, params["w2"])
    h = np.maximum(h + params["b2"].reshape(-1, *([1] * (x.ndim - 2))), 0)
    h = np.einsum("nc...,cd->nd...", h, params["w3"])
    return np.clip(h + params["b3"].reshape(-1, *([1] * (x.ndim - 2))), -5, 5)


class ReadoutTests:
    """The Readout Bottleneck through a backend; provide a class-scoped ``readout_case``."""

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, readout_case: ReadoutCase) -> TrainedReadout:
        return train_reference_readout(readout_case)

    @pytest.fixture
    def backend(self, readout_case: ReadoutCase) -> Backend:
        return get_backend(readout_case.backend)

    # -- the pieces, against NumPy ---------------------------------------------------
    @pytest.mark.parametrize("spatial", [(3, 4), (5,), ()])
    def test_head_is_three_1x1_convolutions(self, backend: Backend, spatial: tuple[int, ...]) -> None:
        rng = np.random.default_rng(0)
        head = ReadoutHead(7, 3)
        params = head.unpack(rng.standard_normal(head.size))
        params["b3"] = np.array([200.0, -200.0, 0.0])  # channels 0 and 1 hit the bounds
        flat = head.pack(params)
        x = (rng.standard_normal((8, 7, *spatial)) * 2).astype(np.float32)
        like = backend.from_numpy(x)
        got = backend.to_numpy(head(backend.from_numpy(flat, like=like), like))
        expected = _head_reference(head.unpack(flat), x.astype(np.float64))
        assert got.shape == (8, 3, *spatial)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        # Clamped to [-5, 5], not at zero: channel 2 takes negative values too.
        assert np.all(got[:, 0] == 5.0) and np.all(got[:, 1] == -5.0)
        assert got[:, 2].min() < -0.1

    def test_head_starts_letting_everything_pass(self, backend: Backend) -> None:
        head = ReadoutHead(21, 8)
        flat = head.init(seed=0)
        x = np.random.default_rng(1).standard_normal((4, 21, 6, 6)).astype(np.float32)
        like = backend.from_numpy(x)
        alpha = backend.to_numpy(head(backend.from_numpy(flat, like=like), like))
        # Bias 4.9, last weights scaled by 1e-3: alpha within a few 1e-3 of 4.9, inside
        # the clamp (so every output has a gradient), letting ~99.3% of the signal pass.
        np.testing.assert_allclose(alpha, 4.9, atol=0.01)
        params = head.unpack(flat)
        assert np.all(params["b3"] == np.float32(4.9)) and np.abs(params["w3"]).max() < 1e-3

    def test_readout_input_matches_numpy(self, backend: Backend) -> None:
        rng = np.random.default_rng(2)
        shapes = [(4, 6, 6), (3, 3, 3), (5,), (2, 8, 10)]
        feats = [rng.standard_normal((2, *s)).astype(np.float32) for s in shapes]
        means = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        stds = [rng.uniform(0.5, 2, s).astype(np.float32) for s in shapes]
        t = backend.from_numpy
        got = backend.to_numpy(
            readout_input([t(f) for f in feats], [t(m) for m in means], [t(s) for s in stds], (6, 6))
        )
        parts = []
        for f, m, s in zip(feats, means, stds, strict=True):
            r = (f.astype(np.float64) - m) / s
            if r.ndim == 2:
                r = np.broadcast_to(r[:, :, None, None], (*r.shape, 6, 6))
            elif r.shape[2:] != (6, 6):
                r = _bilinear_reference(r, (6, 6))
            parts.append(r)
        expected = np.concatenate(parts, axis=1)
        assert got.shape == (2, 4 + 3 + 5 + 2, 6, 6)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    def test_target_cross_entropy_scores_each_sample_against_its_target(self, backend: Backend) -> None:
        rng = np.random.default_rng(3)
        logits = (rng.standard_normal((4, 5)) * 3).astype(np.float32)
        targets = np.array([3, 0, 4, 3])
        got = float(backend.to_numpy(target_cross_entropy(backend.from_numpy(logits), targets)))
        lg = logits.astype(np.float64)
        log_probs = lg - lg.max(1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
        expected = -np.mean(log_probs[np.arange(4), targets])
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        with pytest.raises(ValueError, match="one target per sample"):
            target_cross_entropy(backend.from_numpy(logits), targets[:2])

    def test_head_gradient_matches_finite_differences(
        self, readout_case: ReadoutCase, backend: Backend
    ) -> None:
        dtype = np.float64 if readout_case.float64 else np.float32
        rng = np.random.default_rng(4)
        head = ReadoutHead(4, 2)
        flat = rng.standard_normal(head.size) * 0.5
        x = rng.standard_normal((2, 4, 3, 3))
        c = rng.standard_normal((2, 2, 3, 3))
        like = backend.from_numpy(x.astype(dtype))
        xp = backend.namespace()
        value, grad = backend.value_and_grad(
            lambda p, xt, ct: xp.sum(head(p, xt) * ct),
            backend.from_numpy(flat, like=like),
            backend.from_numpy(x, like=like),
            backend.from_numpy(c, like=like),
        )
        grad = backend.to_numpy(grad)
        assert grad.dtype == dtype

        def f(p: np.ndarray) -> float:
            return float(np.sum(_head_reference(head.unpack(p), x) * c))

        fd = np.empty_like(flat)
        for i in range(flat.size):
            up, down = flat.copy(), flat.copy()
            up[i] += 1e-6
            down[i] -= 1e-6
            fd[i] = (f(up) - f(down)) / 2e-6
        assert np.abs(grad).max() > 0
        if dtype == np.float64:
            # float64 autograd against float64 central differences (error ~1e-9).
            np.testing.assert_allclose(value, f(flat), rtol=1e-10)
            np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
        else:
            # float32: the head's sums of ~10 terms carry ~1e-6 relative round-off.
            np.testing.assert_allclose(value, f(flat), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)

    def test_float64_stays_float64(self, readout_case: ReadoutCase, backend: Backend) -> None:
        if not readout_case.float64:
            pytest.skip("the case declares no float64 (float64=False)")
        rng = np.random.default_rng(5)
        head = ReadoutHead(6, 3)
        flat = rng.standard_normal(head.size) * 0.5
        shapes = [(4, 6, 6), (2, 3, 3)]
        feats = [rng.standard_normal((2, *s_)) for s_ in shapes]
        means = [rng.standard_normal(s_) for s_ in shapes]
        stds = [rng.uniform(0.5, 2, s_) for s_ in shapes]
        like = backend.from_numpy(np.zeros(1))
        t = lambda a: backend.from_numpy(a, like=like)
        stacked = readout_input([t(f) for f in feats], [t(m) for m in means], [t(s_) for s_ in stds], (6, 6))
        alpha = head(t(flat), stacked)
        logits = rng.standard_normal((2, 5)) * 3
        loss = target_cross_entropy(t(logits), np.array([4, 1]))
        got = {
            name: backend.to_numpy(v) for name, v in (("input", stacked), ("alpha", alpha), ("loss", loss))
        }
        assert all(v.dtype == np.float64 for v in got.values()), {k: v.dtype for k, v in got.items()}
        # The NumPy references in float64: agreement to round-off (1e-12), which a
        # detour through float32 (1e-7) would miss.
        parts = [(f - m) / s_ for f, m, s_ in zip(feats, means, stds, strict=True)]
        parts[1] = _bilinear_reference(parts[1], (6, 6))
        expected = np.concatenate(parts, axis=1)
        np.testing.assert_allclose(got["input"], expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            got["alpha"], _head_reference(head.unpack(flat), expected), rtol=1e-12, atol=1e-12
        )
        log_probs = logits - logits.max(1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
        np.testing.assert_allclose(got["loss"], -np.mean(log_probs[[0, 1], [4, 1]]), rtol=1e-12)

    # -- estimation and the hooks ------------------------------------------------------
    def test_estimate_covers_every_readout_layer(self, readout_case: ReadoutCase, backend: Backend) -> None:
        model = readout_case.make_model(readout_reference_weights())
        readout = make_readout(readout_case, model)
        batches = estimate(readout, readout_case, n=64)
        shapes = [e.shape for e in readout.estimators]
        assert shapes == [FEATURE_SHAPES[n] for n in READOUT_LAYERS]
        assert readout.bottleneck.estimator.shape == FEATURE_SHAPES[BOTTLENECK_LAYER]
        assert all(e.n == 64 for e in readout.estimators)
        # The logits' estimate equals the mean of the model's outputs.
        logits = np.concatenate([backend.to_numpy(backend.call(model, x)) for x, _ in batches])
        np.testing.assert_allclose(
            readout.estimators[2].mean(), logits.mean(0, dtype=np.float64), rtol=1e-6, atol=1e-6
        )
        head = readout.head
        assert head is not None and (head.in_channels, head.out_channels) == (21, 8)

    def test_model_is_left_unchanged(
        self, readout_case: ReadoutCase, backend: Backend, trained: TrainedReadout
    ) -> None:
        model = trained.model
        x = trained.held_out
        fresh = readout_case.make_model(readout_reference_weights())
        expected = backend.to_numpy(backend.call(fresh, x))
        np.testing.assert_array_equal(backend.to_numpy(backend.call(model, x)), expected)

    # -- training and explanation ------------------------------------------------------
    def test_training_lowers_the_loss(self, trained: TrainedReadout) -> None:
        # At the start alpha ~ 5 everywhere: the mean capacity is several nats, times
        # beta = 10.  Training must cut the held-out loss at least fivefold.
        assert trained.loss_before > 20
        assert trained.loss_after < trained.loss_before / 5
        assert trained.history[-1] < trained.history[0]
        assert trained.readout.steps == TRAIN_EPOCHS * TRAIN_IMAGES // TRAIN_BATCH

    def test_readout_maps_correlate_with_per_sample_maps(self, trained: TrainedReadout) -> None:
        corr = trained.correlations
        print(
            f"\nreadout vs per-sample map correlation on {HELD_OUT} held-out images: "
            f"mean {corr.mean():.3f}, min {corr.min():.3f}"
        )
        assert corr.mean() > 0.8
        assert corr.min() > 0.5

    def test_maps_are_bits_and_find_the_blob(self, trained: TrainedReadout) -> None:
        maps = trained.readout_maps
        assert maps.shape == (HELD_OUT, *IMAGE_SIZE)
        assert np.all(np.isfinite(maps)) and np.all(maps >= 0)
        cap = trained.readout.backend.to_numpy(trained.readout.capacity())
        np.testing.assert_allclose(
            maps.reshape(HELD_OUT, -1).sum(1), cap.reshape(HELD_OUT, -1).sum(1) / math.log(2), rtol=1e-4
        )
        # The blob (the 5x5 pixels around its brightest one, 17% of the image) holds far
        # more than its share of the map.
        images, _ = blob_images(HELD_OUT, 3)
        shares = []
        for m, image in zip(maps, np.abs(images).sum(1), strict=True):
            by, bx = np.unravel_index(np.argmax(image), image.shape)
            yy, xx = np.mgrid[0 : IMAGE_SIZE[0], 0 : IMAGE_SIZE[1]]
            near = (np.abs(yy - by) <= 2) & (np.abs(xx - bx) <= 2)
            shares.append(m[near].sum() / m.sum() / near.mean())
        assert np.mean(shares) > 2 and np.min(shares) > 1

    def test_alpha_closes_below_zero(self, trained: TrainedReadout) -> None:
        # The reference clamped the readout's output at zero; ours reaches -5 on the
        # background (almost nothing passes) and stays near +5 on the blob.
        alpha = trained.readout.backend.to_numpy(trained.readout.alpha)
        assert alpha.min() < -4 and alpha.max() > 0
        assert alpha.min() >= -5 and alpha.max() <= 5

    def test_save_load_round_trip_gives_identical_maps(
        self, readout_case: ReadoutCase, backend: Backend, trained: TrainedReadout, tmp_path: Any
    ) -> None:
        x = trained.held_out
        expected = backend.to_numpy(trained.readout.analyze(x))
        state = trained.readout.state_dict()
        assert all(isinstance(v, np.ndarray) for v in state.values())
        loaded = make_readout(readout_case, trained.model)
        loaded.load_state_dict(state)
        np.testing.assert_array_equal(backend.to_numpy(loaded.analyze(x)), expected)
        path = os.fspath(tmp_path / "readout.npz")
        trained.readout.save(path)
        from_file = make_readout(readout_case, trained.model, seed=123)
        from_file.load(path)
        np.testing.assert_array_equal(backend.to_numpy(from_file.analyze(x)), expected)
        assert from_file.steps == trained.readout.steps

    # -- bad input -------------------------------------------------------------------
    def test_analyze_before_training_is_refused(self, readout_case: ReadoutCase) -> None:
        model = readout_case.make_model(readout_reference_weights())
        readout = make_readout(readout_case, model)
        x = readout_case.to_inputs(blob_images(2, 0)[0])
        with pytest.raises(RuntimeError, match="estimate"):
            readout.analyze(x)
        estimate(readout, readout_case, n=32)
        with pytest.raises(RuntimeError, match="not trained"):
            readout.analyze(x)

    def test_wrong_shape_weights_are_refused(
        self, readout_case: ReadoutCase, trained: TrainedReadout
    ) -> None:
        state = trained.readout.state_dict()
        model = trained.model
        fewer = ReadoutBottleneck(
            get_backend(readout_case.backend), model, BOTTLENECK_LAYER, ["relu2", "logits"]
        )
        with pytest.raises(ValueError, match="3 readout layers"):
            fewer.load_state_dict(state)
        bad = dict(state)
        bad["head.w1"] = state["head.w1"][:-1]
        readout = make_readout(readout_case, model)
        with pytest.raises(ValueError, match="w1"):
            readout.load_state_dict(bad)
        # Readouts of other layers (relu3 and relu2 swapped): shapes checked against this
        # readout's own estimates.
        swapped = ReadoutBottleneck(
            get_backend(readout_case.backend), model, BOTTLENECK_LAYER, ["relu3", "relu2", "logits"]
        )
        estimate(swapped, readout_case, n=32)
        with pytest.raises(ValueError, match="shape"):
            swapped.load_state_dict(state)
        # A failed load leaves the readout as it was.
        assert swapped.estimators[0].shape == FEATURE_SHAPES["relu3"]

    def test_readout_layer_that_never_runs_is_refused(self, readout_case: ReadoutCase) -> None:
        model = readout_case.make_model(readout_reference_weights())
        other = readout_case.make_model(readout_reference_weights())
        readout = ReadoutBottleneck(
            get_backend(readout_case.backend),
            model,
            BOTTLENECK_LAYER,
            ["relu2", readout_case.layer_of(other, "relu3")],
        )
        x = readout_case.to_inputs(blob_images(4, 0)[0])
        with pytest.raises(RuntimeError, match="never ran"):
            readout.estimate([x])

    def test_unknown_readout_layer_is_refused(self, readout_case: ReadoutCase) -> None:
        model = readout_case.make_model(readout_reference_weights())
        readout = ReadoutBottleneck(
            get_backend(readout_case.backend), model, BOTTLENECK_LAYER, ["relu2", "no_such_layer"]
        )
        x = readout_case.to_inputs(blob_images(4, 0)[0])
        with pytest.raises(LookupError, match="no_such_layer"):
            readout.estimate([x])
        # The hooks put on before the failure are gone again: outputs are unchanged.
        backend = get_backend(readout_case.backend)
        fresh = readout_case.make_model(readout_reference_weights())
        np.testing.assert_array_equal(
            backend.to_numpy(backend.call(model, x)), backend.to_numpy(backend.call(fresh, x))
        )
