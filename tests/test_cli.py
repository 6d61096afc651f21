"""The ``iba`` command, driven as a user drives it.

Happy paths and a sample of mistakes run the real command in a subprocess
(``python -m iba_core.apps.cli``, what the ``iba`` script calls); the full list of bad inputs
calls ``main(argv)`` in-process, the function the console script runs, to stay fast.
Every bad input must give one line on stderr, a non-zero exit and no output files.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from iba_core.apps.cli import main
from iba_core.apps.cli import smoothing as cli_smoothing

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test models are tiny: one thread is fastest, and by far on a busy machine."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def iba(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("IBA_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "iba_core.apps.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def assert_one_line_error(
    proc_or_err: subprocess.CompletedProcess[str] | str, code: int, *fragments: str
) -> str:
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    if not isinstance(proc_or_err, str):
        assert proc_or_err.returncode == code, (proc_or_err.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("iba"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- without any framework ------------------------------------------------------------------
def test_help_and_version_need_no_framework():
    proc = iba("--help")
    assert proc.returncode == 0
    for command in ("demo", "explain", "layers"):
        assert command in proc.stdout
    code = textwrap.dedent("""
        import sys
        from iba_core.apps.cli import build_parser
        build_parser()
        print([m for m in ("torch", "tensorflow", "keras") if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "iba"]
    assert ep.value == "iba_core.apps.cli:main"
    assert ep.load() is main


def test_usage_errors_are_one_line():
    bare = iba()  # no command: the help, and a non-zero exit
    assert bare.returncode == 2 and "usage: iba" in bare.stdout and not bare.stderr
    assert_one_line_error(iba("demo", "--n", "many"), 2, "argument --n: must be an integer, got 'many'")
    assert_one_line_error(
        iba("explain", "m:f", "--images", "x.png"), 2, "the following arguments are required: --layer"
    )


def test_model_spec_that_is_neither_torch_nor_keras(capsys):
    assert main(["layers", "model.onnx"]) == 2
    assert_one_line_error(capsys.readouterr().err, 2, "cannot tell what kind of model")


# -- with PyTorch ---------------------------------------------------------------------------
torch_only = pytest.mark.torch
MODEL = "iba_torch._demo:demo_cnn"
LAYER = "features.relu3"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Cluttered-digit PNGs: 5 to explain, 120 to estimate on, as a user would have them."""
    from PIL import Image

    from iba_core.apps.datasets import cluttered_digits

    root = tmp_path_factory.mktemp("cli")
    test = cluttered_digits(5, split="test", seed=11)
    train = cluttered_digits(120, split="train", seed=12)
    for name, data in (("images", test), ("estimate", train)):
        (root / name).mkdir()
        for i, img in enumerate(data.images):
            Image.fromarray(np.round(img[0] * 255).astype(np.uint8)).save(root / name / f"digit{i:03d}.png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "fake.png").write_text("not an image either\n")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "small.png")
    (root / "mymodel.py").write_text(
        textwrap.dedent("""
        from iba_torch._demo import build_demo_cnn

        def make():
            return build_demo_cnn()

        def broken():
            raise RuntimeError("no GPU here")
    """)
    )
    return {"root": root, "labels": test.labels, "boxes": test.boxes}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``iba demo --n 4`` run once, in a real process."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = iba("demo", "--n", "4", "--seed", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, out


@torch_only
def test_demo_writes_figure_maps_and_table(demo_run):
    proc, out = demo_run
    assert not proc.stderr.strip()
    assert sorted(p.name for p in out.iterdir()) == ["demo.png", "saliency_maps.npz"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "demo.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    with np.load(out / "saliency_maps.npz") as f:
        maps, bits, scores = f["saliency_maps"], f["total_bits"], f["top_n_in_box"]
        labels, predicted, boxes = f["labels"], f["predicted"], f["boxes"]
        assert str(f["layer"]) == LAYER and str(f["backend"]) == "torch"
    assert maps.shape == (4, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0.0
    np.testing.assert_allclose(maps.reshape(4, -1).sum(axis=1), bits, rtol=1e-4)
    from iba_core.apps.datasets import cluttered_digits
    from iba_core.apps.metrics import bounding_box_score

    expected = cluttered_digits(4, split="test", seed=0)
    np.testing.assert_array_equal(labels, expected.labels)
    np.testing.assert_array_equal(boxes, expected.boxes)
    np.testing.assert_allclose(scores, bounding_box_score(maps, boxes))
    # The pretrained CNN gets these right, and IBA points at the digit: far more of the
    # top-n pixels inside the box than chance (about 0.1 here).
    np.testing.assert_array_equal(predicted, labels)
    assert np.all(bits > 1.0)
    assert scores.mean() > 0.6 and scores.min() > 0.3
    # The table: one row per image with the same numbers, then the mean and the timings.
    rows = [
        line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])
    ]
    assert len(rows) == 4
    for i, row in enumerate(rows):
        assert int(row[1]) == labels[i] and int(row[2]) == predicted[i]
        assert float(row[3]) == pytest.approx(bits[i], abs=0.06)
        assert float(row[4]) == pytest.approx(scores[i], abs=0.006)
    assert "one batched call" in proc.stdout and "total" in proc.stdout


@torch_only
def test_demo_is_deterministic_and_batch_independent(demo_run, tmp_path):
    """Same seed, fewer images: the first two maps are those of the 4-image run."""
    _, out = demo_run
    assert main(["demo", "--n", "2", "--seed", "0", "--out", str(tmp_path)]) == 0
    with np.load(out / "saliency_maps.npz") as a, np.load(tmp_path / "saliency_maps.npz") as b:
        np.testing.assert_allclose(b["saliency_maps"], a["saliency_maps"][:2], rtol=1e-4, atol=1e-6)


@torch_only
def test_demo_rejects_bad_options(tmp_path, capsys):
    assert main(["demo", "--n", "0", "--out", str(tmp_path / "x")]) == 2
    assert_one_line_error(
        capsys.readouterr().err, 2, "argument --n: must be an integer between 1 and 64, got '0'"
    )
    assert not (tmp_path / "x").exists()


@torch_only
def test_layers_lists_names_types_and_shapes(folders):
    pytest.importorskip("torch")
    proc = iba("layers", MODEL, "--size", "64")
    assert proc.returncode == 0, proc.stderr
    table = {line.split()[0]: line.split(maxsplit=2)[1:] for line in proc.stdout.splitlines()[2:]}
    assert table["features.conv1"] == ["Conv2d", "(16, 64, 64)"]
    assert table[LAYER] == ["ReLU", "(64, 16, 16)"]
    assert table["classifier.fc"] == ["Linear", "(10,)"]
    assert "input of shape (1, 64, 64)" in proc.stdout  # one channel, from the first conv


@pytest.fixture(scope="module")
def explained(folders, tmp_path_factory):
    """``iba explain`` on the demo CNN, run once in a real process from the images' folder."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("explained")
    proc = iba(
        "explain",
        MODEL,
        "--layer",
        LAYER,
        "--images",
        "images",
        "--estimate-from",
        "estimate",
        "--save-estimate",
        str(tmp / "est.npz"),
        "--out",
        str(tmp / "out"),
        "--batch-size",
        "3",
        "--noise",
        "numpy",
        cwd=folders["root"],
    )
    assert proc.returncode == 0, proc.stderr
    return proc, tmp / "out", tmp / "est.npz"


@torch_only
def test_explain_writes_overlays_maps_and_summary(folders, explained):
    proc, out, _ = explained
    # 120 estimation images: below the recommended 1,000, said in one warning line.
    assert proc.stderr.strip().startswith("iba: warning: the statistics rest on 120 samples")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "explained 5 images at layer features.relu3" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"digit{i:03d}_saliency.png" for i in range(5)] + ["saliency_maps.npz", "summary.csv"]
    )
    with np.load(out / "saliency_maps.npz") as f:
        maps, predicted, targets = f["saliency_maps"], f["predicted"], f["targets"]
        files = [Path(p).name for p in f["files"]]
    assert files == [f"digit{i:03d}.png" for i in range(5)]
    assert maps.shape == (5, 64, 64) and maps.min() >= 0.0
    np.testing.assert_array_equal(targets, predicted)  # default: the predicted class
    np.testing.assert_array_equal(predicted, folders["labels"])
    from iba_core.apps.metrics import bounding_box_score

    assert bounding_box_score(maps, folders["boxes"]).mean() > 0.5
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["predicted"]) for r in rows] == predicted.tolist()
    np.testing.assert_allclose(
        [float(r["total_bits"]) for r in rows], maps.reshape(5, -1).sum(axis=1), rtol=1e-4
    )


