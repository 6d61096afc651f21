"""Per-Sample Bottleneck with PyTorch: estimate, explain a batch, plot.

Uses the demo network and the cluttered-digits data that ship with iba, so it runs
offline in a few seconds:  python examples/torch_per_sample.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from iba_core.apps.datasets import cluttered_digits
from iba_torch import IBA, plot_saliency_map
from iba_torch._demo import demo_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("iba-examples-out"))
    parser.add_argument("--n-estimate", type=int, default=1000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = demo_cnn()  # 1x64x64 -> 10 logits
    train = cluttered_digits(args.n_estimate, split="train", seed=0)
    test = cluttered_digits(4, split="test", seed=1)

    # The bottleneck after the third conv block (64x16x16 features).
    iba = IBA(model, "features.relu3")
    loader = torch.utils.data.DataLoader(torch.as_tensor(train.images), batch_size=100)
    iba.estimate(model, loader, n_samples=args.n_estimate)

    x = torch.as_tensor(test.images)
    target = torch.as_tensor(test.labels)
    maps = iba.analyze(x, target=target, model=model, seed=0)  # (4, 64, 64), bits/pixel

    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 3.5))
    for ax, smap, img, label in zip(axes, maps, test.images, test.labels, strict=True):
        plot_saliency_map(smap, img=img[0], ax=ax)
        ax.set_title(f"digit {label}: {smap.sum():.0f} bits")
    fig.tight_layout()
    fig.savefig(args.out / "torch_per_sample.png", dpi=80)
    for label, smap in zip(test.labels, maps, strict=True):
        print(f"digit {label}: {smap.sum():8.1f} bits in total, peak {smap.max():.3f} bits/pixel")
    print(f"figure: {args.out / 'torch_per_sample.png'}")


if __name__ == "__main__":
    main()
