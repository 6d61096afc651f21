"""``estimate(..., attention_mask=)``: padded positions stay out of the feature statistics.

Each position's mean and std are taken over the sequences in which it is real (per-element
counts); the values at padded positions are never read; positions that are never real get
their channel's statistics over all real positions, with a warning.  Reached from the
Estimator, the engine, every front, the data-parallel loop, ``iba merge-estimates`` and
``iba explain --texts`` (issue 13).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from iba_core.engines import MaskedBatch, UnseenPositionsWarning
from iba_core.math import Estimator, SavedStateError

pytestmark = pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")

T, V, D = 9, 20, 4


def ids_and_mask(n: int, seed: int, longest: int = T) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(n, T)`` padded with 0 after random lengths in ``1..longest`` (the first
    sequence is ``longest`` long), and the attention mask (1 = real)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest + 1, n)
    lengths[0] = longest
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, V, (n, T)), 0).astype(np.int64)
    return ids, mask


def with_garbage(ids: np.ndarray, mask: np.ndarray, seed: int = 99) -> np.ndarray:
    """``ids`` with other random tokens at the padded positions."""
    return np.where(mask == 1, ids, np.random.default_rng(seed).integers(1, V, ids.shape))


def reference(features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy's per-element mean, std (ddof=1, 0 for one sample) and count of channels-first
    features ``(N, C, T)`` over the sequences in which each position is real."""
    f = np.asarray(features, dtype=np.float64)
    mean, std = np.zeros(f.shape[1:]), np.zeros(f.shape[1:])
    count = np.zeros(f.shape[1:])
    for t in range(f.shape[2]):
        real = f[mask[:, t] > 0, :, t]
        count[:, t] = len(real)
        if len(real):
            mean[:, t] = real.mean(axis=0)
            std[:, t] = real.std(axis=0, ddof=1) if len(real) > 1 else 0.0
    return mean, std, count


