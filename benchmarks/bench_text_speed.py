"""Speed of IBA on a transformer: one ``analyze`` call against the floor of the method.

The network is the text demo architecture (``iba_torch._text.TextTransformer``: token +
position embedding, pre-norm blocks, mean pooling) at ``--layers`` 4 and ``--width`` 256
(4 heads, MLP 4 x width, vocabulary 1000), random weights (speed does not depend on
them).  ``--n`` 32 sequences of ``--length`` 128 real tokens are explained in one call,
the bottleneck on the embeddings' output ``(N, T, D)`` (channels-last), with an
all-ones ``attention_mask``, reference settings (10 steps, 10 noisy copies).

The *floor* is the work the method cannot avoid (as in ``bench_speed.py``): the layers
before the bottleneck once per sequence; then, for each of the 10 steps, standard-normal
noise for the ``N x 10`` noisy copies of the features, the layers after the bottleneck
on ``mask * features + noise``, the mean target cross-entropy and a backward pass to the
mask only.  Both are timed in alternation (``--repeats`` each, after one warm-up), so a
change of load on a shared machine hits them alike; the ratio ``analyze / floor`` is
printed (goal: at most 1.5).

Run: ``python benchmarks/bench_text_speed.py [--quick] [--device cuda] [--threads 2]``
(``--quick``: 4 sequences of 32 tokens, 2 layers of width 64; to check that
it works).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from _common import format_table, print_header

from iba_core import FewSamplesWarning
from iba_torch import IBA
from iba_torch._text import PAD_ID, TextTransformer

warnings.simplefilter("ignore", FewSamplesWarning)


def make_model(width: int, layers: int, length: int, device: torch.device) -> TextTransformer:
    torch.manual_seed(0)
    model = TextTransformer(
        vocab=1000, max_length=length, width=width, layers=layers, heads=4, mlp=4 * width, classes=4
    )
    return model.to(device).eval()


def floor_work(
    model: TextTransformer, ids: torch.Tensor, targets: torch.Tensor, steps: int = 10, samples: int = 10
) -> None:
    """The layers before the bottleneck once, then per step: noise, the layers after it on
    the noisy copies, the target cross-entropy and a backward pass to the mask only."""
    tb = targets.repeat_interleave(samples)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            feat = model.embeddings(ids).unsqueeze(1)  # (N, 1, T, D)
        pad = (ids == PAD_ID).repeat_interleave(samples, dim=0)
        mask = torch.ones_like(feat, requires_grad=True)
        for _ in range(steps):
            noise = torch.randn((len(ids), samples, *feat.shape[2:]), device=ids.device)
            x = (mask * feat + noise).flatten(0, 1)
            for block in model.blocks:
                x = block(x, pad)
            loss = torch.nn.functional.cross_entropy(model.pool(model.norm(x), pad), tb)
            (grad,) = torch.autograd.grad(loss, mask)
            with torch.no_grad():
                mask -= 0.0 * grad
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.n, args.length, args.width, args.layers = 4, 32, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    print_header("IBA on a transformer: analyze vs the floor")
    model = make_model(args.width, args.layers, args.length, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (args.n, args.length), generator=gen).to(device)
    targets = torch.arange(args.n, device=device) % 4
    mask = torch.ones(args.n, args.length, dtype=torch.int64)
    est = [torch.randint(1, 1000, (64, args.length), generator=gen).to(device) for _ in range(4)]

    iba = IBA(model.embeddings, layout="channels_last", sigma=None)
    iba.estimate(model, est, n_samples=256)

    runs = {
        "floor": lambda: floor_work(model, ids, targets),
        "analyze": lambda: iba.analyze(ids, target=targets, model=model, attention_mask=mask),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
        sync()
    for _ in range(args.repeats):
        for key, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.n} sequences x {args.length} tokens, {args.layers} layers of width {args.width}, "
        f"bottleneck at embeddings ({args.length}x{args.width}), 10 steps x 10 copies, "
        f"{args.repeats} repeat(s), device {device}, {torch.get_num_threads()} thread(s)\n"
    )
    rows: list[list[Any]] = [[k, f"{med[k]:.3f}", f"{med[k] / med['floor']:.2f}"] for k in runs]
    print(format_table(["run", "median s", "x floor"], rows))
    print(f"\nIBA analyze / floor: {med['analyze'] / med['floor']:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
