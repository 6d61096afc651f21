"""Reliability of saved states and of a few defaults (issue 14).

Estimates, readout weights and ``IBACopyInnvestigate`` files: damaged files, invalid
values and other format versions are refused with one clear error that names the file
and the fix; ``save("x")`` and ``load("x")`` agree on ``x.npz``.  Also: ``IBACopy``
refuses ``target=`` for a softmax model, the smoothing matrix is built without a loop
over the kernel, and the readout's training reports held-out progress and warns when it
has not converged.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import pytest

from iba_core.math import Estimator
from iba_core.math._estimator import ESTIMATE_FORMAT, SavedStateError
from iba_core.math._linear_ops import _folded_kernel, smoothing_matrix

pytestmark = pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")


@pytest.fixture
def estimate() -> Estimator:
    rng = np.random.default_rng(0)
    est = Estimator()
    est.layer = "conv"
    est.update(np.maximum(rng.standard_normal((20, 3, 4, 2)), 0))
    return est


# -- 1. broken files ---------------------------------------------------------------------
def _broken_files(tmp_path, est: Estimator) -> dict[str, object]:
    good = est.save(tmp_path / "good")
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "text": b"mean,std\n1,2\n",
        "pickle": pickle.dumps({"n": 3}),
    }
    paths = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        paths[name] = path
    paths["objects"] = tmp_path / "objects.npz"
    np.savez(paths["objects"], **{**est.state_dict(), "mean": np.array([{"a": 1}], dtype=object)})
    paths["npy"] = tmp_path / "single.npz"
    with open(paths["npy"], "wb") as f:
        np.save(f, np.zeros(3))
    return paths


def test_broken_estimate_files_raise_one_clear_error(tmp_path, estimate):
    for name, path in _broken_files(tmp_path, estimate).items():
        with pytest.raises(SavedStateError) as info:
            Estimator.load(path)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert os.fspath(path) in message, (name, message)
        assert "Estimator.save()" in message, (name, message)  # the fix: write it again
        for raw in ("BadZipFile:", "allow_pickle", "No data left"):
            assert not message.startswith(raw), (name, message)
    with pytest.raises(FileNotFoundError, match="Estimator.save"):
        Estimator.load(tmp_path / "missing")


BAD_VALUES = {
    "nan mean": (lambda s: s["mean"].__setitem__((0, 0, 0), np.nan), "'mean' holds NaN/inf"),
    "inf m2": (lambda s: s["m2"].__setitem__((1, 0, 0), np.inf), "'m2' holds NaN/inf"),
    "negative m2": (lambda s: s["m2"].__setitem__((1, 0, 0), -1.0), "negative"),
    "negative nonzero": (lambda s: s["nonzero"].__setitem__((0, 0, 0), -1.0), r"in \[0, n = 20\]"),
    "nonzero above n": (lambda s: s["nonzero"].__setitem__((0, 0, 0), 21.0), r"in \[0, n = 20\]"),
    "fractional n": (lambda s: s.__setitem__("n", np.asarray(2.5)), "one whole number"),
    "negative n": (lambda s: s.__setitem__("n", np.asarray(-3)), "no samples"),
    "zero n": (lambda s: s.__setitem__("n", np.asarray(0)), "no samples"),
    "string mean": (lambda s: s.__setitem__("mean", np.full((3, 4, 2), "x")), "not numbers"),
    "mismatched shapes": (lambda s: s.__setitem__("m2", s["m2"][:2]), "one shape"),
    "layer not a string": (lambda s: s.__setitem__("layer", np.asarray(3)), "must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused_on_load(tmp_path, estimate, case):
    change, pattern = BAD_VALUES[case]
    state = estimate.state_dict()
    change(state)
    target = Estimator()
    target.update(np.ones((2, 5)))
    with pytest.raises(SavedStateError, match=pattern) as info:
        target.load_state_dict(state)
    assert "estimate()" in str(info.value)  # names how to make a new one
    assert target.n == 2 and target.shape == (5,)  # left as it was
    path = tmp_path / f"{case.replace(' ', '_')}.npz"
    np.savez(path, **state)
    with pytest.raises(SavedStateError, match=pattern) as info:
        Estimator.load(path)
    assert os.fspath(path) in str(info.value)


def test_save_and_load_agree_on_the_npz_suffix(tmp_path, estimate):
    written = estimate.save(tmp_path / "stats")
    assert written == tmp_path / "stats.npz" and written.is_file()
    assert not (tmp_path / "stats").exists()
    for name in ("stats", "stats.npz"):
        loaded = Estimator.load(tmp_path / name, expected_shape=(3, 4, 2), expected_layer="conv")
        np.testing.assert_array_equal(loaded.std(), estimate.std())
    # A suffix-less file (as the CLI's --save-estimate may leave) is read when no .npz exists.
    os.replace(written, tmp_path / "plain")
    assert Estimator.load(tmp_path / "plain").n == estimate.n


# -- 2. format versions --------------------------------------------------------------------
def test_estimate_format_versions(tmp_path, estimate):
    state = estimate.state_dict()
    assert str(state["format"]) == ESTIMATE_FORMAT
    copy = Estimator()
    copy.load_state_dict(state)  # in memory, as state_dict() gives it
    np.testing.assert_array_equal(copy.mean(), estimate.mean())
    for fmt, words in (
        (None, "no format mark"),
        ("iba.estimate/1", "an older format"),
        ("iba.estimate/9", "a newer format"),
        ("other/1", "an unknown format"),
    ):
        bad = dict(state)
        if fmt is None:
            del bad["format"]
        else:
            bad["format"] = np.asarray(fmt)
        path = tmp_path / "old.npz"
        np.savez(path, **bad)
        with pytest.raises(SavedStateError, match=words) as info:
            Estimator.load(path)
        message = str(info.value)
        assert ESTIMATE_FORMAT in message and "make a new estimate" in message
        assert os.fspath(path) in message


def _tiny_torch_readout():
    torch = pytest.importorskip("torch")
    from iba_torch import IBAReadout

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, 3, padding=1),
            relu=nn.ReLU(),
            pool=nn.AdaptiveMaxPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 3),
        )
    ).eval()
    x = torch.randn(24, 1, 8, 8)
    y = torch.arange(24) % 3
    readout = IBAReadout("relu", ["relu", "fc"], model)
    readout.estimate(model, [x[:12], x[12:]])
    return readout, model, x, y


def test_readout_files_are_versioned_and_checked(tmp_path):
    readout, model, _, _ = _tiny_torch_readout()
    from iba_torch import IBAReadout

    path = readout.readout.save(tmp_path / "weights")
    assert path.name == "weights.npz"
    state = readout.state_dict()
    assert str(state["format"]) == "iba.readout/2"
    assert str(state["readout.0.format"]) == ESTIMATE_FORMAT
    fresh = IBAReadout("relu", ["relu", "fc"], model)
    fresh.load(tmp_path / "weights")  # found under the name given to save
    np.testing.assert_array_equal(fresh.state_dict()["head.w1"], state["head.w1"])
    cases = {
        "older": ({**state, "format": np.asarray("iba.readout/1")}, "older format"),
        "unmarked estimate": ({k: v for k, v in state.items() if k != "readout.1.format"}, "no format mark"),
        "nan head": ({**state, "head.b3": np.full_like(state["head.b3"], np.nan)}, "not finite"),
    }
    for name, (bad, words) in cases.items():
        file = tmp_path / f"{name.replace(' ', '_')}.npz"
        np.savez(file, **bad)
        with pytest.raises(SavedStateError, match=words) as info:
            IBAReadout("relu", ["relu", "fc"], model).load(file)
        assert os.fspath(file) in str(info.value)
        assert "again" in str(info.value)  # the fix: train/estimate again
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SavedStateError, match="IBAReadout.save") as info:
        fresh.load(broken)
    assert os.fspath(broken) in str(info.value)


# -- 2 and 3. the Keras copies -------------------------------------------------------------
def _keras_model(softmax: bool):
    keras = pytest.importorskip("keras")
    L = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    outputs = L.Dense(3, activation="softmax" if softmax else None, name="fc")(h)
    return keras.Model(inputs, outputs, name="small")


def test_innvestigate_files_are_versioned(tmp_path):
    model = _keras_model(softmax=False)
    from iba_tf import IBACopyInnvestigate

    x = np.random.default_rng(0).random((16, 8, 8, 1)).astype("float32")
    analyzer = IBACopyInnvestigate(model, feature_name="conv")
    analyzer.fit(x)
    analyzer.save_npz(tmp_path / "est")
    assert (tmp_path / "est.npz").is_file()
    other = IBACopyInnvestigate(model, feature_name="conv")
    assert other.load_npz(tmp_path / "est").estimator.n == 16
    with np.load(tmp_path / "est.npz") as f:
        state = {k: f[k] for k in f.files}
    assert str(state["format"]) == "iba.copy_innvestigate/2"
    for fmt, words in ((None, "no format mark"), ("iba.copy_innvestigate/1", "older format")):
        bad = {k: v for k, v in state.items() if k != "format"}
        if fmt is not None:
            bad["format"] = np.asarray(fmt)
        np.savez(tmp_path / "old.npz", **bad)
        fresh = IBACopyInnvestigate(model, feature_name="conv")
        with pytest.raises(SavedStateError, match=words) as info:
            fresh.load_npz(tmp_path / "old.npz")
        assert "save_npz()" in str(info.value) and "old.npz" in str(info.value)
        assert fresh.estimator.n == 0  # nothing loaded
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SavedStateError, match="junk.npz"):
        other.load_npz(tmp_path / "junk.npz")


def test_ibacopy_refuses_target_for_a_softmax_model():
    model = _keras_model(softmax=True)
    from iba_tf import IBACopy

    weights = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(1).random((16, 8, 8, 1)).astype("float32")
    iba = IBACopy(model, "conv")
    iba.estimate(x)
    with pytest.raises(ValueError, match="model_wo_softmax") as info:
        iba.analyze(x[:1], target=0)
    assert "probabilities" in str(info.value)
    # A loss of the outputs stays allowed (e.g. a probability to maximise).
    keras = pytest.importorskip("keras")
    maps = iba.analyze(
        x[:1], loss_fn=lambda out: -keras.ops.mean(out[:, 0]), optimization_steps=2, batch_size=2
    )
    assert maps.shape == (8, 8) and np.isfinite(maps).all()
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


# -- 4. the smoothing matrix -----------------------------------------------------------------
def _loop_matrix(n: int, sigma: float) -> np.ndarray:
    """The previous construction: every tap of the +-2 sigma kernel, reflected one by one."""
    radius = int(round(2 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    mat = np.zeros((n, n))
    for i in range(n):
        for k, w in enumerate(kernel):
            j = i + k - radius
            if n == 1:
                j = 0
            else:
                period = 2 * (n - 1)
                j %= period
                j = j if j < n else period - j
            mat[i, j] += w
    return mat


@pytest.mark.parametrize("sigma", [0.5, 1, 2, 5])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_smoothing_matrix_equals_the_loop_construction(n, sigma):
    np.testing.assert_allclose(smoothing_matrix(n, sigma), _loop_matrix(n, sigma), rtol=1e-13, atol=1e-16)


def test_very_wide_kernel_gives_the_uniform_limit():
    # With reflect borders a uniform average over one period counts the two edge pixels
    # once and every inner pixel twice: row [1, 2, ..., 2, 1] / (2 (n - 1)).
    mat = smoothing_matrix(16, 1e6)
    limit = np.full(16, 1 / 15)
    limit[[0, -1]] = 1 / 30
    np.testing.assert_allclose(mat, np.broadcast_to(limit, (16, 16)), atol=1e-6)
    np.testing.assert_allclose(mat.sum(axis=1), 1.0, rtol=1e-12)
    # The closed form used for wide kernels matches the tap-by-tap sum where both apply.
    for period in (2, 6, 30):
        np.testing.assert_allclose(
            _folded_kernel(period, 3e3, closed_form=True),
            _folded_kernel(period, 3e3, closed_form=False),
            atol=1e-14,
        )


# -- 5. readout training: progress and convergence -------------------------------------------
def test_readout_training_reports_held_out_progress_and_warns_when_unconverged():
    pytest.importorskip("torch")
    from iba_core.engines._readout import INITIAL_BIAS, NotConvergedWarning

    readout, model, x, y = _tiny_torch_readout()
    batches = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)]
    with pytest.warns(NotConvergedWarning, match="lets almost everything pass") as caught:
        losses = readout.train(model, batches[:1], epochs=1, lr=1e-4, validation=batches[1:], seed=0)
    assert caught[0].filename == __file__  # points at the user's line
    assert len(losses) == 1 and readout.history is losses
    record = losses.history[0]
    assert record["steps"] == 1 and record["loss"] == losses[0]
    assert np.isfinite(record["val_loss"]) and record["val_capacity"] > 0
    assert record["val_alpha"] == pytest.approx(INITIAL_BIAS, abs=0.05)  # barely moved
    # A fraction holds every k-th batch out: 4 batches, validation=0.5 -> 2 train, 2 held out.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        losses = readout.train(model, batches, epochs=2, lr=1e-2, validation=0.5, seed=0)
    assert [r["steps"] for r in losses.history] == [2, 2]
    assert all("val_capacity" in r for r in losses.history)
    with pytest.raises(ValueError, match="fraction in"):
        readout.train(model, batches, validation=1.5)


def test_keras_fit_holds_out_the_last_tenth_and_reports_it():
    model = _keras_model(softmax=False)
    from iba_tf import IBAReadout

    rng = np.random.default_rng(2)
    x = rng.random((20, 8, 8, 1)).astype("float32")
    y = np.arange(20) % 3
    readout = IBAReadout("conv", ["conv", "fc"], model)
    readout.estimate(x)
    out = readout.fit(x, y, epochs=2, lr=1e-2, compile=False, warn=False, seed=0)
    assert sorted(out) == ["loss", "val_capacity", "val_loss"]
    assert len(out["val_loss"]) == 2 and all(np.isfinite(out["val_loss"]))
    assert all(c > 0 for c in out["val_capacity"])
    # 18 training inputs in one batch of 32 per epoch; the last 2 inputs are held out.
    assert [r["steps"] for r in readout.history.history] == [1, 1]
    assert readout.steps == 2
