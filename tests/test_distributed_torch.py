"""Data-parallel estimation and explanation under ``torch.distributed`` (2 gloo processes).

The processes are started by the tests (``torch.multiprocessing.spawn``) and write what
they computed to files; the test compares it with one process's results.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from iba_core.contract import DistributedError  # noqa: E402
from iba_core.engines import data_parallel  # noqa: E402

pytestmark = pytest.mark.torch

WORLD = 2
N_EXPLAINED = 41  # on the CPU: passes of one input, dealt to the shards in turn
BATCHES = 5  # an odd number of batches: the shards see different counts


class Trip(nn.Module):
    """The identity, or an error on every forward pass when armed."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("tripwire on this rank")
        return x


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            trip=Trip(),
            conv1=nn.Conv2d(1, 4, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(4, 6, 3, padding=1, stride=2),
            relu2=nn.ReLU(),
            flat=nn.Flatten(),
            fc=nn.Linear(6 * 6 * 6, 5),
        )
    )
    return model.eval()


def make_data() -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(1)
    batches = [torch.as_tensor(rng.normal(size=(6, 1, 12, 12)), dtype=torch.float32) for _ in range(BATCHES)]
    x = torch.as_tensor(rng.normal(size=(N_EXPLAINED, 1, 12, 12)), dtype=torch.float32)
    return batches, x, rng.integers(0, 5, size=N_EXPLAINED)


