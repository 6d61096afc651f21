"""Sequence features: layouts (declared, inferred, refused), attention masks, token ids,
output objects, and PyTorch/Keras agreement on one sequence model (issue 13).

The toy models read one position only (``K``): whatever the layer, the information that
the explained logit needs sits at token ``K``, so a correct per-token map peaks there and a
map read along the wrong axis (the channels) does not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")

T, V, D, K = 12, 30, 8, 5


def token_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, V, (n, T)).astype(np.int64)


def toy_weights(seed: int = 3) -> dict[str, np.ndarray]:
    """Weights shared by the PyTorch and Keras toys (PyTorch's layouts)."""
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.standard_normal((V, D)),
        "proj": rng.standard_normal((D, D)) * 1.5 / np.sqrt(D),
        "proj_b": rng.standard_normal(D) * 0.1,
        "fc": rng.standard_normal((3, D)) * 4 / np.sqrt(D),
        "fc_b": rng.standard_normal(3) * 0.1,
    }


# -- PyTorch --------------------------------------------------------------------------
torch = pytest.importorskip("torch")
nn = torch.nn


class TokenK(nn.Module):
    """ids ``(N, T)`` -> ``emb`` ``(N, T, D)`` -> ``proj`` (Linear + tanh, ``(N, T, D)``)
    -> logits from token ``K`` only.  ``channels_first=True`` puts a 1x1 ``Conv1d``
    (``(N, D, T)``) in place of the Linear."""

    def __init__(self, channels_first: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        w = toy_weights()
        self.channels_first = channels_first
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Conv1d(D, D, 1) if channels_first else nn.Linear(D, D)
        self.act = nn.Tanh()
        self.fc = nn.Linear(D, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.as_tensor(w["emb"]))
            self.proj.weight.copy_(torch.as_tensor(w["proj"]).reshape(self.proj.weight.shape))
            self.proj.bias.copy_(torch.as_tensor(w["proj_b"]))
            self.fc.weight.copy_(torch.as_tensor(w["fc"]))
            self.fc.bias.copy_(torch.as_tensor(w["fc_b"]))
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if self.channels_first:
            h = self.act(self.proj(h.transpose(1, 2)))[:, :, K]
        else:
            h = self.act(self.proj(h))[:, K]
        return self.fc(h)


def estimated(iba, model, n: int = 96):
    iba.estimate(model, [torch.as_tensor(token_ids(n, seed=7))], n_samples=n)
    return iba


def peaks(maps: np.ndarray) -> np.ndarray:
    return np.asarray(maps).reshape(-1, T).argmax(axis=1)


@pytest.mark.torch
@pytest.mark.parametrize(
    ("channels_first", "layer", "layout"),
    [(False, "proj", "channels_last"), (True, "proj", "channels_first"), (False, "emb", "channels_last")],
)
def test_torch_token_k_gets_the_maximum_in_either_layout(channels_first, layer, layout):
    from iba_torch import IBA

    model = TokenK(channels_first)
    iba = IBA(model, layer, beta=0.1)
    assert iba.engine.layout == layout and iba.engine.layout_known  # inferred from the module
    estimated(iba, model)
    ids = torch.as_tensor(token_ids(4))
    maps = iba.analyze(ids, target="predicted", seed=0)
    assert maps.shape == (4, T)
    np.testing.assert_array_equal(peaks(maps), K)
    # Read along the wrong axis, the map would have D entries, not T, and no peak at K.
    assert np.all(maps >= 0)


@pytest.mark.torch
def test_declared_layout_wins_and_the_wrong_one_misattributes():
    from iba_torch import IBA

    model = TokenK()
    ids = torch.as_tensor(token_ids(3))
    right = estimated(IBA(model, "proj", layout="channels_last", beta=0.1), model)
    np.testing.assert_array_equal(peaks(right.analyze(ids, target="predicted", seed=0)), K)
    # Declared the wrong way, the "sequence" axis is the D=8 channels: maps of length 8.
    wrong = estimated(IBA(model, "proj", layout="channels_first", beta=0.1), model)
    assert wrong.analyze(ids, target="predicted", seed=0, mode="capacity").shape == (3, D)


class Opaque(nn.Module):
    """A module whose layout nobody can know: ``(N, T, D)`` features from a custom op."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * 1.0


class OpaqueModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TokenK()
        self.mix = Opaque()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.inner
        return m.fc(m.act(m.proj(self.mix(m.emb(ids))))[:, K])


def _flags(model: nn.Module) -> tuple:
    from engine_models import model_flags

    return model_flags(model)


@pytest.mark.torch
def test_rank3_features_of_unknown_layout_are_refused_and_the_model_left_as_it_was():
    from iba_torch import IBA

    model = OpaqueModel().train()
    model.inner.fc.weight.requires_grad_(False)  # an unusual mix of flags, kept as it is
    before = _flags(model)
    iba = IBA(model, "mix")
    assert not iba.engine.layout_known
    with pytest.raises(ValueError, match=r"layout='channels_last'.*layout='channels_first'") as info:
        estimated(iba, model)
    assert "layer 'mix'" in str(info.value) and "(96, 12, 8)" in str(info.value)
    assert _flags(model) == before
    ids = torch.as_tensor(token_ids(2))
    out = model(ids)  # the model still works, unhooked
    assert out.shape == (2, 3)
    # With the layout declared the same layer is explained, peak at K.
    iba = estimated(IBA(model, "mix", layout="channels_last", beta=0.1), model)
    np.testing.assert_array_equal(peaks(iba.analyze(ids, target="predicted", seed=0)), K)
    assert _flags(model) == before


@pytest.mark.torch
def test_a_bottleneck_module_inside_the_model_refuses_sequences_only_while_at_work():
    from iba_torch import IBA

    iba = IBA()
    model = nn.Sequential(nn.Embedding(V, D), iba, nn.Flatten(), nn.Linear(T * D, 3))
    ids = torch.as_tensor(token_ids(2))
    assert model(ids).shape == (2, 3)  # at rest: the identity, whatever the rank
    with pytest.raises(ValueError, match="layout="):
        iba.estimate(model, [ids], n_samples=2)
    assert model(ids).shape == (2, 3)


class Encoder(nn.Module):
    """Token ids -> embedding -> a batch-first ``nn.TransformerEncoderLayer`` (``enc``) that
    ignores padding (``src_key_padding_mask`` from the ids) -> logits from token ``K``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        base = TokenK()
        self.emb, self.fc = base.emb, base.fc
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(ids), src_key_padding_mask=ids == 0)[:, K])


