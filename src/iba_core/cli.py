"""The ``iba`` command: ``iba demo``, ``iba explain`` and ``iba layers``.

Everything here is framework-free (NumPy, Pillow, matplotlib on use); the framework
parts sit behind a small *runner* per backend (``iba_torch._demo_cli``,
``iba_tf._demo_cli``), imported only once a subcommand needs it, so ``import iba_core``
and ``iba --help`` never import PyTorch or TensorFlow.

Every foreseeable bad input ends in one line on stderr (``iba: error: ...``) and exit
status 2 (1 for failures while running); set ``IBA_DEBUG=1`` to see the traceback.
Output files are written to a temporary name and renamed into place, and only after all
results are computed, so a failed run leaves no half-written files behind.
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["CliError", "main"]

PROG = "iba"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm")
BACKENDS = {"torch": "iba_torch._demo_cli", "tensorflow": "iba_tf._demo_cli"}
_ALIASES = {"torch": "torch", "pytorch": "torch", "tensorflow": "tensorflow", "tf": "tensorflow",
            "keras": "tensorflow"}
_FRAMEWORK = {"torch": ("torch", "PyTorch", "iba[torch]"),
              "tensorflow": ("tensorflow", "TensorFlow", "iba[tf]")}


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""

    exit_code = 2


class CliFailure(CliError):
    """The input looked fine but running failed: printed as one line, exit status 1."""

    exit_code = 1


# -- backends ---------------------------------------------------------------------------
class Session(Protocol):
    """A model with a bottleneck at one layer, driven with NumPy arrays (see ``Runner``)."""

    feature_shape: tuple[int, ...]

    def predict(self, x: np.ndarray) -> np.ndarray: ...
    def estimate(self, batches: Any, n_samples: int, progbar: bool) -> Any: ...
    def set_estimator(self, estimator: Any) -> None: ...
    def estimator(self) -> Any: ...
    def explain(self, x: np.ndarray, targets: np.ndarray, seed: int | None,
                noise: str = "backend") -> np.ndarray: ...


class Runner(Protocol):
    """What a backend supplies to the CLI (``iba_<backend>._demo_cli.Runner``)."""

    name: str
    channels_last: bool

    def demo_model(self) -> Any: ...
    def load_model(self, spec: str, weights: str | None, device: str | None) -> Any: ...
    def input_channels(self, model: Any) -> int | None: ...
    def image_size(self, model: Any) -> tuple[int, int] | None: ...
    def layer_table(self, model: Any, input_shape: tuple[int, ...]
                    ) -> list[tuple[str, str, str]]: ...
    def session(self, model: Any, layer: str, sample: np.ndarray, **settings: Any) -> Session: ...


def load_runner(backend: str, device: str | None = None) -> Runner:
    """The runner of ``backend`` ("torch" or "tensorflow"); imports that framework."""
    import importlib

    backend = _ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise CliError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    module_name, pretty, extra = _FRAMEWORK[backend]
    quiet: Any = contextlib.nullcontext()
    if backend == "tensorflow":
        # Keep TensorFlow's C++ start-up messages (CPU features, no CUDA driver, ...) off
        # stderr: the log level covers later ones, the import itself needs a muted stderr.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        quiet = _muted_stderr()
    try:
        with quiet:
            importlib.import_module(module_name)
    except ImportError:
        raise CliError(f"the {backend} backend needs {pretty}, which is not installed: "
                       f"pip install '{extra}'") from None
    try:
        module = importlib.import_module(BACKENDS[backend])
    except ModuleNotFoundError as exc:
        if exc.name and BACKENDS[backend].startswith(exc.name):
            raise CliError(f"the {backend} backend is not available yet in iba "
                           f"{_version()}; use --backend torch") from None
        raise
    return module.Runner(device=device)


@contextlib.contextmanager
def _muted_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C/C++ logging included) unless ``IBA_DEBUG`` is set."""
    if os.environ.get("IBA_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _version() -> str:
    from . import __version__

    return __version__


def backend_for_model(spec: str) -> str:
    """Guess the backend from a model spec: ``.keras``/``.h5`` files are Keras models,
    ``module:factory`` is a PyTorch factory."""
    if spec.lower().endswith((".keras", ".h5", ".hdf5")):
        return "tensorflow"
    if ":" in spec:
        return "torch"
    raise CliError(
        f"cannot tell what kind of model {spec!r} is: give a PyTorch factory as "
        "'package.module:function' (or 'file.py:function'), or a Keras '.keras' file"
    )


# -- files ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_out(out: Path) -> Path:
    """Refuse an ``--out`` that cannot become a folder, before any work is done."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_outputs(out: Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``{name: content}`` into ``out``, each file atomically; returns the paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliFailure(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise CliError(f"--out {out} is not a folder")
    written = []
    for name, content in files.items():
        path = out / name
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(content)
        except OSError as exc:
            raise CliFailure(f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written


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
            inside = sorted(f for f in path.rglob("*")
                            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise CliError(f"{what}: no images in folder {path} (looked for "
                               f"{', '.join(IMAGE_SUFFIXES)})")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise CliError(f"{what}: {path} is neither a file nor a folder")
        else:
            raise CliError(f"{what}: no such file or folder: {path}")
    if not found:
        raise CliError(f"{what}: no images given")
    return found


def load_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """``(H, W, channels)`` float32 in ``[0, 1]`` (resized to ``size`` = (H, W) if given)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise CliError("reading images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise CliError(f"{path} is not an image (or not a format Pillow reads)") from None
    except OSError as exc:
        raise CliError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_images(paths: Sequence[Path], channels: int, size: tuple[int, int] | None,
                mean: np.ndarray, std: np.ndarray, channels_last: bool) -> np.ndarray:
    """Stack of preprocessed images ``(N, C, H, W)`` (or ``(N, H, W, C)``), float32."""
    images = [load_image(p, channels, size) for p in paths]
    shapes = {im.shape[:2] for im in images}
    if len(shapes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(shapes)[:4])
        raise CliError(f"the images differ in size ({listed}); give --size H W to resize them")
    x = (np.stack(images) - mean) / std
    x = x.astype(np.float32)
    return x if channels_last else np.ascontiguousarray(np.moveaxis(x, -1, 1))


def _per_channel(values: Sequence[float] | None, channels: int, default: float, name: str
                 ) -> np.ndarray:
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    if len(values) not in (1, channels):
        takes = "1 value" if channels == 1 else f"1 or {channels} values"
        raise CliError(f"--{name} takes {takes} (the model's input has {channels} "
                       f"channel{'s' if channels > 1 else ''}), got {len(values)}")
    arr = np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).copy()
    if name == "std" and np.any(arr <= 0):
        raise CliError(f"--std values must be > 0, got {list(values)}")
    return arr


def _batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


def _progress(iterable: Any, **kwargs: Any) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the extras
        return iterable
    # disable=None: no bar when stderr is not a terminal (pipes, CI logs, tests).
    return tqdm(iterable, disable=None, file=sys.stderr, **kwargs)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


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
    from ._demo import DEMO_LAYER, demo_figure
    from .datasets import cluttered_digits
    from .metrics import bounding_box_score

    t0 = time.perf_counter()
    if not 1 <= args.n <= 64:
        raise CliError(f"--n must be between 1 and 64, got {args.n}")
    if args.estimate_samples < 1:
        raise CliError(f"--estimate-samples must be >= 1, got {args.estimate_samples}")
    out = check_out(Path(args.out))
    runner = load_runner(args.backend)
    model = runner.demo_model()
    try:
        estimation = cluttered_digits(args.estimate_samples, split="train", seed=args.seed)
        test = cluttered_digits(args.n, split="test", seed=args.seed)
    except ImportError as exc:
        raise CliError(str(exc)) from None
    to_model = (lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))) if runner.channels_last \
        else (lambda a: a)
    session = runner.session(model, DEMO_LAYER, to_model(test.images[:1]))
    t_setup = time.perf_counter()

    session.estimate((to_model(b) for b in _batches(estimation.images, 250)),
                     args.estimate_samples, progbar=False)
    t_estimate = time.perf_counter()

    x = to_model(test.images)
    predicted = session.predict(x).argmax(axis=1)
    # All N images in one call; NumPy noise: the same draws, so the same maps, in every backend.
    maps = session.explain(x, test.labels, seed=args.seed, noise="numpy")
    t_explain = time.perf_counter()

    bits = maps.reshape(len(maps), -1).sum(axis=1)
    scores = bounding_box_score(maps, test.boxes)
    box_area = (test.boxes[:, 2] - test.boxes[:, 0]) * (test.boxes[:, 3] - test.boxes[:, 1])
    chance = box_area / float(maps.shape[1] * maps.shape[2])
    c, h, w = session.feature_shape
    title = (f"IBA on cluttered digits ({runner.name}, bottleneck at {DEMO_LAYER}, "
             f"{c}x{h}x{w}): green/white box = the digit")
    png = demo_figure(test.images, maps, test.boxes, test.labels, predicted, scores,
                      title=title)
    npz = npz_bytes(saliency_maps=maps.astype(np.float32), images=test.images,
                    labels=test.labels, predicted=predicted, boxes=test.boxes,
                    total_bits=bits, top_n_in_box=scores, seed=np.int64(args.seed),
                    layer=np.str_(DEMO_LAYER), backend=np.str_(runner.name))
    written = write_outputs(out, {"demo.png": png, "saliency_maps.npz": npz})
    t_end = time.perf_counter()

    print(f"IBA demo: {args.n} cluttered-digit test images (seed {args.seed}), {runner.name} "
          f"backend, bottleneck at {DEMO_LAYER} ({c}x{h}x{w})")
    print(f"{'image':>5}  {'digit':>5}  {'pred':>4}  {'bits':>7}  {'top-n in box':>12}  "
          f"{'chance':>6}")
    for i in range(args.n):
        print(f"{i:>5}  {int(test.labels[i]):>5}  {int(predicted[i]):>4}  {bits[i]:>7.1f}  "
              f"{scores[i]:>12.2f}  {chance[i]:>6.2f}")
    print(f"{'mean':>5}  {'':>5}  {'':>4}  {bits.mean():>7.1f}  {scores.mean():>12.2f}  "
          f"{chance.mean():>6.2f}")
    print("top-n in box: share of the n highest-attributed pixels inside the digit's box "
          "(n = box area); chance = box area / image area")
    dt_explain = t_explain - t_estimate
    print(f"time: setup {t_setup - t0:.1f} s, estimate ({args.estimate_samples} images) "
          f"{t_estimate - t_setup:.1f} s, explain ({args.n} images, one batched call) "
          f"{dt_explain:.1f} s = {dt_explain / args.n:.2f} s/image, figure and files "
          f"{t_end - t_explain:.1f} s, total {t_end - t0:.1f} s")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


