"""iba_core.apps.metrics on cases whose answer is known by construction.

NumPy-only checks use plain callables as models (no backend); the ``torch`` and ``tf``
tests run the same metrics through the backends' ``call``.
"""

from __future__ import annotations

import numpy as np
import pytest

from iba_core.apps import metrics
from iba_core.apps.demo import top_n_in_box


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class QuadrantModel:
    """Two logits ``[w * sum(top-left quadrant of channel 0) + b, 0]``; NumPy, channels first."""

    def __init__(self, w=0.25, b=-2.0, channels_last=False):
        self.w, self.b, self.channels_last = w, b, channels_last
        self.seen = []

    def __call__(self, x):
        self.seen.append(np.array(x))
        if self.channels_last:
            x = np.moveaxis(x, -1, 1)
        h, w = x.shape[2] // 2, x.shape[3] // 2
        z = self.w * x[:, 0, :h, :w].sum(axis=(1, 2)) + self.b
        return np.stack([z, np.zeros_like(z)], axis=1)


def quadrant_image(size=8):
    """One image ``(1, 1, size, size)``: ones in the top-left quadrant, zeros elsewhere."""
    x = np.zeros((1, 1, size, size), dtype=np.float32)
    x[0, 0, : size // 2, : size // 2] = 1.0
    return x


def quadrant_mask(size=8):
    m = np.zeros((1, size, size))
    m[0, : size // 2, : size // 2] = 1.0
    return m


def expected_quadrant_curves():
    """8x8 image, 2x2 tiles (16, 4 of them in the quadrant), mean 0.25: closed form."""
    k = np.arange(17)
    removed_morf = np.minimum(k, 4)  # quadrant tiles go first
    removed_lerf = np.clip(k - 12, 0, 4)  # ... or last
    # Each removed quadrant tile turns 4 pixels from 1 into the mean 0.25.
    morf = sigmoid(0.25 * (16 - 3 * removed_morf) - 2.0)
    lerf = sigmoid(0.25 * (16 - 3 * removed_lerf) - 2.0)
    return k / 16, morf, lerf


# -- degradation -------------------------------------------------------------------------
def test_degradation_matches_closed_form_for_quadrant_model():
    fractions, morf, lerf = expected_quadrant_curves()
    res = metrics.degradation_test(
        QuadrantModel(), quadrant_image(), quadrant_mask(), 0, tile_size=2, n_steps=None
    )
    np.testing.assert_allclose(res.fractions, fractions)
    np.testing.assert_allclose(res.morf[0], morf, rtol=1e-6)
    np.testing.assert_allclose(res.lerf[0], lerf, rtol=1e-6)
    area = np.sum((lerf - morf)[1:] + (lerf - morf)[:-1]) / 2 / 16
    assert res.score[0] == pytest.approx(area, rel=1e-6)
    assert res.score[0] > 0.4  # the curves differ by up to sigmoid(2) - sigmoid(-1)


def test_degradation_inverted_map_scores_negative_and_normalises():
    inverted = 1.0 - quadrant_mask()
    good = metrics.degradation_test(
        QuadrantModel(), quadrant_image(), quadrant_mask(), 0, tile_size=2, n_steps=None, normalize=True
    )
    bad = metrics.degradation_test(
        QuadrantModel(), quadrant_image(), inverted, 0, tile_size=2, n_steps=None, normalize=True
    )
    # Normalised curves run from 1 (intact) to 0 (fully degraded).
    np.testing.assert_allclose(good.morf[0, [0, -1]], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(good.lerf[0, [0, -1]], [1.0, 0.0], atol=1e-12)
    # The inverted map swaps the roles of MoRF and LeRF.
    np.testing.assert_allclose(bad.morf, good.lerf, atol=1e-12)
    assert bad.score[0] == pytest.approx(-good.score[0])


def test_degradation_replaces_tiles_with_per_channel_mean_channels_last():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 6, 6, 3)).astype(np.float32) + np.array([0.0, 1.0, 2.0], np.float32)
    model = QuadrantModel(channels_last=True)
    saliency = rng.uniform(size=(2, 6, 6))
    res = metrics.degradation_test(
        model, x, saliency, [0, 1], tile_size=3, n_steps=None, channel_axis=-1, batch_size=1000
    )
    assert res.morf.shape == (2, 5)
    seen = np.concatenate(model.seen)  # 2 images x (MoRF, LeRF) x 5 steps
    assert seen.shape == (20, 6, 6, 3)
    fully_degraded = seen[4]  # image 0, MoRF, all 4 tiles replaced
    np.testing.assert_allclose(fully_degraded, np.broadcast_to(x[0].mean(axis=(0, 1)), (6, 6, 3)), rtol=1e-6)
    np.testing.assert_array_equal(seen[0], x[0])  # nothing replaced at fraction 0
    # Same result in channels-first layout with a channels-first model.
    first = metrics.degradation_test(
        QuadrantModel(), np.moveaxis(x, -1, 1), saliency, [0, 1], tile_size=3, n_steps=None, batch_size=3
    )
    np.testing.assert_allclose(first.morf, res.morf)
    np.testing.assert_allclose(first.lerf, res.lerf)


def test_degradation_steps_and_partial_tiles():
    x = np.ones((1, 1, 10, 10), np.float32)
    res = metrics.degradation_test(
        QuadrantModel(), x, np.zeros((1, 10, 10)), 0, tile_size=4, n_steps=3
    )  # 3 x 3 tiles, cut at the border
    np.testing.assert_allclose(res.fractions, [0, 3 / 9, 6 / 9, 1])
    # A constant image equals its mean: nothing changes, so the area is zero.
    np.testing.assert_allclose(res.morf, res.lerf)
    assert res.score[0] == 0.0


def test_bad_inputs_raise_helpful_errors():
    x = quadrant_image()
    with pytest.raises(ValueError, match="resize maps"):
        metrics.degradation_test(QuadrantModel(), x, np.zeros((1, 4, 4)), 0)
    with pytest.raises(ValueError, match="out of range"):
        metrics.degradation_test(QuadrantModel(), x, quadrant_mask(), 5, tile_size=2)
    with pytest.raises(ValueError, match="channel axis"):
        metrics.degradation_test(QuadrantModel(), x[:, 0], quadrant_mask(), 0)
    with pytest.raises(TypeError, match="not callable"):
        metrics.degradation_test(object(), x, quadrant_mask(), 0)
    with pytest.raises(ValueError, match="output"):
        metrics.target_scores(QuadrantModel(), x, 0, output="probabilities")


def test_target_scores_softmax_and_raw():
    x = quadrant_image()
    assert metrics.target_scores(QuadrantModel(), x, 0)[0] == pytest.approx(sigmoid(2.0))
    assert metrics.target_scores(QuadrantModel(), x, 1)[0] == pytest.approx(sigmoid(-2.0))
    assert metrics.target_scores(QuadrantModel(), x, 0, output="raw")[0] == pytest.approx(2.0)


# -- bounding box and pointing game -------------------------------------------------------
def test_bounding_box_score_known_cases():
    box = np.array([[2, 1, 6, 4]])  # 4 columns x 3 rows = 12 px
    mask = metrics.boxes_to_masks(box, (8, 10))
    assert mask.sum() == 12 and mask[0, 1:4, 2:6].all()
    assert metrics.bounding_box_score(mask.astype(float), box)[0] == 1.0
    assert metrics.bounding_box_score(1.0 - mask, box)[0] == 0.0
    # Ties are shared fairly: a constant map scores the box's share of the image.
    assert metrics.bounding_box_score(np.ones((1, 8, 10)), box)[0] == pytest.approx(12 / 80)
    # Half of the 12 highest pixels inside.
    s = np.zeros((1, 8, 10))
    s[0, 1, 2:6] = s[0, 2, 2:4] = 1.0  # 6 inside
    s[0, 7, :6] = 1.0  # 6 outside
    assert metrics.bounding_box_score(s, box)[0] == pytest.approx(0.5)
    # Masks work like boxes.
    assert metrics.bounding_box_score(s, mask)[0] == pytest.approx(0.5)


def test_bounding_box_score_agrees_with_demo_score_without_ties():
    rng = np.random.default_rng(1)
    maps = rng.uniform(size=(5, 16, 16))
    boxes = np.array([[0, 0, 4, 4], [3, 2, 9, 12], [10, 10, 16, 16], [1, 5, 2, 6], [0, 0, 16, 16]])
    np.testing.assert_allclose(metrics.bounding_box_score(maps, boxes), top_n_in_box(maps, boxes))
    with pytest.raises(ValueError, match="empty"):
        metrics.bounding_box_score(maps[:1], np.array([[3, 3, 3, 8]]))


def test_pointing_game_hits_misses_tolerance_and_ties():
    box = np.array([[2, 2, 5, 5]])  # pixels 2..4 in both axes
    s = np.zeros((1, 8, 8))
    s[0, 3, 3] = 1.0
    assert metrics.pointing_game(s, box)[0] == 1.0
    s = np.zeros((1, 8, 8))
    s[0, 3, 6] = 1.0  # two columns right of the box's edge (x=4)
    assert metrics.pointing_game(s, box)[0] == 0.0
    assert metrics.pointing_game(s, box, tolerance=2)[0] == 1.0
    assert metrics.pointing_game(s, box, tolerance=1.9)[0] == 0.0
    s[0, 0, 0] = s[0, 2, 2] = 1.0  # three maxima, one inside
    assert metrics.pointing_game(s, box)[0] == pytest.approx(1 / 3)


# -- insertion / deletion ----------------------------------------------------------------
def sum_model(x):
    """One output: the sum of all pixels."""
    return x.reshape(len(x), -1).sum(axis=1, keepdims=True)


def test_insertion_deletion_exact_for_sum_model():
    rng = np.random.default_rng(2)
    x = rng.permutation(np.arange(1, 17, dtype=np.float32)).reshape(1, 1, 4, 4)
    res = metrics.insertion_deletion(
        sum_model,
        x,
        x[:, 0],
        0,
        n_steps=None,
        output="raw",
        deletion_baseline="zero",
        insertion_baseline="zero",
    )
    desc = np.sort(x.ravel())[::-1].astype(np.float64)
    inserted = np.r_[0.0, np.cumsum(desc)]
    np.testing.assert_allclose(res.fractions, np.arange(17) / 16)
    np.testing.assert_allclose(res.insertion[0], inserted)
    np.testing.assert_allclose(res.deletion[0], 136.0 - inserted)
    trap = lambda y: np.sum(y[1:] + y[:-1]) / 2 / 16
    assert res.insertion_auc[0] == pytest.approx(trap(inserted))
    assert res.deletion_auc[0] == pytest.approx(trap(136.0 - inserted))
    # The reversed map is worse on both.
    rev = metrics.insertion_deletion(
        sum_model, x, -x[:, 0], 0, n_steps=None, output="raw", insertion_baseline="zero"
    )
    assert rev.insertion_auc[0] < res.insertion_auc[0]
    assert rev.deletion_auc[0] > res.deletion_auc[0]


def test_insertion_blur_baseline_keeps_a_constant_image():
    x = np.full((1, 2, 8, 8), 0.5, dtype=np.float32)
    res = metrics.insertion_deletion(
        sum_model,
        x,
        np.zeros((1, 8, 8)),
        0,
        n_steps=4,
        output="raw",
        insertion_baseline="blur",
        blur_sigma=2.0,
    )
    np.testing.assert_allclose(res.insertion[0], np.full(5, 64.0), rtol=1e-6)
    np.testing.assert_allclose(res.deletion[0], [64, 48, 32, 16, 0], rtol=1e-6)


# -- sensitivity-n -----------------------------------------------------------------------
class LinearModel:
    """One raw output ``sum(w * x)``."""

    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return np.sum(x * self.w, axis=(1, 2, 3))[:, None]


def test_sensitivity_n_is_one_for_gradient_times_input_of_linear_model():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(1, 2, 8, 8))
    x = rng.uniform(size=(3, 2, 8, 8))
    model = LinearModel(w)
    exact = (w * x).sum(axis=1)  # gradient x (input - 0), summed over channels
    res = metrics.sensitivity_n(model, x, exact, 0, ns=(1, 5, 20, 60), n_subsets=16, baseline="zero")
    np.testing.assert_allclose(res.correlation, 1.0, atol=1e-5)
    np.testing.assert_allclose(res.mean, 1.0, atol=1e-5)
    noise = rng.normal(size=(3, 8, 8))
    rand = metrics.sensitivity_n(model, x, noise, 0, ns=(1, 5, 20, 60), n_subsets=16)
    assert np.all(np.abs(rand.mean) < 0.6)
    # The same subsets whatever the batch size; deterministic for a seed.
    again = metrics.sensitivity_n(model, x, noise, 0, ns=(1, 5, 20, 60), n_subsets=16, batch_size=7)
    np.testing.assert_allclose(again.correlation, rand.correlation, atol=1e-12)


