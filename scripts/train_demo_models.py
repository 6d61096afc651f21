"""Train the small CNN of ``iba demo`` on cluttered digits and write its weights.

    python scripts/train_demo_models.py                    # both, about 15 min on 2 CPU cores
    python scripts/train_demo_models.py --framework keras  # only convert to Keras (seconds)

``torch``: trains the PyTorch CNN (``iba_torch._demo``) with fixed seeds for the data
(``iba_core.apps.datasets.cluttered_digits``) and for PyTorch, and writes
``src/iba_torch/data/demo_cnn.npz``.  ``keras``: the Keras demo CNN (``iba_tf._demo``) is
the same network, so its weights are the PyTorch ones in Keras layout, written to
``src/iba_tf/data/demo_cnn.npz``; its accuracy is measured in Keras.  Accuracies are on
test images built from handwriting the model never saw (the ``test`` split).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from iba_core.apps.datasets import cluttered_digits

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 24000, 2000
TRAIN_SEED, TEST_SEED = 0, 1


def train_torch(out: Path, epochs: int, seed: int) -> float:
    import torch
    from torch import nn

    from iba_torch._demo import build_demo_cnn, state_dict_to_numpy

    torch.manual_seed(seed)
    train = cluttered_digits(N_TRAIN, split="train", seed=TRAIN_SEED)
    test = cluttered_digits(N_TEST, split="test", seed=TEST_SEED)
    x_train, y_train = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    x_test, y_test = torch.from_numpy(test.images), torch.from_numpy(test.labels)

    model = build_demo_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * ((N_TRAIN + 127) // 128)
    )
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x_test[i : i + 500]).argmax(1) for i in range(0, N_TEST, 500)])
        model.train()
        return float((pred == y_test).float().mean())

    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(N_TRAIN, generator=gen)
        total = 0.0
        for i in range(0, N_TRAIN, 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / N_TRAIN:.4f}, "
            f"test accuracy {accuracy():.4f} ({time.perf_counter() - t0:.0f} s)"
        )
    acc = accuracy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **state_dict_to_numpy(model))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); test accuracy {acc:.4f} on {N_TEST} images")
    return acc


def convert_to_keras(torch_weights: Path, out: Path) -> float:
    import keras

    from iba_tf._demo import demo_cnn, keras_weights_from_torch

    with np.load(torch_weights) as data:
        state = {k: data[k] for k in data.files}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **keras_weights_from_torch(state))
    model = demo_cnn(out)
    test = cluttered_digits(N_TEST, split="test", seed=TEST_SEED)
    x = np.ascontiguousarray(np.moveaxis(test.images, 1, -1))
    logits = np.asarray(model.predict(x, batch_size=500, verbose=0))
    acc = float((logits.argmax(axis=1) == test.labels).mean())
    print(
        f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); Keras {keras.__version__} test "
        f"accuracy {acc:.4f} on {N_TEST} images"
    )
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=["all", "torch", "keras"], default="all")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch_weights = ROOT / "src/iba_torch/data/demo_cnn.npz"
    if args.framework in ("all", "torch"):
        train_torch(torch_weights, args.epochs, args.seed)
    if args.framework in ("all", "keras"):
        convert_to_keras(torch_weights, ROOT / "src/iba_tf/data/demo_cnn.npz")


if __name__ == "__main__":
    main()