@pytest.mark.torch
def test_a_transformer_encoder_layer_as_the_bottleneck_with_padding():
    from iba_torch import IBA

    model = Encoder()
    iba = IBA(model, "enc", beta=0.1)
    assert iba.engine.layout == "channels_last"
    estimated(iba, model)
    ids = token_ids(3)
    mask = np.ones((3, T), dtype=bool)
    mask[1, 9:] = False
    ids[~mask] = 0
    maps = iba.analyze(torch.as_tensor(ids), target="predicted", seed=0, attention_mask=mask)
    assert np.all(maps[~mask] == 0.0) and np.all(maps[mask] > 0)
    np.testing.assert_array_equal(peaks(maps), K)
    assert not model.enc._forward_hooks


@pytest.mark.torch
def test_sequence_first_transformer_layers_are_refused_with_the_fix():
    from iba_torch import IBA

    model = nn.Sequential(nn.TransformerEncoderLayer(D, 2, 16, batch_first=False))
    with pytest.raises(ValueError, match="batch_first=True"):
        IBA(model, "0")


@pytest.mark.torch
def test_inference_rules_of_the_torch_backend():
    from iba_torch._backend import TorchBackend

    be = TorchBackend()
    seq = nn.Sequential(
        nn.Conv1d(4, 4, 3), nn.ReLU(), nn.Dropout(), nn.Linear(4, 4), nn.GELU(), Opaque(), nn.ReLU()
    )
    got = {name: be.layer_layout(seq, name) for name in ("0", "1", "2", "3", "4", "5", "6")}
    assert got == {
        "0": "channels_first",
        "1": "channels_first",  # an activation takes the layout of what feeds it
        "2": "channels_first",
        "3": "channels_last",
        "4": "channels_last",
        "5": None,
        "6": None,
    }
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 16, batch_first=True), 2)
    assert be.layer_layout(enc, "layers.0") == "channels_last"
    assert be.layer_layout(nn.Sequential(enc), "0") == "channels_last"
    assert be.layer_layout(nn.Sequential(nn.LayerNorm([4, 5])), "0") is None  # not one axis
    assert (
        be.layer_layout(nn.Sequential(nn.MultiheadAttention(D, 2, batch_first=True)), "0") == "channels_last"
    )


