"""Attribution quality on the synthetic text task: IBA against the usual token baselines.

The model is the trained text demo transformer (``iba_torch._text.text_model``: token +
position embedding, two blocks, mean pooling, 4 classes).  Sequences come from
``iba_core.apps.text_task.make_text_task`` (the label is decided by its topic's words,
the *evidence*, placed among filler words and fewer words of a competing topic), one
fresh set per seed; the target is the true label.

Methods (per-token maps ``(N, T)``; padding is never ranked):
  IBA                Per-Sample IBA on the embeddings' output ``(N, T, D)``, channels-last,
                     beta 10, no smoothing along the tokens (``sigma=None``), padding
                     masked (``attention_mask``); bits per token.
  IG                 Captum ``LayerIntegratedGradients`` on the token embedding, baseline
                     the pad embedding (zero vector), 50 steps (20 in ``--quick``);
                     summed over the embedding, signed; ``IG (absolute)``: its absolute value.
  grad x input       Captum ``LayerGradientXActivation`` on the token embedding, summed,
                     signed; ``(absolute)``: its absolute value.
  occlusion          Captum ``FeatureAblation`` on the ids: each token replaced by the pad
                     token (the model then ignores it), drop of the target logit.
  rollout            attention rollout (Abnar & Zuidema 2020): heads averaged, identity
                     added for the residual, rows renormalised, layers multiplied; a
                     token's score is its mean weight over the real query tokens.
  raw attention      the last block's attention, heads averaged, mean over real queries.

Metrics, mean ± sd over seeds of the per-seed mean:
  P@k      share of the k highest-scored tokens that are evidence (k = the number of
           evidence tokens, 2 or 3); higher is better; chance = k / length.
  P@k all  the same for all topic words, the label's and the competing topic's (k = their
           number): the words the decision rests on, for or against the label.  Signed
           methods rank the competing words last by design (they count against the
           label); this column tells whether a method's misses on P@k are those words
           (absolute values) or filler words.
  del AUC  token deletion: the target's softmax probability as the top tokens are
           deleted (replaced by padding) one by one, area over the fraction deleted;
           lower is better.
  rho rnd  model randomisation: Spearman rank correlation (over the real tokens) of the
           map with the map of the same method for a freshly initialised model (every
           layer randomised; IBA re-estimates its statistics there); lower means the
           map depends on what the model learnt.
  s/seq    seconds per sequence to compute the maps (this machine, its load).

Run: ``python benchmarks/bench_text_quality.py [--quick] [--seeds 5] [--n 64]``.
Writes ``text_quality_per_seed.csv`` and ``text_quality_summary.csv`` to ``--csv-dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import DEFAULT_CSV_DIR, format_table, mean_sd, print_header, write_csv

from iba_core import FewSamplesWarning
from iba_core.apps.text_task import (
    PAD_ID,
    TextTask,
    evidence_precision_at_k,
    make_text_task,
    rank_correlation,
)
from iba_torch import IBA
from iba_torch._text import TextTransformer, build_text_model, text_model

warnings.simplefilter("ignore", FewSamplesWarning)

Method = Callable[[TextTransformer, TextTask, int], np.ndarray]
_ESTIMATE_SEED, _TEST_SEED, _RANDOM_MODEL_SEED = 30_000, 40_000, 50_000


def iba_method(estimate_samples: int) -> Method:
    def explain(model: TextTransformer, task: TextTask, seed: int) -> np.ndarray:
        est = make_text_task(estimate_samples, seed=_ESTIMATE_SEED + seed)
        iba = IBA(model.embeddings, layout="channels_last", sigma=None, beta=10)
        iba.estimate(
            model,
            [  # padded positions stay out of the statistics
                {"input_ids": torch.from_numpy(est.ids[i : i + 250]), "attention_mask": est.mask[i : i + 250]}
                for i in range(0, estimate_samples, 250)
            ],
            n_samples=estimate_samples,
        )
        maps = iba.analyze(
            torch.from_numpy(task.ids),
            target=torch.from_numpy(task.labels),
            model=model,
            attention_mask=task.mask,
            seed=seed,
        )
        return np.asarray(maps, dtype=np.float64)

    return explain


def ig_method(steps: int, absolute: bool) -> Method:
    from captum.attr import LayerIntegratedGradients

    def explain(model: TextTransformer, task: TextTask, seed: int) -> np.ndarray:
        ids = torch.from_numpy(task.ids)
        attr = LayerIntegratedGradients(model, model.embeddings.token).attribute(
            ids, baselines=torch.full_like(ids, PAD_ID), target=torch.from_numpy(task.labels), n_steps=steps
        )
        scores = attr.sum(-1).detach().double().numpy()
        return np.abs(scores) if absolute else scores

    return explain


def gxi_method(absolute: bool) -> Method:
    from captum.attr import LayerGradientXActivation

    def explain(model: TextTransformer, task: TextTask, seed: int) -> np.ndarray:
        attr = LayerGradientXActivation(model, model.embeddings.token).attribute(
            torch.from_numpy(task.ids), target=torch.from_numpy(task.labels)
        )
        scores = attr.sum(-1).detach().double().numpy()
        return np.abs(scores) if absolute else scores

    return explain


def occlusion(model: TextTransformer, task: TextTask, seed: int) -> np.ndarray:
    from captum.attr import FeatureAblation

    attr = FeatureAblation(model).attribute(
        torch.from_numpy(task.ids), baselines=PAD_ID, target=torch.from_numpy(task.labels)
    )
    return attr.detach().double().numpy()


def _real_query_mean(weights: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``(N, T, T)`` rows = queries -> the mean over real queries, ``(N, T)``."""
    return ((weights * mask[:, :, None]).sum(1) / mask.sum(1)[:, None]).double().numpy()


