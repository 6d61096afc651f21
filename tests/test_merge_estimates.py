"""``iba merge-estimates``: estimates saved on different machines merge exactly."""

from __future__ import annotations

import numpy as np
import pytest

from iba_core.apps.cli import main
from iba_core.math import Estimator


def _estimate(
    data: np.ndarray, layer: str | None = "conv3", layout: str | None = "channels_first"
) -> Estimator:
    est = Estimator()
    est.layer, est.layout = layer, layout
    for start in range(0, len(data), 7):
        est.update(data[start : start + 7])
    return est


def _shards(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Different sizes, means and spreads, and exact zeros (the activity counts).
    return [
        np.maximum(rng.normal(loc, scale, size=(n, 3, 4, 4)), 0.0)
        for n, loc, scale in ((20, 0.5, 1.0), (13, 2.0, 0.3), (31, -0.5, 3.0))
    ]


def test_merge_equals_one_estimate_over_all_data(tmp_path, capsys):
    shards = _shards()
    files = []
    for i, data in enumerate(shards):
        files.append(str(_estimate(data).save(tmp_path / f"part{i}.npz")))
    out = tmp_path / "all.npz"
    assert main(["merge-estimates", *files, "-o", str(out)]) == 0
    assert "64 samples" in capsys.readouterr().out
    merged = Estimator.load(out, expected_layer="conv3")
    whole = _estimate(np.concatenate(shards))
    assert merged.n == whole.n == 64
    assert merged.layer == "conv3" and merged.layout == "channels_first"
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.var(), whole.var(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(merged.active_fraction(), whole.active_fraction())
    # Not the naive average of the parts' means (the parts have different sizes).
    naive = np.mean([_estimate(d).mean() for d in shards], axis=0)
    assert np.abs(naive - merged.mean()).max() > 0.1


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (dict(layer="conv4"), "layer"),
        (dict(shape=(3, 2, 2)), "feature shape"),
        (dict(layout="channels_last"), "layout"),
    ],
)
def test_refuses_estimates_of_different_layers_or_shapes(tmp_path, capsys, other, what):
    rng = np.random.default_rng(1)
    a = _estimate(rng.normal(size=(10, 3, 4, 4))).save(tmp_path / "a.npz")
    shape = other.get("shape", (3, 4, 4))
    b = _estimate(
        rng.normal(size=(10, *shape)),
        layer=other.get("layer", "conv3"),
        layout=other.get("layout", "channels_first"),
    ).save(tmp_path / "b.npz")
    out = tmp_path / "all.npz"
    assert main(["merge-estimates", str(a), str(b), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot merge {b} into {a}: {what}" in err and "same layer" in err
    assert not out.exists()


def test_refuses_what_is_not_an_estimate_and_keeps_the_old_output(tmp_path, capsys):
    a = _estimate(np.ones((4, 2, 3, 3))).save(tmp_path / "a.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    out = tmp_path / "all.npz"
    out.write_bytes(b"old")
    assert main(["merge-estimates", str(a), str(bad), "-o", str(out)]) == 2
    assert "bad.npz" in capsys.readouterr().err
    assert main(["merge-estimates", str(a), str(tmp_path / "missing.npz"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert out.read_bytes() == b"old"
