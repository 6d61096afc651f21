"""``iba demo --task text``: IBA on a small transformer, with ground-truth evidence tokens.

The task is :mod:`iba_core.apps.text_task` (the label is decided by its topic's words
placed among filler words and fewer words of a competing topic); the model is the
backend's :meth:`~iba_core.Backend.demo_text_model` (token + position embedding, two
transformer blocks, mean pooling).  The bottleneck sits on the embeddings' output
``(N, T, D)`` (channels-last), padded positions are masked (``attention_mask``), and the
per-token maps in bits are scored by the share of the ``k`` highest-attributed tokens that
are evidence (``k`` = the number of evidence tokens; chance = ``k / length``).

The command knows no framework: the model comes from the registry's backend, the arrays
go through :meth:`~iba_core.Backend.from_numpy` as integer ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import Backend, RunFailure
from .text_task import CLASSES, TextTask, evidence_precision_at_k, make_text_task

__all__ = [
    "TEXT_DEMO_LAYER",
    "TEXT_DEMO_SETTINGS",
    "TextDemoResult",
    "cmd_text_demo",
    "explain_text",
    "text_demo_figure",
    "text_demo_html",
]

#: The layer of the text demo model (in every backend) the bottleneck goes on.
TEXT_DEMO_LAYER = "embeddings"
#: Settings of the bottleneck for tokens: no smoothing of the mask along the sequence
#: (neighbouring tokens are not neighbouring pixels).  Measured on 64 sequences (seed 0,
#: 1000 for the estimate): top-k on evidence 0.90 without smoothing, 0.64 with sigma 1;
#: beta 3 / 10 / 30 gave 0.89 / 0.90 / 0.83, so beta stays at the default 10.
TEXT_DEMO_SETTINGS: dict[str, Any] = {"sigma": None}
#: Seeds of the estimation and test sequences are offset from the training script's (0, 1).
_ESTIMATE_SEED, _TEST_SEED = 10_000, 20_000


@dataclasses.dataclass(frozen=True)
class TextDemoResult:
    """What :func:`explain_text` found.

    Attributes:
        task: the explained sequences.
        maps: ``(N, T)`` bits per token (0 on padding).
        predicted: ``(N,)`` predicted classes.
        precision: ``(N,)`` share of the top-``k`` tokens that are evidence.
        chance: ``(N,)`` the same share for a random ranking, ``k / length``.
    """

    task: TextTask
    maps: np.ndarray
    predicted: np.ndarray
    precision: np.ndarray
    chance: np.ndarray


def _ids(backend: Backend, model: Any, ids: np.ndarray) -> Any:
    return backend.to_device(backend.from_numpy(np.ascontiguousarray(ids)), model)


def explain_text(
    backend: Backend,
    model: Any,
    n: int,
    *,
    seed: int = 0,
    estimate_samples: int = 1000,
    noise: str = "numpy",
    **settings: Any,
) -> TextDemoResult:
    """Estimate on ``estimate_samples`` generated sequences, then explain ``n`` fresh ones
    (their labels as targets) in one call; ``settings`` override :data:`TEXT_DEMO_SETTINGS`."""
    from ..engines import PerSampleBottleneck, estimation_batches, model_logits

    estimation = make_text_task(estimate_samples, seed=_ESTIMATE_SEED + seed)
    test = make_text_task(n, seed=_TEST_SEED + seed)
    engine = PerSampleBottleneck(
        backend, model, TEXT_DEMO_LAYER, layout="channels_last", **{**TEXT_DEMO_SETTINGS, **settings}
    )
    engine.estimate(
        estimation_batches(  # padded positions stay out of the statistics
            estimation.ids,
            250,
            attention_mask=estimation.mask,
            backend=backend,
            convert=lambda ids: _ids(backend, model, ids),
        ),
        n_samples=estimate_samples,
        progbar=False,
    )
    x = _ids(backend, model, test.ids)
    with backend.frozen(model):
        logits = np.asarray(backend.to_numpy(model_logits(backend.call(model, x))))
    maps = engine.analyze(x, target=test.labels, attention_mask=test.mask, seed=seed, noise=noise)
    maps = np.asarray(backend.to_numpy(maps), dtype=np.float64)
    k = test.evidence.sum(axis=1)
    return TextDemoResult(
        task=test,
        maps=maps,
        predicted=logits.argmax(axis=1),
        precision=evidence_precision_at_k(maps, test.evidence, test.mask),
        chance=k / test.lengths,
    )


def _title(result: TextDemoResult, i: int) -> str:
    t = result.task
    label, pred = CLASSES[int(t.labels[i])], CLASSES[int(result.predicted[i])]
    return (
        f"#{i}: {label} (predicted {pred}), {result.maps[i].sum():.1f} bits, "
        f"top-{int(t.evidence[i].sum())} on evidence {result.precision[i]:.0%} "
        f"(chance {result.chance[i]:.0%})"
    )


def _marked_tokens(task: TextTask) -> list[list[str]]:
    """Each sequence's words, evidence words marked with ``*``."""
    return [
        [f"{w}*" if task.evidence[i, j] else w for j, w in enumerate(task.tokens(i))]
        for i in range(len(task))
    ]


