"""Speed of every available backend on the same network, sizes and weights, in one run.

For each backend (PyTorch, TensorFlow/Keras, and JAX/Flax NNX when the ``iba-jax`` plugin
is installed; small network only) and network, in a fresh worker process:

* ``analyze`` of 1 and of 16 images (reference defaults: 10 steps, 10 noise samples)
  against the *bare work* any per-sample bottleneck needs: the same number of forward
  passes on ``N * 10`` samples with a multiplicative mask on the feature map and a
  backward pass to that mask only.  ``x bare`` is IBA's overhead factor.
* The *floor* of the same explanation, the work the method cannot avoid: the layers
  before the bottleneck once per input; then, for each of the 10 steps, the
  standard-normal noise for the ``N * 10`` noisy copies of the feature map, the layers
  after the bottleneck on ``mask * features + noise``, the mean target cross-entropy and
  a backward pass to the mask only.  ``analyze / floor`` is how far IBA is from it.
* PyTorch's closure form (the reference library's ``analyze(x, loss_of_batch)``: the
  model runs on the noisy copies of the input) against the bare work; the first
  ``analyze`` call of the process (tracing and compiling included) against a later one;
  one call on ``N`` images against ``N`` calls on one image each (``N`` times the
  one-image time), and the least floor of ``N`` images (in one batch or image by image)
  against the same: the least that ratio can be; the peak memory of ``N`` images in one
  call against one image's.
* ``estimate`` throughput (images/s, statistics of the bottleneck layer) against a bare
  forward pass over the same images.
* Readout ``analyze`` (untrained head; its speed does not depend on training) against
  per-sample ``analyze`` on the same images.
* Peak memory of each measurement over what was allocated before it: PyTorch on a CPU,
  the resident memory high-water mark (Linux ``VmHWM``, reset via
  ``/proc/self/clear_refs``; PyTorch's CPU allocator returns large blocks to the system);
  PyTorch on a GPU, ``torch.cuda.max_memory_allocated``; TensorFlow, its allocator's
  peak (``tf.config.experimental.get_memory_info``, CPU or GPU), because its allocator
  keeps freed memory and the resident size would not show the peak.

Networks (weights drawn once in NumPy and loaded into both frameworks, so both compute
the same function; the run checks that the logits agree):

* ``small`` (default): 3x64x64 -> four 3x3 convolutions -> 10 logits, bottleneck on the
  128x16x16 output of ``relu3`` (the network of ``bench_torch.py``/``bench_tf.py``);
* ``resnet`` (``--full``): a ResNet-18-style network without batch norm on 3x224x224,
  bottleneck on the 128x28x28 output of ``layer2``; ``resnet3`` (``--full``) puts it on
  the 256x14x14 output of ``layer3``, ``resnet56`` (on request) on the 64x56x56 output
  of ``layer1``.

Times are medians of ``--repeats`` runs after one warm-up run each (one run only when a
group's warm-ups took over 10 s).  Each measurement alternates with the ones it is compared
with (bare work, floor and ``analyze``; bare forward and ``estimate``), so that load changes
on a shared machine hit them alike; the header prints the load average.

Run: ``python benchmarks/bench_speed.py [--quick | --full] [--backends torch,tf,jax]
[--configs small,resnet,resnet56] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _common import DEFAULT_CSV_DIR, PeakRSS, format_table, median_time, print_header, write_csv

HERE = Path(__file__).resolve().parent

# -- the networks, as data ---------------------------------------------------------------
CONFIGS: dict[str, dict[str, Any]] = {
    "small": {
        "arch": "small",
        "input": (3, 64, 64),
        "layer": "relu3",
        "classes": 10,
        "feature": (128, 16, 16),
        "readout": ["relu3", "relu4", "fc"],
        "n_est": 256,
    },
    "resnet": {
        "arch": "resnet18",
        "input": (3, 224, 224),
        "layer": "layer2",
        "classes": 1000,
        "feature": (128, 28, 28),
        "readout": ["layer2", "layer3", "layer4", "fc"],
        "n_est": 64,
    },
    "resnet3": {
        "arch": "resnet18",
        "input": (3, 224, 224),
        "layer": "layer3",
        "classes": 1000,
        "feature": (256, 14, 14),
        "readout": ["layer3", "layer4", "fc"],
        "n_est": 64,
    },
    "resnet56": {
        "arch": "resnet18",
        "input": (3, 224, 224),
        "layer": "layer1",
        "classes": 1000,
        "feature": (64, 56, 56),
        "readout": ["layer1", "layer2", "layer3", "fc"],
        "n_est": 64,
    },
}
SMALL_CONVS = [("conv1", 3, 32, 1), ("conv2", 32, 64, 2), ("conv3", 64, 128, 2), ("conv4", 128, 128, 2)]
RESNET_STAGES = [64, 128, 256, 512]


def conv_list(arch: str) -> list[tuple[str, int, int, int, int, int]]:
    """``(name, c_in, c_out, kernel, stride, padding)`` of every convolution."""
    if arch == "small":
        return [(n, ci, co, 3, s, 1) for n, ci, co, s in SMALL_CONVS]
    convs = [("stem", 3, 64, 7, 2, 3)]
    c_in = 64
    for i, c_out in enumerate(RESNET_STAGES, start=1):
        for b in range(2):
            stride = 2 if (b == 0 and i > 1) else 1
            p = f"layer{i}.{b}"
            convs += [(f"{p}.conv1", c_in, c_out, 3, stride, 1), (f"{p}.conv2", c_out, c_out, 3, 1, 1)]
            if stride != 1 or c_in != c_out:
                convs.append((f"{p}.down", c_in, c_out, 1, stride, 0))
            c_in = c_out
    return convs


def make_weights(arch: str, classes: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """He-initialised weights ``(out, in, kh, kw)`` (PyTorch layout) and zero biases.

    The second convolution of each residual block is scaled down so that activations
    stay in range without batch norm.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, ci, co, k, _, _ in conv_list(arch):
        w = rng.normal(0.0, np.sqrt(2.0 / (ci * k * k)), (co, ci, k, k))
        if name.endswith("conv2") and arch != "small":
            w *= 0.3
        weights[name] = (w.astype(np.float32), np.zeros(co, np.float32))
    c_last = SMALL_CONVS[-1][2] if arch == "small" else RESNET_STAGES[-1]
    fc = rng.normal(0.0, np.sqrt(1.0 / c_last), (classes, c_last)).astype(np.float32)
    weights["fc"] = (fc, np.zeros(classes, np.float32))
    return weights


