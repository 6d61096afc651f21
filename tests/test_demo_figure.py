"""The demo figure: one colour scale for every map on request, one box colour everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from iba_core.apps import demo


def _figure(monkeypatch: pytest.MonkeyPatch, maps: np.ndarray, **kwargs: Any) -> Any:
    captured: dict[str, Any] = {}

    def keep(fig: Any, dpi: int) -> bytes:
        captured["fig"] = fig
        return b"png"

    monkeypatch.setattr(demo, "_png_bytes", keep)
    n, h, w = maps.shape
    images = np.random.default_rng(0).uniform(size=(n, 1, h, w))
    boxes = np.array([[2, 3, 8, 9]] * n)
    labels = np.arange(n)
    assert demo.demo_figure(images, maps, boxes, labels, labels, np.full(n, 0.5), **kwargs) == b"png"
    return captured["fig"]


def _colour_scale_tops(fig: Any) -> list[float]:
    # plot_saliency_map adds one colorbar per map; its norm is the map's colour scale
    bars = [getattr(ax, "_colorbar", None) for ax in fig.axes]
    return [bar.norm.vmax for bar in bars if bar is not None]


def test_each_map_has_its_own_scale_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    maps = np.stack([np.full((12, 12), v) for v in (0.5, 2.0, 8.0)])
    maps[:, 0, 0] = 0.0
    tops = _colour_scale_tops(_figure(monkeypatch, maps))
    np.testing.assert_allclose(tops, [0.5, 2.0, 8.0])


def test_shared_scale_gives_every_map_the_largest_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    maps = np.stack([np.full((12, 12), v) for v in (0.5, 2.0, 8.0)])
    maps[:, 0, 0] = 0.0
    fig = _figure(monkeypatch, maps, shared_scale=True)
    np.testing.assert_allclose(_colour_scale_tops(fig), [8.0, 8.0, 8.0])
    # the smallest map is drawn with the colour of 0.5 / 8 on the jet scale, not the top colour
    overlay = fig.axes[3].images[-1].get_array()  # row 2 of the 2x3 grid: the first map
    import matplotlib

    expected = matplotlib.colormaps["jet"](0.5 / 8.0)[:3]
    np.testing.assert_allclose(overlay[5, 5, :3], expected, atol=1e-6)


def test_box_has_one_colour_on_image_and_map(monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    fig = _figure(monkeypatch, np.random.default_rng(1).uniform(size=(2, 12, 12)))
    boxes = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 4  # one on each image and one on each map
    assert {tuple(p.get_edgecolor()) for p in boxes} == {to_rgba(demo.BOX_COLOR)}


@pytest.mark.torch
def test_iba_demo_shared_scale_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from iba_core.apps.cli import build_parser, main

    assert build_parser().parse_args(["demo"]).shared_scale is False
    seen: list[bool] = []
    real = demo.demo_figure

    def spy(*args: Any, **kwargs: Any) -> bytes:
        seen.append(kwargs["shared_scale"])
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "demo_figure", spy)
    args = ["demo", "--n", "2", "--estimate-samples", "40", "--out", str(tmp_path)]
    assert main([*args, "--shared-scale"]) == 0
    assert seen == [True]
    assert (tmp_path / "demo.png").stat().st_size > 1000
