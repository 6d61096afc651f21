"""TensorFlow/Keras backend speed: ``analyze`` against the bare work it needs, and against
the PyTorch backend on the same model with the same weights.

The bare work is what a straightforward per-sample bottleneck does: ``optimization_steps``
forward passes of the model on ``batch_size`` copies of the input with a multiplicative
mask on the feature map, and a backward pass to that mask only (a ``tf.GradientTape``
watching the mask, never the weights), run the way ``analyze`` runs the model (eagerly).
``analyze`` makes the noisy copies at the bottleneck layer instead (the layers before it
run on one copy) and runs its own array parts (mask, capacity, injection, Adam) as traced
``tf.function``s; its remaining cost (the noise draw, the layer hook and its layout
transposes, the extra operations) is what the ratio shows on top.  Timings alternate and
the median of several repeats is reported.  The architecture is
``benchmarks/bench_torch.py``'s: 3x64x64 input, the bottleneck on a 128x16x16 feature
map, reference defaults (10 steps, batch 10).

Run: ``python benchmarks/bench_tf.py [--repeats 7] [--no-torch]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from iba_core import FewSamplesWarning
from iba_tf import IBACopy

warnings.simplefilter("ignore", FewSamplesWarning)

# (out_channels, stride) of the four 3x3 convolutions; the bottleneck follows the third.
CONVS = [(32, 1), (64, 2), (128, 2), (128, 2)]
LAYER = "relu3"


def make_keras_model(seed: int = 0) -> keras.Model:
    """3x64x64 (channels-last) -> ... -> 'relu3' 128x16x16 -> ... -> 10 logits.

    Explicit ``ZeroPadding2D(1)`` + ``"valid"`` convolutions pad exactly like PyTorch's
    ``padding=1`` (Keras' ``"same"`` pads asymmetrically for stride 2).
    """
    rng = np.random.default_rng(seed)
    inputs = x = keras.Input((64, 64, 3))
    c_in = 3
    for i, (c_out, stride) in enumerate(CONVS, start=1):
        x = keras.layers.ZeroPadding2D(1, name=f"pad{i}")(x)
        conv = keras.layers.Conv2D(c_out, 3, strides=stride, name=f"conv{i}")
        x = conv(x)
        bound = 1 / np.sqrt(9 * c_in)
        conv.set_weights(
            [
                rng.uniform(-bound, bound, (3, 3, c_in, c_out)).astype("float32"),
                rng.uniform(-bound, bound, c_out).astype("float32"),
            ]
        )
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        c_in = c_out
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    fc = keras.layers.Dense(10, name="fc")
    outputs = fc(x)
    bound = 1 / np.sqrt(c_in)
    fc.set_weights(
        [
            rng.uniform(-bound, bound, (c_in, 10)).astype("float32"),
            rng.uniform(-bound, bound, 10).astype("float32"),
        ]
    )
    return keras.Model(inputs, outputs, name="bench")


def torch_twin(weights: dict[str, np.ndarray]):
    """The same network in PyTorch (channels-first) with the Keras model's weights."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    c_in = 3
    for i, (c_out, stride) in enumerate(CONVS, start=1):
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weights[f"conv{i}"].transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(weights[f"conv{i}_b"]))
        layers += [conv, nn.ReLU()]
        c_in = c_out
    fc = nn.Linear(c_in, 10)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(weights["fc"].T.copy()))
        fc.bias.copy_(torch.from_numpy(weights["fc_b"]))
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    return net, net[5]  # the third ReLU: 128x16x16


def keras_weights(model: keras.Model) -> dict[str, np.ndarray]:
    out = {}
    for name in [f"conv{i}" for i in range(1, len(CONVS) + 1)] + ["fc"]:
        out[name], out[name + "_b"] = model.get_layer(name).get_weights()
    return out


def bare_work(model: keras.Model, x: tf.Tensor, target: int, steps: int = 10, batch_size: int = 10) -> None:
    """Forward + backward to a mask on the feature map, ``steps`` times, batch ``batch_size``."""
    layer = model.get_layer(LAYER)
    xb = tf.repeat(x, batch_size, axis=0)
    onehot = tf.one_hot([target] * batch_size, 10)
    mask = tf.ones((1, *layer.output.shape[1:]))
    original = layer.call
    layer.call = lambda *a, **k: original(*a, **k) * mask_now[0]
    mask_now = [mask]
    try:
        for _ in range(steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(mask)
                mask_now[0] = mask
                logits = model(xb, training=False)
                loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))
            grad = tape.gradient(loss, mask)
            mask = mask - 0.0 * grad
    finally:
        del layer.call