# -- timing ------------------------------------------------------------------------------
def run_groups(n: int) -> list[tuple[str, ...]]:
    """The runs of a worker that are timed together, each group in alternation."""
    return [
        ("forward", "estimate"),
        ("bare 1", "floor 1", "analyze 1", "closure 1", "bare+noise 1"),
        (f"bare {n}", f"floor {n}", f"analyze {n}"),
        ("readout 1", f"readout {n}"),
    ]


def interleaved(
    runs: dict[str, Any],
    repeats: int,
    sync: Any = lambda: None,
    groups: list[tuple[str, ...]] | None = None,
) -> dict[str, float]:
    """Median seconds of each run; the runs of a group are timed in alternation.

    ``groups`` lists the keys timed together (by default consecutive pairs of ``runs``);
    within a group the runs take turns repeat by repeat, so that a change of load on a
    shared machine hits them alike.  One warm-up call each first; a group whose warm-ups
    took over 10 s is timed once more only.
    """
    keys = list(runs)
    if groups is None:
        groups = list(zip(keys[0::2], keys[1::2], strict=True))
    out: dict[str, float] = {}
    for group in groups:
        group = tuple(k for k in group if k in runs)  # e.g. the closure form: PyTorch only
        warm = sum(median_time(runs[k], 1, sync) for k in group)
        times: dict[str, list[float]] = {k: [] for k in group}
        for _ in range(1 if warm > 10 else max(1, repeats)):
            for k in group:
                times[k].append(median_time(runs[k], 1, sync))
        out.update({k: statistics.median(v) for k, v in times.items()})
    return out


# -- PyTorch -----------------------------------------------------------------------------
def torch_model(cfg: dict[str, Any]) -> Any:
    import torch
    from torch import nn

    arch, weights = cfg["arch"], make_weights(cfg["arch"], cfg["classes"])
    convs = {n: (ci, co, k, s, p) for n, ci, co, k, s, p in conv_list(arch)}

    def conv(name: str) -> nn.Conv2d:
        ci, co, k, s, p = convs[name]
        m = nn.Conv2d(ci, co, k, stride=s, padding=p)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(weights[name][0]))
            m.bias.copy_(torch.from_numpy(weights[name][1]))
        return m

    fc = nn.Linear(*weights["fc"][0].shape[::-1])
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(weights["fc"][0]))
        fc.bias.copy_(torch.from_numpy(weights["fc"][1]))
    if arch == "small":
        layers: list[tuple[str, nn.Module]] = []
        for i, (name, *_rest) in enumerate(SMALL_CONVS, start=1):
            layers += [(name, conv(name)), (f"relu{i}", nn.ReLU())]
        layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", fc)]
        return nn.Sequential(OrderedDict(layers)).eval()

    class Block(nn.Module):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.conv1, self.conv2 = conv(f"{prefix}.conv1"), conv(f"{prefix}.conv2")
            self.down = conv(f"{prefix}.down") if f"{prefix}.down" in convs else None
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv2(self.relu(self.conv1(x)))
            return self.relu(y + (x if self.down is None else self.down(x)))

    stages = [(f"layer{i}", nn.Sequential(Block(f"layer{i}.0"), Block(f"layer{i}.1"))) for i in range(1, 5)]
    return nn.Sequential(
        OrderedDict(
            [
                ("stem", nn.Sequential(conv("stem"), nn.ReLU(), nn.MaxPool2d(3, 2, 1))),
                *stages,
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", fc),
            ]
        )
    ).eval()


def torch_split(model: Any, layer: str) -> tuple[Any, Any]:
    """The layers up to and including ``layer``, and the layers after it.

    Both networks are ``nn.Sequential`` with the bottleneck layer among its children
    (``relu3`` of the small net, ``layer2`` of the ResNet-style one), so the split is a
    split of the children; ``tail(head(x))`` equals ``model(x)``.
    """
    from torch import nn

    names = [name for name, _ in model.named_children()]
    cut = names.index(layer) + 1
    children = list(model.named_children())
    return nn.Sequential(OrderedDict(children[:cut])), nn.Sequential(OrderedDict(children[cut:]))


