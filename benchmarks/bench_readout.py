"""Readout Bottleneck speed: one-pass ``analyze`` against the Per-Sample Bottleneck.

On the same model and layer, prints the time per image of

* ``IBAReadout.analyze`` (one forward pass for the whole batch), and
* the per-sample ``analyze`` (10 Adam steps on 10 noisy copies per image; explaining
  several images in one call, as the per-sample front allows, and one at a time),

their ratio, and the readout's training throughput in images per second.  Speed only:
the weights and data are random (the conformance suite checks what the maps mean).

Run: ``python benchmarks/bench_readout.py [--backend torch|tf|both] [--device cuda]
[--repeats 5] [--size 64]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from iba_core import FewSamplesWarning

warnings.simplefilter("ignore", FewSamplesWarning)

CHANNELS = (32, 64, 128, 128)  # conv1..conv4; conv2..4 with stride 2
N_CLASSES = 10
READOUT_LAYERS = ["relu3", "relu4", "logits"]
BOTTLENECK = "relu3"


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialised float32 weights, PyTorch layout, shared by both frameworks."""
    rng = np.random.default_rng(seed)
    w, c_in = {}, 3
    for i, c in enumerate(CHANNELS, 1):
        w[f"conv{i}.weight"] = rng.standard_normal((c, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in))
        w[f"conv{i}.bias"] = np.zeros(c)
        c_in = c
    w["logits.weight"] = rng.standard_normal((N_CLASSES, c_in)) * np.sqrt(1 / c_in)
    w["logits.bias"] = np.zeros(N_CLASSES)
    return {k: v.astype(np.float32) for k, v in w.items()}


