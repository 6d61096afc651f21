"""The package version, read from the installed distribution's metadata.

The version is written in one place, ``version`` in the ``[project]`` table of
pyproject.toml; installing the package copies it into the metadata read here.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

#: Distribution name of this project (``pip install iba``).
DISTRIBUTION = "iba"


def source_tree_version(pyproject: Path | None = None) -> str:
    """The ``[project]`` version in the pyproject.toml of an uninstalled source tree.

    Used only when the ``iba`` distribution is not installed (the source tree put on
    ``sys.path`` by hand); ``"0+unknown"`` when no pyproject.toml is found there.
    """
    path = pyproject if pyproject is not None else Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.MULTILINE | re.DOTALL)
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), flags=re.MULTILINE) if project else None
    return found.group(1) if found else "0+unknown"


def package_version() -> str:
    """The installed version of ``iba`` (from its metadata), else the source tree's."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return source_tree_version()
