"""The ``iba`` command: ``iba demo``, ``iba explain``, ``iba layers`` and ``iba merge-estimates``.

The command knows no framework.  It reaches backends only through the plugin registry
(:func:`iba_core.get_backend`): ``--backend NAME`` takes a registered backend's name or
alias, and ``--backend auto`` asks every installed backend whether it
:meth:`~iba_core.Backend.claims_model` the MODEL argument.  The chosen backend loads the
model (:meth:`~iba_core.Backend.load_model`), says what input it takes
(:meth:`~iba_core.Backend.describe_input`) and converts arrays; the explanation itself is
the core's :class:`~iba_core.PerSampleBottleneck`.  So any backend that implements those
optional methods works here, and ``import iba_core`` and ``iba --help`` import no
framework.

Every foreseeable bad input ends in one line on stderr (``iba: error: ...``) and exit
status 2 (1 for failures while running): :class:`~iba_core.UsageError` and
:class:`~iba_core.RunFailure`, raised here or by a backend.  Numbers are checked while
the command line is read (argparse ``type=`` functions) and output paths before any model
is loaded.  Set ``IBA_DEBUG=1`` to see the traceback.  The output files of a run are an
:class:`OutputSet`: written to temporary names only after all results are computed, then
renamed together, so a failed or interrupted run leaves all old files (or none).  Python
warnings are shown as one ``iba: warning: ...`` line each (:func:`one_line_warnings`).
While a command runs, what native libraries write straight to file descriptor 2 (C/C++
start-up logging) is kept off the terminal; Python's own stderr (warnings, progress
bars, these messages) is not affected.

``iba explain`` runs unchanged under ``torchrun --nproc_per_node=K`` (or any launcher of
a backend's distributed runtime, see :meth:`~iba_core.Backend.distributed`): each process
estimates on its share of the estimation images (merged exactly) and explains its share
of the ``--batch-size`` chunks; rank 0 gathers the maps and writes the same files a single
process writes.  Messages then name the rank.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import (
    Backend,
    InputSpec,
    RunFailure,
    UsageError,
    available_backends,
    backend_specs,
    get_backend,
)
from .loading import factory_imports, first_line

__all__ = ["CliError", "CliFailure", "OutputSet", "build_parser", "layer_table", "main", "select_backend"]

PROG = "iba"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
#: The backend ``iba demo`` prefers when none is given (any installed one is used if it
#: is missing); every backend with a ``demo_model`` runs the demo.
DEMO_BACKEND = "torch"
#: Samples per model pass when the command predicts classes.
PREDICT_BATCH = 64

#: Older names of the contract's exceptions.
CliError = UsageError
CliFailure = RunFailure


# -- backends ---------------------------------------------------------------------------
def load_backend(name: str) -> Backend:
    """The installed backend called ``name`` (or an alias of it); imports its framework."""
    try:
        return get_backend(name)
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"the {name} backend cannot be loaded: {first_line(exc)}") from None


def select_backend(choice: str, model_spec: str) -> Backend:
    """The backend for ``--backend choice``; ``"auto"``: the one installed backend that
    claims ``model_spec`` (:meth:`Backend.claims_model`)."""
    if choice != "auto":
        return load_backend(choice)
    specs = backend_specs()
    installed = sorted(specs)
    claiming: list[str] = []
    broken: list[str] = []
    for name in installed:
        try:
            cheap = specs[name].claims  # answered without importing the framework
            if cheap is not None:
                claims = bool(cheap(model_spec))
            else:
                claims = bool(load_backend(name).claims_model(model_spec))
        except UsageError as exc:
            broken.append(f"{name} ({exc})")
            continue
        except Exception as exc:  # one faulty plugin must not stop the others
            broken.append(f"{name} ({first_line(exc)})")
            continue
        if claims:
            claiming.append(name)
    if len(claiming) > 1:  # a factory's source says which framework it builds with
        claiming = _importing(model_spec, claiming, specs) or claiming
    if len(claiming) == 1:
        return load_backend(claiming[0])
    listed = ", ".join(installed) or "none"
    if claiming:
        raise UsageError(
            f"model {model_spec!r} is claimed by several backends "
            f"({', '.join(claiming)}); choose one with "
            "--backend NAME"
        )
    also = f"; could not ask: {'; '.join(broken)}" if broken else ""
    raise UsageError(
        f"cannot tell what kind of model {model_spec!r} is: no installed backend takes it "
        f"(installed: {listed}){also}. Give a Python factory as 'package.module:function' "
        "or 'file.py:function', or a model file your backend reads, or choose the backend "
        "with --backend NAME"
    )


def _importing(model_spec: str, names: list[str], specs: Mapping[str, Any]) -> list[str]:
    """Those of the backends ``names`` whose framework modules the source of the factory
    ``model_spec`` imports (:func:`~iba_core.apps.loading.factory_imports`: read as text,
    not run); empty when the source cannot be found or names none of them."""
    imported = factory_imports(model_spec)
    return [n for n in names if imported & {m.split(".")[0] for m in specs[n].modules}]


def demo_backend(choice: str | None) -> Backend:
    """The backend of ``iba demo``: the one asked for, else :data:`DEMO_BACKEND` if it is
    installed, else the first installed backend."""
    if choice not in (None, "auto"):
        return load_backend(choice)
    installed = available_backends()
    if not installed:
        raise UsageError("no iba backend is installed: install one, e.g. pip install 'iba[torch]'")
    return load_backend(DEMO_BACKEND if DEMO_BACKEND in installed else installed[0])


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Keep what native code writes to file descriptor 2 off the terminal.

    Frameworks log from C/C++ straight to the descriptor while they load and start
    devices; Python's ``sys.stderr`` keeps writing to the real stderr, so warnings,
    progress bars and error messages still show.  Does nothing when ``IBA_DEBUG`` is set
    or descriptor 2 cannot be redirected.
    """
    if os.environ.get("IBA_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    original = sys.stderr
    replaced = False
    try:
        uses_fd2 = original.fileno() == 2
    except (AttributeError, OSError, ValueError):
        uses_fd2 = False  # already captured by Python (tests, notebooks): leave it alone
    try:
        if uses_fd2:
            sys.stderr = io.TextIOWrapper(
                os.fdopen(os.dup(saved), "wb"),
                encoding=original.encoding,
                errors="backslashreplace",
                line_buffering=True,
            )
            replaced = True
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        if replaced:
            # Flushed, not closed: a logging handler made meanwhile may still hold it, and
            # it writes to the real stderr (a copy of the descriptor, closed when unused).
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            sys.stderr = original
        os.dup2(saved, 2)
        os.close(saved)


def _version() -> str:
    from .. import __version__

    return __version__


# -- tensors and models ----------------------------------------------------------------------
def to_backend(backend: Backend, model: Any, x: np.ndarray) -> Any:
    """NumPy images as float32 tensors of ``backend`` on ``model``'s device."""
    tensor = backend.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return backend.to_device(tensor, model)


def run_model(backend: Backend, model: Any, x: np.ndarray) -> Any:
    """The model's output on ``x``, frozen; a failure is the user's :class:`UsageError`."""
    try:
        with backend.frozen(model):
            return backend.call(model, to_backend(backend, model, x))
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"the model failed on input of shape {tuple(x.shape)}: "
            f"{first_line(exc)} (check --size and --channels)"
        ) from None


