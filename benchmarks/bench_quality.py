"""Attribution quality on cluttered digits: IBA against the baselines a user would pick.

The model is the trained demo CNN (``iba_torch._demo.demo_cnn``, 1x64x64 -> 10 classes;
if its weights are missing, the same architecture is trained here for a few epochs).
Test images come from ``iba_core.apps.datasets.cluttered_digits`` (test split: handwriting
the model never saw), one fresh set per seed; the target is the true label.

Methods: Per-Sample IBA at ``features.relu3`` (16x16 map) with beta 1, 10 and 100;
Readout IBA (``iba_torch.IBAReadout``, readout of relu3, relu4 and the logits, trained
here for a few epochs with lr 1e-3 and beta 1: with beta 10 such short training ends in
a mask that lets nothing pass); random maps; and Captum's gradient (absolute), gradient x input, Integrated
Gradients (zero baseline), SmoothGrad (absolute gradients, noise std 0.15), Grad-CAM (last
conv layer, upsampled bilinearly) and occlusion (8x8 patches, stride 4, zero fill).
Multi-channel maps are summed over channels.

Metrics (``iba_core.apps.metrics``), mean ± sd over seeds of the per-seed mean:
  deg8 / deg4   degradation test, area between LeRF and MoRF (8x8 / 4x4 px tiles,
                per-channel-mean fill, softmax score), higher is better;
  bbox          fraction of the top-n pixels inside the digit's box (n = box area);
  point         pointing game, 4 px tolerance (15 px at 224 px, scaled to 64 px);
  ins / del     insertion AUC (start: the image blurred with a 4 px Gaussian) / deletion
                AUC (black fill), softmax score, 16 steps;
                higher / lower is better;
  sens-n        sensitivity-n on 4x4 tiles (zero fill, logit), mean over n = 4, 16, 64;
  rho top/all   model-randomisation sanity check: Spearman rank correlation of |map|
                with the maps after randomising the logits layer / every layer; lower
                means the map depends on the weights (the random maps, drawn from the
                seed alone, ignore the model and stay at 1: the check flags them);
                not computed for Readout IBA (it would need retraining per model);
  s/img         seconds per image to compute the maps (on this machine, with its load).

Run: ``python benchmarks/bench_quality.py [--quick] [--seeds 3] [--images 48]``.
Writes ``quality_per_seed.csv`` and ``quality_summary.csv`` to ``--csv-dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import DEFAULT_CSV_DIR, format_table, mean_sd, print_header, write_csv
from torch import nn

from iba_core import FewSamplesWarning
from iba_core.apps import metrics
from iba_core.apps.datasets import cluttered_digits
from iba_torch import IBA

warnings.simplefilter("ignore", FewSamplesWarning)

LAYER = "features.relu3"
READOUT_LAYERS = ["features.relu3", "features.relu4", "classifier.fc"]
GRADCAM_LAYER = "features.conv4"
#: Blur of the insertion start image, px.  The digits are small: with RISE's sigma scaled to
#: 64 px (about 1.4) the model still recognises 85 % of them; at 4 px, 17 % (about chance).
INSERTION_BLUR = 4.0

Explain = Callable[[nn.Module, np.ndarray, np.ndarray, int], np.ndarray]


@dataclass
class Settings:
    seeds: int
    images: int
    sanity_images: int
    estimate_samples: int
    readout_train: int
    readout_epochs: int
    steps: int  # points on the degradation / insertion curves
    subsets: int  # sensitivity-n subsets per n
    ig_steps: int
    smooth_samples: int


QUICK = Settings(
    seeds=2,
    images=8,
    sanity_images=4,
    estimate_samples=1000,
    readout_train=1000,
    readout_epochs=2,
    steps=8,
    subsets=12,
    ig_steps=16,
    smooth_samples=8,
)
FULL = Settings(
    seeds=3,
    images=48,
    sanity_images=8,
    estimate_samples=5000,
    readout_train=2000,
    readout_epochs=3,
    steps=16,
    subsets=24,
    ig_steps=32,
    smooth_samples=16,
)


# -- model and data ----------------------------------------------------------------------
def load_model(train_if_missing: bool = True) -> tuple[nn.Module, str]:
    from iba_torch._demo import build_demo_cnn, demo_cnn

    try:
        return demo_cnn(), "demo CNN (shipped weights)"
    except FileNotFoundError:
        if not train_if_missing:
            raise
    print("demo CNN weights not found: training the architecture here (3 epochs, 6000 images)")
    torch.manual_seed(0)
    data = cluttered_digits(6000, split="train", seed=0)
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    model = build_demo_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(3):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), "demo CNN architecture trained in this script"


def batches(x: np.ndarray, size: int = 100) -> list[torch.Tensor]:
    return [torch.from_numpy(x[i : i + size]) for i in range(0, len(x), size)]


def channel_sum(a: torch.Tensor) -> np.ndarray:
    return a.detach().sum(1).cpu().numpy().astype(np.float64)


# -- methods -----------------------------------------------------------------------------
class PerSampleIBA:
    """Per-Sample IBA; one estimate per model (randomised copies get their own)."""

    def __init__(self, estimate_data: np.ndarray, chunk: int = 16) -> None:
        self.data = estimate_data
        self.chunk = chunk
        self._ibas: dict[int, tuple[nn.Module, IBA]] = {}

    def iba_for(self, model: nn.Module) -> IBA:
        entry = self._ibas.get(id(model))
        if entry is None or entry[0] is not model:
            iba = IBA(model, LAYER)
            iba.estimate(model, batches(self.data), n_samples=len(self.data))
            self._ibas[id(model)] = entry = (model, iba)
        return entry[1]

    def method(self, beta: float) -> Explain:
        def explain(model: nn.Module, x: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
            iba = self.iba_for(model)
            maps = [
                iba.analyze(
                    torch.from_numpy(x[i : i + self.chunk]),
                    target=t[i : i + self.chunk],
                    model=model,
                    beta=beta,
                    seed=seed + i,
                )
                for i in range(0, len(x), self.chunk)
            ]
            return np.concatenate([m.reshape(-1, *x.shape[2:]) for m in maps])

        return explain


def readout_method(
    model: nn.Module, settings: Settings, beta: float, log: Callable[[str], None]
) -> Explain | None:
    try:
        from iba_torch import IBAReadout
    except (ImportError, AttributeError):
        log("Readout IBA: iba_torch.IBAReadout not available, skipped")
        return None
    train = cluttered_digits(settings.readout_train, split="train", seed=7)
    readout = IBAReadout(LAYER, READOUT_LAYERS, model, seed=0)
    readout.estimate(
        model, batches(cluttered_digits(settings.estimate_samples, split="train", seed=0).images)
    )
    pairs = [
        (torch.from_numpy(train.images[i : i + 32]), torch.from_numpy(train.labels[i : i + 32]))
        for i in range(0, len(train.labels), 32)
    ]
    t0 = time.perf_counter()
    # lr 1e-3 instead of the reference 1e-5: this data set is small and training short.
    losses = readout.train(model, pairs, epochs=settings.readout_epochs, lr=1e-3, beta=beta, seed=0)
    log(
        f"Readout IBA: trained {settings.readout_epochs} epoch(s) on {len(train.labels)} images "
        f"(beta {beta:g}, lr 1e-3) in {time.perf_counter() - t0:.0f} s; loss per epoch "
        f"{[round(v, 3) for v in losses]}"
    )

    def explain(m: nn.Module, x: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
        if m is not model:
            raise NotImplementedError("the readout is trained for the original model only")
        return np.concatenate([readout.analyze(b).reshape(-1, *x.shape[2:]) for b in batches(x, 64)])

    return explain


def captum_methods(settings: Settings) -> dict[str, Explain]:
    from captum.attr import (
        InputXGradient,
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        NoiseTunnel,
        Occlusion,
        Saliency,
    )

    def prepared(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).requires_grad_(True)

    def gradient(model, x, t, seed):
        return channel_sum(Saliency(model).attribute(prepared(x), target=torch.from_numpy(t)))

    def grad_x_input(model, x, t, seed):
        return channel_sum(InputXGradient(model).attribute(prepared(x), target=torch.from_numpy(t)))

    def integrated_gradients(model, x, t, seed):
        ig = IntegratedGradients(model)
        return channel_sum(
            ig.attribute(
                prepared(x),
                baselines=0.0,
                target=torch.from_numpy(t),
                n_steps=settings.ig_steps,
                internal_batch_size=256,
            )
        )

    def smoothgrad(model, x, t, seed):
        torch.manual_seed(seed)
        nt = NoiseTunnel(Saliency(model))
        return channel_sum(
            nt.attribute(
                prepared(x),
                nt_type="smoothgrad",
                nt_samples=settings.smooth_samples,
                stdevs=0.15,
                target=torch.from_numpy(t),
            )
        )

    def gradcam(model, x, t, seed):
        layer = model.get_submodule(GRADCAM_LAYER)
        cam = LayerGradCam(model, layer).attribute(
            prepared(x), target=torch.from_numpy(t), relu_attributions=True
        )
        up = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")
        return channel_sum(up)

    def occlusion(model, x, t, seed):
        occ = Occlusion(model)
        return channel_sum(
            occ.attribute(
                torch.from_numpy(x),
                sliding_window_shapes=(x.shape[1], 8, 8),
                strides=(x.shape[1], 4, 4),
                baselines=0.0,
                target=torch.from_numpy(t),
                perturbations_per_eval=128,
            )
        )

    return {
        "Gradient": gradient,
        "Gradient x Input": grad_x_input,
        "Integrated Gradients": integrated_gradients,
        "SmoothGrad": smoothgrad,
        "Grad-CAM": gradcam,
        "Occlusion": occlusion,
    }


def random_map(model, x, t, seed):
    return np.random.default_rng([seed, 12345]).uniform(size=(len(x), *x.shape[2:]))


# -- sanity check ------------------------------------------------------------------------
def randomize_prefix(model: nn.Module, prefix: str) -> None:
    """Re-initialise every layer with parameters whose name starts with ``prefix``."""
    torch.manual_seed(zlib.crc32(prefix.encode()))
    for name, module in model.named_modules():
        if name.startswith(prefix) and hasattr(module, "reset_parameters"):
            module.reset_parameters()


# -- evaluation --------------------------------------------------------------------------
METRICS = ["deg8", "deg4", "bbox", "point", "ins", "del", "sens-n", "rho top", "rho all", "s/img"]
BETTER = {
    "deg8": "+",
    "deg4": "+",
    "bbox": "+",
    "point": "+",
    "ins": "+",
    "del": "-",
    "sens-n": "+",
    "rho top": "-",
    "rho all": "-",
    "s/img": "-",
}


def evaluate(
    model: nn.Module, name: str, explain: Explain, data: Any, seed: int, settings: Settings, sanity: bool
) -> dict[str, float]:
    x, t = data.images, data.labels
    t0 = time.perf_counter()
    maps = explain(model, x, t, seed)
    seconds = (time.perf_counter() - t0) / len(x)
    row: dict[str, float] = {"s/img": seconds}
    kw: dict[str, Any] = {"batch_size": 256}
    for tile in (8, 4):
        deg = metrics.degradation_test(model, x, maps, t, tile_size=tile, n_steps=settings.steps, **kw)
        row[f"deg{tile}"] = float(deg.score.mean())
    row["bbox"] = float(metrics.bounding_box_score(maps, data.boxes).mean())
    row["point"] = float(metrics.pointing_game(maps, data.boxes, tolerance=4).mean())
    ind = metrics.insertion_deletion(
        model, x, maps, t, n_steps=settings.steps, blur_sigma=INSERTION_BLUR, **kw
    )
    row["ins"], row["del"] = float(ind.insertion_auc.mean()), float(ind.deletion_auc.mean())
    sens = metrics.sensitivity_n(
        model, x, maps, t, ns=(4, 16, 64), n_subsets=settings.subsets, tile_size=4, seed=seed, **kw
    )
    row["sens-n"] = float(np.nanmean(sens.mean))
    row["rho top"] = row["rho all"] = float("nan")
    if sanity:
        k = settings.sanity_images
        stages = metrics.cascading_randomization(model, ["classifier", "features"], randomize_prefix)
        res = metrics.model_randomization(
            lambda m, xx, tt: explain(m, xx, tt, seed), model, stages, x[:k], t[:k]
        )
        row["rho top"], row["rho all"] = (float(np.nanmean(r)) for r in res.spearman_abs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument("--images", type=int, default=None, help="test images per seed")
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of method names (case-insensitive prefix)"
    )
    parser.add_argument("--no-readout", action="store_true", help="skip Readout IBA")
    parser.add_argument(
        "--readout-beta",
        type=float,
        default=1.0,
        help="beta of the readout's training (default 1: with 10, short "
        "training collapses to a mask that passes nothing)",
    )
    parser.add_argument("--csv-dir", type=Path, default=DEFAULT_CSV_DIR)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.seeds:
        settings.seeds = args.seeds
    if args.images:
        settings.images = args.images
    try:
        import captum  # noqa: F401
    except ImportError:
        sys.exit("bench_quality needs Captum: pip install -c constraints.txt '.[bench]'")

    model, source = load_model()
    info = print_header("quality: attribution metrics on cluttered digits")
    log = print
    log(f"model: {source}; bottleneck at {LAYER}; {settings}")
    methods = build_methods(model, settings, args, log)

    rows: list[dict[str, Any]] = []
    for seed in range(settings.seeds):
        data = cluttered_digits(settings.images, split="test", seed=1000 + seed)
        acc = float((predict(model, data.images) == data.labels).mean())
        log(f"seed {seed}: {settings.images} test images, model accuracy {acc:.3f}")
        for name, (explain, sanity) in methods.items():
            t0 = time.perf_counter()
            row = evaluate(model, name, explain, data, seed, settings, sanity)
            rows.append({"method": name, "seed": seed, **row})
            log(f"  {name:<22} done in {time.perf_counter() - t0:5.1f} s")

    table, summary = summarise(methods, rows)
    headers = ["method"] + [f"{m} {BETTER[m]}" for m in METRICS]
    print()
    print(
        f"{settings.seeds} seeds x {settings.images} images; mean ± sd over seeds; "
        "+ higher is better, - lower is better"
    )
    print(format_table(headers, table, markdown=args.markdown))
    per_seed = write_csv(args.csv_dir / "quality_per_seed.csv", rows)
    summ = write_csv(
        args.csv_dir / "quality_summary.csv",
        [{**s, "date": info["date"], "command": info["command"]} for s in summary],
    )
    print(f"\nCSV: {per_seed}, {summ}")


def build_methods(
    model: nn.Module, settings: Settings, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, tuple[Explain, bool]]:
    """The methods to compare, by name, each with whether its sanity check runs
    (``--methods`` and ``--no-readout`` applied)."""
    estimate_data = cluttered_digits(settings.estimate_samples, split="train", seed=0).images

    per_sample = PerSampleIBA(estimate_data)
    per_sample.iba_for(model)  # estimate now, so that it is not timed as part of a method
    methods: dict[str, tuple[Explain, bool]] = {
        f"IBA beta={b:g}": (per_sample.method(b), True) for b in (1, 10, 100)
    }
    if not args.no_readout:
        ro = readout_method(model, settings, args.readout_beta, log)
        if ro is not None:
            methods[f"Readout IBA beta={args.readout_beta:g}"] = (ro, False)
    methods["Random"] = (random_map, True)
    methods.update({k: (v, True) for k, v in captum_methods(settings).items()})
    if args.methods:
        wanted = [w.strip().lower() for w in args.methods.split(",")]
        methods = {k: v for k, v in methods.items() if any(k.lower().startswith(w) for w in wanted)}
    return methods


def summarise(
    methods: dict[str, tuple[Explain, bool]], rows: list[dict[str, Any]]
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Per method: the table's cells (mean ± sd over seeds) and a summary row for the CSV."""
    table = []
    summary = []
    for name in methods:
        r = [x for x in rows if x["method"] == name]
        cells = [name]
        srow: dict[str, Any] = {"method": name, "seeds": len(r)}
        for m in METRICS:
            vals = [x[m] for x in r]
            cells.append(mean_sd(vals, 4 if m == "s/img" else 3))
            finite = [v for v in vals if np.isfinite(v)]
            srow[f"{m} mean"] = float(np.mean(finite)) if finite else float("nan")
            srow[f"{m} sd"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
        table.append(cells)
        summary.append(srow)
    return table, summary


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(b) for b in batches(x)]).argmax(1).numpy()


if __name__ == "__main__":
    main()
