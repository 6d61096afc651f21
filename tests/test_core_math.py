"""Core math against independent NumPy formulas (float64 references)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import iba_core.math as ic
from iba_core.engines import check_output_rows, repeat_inputs


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _kl_reference(r, lam, one_minus=None):
    """KL(N(lam*r, (1-lam)^2) || N(0, 1)) written as the textbook Gaussian KL."""
    mu1 = lam * r
    s1 = 1.0 - lam if one_minus is None else one_minus
    return np.log(1.0 / s1) + (s1**2 + mu1**2) / 2.0 - 0.5


class TestCapacity:
    def test_matches_gaussian_kl_without_smoothing(self):
        rng = np.random.default_rng(0)
        r = rng.standard_normal((2, 3, 4, 5))
        alpha = rng.uniform(-6, 8, r.shape)
        mean = rng.standard_normal(r.shape[1:])
        std = rng.uniform(0.5, 2, r.shape[1:])
        feats = r * std + mean
        got = ic.capacity(feats, alpha, mean, std, sigma=None)
        np.testing.assert_allclose(got, _kl_reference(r, _sigmoid(alpha)), rtol=1e-10, atol=1e-12)

    def test_smoothing_smooths_lambda_before_the_kl(self):
        rng = np.random.default_rng(1)
        r = rng.standard_normal((1, 2, 6, 6))
        alpha = rng.uniform(-3, 5, r.shape)
        lam = _sigmoid(alpha)
        sm = ic.smoothing_matrix(6, 1.0)
        lam_s = sm @ lam @ sm.T
        got = ic.capacity(r, alpha, np.zeros((2, 6, 6)), np.ones((2, 6, 6)), sigma=1.0)
        np.testing.assert_allclose(got, _kl_reference(r, lam_s), rtol=1e-9, atol=1e-12)

    def test_active_mask_zeroes_inactive_elements(self):
        r = np.ones((1, 2, 3))
        active = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
        got = ic.capacity(r, np.zeros_like(r), np.zeros((2, 3)), np.ones((2, 3)), active=active, sigma=None)
        assert np.all(got[0][active == 0] == 0) and np.all(got[0][active == 1] > 0)

    def test_float32_is_stable_at_the_initial_alpha_and_beyond(self):
        # At alpha = 5, 1 - sigmoid(alpha) computed as a difference in float32 keeps only
        # ~4 digits; the core's form keeps float32 precision.
        r = np.full((1, 1, 1, 1), 0.7)
        for a in (5.0, 12.0, 40.0, 90.0):
            ref = _kl_reference(r, _sigmoid(np.float64(a)), _sigmoid(-np.float64(a)))
            got = ic.capacity(
                r.astype(np.float32),
                np.full_like(r, a, dtype=np.float32),
                np.zeros((1, 1, 1), np.float32),
                np.ones((1, 1, 1), np.float32),
                sigma=None,
            )
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, ref, rtol=1e-5)

    def test_large_alpha_with_smoothing_stays_finite(self):
        r = np.ones((1, 1, 3, 3), dtype=np.float32)
        got = ic.capacity(
            r,
            np.full_like(r, 200.0),
            np.zeros((1, 3, 3), np.float32),
            np.ones((1, 3, 3), np.float32),
            sigma=1.0,
        )
        assert np.isfinite(got).all() and np.all(got > 50)

    def test_capacity_is_zero_when_everything_is_noise(self):
        r = np.random.default_rng(2).standard_normal((1, 2, 3, 3))
        got = ic.capacity(r, np.full_like(r, -40.0), np.zeros((2, 3, 3)), np.ones((2, 3, 3)))
        np.testing.assert_allclose(got, 0.0, atol=1e-12)


class TestNoise:
    def test_injection_formula_mask_and_relu(self):
        rng = np.random.default_rng(3)
        feats = rng.standard_normal((2, 3, 4))
        lam = rng.uniform(0, 1, feats.shape)
        eps = rng.standard_normal(feats.shape)
        active = np.array([[1.0] * 4, [0.0] * 4, [1.0, 0, 1, 0]])
        z = ic.inject_noise(feats, lam, 1 - lam, eps, active=active, relu=True)
        expected = np.maximum((lam * feats + (1 - lam) * eps) * active, 0)
        np.testing.assert_allclose(z, expected, rtol=1e-12)

    def test_restrict_scales_standard_noise_to_the_feature_distribution(self):
        mean, std = np.full((1, 2, 2), 3.0), np.full((1, 2, 2), 2.0)
        feats = np.zeros((1, 1, 2, 2))
        noise = np.full(feats.shape, 0.5)
        z, cap = ic.restrict(feats, np.full(feats.shape, -60.0), noise, mean, std, sigma=None)
        np.testing.assert_allclose(z, 3.0 + 2.0 * 0.5)  # lambda = 0: pure noise
        np.testing.assert_allclose(cap, 0.0, atol=1e-12)


class TestSmoothing:
    def test_kernel_size_and_normalisation(self):
        k = ic.gaussian_kernel_1d(1.0)
        assert k.shape == (5,) and math.isclose(k.sum(), 1.0)
        assert ic.gaussian_kernel_1d(2.0).shape == (9,)
        assert k[2] > k[1] > k[0]

    @pytest.mark.parametrize("n", [1, 2, 3, 7])
    def test_matrix_rows_sum_to_one_for_any_size(self, n):
        m = ic.smoothing_matrix(n, 1.0)
        assert m.shape == (n, n)
        np.testing.assert_allclose(m.sum(axis=1), 1.0)

    def test_interior_equals_convolution_and_border_reflects(self):
        k = ic.gaussian_kernel_1d(1.0)
        x = np.random.default_rng(4).standard_normal(9)
        got = ic.smoothing_matrix(9, 1.0) @ x
        np.testing.assert_allclose(got[2:-2], np.convolve(x, k, mode="valid"), rtol=1e-12)
        padded = np.pad(x, 2, mode="reflect")
        np.testing.assert_allclose(got, np.convolve(padded, k, mode="valid"), rtol=1e-12)

    @pytest.mark.parametrize("shape", [(1, 2, 1, 1), (1, 2, 2, 2), (1, 3, 2, 5), (2, 4, 10)])
    def test_tiny_maps_and_sequences(self, shape):
        x = np.random.default_rng(5).uniform(size=shape)
        out = ic.gaussian_smooth(x, 1.0, len(shape) - 2)
        assert out.shape == x.shape and np.isfinite(out).all()
        assert out.min() >= x.min() - 1e-12 and out.max() <= x.max() + 1e-12
        if shape[-1] == 1 and len(shape) == 4:
            np.testing.assert_allclose(out, x)  # a 1x1 map has nothing to average with

    def test_disabled(self):
        x = np.ones((1, 1, 3, 3))
        assert ic.gaussian_smooth(x, 0, 2) is x and ic.gaussian_smooth(x, None, 2) is x


class TestSaliencyMap:
    def test_integer_upsampling_weights(self):
        np.testing.assert_allclose(ic.bilinear_matrix(4, 2), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])

    @pytest.mark.parametrize("size", [(16, 16), (13, 7), (5, 5), (3, 2)])
    def test_total_bits_are_kept(self, size):
        cap = np.random.default_rng(6).uniform(size=(2, 3, 5, 5))
        smap = ic.saliency_map(cap, size)
        assert smap.shape == (2, *size) and smap.min() >= 0
        np.testing.assert_allclose(smap.sum(axis=(1, 2)), cap.sum(axis=(1, 2, 3)) / math.log(2), rtol=1e-12)

    def test_constant_map_stays_constant(self):
        cap = np.full((1, 2, 4, 4), 0.5)
        smap = ic.saliency_map(cap, (8, 8))
        np.testing.assert_allclose(smap, 2 * 0.5 / math.log(2) * 16 / 64)

    def test_sequences_and_vectors(self):
        cap = np.ones((1, 2, 5))
        np.testing.assert_allclose(ic.saliency_map(cap, (10,)).sum(), 10 / math.log(2))
        np.testing.assert_allclose(ic.saliency_map(np.ones((1, 3))), np.full((1, 3), 1 / math.log(2)))

    def test_wrong_rank_size_is_refused(self):
        with pytest.raises(ValueError, match="spatial axes"):
            ic.saliency_map(np.ones((1, 2, 4, 4)), (8,))


def test_cross_entropy_matches_log_softmax():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((4, 3)) * 30
    t = [0, 2, 1, 1]
    ref = -np.mean([logits[i, t[i]] - np.log(np.exp(logits[i]).sum()) for i in range(4)])
    np.testing.assert_allclose(ic.cross_entropy(logits, np.eye(3)[t]), ref, rtol=1e-10)


def test_adam_matches_textbook_form():
    rng = np.random.default_rng(8)
    p = rng.standard_normal(5)
    state = ic.adam_init(p)
    m = v = np.zeros(5)
    ref = p.copy()
    for t in range(1, 6):
        g = rng.standard_normal(5)
        p, state = ic.adam_update(p, g, state, lr=0.5)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - 0.5 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert state.step == 5


def test_repeat_inputs_is_input_major():
    import array_api_compat.numpy as xp

    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(repeat_inputs(xp, x, 2)[:, 0], [0, 0, 2, 2, 4, 4])


def test_sigmoid_pair_keeps_full_relative_precision():
    from iba_core.math import sigmoid_pair

    x = np.array([-700.0, -90.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 90.0, 700.0])
    s, s_neg = sigmoid_pair(ic.namespace(x), x)
    # Reference from the exact identity sigmoid(x) = exp(-log1p(exp(-x))), in float64.
    ref = np.exp(-np.logaddexp(0.0, -x))
    ref_neg = np.exp(-np.logaddexp(0.0, x))
    # Both forms round in exp, log/division and the final exp: a few ulp (2.2e-16) apart.
    np.testing.assert_allclose(s, ref, rtol=2e-15, atol=0)
    np.testing.assert_allclose(s_neg, ref_neg, rtol=2e-15, atol=0)
    assert s[0] > 0 and s_neg[-1] > 0  # tiny values keep their digits instead of rounding to 0
    x32 = x.astype(np.float32)
    s32, s32_neg = sigmoid_pair(ic.namespace(x32), x32)
    assert s32.dtype == np.float32 and np.all(np.isfinite(s32)) and np.all(np.isfinite(s32_neg))


def test_check_output_rows_names_the_expected_count():
    check_output_rows(30, 3, 10)
    with pytest.raises(ValueError, match="3 output rows for 3 input.*10 noisy copies.*expected 30"):
        check_output_rows(3, 3, 10)