def predict(backend: Backend, model: Any, x: np.ndarray) -> np.ndarray:
    """Logits ``(N, classes)`` as NumPy, :data:`PREDICT_BATCH` samples per pass."""
    from ..engines import model_logits

    outs = []
    for i in range(0, len(x), PREDICT_BATCH):
        out = run_model(backend, model, x[i : i + PREDICT_BATCH])
        try:
            logits = np.asarray(backend.to_numpy(model_logits(out)))
        except ValueError as exc:
            raise UsageError(
                f"{exc}; iba explain needs a classifier returning logits of shape (N, classes)"
            ) from None
        if logits.ndim != 2:
            raise UsageError(
                f"the model returns {logits.shape}; iba explain needs a classifier "
                "returning logits of shape (N, classes)"
            )
        outs.append(logits)
    return np.concatenate(outs)


def layer_table(backend: Backend, model: Any, input_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """``(name, per-sample output shape)`` of every layer ``backend.layer_names`` lists,
    from one pass over zeros of ``input_shape``: ``'-'`` if the layer did not run,
    ``'(called again)'`` appended if it ran more than once.

    A recording hook goes on every layer and every hook is removed afterwards, also when
    the pass fails.  If the pass fails with the hooks but not without them, some layer's
    output cannot be hooked (e.g. it is not a tensor): the layers are then split in
    halves until those are found, and marked ``'(not a tensor)'``.
    """
    names = list(backend.layer_names(model))
    zeros = np.zeros((1, *input_shape), dtype=np.float32)
    shapes: dict[str, str] = {}
    seen = _shapes_with_hooks(backend, model, zeros, names)
    if seen is None:
        run_model(backend, model, zeros)  # a model that fails on its own is the user's mistake
        _probe_layers(backend, model, zeros, names, shapes)
    else:
        shapes.update(seen)
    return [(name, shapes.get(name, "-")) for name in names]


def _shape_recorder(seen: dict[str, str], name: str) -> Callable[[Any], None]:
    """A hook writing layer ``name``'s per-sample output shape into ``seen``."""

    def hook(features: Any) -> None:
        shape = str(tuple(None if s is None else int(s) for s in tuple(features.shape)[1:]))
        if name not in seen:
            seen[name] = shape
        elif not seen[name].endswith("(called again)"):
            seen[name] = f"{seen[name]} (called again)"

    return hook


def _shapes_with_hooks(
    backend: Backend, model: Any, zeros: np.ndarray, group: list[str]
) -> dict[str, str] | None:
    """The output shapes of the layers in ``group`` from one pass with a recording hook on
    each (``None`` if that pass fails); the hooks are removed in every case."""
    seen: dict[str, str] = {}
    handles = []
    try:
        for name in group:
            handles.append(backend.attach(model, name, _shape_recorder(seen, name)))
        with backend.frozen(model):
            backend.call(model, to_backend(backend, model, zeros))
    except Exception:
        return None
    finally:
        for handle in reversed(handles):
            with contextlib.suppress(Exception):
                handle.remove()
    return seen


def _probe_layers(
    backend: Backend, model: Any, zeros: np.ndarray, group: list[str], shapes: dict[str, str]
) -> None:
    """Fill ``shapes`` for ``group``, splitting it in halves while a pass with its hooks
    fails; a single layer that still fails is marked ``'(not a tensor)'``."""
    seen = _shapes_with_hooks(backend, model, zeros, group)
    if seen is not None:
        shapes.update(seen)
    elif len(group) == 1:
        shapes[group[0]] = "(not a tensor)"
    else:
        _probe_layers(backend, model, zeros, group[: len(group) // 2], shapes)
        _probe_layers(backend, model, zeros, group[len(group) // 2 :], shapes)


def _layer_kind(backend: Backend, model: Any, name: str) -> str | None:
    try:
        return backend.layer_kind(model, name)
    except Exception:  # an optional description; never a reason to fail
        return None


def _check_layer(backend: Backend, model: Any, layer: str) -> None:
    names = list(backend.layer_names(model))
    if names and layer not in names:
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise UsageError(
            f"layer {layer!r} not found in the model; its layers are: {shown} "
            "(see 'iba layers MODEL' for their output shapes)"
        )


def open_bottleneck(
    backend: Backend, model: Any, layer: str, inputs: InputSpec, sample: np.ndarray, **settings: Any
) -> tuple[Any, tuple[int, ...]]:
    """A :class:`~iba_core.PerSampleBottleneck` at ``layer`` of ``model`` and the
    (channels-first) per-sample shape of the layer's features, from one pass over
    ``sample``; mistakes are one-line :class:`UsageError`\\ s."""
    from ..engines import PerSampleBottleneck

    _check_layer(backend, model, layer)
    layout = "channels_last" if inputs.channels_last else "channels_first"
    try:
        engine = PerSampleBottleneck(backend, model, layer, input_layout=layout, **settings)
    except LookupError as exc:
        raise UsageError(f"{_one_line(str(exc))} (see 'iba layers MODEL')") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot put a bottleneck at layer {layer!r}: {_one_line(str(exc))}") from None
    try:
        feature_shape = engine.feature_shape(to_backend(backend, model, sample))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(
            f"cannot put a bottleneck at layer {layer!r}: {_one_line(str(exc))}; "
            "choose another (see 'iba layers MODEL')"
        ) from None
    shape = tuple(int(s) for s in feature_shape)
    if len(shape) < 2:
        raise UsageError(
            f"layer {layer!r} has no spatial axes (features (N, "
            f"{', '.join(map(str, shape)) or 'C'})): a saliency map needs a "
            "layer with height and width; choose a convolutional layer (see "
            "'iba layers MODEL')"
        )
    return engine, shape


def explain_batch(
    backend: Backend,
    engine: Any,
    model: Any,
    x: np.ndarray,
    targets: np.ndarray,
    seed: int | None,
    noise: str,
) -> np.ndarray:
    """Saliency maps ``(N, H, W)`` in bits per pixel as NumPy, all N inputs in one call."""
    try:
        maps = engine.analyze(
            to_backend(backend, model, x), target=np.asarray(targets), seed=seed, noise=noise
        )
    except FloatingPointError as exc:
        raise RunFailure(str(exc)) from None
    maps = np.asarray(backend.to_numpy(maps))
    return maps[None] if maps.ndim == 2 else maps


def estimate(engine: Any, batches: Any, n_samples: int, progbar: bool, distributed: Any = None) -> None:
    """Estimate the feature statistics (warnings, e.g. too few samples, are shown by
    :func:`one_line_warnings`); ``distributed`` as for
    :func:`~iba_core.engines.estimate_loop`."""
    engine.estimate(
        batches, n_samples=n_samples, progbar=progbar and sys.stderr.isatty(), distributed=distributed
    )


#: How messages name this process in a data-parallel run (``" [rank 1/4]"``), else "";
#: and the collectives to close when the command ends.
_RANK_LABEL: dict[str, Any] = {"label": "", "dist": None}


def start_distributed(backend: Backend) -> Any:
    """The backend's :class:`~iba_core.contract.Collectives` when the command was started
    as one of several processes (e.g. by ``torchrun``), its runtime started from the
    launcher's environment; else ``None``.  Messages then name the rank."""
    dist = backend.distributed(init=True)
    if dist is None or dist.shards < 2:
        return None
    _RANK_LABEL["dist"] = dist
    if dist.processes > 1:
        _RANK_LABEL["label"] = f" [{dist.describe()}]"
    return dist


# -- files ------------------------------------------------------------------------------
def _replace(src: Path, dst: Path) -> None:
    """``os.replace``; one name, so that tests can interrupt a run between two renames."""
    os.replace(src, dst)


class OutputSet:
    """The files of one run, written as a set: all new, or (after any failure) all old.

    :meth:`stage` writes each file to a temporary name next to its final path (creating
    missing folders); :meth:`commit` then moves every existing file aside, renames the new
    ones into place and only then deletes the old ones.  If anything fails, a
    :class:`KeyboardInterrupt` included, the files renamed so far are taken back out, the
    old ones are put back, and temporaries and folders this run created are removed.
    Used as a context manager, an exception leaving the block discards what was staged.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._made_dirs: list[Path] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.discard()

    def _mkdirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            d.mkdir()
            self._made_dirs.append(d)

    def stage(self, path: Path, write: Callable[[Path], None]) -> None:
        """Write ``path``'s new content (``write(tmp)``) to a temporary file beside it."""
        self._mkdirs(path.parent)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        self._staged.append((path, tmp))
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode

    def commit(self) -> list[Path]:
        """Put every staged file in place together; returns the final paths."""
        done: list[tuple[Path, Path | None]] = []  # (final path, its old file moved aside)
        try:
            for path, tmp in self._staged:
                backup = None
                if path.exists() or path.is_symlink():
                    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
                    os.close(fd)
                    backup = Path(name)
                    try:
                        _replace(path, backup)
                    except BaseException:
                        backup.unlink()
                        raise
                done.append((path, backup))
                _replace(tmp, path)
        except BaseException:
            self._roll_back(done)
            raise
        for _, backup in done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
        self._staged, self._made_dirs = [], []
        return [path for path, _ in done]

    def _roll_back(self, done: list[tuple[Path, Path | None]]) -> None:
        staged = dict(self._staged)
        for path, backup in reversed(done):
            with contextlib.suppress(OSError):
                if not staged[path].exists():  # the new file is already in place
                    path.unlink()
                if backup is not None:
                    os.replace(backup, path)
        self.discard()

    def discard(self) -> None:
        """Remove the temporaries and the folders made for them; old files stay."""
        for _, tmp in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for d in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: never what others put there meanwhile
        self._staged, self._made_dirs = [], []


def check_writable(path: Path, option: str, folder: bool) -> Path:
    """Refuse, before any work is done, an output ``path`` that cannot be written.

    ``folder``: ``path`` is a folder to write into (``--out``), else a file.  The nearest
    existing folder on the way must be a folder in which a file can be created (tried).
    """
    if path.exists():
        if folder and not path.is_dir():
            raise UsageError(f"{option} {path} exists and is not a folder")
        if not folder and path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"{option} {path} cannot be written: {existing} is a file, not a folder; choose another path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".iba-write-test.", dir=existing)
    except OSError as exc:
        raise UsageError(
            f"{option} {path} cannot be written: no new files can be made in "
            f"{existing} ({exc.strerror or exc}); choose another path"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_out(out: Path) -> Path:
    """Refuse an ``--out`` that cannot become a folder, before any work is done."""
    return check_writable(out, "--out", folder=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _bytes_writer(content: bytes) -> Callable[[Path], None]:
    """A ``write(tmp)`` for :meth:`OutputSet.stage` that writes ``content``."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(content)

    return write


def write_outputs(
    out: Path, files: dict[str, bytes], extra: dict[Path, Callable[[Path], None]] | None = None
) -> list[Path]:
    """Write ``{name: content}`` into the folder ``out`` and ``{path: write(tmp)}`` of
    ``extra``, as one :class:`OutputSet`; returns the paths."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    with OutputSet() as outputs:
        current = out
        try:
            for name, content in files.items():
                current = out / name
                outputs.stage(current, _bytes_writer(content))
            for current, write in (extra or {}).items():
                outputs.stage(current, write)
            current = out
            return outputs.commit()
        except OSError as exc:
            raise RunFailure(f"cannot write {exc.filename or current}: {exc.strerror or exc}") from None


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def find_images(paths: Sequence[str], what: str) -> list[Path]:
    """Image files among ``paths`` (files, or folders searched recursively)."""
    found: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            inside = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UsageError(
                    f"{what}: no images in folder {path} (looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise UsageError(f"{what}: {path} is neither a file nor a folder")
        else:
            raise UsageError(f"{what}: no such file or folder: {path}")
    if not found:
        raise UsageError(f"{what}: no images given")
    return found


def load_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """``(H, W, channels)`` float32 in ``[0, 1]`` (resized to ``size`` = (H, W) if given)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise UsageError("reading images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise UsageError(f"{path} is not an image (or not a format Pillow reads)") from None
    except OSError as exc:
        raise UsageError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_images(
    paths: Sequence[Path],
    channels: int,
    size: tuple[int, int] | None,
    mean: np.ndarray,
    std: np.ndarray,
    channels_last: bool,
) -> np.ndarray:
    """Stack of preprocessed images ``(N, C, H, W)`` (or ``(N, H, W, C)``), float32."""
    images = [load_image(p, channels, size) for p in paths]
    shapes = {im.shape[:2] for im in images}
    if len(shapes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(shapes)[:4])
        raise UsageError(f"the images differ in size ({listed}); give --size H W to resize them")
    x = (np.stack(images) - mean) / std
    x = x.astype(np.float32)
    return x if channels_last else np.ascontiguousarray(np.moveaxis(x, -1, 1))


def _per_channel(values: Sequence[float] | None, channels: int, default: float, name: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    if len(values) not in (1, channels):
        takes = "1 value" if channels == 1 else f"1 or {channels} values"
        raise UsageError(
            f"--{name} takes {takes} (the model's input has {channels} "
            f"channel{'s' if channels > 1 else ''}), got {len(values)}"
        )
    arr = np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).copy()
    if name == "std" and np.any(arr <= 0):
        raise UsageError(f"--std values must be > 0, got {list(values)}")
    return arr


def _batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i : i + size]


def _progress(iterable: Any, **kwargs: Any) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the extras
        return iterable
    # disable=None: no bar when stderr is not a terminal (pipes, CI logs, tests).
    return tqdm(iterable, disable=None, file=sys.stderr, **kwargs)


def _warn(message: str) -> None:
    print(f"{PROG}{_RANK_LABEL['label']}: warning: {message}", file=sys.stderr)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for p in paths:
        stem = p.stem or "image"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}-{count}")
    return names


# -- iba demo ---------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    if getattr(args, "task", "image") == "text":
        from .text_demo import cmd_text_demo

        return cmd_text_demo(args)
    from .datasets import cluttered_digits
    from .demo import BOX_COLOR, DEMO_LAYER, demo_figure
    from .metrics import bounding_box_score

    t0 = time.perf_counter()
    out = check_out(Path(args.out))
    backend = demo_backend(args.backend)
    model = backend.demo_model()
    inputs = backend.describe_input(model)
    try:
        estimation = cluttered_digits(args.estimate_samples, split="train", seed=args.seed)
        test = cluttered_digits(args.n, split="test", seed=args.seed)
    except ImportError as exc:
        raise UsageError(str(exc)) from None

    def to_model(a: np.ndarray) -> np.ndarray:  # the digits are (N, 1, H, W)
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if inputs.channels_last else a

    engine, (c, h, w) = open_bottleneck(backend, model, DEMO_LAYER, inputs, to_model(test.images[:1]))
    t_setup = time.perf_counter()

    estimate(
        engine,
        (to_backend(backend, model, to_model(b)) for b in _batches(estimation.images, 250)),
        args.estimate_samples,
        progbar=False,
    )
    t_estimate = time.perf_counter()

    x = to_model(test.images)
    predicted = predict(backend, model, x).argmax(axis=1)
    # All N images in one call; NumPy noise: the same draws, so the same maps, in every backend.
    maps = explain_batch(backend, engine, model, x, test.labels, seed=args.seed, noise="numpy")
    t_explain = time.perf_counter()

    bits = maps.reshape(len(maps), -1).sum(axis=1)
    scores = bounding_box_score(maps, test.boxes)
    box_area = (test.boxes[:, 2] - test.boxes[:, 0]) * (test.boxes[:, 3] - test.boxes[:, 1])
    chance = box_area / float(maps.shape[1] * maps.shape[2])
    title = (
        f"IBA on cluttered digits ({backend.name}, bottleneck at {DEMO_LAYER}, "
        f"{c}x{h}x{w}): {BOX_COLOR} box = the digit"
        + ("; one colour scale for all maps" if args.shared_scale else "")
    )
    shared = args.shared_scale
    png = demo_figure(
        test.images, maps, test.boxes, test.labels, predicted, scores, title=title, shared_scale=shared
    )
    npz = npz_bytes(
        saliency_maps=maps.astype(np.float32),
        images=test.images,
        labels=test.labels,
        predicted=predicted,
        boxes=test.boxes,
        total_bits=bits,
        top_n_in_box=scores,
        seed=np.int64(args.seed),
        layer=np.str_(DEMO_LAYER),
        backend=np.str_(backend.name),
    )
    written = write_outputs(out, {"demo.png": png, "saliency_maps.npz": npz})
    t_end = time.perf_counter()

    print(
        f"IBA demo: {args.n} cluttered-digit test images (seed {args.seed}), {backend.name} "
        f"backend, bottleneck at {DEMO_LAYER} ({c}x{h}x{w})"
    )
    print(f"{'image':>5}  {'digit':>5}  {'pred':>4}  {'bits':>7}  {'top-n in box':>12}  {'chance':>6}")
    for i in range(args.n):
        print(
            f"{i:>5}  {int(test.labels[i]):>5}  {int(predicted[i]):>4}  {bits[i]:>7.1f}  "
            f"{scores[i]:>12.2f}  {chance[i]:>6.2f}"
        )
    print(
        f"{'mean':>5}  {'':>5}  {'':>4}  {bits.mean():>7.1f}  {scores.mean():>12.2f}  {chance.mean():>6.2f}"
    )
    print(
        "top-n in box: share of the n highest-attributed pixels inside the digit's box "
        "(n = box area); chance = box area / image area"
    )
    dt_explain = t_explain - t_estimate
    print(
        f"time: setup {t_setup - t0:.1f} s, estimate ({args.estimate_samples} images) "
        f"{t_estimate - t_setup:.1f} s, explain ({args.n} images, one batched call) "
        f"{dt_explain:.1f} s = {dt_explain / args.n:.2f} s/image, figure and files "
        f"{t_end - t_explain:.1f} s, total {t_end - t0:.1f} s"
    )
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


# -- iba layers / iba explain -------------------------------------------------------------
def _size(values: Sequence[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise UsageError(f"--size takes H W (or one value for a square), got {len(values)} values")
    h, w = (values[0], values[0]) if len(values) == 1 else values
    if h < 1 or w < 1:
        raise UsageError(f"--size must be positive, got {list(values)}")
    return int(h), int(w)


def _open_model(args: argparse.Namespace) -> tuple[Backend, Any, InputSpec]:
    backend = select_backend(args.backend, args.model)
    model = backend.load_model(args.model, weights=args.weights, device=args.device)
    return backend, model, backend.describe_input(model)


def _channels(args: argparse.Namespace, inputs: InputSpec) -> int:
    if args.channels is not None:
        if args.channels not in (1, 3):
            raise UsageError(f"--channels must be 1 (greyscale) or 3 (RGB), got {args.channels}")
        return int(args.channels)
    return inputs.channels if inputs.channels in (1, 3) else 3


def cmd_layers(args: argparse.Namespace) -> int:
    size = _size(args.size)
    backend, model, inputs = _open_model(args)
    channels = _channels(args, inputs)
    h, w = size or inputs.size or (224, 224)
    shape = (h, w, channels) if inputs.channels_last else (channels, h, w)
    rows = layer_table(backend, model, shape)
    kinds = [_layer_kind(backend, model, name) for name, _ in rows]
    show_kinds = any(k is not None for k in kinds)
    width = max([len(name) for name, _ in rows] + [5])
    kind_width = max([len(k or "-") for k in kinds] + [4])
    print(f"layers of {args.model} for an input of shape {shape} (output shapes per sample; '-' = not run):")
    if show_kinds:
        print(f"{'layer':<{width}}  {'type':<{kind_width}}  output shape")
    else:
        print(f"{'layer':<{width}}  output shape")
    for (name, out_shape), kind in zip(rows, kinds, strict=True):
        if show_kinds:
            print(f"{name:<{width}}  {kind or '-':<{kind_width}}  {out_shape}")
        else:
            print(f"{name:<{width}}  {out_shape}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    if getattr(args, "texts", None):
        from .text_explain import cmd_explain_text

        return cmd_explain_text(args)
    _check_image_options(args)
    size = _size(args.size)
    out = check_out(Path(args.out))
    if args.save_estimate is not None:
        check_writable(Path(args.save_estimate), "--save-estimate", folder=False)
    image_paths = find_images(args.images, "--images")
    estimate_paths = find_images(args.estimate_from, "--estimate-from") if args.estimate_from else []
    if args.estimate is not None and not Path(args.estimate).is_file():
        raise UsageError(f"--estimate: no such file: {args.estimate}")

    backend = select_backend(args.backend, args.model)
    # Under torchrun (or another launcher of the backend's runtime): one shard per process.
    dist = start_distributed(backend)
    model = backend.load_model(args.model, weights=args.weights, device=args.device)
    inputs = backend.describe_input(model)
    size = size or inputs.size
    channels = _channels(args, inputs)
    channels_last = inputs.channels_last
    mean = _per_channel(args.mean, channels, 0.0, "mean")
    std = _per_channel(args.std, channels, 1.0, "std")
    x = load_images(image_paths, channels, size, mean, std, channels_last)

    _check_layer(backend, model, args.layer)
    logits = predict(backend, model, x)
    predicted = logits.argmax(axis=1)
    targets = _explained_targets(args.target, predicted, int(logits.shape[1]), len(x))
    sigma = smoothing(args.sigma, default=1.0)
    engine, feature_shape = open_bottleneck(
        backend, model, args.layer, inputs, x[:1], beta=args.beta, optimization_steps=args.steps, sigma=sigma
    )
    if dist is not None:
        from ..engines._distributed import agree, fingerprint

        agree(
            dist,
            "the images, targets and settings",
            (
                fingerprint(x),
                fingerprint(targets),
                args.layer,
                args.beta,
                sigma,
                args.steps,
                args.seed,
                args.noise,
            ),
            "start every process with the same command line, on the same files",
        )

    if args.estimate is not None:
        engine.estimator = _load_estimate(Path(args.estimate), feature_shape, args.layer)
    else:
        # Statistics must match the explained images' feature shape: same pixel size.
        est_size = size or (x.shape[1:3] if channels_last else x.shape[2:4])
        count = min(len(estimate_paths), args.n_samples)
        load = lambda chunk: load_images(chunk, channels, est_size, mean, std, channels_last)
        _estimate_from_images(backend, engine, model, estimate_paths[:count], load, dist)

    maps = _explain_chunks(args, backend, engine, model, x, targets, dist)
    if maps is None:  # rank 0 writes the files
        return 0
    maps_arr = np.concatenate(maps).astype(np.float32)
    bits = maps_arr.reshape(len(maps_arr), -1).sum(axis=1)

    shown = x if channels_last else np.moveaxis(x, 1, -1)
    files = _explain_files(args.layer, image_paths, maps_arr, shown * std + mean, targets, predicted, bits)
    extra: dict[Path, Callable[[Path], None]] = {}
    if args.save_estimate is not None:
        extra[Path(args.save_estimate)] = _npz_writer(engine.estimator.state_dict())
    write_outputs(out, files, extra)
    print(
        f"explained {len(x)} images at layer {args.layer}: mean {bits.mean():.1f} bits "
        f"per image; wrote {len(files)} files to {out}"
    )
    return 0


def _check_image_options(args: argparse.Namespace) -> None:
    """The options of ``iba explain --images`` that must be given, or not, together."""
    if not args.images:
        raise UsageError("give --images (image files or folders) or --texts (a text file and --tokenizer)")
    for option in ("tokenizer", "max_length", "pad_id", "layout"):
        if getattr(args, option, None) is not None:
            raise UsageError(f"--{option.replace('_', '-')} is for --texts")
    check_estimate_source(args, "FOLDER (images like the ones to explain)")


def check_estimate_source(args: argparse.Namespace, source: str) -> None:
    """Exactly one of ``--estimate`` and ``--estimate-from SOURCE`` (``source`` says what
    ``--estimate-from`` takes)."""
    if args.estimate is None and args.estimate_from is None:
        raise UsageError(
            f"the bottleneck needs feature statistics: give --estimate-from {source} or --estimate FILE.npz"
        )
    if args.estimate is not None and args.estimate_from is not None:
        raise UsageError("give either --estimate-from or --estimate, not both")


def _explained_targets(target: int | None, predicted: np.ndarray, n_classes: int, n: int) -> np.ndarray:
    """The class explained for each of ``n`` inputs: ``--target`` or the predicted one."""
    if target is None:
        return predicted.astype(np.int64)
    if not 0 <= target < n_classes:
        raise UsageError(
            f"--target {target} is out of range: the model has {n_classes} classes (0..{n_classes - 1})"
        )
    return np.full(n, target, dtype=np.int64)


def _estimate_from_images(
    backend: Backend,
    engine: Any,
    model: Any,
    paths: Sequence[Path],
    load: Callable[[list[Path]], np.ndarray],
    dist: Any,
) -> None:
    """Estimate the feature statistics on the images at ``paths``, read 64 at a time by
    ``load``; under a distributed run each process reads chunks rank, rank + K, ...,
    merged in order."""
    chunks = list(_path_chunks(paths, 64))
    if dist is not None:
        chunks = chunks[dist.rank :: dist.processes]
    batches = (to_backend(backend, model, load(chunk)) for chunk in chunks)
    estimate(engine, batches, len(paths), progbar=True, distributed=None if dist is None else "own")


def _explain_chunks(
    args: argparse.Namespace,
    backend: Backend,
    engine: Any,
    model: Any,
    x: np.ndarray,
    targets: np.ndarray,
    dist: Any,
) -> list[np.ndarray] | None:
    """The maps of every ``--batch-size`` chunk of ``x``, in order (chunk c is explained
    by shard c % K and gathered on every process); ``None`` on processes other than rank 0."""
    chunks = range(0, len(x), args.batch_size)
    shards = 1 if dist is None else dist.shards
    local = (0,) if dist is None else dist.local_shards()

    def explain_here() -> dict[int, np.ndarray]:
        """The maps of this process's chunks (chunk c goes to shard c % K)."""
        from ..engines import data_parallel

        done = {}
        mine = [(c, i) for c, i in enumerate(chunks) if c % shards in local]
        shown = _progress(mine, desc="explain", unit="batch") if dist is None or dist.is_main else mine
        with data_parallel(False):
            for c, i in shown:
                with contextlib.nullcontext() if dist is None else dist.on_shard(c % shards):
                    # Image k draws its noise from stream seed + k, whatever the batch size.
                    done[c] = explain_batch(
                        backend,
                        engine,
                        model,
                        x[i : i + args.batch_size],
                        targets[i : i + args.batch_size],
                        seed=args.seed + i,
                        noise=args.noise,
                    )
        return done

    if dist is None:
        explained = explain_here()
    else:
        from ..engines._distributed import exchange

        explained = {}
        for part in exchange(dist, explain_here):
            explained.update(part)
        if not dist.is_main:
            return None
    return [explained[c] for c in range(len(chunks))]


def _explain_files(
    layer: str,
    image_paths: Sequence[Path],
    maps: np.ndarray,
    images: np.ndarray,
    targets: np.ndarray,
    predicted: np.ndarray,
    bits: np.ndarray,
) -> dict[str, bytes]:
    """The files ``iba explain`` writes: one overlay PNG per image (``images`` channels-last,
    in [0, 1] before clipping), ``saliency_maps.npz`` and ``summary.csv``."""
    from .demo import overlay_figure

    names = _unique_names(image_paths)
    files: dict[str, bytes] = {}
    for name, m, img, t, p, b in zip(names, maps, images, targets, predicted, bits, strict=True):
        title = f"{name}: class {int(t)} (predicted {int(p)}), {b:.1f} bits"
        files[f"{name}_saliency.png"] = overlay_figure(m, np.clip(img, 0, 1), title)
    files["saliency_maps.npz"] = npz_bytes(
        saliency_maps=maps,
        files=np.array([str(p) for p in image_paths]),
        targets=targets,
        predicted=predicted,
        total_bits=bits,
        layer=np.str_(layer),
    )
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["file", "target", "predicted", "total_bits", "max_bits_per_pixel", "saliency_png"])
    for path, name, t, p, b, m in zip(image_paths, names, targets, predicted, bits, maps, strict=True):
        writer.writerow(
            [str(path), int(t), int(p), f"{b:.4f}", f"{float(m.max()):.6f}", f"{name}_saliency.png"]
        )
    files["summary.csv"] = table.getvalue().encode()
    return files


def _npz_writer(state: dict[str, Any]) -> Callable[[Path], None]:
    """A writer of ``state`` as an ``.npz`` file at the path it is given."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez adds no suffix
            np.savez(fh, **state)

    return save


# -- iba merge-estimates -----------------------------------------------------------------
def cmd_merge_estimates(args: argparse.Namespace) -> int:
    """Merge estimates saved on different machines (or shards) into one, exactly."""
    from ..math import Estimator, SavedStateError

    out = check_writable(Path(args.output), "-o", folder=False)
    merged = Estimator()
    first: tuple[str, Any] | None = None
    for name in args.estimates:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"no such file: {name}")
        try:
            est = Estimator.load(path)
        except (SavedStateError, OSError) as exc:
            raise UsageError(_one_line(str(exc))) from None
        if first is None:
            first = (name, est)
            merged.layer, merged.layout = est.layer, est.layout
        else:
            ref_name, ref = first
            for what, mine, theirs in (
                ("layer", est.layer, ref.layer),
                ("feature shape", est.shape, ref.shape),
                ("layout", est.layout, ref.layout),
            ):
                if mine != theirs:
                    raise UsageError(
                        f"cannot merge {name} into {ref_name}: {what} {mine!r} differs from "
                        f"{theirs!r}; merge only estimates of the same layer of the same model"
                    )
        merged.merge(est)
    state: dict[str, Any] = merged.state_dict()

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez adds no suffix
            np.savez(fh, **state)

    with OutputSet() as outputs:
        try:
            outputs.stage(out, save)
            outputs.commit()
        except OSError as exc:
            raise RunFailure(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    print(
        f"merged {len(args.estimates)} estimates of layer {merged.layer or '(unnamed)'}: "
        f"{merged.n} samples, feature shape {merged.shape}; wrote {out}"
    )
    return 0


def _path_chunks(paths: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(paths), size):
        yield list(paths[i : i + size])


def _load_estimate(path: Path, feature_shape: tuple[int, ...], layer: str) -> Any:
    from ..math import Estimator

    try:
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
    except OSError as exc:
        raise UsageError(f"cannot read the estimate {path}: {exc.strerror or exc}") from None
    except Exception:
        raise UsageError(
            f"cannot read the estimate {path}: not an .npz file written by --save-estimate"
        ) from None
    estimator = Estimator()
    try:
        estimator.load_state_dict(state, expected_shape=feature_shape, expected_layer=layer)
    except ValueError as exc:
        raise UsageError(f"the estimate {path} does not fit layer {layer!r}: {exc}") from None
    return estimator


# -- argument parsing ---------------------------------------------------------------------
#: Most images ``iba demo --estimate-samples`` takes: they are made in memory in one call
#: (16 KiB each, so about 330 MB), and the reference uses about 10,000.
DEMO_MAX_ESTIMATE = 20_000


def _integer(text: str) -> int:
    """An integer, also written as ``1e3`` or ``1000.0``."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not np.isfinite(value) or not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}")
    return int(value)


def int_in(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``, else a one-line error."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {wanted}{why}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def smoothing(value: float | None, default: float | None) -> float | None:
    """``--sigma``: ``default`` when not given, ``None`` (no smoothing) for 0."""
    if value is None:
        return default
    return float(value) or None


def real(low: float | None = None, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number (``>= low``, or ``> low`` if ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        bad = not np.isfinite(value)
        if low is not None and not bad:
            bad = value <= low if strict else value < low
        if bad:
            bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus the exit status 2)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Information Bottleneck Attribution: which parts of an input does a "
        "model's decision use, in bits per pixel.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="explain a small CNN on cluttered digits (no download needed)",
        description="Estimate the bottleneck statistics of a small pretrained CNN, explain "
        "test images of cluttered handwritten digits in one batched call, and "
        "score how much of each map falls on the digit's box. Writes demo.png "
        "and saliency_maps.npz to --out. With --task text: a small transformer on "
        "synthetic sentences whose label is decided by known evidence words; per-token "
        "maps in bits, scored by the share of the top-k tokens on the evidence. Writes "
        "text_demo.html, text_demo.png and token_maps.npz.",
    )
    demo.add_argument(
        "--task",
        choices=["image", "text"],
        default="image",
        help="image: the CNN on cluttered digits (default); text: the transformer on synthetic sentences",
    )
    demo.add_argument(
        "--backend",
        default=None,
        metavar="NAME",
        help=f"installed backend to run in, by name or alias (default: "
        f"{DEMO_BACKEND} if installed, else the first installed)",
    )
    demo.add_argument(
        "--out", default="iba-demo-out", metavar="DIR", help="output folder (default: iba-demo-out)"
    )
    demo.add_argument(
        "--n",
        type=int_in(1, 64),
        default=8,
        metavar="N",
        help="number of test images to explain (default: 8)",
    )
    demo.add_argument(
        "--seed", type=int_in(0), default=0, metavar="S", help="seed of the images and the noise (default: 0)"
    )
    demo.add_argument(
        "--estimate-samples",
        default=1000,
        metavar="M",
        type=int_in(1, DEMO_MAX_ESTIMATE, " (the demo makes these images in memory, 16 KiB each)"),
        help=f"images to estimate the feature statistics on (default: 1000, at most {DEMO_MAX_ESTIMATE:,})",
    )
    demo.add_argument(
        "--shared-scale",
        action="store_true",
        help="draw every map on one colour scale (0 to the largest value of all maps), so that "
        "colours compare across images (default: each map to its own maximum)",
    )
    demo.set_defaults(func=cmd_demo)

    common = _Parser(add_help=False)
    common.add_argument(
        "model",
        metavar="MODEL",
        help="the model, as its backend reads it: 'package.module:factory' "
        "or 'file.py:factory' (a callable returning the model), or a "
        "saved model file (e.g. .keras)",
    )
    common.add_argument(
        "--weights",
        metavar="FILE",
        help="weights to load into the model (e.g. a state_dict .pt/.pth/.npz, or a .weights.h5 file)",
    )
    common.add_argument(
        "--backend",
        default="auto",
        metavar="NAME",
        help="installed backend to use, by name or alias (default: auto, "
        "the one installed backend that takes MODEL)",
    )
    common.add_argument(
        "--device",
        metavar="DEV",
        help="device to run on, e.g. cpu, cuda, cuda:1, gpu:0 (default: the model's)",
    )
    common.add_argument(
        "--size",
        type=int_in(1),
        nargs="+",
        metavar="PX",
        help="resize inputs to H W pixels (one value: square)",
    )
    common.add_argument(
        "--channels",
        type=int,
        metavar="C",
        help="1 (greyscale) or 3 (RGB); default: from the model's first layer",
    )

    layers = sub.add_parser(
        "layers",
        parents=[common],
        help="list a model's layers and their output shapes",
        description="List the layers of MODEL with their output shapes, found by running the "
        "model once on zeros of --size (default 224x224). Any of them can be "
        "given to 'iba explain --layer'.",
    )
    layers.set_defaults(func=cmd_layers)

    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="explain your own model's decisions on your images",
        description="Put a bottleneck at --layer of MODEL, estimate its statistics, and "
        "explain --images: one saliency PNG per image, saliency_maps.npz and "
        "summary.csv in --out.",
    )
    explain.add_argument(
        "--layer",
        required=True,
        metavar="NAME",
        help="layer to put the bottleneck at (see 'iba layers MODEL')",
    )
    explain.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders to explain")
    explain.add_argument(
        "--texts",
        nargs="+",
        metavar="FILE.txt",
        help="text files to explain, one example per line (instead of --images; needs "
        "--tokenizer). Writes token_maps.json, token_bits.csv and token_maps.npz (bits per token; "
        "--estimate-from then takes text files too)",
    )
    explain.add_argument(
        "--tokenizer",
        metavar="SPEC",
        help="with --texts: 'package.module:factory' or 'file.py:factory', a callable returning "
        "the tokenizer (or the tokenizer itself): a callable text -> list of token ids (or a "
        "mapping with 'input_ids'), or an object with encode(text). Token strings come from its "
        "convert_ids_to_tokens(ids), id_to_token(id) or vocab if it has one; its pad_token_id "
        "pads shorter texts. The model gets the ids (N, T) alone",
    )
    explain.add_argument(
        "--max-length",
        type=int_in(1),
        metavar="T",
        help="with --texts: pad (and cut) every text to T tokens (default: the longest text's length)",
    )
    explain.add_argument(
        "--pad-id",
        type=int_in(0),
        metavar="ID",
        help="with --texts: the padding token id (default: the tokenizer's pad_token_id, else 0); "
        "padded positions get no noise and 0 bits",
    )
    explain.add_argument(
        "--layout",
        choices=["channels_last", "channels_first"],
        help="with --texts: the layer's feature layout, (N, T, C) or (N, C, T), where the "
        "backend cannot tell it from the layer (default: inferred, else refused)",
    )
    explain.add_argument(
        "--html",
        action="store_true",
        help="with --texts: also write token_maps.html (tokens coloured by bits)",
    )
    explain.add_argument(
        "--estimate-from",
        nargs="+",
        metavar="PATH",
        help="image files or folders to estimate the feature statistics on",
    )
    explain.add_argument(
        "--estimate", metavar="FILE.npz", help="statistics saved earlier with --save-estimate"
    )
    explain.add_argument(
        "--save-estimate", metavar="FILE.npz", help="save the statistics to reuse them with --estimate"
    )
    explain.add_argument(
        "--n-samples",
        type=int_in(1),
        default=10000,
        metavar="M",
        help="use at most M images of --estimate-from (default: 10000)",
    )
    explain.add_argument(
        "--mean",
        type=real(),
        nargs="+",
        metavar="M",
        help="per-channel mean subtracted from pixels in [0, 1] (default 0)",
    )
    explain.add_argument(
        "--std",
        type=real(0, strict=True),
        nargs="+",
        metavar="S",
        help="per-channel std the pixels are divided by (default 1)",
    )
    explain.add_argument(
        "--target",
        type=int_in(0),
        metavar="CLASS",
        help="class to explain (default: each image's predicted class)",
    )
    explain.add_argument(
        "--out", default="iba-explain-out", metavar="DIR", help="output folder (default: iba-explain-out)"
    )
    explain.add_argument(
        "--batch-size",
        type=int_in(1),
        default=8,
        metavar="B",
        help="images explained per batched call (default: 8)",
    )
    explain.add_argument(
        "--beta", type=real(0), default=10.0, help="weight of the information term (default: 10)"
    )
    explain.add_argument(
        "--sigma",
        type=real(0),
        default=None,
        help="smoothing of the mask, in cells of the layer's feature map (default: 1 for images, "
        "none for --texts; 0: none)",
    )
    explain.add_argument(
        "--steps", type=int_in(0), default=10, help="optimisation steps per batch (default: 10)"
    )
    explain.add_argument(
        "--seed",
        type=int_in(0),
        default=0,
        help="noise seed; image k draws from stream seed + k (default: 0)",
    )
    explain.add_argument(
        "--noise",
        choices=["backend", "numpy"],
        default="backend",
        help="noise generator: the backend's, on the device (default), or "
        "NumPy's, the same numbers in every backend and on every device",
    )
    explain.set_defaults(func=cmd_explain)

    merge = sub.add_parser(
        "merge-estimates",
        help="merge feature statistics saved on different machines into one",
        description="Merge estimates written by --save-estimate (or Estimator.save) on "
        "different data, e.g. on different machines, into the estimate of all their data "
        "together (exactly: Chan's formula). Estimates of different layers, feature shapes or "
        "layouts are refused.",
    )
    merge.add_argument("estimates", nargs="+", metavar="FILE.npz", help="estimates to merge")
    merge.add_argument("-o", "--output", required=True, metavar="FILE.npz", help="the merged estimate")
    merge.set_defaults(func=cmd_merge_estimates)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iba`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prog = f"{PROG} {args.command}"
    _RANK_LABEL.update(label="", dist=None)
    try:
        with one_line_warnings(), quiet_native_stderr():
            return int(args.func(args))
    except UsageError as exc:
        prog += _RANK_LABEL["label"]
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("IBA_DEBUG"):
            raise
        prog += _RANK_LABEL["label"]
        print(
            f"{prog}: error: {type(exc).__name__}: {_one_line(str(exc))} (set IBA_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if _RANK_LABEL["dist"] is not None:  # a runtime the command started ends with it
            with contextlib.suppress(Exception):
                _RANK_LABEL["dist"].close()


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each Python warning as one ``iba: warning: ...`` line on stderr, once per
    distinct message.

    Warnings Python hides by default (deprecations, imports, resources) stay hidden; with
    ``-W``/``PYTHONWARNINGS`` the user's filters apply, and with ``IBA_DEBUG`` warnings
    are shown as Python shows them.
    """
    if os.environ.get("IBA_DEBUG"):
        yield
        return
    seen: set[str] = set()

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: str | None = None
    ) -> None:
        text = _one_line(str(message)) or category.__name__
        if text not in seen:
            seen.add(text)
            _warn(text)

    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("always")  # every message; repeats are dropped in show()
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", hidden)
        warnings.showwarning = show
        yield


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
