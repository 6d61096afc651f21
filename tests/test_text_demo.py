"""The text demo: its task generator, its transformer in both frameworks, and ``iba demo
--task text`` (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from iba_core.apps.text_task import (
    CLASSES,
    FILLER,
    MAX_LENGTH,
    MIN_LENGTH,
    PAD_ID,
    TOPIC_WORDS,
    VOCAB,
    decode,
    evidence_precision_at_k,
    make_text_task,
    rank_correlation,
)

pytestmark = pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")


# -- the task ------------------------------------------------------------------------------
def test_generator_places_evidence_and_decides_labels():
    task = make_text_task(300, seed=3)
    assert task.ids.shape == task.mask.shape == task.evidence.shape == (300, MAX_LENGTH)
    topic_of = {VOCAB.index(w): c for c, words in enumerate(CLASSES) for w in TOPIC_WORDS[words]}
    filler = {VOCAB.index(w) for w in FILLER}
    for i in range(len(task)):
        length = int(task.lengths[i])
        assert MIN_LENGTH <= length <= MAX_LENGTH
        np.testing.assert_array_equal(task.mask[i], np.arange(MAX_LENGTH) < length)
        assert np.all(task.ids[i, length:] == PAD_ID) and np.all(task.ids[i, :length] != PAD_ID)
        ev, comp = np.flatnonzero(task.evidence[i]), np.flatnonzero(task.competitor[i])
        # the evidence positions hold the label's topic words, the competitor's one other topic
        assert {topic_of[int(t)] for t in task.ids[i, ev]} == {int(task.labels[i])}
        others = {topic_of[int(t)] for t in task.ids[i, comp]}
        assert len(others) == 1 and int(task.labels[i]) not in others
        assert len(ev) in (2, 3) and len(comp) == len(ev) - 1 and np.all(ev < length)
        # every other real token is filler: the label is the topic with the most words
        rest = np.setdiff1d(np.arange(length), np.r_[ev, comp])
        assert set(task.ids[i, rest].tolist()) <= filler
        counts = np.bincount([topic_of[int(t)] for t in task.ids[i] if int(t) in topic_of], minlength=4)
        assert int(np.argmax(counts)) == int(task.labels[i]) and np.sort(counts)[-2] < counts.max()
    assert set(np.unique(task.labels)) == set(range(len(CLASSES)))
    assert task.tokens(0) == decode(task.ids[0, : task.lengths[0]])


def test_generator_is_seeded():
    a, b, c = make_text_task(20, seed=1), make_text_task(20, seed=1), make_text_task(20, seed=2)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.evidence, b.evidence)
    assert not np.array_equal(a.ids, c.ids)
    with pytest.raises(ValueError, match="max_length"):
        make_text_task(2, max_length=MIN_LENGTH - 1)


def test_evidence_precision_at_k():
    task = make_text_task(50, seed=4)
    perfect = task.evidence.astype(float) + 0.01 * task.mask
    np.testing.assert_allclose(evidence_precision_at_k(perfect, task.evidence, task.mask), 1.0)
    # evidence ranked last among the real tokens; padding is never ranked, even when high
    worst = np.where(task.mask == 1, 1.0 - task.evidence, 5.0)
    np.testing.assert_allclose(evidence_precision_at_k(worst, task.evidence, task.mask), 0.0)
    # a constant map scores chance exactly (ties shared), not what the token order gives
    k = task.evidence.sum(axis=1)
    np.testing.assert_allclose(
        evidence_precision_at_k(np.ones(task.ids.shape), task.evidence, task.mask), k / task.lengths
    )
    # one evidence token at the top and k - 1 filler tokens: 1/k
    one = np.zeros(task.ids.shape)
    for i in range(len(task)):
        one[i, np.flatnonzero(task.evidence[i])[0]] = 3.0
        one[i, np.flatnonzero(~task.evidence[i] & (task.mask[i] == 1))[: k[i] - 1]] = 2.0
    np.testing.assert_allclose(evidence_precision_at_k(one, task.evidence, task.mask), 1.0 / k)
    rho = rank_correlation(perfect, -perfect, task.mask)
    np.testing.assert_allclose(rho, -1.0)


# -- the models ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_model():
    pytest.importorskip("torch")
    from iba_torch._text import text_model

    return text_model()


@pytest.mark.torch
def test_shipped_weights_reach_their_accuracy(torch_model):
    """The training script reports 1.000 on its test set (2000 sequences, seed 1); on a
    fresh set the shipped weights must stay above 0.99."""
    import torch

    task = make_text_task(1000, seed=777)
    with torch.no_grad():
        pred = torch_model(torch.from_numpy(task.ids)).argmax(1).numpy()
    assert (pred == task.labels).mean() >= 0.99


@pytest.mark.torch
def test_padding_and_attention_do_not_change_the_output(torch_model):
    import torch

    task = make_text_task(8, seed=5)
    ids = torch.from_numpy(task.ids)
    with torch.no_grad():
        logits = torch_model(ids)
        cut = torch_model(ids[:, : int(task.lengths.max())])
        maps = torch_model.attention(ids)
        again = torch_model(ids)
    torch.testing.assert_close(cut, logits, rtol=1e-5, atol=1e-5)  # trailing pads do nothing
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    assert len(maps) == 2 and maps[0].shape == (8, 2, MAX_LENGTH, MAX_LENGTH)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(8, 2, MAX_LENGTH))
    pad = torch.from_numpy(task.mask == 0)
    assert float(maps[0].permute(0, 1, 3, 2)[pad[:, None].expand(8, 2, MAX_LENGTH)].abs().max()) < 1e-30


@pytest.mark.torch
@pytest.mark.tf
def test_keras_twin_gives_the_same_logits_and_attention(torch_model):
    pytest.importorskip("tensorflow")
    import torch

    from iba_tf._text import attention, text_model

    task = make_text_task(64, seed=6)
    keras_model = text_model()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(task.ids)).numpy()
        expected_att = [a.numpy() for a in torch_model.attention(torch.from_numpy(task.ids))]
    got = np.asarray(keras_model(task.ids))
    # float32 round-off on logits of size ~10
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    for a, b in zip(attention(keras_model, task.ids), expected_att, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5)


# -- IBA on the demo -------------------------------------------------------------------------
@pytest.mark.torch
def test_iba_puts_its_top_k_bits_on_the_evidence():
    """Measured on this model (16 sequences, 500 for the estimate, seeds 0-5): 0.85 to 0.98
    of the top-k tokens are evidence, chance 0.12 to 0.16; required: 0.75."""
    from iba_core import get_backend
    from iba_core.apps.text_demo import explain_text

    backend = get_backend("torch")
    result = explain_text(backend, backend.demo_text_model(), 16, seed=0, estimate_samples=500)
    assert result.maps.shape == (16, MAX_LENGTH)
    assert np.all(result.maps[result.task.mask == 0] == 0.0)  # padding: exactly 0 bits
    assert np.all(result.maps[result.task.mask == 1] > 0.0)
    assert np.nanmean(result.precision) >= 0.75
    assert np.nanmean(result.precision) > 4 * result.chance.mean()


@pytest.mark.torch
@pytest.mark.tf
def test_demo_maps_agree_across_frameworks():
    """Same weights, same NumPy noise: the same token maps to float32 round-off."""
    pytest.importorskip("tensorflow")
    from iba_core import get_backend
    from iba_core.apps.text_demo import explain_text

    maps = {}
    for name in ("torch", "tf"):
        backend = get_backend(name)
        maps[name] = explain_text(backend, backend.demo_text_model(), 4, seed=1, estimate_samples=250).maps
    np.testing.assert_allclose(maps["tf"], maps["torch"], rtol=0, atol=1e-4 * maps["torch"].max())


@pytest.mark.torch
def test_iba_demo_text_end_to_end(tmp_path, capsys):
    from iba_core.apps.cli import main

    out = tmp_path / "text"
    assert main(["demo", "--task", "text", "--n", "2", "--estimate-samples", "250", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-k on evidence" in printed and "chance" in printed
    assert {p.name for p in out.iterdir()} == {"text_demo.html", "text_demo.png", "token_maps.npz"}
    assert (out / "text_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(out / "token_maps.npz") as data:
        maps, mask, ids = data["token_maps"], data["attention_mask"], data["ids"]
        assert maps.shape == (2, MAX_LENGTH) and np.all(maps[mask == 0] == 0)
    page = (out / "text_demo.html").read_text(encoding="utf-8")
    task_words = decode(ids[0][mask[0] == 1])
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert all(w in page for w in task_words)


def test_backend_without_a_text_model_is_a_one_line_error(strict_plugin, tmp_path, capsys):
    from iba_core.apps.cli import main

    out = tmp_path / "never"
    assert main(["demo", "--task", "text", "--backend", "strict", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "strict backend has no text demo model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
