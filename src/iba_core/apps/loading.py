"""Helpers for a backend's :meth:`~iba_core.Backend.load_model`: model specs and messages.

The ``iba`` command names a model by a *spec*: ``package.module:factory`` or
``file.py:factory`` (a callable returning the model, or the model itself), or a file a
backend reads.  A backend imports a factory with :func:`model_from_factory` (or
:func:`import_factory`) and reports mistakes as one-line :class:`~iba_core.UsageError`\\ s,
using :func:`first_line` to quote an exception; a plugin recognises its framework's
factories with :func:`factory_imports`.  Nothing here imports a framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..contract import UsageError

__all__ = ["factory_imports", "first_line", "import_factory", "model_from_factory"]

#: The first module of each ``import`` or ``from`` statement, as far as its first dot.
_IMPORTED = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, to quote an exception in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def factory_imports(spec: str) -> set[str]:
    """The top-level modules that the source of the factory ``spec`` (``file.py:function``
    or ``package.module:function``) imports, read as text, not run.

    A plugin's :attr:`~iba_core.BackendSpec.claims` uses it to recognise a factory that
    builds its framework's models without importing anything (``"flax" in
    factory_imports(spec)``).  Empty when ``spec`` is not a factory spec or its source
    file cannot be found or read.
    """
    source, colon, _ = spec.rpartition(":")
    if not colon or not source:
        return set()
    path = Path(source)
    if path.suffix != ".py":
        try:
            found = importlib.util.find_spec(source)
        except Exception:  # finding a module imports its parent package, which may fail
            return set()
        if found is None or not found.origin or not found.origin.endswith(".py"):
            return set()
        path = Path(found.origin)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return set(_IMPORTED.findall(text))


def _exit_call(exc: SystemExit) -> str:
    """How ``exc`` was raised, as code: ``sys.exit(3)``, ``sys.exit('bye')``, ``sys.exit()``."""
    return "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"


def import_factory(spec: str) -> Any:
    """The object named by ``module:attr`` (``attr`` may be dotted; ``module`` may be a
    ``.py`` file).  The current folder is importable, as with ``python -m``.

    Raises :class:`~iba_core.UsageError` with a one-line message for a malformed spec, a
    module that does not import, or a missing attribute.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"model spec {spec!r} must look like 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name), spec)
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except ModuleNotFoundError as exc:
        raise UsageError(f"model spec {spec!r}: cannot import {module_name!r} ({first_line(exc)})") from None
    except SystemExit as exc:  # a script's sys.exit() must not end the caller silently
        raise UsageError(
            f"model spec {spec!r}: importing {module_name!r} called "
            f"{_exit_call(exc)}; a model file must not exit when imported (put "
            "script code under 'if __name__ == \"__main__\":')"
        ) from None
    except Exception as exc:
        raise UsageError(
            f"model spec {spec!r}: importing {module_name!r} failed with {first_line(exc)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"model spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise UsageError(f"model spec {spec!r}: no such file: {path}")
    mod_spec = importlib.util.spec_from_file_location(path.stem, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UsageError(f"model spec {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[path.stem] = module
    try:
        mod_spec.loader.exec_module(module)
    except BaseException:
        if sys.modules.get(path.stem) is module:  # no half-run module is left importable
            del sys.modules[path.stem]
        raise
    return module


def model_from_factory(spec: str, model_type: type | tuple[type, ...], kind: str) -> Any:
    """The model a ``module:factory`` spec names: the object itself if it is already a
    ``model_type``, else what calling it returns, which must be a ``model_type``.

    ``kind`` names the expected type in messages (e.g. ``"Module"``).  Every mistake is a
    one-line :class:`~iba_core.UsageError`.
    """
    factory = import_factory(spec)
    if isinstance(factory, model_type):
        return factory
    if not callable(factory):
        raise UsageError(
            f"model spec {spec!r} names a {type(factory).__name__}, not a callable returning the model"
        )
    try:
        model = factory()
    except SystemExit as exc:
        raise UsageError(
            f"model spec {spec!r}: calling the factory called {_exit_call(exc)}; it must return the model"
        ) from None
    except Exception as exc:
        raise UsageError(f"model spec {spec!r}: calling the factory failed with {first_line(exc)}") from None
    if not isinstance(model, model_type):
        raise UsageError(f"model spec {spec!r} returned a {type(model).__name__}, not a {kind}")
    return model