def assert_matches(est: Estimator, features: np.ndarray, mask: np.ndarray, rtol: float = 1e-12) -> None:
    mean, std, count = reference(features, mask)
    np.testing.assert_array_equal(est.counts(), count)
    scale = float(np.abs(features).max())
    np.testing.assert_allclose(est.mean(), mean, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(est.std(), std, rtol=rtol, atol=rtol * scale)


# -- the Estimator -------------------------------------------------------------------------
def features_and_mask(seed: int = 0, n: int = 23, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.maximum(rng.normal(0.3, 1.5, size=(n, c, T)), 0.0)  # exact zeros: activity counts
    lengths = rng.integers(2, T + 1, n)
    lengths[:2] = (T, 1)  # position T-1 is real in one sequence only: variance 0 there
    lengths[2:] = np.minimum(lengths[2:], T - 1)
    return f, (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)


def masked_estimate(f: np.ndarray, mask: np.ndarray, step: int = 5) -> Estimator:
    est = Estimator()
    for s in range(0, len(f), step):
        est.update(f[s : s + step], mask[s : s + step, None, :])
    return est


def test_masked_statistics_are_numpy_over_real_positions_in_any_batching():
    f, mask = features_and_mask()
    for step in (1, 4, 23):
        est = masked_estimate(f, mask, step)
        assert est.n == 23
        assert_matches(est, f, mask)
        assert est.counts()[0, -1] == 1 and est.std()[0, -1] == 0.0
        real = np.broadcast_to(mask[:, None, :] > 0, f.shape)
        fraction = ((f != 0) & real).sum(axis=0) / real.sum(axis=0)
        np.testing.assert_allclose(est.active_fraction(), fraction, rtol=1e-15)
    # The mask matters: the unmasked estimate of the same features differs.
    plain = Estimator()
    plain.update(f)
    assert np.abs(plain.mean() - est.mean()).max() > 0.1


def test_padding_values_are_never_read():
    f, mask = features_and_mask()
    bad = f.copy()
    pad = np.broadcast_to(mask[:, None, :] == 0, f.shape)
    bad[pad] = np.tile([np.nan, np.inf, -1e300, 7.0], pad.sum())[: pad.sum()]
    a, b = masked_estimate(f, mask), masked_estimate(bad, mask)
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)
    with pytest.raises(ValueError, match="NaN/inf"):  # unmasked, the garbage is read
        Estimator().update(bad)


def test_a_mask_of_ones_is_the_unmasked_estimate_bit_for_bit():
    f, _ = features_and_mask()
    ones, plain = Estimator(), Estimator()
    for s in range(0, len(f), 5):
        ones.update(f[s : s + 5], np.ones((len(f[s : s + 5]), 1, T), dtype=bool))
        plain.update(f[s : s + 5])
    assert ones.state_dict()["format"] == plain.state_dict()["format"] == "iba.estimate/2"
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(ones.state_dict()[key], value)


def test_masked_halves_merge_exactly():
    f, mask = features_and_mask()
    whole = masked_estimate(f, mask)
    # The second half has no sequence reaching the last position: zero counts there.
    first, second = masked_estimate(f[:11], mask[:11]), masked_estimate(f[11:], mask[11:])
    assert second.counts()[0, -1] == 0
    merged = Estimator().merge(first).merge(second)
    assert merged.n == whole.n
    np.testing.assert_array_equal(merged.counts(), whole.counts())
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(merged.var(), whole.var(), rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(merged.active_fraction(), whole.active_fraction())
    # The order of the merge does not matter beyond round-off.
    other = Estimator().merge(second).merge(first)
    np.testing.assert_allclose(other.mean(), whole.mean(), rtol=1e-13, atol=1e-14)


def test_never_real_positions_get_their_channels_statistics():
    f, mask = features_and_mask()
    mask[:, -2:] = 0  # the last two positions are padding everywhere
    est = masked_estimate(f, mask)
    assert np.all(est.counts()[:, -2:] == 0)
    real = mask[:, None, :].repeat(f.shape[1], axis=1) > 0
    for c in range(f.shape[1]):
        values = f[:, c, :][real[:, c, :]]
        np.testing.assert_allclose(est.mean()[c, -2:], values.mean(), rtol=1e-12)
        np.testing.assert_allclose(est.std()[c, -2:], values.std(ddof=1), rtol=1e-12)
        np.testing.assert_allclose(est.active_fraction()[c, -2:], np.mean(values != 0), rtol=1e-12)
    # The seen positions keep their own statistics.
    np.testing.assert_allclose(est.mean()[:, :-2], reference(f, mask)[0][:, :-2], rtol=1e-12, atol=1e-14)


def test_masked_estimates_save_load_and_old_files_still_load(tmp_path):
    f, mask = features_and_mask()
    est = masked_estimate(f, mask)
    est.layer, est.layout = "proj", "channels_last"
    state = est.state_dict()
    assert str(state["format"]) == "iba.estimate/3"
    np.testing.assert_array_equal(state["count"], est.counts())
    back = Estimator.load(est.save(tmp_path / "masked"), expected_layer="proj")
    np.testing.assert_array_equal(back.counts(), est.counts())
    np.testing.assert_array_equal(back.std(), est.std())
    assert back.layout == "channels_last"
    # A file as the previous version wrote it (format 2, no counts) loads: every element
    # counted n times.  Unmasked estimates are still written that way.
    mean = f.mean(axis=0)
    old = dict(
        format=np.asarray("iba.estimate/2"),
        n=np.asarray(23),
        mean=mean,
        m2=((f - mean) ** 2).sum(axis=0),
        nonzero=np.count_nonzero(f, axis=0).astype(np.float64),
        layer=np.asarray("proj"),
    )
    np.savez(tmp_path / "old.npz", **old)
    loaded = Estimator.load(tmp_path / "old.npz", expected_layer="proj")
    np.testing.assert_array_equal(loaded.counts(), np.full(f.shape[1:], 23.0))
    np.testing.assert_allclose(loaded.std(), f.std(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(loaded.mean(), mean)
    plain = Estimator()
    plain.update(f)
    assert str(plain.state_dict()["format"]) == "iba.estimate/2" and "count" not in plain.state_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("count"), "lacks its per-element 'count'"),
        (lambda s: s.update(count=s["count"] + 30), r"'count' must hold whole numbers in \[0, n = 23\]"),
        (lambda s: s.update(count=s["count"] + 0.5), "whole numbers"),
        (lambda s: s.update(count=s["count"][:, :3]), "'count' has shape"),
        (lambda s: s.update(count=np.zeros_like(s["count"])), "'nonzero' counts exceed"),
        (lambda s: s.update(format=np.asarray("iba.estimate/4")), "newer format"),
    ],
)
def test_damaged_masked_states_are_refused(change, message):
    f, mask = features_and_mask()
    state = masked_estimate(f, mask).state_dict()
    change(state)
    est = Estimator()
    with pytest.raises(SavedStateError, match=message):
        est.load_state_dict(state)
    assert est.n == 0  # left as it was


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.full((4, 1, T), 0.5), "only 0/1"),
        (np.ones((3, 1, T)), r"one row per sample"),
        (np.ones((4, 1, T - 1)), r"broadcast to the batch"),
        (np.array(["1"] * 4 * T).reshape(4, 1, T), "only 0/1"),
    ],
)
def test_bad_masks_of_update_are_refused(mask, message):
    est = Estimator()
    with pytest.raises(ValueError, match=message):
        est.update(np.ones((4, 2, T)), mask)
    assert est.n == 0


