"""Helpers shared by the benchmark scripts: machine description, tables, CSV, timing, memory.

Standard library and NumPy only; frameworks are described only if a script imported them.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Where CSV files go unless ``--csv-dir`` says otherwise (``/out/`` is git-ignored).
DEFAULT_CSV_DIR = ROOT / "out" / "benchmarks"


# -- machine -----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, str]:
    """Date, CPU, cores, load, and the versions of what the running script imported."""
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "load average (1/5/15 min)": load_average(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads; GPU: {gpu})"
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        info["tensorflow"] = f"{tf.__version__} (GPU: {', '.join(gpus) or 'none'})"
    captum = sys.modules.get("captum")
    if captum is not None:
        info["captum"] = getattr(captum, "__version__", "?")
    return info


def print_header(title: str, command: Sequence[str] | None = None) -> dict[str, str]:
    info = machine_info()
    print(f"== {title} ==")
    cmd = " ".join(command if command is not None else ["python", *sys.argv])
    info["command"] = cmd
    for k, v in info.items():
        print(f"{k}: {v}")
    print()
    return info


# -- tables and CSV ----------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], markdown: bool = False) -> str:
    """A fixed-width text table (or a Markdown table); first column left-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line(headers)]
    if markdown:
        out.append(
            "|"
            + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths))
            + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write dict rows (the union of their keys, in first-seen order) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` of finite values (sample sd; just the mean for one value)."""
    v = [float(x) for x in values if np.isfinite(x)]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.fmean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


# -- timing and memory -------------------------------------------------------------------
def median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory (MiB) a block adds over the memory in use when it starts.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs`` then ``VmHWM``);
    elsewhere it falls back to ``resource.getrusage`` (a lifetime peak, so only an upper
    bound of what the block adds).  ``value`` is ``None`` when neither works.
    """

    def __enter__(self) -> PeakRSS:
        self.value: float | None = None
        self._exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._exact = True
        except OSError:
            pass
        self._start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = _status_kib("VmHWM") if self._exact else None
        if peak is None:
            try:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            except (ImportError, OSError):
                return
        if self._start is not None:
            self.value = max(0.0, (peak - self._start) / 1024.0)