@torch_only
def test_explain_with_a_saved_estimate_and_a_fixed_target(folders, explained, tmp_path):
    """The saved estimate gives the same maps (same seed and noise; the batch size does not
    matter) without the estimation images; ``--target`` explains that class for every image."""
    _, ref, est = explained
    images = str(folders["root"] / "images")
    assert (
        main(
            [
                "explain",
                MODEL,
                "--layer",
                LAYER,
                "--images",
                images,
                "--estimate",
                str(est),
                "--out",
                str(tmp_path / "a"),
                "--noise",
                "numpy",
            ]
        )
        == 0
    )
    with np.load(ref / "saliency_maps.npz") as a, np.load(tmp_path / "a" / "saliency_maps.npz") as b:
        np.testing.assert_allclose(b["saliency_maps"], a["saliency_maps"], rtol=1e-4, atol=1e-6)
        maps = a["saliency_maps"]
    assert (
        main(
            [
                "explain",
                MODEL,
                "--layer",
                LAYER,
                "--images",
                images,
                "--estimate",
                str(est),
                "--out",
                str(tmp_path / "b"),
                "--target",
                "3",
            ]
        )
        == 0
    )
    with np.load(tmp_path / "b" / "saliency_maps.npz") as f:
        assert f["targets"].tolist() == [3] * 5
        assert not np.allclose(f["saliency_maps"], maps)


