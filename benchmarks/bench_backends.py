"""Backend against backend with the machine's drift taken out: ``analyze`` time of each
backend over PyTorch's on the same network, weights, inputs and settings.

``bench_speed.py`` measures each backend once, in one worker process after another, so its
cross-backend columns carry the drift of a shared machine between workers (10-20 % on
this 2-core VM).  Here short workers alternate: in each round PyTorch, then every other
backend, each alone in a fresh process (its own thread pools, as a user runs it) timing
``--calls`` explanations after its first (tracing, compiling); the figure is the median
over rounds of ``backend time / PyTorch time`` of the same round, with its range.  Each
backend keeps its defaults (PyTorch op by op, TensorFlow and JAX compiled).

Run: ``python benchmarks/bench_backends.py [--quick] [--backends tf,jax] [--images 1,16] [--rounds 5]``
(the small network of ``bench_speed.py``; JAX needs the ``iba-jax`` plugin).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import bench_speed as bs
import numpy as np
from _common import format_table, print_header


def explainers(backends: list[str], n_est: int = 64) -> dict[str, Callable[[int], Any]]:
    """``{name: analyze(n)}`` for PyTorch and ``backends``: ``n`` images of the same data,
    the bottleneck after ``relu3`` of the same network, estimated on the same images."""
    cfg = bs.CONFIGS["small"]
    data = np.random.default_rng(1).standard_normal((n_est, *cfg["input"])).astype(np.float32)
    last = np.ascontiguousarray(data.transpose(0, 2, 3, 1))  # channels last for Keras and Flax
    targets = [i % cfg["classes"] for i in range(n_est)]
    out: dict[str, Callable[[int], Any]] = {}

    import torch

    from iba_torch import IBA

    model = bs.torch_model(cfg)
    iba = IBA(model.get_submodule(cfg["layer"]))
    iba.estimate(model, [torch.from_numpy(data[i : i + 32]) for i in range(0, n_est, 32)], n_samples=n_est)
    out["torch"] = lambda n: iba.analyze(torch.from_numpy(data[:n]), target=targets[:n], model=model)
    if "tf" in backends:
        from iba_tf import IBACopy

        keras_iba = IBACopy(bs.keras_model(cfg), cfg["layer"])
        keras_iba.estimate(last, n_samples=n_est, batch_size=32)
        out["tf"] = lambda n: keras_iba.analyze(last[:n], target=targets[:n])
    if "jax" in backends:
        import jax.numpy as jnp

        import iba_core

        flax_iba = iba_core.IBA(bs.flax_model(cfg), cfg["layer"])
        flax_iba.estimate([jnp.asarray(last[i : i + 32]) for i in range(0, n_est, 32)], n_samples=n_est)
        out["jax"] = lambda n: np.asarray(flax_iba.analyze(jnp.asarray(last[:n]), target=targets[:n]))
    return out


def worker(name: str, n: int, calls: int) -> None:
    """Print the median seconds of ``calls`` explanations of ``n`` images by ``name``."""
    import warnings

    from iba_core import FewSamplesWarning

    warnings.simplefilter("ignore", FewSamplesWarning)
    fn = explainers([name])[name]
    fn(n)  # the first call: tracing and compiling
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": statistics.median(times)}))


def measure(name: str, n: int, calls: int) -> float:
    cmd = [sys.executable, __file__, "--worker", name, "--images", str(n), "--calls", str(calls)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tf,jax", help="compared with PyTorch: tf, jax")
    parser.add_argument("--images", default="1,16", help="images per call, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="explanations per worker (1 image)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 calls, 1 image")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.rounds, args.calls, args.images = 2, 5, "1"
    if args.worker:
        worker(args.worker, int(args.images), args.calls)
        return
    backends = [b for b in args.backends.split(",") if b and b != "torch" and bs.available(b)]
    print_header("backends against PyTorch, alternating workers")
    rows = []
    for n in (int(k) for k in args.images.split(",")):
        calls = max(3, args.calls // n)
        seconds: dict[str, list[float]] = {name: [] for name in ("torch", *backends)}
        for _ in range(args.rounds):
            for name in seconds:
                seconds[name].append(measure(name, n, calls))
        for name in backends:
            ratios = [a / b for a, b in zip(seconds[name], seconds["torch"], strict=True)]
            rows.append(
                [
                    f"{n} image{'s' if n > 1 else ''}",
                    name,
                    f"{statistics.median(seconds[name]) * 1e3:.1f}",
                    f"{statistics.median(seconds['torch']) * 1e3:.1f}",
                    f"{statistics.median(ratios):.2f}x",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                ]
            )
    headers = ["images", "backend", "backend ms", "PyTorch ms", "backend / PyTorch", "range over rounds"]
    print(format_table(headers, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