def estimate_and_explain(layer: str = "relu2") -> dict[str, np.ndarray]:
    """What every process (and the single-process reference) computes."""
    from iba_torch import IBA

    model = make_model()
    batches, x, targets = make_data()
    iba = IBA(model, layer)
    with _nothing():
        est = iba.estimate(model, batches, n_samples=26, progbar=False)
    state = est.state_dict()
    maps = iba.analyze(x, target=targets, seed=3, noise="numpy", optimization_steps=3)
    return {
        "n": state["n"],
        "mean": state["mean"],
        "m2": state["m2"],
        "nonzero": state["nonzero"],
        "maps": maps,
    }


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    """Hide warnings (too few samples, the readout's convergence) in these tiny runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def train_readout() -> dict[str, np.ndarray]:
    """A readout estimated and trained a few steps (the same batches on every process)."""
    from iba_core.testing._readout_suite import readout_reference_weights
    from iba_torch import IBAReadout
    from test_readout_torch import make_model as readout_model

    model = readout_model(readout_reference_weights())
    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.normal(size=(48, 3, 12, 12)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, 5, size=48))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    readout = IBAReadout("relu2", ["relu2", "relu3", "logits"], model)
    with _nothing():
        readout.estimate(model, [b for b, _ in batches], n_samples=48)
        readout.train(model, batches, epochs=2, lr=2e-2, seed=0, validation=None, warn=False)
    return {
        f"readout_{k}": np.asarray(v)
        for k, v in readout.state_dict().items()
        if np.asarray(v).dtype.kind == "f"
    }


def _init(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )


def _worker(rank: int, folder: str, scenario: str) -> None:
    _init(rank, folder)
    try:
        alone = None
        if rank == 0 and scenario == "ok":
            # Not asked for: a process group is left alone (the other rank never calls).
            from iba_torch import IBA

            model = make_model()
            with _nothing():
                alone = IBA(model, "relu2").estimate(model, make_data()[0][:1], progbar=False).n
        with data_parallel(True):
            if scenario == "fail":
                from iba_torch import IBA

                model = make_model()
                model.trip.armed = rank == 1
                batches, _, _ = make_data()
                IBA(model, "relu2").estimate(model, batches, n_samples=20)
                return
            out = estimate_and_explain()
            out.update(train_readout())
            # Each process reads its own shard (as with a DistributedSampler): merged all the same.
            from iba_torch import IBA

            model = make_model()
            batches, x, targets = make_data()
            iba = IBA(model, "relu2")
            with _nothing():
                own = iba.estimate(model, batches[rank::WORLD], n_samples=10_000, progbar=False)
            out["own_mean"], out["own_m2"], out["own_n"] = own.mean(), own.state_dict()["m2"], own.n
            # Asked for by the argument alone, through both fronts.
            import iba_core

            with data_parallel(False), _nothing():
                mine_only = batches[rank::WORLD]
                torch_front = iba.estimate(model, mine_only, progbar=False, distributed=True)
                generic = iba_core.IBA(model, "relu2").estimate(
                    [b.numpy() for b in mine_only], progbar=False, distributed=True
                )
            out["front_n"] = np.asarray([torch_front.n, generic.n])
            # Different inputs on different processes: each explains its own.
            mine = x[rank::WORLD]
            out["own_maps"] = iba.analyze(mine, target=targets[rank::WORLD], seed=5, noise="numpy")
            with data_parallel(False):  # rank 1 alone, the other process does nothing
                out["alone_n"] = np.asarray(
                    iba.estimate(model, batches[:1], progbar=False).n if rank == 1 else -1
                )
            # Another layer on one process: a clear error on both, not a hang.
            try:
                with _nothing():
                    IBA(model, "relu1" if rank == 1 else "relu2").estimate(model, batches, n_samples=12)
            except DistributedError as exc:
                out["mismatch"] = np.asarray(str(exc))
            out["rank0_alone_n"] = np.asarray(-1 if alone is None else alone)
            np.savez(os.path.join(folder, f"rank{rank}.npz"), **out)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, scenario: str) -> None:
    mp.spawn(_worker, args=(str(tmp_path), scenario), nprocs=WORLD, join=True)


def test_two_processes_estimate_and_explain_as_one(tmp_path):
    _spawn(tmp_path, "ok")
    # One process with the workers' one thread: a convolution of a single input may split
    # its sums by the number of threads, and the CPU passes hold one input.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_two_processes(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_two_processes(tmp_path) -> None:
    with _nothing():
        ref = estimate_and_explain()
    batches, x, targets = make_data()
    for rank in range(WORLD):
        got = np.load(tmp_path / f"rank{rank}.npz")
        # Every process holds the merged estimate of the same 26 samples as one process.
        assert int(got["n"]) == int(ref["n"]) == 26
        np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["m2"], ref["m2"], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got["nonzero"], ref["nonzero"])
        # The gathered maps, in input order, bitwise equal to one process's maps.
        assert got["maps"].shape == (N_EXPLAINED, 12, 12)
        np.testing.assert_array_equal(got["maps"], ref["maps"])
        # Unasked, rank 0's estimate used the group's other rank not at all (no wait).
        assert int(got["rank0_alone_n"]) == (6 if rank == 0 else -1)
        # Own shards merged: the estimate of all batches.
        assert int(got["own_n"]) == 30
        assert got["front_n"].tolist() == [30, 30]  # distributed=True on both fronts
        with _nothing():
            from iba_torch import IBA

            model = make_model()
            one = IBA(model, "relu2")
            full = one.estimate(model, batches, progbar=False)
            np.testing.assert_allclose(got["own_mean"], full.mean(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(got["own_m2"], full.state_dict()["m2"], rtol=1e-12, atol=1e-12)
            # Different inputs: each process explained its own, as one process would.
            own = one.analyze(x[rank::WORLD], target=targets[rank::WORLD], seed=5, noise="numpy")
        np.testing.assert_array_equal(got["own_maps"], own)
        assert "the layers estimated" in str(got["mismatch"]) and "relu1" in str(got["mismatch"])
    assert int(np.load(tmp_path / "rank1.npz")["alone_n"]) == 6
    # The readout trained by two processes (half of each batch each, gradients summed)
    # equals the readout one process trains on the whole batches, to float32 round-off.
    with _nothing():
        one = train_readout()
    assert len(one) >= 6
    for rank in range(WORLD):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for key, value in one.items():
            np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=2e-6, err_msg=key)
    assert "readout_head.w1" in one and "readout_bottleneck.m2" in one


def test_a_failing_rank_stops_the_run(tmp_path):
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        _spawn(tmp_path, "fail")
    assert time.monotonic() - start < 30
    assert "tripwire on this rank" in str(info.value)


# -- the iba command under torchrun -------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
MODEL, LAYER = "iba_torch._demo:demo_cnn", "features.relu3"


def _iba(folder, *args: str, processes: int = 1):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("IBA_DEBUG", None)
    launcher = [sys.executable, "-m", "iba_core.apps.cli"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "iba_core.apps.cli",
        ]
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, cwd=folder, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Cluttered-digit PNGs: 7 to explain, 150 to estimate on (3 chunks of up to 64)."""
    from PIL import Image

    from iba_core.apps.datasets import cluttered_digits

    root = tmp_path_factory.mktemp("dist-cli")
    for name, data in (
        ("images", cluttered_digits(7, split="test", seed=3)),
        ("est", cluttered_digits(150, split="train", seed=4)),
    ):
        (root / name).mkdir()
        for i, img in enumerate(data.images):
            Image.fromarray(np.round(img[0] * 255).astype(np.uint8)).save(root / name / f"d{i:03d}.png")
    return root


