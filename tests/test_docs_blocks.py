"""Every code block of README.md and docs/**/*.md runs.

Python blocks of one page run in order in one namespace (a page builds on its earlier
blocks), in a fresh temporary folder.  A block that needs a user's model or data is marked
on the line before its fence, with the reason::

    <!-- docs-test: skip (needs your model and data loader) -->

and shell blocks run only when marked ``<!-- docs-test: run -->`` (each line is one
command; the ``iba`` command and ``python`` are this environment's).  Pages that import
PyTorch, TensorFlow or JAX carry the ``torch`` / ``tf`` / ``jax`` marks, so each nox
session runs the pages its backend can (a ``jax`` page also needs Flax and the iba-jax
plugin, else it is skipped).  CONTRIBUTING.md documents the markers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<action>skip|run)\b(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
NEEDS = {
    "torch": re.compile(
        r"^\s*(import|from)\s+(torch|iba_torch)\b|--backend torch\b|\biba_torch\.", re.MULTILINE
    ),
    "tf": re.compile(
        r"^\s*(import|from)\s+(tensorflow|keras|iba_tf)\b|--backend tensorflow\b|\biba_tf\.", re.MULTILINE
    ),
    "jax": re.compile(r"^\s*(import|from)\s+(jax|flax|iba_jax)\b|--backend jax\b", re.MULTILINE),
}
#: What a page with each mark needs importable; without it the page is skipped.
MODULES = {"torch": ("torch",), "tf": ("tensorflow",), "jax": ("jax", "flax", "iba_jax")}
#: Blocks skipped for needing a user's data must stay few.
MAX_SKIPPED = 12


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    action: str | None  # "skip", "run" or None
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        if self.action == "skip":
            return False
        if self.lang == "python":
            return True
        return self.lang in ("bash", "sh", "shell", "console") and self.action == "run"


def blocks_of(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (fences at the start of a line)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        code = "\n".join(lines[start + 1 : i])
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before.strip())
        action = marker.group("action") if marker else None
        reason = marker.group("reason").strip().strip("()").strip() if marker else ""
        found.append(Block(page, start + 1, match.group("lang"), code, action, reason))
        i += 1
    return found


def needs(page: Path) -> set[str]:
    code = "\n".join(b.code for b in blocks_of(page) if b.runs)
    return {name for name, pattern in NEEDS.items() if pattern.search(code)}


def _param(page: Path) -> object:
    marks = [getattr(pytest.mark, name) for name in sorted(needs(page))]
    return pytest.param(page, marks=marks, id=str(page.relative_to(ROOT)))


def test_markers_are_used_as_documented() -> None:
    skipped = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        marked_fences = {b.line - 1 for b in blocks_of(page) if b.action}
        for number, line in enumerate(lines, start=1):
            if "docs-test:" in line and line.strip().startswith("<!--"):
                assert MARKER.match(line.strip()), f"{page.name}:{number}: malformed marker {line!r}"
        n_markers = sum(1 for line in lines if MARKER.match(line.strip()))
        assert n_markers == len(marked_fences), f"{page.name}: a docs-test marker is not right before a fence"
        for block in blocks_of(page):
            if block.action == "skip":
                assert block.reason, f"{block.where}: a skip marker must say why, e.g. (needs your data)"
                skipped.append(block.where)
            if block.action == "run":
                assert block.lang in ("bash", "sh", "shell", "console", "python"), block.where
    assert len(skipped) <= MAX_SKIPPED, f"too many skipped blocks ({len(skipped)}): {skipped}"


def test_the_pages_have_code_that_runs() -> None:
    running = [b for page in PAGES for b in blocks_of(page) if b.runs]
    assert len(running) >= 20
    assert any(b.lang != "python" for b in running), "no shell block runs"


def _run_shell(block: Block, env: dict[str, str]) -> None:
    for command in block.code.splitlines():
        command = command.strip()
        if not command or command.startswith("#"):
            continue
        result = subprocess.run(
            shlex.split(command), capture_output=True, text=True, env=env, timeout=300, check=False
        )
        assert result.returncode == 0, (
            f"{block.where}: `{command}` exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )


@pytest.mark.parametrize("page", [_param(p) for p in PAGES])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in sorted(needs(page)):
        for module in MODULES[name]:
            pytest.importorskip(module)
    runnable = [b for b in blocks_of(page) if b.runs]
    if not runnable:
        pytest.skip("no block to run on this page")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.syspath_prepend(str(tmp_path))  # modules a page writes are importable
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace: dict[str, object] = {"__name__": "__docs__"}
    try:
        for block in runnable:
            if block.lang == "python":
                try:
                    exec(compile(block.code, block.where, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"{block.where}: {type(exc).__name__}: {exc}") from exc
            else:
                _run_shell(block, env)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
