"""The ``iba`` command under bad input and interruption (issue 14, "Reliability").

Every case checks the exit status, that the message is one line naming the option (or the
fix), and that a failed run writes nothing.  Bad numbers and unwritable outputs must be
refused before any model work: the tests make loading a model fail loudly to prove it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from iba_core.apps import cli
from iba_core.apps.cli import DEMO_MAX_ESTIMATE, OutputSet, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
MODEL = "iba_torch._demo:demo_cnn"
LAYER = "features.relu3"


def one_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("iba"), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model or a backend fails the test: the run must stop before."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(cli, "select_backend", forbidden)
    monkeypatch.setattr(cli, "demo_backend", forbidden)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 cluttered-digit PNGs to explain and 20 to estimate on."""
    from PIL import Image

    pytest.importorskip("sklearn")
    from iba_core.apps.datasets import cluttered_digits

    root = tmp_path_factory.mktemp("rel")
    for name, n, seed in (("images", 3, 1), ("estimate", 20, 2)):
        (root / name).mkdir()
        for i, img in enumerate(cluttered_digits(n, split="test", seed=seed).images):
            Image.fromarray(np.round(img[0] * 255).astype(np.uint8)).save(root / name / f"d{i}.png")
    (root / "notes.txt").write_text("a regular file\n")
    return root


# -- 1. bad numbers: exit 2 at parse time, naming the option ---------------------------------
EXPLAIN = ["explain", MODEL, "--layer", LAYER, "--images", "x.png", "--estimate-from", "e"]


@pytest.mark.parametrize(
    "argv, option, bad",
    [
        (["--beta", "-1"], "--beta", "'-1'"),
        (["--beta", "nan"], "--beta", "'nan'"),
        (["--beta", "inf"], "--beta", "'inf'"),
        (["--steps", "-1"], "--steps", "'-1'"),
        (["--seed", "-1"], "--seed", "'-1'"),
        (["--std", "nan"], "--std", "'nan'"),
        (["--std", "0.2", "-0.1"], "--std", "'-0.1'"),
        (["--mean", "nan"], "--mean", "'nan'"),
        (["--n-samples", "0"], "--n-samples", "'0'"),
        (["--batch-size", "0"], "--batch-size", "'0'"),
        (["--size", "0"], "--size", "'0'"),
        (["--target", "-1"], "--target", "'-1'"),
        (["--steps", "2.5"], "--steps", "must be an integer, got '2.5'"),
    ],
)
def test_bad_numbers_of_explain(argv, option, bad, tmp_path, capsys, no_model_work):
    assert main([*EXPLAIN, "--out", str(tmp_path / "out"), *argv]) == 2
    captured = capsys.readouterr()
    one_line(captured.err, f"argument {option}: must be", bad, "see 'iba explain --help'")
    assert not captured.out and files_under(tmp_path) == []


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--n", "0"], "--n"),
        (["--n", "65"], "--n"),
        (["--seed", "-1"], "--seed"),
        (["--estimate-samples", "0"], "--estimate-samples"),
    ],
)
def test_bad_numbers_of_demo(argv, option, tmp_path, capsys, no_model_work):
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    one_line(capsys.readouterr().err, f"iba demo: error: argument {option}: must be an integer")
    assert files_under(tmp_path) == []


def test_good_numbers_still_parse():
    args = build_parser().parse_args(
        [
            *EXPLAIN,
            "--beta",
            "0",
            "--steps",
            "0",
            "--std",
            "0.5",
            "--mean",
            "-0.5",
            "--n-samples",
            "1e3",
            "--size",
            "32",
        ]
    )
    assert (args.beta, args.steps, args.std, args.mean) == (0.0, 0, [0.5], [-0.5])
    assert args.n_samples == 1000 and args.size == [32]


# -- 2. unwritable outputs: refused before any model work -----------------------------------
def test_out_under_a_file_is_refused_first(images, tmp_path, capsys, no_model_work):
    bad = str(images / "notes.txt" / "out")
    assert main(["demo", "--out", bad]) == 2
    one_line(
        capsys.readouterr().err,
        f"--out {bad} cannot be written",
        "notes.txt is a file, not a folder",
        "choose another path",
    )
    assert main([*EXPLAIN, "--out", bad]) == 2
    one_line(capsys.readouterr().err, f"--out {bad} cannot be written")
    assert (images / "notes.txt").read_text() == "a regular file\n"


