"""Token maps people can read: the HTML fragment and the matplotlib drawing."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from iba_core.apps.tokens import HIGH_RGB, plot_token_map, token_map_html

TOKENS = ["the", "<script>alert(1)</script>", "was", "great", "&"]
BITS = np.array([0.0, 2.0, 0.5, 1.0, 0.25])


def spans(text: str) -> list[tuple[str, str, str]]:
    """``(tooltip, rgb, content)`` of every token span."""
    return re.findall(
        r'<span title="([^"]*)" style="background-color: rgb\(([^)]*)\);[^"]*">([^<]*)</span>', text
    )


def test_html_colours_each_token_by_its_bits_and_escapes_it():
    out = token_map_html(TOKENS, BITS)
    assert "<script" not in out  # the token is text, not markup
    found = spans(out)
    assert [c for _, _, c in found] == [
        "the",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "was",
        "great",
        "&amp;",
    ]
    assert [t for t, _, _ in found] == ["0 bits", "2 bits", "0.5 bits", "1 bits", "0.25 bits"]
    rgb = [tuple(int(v) for v in c.split(",")) for _, c, _ in found]
    assert rgb[0] == (255, 255, 255) and rgb[1] == HIGH_RGB  # 0 bits white, the maximum red
    # Colour strength follows the bits: the green channel falls as the bits grow.
    greens = np.array([g for _, g, _ in rgb])
    assert list(np.argsort(-greens, kind="stable")) == list(np.argsort(BITS, kind="stable"))
    assert "2 bits" in out.rsplit("linear-gradient", 1)[1]  # the legend ends at the maximum


def test_html_of_a_batch_shares_one_scale_and_ignores_padding():
    bits = np.array([[1.0, 0.5, 0.0, 0.0], [4.0, 2.0, 1.0, 0.0]])
    out = token_map_html([["a", "b"], ["c", "d", "e"]], bits, labels=["pos", "neg"], vmax=None)
    found = spans(out)
    assert [c for _, _, c in found] == ["a", "b", "c", "d", "e"]  # padding positions not shown
    rgb = {c: tuple(int(v) for v in col.split(",")) for _, col, c in found}
    assert rgb["c"] == HIGH_RGB and rgb["a"] == rgb["e"] != HIGH_RGB  # 1 bit of 4 in both texts
    assert ">pos</span>" in out and ">neg</span>" in out
    assert spans(token_map_html(["a"], [1.0], vmax=2.0))[0][1] != ", ".join(map(str, HIGH_RGB))


def test_html_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="not 0"):
        token_map_html(["a"], [1.0, 0.5])  # bits on a position without a token
    with pytest.raises(ValueError, match="2 tokens but its map only 1"):
        token_map_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="3 texts but 2 token lists"):
        token_map_html([["a"], ["b"]], np.zeros((3, 1)))
    with pytest.raises(TypeError, match="list of strings"):
        token_map_html("abc", [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        token_map_html(["a"], [np.nan])


def test_plot_draws_one_coloured_box_per_token_and_wraps():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    long = TOKENS * 4
    bits = np.tile(BITS, 4)
    assert plot_token_map(long, bits, ax=ax, colorbar=False) is ax
    texts = ax.texts
    assert [t.get_text() for t in texts] == long
    colours = [t.get_bbox_patch().get_facecolor()[:3] for t in texts]
    np.testing.assert_allclose(colours[1], np.array(HIGH_RGB) / 255, atol=1 / 255)
    np.testing.assert_allclose(colours[0], (1, 1, 1))
    assert len({round(t.get_position()[1], 6) for t in texts}) > 1  # 20 tokens in 3 inches wrap
    plt.close(fig)


def test_plot_of_a_batch_with_labels_and_colorbar():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = plot_token_map([["a", "b"], ["c"]], np.array([[1.0, 0.0], [2.0, 0.0]]), labels=["x", "y"])
    assert [t.get_text() for t in ax.texts] == ["x", "a", "b", "y", "c"]
    assert len(ax.figure.axes) == 2  # the axes and the colour bar
    plt.close(ax.figure)


def test_token_maps_are_exported_lazily_from_iba_core():
    import iba_core
    from iba_core.apps import tokens

    assert iba_core.plot_token_map is tokens.plot_token_map
    assert iba_core.token_map_html is tokens.token_map_html
    code = "import sys, iba_core; print('iba_core.apps.tokens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    with pytest.raises(AttributeError, match="no_such_name"):
        iba_core.no_such_name  # noqa: B018
