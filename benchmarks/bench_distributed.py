"""Data-parallel throughput: images explained (and estimated) per second by 1, 2, ... processes.

Each run starts ``K`` fresh processes with ``torch.multiprocessing`` (one is a plain process,
several form a ``torch.distributed`` group: gloo on the CPU, NCCL with one GPU per process
on ``--device cuda``), each limited to ``--threads`` intra-op threads.  Every process gets
the same images and calls the ordinary API, ``IBA.estimate`` and ``IBA.analyze``, which
share the work out and gather the result (see ``iba_core.engines._distributed``); the
time is rank 0's wall time from a barrier to the gathered maps, after one warm-up call.
The maps of every run are checked against the single process's (bitwise with NumPy noise
on the CPU).  Goal on the CPU: 2 processes with 1 thread each >= 1.7x one process.

Run: ``python benchmarks/bench_distributed.py [--processes 1 2] [--images 64] [--device cuda]``
(``--quick``: a few images and steps, to check that it runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, print_header


def _worker(rank: int, world: int, folder: str, opts: dict) -> None:
    import torch
    import torch.distributed as dist
    from bench_torch import make_model

    from iba_core import FewSamplesWarning
    from iba_torch import IBA

    warnings.simplefilter("ignore", FewSamplesWarning)
    torch.set_num_threads(opts["threads"])
    cuda = opts["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )
    try:
        rng = np.random.default_rng(0)
        images = torch.as_tensor(rng.normal(size=(opts["images"], 3, 64, 64)), dtype=torch.float32)
        data = torch.as_tensor(rng.normal(size=(opts["estimate"], 3, 64, 64)), dtype=torch.float32)
        model = make_model().to(device)  # the speed benchmarks' CNN; layer '5': 128x16x16
        images, data = images.to(device), data.to(device)
        iba = IBA(model, "5")
        batches = [data[i : i + 32] for i in range(0, len(data), 32)]
        # Data-parallel work is asked for (a process group alone changes nothing).
        parallel = {"distributed": True} if world > 1 else {}
        kw = dict(target="predicted", noise="numpy", optimization_steps=opts["steps"], **parallel)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()
            if world > 1:
                dist.barrier()

        iba.estimate(model, batches[:2], n_samples=64, **parallel)  # warm-up
        sync()
        t0 = time.perf_counter()
        iba.estimate(model, batches, n_samples=len(data), **parallel)
        sync()
        t_est = time.perf_counter() - t0
        iba.analyze(images[: 2 * world * 3], seed=1, **kw)  # warm-up
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        maps = iba.analyze(images, seed=0, **kw)
        cpu = time.process_time() - c0
        sync()
        t_explain = time.perf_counter() - t0
        with open(os.path.join(folder, f"cpu{rank}.json"), "w") as fh:
            json.dump(cpu, fh)
        if rank == 0:
            np.save(os.path.join(folder, "maps.npy"), maps)
            with open(os.path.join(folder, "times.json"), "w") as fh:
                json.dump({"estimate": t_est, "explain": t_explain}, fh)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(world: int, opts: dict) -> tuple[dict, np.ndarray]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, folder, opts), nprocs=world, join=True)
        with open(os.path.join(folder, "times.json")) as fh:
            times = json.load(fh)
        times["cpu"] = 0.0
        for rank in range(world):
            with open(os.path.join(folder, f"cpu{rank}.json")) as fh:
                times["cpu"] += json.load(fh)
        return times, np.load(os.path.join(folder, "maps.npy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument(
        "--images",
        type=int,
        default=120,
        help="images explained (default 120: the inputs are shared out in units of one CPU pass, "
        "30 images, so 120 give each of 1, 2 or 4 processes the same work)",
    )
    parser.add_argument("--estimate", type=int, default=512, help="images estimated on (default 512)")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps (default 10)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="a few images and steps: does it run?")
    args = parser.parse_args()
    if args.quick:
        args.images, args.estimate, args.steps = 12, 128, 2
    import torch

    if args.device == "cuda":
        available = torch.cuda.device_count()
        args.processes = [k for k in args.processes if k <= available] or [1]
    opts = dict(
        threads=args.threads, images=args.images, estimate=args.estimate, steps=args.steps, device=args.device
    )
    print_header("data-parallel throughput (torch.distributed)")
    rows, base, ref = [], None, None
    for k in args.processes:
        times, maps = run(k, opts)
        explain = args.images / times["explain"]
        estimate = args.estimate / times["estimate"]
        if base is None:
            base, ref = explain, maps
        same = "bitwise" if np.array_equal(maps, ref) else f"max diff {np.abs(maps - ref).max():.2g}"
        rows.append(
            [
                k,
                args.threads,
                args.device,
                f"{explain:.2f}",
                f"{explain / base:.2f}x",
                f"{1000 * times['cpu'] / args.images:.0f}",
                f"{estimate:.1f}",
                same,
            ]
        )
    print(
        format_table(
            [
                "processes",
                "threads each",
                "device",
                "explain images/s",
                "speed-up",
                "CPU ms/image (all)",
                "estimate images/s",
                "maps vs 1 process",
            ],
            rows,
        )
    )
    print(f"\n{args.images} images 3x64x64, bottleneck 128x16x16, {args.steps} steps, batch_size 10")
    print(
        "CPU ms/image (all): the explanation's CPU time summed over the processes, per image; "
        "the same for 1 and K processes when no work is repeated (on a busy machine the "
        "speed-up is bounded by the free cores; this is not)"
    )


if __name__ == "__main__":
    main()