# -- attention masks ------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("sigma", [1.0, None])
def test_padding_gets_exactly_zero_bits_and_mixed_lengths_share_one_call(sigma):
    from iba_torch import IBA

    model = TokenK()
    iba = IBA(model, "proj", beta=0.1)
    iba.sigma = sigma
    estimated(iba, model)
    ids = token_ids(3)
    mask = np.ones((3, T), dtype=bool)
    mask[1, 8:] = False  # input 1 has 8 real tokens, input 2 has 10
    mask[2, 10:] = False
    ids[~mask] = 0
    x = torch.as_tensor(ids)
    maps = iba.analyze(x, target="predicted", seed=[10, 11, 12], attention_mask=mask)
    assert np.all(maps[~mask] == 0.0)
    assert np.all(maps[mask] > 0)
    np.testing.assert_array_equal(peaks(maps), K)
    # Each input gets alone (same seed, same mask) what it gets among the others.
    for i in range(3):
        alone = iba.analyze(x[i : i + 1], target="predicted", seed=[10 + i], attention_mask=mask[i : i + 1])
        np.testing.assert_allclose(alone, maps[i], rtol=1e-5, atol=1e-7)
    # What the padding holds changes nothing on the real tokens (the model ignores it):
    # no noise, no capacity and no smoothing reach across the mask.
    other = ids.copy()
    other[~mask] = 7
    again = iba.analyze(torch.as_tensor(other), target="predicted", seed=[10, 11, 12], attention_mask=mask)
    np.testing.assert_allclose(again, maps, rtol=1e-5, atol=1e-7)
    # The capacity of the last explanation is 0 on padding too.
    cap = iba.capacity().numpy()
    assert np.all(cap.transpose(0, 2, 1)[~mask] == 0.0)


@pytest.mark.torch
def test_padded_features_pass_the_bottleneck_unchanged():
    from iba_torch import IBA

    model = TokenK()
    iba = estimated(IBA(model, "proj", beta=0.1), model)
    mask = np.ones((2, T))
    mask[:, 6:] = 0
    seen = []

    def loss(batch):
        out = model(batch)
        return nn.functional.cross_entropy(out, torch.zeros(len(out), dtype=torch.long))

    handle = model.act.register_forward_hook(lambda m, a, out: seen.append(a[0].detach().clone()))
    try:
        iba.analyze(torch.as_tensor(token_ids(2)), loss, attention_mask=mask, optimization_steps=2)
    finally:
        handle.remove()
    clean = model.proj(model.emb(torch.as_tensor(token_ids(2))))  # (2, T, D)
    noisy = seen[-1].reshape(2, -1, T, D)  # the copies of each input
    np.testing.assert_array_equal(
        noisy[:, :, 6:].numpy(), clean[:, None, 6:].detach().expand_as(noisy[:, :, 6:]).numpy()
    )
    assert not torch.allclose(noisy[:, :, :6], clean[:, None, :6].detach().expand_as(noisy[:, :, :6]))


@pytest.mark.torch
def test_restrict_flow_keeps_the_last_attention_mask():
    from iba_torch import IBA

    model = TokenK()
    iba = estimated(IBA(model, "proj", beta=0.1), model)
    x = torch.as_tensor(token_ids(2))
    mask = np.ones((2, T))
    mask[1, 7:] = 0
    iba.analyze(x, target=0, attention_mask=mask, optimization_steps=2)
    seen = []
    handle = model.act.register_forward_hook(lambda m, a, out: seen.append(a[0].detach().clone()))
    try:
        with iba.restrict_flow():
            model(x)
        with iba.restrict_flow(iba.bottleneck.alpha):  # a given mask: no attention mask
            model(x)
    finally:
        handle.remove()
    clean = model.proj(model.emb(x)).detach()
    np.testing.assert_array_equal(seen[0][1, 7:].numpy(), clean[1, 7:].numpy())
    assert not torch.allclose(seen[0][1, :7], clean[1, :7])
    assert not torch.allclose(seen[1][1, 7:], clean[1, 7:])


