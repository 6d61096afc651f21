"""A synthetic text classification task with ground-truth evidence (``iba demo --task text``).

NumPy only, nothing downloaded.  Each sequence is a short "sentence" of filler words
with a few *topic words* placed among them.  Four topics (sport, food, music, weather)
own four words each.  A sequence holds ``m`` words of its label's topic (the evidence,
``m`` = 2 or 3) and ``m - 1`` words of one other topic (the competitor), so the label is
the topic with the most words: the evidence decides it, the competitor's words argue
against it, and the filler words carry nothing.  Explaining the label should therefore
put the most information on the evidence positions; with ``k`` = the number of evidence
tokens, :func:`evidence_precision_at_k` is the share of the ``k`` highest-attributed
tokens that are evidence, and chance is ``k / length``.

Sequences have different lengths (:data:`MIN_LENGTH` to :data:`MAX_LENGTH` tokens) and
are padded at the end with :data:`PAD_ID`; the mask is 1 on real tokens, 0 on padding,
as Hugging Face's ``attention_mask``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLASSES",
    "TEXT_CONFIG",
    "TEXT_LAYER",
    "FILLER",
    "MAX_LENGTH",
    "MIN_LENGTH",
    "PAD",
    "PAD_ID",
    "TOPIC_WORDS",
    "VOCAB",
    "TextTask",
    "decode",
    "evidence_precision_at_k",
    "make_text_task",
    "rank_correlation",
    "text_weights",
]

PAD = "<pad>"
PAD_ID = 0
#: The classes, in label order; each is decided by its topic's words.
CLASSES = ("sport", "food", "music", "weather")
TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "sport": ("goal", "match", "team", "score"),
    "food": ("bread", "soup", "spice", "dinner"),
    "music": ("guitar", "melody", "chorus", "drum"),
    "weather": ("rain", "storm", "cloud", "wind"),
}
#: Words that carry no information about the label.
FILLER = (
    "the", "a", "of", "and", "was", "it", "then", "very", "some", "we", "they", "after",
    "before", "with", "on", "in", "at", "this", "that", "good", "long", "day", "night",
    "old", "new", "friend", "town", "went", "saw", "said", "later", "again",
)  # fmt: skip
#: The vocabulary: index = token id.
VOCAB: tuple[str, ...] = (PAD, *(w for c in CLASSES for w in TOPIC_WORDS[c]), *FILLER)
_TOPIC_IDS = np.array([[VOCAB.index(w) for w in TOPIC_WORDS[c]] for c in CLASSES])
_FILLER_IDS = np.array([VOCAB.index(w) for w in FILLER])
MIN_LENGTH, MAX_LENGTH = 12, 32
#: The demo transformer's sizes, the same in every framework: vocabulary, sequence length,
#: width, layers, heads, MLP width, classes.
TEXT_CONFIG: dict[str, int] = {
    "vocab": len(VOCAB),
    "max_length": MAX_LENGTH,
    "width": 32,
    "layers": 2,
    "heads": 2,
    "mlp": 64,
    "classes": len(CLASSES),
}
#: The layer ``iba demo --task text`` puts the bottleneck on (channels-last ``(N, T, D)``).
TEXT_LAYER = "embeddings"


@dataclasses.dataclass(frozen=True)
class TextTask:
    """A generated set of sequences.

    Attributes:
        ids: ``(N, T)`` int64 token ids, :data:`PAD_ID` after each sequence's end.
        mask: ``(N, T)`` int64, 1 on real tokens, 0 on padding.
        labels: ``(N,)`` int64 class indices into :data:`CLASSES`.
        evidence: ``(N, T)`` bool, True on the tokens of the label's topic.
        competitor: ``(N, T)`` bool, True on the tokens of the other topic.
        lengths: ``(N,)`` int64 number of real tokens.
    """

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    evidence: np.ndarray
    competitor: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, i: int) -> list[str]:
        """The words of sequence ``i``, padding left out."""
        return decode(self.ids[i, : self.lengths[i]])


def make_text_task(n: int, seed: int = 0, max_length: int = MAX_LENGTH) -> TextTask:
    """``n`` sequences drawn with ``numpy.random.default_rng(seed)``.

    Per sequence: a label and a competitor topic (different, uniform), ``m`` in {2, 3},
    a length uniform in ``[MIN_LENGTH, max_length]``, ``m`` label words and ``m - 1``
    competitor words (uniform over each topic's words) at distinct random positions, and
    filler words elsewhere.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_length < MIN_LENGTH:
        raise ValueError(f"max_length must be >= {MIN_LENGTH}, got {max_length}")
    rng = np.random.default_rng(seed)
    ids = np.full((n, max_length), PAD_ID, dtype=np.int64)
    evidence = np.zeros((n, max_length), dtype=bool)
    competitor = np.zeros((n, max_length), dtype=bool)
    labels = rng.integers(0, len(CLASSES), n)
    others = (labels + rng.integers(1, len(CLASSES), n)) % len(CLASSES)
    counts = rng.integers(2, 4, n)
    lengths = rng.integers(MIN_LENGTH, max_length + 1, n)
    for i in range(n):
        length, m = int(lengths[i]), int(counts[i])
        ids[i, :length] = rng.choice(_FILLER_IDS, length)
        places = rng.permutation(length)[: 2 * m - 1]
        ev, comp = places[:m], places[m:]
        ids[i, ev] = rng.choice(_TOPIC_IDS[labels[i]], m)
        ids[i, comp] = rng.choice(_TOPIC_IDS[others[i]], m - 1)
        evidence[i, ev] = True
        competitor[i, comp] = True
    mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int64)
    return TextTask(ids, mask, labels.astype(np.int64), evidence, competitor, lengths.astype(np.int64))


