"""The cluttered-digits data set and the bounding-box score (NumPy only)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("sklearn")

from iba_core.apps.datasets import cluttered_digits, load_digits_split
from iba_core.apps.demo import top_n_in_box


@pytest.fixture(scope="module")
def data():
    return cluttered_digits(40, split="test", seed=3)


def test_shapes_types_and_ranges(data):
    images, labels, boxes = data
    assert images.shape == (40, 1, 64, 64) and images.dtype == np.float32
    assert labels.shape == (40,) and labels.dtype == np.int64
    assert boxes.shape == (40, 4) and boxes.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(labels.tolist()) <= set(range(10))
    x0, y0, x1, y1 = boxes.T
    assert np.all((0 <= x0) & (x0 < x1) & (x1 <= 64) & (0 <= y0) & (y0 < y1) & (y1 <= 64))
    # Digits scaled 2.4-3.4x: boxes between ~8 and 28 px a side, at most a fifth of the image
    # (the paper's box protocol needs boxes under a third).
    area = (x1 - x0) * (y1 - y0)
    assert np.all(y1 - y0 >= 16) and np.all(y1 - y0 <= 28)
    assert area.max() / 64**2 < 0.2


def test_deterministic_by_seed_and_prefix_stable():
    a = cluttered_digits(12, seed=5)
    b = cluttered_digits(12, seed=5)
    c = cluttered_digits(12, seed=6)
    d = cluttered_digits(5, seed=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)
    for x, y in zip(a, d, strict=True):  # image i does not depend on how many are made
        np.testing.assert_array_equal(x[:5], y)


def test_pinned_values():
    """The data set is part of the demo's published numbers: pin it."""
    images, labels, boxes = cluttered_digits(6, seed=0)
    assert labels.tolist() == [7, 9, 0, 6, 8, 7]
    assert boxes[0].tolist() == [7, 28, 20, 49]
    assert float(images.sum()) == pytest.approx(2444.80, abs=0.05)


def test_target_digit_is_inside_its_box_and_clutter_stays_out():
    clean = cluttered_digits(30, seed=1, n_clutter=0, noise=0.0)
    busy = cluttered_digits(30, seed=1, noise=0.0)
    np.testing.assert_array_equal(clean.boxes, busy.boxes)
    np.testing.assert_array_equal(clean.labels, busy.labels)
    for img_clean, img_busy, (x0, y0, x1, y1) in zip(clean.images, busy.images, clean.boxes, strict=True):
        inside = np.zeros((64, 64), dtype=bool)
        inside[y0:y1, x0:x1] = True
        # Without clutter all ink is the digit's, and it lies in the box.
        assert img_clean[0][~inside].max() == 0.0
        assert img_clean[0][inside].max() == 1.0
        # Fragments add ink outside the box, none inside.
        assert img_busy[0][~inside].sum() > 10
        np.testing.assert_array_equal(img_busy[0][inside], img_clean[0][inside])


def test_splits_use_disjoint_handwriting():
    train, train_labels = load_digits_split("train")
    test, _ = load_digits_split("test")
    assert train.shape == (1200, 8, 8) and test.shape == (597, 8, 8)
    assert np.bincount(train_labels, minlength=10).min() > 100
    train_rows = {row.tobytes() for row in train.reshape(len(train), -1)}
    shared = sum(row.tobytes() in train_rows for row in test.reshape(len(test), -1))
    assert shared <= 2  # load_digits holds a couple of exact duplicates, nothing more


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        cluttered_digits(2, split="validation")
    with pytest.raises(ValueError, match="too small"):
        cluttered_digits(2, size=24)
    with pytest.raises(ValueError, match="n must be >= 0"):
        cluttered_digits(-1)
    assert cluttered_digits(0).images.shape == (0, 1, 64, 64)


def test_missing_scikit_learn_is_one_clear_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None  # as if scikit-learn were not installed
        from iba_core.apps.datasets import cluttered_digits
        try:
            cluttered_digits(1)
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install scikit-learn" in out


# -- the bounding-box score ---------------------------------------------------------------
def test_top_n_in_box_values():
    boxes = np.array([[2, 1, 5, 3], [0, 0, 2, 2], [6, 6, 8, 8]])  # areas 6, 4, 4
    maps = np.zeros((3, 8, 8))
    maps[0, 1:3, 2:5] = 1.0  # exactly the box: 1
    maps[1, 0, 0:2] = 2.0  # 2 of the top 4 in the box ...
    maps[1, 7, 0:2] = 3.0  # ... 2 outside (higher)
    maps[2, 0:2, 0:2] = 5.0  # all mass outside the box, rest zero:
    scores = top_n_in_box(maps, boxes)  # ties at zero break row-major -> 0
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.0])


def test_top_n_in_box_random_maps_score_the_area_fraction():
    rng = np.random.default_rng(0)
    maps = rng.random((400, 32, 32))
    boxes = np.tile([4, 4, 12, 20], (400, 1))  # 8 x 16 = 128 of 1024 px
    assert top_n_in_box(maps, boxes).mean() == pytest.approx(128 / 1024, abs=0.01)


def test_top_n_in_box_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected maps \(N, H, W\)"):
        top_n_in_box(np.zeros((8, 8)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="empty or outside"):
        top_n_in_box(np.zeros((1, 8, 8)), np.array([[9, 9, 12, 12]]))
