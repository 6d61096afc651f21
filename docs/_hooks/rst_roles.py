"""MkDocs hook: Sphinx cross-reference roles in docstrings become links.

The docstrings use reStructuredText roles (``:class:`iba_core.IBAConfig```), which
mkdocstrings renders as the role's name followed by code.  This hook turns each into an
optional cross-reference for mkdocs-autorefs: a link where the target is documented on
the site, plain code otherwise (no warning, since short names such as ``IBAConfig`` are
relative to the docstring's module).  ``~a.b.C`` shows as ``C``, ``title <a.b.C>`` as
``title``.
"""

from __future__ import annotations

import html
import re
from typing import Any

ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc|obj|const):<code>(?P<text>.*?)</code>", re.DOTALL)
TITLED = re.compile(r"(?P<title>.*?)\s*&lt;(?P<target>[^&]+)&gt;$", re.DOTALL)


def _link(match: re.Match[str]) -> str:
    text = match.group("text").strip()
    titled = TITLED.match(text)
    if titled:
        title, target = titled.group("title"), titled.group("target")
    else:
        target = text.lstrip("~").rstrip("()")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else text.lstrip("~")
    return f'<autoref identifier="{html.escape(target, quote=True)}" optional><code>{title}</code></autoref>'


def on_page_content(html_text: str, **kwargs: Any) -> str:
    """Replace every ``:role:<code>target</code>`` in the page's HTML."""
    return ROLE.sub(_link, html_text)