def torch_worker(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from iba_torch import IBA, IBAReadout

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    model = torch_model(cfg).to(device)
    layer = model.get_submodule(cfg["layer"])
    rng = np.random.default_rng(1)
    data = rng.standard_normal((cfg["n_est"], *cfg["input"])).astype(np.float32)
    est_batches = [torch.from_numpy(data[i : i + 32]).to(device) for i in range(0, len(data), 32)]
    n = args.images
    x_n = torch.from_numpy(data[:n]).to(device)
    t_n = [i % cfg["classes"] for i in range(n)]

    bare_work = functools.partial(torch_bare_work, model, layer, cfg["feature"], device)
    head, tail = torch_split(model, cfg["layer"])
    floor_work = functools.partial(torch_floor_work, model, head, tail, device)

    def forward_all() -> None:
        with torch.no_grad():
            for b in est_batches:
                model(b)

    iba = IBA(layer)
    iba.estimate(model, est_batches, n_samples=len(data))
    readout = IBAReadout(cfg["layer"], cfg["readout"], model)
    readout.estimate(model, est_batches, n_samples=len(data))
    # One training step on two images: analyze refuses an untrained head, and its speed
    # does not depend on how well it is trained.
    readout.train(model, [(x_n[:2], torch.tensor(t_n[:2]))], epochs=1)

    results: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(device)}
    with torch.no_grad():
        results["logits"] = model(torch.from_numpy(data[:1]).to(device)).cpu().numpy().ravel()[:10].tolist()

    def closure(targets: list[int], samples: int = 10) -> Any:
        """The reference library's loss form: the model on each input's noisy copies."""
        tb = torch.tensor(targets, device=device).repeat_interleave(samples)
        return lambda batch: torch.nn.functional.cross_entropy(model(batch), tb)

    x1 = x_n[:1]
    if not args.memory_only:  # the first call of the process: any tracing or compiling
        t0 = time.perf_counter()
        iba.analyze(x1, target=t_n[:1], model=model)
        sync()
        results["first analyze 1"] = time.perf_counter() - t0
    runs = {
        "forward": forward_all,
        "estimate": lambda: iba.estimate(model, est_batches, n_samples=len(data)),
        "bare 1": lambda: bare_work(x1, t_n[:1]),
        "floor 1": lambda: floor_work(x1, t_n[:1]),
        "analyze 1": lambda: iba.analyze(x1, target=t_n[:1], model=model),
        "closure 1": lambda: iba.analyze(x1, closure(t_n[:1])),
        "bare+noise 1": lambda: bare_work(x1, t_n[:1], noise=True),
        f"bare {n}": lambda: bare_work(x_n, t_n),
        f"floor {n}": lambda: floor_work(x_n, t_n),
        f"analyze {n}": lambda: iba.analyze(x_n, target=t_n, model=model),
        "readout 1": lambda: readout.analyze(x1),
        f"readout {n}": lambda: readout.analyze(x_n),
    }
    timings = {} if args.memory_only else interleaved(runs, args.repeats, sync, run_groups(n))
    for key, fn in runs.items():
        if not args.memory_only:
            results[key] = timings[key]
        results[key + " peak MiB"] = torch_peak_mib(fn, device, sync)
    results["n_est"] = len(data)
    return results


@contextlib.contextmanager
def torch_frozen(model: Any) -> Iterator[None]:
    """The model's parameters without gradients inside; their flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def torch_bare_work(
    model: Any,
    layer: Any,
    feature: tuple[int, ...],
    device: Any,
    x: Any,
    targets: list[int],
    steps: int = 10,
    samples: int = 10,
    noise: bool = False,
) -> None:
    """What a per-sample bottleneck cannot avoid: masked forward, backward to the mask.

    ``noise=True`` also draws, each step, the standard noise for the copies at the
    bottleneck's shape (the closure form's floor: it cannot avoid the draw either)."""
    import torch

    xb = x.repeat_interleave(samples, dim=0)
    tb = torch.tensor(targets, device=device).repeat_interleave(samples)
    mask = torch.ones((len(x), 1, *feature), device=device, requires_grad=True)

    def hook(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
        return (out.reshape(len(x), samples, *out.shape[1:]) * mask).reshape(out.shape)

    handle = layer.register_forward_hook(hook)
    with torch_frozen(model):
        try:
            for _ in range(steps):
                if noise:
                    torch.randn((len(x) * samples, *feature), device=device)
                loss = torch.nn.functional.cross_entropy(model(xb), tb)
                (grad,) = torch.autograd.grad(loss, mask)
                with torch.no_grad():
                    mask -= 0.0 * grad
        finally:
            handle.remove()


def torch_floor_work(
    model: Any,
    head: Any,
    tail: Any,
    device: Any,
    x: Any,
    targets: list[int],
    steps: int = 10,
    samples: int = 10,
) -> None:
    """What the method cannot avoid: the layers before the bottleneck once, then per
    step the noise, the layers after it on the noisy copies and a backward pass to the
    mask."""
    import torch

    tb = torch.tensor(targets, device=device).repeat_interleave(samples)
    with torch_frozen(model):
        with torch.no_grad():
            feat = head(x).unsqueeze(1)  # (N, 1, C, H, W)
        mask = torch.ones_like(feat, requires_grad=True)
        for _ in range(steps):
            noise = torch.randn((len(x), samples, *feat.shape[2:]), device=device)
            z = (mask * feat + noise).flatten(0, 1)
            loss = torch.nn.functional.cross_entropy(tail(z), tb)
            (grad,) = torch.autograd.grad(loss, mask)
            with torch.no_grad():
                mask -= 0.0 * grad


def torch_peak_mib(fn: Callable[[], Any], device: Any, sync: Callable[[], None]) -> float:
    """The memory one call of ``fn`` takes at its peak, MiB: on a GPU the allocations over
    those before it, on a CPU the rise of resident memory."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakRSS() as peak:
        fn()
    return peak.value


