"""Backend discovery and selection through pluggy."""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
from collections.abc import Callable
from typing import Any

import pluggy

from . import hookspecs
from ._backend import Backend

ENTRY_POINT_GROUP = "iba.backends"
ENV_BACKENDS = "IBA_BACKENDS"
"""Comma-separated backend names; when set, only these are offered (handy in tests)."""


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A backend as registered by a plugin; the backend itself is loaded lazily.

    Attributes:
        name: the name users select it by (``get_backend("torch")``).
        modules: top-level modules whose types the backend handles.
        loader: ``"package.module:Class"`` or a zero-argument callable returning a
            :class:`Backend`; only called on first use.
        aliases: other names users may select it by (``get_backend("pytorch")``), e.g.
            the framework's own name; matched without regard to case.
        claims: ``spec -> bool``: whether the ``iba`` command's MODEL argument is this
            backend's kind of model, answered without importing the framework (so
            ``--backend auto`` loads only the backend it picks).  ``None``: the backend is
            loaded and asked (:meth:`Backend.claims_model`).
    """

    name: str
    modules: tuple[str, ...]
    loader: str | Callable[[], Backend]
    aliases: tuple[str, ...] = ()
    claims: Callable[[str], bool] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by the aliases."""
        return (self.name, *self.aliases)

    def load(self) -> Backend:
        if callable(self.loader):
            backend = self.loader()
        else:
            module_name, _, attr = self.loader.partition(":")
            backend = getattr(importlib.import_module(module_name), attr)()
        if not isinstance(backend, Backend):
            raise TypeError(f"backend {self.name!r} loader returned {backend!r}, not a Backend")
        return backend

    def owns_type(self, obj: Any) -> bool:
        for klass in type(obj).__mro__:
            if klass.__module__.split(".", 1)[0] in self.modules:
                return True
        return False


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_loaded: dict[BackendSpec, Backend] = {}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created (and entry points loaded) on first use.

    Register an extra plugin in-process with ``plugin_manager().register(obj)``; no
    packaging is needed for that, which is how tests add a backend.
    """
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            pm.check_pending()
            _pm = pm
        return _pm


def _specs() -> dict[str, BackendSpec]:
    specs: dict[str, BackendSpec] = {}

    def register(spec: BackendSpec) -> None:
        if not isinstance(spec, BackendSpec):
            raise TypeError(f"register() expects a BackendSpec, got {spec!r}")
        if spec.name in specs:
            raise ValueError(f"two plugins register a backend named {spec.name!r}")
        specs[spec.name] = spec

    plugin_manager().hook.iba_register_backends(register=register)
    pinned = os.environ.get(ENV_BACKENDS)
    if pinned:
        keep = {n.strip().casefold() for n in pinned.split(",") if n.strip()}
        specs = {k: v for k, v in specs.items() if any(n.casefold() in keep for n in v.names)}
    return specs


def _find_spec(specs: dict[str, BackendSpec], name: str) -> BackendSpec | None:
    """The spec a user's ``name`` selects: a backend's name, else one of its aliases, else
    the name of a framework module it handles (``"keras"``), ignoring case.  A name that
    fits several backends equally raises ``LookupError`` naming them."""
    if name in specs:
        return specs[name]
    folded = name.casefold()
    for matches in (
        [s for s in specs.values() if s.name.casefold() == folded],
        [s for s in specs.values() if folded in (a.casefold() for a in s.aliases)],
        [s for s in specs.values() if folded in (m.casefold() for m in s.modules)],
    ):
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise LookupError(
                f"{name!r} fits several iba backends "
                f"({', '.join(sorted(s.name for s in matches))}); select one "
                "by its name"
            )
    return None


def backend_specs() -> dict[str, BackendSpec]:
    """The registered (and not pinned away) backends' specs by name; imports no framework."""
    return dict(_specs())


def available_backends() -> list[str]:
    """Names of the installed backends, sorted.  Imports no framework."""
    return sorted(_specs())


def _load(spec: BackendSpec) -> Backend:
    with _lock:
        backend = _loaded.get(spec)
        if backend is None:
            backend = _loaded[spec] = spec.load()
        return backend


_by_type: dict[tuple[Any, ...], Backend | None] = {}


def find_backend(obj: Any) -> Backend | None:
    """The backend owning ``obj``'s type, or ``None``; never imports a framework.

    Answers are cached per type and per set of registered plugins.
    """
    key = (type(obj), frozenset(map(id, plugin_manager().get_plugins())), os.environ.get(ENV_BACKENDS))
    if key in _by_type:
        return _by_type[key]
    found = None
    for spec in _specs().values():
        if spec.owns_type(obj):
            found = _load(spec)
            break
    if len(_by_type) > 64:
        _by_type.clear()
    _by_type[key] = found
    return found


def get_backend(name_or_obj: Any) -> Backend:
    """Select a backend by name (``"torch"``), by instance, or by a model or tensor.

    A name may also be one of the backend's aliases (:attr:`BackendSpec.aliases`) or a
    framework module it handles (``"keras"``), in any case.  Selection by object looks at
    the module names of its type only, so frameworks that are not already imported are
    never imported.  Raises ``LookupError`` naming the installed backends when none fits.
    """
    if isinstance(name_or_obj, Backend):
        return name_or_obj
    if not isinstance(name_or_obj, str):
        backend = find_backend(name_or_obj)
        if backend is not None:
            return backend
    specs = _specs()
    if isinstance(name_or_obj, str):
        spec = _find_spec(specs, name_or_obj)
        if spec is None:
            raise LookupError(
                f"no iba backend named {name_or_obj!r}; installed backends: "
                f"{sorted(specs) or 'none'}. Install one with e.g. pip install 'iba[torch]'."
            )
        return _load(spec)
    raise LookupError(
        f"no iba backend handles objects of type {type(name_or_obj).__module__}."
        f"{type(name_or_obj).__qualname__}; installed backends: {sorted(specs) or 'none'}"
    )
