"""Run every benchmark in this folder (``benchmarks/bench_*.py``), one after another.

    python benchmarks/run_all.py [--list] [--only quality,speed] [options for the benchmarks]

Other options (``--quick``, ``--full``, ``--repeats 3``, ``--csv-dir DIR``...) are passed
to each benchmark that accepts them; a benchmark that does not mention an option in its
source is run without it (and the skip is printed), so scripts with different options can
share one command line.  Each benchmark runs in its own process; a failure is reported and
the others still run.  Exit status: 0 when all passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def split_options(tokens: list[str]) -> list[list[str]]:
    """``["--quick", "--repeats", "3"]`` -> ``[["--quick"], ["--repeats", "3"]]``."""
    groups: list[list[str]] = []
    for tok in tokens:
        if tok.startswith("-") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def accepted(script: Path, option: str) -> bool:
    """Whether ``script`` mentions ``option`` (e.g. ``"--quick"``) in its source."""
    name = option.split("=", 1)[0]
    return f'"{name}"' in script.read_text() or f"'{name}'" in script.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--only", default=None, help="comma-separated names (e.g. quality,speed or bench_speed)"
    )
    args, rest = parser.parse_known_args()
    scripts = discover()
    if args.only:
        wanted = {w.strip().removeprefix("bench_").removesuffix(".py") for w in args.only.split(",")}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    if args.list or not scripts:
        for s in scripts:
            print(s.name)
        return 0 if scripts or args.list else 1

    failed: list[str] = []
    summary: list[tuple[str, str, float]] = []
    for script in scripts:
        options: list[str] = []
        skipped: list[str] = []
        for group in split_options(rest):
            (options if accepted(script, group[0]) else skipped).extend(group)
        cmd = [sys.executable, str(script), *options]
        print(f"\n{'=' * 20} {script.name} {' '.join(options)} {'=' * 20}", flush=True)
        if skipped:
            print(f"(options not accepted by {script.name}, left out: {' '.join(skipped)})", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, cwd=HERE.parent)
        elapsed = time.perf_counter() - t0
        summary.append((script.name, "ok" if code == 0 else f"FAILED (exit {code})", elapsed))
        if code != 0:
            failed.append(script.name)

    print(f"\n{'=' * 20} summary {'=' * 20}")
    for name, status, elapsed in summary:
        print(f"{name:<28}{status:<20}{elapsed:8.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