def rollout(model: TextTransformer, task: TextTask, seed: int) -> np.ndarray:
    ids = torch.from_numpy(task.ids)
    mask = torch.from_numpy(task.mask).float()
    n, t = ids.shape
    eye = torch.eye(t)
    rolled = eye.expand(n, t, t)
    for weights in model.attention(ids):
        a = 0.5 * weights.mean(1) + 0.5 * eye
        rolled = (a / a.sum(-1, keepdim=True)) @ rolled
    return _real_query_mean(rolled, mask)


def raw_attention(model: TextTransformer, task: TextTask, seed: int) -> np.ndarray:
    ids = torch.from_numpy(task.ids)
    return _real_query_mean(model.attention(ids)[-1].mean(1), torch.from_numpy(task.mask).float())


# -- metrics -----------------------------------------------------------------------------------
@torch.no_grad()
def deletion_auc(model: TextTransformer, task: TextTask, scores: np.ndarray) -> np.ndarray:
    """Per sequence: area under the target probability as the top tokens are deleted."""
    rows, owners = [], []
    for i in range(len(task)):
        length = int(task.lengths[i])
        order = np.argsort(-scores[i, :length], kind="stable")
        ids = task.ids[i].copy()
        rows.append(ids.copy())
        for j in order:
            ids[j] = PAD_ID
            rows.append(ids.copy())
        owners += [i] * (length + 1)
    batch = torch.from_numpy(np.stack(rows))
    owner = np.array(owners)
    probs = torch.cat([torch.softmax(model(batch[s : s + 1024]), -1) for s in range(0, len(batch), 1024)])
    target = probs[torch.arange(len(batch)), torch.from_numpy(task.labels[owner])].double().numpy()
    out = np.zeros(len(task))
    for i in range(len(task)):
        y = target[owner == i]
        x = np.linspace(0.0, 1.0, len(y))
        out[i] = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)
    return out


def random_model(seed: int) -> TextTransformer:
    torch.manual_seed(_RANDOM_MODEL_SEED + seed)
    return build_text_model().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 16 sequences, fewer IG steps")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=64, help="sequences per seed")
    parser.add_argument("--estimate-samples", type=int, default=1000)
    parser.add_argument("--csv-dir", type=Path, default=DEFAULT_CSV_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.n, args.estimate_samples = 1, 16, 250
    torch.set_num_threads(args.threads)
    print_header("text attribution quality (synthetic task, text demo transformer)")

    ig_steps = 20 if args.quick else 50
    methods: dict[str, Method] = {
        "IBA (embeddings, beta 10)": iba_method(args.estimate_samples),
        "IG": ig_method(ig_steps, absolute=False),
        "IG (absolute)": ig_method(ig_steps, absolute=True),
        "grad x input": gxi_method(absolute=False),
        "grad x input (absolute)": gxi_method(absolute=True),
        "occlusion": occlusion,
        "rollout": rollout,
        "raw attention": raw_attention,
    }
    model = text_model()
    per_seed: list[dict[str, Any]] = []
    chance = []
    for seed in range(args.seeds):
        task = make_text_task(args.n, seed=_TEST_SEED + seed)
        chance.append(float((task.evidence.sum(1) / task.lengths).mean()))
        randomised = random_model(seed)
        for name, explain in methods.items():
            t0 = time.perf_counter()
            scores = explain(model, task, seed)
            dt = (time.perf_counter() - t0) / len(task)
            rnd = explain(randomised, task, seed)
            per_seed.append(
                {
                    "seed": seed,
                    "method": name,
                    "precision_at_k": float(
                        np.nanmean(evidence_precision_at_k(scores, task.evidence, task.mask))
                    ),
                    "precision_at_k_all_topic_words": float(
                        np.nanmean(
                            evidence_precision_at_k(scores, task.evidence | task.competitor, task.mask)
                        )
                    ),
                    "deletion_auc": float(deletion_auc(model, task, scores).mean()),
                    "rho_randomised": float(np.nanmean(rank_correlation(scores, rnd, task.mask))),
                    "seconds_per_sequence": dt,
                }
            )
        print(f"seed {seed} done", file=sys.stderr)

    rows, summary = [], []
    for name in methods:
        mine = [r for r in per_seed if r["method"] == name]
        keys = ("precision_at_k", "precision_at_k_all_topic_words", "deletion_auc", "rho_randomised")
        cells = {k: mean_sd([r[k] for r in mine]) for k in keys}
        secs = float(np.mean([r["seconds_per_sequence"] for r in mine]))
        rows.append([name, *(cells[k] for k in keys), f"{secs:.4f}"])
        summary.append({"method": name, **cells, "seconds_per_sequence": secs})
    headers = ["method", "P@k (higher)", "P@k all (higher)", "del AUC (lower)", "rho rnd (lower)", "s/seq"]
    print(
        f"{args.seeds} seed(s) x {args.n} sequences; chance P@k {mean_sd(chance)}; "
        f"IBA estimate on {args.estimate_samples} sequences\n"
    )
    print(format_table(headers, rows))
    print()
    print(format_table(headers, rows, markdown=True))
    write_csv(args.csv_dir / "text_quality_per_seed.csv", per_seed)
    path = write_csv(args.csv_dir / "text_quality_summary.csv", summary)
    print(f"\nwrote {path.parent}/text_quality_{{per_seed,summary}}.csv")


if __name__ == "__main__":
    main()