@pytest.mark.torch
def test_bad_masks_are_refused_clearly():
    from iba_torch import IBA

    model = TokenK()
    iba = estimated(IBA(model, "proj", beta=0.1), model)
    x = torch.as_tensor(token_ids(2))
    with pytest.raises(ValueError, match=r"shape \(N, T\) = \(2, T\)"):
        iba.analyze(x, target=0, attention_mask=np.ones((3, T)))
    with pytest.raises(ValueError, match="one entry per input and position"):
        iba.analyze(x, target=0, attention_mask=np.ones((2, T + 1)))
    with pytest.raises(ValueError, match="only 0/1"):
        iba.analyze(x, target=0, attention_mask=np.full((2, T), 0.5))
    empty = np.ones((2, T))
    empty[1] = 0
    with pytest.raises(ValueError, match=r"no real token in input\(s\) \[1\]"):
        iba.analyze(x, target=0, attention_mask=empty)
    vectors = estimated(IBA(model, "fc"), model)
    with pytest.raises(ValueError, match="needs sequence features"):
        vectors.analyze(x, target=0, mode="capacity", attention_mask=np.ones((2, T)))


@pytest.mark.torch
def test_a_tensor_mask_and_the_generic_front():
    import iba_core

    model = TokenK()
    iba = iba_core.IBA(model, "proj", beta=0.1)
    iba.estimate(token_ids(96, seed=7), n_samples=96)
    mask = torch.ones((2, T), dtype=torch.long)
    mask[0, 9:] = 0
    maps = iba.analyze(token_ids(2), target="predicted", seed=0, attention_mask=mask)
    assert maps.shape == (2, T) and np.all(maps[0, 9:] == 0.0) and np.all(maps[0, :9] > 0)
    np.testing.assert_array_equal(peaks(maps), K)


# -- output objects, encoder layers, closures -------------------------------------------
@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden_states: tuple | None = None


