"""The version is written once (``[project] version`` in pyproject.toml) and read from metadata."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import iba_core
from iba_core import _version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_comes_from_the_installed_metadata() -> None:
    assert iba_core.__version__ == importlib.metadata.version("iba")


def test_pyproject_is_the_one_place_the_version_is_written() -> None:
    text = PYPROJECT.read_text(encoding="utf-8")
    assert "dynamic" not in text.split("[project]")[1].split("\n[")[0], "version must not be dynamic"
    # A stale install (pyproject bumped, package not reinstalled) would differ here.
    assert _version.source_tree_version(PYPROJECT) == importlib.metadata.version("iba")
    source = (Path(iba_core.__file__).parent / "__init__.py").read_text(encoding="utf-8")
    assert not re.search(r"__version__\s*=\s*[\"']", source), "no version literal in the package"


def test_uninstalled_source_tree_falls_back_to_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert _version.package_version() == _version.source_tree_version(PYPROJECT)


def test_source_tree_version_reads_only_the_project_table(tmp_path: Path) -> None:
    toml = tmp_path / "pyproject.toml"
    toml.write_text('[tool.x]\nversion = "9.9"\n\n[project]\nname = "iba"\nversion = "1.2.3rc1"\n')
    assert _version.source_tree_version(toml) == "1.2.3rc1"
    toml.write_text('[project]\nname = "iba"\n\n[tool.x]\nversion = "9.9"\n')
    assert _version.source_tree_version(toml) == "0+unknown"
    assert _version.source_tree_version(tmp_path / "missing.toml") == "0+unknown"


def test_cli_reports_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    from iba_core.apps.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"iba {importlib.metadata.version('iba')}"