# -- TensorFlow / Keras ------------------------------------------------------------------
def keras_model(cfg: dict[str, Any]) -> Any:
    import keras

    arch, weights = cfg["arch"], make_weights(cfg["arch"], cfg["classes"])
    convs = {n: (ci, co, k, s, p) for n, ci, co, k, s, p in conv_list(arch)}
    L = keras.layers
    pending: list[tuple[Any, str]] = []

    def conv(x: Any, name: str) -> Any:
        _, co, k, s, p = convs[name]
        if p:
            x = L.ZeroPadding2D(p, name=f"{name}_pad")(x)  # pads like PyTorch's padding=p
        layer = L.Conv2D(co, k, strides=s, name=name)
        pending.append((layer, name))
        return layer(x)

    c, h, w = cfg["input"]
    inputs = x = keras.Input((h, w, c))
    if arch == "small":
        for i, (name, *_rest) in enumerate(SMALL_CONVS, start=1):
            x = L.ReLU(name=f"relu{i}")(conv(x, name))
    else:
        x = L.ReLU(name="stem_relu")(conv(x, "stem"))
        # Zero padding before max pooling equals PyTorch's -inf padding after a ReLU.
        x = L.MaxPooling2D(3, 2, name="stem_pool")(L.ZeroPadding2D(1, name="stem_pool_pad")(x))
        for i in range(1, 5):
            for b in range(2):
                p = f"layer{i}.{b}"
                y = conv(L.ReLU(name=f"{p}.relu1")(conv(x, f"{p}.conv1")), f"{p}.conv2")
                short = conv(x, f"{p}.down") if f"{p}.down" in convs else x
                name = f"layer{i}" if b == 1 else f"{p}.out"
                x = L.ReLU(name=name)(L.Add(name=f"{p}.add")([y, short]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    fc = L.Dense(cfg["classes"], name="fc")
    model = keras.Model(inputs, fc(x), name=f"bench_{arch}")
    for layer, name in pending:
        kernel, bias = weights[name]
        layer.set_weights([kernel.transpose(2, 3, 1, 0), bias])
    fc.set_weights([weights["fc"][0].T.copy(), weights["fc"][1]])
    return model


def tf_worker(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from iba_tf import IBACopy, IBAReadout

    gpu = bool(tf.config.list_physical_devices("GPU")) and args.device != "cpu"
    model = keras_model(cfg)
    rng = np.random.default_rng(1)
    data_cf = rng.standard_normal((cfg["n_est"], *cfg["input"])).astype(np.float32)
    data = np.ascontiguousarray(data_cf.transpose(0, 2, 3, 1))  # the same images, channels last
    n = args.images
    x_n = tf.constant(data[:n])
    t_n = [i % cfg["classes"] for i in range(n)]
    layer = model.get_layer(cfg["layer"])

    bare_work = functools.partial(tf_bare_work, model, layer, cfg["classes"], cfg["feature"])

    # The network is functional, so the layers before and after the bottleneck are
    # sub-models between its input, the layer's output and its output.  Both run as
    # ``tf.function``s, as ``IBACopy``'s step does (the first call of each input size
    # traces; the warm-up call of the timing takes it).
    head = keras.Model(model.input, layer.output)
    tail = keras.Model(layer.output, model.output)
    samples = 10
    head_fn = tf.function(lambda x: head(x, training=False), autograph=False)

    def floor_step(feat: Any, mask: Any, onehot: Any) -> Any:
        noise = tf.random.normal((feat.shape[0], samples, *feat.shape[2:]))
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(mask)
            z = tf.reshape(mask * feat + noise, (-1, *feat.shape[2:]))
            logits = tail(z, training=False)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))
        return mask - 0.0 * tape.gradient(loss, mask)

    floor_step_fn = tf.function(floor_step, autograph=False)

    def floor_work(x: Any, targets: list[int], steps: int = 10) -> None:
        """What the method cannot avoid: the layers before the bottleneck once, then per
        step the noise, the layers after it on the noisy copies and a backward pass to the
        mask."""
        onehot = tf.one_hot(np.repeat(targets, samples), cfg["classes"])
        feat = head_fn(x)[:, None]  # (N, 1, H, W, C)
        mask = tf.ones_like(feat)
        for _ in range(steps):
            mask = floor_step_fn(feat, mask, onehot)

    def forward_all() -> None:
        for i in range(0, len(data), 32):
            model(data[i : i + 32], training=False)

    iba = IBACopy(model, cfg["layer"])
    iba.estimate(data, n_samples=len(data), batch_size=32)
    readout = IBAReadout(cfg["layer"], cfg["readout"], model)
    readout.estimate(data, n_samples=len(data), batch_size=32)
    readout.fit(data[:2], np.asarray(t_n[:2]), batch_size=2, epochs=1, compile=False)

    results: dict[str, Any] = {
        "device": "GPU" if gpu else "CPU",
        "threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }
    results["logits"] = np.asarray(model(data[:1], training=False)).ravel()[:10].tolist()

    tf_device = "GPU:0" if gpu else "CPU:0"

    x1 = x_n[:1]
    t0 = time.perf_counter()  # the first call of the process: tracing the step included
    iba.analyze(x1, target=t_n[:1])
    results["first analyze 1"] = time.perf_counter() - t0
    runs = {
        "forward": forward_all,
        "estimate": lambda: iba.estimate(data, n_samples=len(data), batch_size=32),
        "bare 1": lambda: bare_work(x1, t_n[:1]),
        "floor 1": lambda: floor_work(x1, t_n[:1]),
        "analyze 1": lambda: iba.analyze(x1, target=t_n[:1]),
        f"bare {n}": lambda: bare_work(x_n, t_n),
        f"floor {n}": lambda: floor_work(x_n, t_n),
        f"analyze {n}": lambda: iba.analyze(x_n, target=t_n),
        "readout 1": lambda: readout.analyze(x1),
        f"readout {n}": lambda: readout.analyze(x_n),
    }
    timings = interleaved(runs, args.repeats, groups=run_groups(n))
    for key, fn in runs.items():
        results[key] = timings[key]
        results[key + " peak MiB"] = tf_peak_mib(fn, tf_device)
    results["n_est"] = len(data)
    return results


def tf_bare_work(
    model: Any,
    layer: Any,
    classes: int,
    feature: tuple[int, int, int],
    x: Any,
    targets: list[int],
    steps: int = 10,
    samples: int = 10,
) -> None:
    """What a per-sample bottleneck cannot avoid: masked forward, backward to the mask."""
    import tensorflow as tf

    xb = tf.repeat(x, samples, axis=0)
    onehot = tf.one_hot(np.repeat(targets, samples), classes)
    c, h, w = feature
    mask = tf.ones((len(targets), 1, h, w, c))
    current = [mask]
    original = layer.call

    def masked_call(*a: Any, **k: Any) -> Any:
        out = original(*a, **k)
        m = current[0]
        return tf.reshape(tf.reshape(out, (m.shape[0], samples, *out.shape[1:])) * m, tf.shape(out))

    layer.call = masked_call
    try:
        for _ in range(steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(mask)
                current[0] = mask
                logits = model(xb, training=False)
                loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))
            grad = tape.gradient(loss, mask)
            mask = mask - 0.0 * grad
    finally:
        del layer.call


def tf_peak_mib(fn: Callable[[], Any], tf_device: str) -> float:
    """The memory one call of ``fn`` takes at its peak, MiB: TensorFlow's own count on the
    device, or the rise of resident memory where it keeps none."""
    import tensorflow as tf

    try:  # TensorFlow's allocator keeps freed memory, so RSS would not show the peak.
        tf.config.experimental.reset_memory_stats(tf_device)
        base = tf.config.experimental.get_memory_info(tf_device)["current"]
        fn()
        peak = tf.config.experimental.get_memory_info(tf_device)["peak"]
        return (peak - base) / 2**20
    except (ValueError, RuntimeError, tf.errors.OpError):
        with PeakRSS() as rss:
            fn()
        return rss.value


# -- JAX / Flax NNX (the iba-jax plugin) ------------------------------------------------
def flax_model(cfg: dict[str, Any]) -> Any:
    """The small network in Flax NNX, channels-last; layers are named submodules."""
    import jax.numpy as jnp
    from flax import nnx

    if cfg["arch"] != "small":
        raise SystemExit("the JAX column covers the small network only")
    weights = make_weights(cfg["arch"], cfg["classes"])

    class ReLU(nnx.Module):
        def __call__(self, x: Any) -> Any:
            return nnx.relu(x)

    class Small(nnx.Module):
        def __init__(self) -> None:
            rngs = nnx.Rngs(0)
            for i, (name, c_in, c_out, stride) in enumerate(SMALL_CONVS, start=1):
                conv = nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding=1, rngs=rngs)
                conv.kernel.set_value(jnp.asarray(weights[name][0].transpose(2, 3, 1, 0)))
                conv.bias.set_value(jnp.asarray(weights[name][1]))
                setattr(self, name, conv)
                setattr(self, f"relu{i}", ReLU())
            self.fc = nnx.Linear(SMALL_CONVS[-1][2], cfg["classes"], rngs=rngs)
            self.fc.kernel.set_value(jnp.asarray(weights["fc"][0].T))
            self.fc.bias.set_value(jnp.asarray(weights["fc"][1]))

        def head(self, x: Any) -> Any:
            """The layers up to and including the bottleneck layer ``relu3``."""
            for i, (name, *_rest) in enumerate(SMALL_CONVS[:3], start=1):
                x = getattr(self, f"relu{i}")(getattr(self, name)(x))
            return x

        def tail(self, x: Any) -> Any:
            return self.fc(self.relu4(self.conv4(x)).mean(axis=(1, 2)))

        def __call__(self, x: Any) -> Any:
            return self.tail(self.head(x))

    return Small()