def test_iba_explain_under_torchrun_writes_what_one_process_writes(images):
    common = ["explain", MODEL, "--layer", LAYER, "--images", "images", "--estimate-from", "est"]
    common += ["--batch-size", "2", "--steps", "4", "--noise", "numpy", "--seed", "7"]
    one = _iba(images, *common, "--out", "one", "--save-estimate", "one.npz")
    assert one.returncode == 0, one.stderr
    two = _iba(images, *common, "--out", "two", "--save-estimate", "two.npz", processes=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("explained 7 images") == 1  # rank 0 reports (and writes) once
    files = sorted(p.name for p in (images / "one").iterdir())
    assert files == sorted(p.name for p in (images / "two").iterdir()) and len(files) == 9
    for name in files:
        a, b = images / "one" / name, images / "two" / name
        if name.endswith(".npz"):
            with np.load(a) as x, np.load(b) as y:
                assert sorted(x.files) == sorted(y.files)
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key])
        else:
            assert a.read_bytes() == b.read_bytes(), name
    with np.load(images / "one.npz") as x, np.load(images / "two.npz") as y:
        assert int(y["n"]) == 150
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key])


# -- the core's workflow with three shards in one process (no processes to start) ---------------
def test_three_local_shards_cut_and_merge_as_one_process(monkeypatch):
    from iba_core.contract import LocalShards
    from iba_torch import IBA, TorchBackend

    model = make_model()
    batches, x, targets = make_data()
    x, targets = x[:7], targets[:7]
    kw = dict(target=targets, seed=3, noise="numpy", optimization_steps=2)
    monkeypatch.setattr(TorchBackend, "pass_size", lambda self, like: 3)
    with _nothing():
        single = IBA(model, "relu2")
        ref = single.estimate(model, batches, n_samples=20, progbar=False).state_dict()
        ref_maps = single.analyze(x, **kw)
    used: list[int] = []

    class Three(LocalShards):
        def on_shard(self, shard: int):  # type: ignore[no-untyped-def]
            used.append(shard)
            return super().on_shard(shard)

    monkeypatch.setattr(TorchBackend, "distributed", lambda self, init=False: Three([0, 1, 2], "test"))
    iba = IBA(model, "relu2")
    with _nothing():
        # 20 samples: batches 0-2 (shards 0, 1, 2) of 6 each, then 2 rows of batch 3.
        got = iba.estimate(model, batches, n_samples=20, progbar=False).state_dict()
    assert int(got["n"]) == 20 and sorted(set(used)) == [0, 1, 2]
    for key in ("mean", "m2", "nonzero"):
        np.testing.assert_array_equal(got[key], ref[key])  # the same merges in the same order
    used.clear()
    maps = iba.analyze(x, **kw)
    # pass_size 3 holds one input's 10 copies: 7 passes of one input, dealt to the shards in turn.
    assert used == [0, 1, 2, 0, 1, 2, 0]
    np.testing.assert_array_equal(maps, ref_maps)
    with data_parallel(False):
        used.clear()
        np.testing.assert_array_equal(iba.analyze(x, **kw), ref_maps)
        assert used == []


def test_distributed_true_needs_a_runtime():
    from iba_torch import IBA

    model = make_model()
    batches, _, _ = make_data()
    with pytest.raises(RuntimeError, match="no data-parallel run"):
        IBA(model, "relu2").engine.estimate(batches, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        IBA(model, "relu2").engine.estimate(batches, distributed="half")
