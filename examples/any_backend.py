"""The generic front, ``iba_core.IBA``: the whole workflow for a model of any backend.

NumPy in, NumPy out; the backend is found from the model's type (here the PyTorch demo
network, but a plugin backend's model works the same way).  Shows the three kinds of
target, live settings, and ``restrict_flow``:  python examples/any_backend.py
"""

from __future__ import annotations

import argparse

import torch

from iba_core import IBA
from iba_core.apps.datasets import cluttered_digits
from iba_torch._demo import DEMO_LAYER, demo_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-estimate", type=int, default=1000)
    args = parser.parse_args()

    model = demo_cnn()
    train = cluttered_digits(args.n_estimate, split="train", seed=0)
    test = cluttered_digits(3, split="test", seed=2)

    iba = IBA(model, DEMO_LAYER)  # backend found from the model: torch
    iba.estimate(train.images)  # a NumPy array, cut into batches of 32
    print(iba)

    by_label = iba.analyze(test.images, target=test.labels, seed=0)  # (3, 64, 64) bits
    predicted = iba.analyze(test.images, target="predicted", seed=0)
    everything = iba.analyze(test.images, target="all", seed=0)  # whole distribution
    for i, label in enumerate(test.labels):
        print(
            f"digit {label}: {by_label[i].sum():7.1f} bits (its label), "
            f"{predicted[i].sum():7.1f} (predicted class), {everything[i].sum():7.1f} (all)"
        )

    # The model's prediction with the noise of the last masks (fresh on every call).
    x = torch.as_tensor(test.images)
    with iba.restrict_flow():
        noisy = model(x).argmax(dim=1).tolist()
    print(f"labels {test.labels.tolist()}, predicted through the bottleneck: {noisy}")

    iba.beta = 100  # live settings, validated like the constructor
    strict = iba.analyze(test.images, target=test.labels, seed=0)
    print(f"beta 10 -> 100: {by_label.sum():.1f} -> {strict.sum():.1f} bits in total")


if __name__ == "__main__":
    main()