# -- models -----------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
nn = torch.nn


class Tagger(nn.Module):
    """ids ``(N, T)`` -> ``emb`` -> ``proj`` (Linear, ``(N, T, D)``, position-wise) -> mean
    over positions -> logits."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)
        self.fc = nn.Linear(D, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.proj(self.emb(ids))).mean(dim=1))


def torch_features(model: Tagger, ids: np.ndarray) -> np.ndarray:
    """The layer ``proj``'s features, channels-first ``(N, D, T)``."""
    with torch.no_grad():
        return model.proj(model.emb(torch.as_tensor(ids))).numpy().transpose(0, 2, 1)


def as_torch(data):
    """``data`` with every NumPy array (in lists, tuples and dicts) as a tensor."""
    if isinstance(data, np.ndarray):
        return torch.as_tensor(data)
    if isinstance(data, dict):
        return {k: as_torch(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(as_torch(v) for v in data)
    return data


def flags(model: nn.Module) -> tuple:
    from engine_models import model_flags

    return model_flags(model)


# -- the fronts -------------------------------------------------------------------------------
@pytest.mark.torch
def test_generic_front_with_an_array_and_its_mask():
    import iba_core

    model = Tagger()
    ids, mask = ids_and_mask(40, seed=1)
    iba = iba_core.IBA(model, "proj", layout="channels_last")
    est = iba.estimate(ids, attention_mask=mask, batch_size=7, progbar=False)
    assert_matches(est, torch_features(model, ids), mask, rtol=1e-6)
    # Other tokens at the padded positions change the features there, not the estimate.
    noisy = with_garbage(ids, mask)
    assert not np.allclose(torch_features(model, noisy), torch_features(model, ids))
    again = iba_core.IBA(model, "proj", layout="channels_last").estimate(
        noisy, attention_mask=mask, batch_size=7, progbar=False
    )
    np.testing.assert_allclose(again.mean(), est.mean(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(again.std(), est.std(), rtol=1e-6, atol=1e-7)
    # Without the mask, the padding enters the statistics.
    unmasked = iba_core.IBA(model, "proj", layout="channels_last").estimate(ids, progbar=False)
    assert np.abs(unmasked.mean() - est.mean()).max() > 0.05


@pytest.mark.torch
def test_mapping_data_and_mapping_batches_reach_the_same_estimate():
    import iba_core

    model = Tagger()
    ids, mask = ids_and_mask(40, seed=1)
    labels = np.arange(40) % 3
    ref = iba_core.IBA(model, "proj", layout="channels_last")
    ref.estimate(ids, attention_mask=torch.as_tensor(mask), batch_size=8, progbar=False)
    cuts = range(0, 40, 8)
    sources = {
        "tokenizer output": {"input_ids": ids, "attention_mask": mask},
        "dict batches": [
            {"input_ids": ids[s : s + 8], "attention_mask": mask[s : s + 8], "labels": labels[s : s + 8]}
            for s in cuts
        ],
        "(dict, y) batches": [
            ({"input_ids": ids[s : s + 8], "attention_mask": mask[s : s + 8].astype(bool)}, labels[s : s + 8])
            for s in cuts
        ],
        "engine batches": [MaskedBatch(ids[s : s + 8], mask[s : s + 8]) for s in cuts],
    }
    for name, data in sources.items():
        iba = iba_core.IBA(model, "proj", layout="channels_last")
        est = iba.estimate(data, batch_size=8, progbar=False)
        for key, value in ref.estimator.state_dict().items():
            np.testing.assert_array_equal(est.state_dict()[key], value, err_msg=name)


@pytest.mark.torch
def test_torch_front_with_a_tensor_and_with_a_data_loader_of_dicts():
    from iba_torch import IBA

    model = Tagger()
    ids, mask = ids_and_mask(40, seed=2)
    features = torch_features(model, ids)
    est = IBA(model, "proj").estimate(
        model, torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), progbar=False
    )
    assert est.layer == "proj" and est.layout == "channels_last"
    assert_matches(est, features, mask, rtol=1e-6)

    rows = [
        {"input_ids": torch.as_tensor(i), "attention_mask": torch.as_tensor(m), "labels": k % 3}
        for k, (i, m) in enumerate(zip(ids, mask, strict=True))
    ]
    loader = torch.utils.data.DataLoader(rows, batch_size=6)  # the default collate: dict batches
    est = IBA(model, "proj").estimate(model, loader, progbar=False)
    assert_matches(est, features, mask, rtol=1e-6)


@pytest.mark.tf
def test_keras_layer_and_copy_reach_the_masked_estimate():
    keras = pytest.importorskip("keras")
    import tensorflow as tf

    from iba_tf import IBACopy, IBALayer

    keras.utils.set_random_seed(0)
    inp = keras.Input((T,), dtype="int32")
    h = keras.layers.Dense(D, name="proj")(keras.layers.Embedding(V, D, name="emb")(inp))
    iba = IBALayer(name="iba")
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(iba(h)))
    model = keras.Model(inp, out)
    probe = keras.Model(inp, model.get_layer("proj").output)
    ids, mask = ids_and_mask(40, seed=3)
    ids = ids.astype("int32")
    features = np.moveaxis(probe(ids).numpy(), -1, 1)  # channels-first (N, D, T)

    est = iba.estimate(model, ids, attention_mask=mask, batch_size=7, progbar=False)
    assert_matches(est, features, mask, rtol=1e-6)
    data = tf.data.Dataset.from_tensor_slices(({"input_ids": ids, "attention_mask": mask}, np.zeros(40)))
    est = iba.estimate(model, data.batch(6), progbar=False)
    assert_matches(est, features, mask, rtol=1e-6)

    copied = IBACopy(model, "proj")
    est = copied.estimate(with_garbage(ids, mask).astype("int32"), attention_mask=mask, progbar=False)
    assert_matches(est, features, mask, rtol=1e-6)


# -- data-parallel ------------------------------------------------------------------------------
@pytest.mark.torch
def test_sharded_masked_estimate_equals_one_process(monkeypatch):
    from iba_core.contract import LocalShards
    from iba_torch import IBA, TorchBackend

    model = Tagger()
    ids, mask = ids_and_mask(40, seed=4)
    batches = [
        {"input_ids": torch.as_tensor(ids[s : s + 6]), "attention_mask": mask[s : s + 6]}
        for s in range(0, 40, 6)
    ]
    ref = IBA(model, "proj").estimate(model, batches, n_samples=33, progbar=False).state_dict()
    assert str(ref["format"]) == "iba.estimate/3"
    monkeypatch.setattr(TorchBackend, "distributed", lambda self, init=False: LocalShards([0, 1], "test"))
    got = IBA(model, "proj").estimate(model, batches, n_samples=33, progbar=False, distributed=True)
    state = got.state_dict()
    assert int(state["n"]) == 33
    for key in ("mean", "m2", "nonzero", "count"):
        np.testing.assert_array_equal(state[key], ref[key])  # the same merges in the same order
    assert_matches(got, torch_features(model, ids[:33]), mask[:33], rtol=1e-6)


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::iba_core.engines.UnseenPositionsWarning")  # the shorter half
def test_merge_estimates_of_two_masked_halves(tmp_path, capsys):
    import iba_core
    from iba_core.apps.cli import main

    model = Tagger()
    ids, mask = ids_and_mask(40, seed=5)
    ids[25:, -3:], mask[25:, -3:] = 0, 0  # the halves have different lengths
    parts = []
    for i, rows in enumerate((slice(0, 25), slice(25, 40))):
        iba = iba_core.IBA(model, "proj", layout="channels_last")
        est = iba.estimate(ids[rows], attention_mask=mask[rows], batch_size=8, progbar=False)
        parts.append(str(est.save(tmp_path / f"part{i}")))
    out = tmp_path / "all.npz"
    assert main(["merge-estimates", *parts, "-o", str(out)]) == 0, capsys.readouterr().err
    merged = Estimator.load(out, expected_layer="proj")
    whole = iba_core.IBA(model, "proj", layout="channels_last")
    whole.estimate(ids, attention_mask=mask, batch_size=8, progbar=False)
    np.testing.assert_array_equal(merged.counts(), whole.estimator.counts())
    np.testing.assert_allclose(merged.mean(), whole.estimator.mean(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(merged.var(), whole.estimator.var(), rtol=1e-12, atol=1e-13)


# -- mistakes -----------------------------------------------------------------------------------
def _bad_calls():
    ids, mask = ids_and_mask(12, seed=6)
    zero_row = mask.copy()
    zero_row[3] = 0
    return [
        ("rows", dict(data=ids, attention_mask=mask[:10]), r"shape \(N, T\) = \(12, T\)"),
        ("positions", dict(data=ids, attention_mask=mask[:, :-1]), r"one entry per sequence and position"),
        ("fraction", dict(data=ids, attention_mask=mask * 0.5), r"only 0/1 \(or False/True\)"),
        ("two", dict(data=ids, attention_mask=mask * 2), "only 0/1"),
        ("empty row", dict(data=ids, attention_mask=zero_row), r"input\(s\) \[3\].*leave sequences without"),
        ("batches", dict(data=[ids], attention_mask=mask), r"'attention_mask': mask\}"),
        (
            "token types",
            dict(data=[{"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids}]),
            r"leave out \['token_type_ids'\].*return_token_type_ids=False",
        ),
        (
            "batch mask",
            dict(data=[{"input_ids": ids, "attention_mask": mask[:, :4]}]),
            r"attention_mask has shape \(12, 4\) .* one entry per sequence and position",
        ),
        (
            "twice",
            dict(data={"input_ids": ids, "attention_mask": mask}, attention_mask=mask),
            "give it once",
        ),
    ]


@pytest.mark.torch
@pytest.mark.parametrize(("name", "kwargs", "message"), _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_masks_are_refused_and_the_model_left_as_it_was(name, kwargs, message):
    import iba_core
    from iba_torch import IBA

    model = Tagger().train()
    model.fc.weight.requires_grad_(False)
    before = flags(model)
    data = kwargs.pop("data")
    for estimate in (
        lambda: iba_core.IBA(model, "proj", layout="channels_last").estimate(data, progbar=False, **kwargs),
        lambda: IBA(model, "proj").estimate(model, as_torch(data), progbar=False, **kwargs),
    ):
        with pytest.raises(ValueError, match=message):
            estimate()
        assert flags(model) == before
    assert model(torch.as_tensor(ids_and_mask(2, 0)[0])).shape == (2, 3)


@pytest.mark.torch
def test_a_mask_on_a_layer_without_positions_is_refused():
    import iba_core

    model = Tagger()
    before = flags(model)
    ids, mask = ids_and_mask(8, seed=7)
    with pytest.raises(ValueError, match=r"needs sequence features .* estimate without a mask"):
        iba_core.IBA(model, "fc").estimate(ids, attention_mask=mask, progbar=False)
    assert flags(model) == before


@pytest.mark.torch
def test_positions_never_real_warn_and_still_get_noise_of_their_channel():
    import iba_core

    model = Tagger()
    ids, mask = ids_and_mask(40, seed=8, longest=T - 2)  # positions 7 and 8: always padding
    iba = iba_core.IBA(model, "proj", layout="channels_last", optimization_steps=2, sigma=None)
    with pytest.warns(UnseenPositionsWarning, match=r"2 position\(s\) of layer 'proj'.*\[7, 8\]"):
        iba.estimate(ids, attention_mask=mask, progbar=False)
    f = torch_features(model, ids)
    real = np.broadcast_to(mask[:, None, :] > 0, f.shape)
    for c in range(D):
        pooled = f[:, c, :][real[:, c, :]].astype(np.float64)
        np.testing.assert_allclose(iba.estimator.mean()[c, 7:], pooled.mean(), rtol=1e-6)
        np.testing.assert_allclose(iba.estimator.std()[c, 7:], pooled.std(ddof=1), rtol=1e-6)
    full, _ = ids_and_mask(2, seed=9)
    full[:, 7:] = 5
    bits = iba.analyze(full, target=[0, 1], seed=0)
    assert bits.shape == (2, T) and np.all(np.isfinite(bits)) and np.all(bits[:, 7:] > 0)


# -- iba explain --texts ---------------------------------------------------------------------
CLI_MODULE = f"""
import torch
from torch import nn

V, D = {V}, {D}


{inspect.getsource(Tagger)}

def model():
    return Tagger()


class Words:
    pad_token_id = 0

    def encode(self, text):
        return [int(w[1:]) for w in text.split()]


def tokenizer():
    return Words()
"""


@pytest.mark.torch
def test_iba_explain_texts_estimates_without_the_padding(tmp_path, capsys):
    from iba_core.apps.cli import main

    (tmp_path / "tagmodel.py").write_text(CLI_MODULE)
    spec = str(tmp_path / "tagmodel.py")
    ids, mask = ids_and_mask(30, seed=10)
    ids = with_garbage(ids, mask)  # what the text holds decides, not what pads it
    lines = [" ".join(f"w{i}" for i in row[m > 0]) for row, m in zip(ids, mask, strict=True)]
    (tmp_path / "est.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "texts.txt").write_text("\n".join(lines[:2]) + "\n")
    common = ["explain", f"{spec}:model", "--backend", "torch", "--layer", "proj", "--layout"]
    common += ["channels_last", "--texts", str(tmp_path / "texts.txt"), "--tokenizer", f"{spec}:tokenizer"]
    common += ["--max-length", str(T), "--steps", "2"]
    argv = [*common, "--estimate-from", str(tmp_path / "est.txt"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--save-estimate", str(tmp_path / "est.npz")]) == 0, capsys.readouterr().err
    est = Estimator.load(tmp_path / "est.npz", expected_layer="proj")
    padded = np.where(mask > 0, ids, 0)  # as the command pads the texts: with pad_token_id
    assert_matches(est, torch_features(Tagger(), padded), mask, rtol=1e-6)
    # The saved (masked) estimate serves a later run.
    again = [*common, "--estimate", str(tmp_path / "est.npz"), "--out", str(tmp_path / "again")]
    assert main(again) == 0, capsys.readouterr().err
    with (
        np.load(tmp_path / "out" / "token_maps.npz") as a,
        np.load(tmp_path / "again" / "token_maps.npz") as b,
    ):
        assert a["bits"].shape == (2, T) and np.all(a["bits"][a["attention_mask"] == 0] == 0)
        np.testing.assert_allclose(a["bits"], b["bits"], rtol=1e-5, atol=1e-7)