class ToyLayer(nn.Module):
    """An encoder layer shaped like a Hugging Face block: returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.tanh(self.dense(h)),)


ToyLayer.__module__ = "transformers.models.toy.modeling_toy"  # how the backend tells it


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        base = TokenK()
        self.emb, self.fc = base.emb, base.fc
        self.layer = ToyLayer()
        with torch.no_grad():
            self.layer.dense.weight.copy_(base.proj.weight)
            self.layer.dense.bias.copy_(base.proj.bias)

    def forward(self, input_ids: torch.Tensor) -> Output:
        (h,) = self.layer(self.emb(input_ids))
        return Output(logits=self.fc(h[:, K]), hidden_states=(h,))


@pytest.mark.torch
def test_hugging_face_style_layer_and_output_object_with_target():
    from iba_torch import IBA

    model = HFStyle()
    iba = IBA(model, "layer", beta=0.1)
    assert iba.engine.layout == "channels_last"  # recognised without importing transformers
    estimated(iba, model)
    maps = iba.analyze(torch.as_tensor(token_ids(3)), target="predicted", seed=0)
    np.testing.assert_array_equal(peaks(maps), K)
    for name, module in model.named_modules():
        assert not module._forward_hooks, name


@pytest.mark.torch
def test_the_closure_form_gets_integer_ids_and_agrees_with_target():
    from iba_torch import IBA

    model = HFStyle()
    iba = estimated(IBA(model, "layer", beta=0.1), model)
    x = torch.as_tensor(token_ids(2))
    labels = model(x).logits.argmax(1)
    dtypes = []

    def loss(batch):
        dtypes.append(batch.dtype)
        out = model(batch).logits
        return nn.functional.cross_entropy(out, labels.repeat_interleave(len(batch) // 2))

    maps = iba.analyze(x, loss, seed=0)
    assert set(dtypes) == {torch.int64}  # token ids are never cast to float
    np.testing.assert_array_equal(peaks(maps), K)


# -- Keras ------------------------------------------------------------------------------
def keras_token_k(channels_first: bool = False):
    """The Keras twin of :class:`TokenK` (same weights)."""
    keras = pytest.importorskip("keras")
    w = toy_weights()
    ids = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(V, D, name="emb")(ids)
    if channels_first:
        h = keras.layers.Permute((2, 1), name="to_cf")(h)
        h = keras.layers.Conv1D(D, 1, data_format="channels_first", name="proj")(h)
        h = keras.layers.Activation("tanh", name="act")(h)
        h = keras.layers.Lambda(lambda t: t[:, :, K], name="pick")(h)
    else:
        h = keras.layers.Dense(D, name="proj")(h)
        h = keras.layers.Activation("tanh", name="act")(h)
        h = keras.layers.Lambda(lambda t: t[:, K], name="pick")(h)
    out = keras.layers.Dense(3, name="fc")(h)
    model = keras.Model(ids, out)
    model.get_layer("emb").set_weights([w["emb"]])
    kernel = w["proj"].T if not channels_first else w["proj"].T[None]
    model.get_layer("proj").set_weights([kernel, w["proj_b"]])
    model.get_layer("fc").set_weights([w["fc"].T, w["fc_b"]])
    return model


@pytest.mark.tf
@pytest.mark.parametrize("channels_first", [False, True])
def test_keras_token_k_gets_the_maximum_in_either_layout(channels_first):
    from iba_tf import IBACopy

    model = keras_token_k(channels_first)
    iba = IBACopy(model, "proj", beta=0.1)
    assert iba.engine.layout == ("channels_first" if channels_first else "channels_last")
    iba.estimate(token_ids(96, seed=7).astype("int32"), n_samples=96)
    maps = iba.analyze(token_ids(4).astype("int32"), target="predicted", seed=0)
    assert maps.shape == (4, T)
    np.testing.assert_array_equal(peaks(maps), K)
    mask = np.ones((4, T))
    mask[2, 9:] = 0
    padded = iba.analyze(token_ids(4).astype("int32"), target="predicted", seed=0, attention_mask=mask)
    assert np.all(padded[2, 9:] == 0.0) and np.all(padded[2, :9] > 0)
    np.testing.assert_array_equal(peaks(padded), K)


@pytest.mark.tf
def test_keras_bottleneck_layer_in_a_sequence_model_with_a_mask():
    keras = pytest.importorskip("keras")
    from iba_tf import IBALayer

    w = toy_weights()
    ids = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(V, D, name="emb")(ids)
    iba = IBALayer(beta=0.1, name="iba")
    h = keras.layers.Dense(D, activation="tanh", name="proj")(iba(h))
    out = keras.layers.Dense(3, name="fc")(keras.layers.Lambda(lambda t: t[:, K])(h))
    model = keras.Model(ids, out)
    model.get_layer("emb").set_weights([w["emb"]])
    model.get_layer("proj").set_weights([w["proj"].T, w["proj_b"]])
    model.get_layer("fc").set_weights([w["fc"].T, w["fc_b"]])
    iba.estimate(model, token_ids(96, seed=7).astype("int32"), n_samples=96)
    mask = np.ones((3, T), dtype=bool)
    mask[0, 9:] = False
    x = token_ids(3).astype("int32")
    maps = iba.analyze(x, model=model, target="predicted", seed=0, attention_mask=mask)
    assert maps.shape == (3, T) and np.all(maps[~mask] == 0.0) and np.all(maps[mask] > 0)
    np.testing.assert_array_equal(peaks(maps), K)
    # restrict_flow (the layer's own traced restriction) keeps the padding unchanged too.
    probe = keras.Model(ids, model.get_layer("proj").input)
    clean = probe(x).numpy()
    with iba.restrict_flow():
        noisy = probe(x).numpy()
    np.testing.assert_array_equal(noisy[0, 9:], clean[0, 9:])
    assert not np.allclose(noisy[0, :9], clean[0, :9])


@pytest.mark.tf
def test_keras_dense_is_channels_last_whatever_the_image_setting():
    keras = pytest.importorskip("keras")
    from iba_tf._backend import TFBackend

    model = keras_token_k()
    saved = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        assert TFBackend().layer_layout(model, "proj") == "channels_last"
        assert TFBackend().layer_layout(model, "emb") == "channels_last"
    finally:
        keras.config.set_image_data_format(saved)


# -- PyTorch and Keras agree ------------------------------------------------------------
@pytest.mark.tf
@pytest.mark.torch
@pytest.mark.parametrize("channels_first", [False, True])
def test_torch_and_keras_give_the_same_token_maps(channels_first):
    """Same weights, same estimation data, NumPy noise: the same per-token maps, with a
    mask, to float32 round-off (the maps carry bits where the model needs them)."""
    from iba_tf import IBACopy
    from iba_torch import IBA

    data = token_ids(128, seed=7)
    x = token_ids(3)
    mask = np.ones((3, T))
    mask[1, 9:] = 0
    x[mask == 0] = 0
    opts = dict(target=[0, 1, 2], seed=5, noise="numpy", attention_mask=mask)

    tmodel = TokenK(channels_first)
    tiba = IBA(tmodel, "proj", beta=1.0)
    tiba.estimate(tmodel, [torch.as_tensor(data)], n_samples=128)
    tmaps = tiba.analyze(torch.as_tensor(x), **opts)

    kiba = IBACopy(keras_token_k(channels_first), "proj", beta=1.0)
    kiba.estimate(data.astype("int32"), n_samples=128)
    kmaps = kiba.analyze(x.astype("int32"), **opts)

    assert tmaps.shape == kmaps.shape == (3, T)
    assert tmaps.sum() > 0.5  # a map with content, not all round-off
    np.testing.assert_allclose(kmaps, tmaps, rtol=0, atol=1e-4 * np.abs(tmaps).max())
    assert np.all(kmaps[1, 9:] == 0.0) and np.all(tmaps[1, 9:] == 0.0)


# -- iba explain --texts ----------------------------------------------------------------
CLI_MODULE = """
import numpy as np
import torch
from torch import nn

