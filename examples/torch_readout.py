"""Readout Bottleneck with PyTorch: train once, then one forward pass per batch of maps.

Uses the demo network and the cluttered-digits data that ship with iba:
python examples/torch_readout.py [--out DIR] [--epochs E] [--n-train N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from iba_core.apps.datasets import cluttered_digits
from iba_torch import IBA, IBAReadout
from iba_torch._demo import demo_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("iba-examples-out"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-2,
        help="Adam learning rate (the reference's 1e-5 needs many more epochs)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = demo_cnn()
    train = cluttered_digits(args.n_train, split="train", seed=0)
    test = cluttered_digits(8, split="test", seed=1)
    images = torch.as_tensor(train.images)
    labels = torch.as_tensor(train.labels)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )

    # Bottleneck after the third block; the readout sees that block, the last one and logits.
    readout = IBAReadout("features.relu3", ["features.relu3", "features.relu4", "classifier"], model)
    readout.estimate(model, loader)
    losses = readout.train(model, loader, epochs=args.epochs, lr=args.lr)
    print("mean loss per epoch:", " ".join(f"{v:.2f}" for v in losses))
    readout.save(args.out / "readout.npz")

    x = torch.as_tensor(test.images)
    t0 = time.perf_counter()
    fast = readout.analyze(x)  # (8, 64, 64), one pass
    t_readout = time.perf_counter() - t0

    iba = IBA(model, "features.relu3")
    iba.estimate(model, loader, n_samples=args.n_train)
    t0 = time.perf_counter()
    slow = iba.analyze(x, target=torch.as_tensor(test.labels), model=model, seed=0)
    t_per_sample = time.perf_counter() - t0

    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(fast, slow, strict=True)]
    print(
        f"readout: {t_readout / len(x) * 1e3:.1f} ms/image, per-sample: "
        f"{t_per_sample / len(x) * 1e3:.1f} ms/image"
    )
    print(f"correlation of readout and per-sample maps: mean {np.mean(corr):.2f}, min {np.min(corr):.2f}")


if __name__ == "__main__":
    main()