def test_save_estimate_under_a_file_is_refused_first(images, tmp_path, capsys, no_model_work):
    bad = str(images / "notes.txt" / "deeper" / "est.npz")
    out = tmp_path / "out"
    assert main([*EXPLAIN, "--out", str(out), "--save-estimate", bad]) == 2
    one_line(capsys.readouterr().err, f"--save-estimate {bad} cannot be written", "is a file, not a folder")
    assert main([*EXPLAIN, "--out", str(out), "--save-estimate", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, "--save-estimate", "is a folder; give a file name")
    assert files_under(tmp_path) == []


# -- 3. --estimate-samples has a stated maximum -----------------------------------------------
def test_estimate_samples_beyond_the_maximum(tmp_path, capsys, no_model_work):
    assert main(["demo", "--estimate-samples", "1e8", "--out", str(tmp_path / "o")]) == 2
    one_line(
        capsys.readouterr().err,
        "argument --estimate-samples",
        f"between 1 and {DEMO_MAX_ESTIMATE}",
        "in memory",
        "got '1e8'",
    )
    parser = build_parser()
    assert (
        parser.parse_args(["demo", "--estimate-samples", str(DEMO_MAX_ESTIMATE)]).estimate_samples
        == DEMO_MAX_ESTIMATE
    )
    assert main(["demo", "--estimate-samples", str(DEMO_MAX_ESTIMATE + 1)]) == 2
    capsys.readouterr()
    assert files_under(tmp_path) == []


# -- 4. a model file that exits -----------------------------------------------------------------
def test_model_file_calling_sys_exit_in_a_real_process(tmp_path):
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\ndef make():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("IBA_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "iba_core.apps.cli", "layers", "exits.py:make"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "importing 'exits.py' called sys.exit(3)", "__main__")
    assert files_under(tmp_path) == ["exits.py"]


def test_factory_calling_sys_exit(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    (tmp_path / "quits.py").write_text(
        textwrap.dedent("""
        import sys

        def make():
            sys.exit("no model today")
    """)
    )
    monkeypatch.chdir(tmp_path)
    assert main(["layers", "quits.py:make", "--backend", "torch"]) == 2
    one_line(capsys.readouterr().err, "calling the factory called sys.exit('no model today')")


# -- 5. the outputs of one run are a set ------------------------------------------------------
def test_output_set_is_all_old_or_all_new_at_every_interruption(tmp_path, monkeypatch):
    names = ["a.png", "b.npz", "c.csv"]
    for name in names:
        (tmp_path / name).write_text("old")
    calls = {"n": 0}
    real_replace = cli._replace

    def interrupted_at(k):
        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == k:
                raise KeyboardInterrupt
            real_replace(src, dst)

        return replace

    # 3 old files: 6 renames (old aside, new in); interrupt before each of them.
    for k in range(1, 7):
        calls["n"] = 0
        monkeypatch.setattr(cli, "_replace", interrupted_at(k))
        outputs = OutputSet()
        for name in names:
            outputs.stage(tmp_path / name, lambda tmp: tmp.write_text("new"))
        with pytest.raises(KeyboardInterrupt):
            outputs.commit()
        assert [(tmp_path / n).read_text() for n in names] == ["old"] * 3, k
        assert files_under(tmp_path) == names, k  # no temporaries or backups left
    monkeypatch.setattr(cli, "_replace", real_replace)
    with OutputSet() as outputs:
        for name in names:
            outputs.stage(tmp_path / name, lambda tmp: tmp.write_text("new"))
        outputs.commit()
    assert [(tmp_path / n).read_text() for n in names] == ["new"] * 3
    assert files_under(tmp_path) == names


def test_output_set_failing_while_staging_removes_what_it_made(tmp_path):
    def fail(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), OutputSet() as outputs:
        outputs.stage(tmp_path / "new" / "deep" / "a.png", lambda tmp: tmp.write_text("x"))
        outputs.stage(tmp_path / "new" / "deep" / "b.npz", fail)
    assert files_under(tmp_path) == []


def test_demo_interrupted_between_its_two_files(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    demo = ["demo", "--n", "1", "--estimate-samples", "20", "--out", str(out)]
    assert main([*demo, "--seed", "0"]) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(old) == ["demo.png", "saliency_maps.npz"]
    real_replace = cli._replace
    moved = []

    def replace(src, dst):
        if Path(dst).name == "saliency_maps.npz":  # demo.png is already the new one
            raise KeyboardInterrupt
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(cli, "_replace", replace)
    capsys.readouterr()
    assert main([*demo, "--seed", "1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert "demo.png" in moved  # the interruption came after the first file was in place
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    monkeypatch.setattr(cli, "_replace", real_replace)
    assert main([*demo, "--seed", "1"]) == 0
    new = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(new) == sorted(old)
    assert all(new[name] != old[name] for name in old)


def test_explain_interrupted_at_its_last_file_writes_nothing(images, tmp_path, capsys, monkeypatch):
    """--save-estimate belongs to the set: interrupted at its rename, the overlays already
    renamed into the new --out folder are taken back and the folder is removed."""
    pytest.importorskip("torch")
    est = tmp_path / "est.npz"
    est.write_bytes(b"old estimate")
    real_replace = cli._replace
    moved = []

    def replace(src, dst):
        if Path(dst) == est:
            raise KeyboardInterrupt
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(cli, "_replace", replace)
    assert (
        main(
            [
                "explain",
                MODEL,
                "--layer",
                LAYER,
                "--images",
                str(images / "images"),
                "--estimate-from",
                str(images / "estimate"),
                "--steps",
                "2",
                "--save-estimate",
                str(est),
                "--out",
                str(tmp_path / "out" / "run"),
            ]
        )
        == 130
    )
    assert "saliency_maps.npz" in moved and "summary.csv" in moved
    assert est.read_bytes() == b"old estimate"
    assert files_under(tmp_path) == ["est.npz"]


# -- 6. warnings are one line each -------------------------------------------------------------
def test_warnings_are_one_line_once_per_message(capsys):
    with cli.one_line_warnings():
        for _ in range(3):
            warnings.warn("too few\nsamples", UserWarning, stacklevel=1)
        warnings.warn("another", RuntimeWarning, stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)  # hidden, as Python hides it
    assert capsys.readouterr().err.splitlines() == ["iba: warning: too few samples", "iba: warning: another"]


def test_demo_with_few_samples_warns_in_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["demo", "--n", "1", "--estimate-samples", "50", "--out", str(tmp_path)]) == 0
    one_line(capsys.readouterr().err, "iba: warning: the statistics rest on 50 samples")


def test_explain_with_few_samples_warns_in_one_line(images, tmp_path, capsys):
    pytest.importorskip("torch")
    assert (
        main(
            [
                "explain",
                MODEL,
                "--layer",
                LAYER,
                "--images",
                str(images / "images"),
                "--estimate-from",
                str(images / "estimate"),
                "--steps",
                "2",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    one_line(capsys.readouterr().err, "iba: warning: the statistics rest on 20 samples")


# -- 7. a layer without spatial axes ----------------------------------------------------------
def test_layer_without_spatial_axes(images, tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    assert (
        main(
            [
                "explain",
                MODEL,
                "--layer",
                "classifier.fc",
                "--images",
                str(images / "images"),
                "--estimate-from",
                str(images / "estimate"),
                "--out",
                str(out),
                "--save-estimate",
                str(tmp_path / "e.npz"),
            ]
        )
        == 2
    )
    # One line and no few-samples warning: refused before the statistics were estimated.
    one_line(
        capsys.readouterr().err,
        "layer 'classifier.fc' has no spatial axes",
        "(features (N, 10))",
        "choose a convolutional layer",
    )
    assert files_under(tmp_path) == []


def test_auto_backend_breaks_a_tie_by_what_the_factory_imports(tmp_path, monkeypatch):
    """Two backends claim every ``file.py:function`` spec; the factory's imports decide."""
    from iba_core.contract import BackendSpec

    specs = {
        "alpha": BackendSpec("alpha", modules=("alphaframe",), loader="x:Y", claims=lambda spec: True),
        "beta": BackendSpec(
            "beta", modules=("betaframe", "betanets"), loader="x:Y", claims=lambda spec: True
        ),
    }
    loaded = []
    monkeypatch.setattr(cli, "backend_specs", lambda: specs)
    monkeypatch.setattr(cli, "load_backend", lambda name: loaded.append(name) or name)
    factory = tmp_path / "nets.py"
    factory.write_text("import numpy as np\nfrom betanets import layers\n\ndef make():\n    pass\n")
    assert cli.select_backend("auto", f"{factory}:make") == "beta"
    both = tmp_path / "both.py"
    both.write_text("import alphaframe\nimport betaframe\n")
    with pytest.raises(cli.UsageError, match=r"claimed by several backends \(alpha, beta\)"):
        cli.select_backend("auto", f"{both}:make")
    neither = tmp_path / "neither.py"
    neither.write_text("import numpy\n")
    with pytest.raises(cli.UsageError, match="claimed by several backends"):
        cli.select_backend("auto", f"{neither}:make")