def jax_reference_work(model: Any, samples: int = 10) -> dict[str, Any]:
    """What a JAX user writes by hand for the bare work, the floor and a forward pass:
    jitted steps with the weights as arguments (``nnx.split``)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graph, state = nnx.split(model)

    def ce(logits: Any, targets: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def bare_step(state: Any, mask: Any, xb: Any, tb: Any) -> Any:
        def loss(mask: Any) -> Any:
            m = nnx.merge(graph, state)
            f = m.head(xb)
            f = (f.reshape(mask.shape[0], samples, *f.shape[1:]) * mask).reshape(f.shape)
            return ce(m.tail(f), tb)

        return mask - 0.0 * jax.grad(loss)(mask)

    head = jax.jit(lambda state, x: nnx.merge(graph, state).head(x))

    def bare_work(x: Any, targets: list[int], steps: int = 10) -> None:
        """Masked forward on the N * 10 copies and backward to the mask."""
        xb, tb = jnp.repeat(x, samples, axis=0), jnp.repeat(jnp.asarray(targets), samples)
        mask = jnp.ones((len(targets), 1, *head(state, x[:1]).shape[1:]))
        for _ in range(steps):
            mask = bare_step(state, mask, xb, tb)
        mask.block_until_ready()

    @jax.jit
    def floor_step(state: Any, feat: Any, mask: Any, tb: Any, key: Any) -> Any:
        key, sub = jax.random.split(key)
        noise = jax.random.normal(sub, (feat.shape[0], samples, *feat.shape[2:]))

        def loss(mask: Any) -> Any:
            z = (mask * feat + noise).reshape(-1, *feat.shape[2:])
            return ce(nnx.merge(graph, state).tail(z), tb)

        return mask - 0.0 * jax.grad(loss)(mask), key

    def floor_work(x: Any, targets: list[int], steps: int = 10) -> None:
        """The layers before the bottleneck once, then per step the noise, the layers
        after it and a backward pass to the mask."""
        tb = jnp.repeat(jnp.asarray(targets), samples)
        feat = head(state, x)[:, None]
        mask, key = jnp.ones_like(feat), jax.random.key(0)
        for _ in range(steps):
            mask, key = floor_step(state, feat, mask, tb, key)
        mask.block_until_ready()

    forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x))

    return {
        "bare": bare_work,
        "floor": floor_work,
        "forward": lambda x: forward(state, x).block_until_ready(),
    }


def jax_closure(model: Any, targets: list[int], samples: int = 10) -> Any:
    """The reference library's loss form: the model on each input's noisy copies."""
    import jax.numpy as jnp
    import optax

    tb = jnp.repeat(jnp.asarray(targets), samples)
    return lambda batch: optax.softmax_cross_entropy_with_integer_labels(model(batch), tb).mean()


def jax_worker(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from iba_core import IBA

    if args.device != "cpu":
        jax.config.update("jax_platforms", "cuda" if args.device.startswith("cuda") else args.device)
    model = flax_model(cfg)
    work = jax_reference_work(model)
    rng = np.random.default_rng(1)
    data_cf = rng.standard_normal((cfg["n_est"], *cfg["input"])).astype(np.float32)
    data = np.ascontiguousarray(data_cf.transpose(0, 2, 3, 1))  # the same images, channels last
    n = args.images
    x_n, x1 = jnp.asarray(data[:n]), jnp.asarray(data[:1])
    t_n = [i % cfg["classes"] for i in range(n)]
    results: dict[str, Any] = {"device": str(jax.devices()[0]).split(":")[0], "threads": os.cpu_count()}
    iba = IBA(model, cfg["layer"])
    iba.estimate(data, n_samples=len(data), batch_size=32)
    t0 = time.perf_counter()  # the first call of the process: tracing and compiling included
    iba.analyze(x1, target=t_n[:1])
    results["first analyze 1"] = time.perf_counter() - t0
    results["logits"] = np.asarray(model(x1)).ravel()[:10].tolist()
    runs = {
        "forward": lambda: [work["forward"](data[i : i + 32]) for i in range(0, len(data), 32)],
        "estimate": lambda: iba.estimate(data, n_samples=len(data), batch_size=32),
        "bare 1": lambda: work["bare"](x1, t_n[:1]),
        "floor 1": lambda: work["floor"](x1, t_n[:1]),
        "analyze 1": lambda: iba.analyze(x1, target=t_n[:1]),
        "closure 1": lambda: iba.analyze(x1, loss=jax_closure(model, t_n[:1])),
        f"bare {n}": lambda: work["bare"](x_n, t_n),
        f"floor {n}": lambda: work["floor"](x_n, t_n),
        f"analyze {n}": lambda: iba.analyze(x_n, target=t_n),
    }
    groups = [tuple(k for k in g if k in runs) for g in run_groups(n)]  # no readout column
    results.update(interleaved(runs, args.repeats, jax.effects_barrier, [g for g in groups if g]))
    for key, fn in runs.items():  # resident memory, as for PyTorch on a CPU
        with PeakRSS() as peak:
            fn()
        results[key + " peak MiB"] = peak.value
    results["n_est"] = len(data)
    return results


WORKERS = {"torch": torch_worker, "tf": tf_worker, "jax": jax_worker}
BACKEND_NAMES = {"torch": "PyTorch", "tf": "TensorFlow", "jax": "JAX"}


# -- driver ------------------------------------------------------------------------------
def run_worker(backend: str, config: str, args: argparse.Namespace) -> dict[str, Any] | str:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        backend,
        "--configs",
        config,
        "--repeats",
        str(args.repeats),
        "--images",
        str(args.images),
        "--device",
        args.device,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = _worker_json(cmd, env)
    if backend == "torch" and not isinstance(result, str) and result.get("device") == "cpu":
        # Memory in a second pass with every large block mmap-ed, so that freed memory goes
        # back to the system and the resident high-water mark shows each peak (glibc would
        # otherwise reuse freed heap memory).  Timings stay from the default allocator.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        memory = _worker_json([*cmd, "--memory-only"], env)
        if not isinstance(memory, str):
            result.update({k: v for k, v in memory.items() if k.endswith("peak MiB")})
    return result


def _worker_json(cmd: list[str], env: dict[str, str]) -> dict[str, Any] | str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return f"failed (exit {proc.returncode}): " + " | ".join(tail)
    return json.loads(lines[-1])


def available(backend: str) -> bool:
    import importlib.util

    module = {"torch": "torch", "tf": "tensorflow", "jax": "iba_jax"}[backend]  # jax: the plugin
    return importlib.util.find_spec(module) is not None


def fmt_s(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.0f}")


def fmt_x(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or a == 0:  # a peak of 0: nothing measurable
        return "n/a"
    return f"{a / b:.2f}x" if a / b >= 0.1 else f"{a / b:.3f}x"


def fmt_mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def report(config: str, results: dict[str, dict[str, Any]], n: int, markdown: bool) -> list[dict]:
    """Print one configuration's table; return its CSV rows."""
    cfg = CONFIGS[config]
    backends = list(results)
    rows: list[list[str]] = []
    csv_rows: list[dict[str, Any]] = []
    # (label, key, reference, ratio only): a ratio-only row repeats a measurement against
    # another reference and shows the ratio alone.
    measurements = [
        ("bare forward+backward work, 1 image", "bare 1", None, False),
        ("floor, 1 image", "floor 1", "bare 1", False),
        ("IBA analyze, 1 image", "analyze 1", "bare 1", False),
        ("  IBA analyze / floor, 1 image", "analyze 1", "floor 1", True),
        ("IBA closure form (copies at the input), 1 image", "closure 1", "bare 1", False),
        ("bare work + the noise draw, 1 image", "bare+noise 1", "bare 1", False),
        ("  IBA closure form / (bare work + noise), 1 image", "closure 1", "bare+noise 1", True),
        ("first analyze call of the process, 1 image", "first analyze 1", "analyze 1", False),
        (f"bare forward+backward work, {n} images", f"bare {n}", None, False),
        (f"floor, {n} images", f"floor {n}", f"bare {n}", False),
        (f"IBA analyze, {n} images (one call)", f"analyze {n}", f"bare {n}", False),
        (f"  IBA analyze / floor, {n} images", f"analyze {n}", f"floor {n}", True),
        (f"  floor, {n} images / {n} single floors", f"floor {n}", f"{n} x floor 1", True),
        (f"  one call / {n} single calls, {n} images", f"analyze {n}", f"{n} x analyze 1", True),
        (f"  best floor of {n} images / {n} single calls", f"best floor {n}", f"{n} x analyze 1", True),
        (f"  peak memory, {n} images / 1 image", f"analyze {n} peak MiB", "analyze 1 peak MiB", True),
        ("Readout analyze, 1 image", "readout 1", "analyze 1", False),
        (f"Readout analyze, {n} images", f"readout {n}", f"analyze {n}", False),
        ("bare forward pass, estimate images", "forward", None, False),
        ("IBA estimate, same images", "estimate", "forward", False),
    ]
    for r in results.values():  # n single calls of one image each, from the 1-image time
        r.update({f"{n} x {w} 1": n * r[f"{w} 1"] for w in ("analyze", "floor") if r.get(f"{w} 1")})
        # The least unavoidable work for n images: in one batch or image by image; one
        # call on n images cannot take less, whatever its passes.
        floors = [r[k] for k in (f"floor {n}", f"{n} x floor 1") if r.get(k)]
        if floors:
            r[f"best floor {n}"] = min(floors)
    for label, key, ref, ratio_only in measurements:
        cells = [label]
        for b in backends:
            r = results[b]
            v, base = r.get(key), r.get(ref) if ref else None
            peak = None if ratio_only else r.get(key + " peak MiB")
            cells += [
                "" if ratio_only else fmt_s(v),
                fmt_x(v, base) if ref else "",
                "" if ratio_only else fmt_mib(peak),
            ]
            csv_rows.append(
                {
                    "config": config,
                    "backend": b,
                    "measurement": label.strip(),
                    "seconds": v,
                    "reference": ref or "",
                    "ratio": (v / base) if v and base else "",
                    "peak_mib": "" if peak is None else peak,
                }
            )
        for other in backends[1:]:  # each other backend against the first
            a, c = results[backends[0]].get(key), results[other].get(key)
            cells.append("" if ratio_only else fmt_x(c, a))
        rows.append(cells)
    # Throughput line (images per second).
    cells = ["estimate throughput (images/s)"]
    for b in backends:
        r = results[b]
        fw, es = r.get("forward"), r.get("estimate")
        cells += [f"{r['n_est'] / es:.0f}" if es else "n/a", f"fwd {r['n_est'] / fw:.0f}" if fw else "", ""]
    cells += [""] * (len(backends) - 1)
    rows.append(cells)
    headers = ["measurement"]
    for b in backends:
        name = BACKEND_NAMES[b]
        headers += [f"{name} s", "ratio", "peak MiB"]
    headers += [f"{BACKEND_NAMES[b]}/{BACKEND_NAMES[backends[0]]}" for b in backends[1:]]
    c, h, w = cfg["input"]
    fc, fh, fw_ = cfg["feature"]
    print(
        f"-- {config}: {c}x{h}x{w} input, bottleneck '{cfg['layer']}' {fc}x{fh}x{fw_}, "
        f"{cfg['classes']} classes; 10 steps x 10 samples; "
        + ", ".join(
            f"{BACKEND_NAMES[b]} on {results[b].get('device', '?')} "
            f"({results[b].get('threads', '?')} threads)"
            for b in backends
        )
    )
    print(
        "ratio: IBA / bare work, floor / bare work, IBA / floor (rows so named), "
        "Readout / per-sample IBA, estimate / bare forward; "
        "peak MiB: extra resident (or GPU) memory of that measurement"
    )
    print(format_table(headers, rows, markdown=markdown))
    summary = []
    for b in backends:
        r = results[b]
        parts = [
            f"{fmt_x(r.get(f'analyze {k}'), r.get(f'floor {k}'))} ({k} image{'s' if k != 1 else ''})"
            for k in dict.fromkeys([1, n])
        ]
        summary.append(f"{BACKEND_NAMES[b]} " + ", ".join(parts))
    print("IBA analyze / floor: " + "; ".join(summary))
    for other in backends[1:]:
        la, lb = (np.asarray(results[b]["logits"]) for b in (backends[0], other))
        print(
            f"same function check: max |logit difference| {BACKEND_NAMES[other]} - "
            f"{BACKEND_NAMES[backends[0]]} {np.max(np.abs(la - lb)):.2e}"
        )
    print()
    return csv_rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (small network)")
    parser.add_argument(
        "--full", action="store_true", help="add the ResNet-style 224x224 network (slow on a CPU)"
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated networks among {list(CONFIGS)} "
        "(default: small; with --full: small,resnet,resnet3)",
    )
    parser.add_argument("--backends", default="torch,tf,jax", help="jax: the iba-jax plugin, if installed")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--images", type=int, default=16, help="images of the batched measurement")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--csv-dir", type=Path, default=DEFAULT_CSV_DIR)
    parser.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def worker_main(args: argparse.Namespace, config: str) -> None:
    """In a worker process: measure one backend on one network, print the results as JSON."""
    if args.device == "auto":
        args.device = "cpu"
        if args.worker == "torch":
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = WORKERS[args.worker](CONFIGS[config], args)
    print(json.dumps(out))


