"""The migration guide covers the reference library, and the reference's example runs here."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ROOT / "tests" / "data" / "reference_public_names.txt"
GUIDE = ROOT / "docs" / "migration.md"
EXAMPLE = ROOT / "tests" / "data" / "reference_pytorch_readme.txt"

#: The only lines of the reference's example that change: its imports.
NEW_IMPORTS = {
    "from IBA.pytorch import IBA, tensor_to_np_img, get_imagenet_folder, imagenet_transform": (
        "from iba_torch import IBA, tensor_to_np_img\n"
        "from reference_standins import get_imagenet_folder, imagenet_transform"
    ),
    "from IBA.utils import plot_saliency_map, to_unit_interval, load_monkeys": (
        "from iba_torch import plot_saliency_map, to_unit_interval\n"
        "from reference_standins import load_monkeys"
    ),
    "from torchvision.models import vgg16": "from reference_standins import vgg16",
}


def reference_names() -> list[str]:
    lines = NAMES.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def guide_rows() -> dict[str, list[str]]:
    """First cell (a backticked ``IBA.`` name) -> the row's cells, for every table row."""
    rows = {}
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*`(IBA\.[\w.]+)`\s*\|(.*)\|\s*$", line)
        if match:
            assert match.group(1) not in rows, f"two rows for {match.group(1)}"
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def test_the_names_list_covers_the_four_modules() -> None:
    names = reference_names()
    assert len(names) == len(set(names)), "a name is listed twice"
    for module in ("pytorch", "pytorch_readout", "tensorflow_v1", "utils"):
        assert any(n.startswith(f"IBA.{module}.") for n in names), module
    for known in (
        "IBA.pytorch.IBA.analyze",
        "IBA.tensorflow_v1.IBACopyInnvestigate.load_npz",
        "IBA.utils.to_unit_interval",
    ):
        assert known in names


def test_migration_table_has_a_row_for_every_reference_name() -> None:
    names, rows = reference_names(), guide_rows()
    missing = [n for n in names if n not in rows]
    assert not missing, f"docs/migration.md has no row for: {missing}"
    unknown = sorted(set(rows) - set(names))
    assert not unknown, f"rows for names that are not in {NAMES.name}: {unknown}"
    for name, cells in rows.items():
        assert len(cells) == 3 and cells[0], f"row {name}: give the counterpart, the difference and why"


@pytest.mark.parametrize(
    ("packages", "framework"),
    [
        pytest.param("iba_core|iba_torch", "torch", marks=pytest.mark.torch, id="torch"),
        pytest.param("iba_tf", "tensorflow", marks=pytest.mark.tf, id="tf"),
    ],
)
def test_counterparts_named_in_the_table_exist(packages: str, framework: str) -> None:
    pytest.importorskip(framework)
    import importlib

    checked = 0
    for cells in guide_rows().values():
        # `iba_torch.name` in code, and the targets of links such as [`IBA.analyze`][iba_torch.IBA.analyze]
        for dotted in re.findall(rf"[`\[]((?:{packages})(?:\.\w+)+)[`\]]", cells[0]):
            parts = dotted.split(".")
            for split in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:split]))
                except ImportError:
                    continue
                for attr in parts[split:]:
                    obj = getattr(obj, attr)  # AttributeError names the missing counterpart
                checked += 1
                break
    assert checked >= 8


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # the example's num_workers=4
def test_reference_readme_example_runs_with_only_its_imports_changed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = EXAMPLE.read_text(encoding="utf-8")
    changed = source
    for old, new in NEW_IMPORTS.items():
        assert old in changed
        changed = changed.replace(old, new)
    kept = [line for line in source.splitlines() if line not in NEW_IMPORTS]
    assert all(line in changed.splitlines() for line in kept), "only import lines may change"
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.chdir(tmp_path)
    # The example's loader starts worker processes.  This test process may hold the
    # threads of other frameworks (JAX, TensorFlow), which a forked child must not
    # inherit: the workers come from a fresh server process instead.
    loader_init = torch.utils.data.DataLoader.__init__

    def fresh_workers(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("multiprocessing_context", "forkserver")
        loader_init(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", fresh_workers)
    namespace: dict[str, object] = {"__name__": "reference_example"}
    with pytest.warns(UserWarning, match="samples"):  # 128 stand-in images, below the 1,000 advised
        exec(compile(changed, str(EXAMPLE), "exec"), namespace)
    sys.modules.pop("reference_standins", None)

    heatmap, iba = namespace["heatmap"], namespace["iba"]
    assert heatmap.shape == (32, 32) and (heatmap >= 0).all()
    # the map is the last analysis' capacity, in bits, spread over the image's pixels
    total_bits = float(iba.capacity().sum()) / math.log(2)
    assert total_bits > 0
    assert heatmap.sum() == pytest.approx(total_bits, rel=1e-4)
    assert iba.estimator.n == 128
    assert namespace["saliency_map"].shape == (32, 32)
    figure_axes = plt.gcf().axes
    assert figure_axes and figure_axes[0].images, "plot_saliency_map drew nothing"
    plt.close("all")
    model = namespace["model"]
    assert not any(p.grad is not None for p in model.parameters()), "the model was left with gradients"
    assert isinstance(namespace["monkeys_transform"], torch.Tensor)