T, V, D, K = {T}, {V}, {D}, {K}


class Opaque(nn.Module):
    def forward(self, h):
        return h + 0.0


class TokenK(nn.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(3)
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)
        self.mix = Opaque()
        self.fc = nn.Linear(D, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.as_tensor(rng.standard_normal((V, D))))
            self.proj.weight.copy_(torch.as_tensor(rng.standard_normal((D, D)) * 1.5 / np.sqrt(D)))
            self.fc.weight.copy_(torch.as_tensor(rng.standard_normal((3, D)) * 4 / np.sqrt(D)))

    def forward(self, ids):
        assert not ids.is_floating_point(), "token ids must reach the model as integers"
        return self.fc(torch.tanh(self.mix(self.proj(self.emb(ids))))[:, K])


def model():
    return TokenK()


class WordTokenizer:
    pad_token_id = 0

    def __init__(self):
        self.vocab = {{f"w{{i}}": i for i in range(V)}}
        self.vocab["<b>"] = 1  # a token that must be escaped in HTML

    def encode(self, text):
        return [self.vocab[w] for w in text.split()]

    def convert_ids_to_tokens(self, ids):
        names = {{i: w for w, i in self.vocab.items()}}
        return [names[i] for i in ids]


def tokenizer():
    return WordTokenizer()
