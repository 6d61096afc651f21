"""Train the small transformer of ``iba demo --task text`` and write its weights.

    python scripts/train_text_model.py                    # both, about a minute on 2 CPU cores
    python scripts/train_text_model.py --framework keras  # only convert to Keras (seconds)

``torch``: trains ``iba_torch._text`` on :func:`iba_core.apps.text_task.make_text_task`
with fixed seeds (data and PyTorch, one thread, so the run is deterministic) and writes
``src/iba_torch/data/text_transformer.npz``.  ``keras``: the Keras twin
(``iba_tf._text``) is the same network, so its weights are the PyTorch ones in Keras
layout, written to ``src/iba_tf/data/text_transformer.npz``; its accuracy is measured in
Keras.  Accuracies are on a fresh set drawn with another seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from iba_core.apps.text_task import make_text_task

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 20000, 2000
TRAIN_SEED, TEST_SEED = 0, 1
BATCH = 64


def train_torch(out: Path, epochs: int, seed: int) -> float:
    import torch
    from torch import nn

    from iba_torch._text import build_text_model

    torch.set_num_threads(1)  # deterministic, and fastest for a model this small
    torch.manual_seed(seed)
    train = make_text_task(N_TRAIN, seed=TRAIN_SEED)
    test = make_text_task(N_TEST, seed=TEST_SEED)
    x_train, y_train = torch.from_numpy(train.ids), torch.from_numpy(train.labels)
    x_test, y_test = torch.from_numpy(test.ids), torch.from_numpy(test.labels)

    model = build_text_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = epochs * ((N_TRAIN + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(x_test).argmax(1)
        model.train()
        return float((pred == y_test).float().mean())

    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(N_TRAIN, generator=gen)
        total = 0.0
        for i in range(0, N_TRAIN, BATCH):
            idx = order[i : i + BATCH]
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
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    np.savez_compressed(out, **state)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); test accuracy {acc:.4f} on {N_TEST} sequences")
    return acc


def convert_to_keras(torch_weights: Path, out: Path) -> float:
    import keras

    from iba_tf._text import keras_weights_from_torch, text_model

    with np.load(torch_weights) as data:
        state = {k: data[k] for k in data.files}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **keras_weights_from_torch(state))
    model = text_model(out)
    test = make_text_task(N_TEST, seed=TEST_SEED)
    logits = np.asarray(model.predict(test.ids, batch_size=500, verbose=0))
    acc = float((logits.argmax(axis=1) == test.labels).mean())
    print(
        f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); Keras {keras.__version__} test "
        f"accuracy {acc:.4f} on {N_TEST} sequences"
    )
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=["all", "torch", "keras"], default="all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch_weights = ROOT / "src/iba_torch/data/text_transformer.npz"
    if args.framework in ("all", "torch"):
        train_torch(torch_weights, args.epochs, args.seed)
    if args.framework in ("all", "keras"):
        convert_to_keras(torch_weights, ROOT / "src/iba_tf/data/text_transformer.npz")


if __name__ == "__main__":
    main()
