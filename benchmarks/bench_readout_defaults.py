"""Readout training defaults: does a readout trained briefly on a small data set learn?

Trains ``iba_torch.IBAReadout`` on the demo CNN (``iba_torch._demo.demo_cnn``) with the
bottleneck at ``features.relu3`` and the readout layers ``features.relu3``,
``features.relu4`` and ``classifier.fc``, on 1,400 cluttered-digit images (train split)
for 3 epochs, batches of 32, with

* the reference's recipe: Adam at a constant lr of 1e-5;
* this library's defaults: lr 1e-3 with a linear warm-up and a cosine decay, 10% of the
  batches held out;
* further rows given with ``--extra LR:SCHEDULE:BETA`` (e.g. ``1e-3:cosine:1``).

and reports, on held-out test images, the Pearson correlation of each readout map with
the Per-Sample IBA map of the same image (``iba_torch.IBA(model, "features.relu3")``,
its defaults, target = the true label), mean and minimum over the images, plus the
training loss per epoch, the held-out mean capacity (nats per element) and mean mask
logit ``alpha`` (4.9 at initialisation) of the last epoch, whether
``NotConvergedWarning`` fired and the training time.

Reading the table: the Per-Sample maps (10 steps from ``alpha = 5``) stay close to the
capacity of an all-open bottleneck, so a readout that has not moved from its
initialisation already correlates well with them; a readout that has converged at
``beta = 10`` closes almost every position on this small CNN and correlates poorly.
The held-out capacity and alpha columns tell the two apart.

Run: ``python benchmarks/bench_readout_defaults.py [--images 32] [--threads 8]``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import numpy as np
import torch

from iba_core import FewSamplesWarning
from iba_core.apps.datasets import cluttered_digits
from iba_core.engines import READOUT_BETA, READOUT_LR, NotConvergedWarning
from iba_torch import IBA, IBAReadout
from iba_torch._demo import demo_cnn

LAYER = "features.relu3"
READOUT_LAYERS = ["features.relu3", "features.relu4", "classifier.fc"]
TRAIN_IMAGES, EPOCHS, BATCH, ESTIMATE_IMAGES = 1400, 3, 32, 1000


def chunks(images: np.ndarray, size: int) -> list[torch.Tensor]:
    return [torch.from_numpy(images[i : i + size]) for i in range(0, len(images), size)]


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(a, b, strict=True)])


def run(
    model: torch.nn.Module,
    estimation: list[torch.Tensor],
    pairs: list[Any],
    x_test: torch.Tensor,
    per_sample: np.ndarray,
    label: str,
    **train: Any,
) -> dict[str, Any]:
    readout = IBAReadout(LAYER, READOUT_LAYERS, model, seed=0)
    readout.estimate(model, estimation)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotConvergedWarning)
        losses = readout.train(model, pairs, epochs=EPOCHS, seed=0, **train)
    seconds = time.perf_counter() - t0
    maps = readout.analyze(x_test)
    corr = correlations(maps, per_sample)
    last = losses.history[-1]
    return {
        "setting": label,
        "corr mean": f"{corr.mean():.3f}",
        "corr min": f"{corr.min():.3f}",
        "loss per epoch": " ".join(f"{v:.3g}" for v in losses),
        "held-out capacity": f"{last['val_capacity']:.3g}" if "val_capacity" in last else "-",
        "held-out alpha": f"{last['val_alpha']:.2f}" if "val_alpha" in last else "-",
        "warned": "yes" if any(issubclass(w.category, NotConvergedWarning) for w in caught) else "no",
        "train s": f"{seconds:.0f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="held-out test images")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--extra", nargs="*", default=[], metavar="LR:SCHEDULE:BETA", help="further settings to compare"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore", FewSamplesWarning)
    model = demo_cnn().eval()
    train = cluttered_digits(TRAIN_IMAGES, split="train", seed=7)
    estimation = chunks(cluttered_digits(ESTIMATE_IMAGES, split="train", seed=0).images, 64)
    test = cluttered_digits(args.images, split="test", seed=3)
    pairs = [
        (torch.from_numpy(train.images[i : i + BATCH]), torch.from_numpy(train.labels[i : i + BATCH]))
        for i in range(0, TRAIN_IMAGES, BATCH)
    ]
    x_test = torch.from_numpy(test.images)
    iba = IBA(model, LAYER)
    iba.estimate(model, estimation)
    per_sample = np.stack(
        [
            iba.analyze(x_test[i : i + 1], target=test.labels[i : i + 1], model=model)
            for i in range(len(x_test))
        ]
    ).reshape(len(x_test), *x_test.shape[2:])
    settings: list[tuple[str, dict[str, Any]]] = [
        (
            "reference: lr 1e-5 constant, beta 10",
            {"lr": 1e-5, "schedule": "constant", "validation": 0.1, "beta": 10.0},
        ),
        (f"lr {READOUT_LR:g} cosine, beta 10", {"beta": 10.0}),
        (f"defaults: lr {READOUT_LR:g} cosine, beta {READOUT_BETA:g}", {}),
    ]
    for spec in args.extra:
        lr, schedule, beta = spec.split(":")
        settings.append(
            (
                f"lr {float(lr):g} {schedule}, beta {float(beta):g}",
                {"lr": float(lr), "schedule": schedule, "beta": float(beta)},
            )
        )
    rows = []
    for label, train_args in settings:
        rows.append(run(model, estimation, pairs, x_test, per_sample, label, **train_args))
        print(f"done: {label}", flush=True)
    keys = list(rows[0])
    widths = [max(len(k), *(len(r[k]) for r in rows)) for k in keys]
    print(
        f"\nreadout maps vs Per-Sample IBA maps on {len(x_test)} test images "
        f"({TRAIN_IMAGES} training images, {EPOCHS} epochs, batches of {BATCH})"
    )
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in zip(keys, widths, strict=True)))


if __name__ == "__main__":
    main()