def decode(ids: Sequence[int] | np.ndarray) -> list[str]:
    """Token ids as words."""
    return [VOCAB[int(i)] for i in np.asarray(ids).ravel()]


def _masked(scores: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if scores.shape != mask.shape or scores.ndim != 2:
        raise ValueError(
            f"expected scores and mask of the same shape (N, T), got {scores.shape} and {mask.shape}"
        )
    return scores, mask


def evidence_precision_at_k(scores: Any, evidence: Any, mask: Any, k: Any = None) -> np.ndarray:
    """Share of the ``k`` highest-scored real tokens that are evidence, per sequence.

    ``scores``, ``evidence`` and ``mask`` are ``(N, T)``; padding (mask 0) is never
    ranked.  ``k``: an int, ``(N,)`` ints, or ``None`` for each sequence's number of
    evidence tokens.  Tied scores share their places fairly (a tie that straddles the
    cut counts the evidence among it in proportion), so a constant map scores chance,
    ``k_evidence / length``, not whatever the token order gives.
    """
    scores, mask = _masked(scores, mask)
    evidence = np.asarray(evidence).astype(bool) & mask
    n = len(scores)
    ks = evidence.sum(axis=1) if k is None else np.broadcast_to(np.asarray(k, dtype=np.int64), (n,))
    out = np.zeros(n)
    for i in range(n):
        s, e = scores[i][mask[i]], evidence[i][mask[i]]
        kk = int(min(ks[i], len(s)))
        if kk <= 0:
            out[i] = np.nan
            continue
        threshold = np.sort(s)[::-1][kk - 1]
        above, tied = s > threshold, s == threshold
        room = kk - int(above.sum())
        out[i] = (e[above].sum() + room * e[tied].mean()) / kk
    return out


def rank_correlation(a: Any, b: Any, mask: Any) -> np.ndarray:
    """Spearman rank correlation of two ``(N, T)`` token maps over each sequence's real
    tokens (NaN where a map is constant)."""
    from .metrics import spearman_correlation

    a, mask = _masked(a, mask)
    b = np.asarray(b, dtype=np.float64)
    return np.array([float(spearman_correlation(a[i][mask[i]], b[i][mask[i]])[0]) for i in range(len(a))])


def text_weights(path: Any) -> dict[str, np.ndarray]:
    """The text demo model's weights from an ``.npz`` file (each backend ships its layout)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the text demo model's weights are missing ({path}); reinstall iba or run "
            "scripts/train_text_model.py"
        )
    with np.load(path) as data:
        return {k: np.array(data[k]) for k in data.files}