def test_sensitivity_n_constant_map_is_nan_and_bad_n_raises():
    x = np.random.default_rng(4).uniform(size=(2, 1, 4, 4))
    model = LinearModel(np.ones((1, 1, 4, 4)))
    res = metrics.sensitivity_n(model, x, np.ones((2, 4, 4)), 0, ns=(3,), n_subsets=8)
    assert np.all(np.isnan(res.correlation)) and np.isnan(res.mean[0])
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        metrics.sensitivity_n(model, x, np.ones((2, 4, 4)), 0, ns=(4,), tile_size=2)


# -- spearman and model randomisation ----------------------------------------------------
def test_spearman_correlation_known_values():
    a = np.arange(12.0).reshape(1, 3, 4)
    assert metrics.spearman_correlation(a, a**3 + 1)[0] == pytest.approx(1.0)
    assert metrics.spearman_correlation(a, -a)[0] == pytest.approx(-1.0)
    assert np.isnan(metrics.spearman_correlation(a, np.ones_like(a))[0])
    # Ties share the average rank: [1, 2, 2, 3] ranks as [1, 2.5, 2.5, 4].
    r = metrics.spearman_correlation(np.array([[1.0, 2, 2, 3]]), np.array([[1.0, 2, 3, 4]]))
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4.0])
    assert r[0] == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_spearman_correlation_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    a = rng.integers(0, 5, size=(3, 6, 6)).astype(float)
    b = a + rng.integers(0, 3, size=a.shape)
    ours = metrics.spearman_correlation(a, b)
    ref = [stats.spearmanr(u.ravel(), v.ravel()).statistic for u, v in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_model_randomization_gradient_vs_edge_detector():
    rng = np.random.default_rng(6)
    x = rng.uniform(size=(4, 1, 8, 8))
    trained = rng.normal(size=(1, 1, 8, 8))  # "models" are weight arrays here
    stages = [("fc", rng.normal(size=(1, 1, 8, 8)))]

    def gradient_x_input(w, images, targets):
        return (w * images)[:, 0]

    def edges(w, images, targets):  # ignores the model entirely
        return np.abs(np.diff(images[:, 0], axis=-1, append=0.0))

    grad = metrics.model_randomization(gradient_x_input, trained, stages, x, 0, keep_maps=True)
    edge = metrics.model_randomization(edges, trained, stages, x, 0)
    assert grad.names == ["fc"] and grad.spearman.shape == (1, 4)
    assert grad.maps.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(edge.spearman, 1.0)
    np.testing.assert_allclose(edge.spearman_abs, 1.0)
    assert np.mean(grad.spearman) < 0.5
    same = metrics.model_randomization(gradient_x_input, trained, [("none", trained)], x, 0)
    np.testing.assert_allclose(same.spearman, 1.0)


def test_cascading_randomization_copies_each_stage():
    model = {"a": np.zeros(2), "b": np.zeros(2), "c": np.zeros(2)}

    def randomize(m, name):
        m[name] = m[name] + 1.0

    stages = list(metrics.cascading_randomization(model, ["c", "b"], randomize))
    assert [name for name, _ in stages] == ["c", "b"]
    assert stages[0][1]["c"][0] == 1.0 and stages[0][1]["b"][0] == 0.0
    assert stages[1][1]["c"][0] == 1.0 and stages[1][1]["b"][0] == 1.0
    assert model["c"][0] == 0.0 and model["b"][0] == 0.0


# -- through the PyTorch backend ---------------------------------------------------------
@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def torch_quadrant_model(torch, size=8):
    """The :class:`QuadrantModel` as a PyTorch module (a masked linear layer)."""
    nn = torch.nn
    lin = nn.Linear(size * size, 2)
    with torch.no_grad():
        w = torch.zeros(2, size, size)
        w[0, : size // 2, : size // 2] = 0.25
        lin.weight.copy_(w.reshape(2, -1))
        lin.bias.copy_(torch.tensor([-2.0, 0.0]))
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.torch
def test_torch_degradation_and_localisation_match_closed_form(torch):
    model = torch_quadrant_model(torch).train()
    _, morf, lerf = expected_quadrant_curves()
    res = metrics.degradation_test(
        model, quadrant_image(), quadrant_mask(), 0, tile_size=2, n_steps=None, batch_size=5
    )
    np.testing.assert_allclose(res.morf[0], morf, rtol=1e-5)
    np.testing.assert_allclose(res.lerf[0], lerf, rtol=1e-5)
    # The backend's frozen() restored the model's flags.
    assert model.training and all(p.requires_grad for p in model.parameters())
    kw = dict(n_steps=8, insertion_baseline="mean")
    ins_del = metrics.insertion_deletion(model, quadrant_image(), quadrant_mask(), 0, **kw)
    inv = metrics.insertion_deletion(model, quadrant_image(), 1 - quadrant_mask(), 0, **kw)
    assert ins_del.deletion_auc[0] < inv.deletion_auc[0]
    assert ins_del.insertion_auc[0] > inv.insertion_auc[0]
    # Deleting the quadrant (the first quarter of the pixels) leaves logit -2.
    assert ins_del.deletion[0, 2] == pytest.approx(sigmoid(-2.0), rel=1e-5)


@pytest.mark.torch
def test_torch_backend_by_name_and_like_tensor(torch):
    model = torch_quadrant_model(torch)
    x = quadrant_image()
    direct = metrics.target_scores(model, x, 0)
    named = metrics.target_scores(
        model, x.astype(np.float64), 0, backend="torch", like=torch.zeros(1, dtype=torch.float32)
    )
    assert direct[0] == pytest.approx(sigmoid(2.0), rel=1e-6)
    assert named[0] == pytest.approx(direct[0], rel=1e-6)


@pytest.mark.torch
def test_torch_sensitivity_n_for_linear_model(torch):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    x = np.random.default_rng(7).uniform(size=(2, 3, 6, 6)).astype(np.float32)
    targets = np.array([1, 3])
    w = model[1].weight.detach().numpy().reshape(4, 3, 6, 6)
    exact = (w[targets] * x).sum(axis=1)
    res = metrics.sensitivity_n(model, x, exact, targets, ns=(2, 10, 30), n_subsets=12)
    np.testing.assert_allclose(res.correlation, 1.0, atol=1e-4)


@pytest.mark.torch
def test_torch_model_randomization_of_gradients(torch):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = np.random.default_rng(8).uniform(size=(3, 1, 8, 8)).astype(np.float32)

    def gradient(m, images, targets):
        xt = torch.from_numpy(images).requires_grad_(True)
        out = m(xt)[torch.arange(len(xt)), torch.from_numpy(targets)].sum()
        (g,) = torch.autograd.grad(out, xt)
        return g.abs().sum(1).numpy()

    def randomize(m, name):
        torch.manual_seed(len(name) + 1)
        m.get_submodule(name).reset_parameters()

    original = [p.detach().clone() for p in model.parameters()]
    res = metrics.model_randomization(
        gradient, model, metrics.cascading_randomization(model, ["3", "0"], randomize), x, [0, 1, 2]
    )
    assert res.names == ["3", "0"]
    assert np.all(res.spearman[-1] < 0.6)  # maps change once all weights are random
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters(), strict=True))


# -- through the TensorFlow backend (layout inferred as channels last) ---------------------
@pytest.mark.tf
def test_tf_channels_last_inferred_from_backend():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    inputs = keras.Input((8, 8, 1))
    crop = keras.layers.Cropping2D(((0, 4), (0, 4)))(inputs)  # the top-left quadrant
    flat = keras.layers.Flatten()(crop)
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(flat))
    dense.set_weights(
        [
            np.stack([np.full(16, 0.25), np.zeros(16)], axis=1).astype(np.float32),
            np.array([-2.0, 0.0], np.float32),
        ]
    )
    _, morf, lerf = expected_quadrant_curves()
    res = metrics.degradation_test(
        model, np.moveaxis(quadrant_image(), 1, -1), quadrant_mask(), 0, tile_size=2, n_steps=None
    )
    np.testing.assert_allclose(res.morf[0], morf, rtol=1e-5)
    np.testing.assert_allclose(res.lerf[0], lerf, rtol=1e-5)
