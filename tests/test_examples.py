"""The examples in examples/ run and print what they promise (small settings)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.torch
def test_torch_per_sample(tmp_path):
    pytest.importorskip("torch")
    out = run("torch_per_sample.py", "--out", str(tmp_path), "--n-estimate", "300", cwd=tmp_path)
    bits = [float(b) for b in re.findall(r"([\d.]+) bits in total", out)]
    assert len(bits) == 4 and all(b > 0 for b in bits)
    assert (tmp_path / "torch_per_sample.png").stat().st_size > 10_000


@pytest.mark.torch
def test_torch_readout(tmp_path):
    pytest.importorskip("torch")
    out = run("torch_readout.py", "--out", str(tmp_path), "--epochs", "1", "--n-train", "128", cwd=tmp_path)
    assert "ms/image" in out and "correlation" in out
    assert (tmp_path / "readout.npz").is_file()


@pytest.mark.tf
def test_keras_copy_innvestigate(tmp_path):
    pytest.importorskip("tensorflow")
    out = run("keras_copy_innvestigate.py", "--out", str(tmp_path), "--n-estimate", "300", cwd=tmp_path)
    pairs = re.findall(r"digit (\d) \(predicted (\d)\)", out)
    assert len(pairs) == 4
    maps = np.load(tmp_path / "keras_maps.npz")["saliency_maps"]
    assert maps.shape == (4, 64, 64) and np.all(maps >= 0) and maps.sum() > 0
    assert (tmp_path / "keras_relu3_estimate.npz").is_file()


@pytest.mark.tf
def test_keras_iba_layer(tmp_path):
    pytest.importorskip("tensorflow")
    out = run("keras_iba_layer.py", "--epochs", "1", "--n-train", "500", cwd=tmp_path)
    assert "test accuracy" in out
    assert len(re.findall(r"digit \d: +[\d.]+ bits", out)) == 4


@pytest.mark.torch
def test_any_backend(tmp_path):
    pytest.importorskip("torch")
    out = run("any_backend.py", "--n-estimate", "300", cwd=tmp_path)
    assert "IBA(backend='torch', layer='features.relu3'" in out
    rows = re.findall(r"digit (\d): +([\d.]+) bits \(its label\), +([\d.]+) \(predicted", out)
    assert len(rows) == 3 and all(float(b) > 0 for _, b, _ in rows)
    before, after = map(float, re.search(r"beta 10 -> 100: ([\d.]+) -> ([\d.]+) bits", out).groups())
    assert after < before  # a higher beta lets less information through
