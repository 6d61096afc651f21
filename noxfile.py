"""nox sessions: tests per backend, lint, demo, benchmarks.

``nox -s tests`` runs the suite once per backend (``numpy``: the core alone, with the
array-api-strict test backend; ``torch``; ``tf``).  PyTorch is pinned to the CPU build
through ``constraints.txt`` so that nothing pulls a multi-GB CUDA build.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"

CONSTRAINTS = ("-c", "constraints.txt")
EXTRAS = {"numpy": "test", "torch": "torch,test", "tf": "tf,test"}
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
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


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
