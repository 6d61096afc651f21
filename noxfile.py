"""nox sessions: tests per backend, lint, typecheck, docs, demo, benchmarks.

``nox -s tests`` runs the suite once per backend (``numpy``: the core alone, with the
array-api-strict test backend; ``torch``; ``tf``; ``jax``: the plugin in
``plugins/iba-jax``, installed from its folder as a user would).  PyTorch is pinned to the CPU build
through ``constraints.txt`` so that nothing pulls a multi-GB CUDA build.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.default_venv_backend = "venv"

CONSTRAINTS = ("-c", "constraints.txt")
EXTRAS = {"numpy": "test", "torch": "torch,test", "tf": "tf,test", "jax": "test"}
PLUGINS = {"jax": ("./plugins/iba-jax",)}
LINT_PATHS = ("src", "tests", "benchmarks", "examples", "scripts", "docs", "plugins", "noxfile.py")
MARKERS = {
    "numpy": "not torch and not tf",
    "torch": "not tf",
    "tf": "not torch",
    "jax": "not torch and not tf",
}


@nox.session
@nox.parametrize("backend", list(EXTRAS))
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite with only the given backend installed."""
    session.install(*CONSTRAINTS, f".[{EXTRAS[backend]}]", *PLUGINS.get(backend, ()))
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
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs.yml, docs/) into build/site, offline, with
    warnings as errors; the figures are made by the build from the embedded demo data."""
    session.install(*CONSTRAINTS, ".[torch,docs]")
    env = {"NO_MKDOCS_2_WARNING": "1", "MPLBACKEND": "Agg"}  # no theme banner; no display
    session.run("mkdocs", "build", "--strict", *session.posargs, env=env)


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
