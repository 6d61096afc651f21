"""PyTorch backend speed: ``analyze`` against the bare work it needs.

The bare work is what a straightforward per-sample bottleneck does: ``optimization_steps``
forward passes of the model on ``batch_size`` copies of the input with a multiplicative
mask on the feature map, and a backward pass to that mask only.  ``analyze(target=...)``
makes the noisy copies at the bottleneck layer instead, so the layers before it run on
one copy (see ``copies`` in ``Bottleneck.optimize``) and it can undercut the bare work;
a ``model_loss_fn`` closure gets ``batch_size`` copies of the input as in the reference
library, so its ratio shows IBA's own cost (noise, mask smoothing, capacity, Adam, hooks)
on top of the full bare work.  All are timed in the same run, alternating, and the
median of several repeats is reported.

Run: ``python benchmarks/bench_torch.py [--repeats 7] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from iba_core import FewSamplesWarning
from iba_torch import IBA

warnings.simplefilter("ignore", FewSamplesWarning)


def make_model() -> nn.Sequential:
    """3x64x64 -> ... -> 128x16x16 (the bottleneck, layer 'conv3') -> 10 logits."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2),
        nn.ReLU(),  # index 4: 128x16x16
        nn.Conv2d(128, 128, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_work(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int, steps: int = 10, batch_size: int = 10
) -> None:
    """Forward + backward to a mask on the feature map, ``steps`` times, batch ``batch_size``."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    xb = x.expand(batch_size, *x.shape[1:])
    t = torch.full((batch_size,), target, device=x.device)
    mask = torch.ones((1, *_feature_shape(model, layer, x)), device=x.device, requires_grad=True)
    handle = layer.register_forward_hook(lambda m, i, out: out * mask)
    try:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(xb), t)
            (grad,) = torch.autograd.grad(loss, mask)
            with torch.no_grad():
                mask -= 0.0 * grad
    finally:
        handle.remove()
        for p, flag in params:
            p.requires_grad_(flag)


_shapes: dict = {}


def _feature_shape(model, layer, x):
    key = (id(layer), tuple(x.shape[1:]))
    if key not in _shapes:
        out = []
        h = layer.register_forward_hook(lambda m, i, o: out.append(o.shape[1:]))
        with torch.no_grad():
            model(x[:1])
        h.remove()
        _shapes[key] = tuple(out[0])
    return _shapes[key]


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-images", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)

    model = make_model().to(device)
    layer = model[4]
    iba = IBA(layer)
    gen = torch.Generator().manual_seed(0)
    iba.estimate(model, [torch.randn(50, 3, 64, 64, generator=gen) for _ in range(4)], device=device)
    x1 = torch.randn(1, 3, 64, 64, generator=gen).to(device)
    xn = torch.randn(args.batch_images, 3, 64, 64, generator=gen).to(device)
    targets = list(range(args.batch_images))
    targets = [t % 10 for t in targets]

    # warm-up
    bare_work(model, layer, x1, 3)
    iba.analyze(x1, target=3, model=model)

    labels = torch.full((10,), 3, device=device)

    def closure(batch: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch), labels[: len(batch)])

    iba.analyze(x1, closure)
    bare, ana, ana_closure = [], [], []
    for _ in range(args.repeats):
        bare.append(timed(lambda: bare_work(model, layer, x1, 3), device))
        ana.append(timed(lambda: iba.analyze(x1, target=3, model=model), device))
        ana_closure.append(timed(lambda: iba.analyze(x1, closure), device))
    t_bare, t_ana = statistics.median(bare), statistics.median(ana)
    t_closure = statistics.median(ana_closure)

    reps = max(1, args.repeats // 3)
    batched, singles = [], []
    for _ in range(reps):
        batched.append(timed(lambda: iba.analyze(xn, target=targets, model=model), device))
        singles.append(
            timed(
                lambda: [
                    iba.analyze(xn[i : i + 1], target=targets[i], model=model) for i in range(len(targets))
                ],
                device,
            )
        )
    t_batched, t_singles = statistics.median(batched), statistics.median(singles)

    n = args.batch_images
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print("model: 3x64x64 input, bottleneck on 128x16x16, defaults (10 steps, batch 10)")
    print(f"{'measurement':<46}{'seconds':>10}{'ratio':>10}")
    print(f"{'bare forward+backward work (1 image)':<46}{t_bare:>10.4f}{'':>10}")
    print(f"{'IBA analyze (1 image, target=)':<46}{t_ana:>10.4f}{t_ana / t_bare:>10.3f}  (target <= 1.10)")
    print(
        f"{'IBA analyze (1 image, model_loss_fn closure)':<46}{t_closure:>10.4f}"
        f"{t_closure / t_bare:>10.3f}  (copies made at the input)"
    )
    print(f"{f'{n} single analyze calls':<46}{t_singles:>10.4f}{'':>10}")
    print(
        f"{f'one analyze call with {n} images':<46}{t_batched:>10.4f}"
        f"{t_batched / t_singles:>10.3f}  (batched / singles)"
    )


if __name__ == "__main__":
    main()