def text_demo_html(result: TextDemoResult, title: str) -> str:
    """One self-contained HTML page: the sequences' tokens coloured by bits on one scale
    (:func:`iba_core.apps.tokens.token_map_html`), evidence tokens marked ``*``."""
    from .tokens import token_map_html

    captions = [_title(result, i) + ":" for i in range(len(result.task))]
    body = token_map_html(_marked_tokens(result.task), result.maps, labels=captions)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title></head><body>",
            f'<h3 style="font-family: sans-serif;">{html.escape(title)}</h3>',
            '<p style="font-family: sans-serif;">Colour: bits per token (IBA on the embeddings), '
            "one scale for all sequences. Marked *: the evidence (the label's topic words).</p>",
            body,
            "</body></html>",
        ]
    )


def text_demo_figure(result: TextDemoResult, title: str, dpi: int = 100) -> bytes:
    """The demo's PNG: one panel per sequence, tokens coloured by bits on one scale
    (:func:`iba_core.apps.tokens.plot_token_map`), evidence tokens marked ``*``."""
    from .demo import _png_bytes, _pyplot
    from .tokens import plot_token_map

    plt = _pyplot()
    n = len(result.task)
    vmax = float(result.maps.max()) or 1.0
    fig, axes = plt.subplots(n, 1, figsize=(14, 1.0 * n + 1.2), squeeze=False)
    for i, tokens in enumerate(_marked_tokens(result.task)):
        ax = axes[i, 0]
        plot_token_map(
            tokens, result.maps[i, : len(tokens)], ax=ax, vmax=vmax, fontsize=9, colorbar=i == n - 1
        )
        ax.set_title(_title(result, i), fontsize=9, loc="left")
    fig.suptitle(title, fontsize=11)
    return _png_bytes(fig, dpi)


def cmd_text_demo(args: argparse.Namespace) -> int:
    """``iba demo --task text``."""
    from .cli import check_out, demo_backend, npz_bytes, write_outputs

    t0 = time.perf_counter()
    out = check_out(Path(args.out))
    backend = demo_backend(args.backend)
    model = backend.demo_text_model()
    t_setup = time.perf_counter()
    try:
        result = explain_text(backend, model, args.n, seed=args.seed, estimate_samples=args.estimate_samples)
    except FloatingPointError as exc:
        raise RunFailure(str(exc)) from None
    t_explain = time.perf_counter()
    t = result.task
    title = f"IBA on the synthetic text task ({backend.name}, bottleneck at {TEXT_DEMO_LAYER})"
    files = {
        "text_demo.html": text_demo_html(result, title).encode("utf-8"),
        "text_demo.png": text_demo_figure(result, title),
        "token_maps.npz": npz_bytes(
            token_maps=result.maps.astype(np.float32),
            ids=t.ids,
            attention_mask=t.mask,
            labels=t.labels,
            predicted=result.predicted,
            evidence=t.evidence,
            top_k_on_evidence=result.precision,
            chance=result.chance,
            seed=np.int64(args.seed),
            layer=np.str_(TEXT_DEMO_LAYER),
            backend=np.str_(backend.name),
        ),
    }
    written = write_outputs(out, files)
    t_end = time.perf_counter()

    bits = result.maps.sum(axis=1)
    print(
        f"IBA text demo: {args.n} synthetic sequences (seed {args.seed}), {backend.name} backend, "
        f"bottleneck at {TEXT_DEMO_LAYER} (channels-last, padding masked)"
    )
    print(
        f"{'seq':>4}  {'class':>7}  {'pred':>7}  {'length':>6}  {'k':>2}  {'bits':>6}  "
        f"{'top-k on evidence':>17}  {'chance':>6}"
    )
    for i in range(args.n):
        print(
            f"{i:>4}  {CLASSES[int(t.labels[i])]:>7}  {CLASSES[int(result.predicted[i])]:>7}  "
            f"{int(t.lengths[i]):>6}  {int(t.evidence[i].sum()):>2}  {bits[i]:>6.1f}  "
            f"{result.precision[i]:>17.2f}  {result.chance[i]:>6.2f}"
        )
    print(
        f"{'mean':>4}  {'':>7}  {'':>7}  {t.lengths.mean():>6.1f}  {'':>2}  {bits.mean():>6.1f}  "
        f"{np.nanmean(result.precision):>17.2f}  {result.chance.mean():>6.2f}"
    )
    print(
        "top-k on evidence: share of the k highest-attributed tokens that are the label's topic "
        "words (k = their number); chance = k / length"
    )
    print(
        f"time: setup {t_setup - t0:.1f} s, estimate and explain {t_explain - t_setup:.1f} s, "
        f"figure and files {t_end - t_explain:.1f} s"
    )
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
