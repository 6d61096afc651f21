"""The version is kept in one place (``iba_core.__version__``); the installed metadata agrees."""

from __future__ import annotations

import importlib.metadata

import iba_core


def test_version_matches_installed_metadata() -> None:
    # pyproject reads the version from iba_core.__version__; a stale install would differ.
    assert iba_core.__version__ == importlib.metadata.version("iba")