def median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (caches, kernels, tracing)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- PyTorch --------------------------------------------------------------------------------
def bench_torch(args: argparse.Namespace) -> list[tuple[str, ...]]:
    import torch
    from torch import nn

    from iba_torch import IBA, IBAReadout

    device = torch.device(args.device)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = 3
    for i, c in enumerate(CHANNELS, 1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c, 3, padding=1, stride=1 if i == 1 else 2)
        layers[f"relu{i}"] = nn.ReLU()
        c_in = c
    layers["pool"], layers["flatten"] = nn.AdaptiveAvgPool2d(1), nn.Flatten()
    layers["logits"] = nn.Linear(c_in, N_CLASSES)
    model = nn.Sequential(layers)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights().items()})
    model = model.eval().to(device)

    rng = np.random.default_rng(0)
    size = args.size
    data = torch.as_tensor(rng.standard_normal((args.train_images, 3, size, size)), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, N_CLASSES, args.train_images))
    loader = [(data[i : i + 32], labels[i : i + 32]) for i in range(0, len(data), 32)]
    x = data[: args.batch].to(device)
    targets = labels[: args.batch]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    readout = IBAReadout(BOTTLENECK, READOUT_LAYERS, model)
    readout.estimate(model, loader)
    # Warm-up; the maps' quality is irrelevant.
    readout.train(model, loader[:1], epochs=1, lr=1e-5, validation=None, warn=False)
    iba = IBA(model, BOTTLENECK)
    iba.estimate(model, loader)

    t_readout = median_time(lambda: readout.analyze(x), args.repeats, sync) / len(x)
    n_ps = min(args.batch, args.per_sample_batch)
    t_ps_batch = (
        median_time(
            lambda: iba.analyze(x[:n_ps], target=targets[:n_ps], model=model), max(1, args.repeats // 2), sync
        )
        / n_ps
    )
    t_ps_one = median_time(
        lambda: iba.analyze(x[:1], target=targets[:1], model=model), max(1, args.repeats // 2), sync
    )
    t_train = median_time(
        lambda: readout.train(model, loader, epochs=1, lr=1e-5, validation=None, warn=False),
        max(1, args.repeats // 3),
        sync,
    )
    return _rows(f"torch ({device.type})", t_readout, t_ps_batch, n_ps, t_ps_one, len(data) / t_train)


# -- TensorFlow -----------------------------------------------------------------------------
def bench_tf(args: argparse.Namespace) -> list[tuple[str, ...]]:
    import keras
    import tensorflow as tf

    from iba_tf import IBACopy, IBAReadout

    w = weights()
    size = args.size
    stack = [keras.Input((size, size, 3))]
    for i, c in enumerate(CHANNELS, 1):
        if i > 1:
            stack.append(keras.layers.ZeroPadding2D(1, name=f"pad{i}"))
        stack.append(
            keras.layers.Conv2D(
                c, 3, strides=1 if i == 1 else 2, padding="same" if i == 1 else "valid", name=f"conv{i}"
            )
        )
        stack.append(keras.layers.ReLU(name=f"relu{i}"))
    stack += [keras.layers.GlobalAveragePooling2D(name="pool"), keras.layers.Dense(N_CLASSES, name="logits")]
    model = keras.Sequential(stack)
    for i in range(1, len(CHANNELS) + 1):
        model.get_layer(f"conv{i}").set_weights(
            [np.transpose(w[f"conv{i}.weight"], (2, 3, 1, 0)), w[f"conv{i}.bias"]]
        )
    model.get_layer("logits").set_weights([w["logits.weight"].T, w["logits.bias"]])

    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.train_images, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, N_CLASSES, args.train_images)
    x = tf.constant(data[: args.batch])

    readout = IBAReadout(BOTTLENECK, READOUT_LAYERS, model)
    readout.estimate(data)
    readout.fit(
        data[:32], labels[:32], epochs=1, lr=1e-5, compile=False, validation=None, warn=False
    )  # warm-up
    iba = IBACopy(model, BOTTLENECK)
    iba.estimate(data)

    def sync() -> None:
        pass

    t_readout = median_time(lambda: readout.analyze(x), args.repeats, sync) / args.batch
    n_ps = min(args.batch, args.per_sample_batch)
    t_ps_batch = (
        median_time(lambda: iba.analyze(x[:n_ps], target=labels[:n_ps]), max(1, args.repeats // 2), sync)
        / n_ps
    )
    t_ps_one = median_time(lambda: iba.analyze(x[:1], target=labels[:1]), max(1, args.repeats // 2), sync)
    # One fit() call traces the compiled loss once; time two epochs and subtract one.
    t0 = time.perf_counter()
    readout.fit(data, labels, epochs=1, lr=1e-5, seed=0, validation=None, warn=False)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    readout.fit(data, labels, epochs=3, lr=1e-5, seed=0, validation=None, warn=False)
    three = time.perf_counter() - t0
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    return _rows(
        f"tf ({device})", t_readout, t_ps_batch, n_ps, t_ps_one, 2 * len(data) / max(three - one, 1e-9)
    )


def _rows(
    name: str, t_readout: float, t_ps_batch: float, n_ps: int, t_ps_one: float, train_rate: float
) -> list[tuple[str, ...]]:
    ms = lambda t: f"{t * 1000:.2f}"
    return [
        (
            name,
            ms(t_readout),
            ms(t_ps_batch),
            f"{t_ps_batch / t_readout:.0f}x",
            ms(t_ps_one),
            f"{t_ps_one / t_readout:.0f}x",
            f"{train_rate:.0f}",
            str(n_ps),
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "tf", "both"), default="torch")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--size", type=int, default=64, help="image size (square)")
    parser.add_argument("--batch", type=int, default=32, help="images per readout analyze()")
    parser.add_argument(
        "--per-sample-batch", type=int, default=8, help="images per per-sample analyze() call"
    )
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print("== Readout Bottleneck vs Per-Sample Bottleneck ==")
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} logical cores, load "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    print(
        f"model: 3x{args.size}x{args.size} -> conv {CHANNELS} -> {N_CLASSES} logits; "
        f"bottleneck {BOTTLENECK!r}, readout layers {READOUT_LAYERS}"
    )
    rows = []
    if args.backend in ("torch", "both"):
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        rows += bench_torch(args)
    if args.backend in ("tf", "both"):
        import tensorflow as tf

        print(f"tensorflow {tf.__version__}")
        rows += bench_tf(args)
    headers = (
        "backend",
        "readout ms/img",
        "per-sample ms/img (batched)",
        "speed-up",
        "per-sample ms (1 img)",
        "speed-up",
        "train img/s",
        "per-sample batch",
    )
    table = [headers, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for k, r in enumerate(table):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print("  ".join(cells))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"\nreadout: one forward pass per batch of {args.batch}; per-sample: 10 steps x 10 "
        "noisy copies (reference settings); training: batches of 32, lr 1e-5, images/s."
    )


if __name__ == "__main__":
    main()
