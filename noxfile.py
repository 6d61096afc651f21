"""nox sessions: tests per backend, lint, typecheck, demo, benchmarks.

``nox -s tests`` runs the suite once per backend (``numpy``: the core alone, with the
array-api-strict test backend; ``torch``; ``tf``).  PyTorch is pinned to the CPU build
through ``constraints.txt`` so that nothing pulls a multi-GB CUDA build.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

CONSTRAINTS = ("-c", "constraints.txt")
EXTRAS = {"numpy": "test", "torch": "torch,test", "tf": "tf,test"}
LINT_PATHS = ("src", "tests", "benchmarks", "examples", "scripts", "noxfile.py")
MARKERS = {"numpy": "not torch and not tf", "torch": "not tf", "tf": "not torch"}


@nox.session
@nox.parametrize("backend", list(EXTRAS))
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite with only the given backend installed."""
    session.install(*CONSTRAINTS, f".[{EXTRAS[backend]}]")
    session.run("python", "-m", "pytest", "-m", MARKERS[backend], *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the three packages (configuration in ``[tool.mypy]`` of pyproject.toml)."""
    session.install(*CONSTRAINTS, ".[torch,test]", "mypy")
    session.run("mypy", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: ``iba demo`` (pass e.g. ``-- --backend tensorflow``)."""
    session.install(*CONSTRAINTS, ".[torch]")
    session.run("iba", "demo", *session.posargs)


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Speed benchmarks, printed as tables (not run in CI)."""
    session.install(*CONSTRAINTS, ".[torch,tf,bench]")
    session.run("python", "benchmarks/run_all.py", *session.posargs)
