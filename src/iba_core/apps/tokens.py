"""Per-token maps people can read: tokens coloured by the bits that pass the bottleneck.

:func:`token_map_html` writes a self-contained HTML fragment (inline styles only, tokens
escaped, no scripts or external files) for notebooks and files; :func:`plot_token_map`
draws the same on matplotlib axes.  Both take the tokens of one text (or a batch of texts)
and the per-token map in bits that ``analyze`` returns for sequence features, ``(T,)``
or ``(N, T)``; positions past a text's tokens are padding and must carry 0 bits.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..math._xp import to_numpy

#: The colour of the most informative token (bits = ``vmax``); 0 bits is white.
HIGH_RGB = (214, 39, 40)


def _rows(tokens: Any, bits: Any) -> tuple[list[list[str]], list[np.ndarray]]:
    """The tokens and bits of each text: one text ``(T,)`` or a batch ``(N, T)``."""
    b = np.asarray(to_numpy(bits), dtype=np.float64)
    if b.ndim == 1:
        texts = [tokens]
        b = b[None]
    elif b.ndim == 2:
        texts = list(tokens)
        if len(texts) != b.shape[0]:
            raise ValueError(f"bits hold {b.shape[0]} texts but {len(texts)} token lists were given")
    else:
        raise ValueError(f"bits must be (T,) for one text or (N, T) for several, got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("bits contain NaN or inf")
    rows, values = [], []
    for i, (toks, row) in enumerate(zip(texts, b, strict=True)):
        if isinstance(toks, str):
            raise TypeError(
                "tokens must be a list of strings per text (e.g. a tokenizer's tokens), not one string"
            )
        toks = [str(t) for t in toks]
        if len(toks) > len(row):
            raise ValueError(f"text {i} has {len(toks)} tokens but its map only {len(row)} positions")
        rest = row[len(toks) :]
        if np.any(rest != 0):
            raise ValueError(
                f"text {i} has {len(toks)} tokens but bits beyond them are not 0; give one "
                "token per position (padding positions carry 0 bits)"
            )
        rows.append(toks)
        values.append(row[: len(toks)])
    return rows, values


def _scale(values: list[np.ndarray], vmax: float | None) -> float:
    top = max((float(v.max()) for v in values if v.size), default=0.0) if vmax is None else float(vmax)
    return top if top > 0 else 1.0


def _rgb(fraction: float) -> tuple[int, int, int]:
    f = min(max(fraction, 0.0), 1.0)
    return tuple(int(round(255 + (c - 255) * f)) for c in HIGH_RGB)  # type: ignore[return-value]


def token_map_html(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    bits: Any,
    *,
    vmax: float | None = None,
    labels: Sequence[str] | None = None,
    unit: str = "bits",
    legend: bool = True,
) -> str:
    """Tokens coloured by bits, as a self-contained HTML fragment.

    Args:
        tokens: the tokens of one text, or one list per text.
        bits: the per-token map in bits, ``(T,)`` or ``(N, T)`` (NumPy or a tensor);
            positions past a text's tokens (padding) must be 0.
        vmax: the bits shown in the strongest colour (default: the largest value, shared
            by all texts so that they compare).
        labels: a caption per text (e.g. the class explained).
        unit: the unit named in the tooltips and legend.
        legend: add a colour scale from 0 to ``vmax``.

    Returns:
        HTML with inline styles only: every token is escaped and carries its value as a
        tooltip (``title``); white is 0 bits, red is ``vmax``.
    """
    rows, values = _rows(tokens, bits)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} texts")
    top = _scale(values, vmax)
    parts = ['<div class="iba-token-map" style="font-family: sans-serif; line-height: 2.0;">']
    for i, (toks, vals) in enumerate(zip(rows, values, strict=True)):
        parts.append('<div style="margin: 0.3em 0;">')
        if labels is not None:
            parts.append(
                f'<span style="font-weight: bold; margin-right: 0.6em;">{html.escape(str(labels[i]))}</span>'
            )
        for tok, v in zip(toks, vals, strict=True):
            r, g, b = _rgb(v / top)
            text = html.escape(tok) if tok.strip() else "&nbsp;"
            parts.append(
                f'<span title="{v:.3g} {html.escape(unit)}" style="background-color: rgb({r}, {g}, {b}); '
                'padding: 0.1em 0.2em; margin: 0 0.1em; border-radius: 0.2em;">'
                f"{text}</span>"
            )
        parts.append("</div>")
    if legend:
        parts.append(
            '<div style="font-size: 0.8em; margin-top: 0.4em;">0 '
            '<span style="display: inline-block; width: 8em; height: 0.8em; vertical-align: middle; '
            f"background: linear-gradient(to right, rgb(255, 255, 255), rgb{HIGH_RGB}); "
            f'border: 1px solid #ccc;"></span> {top:.3g} {html.escape(unit)}</div>'
        )
    parts.append("</div>")
    return "\n".join(parts)


def plot_token_map(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    bits: Any,
    ax: Any = None,
    *,
    vmax: float | None = None,
    labels: Sequence[str] | None = None,
    fontsize: float = 12,
    colorbar: bool = True,
    colorbar_label: str = "Bits / Token",
) -> Any:
    """Draw tokens coloured by bits on matplotlib axes (new axes if ``ax`` is ``None``).

    Arguments as for :func:`token_map_html`; tokens wrap at the axes' right edge, one
    block of lines per text.  White is 0 bits, red is ``vmax``.  Returns the axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    rows, values = _rows(tokens, bits)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} texts")
    top = _scale(values, vmax)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * sum(max(1, len(t) // 12) for t in rows)))
    ax.set_axis_off()
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    line = 1.9 * fontsize / max(box.height, 1.0)  # one text line, in axes fractions
    gap = 0.6 * fontsize / max(box.width, 1.0)
    x, y = 0.0, 1.0 - line / 2
    for i, (toks, vals) in enumerate(zip(rows, values, strict=True)):
        if labels is not None:
            label = ax.text(
                x,
                y,
                str(labels[i]),
                transform=ax.transAxes,
                fontsize=fontsize,
                va="center",
                fontweight="bold",
            )
            x += label.get_window_extent(renderer).width / box.width + 2 * gap
        start = x
        for tok, v in zip(toks, vals, strict=True):
            r, g, b = _rgb(v / top)
            text = ax.text(
                x,
                y,
                tok if tok.strip() else "\u2423",
                transform=ax.transAxes,
                fontsize=fontsize,
                va="center",
                bbox={"facecolor": (r / 255, g / 255, b / 255), "edgecolor": "none", "pad": 2},
            )
            width = text.get_window_extent(renderer).width / box.width
            if x > start and x + width > 1.0:  # wrap onto the next line
                x, y = start, y - line
                text.set_position((x, y))
            x += width + gap
        x, y = 0.0, y - 1.4 * line
    if colorbar:
        cmap = LinearSegmentedColormap.from_list("iba_tokens", [(1, 1, 1), tuple(c / 255 for c in HIGH_RGB)])
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin=0.0, vmax=top))
        cbar = fig.colorbar(mappable, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
        cbar.set_label(colorbar_label)
    return ax