# -- iba layers / iba explain -------------------------------------------------------------
def _size(values: Sequence[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise CliError(f"--size takes H W (or one value for a square), got {len(values)} values")
    h, w = (values[0], values[0]) if len(values) == 1 else values
    if h < 1 or w < 1:
        raise CliError(f"--size must be positive, got {list(values)}")
    return int(h), int(w)


def _open_model(args: argparse.Namespace) -> tuple[Runner, Any]:
    backend = args.backend if args.backend != "auto" else backend_for_model(args.model)
    runner = load_runner(backend, device=args.device)
    return runner, runner.load_model(args.model, args.weights, args.device)


def _channels(args: argparse.Namespace, runner: Runner, model: Any) -> int:
    if args.channels is not None:
        if args.channels not in (1, 3):
            raise CliError(f"--channels must be 1 (greyscale) or 3 (RGB), got {args.channels}")
        return int(args.channels)
    guessed = runner.input_channels(model)
    return guessed if guessed in (1, 3) else 3


def cmd_layers(args: argparse.Namespace) -> int:
    runner, model = _open_model(args)
    channels = _channels(args, runner, model)
    h, w = _size(args.size) or runner.image_size(model) or (224, 224)
    shape = (h, w, channels) if runner.channels_last else (channels, h, w)
    rows = runner.layer_table(model, shape)
    width = max([len(r[0]) for r in rows] + [5])
    type_width = max([len(r[1]) for r in rows] + [4])
    print(f"layers of {args.model} for an input of shape {shape} "
          "(output shapes per sample; '-' = not run):")
    print(f"{'layer':<{width}}  {'type':<{type_width}}  output shape")
    for name, kind, out_shape in rows:
        print(f"{name:<{width}}  {kind:<{type_width}}  {out_shape}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ._demo import overlay_figure

    if args.estimate is None and args.estimate_from is None:
        raise CliError("the bottleneck needs feature statistics: give --estimate-from FOLDER "
                       "(images like the ones to explain) or --estimate FILE.npz")
    if args.estimate is not None and args.estimate_from is not None:
        raise CliError("give either --estimate-from or --estimate, not both")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.n_samples < 1:
        raise CliError(f"--n-samples must be >= 1, got {args.n_samples}")
    size = _size(args.size)
    out = check_out(Path(args.out))
    image_paths = find_images(args.images, "--images")
    estimate_paths = (find_images(args.estimate_from, "--estimate-from")
                      if args.estimate_from else [])
    if args.estimate is not None and not Path(args.estimate).is_file():
        raise CliError(f"--estimate: no such file: {args.estimate}")

    runner, model = _open_model(args)
    size = size or runner.image_size(model)
    channels = _channels(args, runner, model)
    mean = _per_channel(args.mean, channels, 0.0, "mean")
    std = _per_channel(args.std, channels, 1.0, "std")
    x = load_images(image_paths, channels, size, mean, std, runner.channels_last)
    settings = {"beta": args.beta, "optimization_steps": args.steps}
    session = runner.session(model, args.layer, x[:1], **settings)

    logits = session.predict(x)
    n_classes = int(logits.shape[1])
    predicted = logits.argmax(axis=1)
    if args.target is not None:
        if not 0 <= args.target < n_classes:
            raise CliError(f"--target {args.target} is out of range: the model has {n_classes} "
                           f"classes (0..{n_classes - 1})")
        targets = np.full(len(x), args.target, dtype=np.int64)
    else:
        targets = predicted.astype(np.int64)

    if args.estimate is not None:
        session.set_estimator(_load_estimate(Path(args.estimate), session.feature_shape,
                                             args.layer))
    else:
        count = min(len(estimate_paths), args.n_samples)
        # Statistics must match the explained images' feature shape: same pixel size.
        est_size = size or (x.shape[1:3] if runner.channels_last else x.shape[2:4])
        est_x = (load_images(chunk, channels, est_size, mean, std, runner.channels_last)
                 for chunk in _path_chunks(estimate_paths[:count], 64))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session.estimate(est_x, count, progbar=True)
        # Each distinct warning as one line, e.g. FewSamplesWarning below 1,000 images.
        for message in dict.fromkeys(_one_line(str(w.message)) for w in caught):
            _warn(message)

    maps = []
    chunks = range(0, len(x), args.batch_size)
    for i in _progress(chunks, desc="explain", unit="batch"):
        maps.append(session.explain(x[i:i + args.batch_size], targets[i:i + args.batch_size],
                                    seed=args.seed + i, noise=args.noise))
    maps_arr = np.concatenate(maps).astype(np.float32)
    bits = maps_arr.reshape(len(maps_arr), -1).sum(axis=1)

    names = _unique_names(image_paths)
    files: dict[str, bytes] = {}
    shown = x if runner.channels_last else np.moveaxis(x, 1, -1)
    shown = shown * std + mean
    for name, m, img, t, p, b in zip(names, maps_arr, shown, targets, predicted, bits):
        title = f"{name}: class {int(t)} (predicted {int(p)}), {b:.1f} bits"
        files[f"{name}_saliency.png"] = overlay_figure(m, np.clip(img, 0, 1), title)
    files["saliency_maps.npz"] = npz_bytes(
        saliency_maps=maps_arr, files=np.array([str(p) for p in image_paths]),
        targets=targets, predicted=predicted, total_bits=bits, layer=np.str_(args.layer))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["file", "target", "predicted", "total_bits", "max_bits_per_pixel",
                     "saliency_png"])
    for path, name, t, p, b, m in zip(image_paths, names, targets, predicted, bits, maps_arr):
        writer.writerow([str(path), int(t), int(p), f"{b:.4f}", f"{float(m.max()):.6f}",
                         f"{name}_saliency.png"])
    files["summary.csv"] = table.getvalue().encode()
    if args.save_estimate is not None:
        estimator = session.estimator()
        try:
            with atomic_path(Path(args.save_estimate), suffix=".npz") as tmp:
                estimator.save(tmp)
        except OSError as exc:
            raise CliFailure(f"cannot write --save-estimate {args.save_estimate}: "
                             f"{exc.strerror or exc}") from None
    write_outputs(out, files)
    print(f"explained {len(x)} images at layer {args.layer}: mean {bits.mean():.1f} bits "
          f"per image; wrote {len(files)} files to {out}")
    return 0


def _path_chunks(paths: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(paths), size):
        yield list(paths[i:i + size])


def _load_estimate(path: Path, feature_shape: tuple[int, ...], layer: str) -> Any:
    from ._estimator import Estimator

    try:
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
    except OSError as exc:
        raise CliError(f"cannot read the estimate {path}: {exc.strerror or exc}") from None
    except Exception:
        raise CliError(f"cannot read the estimate {path}: not an .npz file written by "
                       "--save-estimate") from None
    estimator = Estimator()
    try:
        estimator.load_state_dict(state, expected_shape=feature_shape)
    except ValueError as exc:
        raise CliError(f"the estimate {path} does not fit layer {layer!r}: {exc}") from None
    return estimator


# -- argument parsing ---------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus the exit status 2)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
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
        "demo", help="explain a small CNN on cluttered digits (no download needed)",
        description="Estimate the bottleneck statistics of a small pretrained CNN, explain "
                    "test images of cluttered handwritten digits in one batched call, and "
                    "score how much of each map falls on the digit's box. Writes demo.png "
                    "and saliency_maps.npz to --out.",
    )
    demo.add_argument("--backend", default="torch", choices=["torch", "tensorflow", "tf"],
                      help="framework to run in (default: torch)")
    demo.add_argument("--out", default="iba-demo-out", metavar="DIR",
                      help="output folder (default: iba-demo-out)")
    demo.add_argument("--n", type=int, default=8, metavar="N",
                      help="number of test images to explain (default: 8)")
    demo.add_argument("--seed", type=int, default=0, metavar="S",
                      help="seed of the images and the noise (default: 0)")
    demo.add_argument("--estimate-samples", type=int, default=1000, metavar="M",
                      help="images to estimate the feature statistics on (default: 1000)")
    demo.set_defaults(func=cmd_demo)

    common = _Parser(add_help=False)
    common.add_argument("model", metavar="MODEL",
                        help="PyTorch: 'package.module:factory' or 'file.py:factory' (a "
                             "callable returning the model); Keras: a .keras file")
    common.add_argument("--weights", metavar="FILE",
                        help="PyTorch state_dict (.pt/.pth, or .npz) to load into the model")
    common.add_argument("--backend", default="auto",
                        choices=["auto", "torch", "tensorflow", "tf"],
                        help="default: from MODEL (.keras -> tensorflow, else torch)")
    common.add_argument("--device", metavar="DEV",
                        help="device to run on, e.g. cpu, cuda, cuda:1 (default: the model's)")
    common.add_argument("--size", type=int, nargs="+", metavar="PX",
                        help="resize inputs to H W pixels (one value: square)")
    common.add_argument("--channels", type=int, metavar="C",
                        help="1 (greyscale) or 3 (RGB); default: from the model's first layer")

    layers = sub.add_parser(
        "layers", parents=[common], help="list a model's layers and their output shapes",
        description="List the layers of MODEL with their output shapes, found by running the "
                    "model once on zeros of --size (default 224x224). Any of them can be "
                    "given to 'iba explain --layer'.",
    )
    layers.set_defaults(func=cmd_layers)

    explain = sub.add_parser(
        "explain", parents=[common], help="explain your own model's decisions on your images",
        description="Put a bottleneck at --layer of MODEL, estimate its statistics, and "
                    "explain --images: one saliency PNG per image, saliency_maps.npz and "
                    "summary.csv in --out.",
    )
    explain.add_argument("--layer", required=True, metavar="NAME",
                         help="layer to put the bottleneck at (see 'iba layers MODEL')")
    explain.add_argument("--images", required=True, nargs="+", metavar="PATH",
                         help="image files or folders to explain")
    explain.add_argument("--estimate-from", nargs="+", metavar="PATH",
                         help="image files or folders to estimate the feature statistics on")
    explain.add_argument("--estimate", metavar="FILE.npz",
                         help="statistics saved earlier with --save-estimate")
    explain.add_argument("--save-estimate", metavar="FILE.npz",
                         help="save the statistics to reuse them with --estimate")
    explain.add_argument("--n-samples", type=int, default=10000, metavar="M",
                         help="use at most M images of --estimate-from (default: 10000)")
    explain.add_argument("--mean", type=float, nargs="+", metavar="M",
                         help="per-channel mean subtracted from pixels in [0, 1] (default 0)")
    explain.add_argument("--std", type=float, nargs="+", metavar="S",
                         help="per-channel std the pixels are divided by (default 1)")
    explain.add_argument("--target", type=int, metavar="CLASS",
                         help="class to explain (default: each image's predicted class)")
    explain.add_argument("--out", default="iba-explain-out", metavar="DIR",
                         help="output folder (default: iba-explain-out)")
    explain.add_argument("--batch-size", type=int, default=8, metavar="B",
                         help="images explained per batched call (default: 8)")
    explain.add_argument("--beta", type=float, default=10.0,
                         help="weight of the information term (default: 10)")
    explain.add_argument("--steps", type=int, default=10,
                         help="optimisation steps per batch (default: 10)")
    explain.add_argument("--seed", type=int, default=0,
                         help="noise seed; image k draws from stream seed + k (default: 0)")
    explain.add_argument("--noise", choices=["backend", "numpy"], default="backend",
                         help="noise generator: the framework's, on the device (default), or "
                              "NumPy's, the same numbers in every framework and on every device")
    explain.set_defaults(func=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iba`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prog = f"{PROG} {args.command}"
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("IBA_DEBUG"):
            raise
        print(f"{prog}: error: {type(exc).__name__}: {_one_line(str(exc))} "
              "(set IBA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    # ``python -m iba_core.cli``: run the imported module's main, so that the backends'
    # ``from iba_core.cli import CliError`` is the class caught here.
    from iba_core.cli import main as _main

    sys.exit(_main())
