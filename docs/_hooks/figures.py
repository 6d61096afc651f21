"""MkDocs hook: the figures of the tutorials, made by every build from the embedded data.

The demo CNN and the cluttered digits ship with iba, so nothing is downloaded; the whole
hook takes a few seconds.  The figures are added to the site as generated files
(``figures/*.png``); nothing is written into ``docs/``.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from typing import Any

import numpy as np

#: The layers of the demo CNN compared on "Choosing the layer and beta" (feature-map sizes:
#: 16x32x32, 32x16x16, 64x16x16 and 64x8x8; relu2 and relu3 both run at 16x16).
LAYERS = ("features.relu1", "features.relu2", "features.relu3", "features.relu4")
BETAS = (1.0, 10.0, 100.0)
N_ESTIMATE = 200  # below the advised 1,000 (a FewSamplesWarning); enough for these figures
SEED = 0

log = logging.getLogger("mkdocs.hooks.figures")


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def make_figures() -> dict[str, bytes]:
    """``{site path: PNG bytes}`` of every figure the tutorials show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from iba_core import FewSamplesWarning, get_backend
    from iba_core.apps.datasets import cluttered_digits
    from iba_core.apps.plotting import plot_saliency_map
    from iba_torch import IBA

    torch.manual_seed(SEED)
    model = get_backend("torch").demo_model()
    train = torch.as_tensor(cluttered_digits(N_ESTIMATE, split="train", seed=SEED).images)
    test = cluttered_digits(4, split="test", seed=1)
    x, labels = torch.as_tensor(test.images), torch.as_tensor(test.labels)
    figures = {}

    bottlenecks = {}
    for layer in LAYERS:
        bottlenecks[layer] = IBA(model, layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FewSamplesWarning)
            bottlenecks[layer].estimate(model, train.split(100), n_samples=N_ESTIMATE)

    def explain(layer: str, n: int = 2, **settings: Any) -> np.ndarray:
        return bottlenecks[layer].analyze(x[:n], target=labels[:n], model=model, seed=SEED, **settings)

    # Per-Sample Bottleneck in PyTorch: four test digits at features.relu3.
    maps = explain("features.relu3", n=4)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3))
    for ax, smap, img, label in zip(axes, maps, test.images, test.labels, strict=True):
        plot_saliency_map(smap, img=img[0], ax=ax, colorbar_fontsize=9)
        ax.set_title(f"digit {label}: {smap.sum():.0f} bits", fontsize=10)
    figures["figures/torch_per_sample.png"] = _png(fig)

    # The layer: the first two test digits, bottleneck after each ReLU.
    by_layer = [explain(layer) for layer in LAYERS]
    fig, axes = plt.subplots(2, len(LAYERS), figsize=(3.3 * len(LAYERS), 5.6))
    for column, (layer, layer_maps) in enumerate(zip(LAYERS, by_layer, strict=True)):
        for row in range(2):
            ax = axes[row, column]
            plot_saliency_map(layer_maps[row], img=test.images[row, 0], ax=ax, colorbar_fontsize=8)
            ax.set_title(f"{layer}: {layer_maps[row].sum():.0f} bits", fontsize=9)
    figures["figures/layers.png"] = _png(fig)

    # beta: one colour scale for every map, so that colours compare across betas.
    by_beta = [explain("features.relu3", beta=beta) for beta in BETAS]
    vmax = max(float(m.max()) for m in by_beta)
    fig, axes = plt.subplots(2, len(BETAS), figsize=(3.3 * len(BETAS), 5.6))
    for column, (beta, beta_maps) in enumerate(zip(BETAS, by_beta, strict=True)):
        for row in range(2):
            ax = axes[row, column]
            plot_saliency_map(beta_maps[row], img=test.images[row, 0], ax=ax, vmax=vmax, colorbar_fontsize=8)
            ax.set_title(f"beta={beta:g}: {beta_maps[row].sum():.0f} bits", fontsize=9)
    figures["figures/betas.png"] = _png(fig)
    return figures


def on_files(files: Any, config: Any) -> Any:
    """Add the generated figures to the site's files."""
    from mkdocs.structure.files import File

    start = time.perf_counter()
    for path, content in make_figures().items():
        files.append(File.generated(config, path, content=content))
    log.info("figures made from the demo data in %.1f s", time.perf_counter() - start)
    return files
