"""The streaming estimator: exact merging, persistence, validation."""

from __future__ import annotations

import numpy as np
import pytest

from iba_core import Estimator


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((257, 3, 4, 2)) * 3 + 10  # offset stresses naive formulas
    x[:, 0, 0, 0] = np.where(rng.uniform(size=257) < 0.005, 1.0, 0.0)  # rarely active
    return x


def _fit(batches):
    est = Estimator()
    for b in batches:
        est.update(b)
    return est


def test_matches_numpy_for_any_batching(data):
    for sizes in ([257], [1] * 7 + [250], [100, 100, 57]):
        est = _fit(np.split(data, np.cumsum(sizes)[:-1]))
        assert est.n == 257 and est.shape == (3, 4, 2)
        np.testing.assert_allclose(est.mean(), data.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(est.std(), data.std(axis=0, ddof=1), rtol=1e-11)
        np.testing.assert_array_equal(est.active_fraction(), (data != 0).mean(axis=0))


def test_shards_merge_exactly(data):
    whole = _fit([data])
    a, b, c = _fit([data[:50]]), _fit([data[50:51]]), _fit([data[51:]])
    merged = a.merge(b).merge(c).merge(Estimator())
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-13)
    np.testing.assert_allclose(merged.var(), whole.var(), rtol=1e-11)
    assert merged.n == whole.n


def test_active_mask_threshold(data):
    est = _fit([data])
    mask = est.active_mask(0.01)
    assert mask[0, 0, 0] == 0.0 and mask[1, 0, 0] == 1.0


def test_save_load_round_trip_and_shape_check(tmp_path, data):
    est = _fit([data])
    path = tmp_path / "estimate.npz"
    est.save(path)
    loaded = Estimator.load(path, expected_shape=(3, 4, 2))
    np.testing.assert_array_equal(loaded.mean(), est.mean())
    np.testing.assert_array_equal(loaded.std(), est.std())
    assert loaded.n == est.n
    with pytest.raises(ValueError, match=r"feature shape \(3, 4, 2\).*\(8, 4, 2\)"):
        Estimator.load(path, expected_shape=(8, 4, 2))
    with pytest.raises(ValueError, match="lacks"):
        Estimator().load_state_dict({"mean": np.zeros(2)})


def test_bad_batches_are_refused(data):
    est = _fit([data[:10]])
    with pytest.raises(ValueError, match="differs"):
        est.update(np.zeros((2, 5)))
    bad = data[:3].copy()
    bad[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        Estimator().update(bad)
    with pytest.raises(RuntimeError, match="empty"):
        Estimator().mean()


def test_single_sample_has_zero_variance():
    est = _fit([np.ones((1, 2))])
    np.testing.assert_array_equal(est.std(), [0.0, 0.0])