"""


@pytest.fixture
def text_cli(tmp_path):
    (tmp_path / "textmodel.py").write_text(CLI_MODULE.format(T=T, V=V, D=D, K=K))
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(2, V, n)) for n in (12, 8, 10)]
    lines[1] = " ".join(["<b>", *lines[1].split()[1:]])  # a token HTML must escape
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n\n")
    est = [" ".join(f"w{i}" for i in rng.integers(2, V, rng.integers(6, T + 1))) for _ in range(80)]
    (tmp_path / "est.txt").write_text("\n".join(est))
    return tmp_path, lines


@pytest.mark.torch
def test_cli_explains_a_text_file_per_token(text_cli, capsys):
    import json

    from iba_core.apps.cli import main

    root, lines = text_cli
    spec = str(root / "textmodel.py")
    out = root / "out"
    argv = [
        "explain",
        f"{spec}:model",
        "--backend",
        "torch",
        "--layer",
        "proj",
        "--texts",
        str(root / "texts.txt"),
        "--tokenizer",
        f"{spec}:tokenizer",
        "--estimate-from",
        str(root / "est.txt"),
        "--max-length",
        str(T),
        "--beta",
        "0.1",
        "--out",
        str(out),
        "--html",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    records = json.loads((out / "token_maps.json").read_text())
    assert [r["text"] for r in records] == lines
    assert [r["tokens"] for r in records] == [line.split() for line in lines]
    for r in records:
        assert len(r["bits"]) == len(r["tokens"]) and int(np.argmax(r["bits"])) == K
        assert r["total_bits"] == pytest.approx(sum(r["bits"]), rel=1e-4, abs=1e-5)
    with np.load(out / "token_maps.npz") as data:
        bits, mask, ids = data["bits"], data["attention_mask"], data["ids"]
    assert bits.shape == (3, T) and mask.sum(axis=1).tolist() == [12, 8, 10]
    assert np.all(bits[mask == 0] == 0.0) and np.all(bits[mask == 1] > 0) and np.all(ids[mask == 0] == 0)
    rows = (out / "token_bits.csv").read_text().splitlines()
    assert rows[0] == "line,position,token,bits" and len(rows) == 1 + 30
    page = (out / "token_maps.html").read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page


@pytest.mark.torch
def test_cli_texts_are_not_smoothed_unless_asked(text_cli, capsys):
    """``--sigma``: none by default for ``--texts`` (as ``--sigma 0``), smoothing when given."""
    import torch

    from iba_core.apps.cli import main

    root, _ = text_cli
    spec = str(root / "textmodel.py")
    common = ["explain", f"{spec}:model", "--backend", "torch", "--layer", "proj"]
    common += ["--texts", str(root / "texts.txt"), "--tokenizer", f"{spec}:tokenizer"]
    common += ["--estimate-from", str(root / "est.txt"), "--max-length", str(T), "--beta", "0.1"]
    bits = {}
    for name, extra in (("default", []), ("again", []), ("0", ["--sigma", "0"]), ("1", ["--sigma", "1"])):
        torch.manual_seed(0)  # the factory's layers draw their biases from torch's generator
        assert main([*common, *extra, "--out", str(root / name)]) == 0, capsys.readouterr().err
        with np.load(root / name / "token_maps.npz") as data:
            bits[name] = data["bits"]
    np.testing.assert_allclose(bits["default"], bits["again"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bits["default"], bits["0"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(bits["1"], bits["default"], rtol=1e-2)


@pytest.mark.torch
def test_cli_text_mistakes_are_one_line_errors(text_cli, capsys):
    from iba_core.apps.cli import main

    root, _ = text_cli
    spec = str(root / "textmodel.py")
    base = [
        "explain",
        f"{spec}:model",
        "--backend",
        "torch",
        "--texts",
        str(root / "texts.txt"),
        "--estimate-from",
        str(root / "est.txt"),
        "--max-length",
        str(T),
        "--out",
        str(root / "o"),
        "--steps",
        "1",
    ]
    assert main([*base, "--layer", "proj"]) == 2
    assert "--texts needs --tokenizer" in capsys.readouterr().err
    tok = ["--tokenizer", f"{spec}:tokenizer"]
    assert main([*base, *tok, "--layer", "mix"]) == 2  # an opaque layer: layout unknown
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layout='channels_last'" in err and "'mix'" in err
    assert not (root / "o").exists()
    assert main([*base, *tok, "--layer", "mix", "--layout", "channels_last"]) == 0
    capsys.readouterr()
    assert main([*base, *tok, "--layer", "fc"]) == 2
    assert "not a sequence" in capsys.readouterr().err
    assert main([*base, "--tokenizer", f"{spec}:nothing", "--layer", "proj"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