def measure_config(config: str, backends: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each backend's results on one network, from a worker process each (failures printed)."""
    results: dict[str, dict[str, Any]] = {}
    for b in backends:
        t0 = time.perf_counter()
        # The 224 px network gets fewer repeats: each analyze takes seconds on a CPU.
        saved = args.repeats
        if CONFIGS[config]["arch"] != "small":
            args.repeats = min(args.repeats, 2 if not args.quick else 1)
        r = run_worker(b, config, args)
        args.repeats = saved
        if isinstance(r, str):
            print(f"{BACKEND_NAMES[b]} on {config}: {r}")
            continue
        print(f"({BACKEND_NAMES[b]} on {config}: {time.perf_counter() - t0:.0f} s)")
        results[b] = r
    return results


def main() -> None:
    args = parse_args()
    warnings.simplefilter("ignore")

    default = ["small", "resnet", "resnet3"] if args.full else ["small"]
    configs = args.configs.split(",") if args.configs else default
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown network(s) {unknown}; choose among {list(CONFIGS)}")

    if args.worker:
        worker_main(args, configs[0])
        return

    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    backends = [b for b in args.backends.split(",") if b]
    missing = [b for b in backends if b not in WORKERS or not available(b)]
    backends = [b for b in backends if b not in missing]
    info = print_header("speed: IBA against the bare work, per backend")
    if missing:
        print(f"skipped (not installed or unknown): {missing}\n")
    all_rows = []
    for config in configs:
        results = measure_config(config, backends, args)
        if results:
            all_rows += report(config, results, args.images, args.markdown)
    rows = [{**r, "date": info["date"], "load": info["load average (1/5/15 min)"]} for r in all_rows]
    if rows:
        print(f"CSV: {write_csv(args.csv_dir / 'speed.csv', rows)}")


if __name__ == "__main__":
    main()