def torch_bare_work(net, layer, x, target: int, steps: int = 10, batch_size: int = 10) -> None:
    """:func:`bare_work` in PyTorch: a forward hook multiplies the mask in."""
    import torch

    xb = x.expand(batch_size, *x.shape[1:])
    t = torch.full((batch_size,), target)
    mask = torch.ones((1, 128, 16, 16), requires_grad=True)
    handle = layer.register_forward_hook(lambda m, i, out: out * mask)
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(net(xb), t)
            (grad,) = torch.autograd.grad(loss, mask)
            with torch.no_grad():
                mask -= 0.0 * grad
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def torch_child(path: str, repeats: int) -> None:
    """Time PyTorch in a process of its own (no TensorFlow thread pools around)."""
    import torch

    from iba_torch import IBA

    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    net, layer = torch_twin(arrays)
    data, x1 = arrays["data"], arrays["x1"]
    iba_t = IBA(layer)
    iba_t.estimate(
        net,
        [torch.from_numpy(data[i : i + 50].transpose(0, 3, 1, 2).copy()) for i in range(0, len(data), 50)],
    )
    xt = torch.from_numpy(x1.transpose(0, 3, 1, 2).copy())
    jobs = {
        "torch bare": lambda: torch_bare_work(net, layer, xt, 3),
        "torch analyze": lambda: iba_t.analyze(xt, target=3, model=net),
    }
    result: dict[str, float] = dict(interleaved(jobs, repeats))
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


def interleaved(jobs: dict, repeats: int) -> dict[str, float]:
    """Median time of each job; one warm-up each, then the jobs take turns, so a change
    in machine load hits all of them alike."""
    for job in jobs.values():
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(timed(job))
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        torch_child(args.torch_child, args.repeats)
        return

    model = make_keras_model()
    iba = IBACopy(model, LAYER)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((200, 64, 64, 3)).astype("float32")
    iba.estimate(data, batch_size=50)
    x1 = rng.standard_normal((1, 64, 64, 3)).astype("float32")
    x1_t = tf.constant(x1)
    jobs = {"tf bare": lambda: bare_work(model, x1_t, 3), "tf analyze": lambda: iba.analyze(x1_t, target=3)}
    t = interleaved(jobs, args.repeats)

    if not args.no_torch:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "twin.npz")
            np.savez(path, data=data, x1=x1, **keras_weights(model))
            out = subprocess.run(
                [sys.executable, __file__, "--torch-child", path, "--repeats", str(args.repeats)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        t.update(json.loads(out.strip().splitlines()[-1]))

    print(
        f"tensorflow {tf.__version__}  keras {keras.__version__}  "
        f"devices {[d.device_type for d in tf.config.list_logical_devices()]}  "
        f"median of {args.repeats}"
    )
    print("model: 3x64x64 input, bottleneck on 128x16x16, defaults (10 steps, batch 10)")
    print(f"{'measurement':<46}{'seconds':>10}{'ratio':>10}")
    print(f"{'TF bare forward+backward work (1 image)':<46}{t['tf bare']:>10.4f}")
    print(
        f"{'TF IBA analyze (1 image)':<46}{t['tf analyze']:>10.4f}"
        f"{t['tf analyze'] / t['tf bare']:>10.3f}  (analyze / bare; target <= 1.20)"
    )
    if "torch analyze" in t:
        print(f"{'PyTorch bare work (same model and weights)':<46}{t['torch bare']:>10.4f}")
        print(
            f"{'PyTorch IBA analyze (same model and weights)':<46}{t['torch analyze']:>10.4f}"
            f"{t['torch analyze'] / t['torch bare']:>10.3f}  (analyze / bare; "
            f"{t['threads']} threads, own process)"
        )
        print(f"{'TF analyze / PyTorch analyze':<46}{'':>10}{t['tf analyze'] / t['torch analyze']:>10.3f}")


if __name__ == "__main__":
    main()