@torch_only
def test_explain_sigma_sets_the_smoothing(folders, explained, tmp_path):
    """``--sigma 1`` is the default for images; ``--sigma 0`` turns smoothing off."""
    _, ref, est = explained
    images = str(folders["root"] / "images")
    common = ["explain", MODEL, "--layer", LAYER, "--images", images, "--estimate", str(est)]
    common += ["--noise", "numpy"]
    for sigma in ("1", "0"):
        assert main([*common, "--sigma", sigma, "--out", str(tmp_path / sigma)]) == 0
    with (
        np.load(ref / "saliency_maps.npz") as default,
        np.load(tmp_path / "1" / "saliency_maps.npz") as one,
        np.load(tmp_path / "0" / "saliency_maps.npz") as none,
    ):
        np.testing.assert_allclose(one["saliency_maps"], default["saliency_maps"], rtol=1e-4, atol=1e-6)
        assert not np.allclose(none["saliency_maps"], default["saliency_maps"], rtol=1e-2)
    assert cli_smoothing(None, default=1.0) == 1.0 and cli_smoothing(0.0, default=1.0) is None


@torch_only
def test_explain_user_factory_file_with_weights(folders, explained, tmp_path):
    """``module:factory`` from the current folder plus a state_dict saved by torch.save."""
    torch = pytest.importorskip("torch")
    from iba_torch._demo import demo_cnn

    _, ref, est = explained
    torch.save(demo_cnn().state_dict(), tmp_path / "weights.pt")
    proc = iba(
        "explain",
        "mymodel:make",
        "--weights",
        str(tmp_path / "weights.pt"),
        "--layer",
        LAYER,
        "--images",
        "images",
        "--estimate",
        str(est),
        "--out",
        str(tmp_path / "mine"),
        "--noise",
        "numpy",
        cwd=folders["root"],
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(ref / "saliency_maps.npz") as a, np.load(tmp_path / "mine" / "saliency_maps.npz") as b:
        np.testing.assert_allclose(b["saliency_maps"], a["saliency_maps"], rtol=1e-4, atol=1e-6)


@torch_only
def test_bad_inputs_in_a_real_process(folders, tmp_path):
    """A sample of mistakes through the real command: one line, exit 2, no traceback."""
    pytest.importorskip("torch")
    root = folders["root"]
    out = tmp_path / "never"
    base = ["explain", MODEL, "--estimate-from", "estimate", "--out", str(out)]
    assert_one_line_error(
        iba(*base, "--layer", "features.conv9", "--images", "images", cwd=root),
        2,
        "layer 'features.conv9' not found",
        "features.conv1",
        "features.relu3",
    )
    assert_one_line_error(
        iba(*base, "--layer", LAYER, "--images", "fake.png", cwd=root), 2, "fake.png is not an image"
    )
    assert_one_line_error(
        iba(
            "explain",
            "no_such_module:make",
            "--layer",
            LAYER,
            "--images",
            "images",
            "--estimate-from",
            "estimate",
            cwd=root,
        ),
        2,
        "cannot import 'no_such_module'",
    )
    assert not out.exists()


def _bad(argv: list[str], capsys, *fragments: str, code: int = 2) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    return assert_one_line_error(captured.err, code, *fragments)


@torch_only
def test_every_bad_input_is_one_clear_line(folders, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    root = folders["root"]
    monkeypatch.chdir(root)
    out = tmp_path / "never"
    ok = ["--layer", LAYER, "--images", "images", "--out", str(out)]
    est = ["--estimate-from", "estimate"]

    # files
    _bad(
        ["explain", MODEL, *est, "--layer", LAYER, "--images", "missing.png"],
        capsys,
        "no such file or folder: missing.png",
    )
    _bad(
        ["explain", MODEL, *est, "--layer", LAYER, "--images", "notes.txt"],
        capsys,
        "notes.txt is not an image",
    )
    _bad(
        ["explain", MODEL, *est, "--layer", LAYER, "--images", "images", "small.png"],
        capsys,
        "images differ in size",
        "--size",
    )
    _bad(
        ["explain", MODEL, "--estimate-from", "nowhere", *ok],
        capsys,
        "--estimate-from: no such file or folder: nowhere",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(["explain", MODEL, "--estimate-from", str(empty), *ok], capsys, "no images in folder")
    _bad(["explain", MODEL, *ok], capsys, "give --estimate-from FOLDER")
    _bad(["explain", MODEL, *ok, "--estimate", "est.npz", *est], capsys, "not both")
    _bad(
        ["explain", MODEL, *ok, "--estimate", "missing.npz"], capsys, "--estimate: no such file: missing.npz"
    )
    _bad(["explain", MODEL, *ok, "--estimate", "notes.txt"], capsys, "cannot read the estimate notes.txt")
    # model specs
    _bad(["explain", "mymodel:nothing", *ok, *est], capsys, "'mymodel' has no attribute")
    _bad(
        ["explain", "mymodel:broken", *ok, *est],
        capsys,
        "calling the factory failed with RuntimeError: no GPU here",
    )
    _bad(["explain", "missing.py:make", *ok, *est], capsys, "no such file: missing.py")
    _bad(["explain", "os:sep", *ok, *est], capsys, "not a callable")
    _bad(
        ["explain", "mymodel:make", "--weights", "missing.pt", *ok, *est],
        capsys,
        "--weights: no such file: missing.pt",
    )
    _bad(
        ["explain", "mymodel:make", "--weights", "notes.txt", *ok, *est],
        capsys,
        "--weights notes.txt: not a PyTorch state_dict",
    )
    import torch

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    _bad(
        ["explain", "mymodel:make", "--weights", str(tmp_path / "other.pt"), *ok, *est],
        capsys,
        "does not fit the model",
    )
    # layer, target, preprocessing, device
    _bad(
        ["explain", MODEL, *est, "--layer", "nope", "--images", "images"],
        capsys,
        "layer 'nope' not found",
        "iba layers MODEL",
    )
    _bad(
        ["explain", MODEL, *ok, *est, "--target", "10"],
        capsys,
        "--target 10 is out of range: the model has 10 classes (0..9)",
    )
    _bad(
        ["explain", MODEL, *ok, *est, "--mean", "0.1", "0.2"],
        capsys,
        "--mean takes 1 value (the model's input has 1 channel), got 2",
    )
    _bad(
        ["explain", MODEL, *ok, *est, "--std", "0"],
        capsys,
        "argument --std: must be a finite number > 0, got '0'",
    )
    _bad(["explain", MODEL, *ok, *est, "--channels", "3"], capsys, "the model failed on input")
    _bad(["explain", MODEL, *ok, *est, "--device", "tpu9"], capsys, "--device 'tpu9'")
    _bad(
        ["explain", MODEL, *ok, *est, "--batch-size", "0"],
        capsys,
        "argument --batch-size: must be an integer >= 1",
    )
    # an estimate of another layer does not fit this one
    assert (
        main(
            [
                "explain",
                MODEL,
                "--layer",
                LAYER,
                "--images",
                "images",
                *est,
                "--save-estimate",
                str(tmp_path / "e.npz"),
                "--n-samples",
                "20",
                "--out",
                str(tmp_path / "fine"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    _bad(
        [
            "explain",
            MODEL,
            "--layer",
            "features.relu2",
            "--images",
            "images",
            "--estimate",
            str(tmp_path / "e.npz"),
            "--out",
            str(tmp_path / "never2"),
        ],
        capsys,
        "does not fit",
        f"made for layer {LAYER!r}, not 'features.relu2'",
    )
    # ... even when the shapes agree (conv3 feeds relu3: both 64x16x16)
    _bad(
        [
            "explain",
            MODEL,
            "--layer",
            "features.conv3",
            "--images",
            "images",
            "--estimate",
            str(tmp_path / "e.npz"),
            "--out",
            str(tmp_path / "never2"),
        ],
        capsys,
        "does not fit",
        f"made for layer {LAYER!r}, not 'features.conv3'",
    )
    # the output folder is a file
    _bad(
        ["explain", MODEL, *est, "--layer", LAYER, "--images", "images", "--out", "notes.txt"],
        capsys,
        "--out notes.txt exists and is not a folder",
    )
    assert not out.exists() and not (tmp_path / "never2").exists()
    # no temporary files left behind anywhere
    assert not [p for p in Path(root).rglob(".*") if p.is_file()]
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


@torch_only
def test_layers_bad_inputs(capsys):
    pytest.importorskip("torch")
    _bad(["layers", MODEL, "--size", "1", "2", "3"], capsys, "--size takes H W")
    _bad(["layers", "iba_torch._demo:DEMO_LAYER"], capsys, "not a callable")
    _bad(["layers", "iba_torch._demo:weights_path"], capsys, "returned a PosixPath", "not a torch.nn.Module")


# -- with TensorFlow / Keras ----------------------------------------------------------------
tf_only = pytest.mark.tf


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """The Keras demo CNN saved as a user's ``.keras`` file."""
    pytest.importorskip("tensorflow")
    from iba_tf._demo import demo_cnn

    path = tmp_path_factory.mktemp("keras") / "digits.keras"
    demo_cnn().save(path)
    return path


def _torch_or_none(request, fixture: str):
    """A torch-made fixture's value when PyTorch is installed, else ``None``."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return request.getfixturevalue(fixture)


@tf_only
def test_demo_tensorflow(tmp_path, request):
    """The Keras demo classifies and localises like the PyTorch one; with the same NumPy
    noise and the same weights it draws the very maps of the PyTorch demo."""
    pytest.importorskip("tensorflow")
    assert main(["demo", "--backend", "tensorflow", "--n", "2", "--out", str(tmp_path)]) == 0
    with np.load(tmp_path / "saliency_maps.npz") as f:
        assert str(f["backend"]) == "tf"  # the registered name; "tensorflow" selects it
        maps, predicted, labels = f["saliency_maps"], f["predicted"], f["labels"]
        assert maps.shape == (2, 64, 64)
        np.testing.assert_array_equal(predicted, labels)
        assert f["top_n_in_box"].min() > 0.6
    torch_run = _torch_or_none(request, "demo_run")
    if torch_run is not None:
        with np.load(torch_run[1] / "saliency_maps.npz") as a:
            expected = a["saliency_maps"][:2]
        np.testing.assert_allclose(maps, expected, rtol=1e-3, atol=1e-3 * expected.max())


@tf_only
def test_explain_and_layers_for_a_keras_file(folders, keras_file, tmp_path, capsys, request):
    """A ``.keras`` file: layers listed with channels-last shapes; explained like the
    PyTorch model (same statistics, which are stored channels-first, and with NumPy noise
    the same maps)."""
    pytest.importorskip("tensorflow")
    assert main(["layers", str(keras_file)]) == 0
    out = capsys.readouterr().out
    assert "input of shape (64, 64, 1)" in out  # the size the model declares
    table = {line.split()[0]: line.split(maxsplit=2)[1:] for line in out.splitlines()[2:]}
    assert table[LAYER] == ["ReLU", "(16, 16, 64)"]
    assert table["classifier.fc"] == ["Dense", "(10,)"]

    root = folders["root"]
    assert (
        main(
            [
                "explain",
                str(keras_file),
                "--layer",
                LAYER,
                "--images",
                str(root / "images"),
                "--estimate-from",
                str(root / "estimate"),
                "--save-estimate",
                str(tmp_path / "est.npz"),
                "--out",
                str(tmp_path / "k"),
                "--noise",
                "numpy",
            ]
        )
        == 0
    )
    assert "rest on 120 samples" in capsys.readouterr().err
    with np.load(tmp_path / "k" / "saliency_maps.npz") as f:
        maps, predicted = f["saliency_maps"], f["predicted"]
    np.testing.assert_array_equal(predicted, folders["labels"])
    from iba_core.apps.metrics import bounding_box_score

    assert bounding_box_score(maps, folders["boxes"]).mean() > 0.5
    torch_run = _torch_or_none(request, "explained")
    if torch_run is not None:
        _, ref, torch_est = torch_run
        with np.load(ref / "saliency_maps.npz") as a:
            expected = a["saliency_maps"]
        np.testing.assert_allclose(maps, expected, rtol=1e-3, atol=1e-3 * expected.max())
        with np.load(tmp_path / "est.npz") as a, np.load(torch_est) as b:
            np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)


@tf_only
def test_keras_bad_inputs(folders, keras_file, tmp_path, capsys):
    pytest.importorskip("tensorflow")
    images = [
        "--images",
        str(folders["root"] / "images"),
        "--estimate-from",
        str(folders["root"] / "estimate"),
        "--out",
        str(tmp_path / "never"),
    ]
    _bad(
        ["explain", str(tmp_path / "missing.keras"), "--layer", LAYER, *images], capsys, "no such model file"
    )
    broken = tmp_path / "broken.keras"
    broken.write_text("not a zip")
    _bad(["explain", str(broken), "--layer", LAYER, *images], capsys, "cannot load the Keras model")
    _bad(
        ["explain", str(keras_file), "--layer", "conv9", *images],
        capsys,
        "layer 'conv9' not found",
        "features.relu3",
    )
    _bad(
        ["explain", str(keras_file), "--layer", LAYER, "--device", "tpu:7", *images],
        capsys,
        "--device 'tpu:7' is not usable",
    )
    assert not (tmp_path / "never").exists()


# -- any registered backend: the array-api-strict test backend as a third-party plugin -------
class _StrictModels:
    """The models the test factory hands out, to check afterwards that no hook is left."""

    made: ClassVar[list[Any]] = []


def _strict_classes():
    """A StrictBackend with the command-line methods, and its plugin (array-api-strict
    is imported only by the tests that use them)."""
    pytest.importorskip("array_api_strict")
    import array_api_strict as xp

    from iba_core import BackendSpec, UsageError, hookimpl
    from iba_core.apps.loading import model_from_factory
    from iba_core.contract import InputSpec
    from strict_backend import StrictBackend, StrictModel

    class CliStrictBackend(StrictBackend):
        """What a third-party backend adds for the ``iba`` command."""

        name = "strict-cli"

        def claims_model(self, spec: str) -> bool:
            return spec.endswith(":make_strict")

        def load_model(self, spec, weights=None, device=None):
            if weights is not None or device is not None:
                raise UsageError("the strict test backend takes no --weights or --device")
            return model_from_factory(spec, StrictModel, "StrictModel")

        def describe_input(self, model):
            return InputSpec(channels=3, size=(6, 6), channels_last=False)

        def to_device(self, x, model):
            return xp.astype(x, model.dtype)

    class SecondBackend(CliStrictBackend):
        name = "strict-cli-2"

    class Plugin:
        def __init__(self, spec):
            self.spec = spec

        @hookimpl
        def iba_register_backends(self, register):
            register(self.spec)

    return CliStrictBackend, SecondBackend, Plugin, BackendSpec, StrictModel


@pytest.fixture
def strict_cli(tmp_path):
    """Two command-line-capable strict backends registered in-process ('strict-cli', alias
    'strictly', and 'strict-cli-2'), and a factory file that makes their models."""
    import iba_core

    first, second, plugin_cls, spec_cls, _ = _strict_classes()
    plugins = [
        plugin_cls(spec_cls("strict-cli", modules=first.modules, loader=first, aliases=("strictly",))),
        plugin_cls(spec_cls("strict-cli-2", modules=first.modules, loader=second)),
    ]
    pm = iba_core.plugin_manager()
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"cli-strict-test-{i}")
    (tmp_path / "strict_factory.py").write_text(
        textwrap.dedent("""
        import test_cli
        from strict_backend import StrictModel

        def make_strict():
            model = StrictModel()
            test_cli._StrictModels.made.append(model)
            return model
    """)
    )
    _StrictModels.made.clear()
    try:
        yield tmp_path / "strict_factory.py"
    finally:
        for plugin in plugins:
            pm.unregister(plugin)


def _no_hooks_left() -> bool:
    return bool(_StrictModels.made) and all(
        not hooks for model in _StrictModels.made for hooks in model.hooks.values()
    )


def _rgb_pngs(folder: Path, n: int, seed: int) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_registry_aliases(strict_cli):
    """A backend is selected by its name, an alias (any case) or a module it handles; a
    name that fits two backends equally is refused, naming both."""
    import iba_core

    backend = iba_core.get_backend("strict-cli")
    assert iba_core.get_backend("strictly") is backend
    assert iba_core.get_backend("STRICTLY") is backend
    with pytest.raises(LookupError, match="fits several iba backends.*strict-cli, strict-cli-2"):
        iba_core.get_backend("array_api_strict")  # both handle that module
    with pytest.raises(LookupError, match="no iba backend named 'nope'"):
        iba_core.get_backend("nope")
    assert "strict-cli" in iba_core.available_backends()
    assert "strictly" not in iba_core.available_backends()  # aliases are no extra backends


def test_framework_names_select_the_built_in_backends():
    import iba_core

    installed = iba_core.available_backends()
    if "tf" in installed:
        assert iba_core.get_backend("tensorflow").name == "tf"
        assert iba_core.get_backend("Keras").name == "tf"
    if "torch" in installed:
        assert iba_core.get_backend("torch").name == "torch"
    if not {"tf", "torch"} & set(installed):
        pytest.skip("no built-in backend installed")


def test_a_third_party_backend_lists_layers(strict_cli, capsys):
    """``iba layers`` through the contract only: a hook on every layer, one pass over zeros,
    per-sample output shapes; every hook removed afterwards."""
    spec = f"{strict_cli}:make_strict"
    assert main(["layers", spec, "--backend", "strictly"]) == 0
    out = capsys.readouterr().out
    assert "input of shape (3, 6, 6)" in out  # what describe_input declares
    table = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()[2:]}
    assert table == {
        "conv": "(6, 6, 6)",
        "relu": "(6, 6, 6)",
        "pool": "(6, 3, 3)",
        "flatten": "(54,)",
        "fc": "(5,)",
    }
    assert out.splitlines()[1].split() == ["layer", "output", "shape"]  # no layer types
    assert _no_hooks_left()


def test_a_third_party_backend_explains(strict_cli, tmp_path, capsys):
    """``iba explain`` with a backend the command has never heard of: the core engine
    explains, the backend only loads the model, describes its input and converts."""
    images = _rgb_pngs(tmp_path / "images", 2, seed=1)
    estimate_from = _rgb_pngs(tmp_path / "estimate", 4, seed=2)
    out = tmp_path / "out"
    spec = f"{strict_cli}:make_strict"
    argv = [
        "explain",
        spec,
        "--backend",
        "strict-cli",
        "--layer",
        "relu",
        "--images",
        str(images),
        "--estimate-from",
        str(estimate_from),
        "--steps",
        "2",
        "--save-estimate",
        str(tmp_path / "est.npz"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "explained 2 images at layer relu" in captured.out
    assert "iba: warning: the statistics rest on 4 samples" in captured.err
    with np.load(out / "saliency_maps.npz") as f:
        maps, predicted, targets = f["saliency_maps"], f["predicted"], f["targets"]
    assert maps.shape == (2, 6, 6) and maps.dtype == np.float32
    assert np.all(np.isfinite(maps)) and maps.min() >= 0.0 and maps.sum() > 0
    assert set(predicted.tolist()) <= set(range(5))
    np.testing.assert_array_equal(targets, predicted)
    assert sorted(p.name for p in out.iterdir()) == [
        "img0_saliency.png",
        "img1_saliency.png",
        "saliency_maps.npz",
        "summary.csv",
    ]
    with np.load(tmp_path / "est.npz") as f:
        assert f["mean"].shape == (6, 6, 6)
    assert _no_hooks_left()
    # Its mistakes are one line, like the built-in backends'.
    _bad(
        [
            "explain",
            spec,
            "--backend",
            "strict-cli",
            "--layer",
            "nope",
            "--images",
            str(images),
            "--estimate-from",
            str(estimate_from),
            "--out",
            str(tmp_path / "x"),
        ],
        capsys,
        "layer 'nope' not found",
        "conv, relu, pool, flatten, fc",
    )
    _bad(
        [
            "explain",
            spec,
            "--backend",
            "strict-cli",
            "--layer",
            "relu",
            "--images",
            str(images),
            "--estimate",
            str(tmp_path / "est.npz"),
            "--target",
            "7",
            "--out",
            str(tmp_path / "x"),
        ],
        capsys,
        "--target 7 is out of range",
        "5 classes",
    )
    _bad(
        ["layers", spec, "--backend", "strict-cli", "--device", "cuda"],
        capsys,
        "takes no --weights or --device",
    )
    _bad(
        ["layers", spec, "--backend", "strict-cli-3"],
        capsys,
        "no iba backend named 'strict-cli-3'",
        "strict-cli",
        "strict-cli-2",
    )
    assert not (tmp_path / "x").exists()


def test_auto_asks_every_backend(strict_cli, monkeypatch, capsys):
    """``--backend auto``: exactly one installed backend must claim MODEL."""
    spec = f"{strict_cli}:make_strict"
    monkeypatch.setenv("IBA_BACKENDS", "strict-cli")
    assert main(["layers", spec]) == 0
    assert "(6, 3, 3)" in capsys.readouterr().out
    monkeypatch.setenv("IBA_BACKENDS", "strict-cli,strict-cli-2")
    _bad(
        ["layers", spec],
        capsys,
        f"model '{spec}' is claimed by several backends",
        "strict-cli, strict-cli-2",
        "--backend NAME",
    )
    _bad(
        ["layers", "model.onnx"],
        capsys,
        "cannot tell what kind of model 'model.onnx'",
        "installed: strict-cli, strict-cli-2",
        "--backend NAME",
    )
    monkeypatch.setenv("IBA_BACKENDS", "none-at-all")
    _bad(["layers", spec], capsys, "cannot tell what kind of model", "installed: none")


def test_layer_table_marks_unused_repeated_and_unhookable_layers(strict_cli):
    """'-' for a layer that does not run, '(called again)' for one that runs twice, and
    '(not a tensor)' for one whose output cannot be hooked; no hook is left behind."""
    import iba_core
    from iba_core.apps.cli import layer_table
    from strict_backend import StrictModel

    class OddModel(StrictModel):
        def __init__(self):
            super().__init__()
            self.layers = {**self.layers, "pair": lambda x: (x, x), "spare": lambda x: x}
            self.hooks = {name: [] for name in self.layers}

        def _layer(self, name, x):
            x = self.layers[name](x)
            for hook in list(self.hooks[name]):
                out = hook(x)
                x = x if out is None else out
            return x

        def __call__(self, x):
            x = self._layer("relu", self._layer("relu", self._layer("conv", x)))
            x = self._layer("pair", self._layer("pool", x))[0]
            return self._layer("fc", self._layer("flatten", x))

    backend = iba_core.get_backend("strict-cli")
    model = OddModel()
    rows = dict(layer_table(backend, model, (3, 6, 6)))
    assert rows == {
        "conv": "(6, 6, 6)",
        "relu": "(6, 6, 6) (called again)",
        "pool": "(6, 3, 3)",
        "flatten": "(54,)",
        "fc": "(5,)",
        "pair": "(not a tensor)",
        "spare": "-",
    }
    assert all(not hooks for hooks in model.hooks.values())


def test_the_command_names_no_framework():
    """The command reaches backends through the registry only: no framework package is
    named in its source, and importing it imports no framework."""
    import iba_core.apps.cli as cli

    source = Path(cli.__file__).read_text()
    for name in ("iba_torch", "iba_tf"):
        assert name not in source
    code = textwrap.dedent("""
        import sys
        import iba_core.apps.cli
        print([m for m in ("torch", "tensorflow", "keras", "iba_torch", "iba_tf")
               if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
