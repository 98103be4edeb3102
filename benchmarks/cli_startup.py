"""Wall-clock start-up of the CLI: `--help`, `--version`, `train --help`, `recipe validate`, `import dgc_convert`.

Usage: python benchmarks/cli_startup.py [--runs 7] [--tree PATH ...]

Each run is a fresh `python -m dgc_convert.cli ...` (or `python -c "import dgc_convert"`)
subprocess with OMP_WAIT_POLICY=PASSIVE, in the source tree's directory and with the tree first on
PYTHONPATH, so the tree's own dgc_convert is the one imported (checked and printed). `--tree` names
a tree to time (default: the one holding this script); given more than once, the trees' runs are
interleaved, case by case, so they share whatever else the machine is doing. Prints the median and
the minimum of the runs per case and tree, with the CPU's vector flags and torch's version.
Target on 2 CPU cores: `--help` under 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES: dict[str, list[str]] = {
    "--help": ["-m", "dgc_convert.cli", "--help"],
    "--version": ["-m", "dgc_convert.cli", "--version"],
    "train --help": ["-m", "dgc_convert.cli", "train", "--help"],
    "recipe validate recipes/digits.yaml": ["-m", "dgc_convert.cli", "recipe", "validate", "recipes/digits.yaml"],
    "import dgc_convert": ["-c", "import dgc_convert"],
}


def _env(tree: Path) -> dict[str, str]:
    """The environment of a run: the tree first on PYTHONPATH; OpenMP threads that sleep when idle."""
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE"}


def _imported_from(tree: Path) -> str:
    """Where ``import dgc_convert`` resolves in the tree's runs (it must be the tree itself)."""
    done = subprocess.run(
        [sys.executable, "-c", "import dgc_convert; print(dgc_convert.__file__)"],
        cwd=tree,
        env=_env(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _time(tree: Path, args: list[str]) -> float:
    """Seconds of one run of ``python ARGS`` in ``tree``; a failing run stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=tree, env=_env(tree), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{tree}: python {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed


def _cpu() -> str:
    """The CPU's model, core count and vector flags (avx512*, avx2), from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    vector = sorted(f for f in flags if f == "avx2" or f.startswith("avx512"))
    return f"{model}, {os.cpu_count()} cores; flags: {' '.join(vector) or 'no avx2/avx512'}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per case and tree (default 7)")
    parser.add_argument(
        "--tree", type=Path, action="append", help="source tree to time (repeatable; default: this checkout)"
    )
    options = parser.parse_args()
    trees = [tree.resolve() for tree in options.tree or [ROOT]]
    print(f"cpu: {_cpu()}")
    print(
        f"python {sys.version.split()[0]}, torch {_version('torch')}, torchvision {_version('torchvision')}, timm {_version('timm')}"
    )
    for tree in trees:
        print(f"tree {tree}: dgc_convert from {_imported_from(tree)}")
    times: dict[tuple[str, Path], list[float]] = {(case, tree): [] for case in CASES for tree in trees}
    for case, args in CASES.items():
        for _ in range(options.runs):
            for tree in trees:  # interleaved: every tree's n-th run under the same load
                times[case, tree].append(_time(tree, args))
    print(f"\nwall-clock seconds, {options.runs} runs each (median / min)")
    width = max(len(case) for case in CASES)
    print(f"{'':{width}}  " + "  ".join(f"{str(tree)[-24:]:>24}" for tree in trees))
    for case in CASES:
        cells = [f"{statistics.median(times[case, t]):.2f} / {min(times[case, t]):.2f}" for t in trees]
        print(f"{case:{width}}  " + "  ".join(f"{cell:>24}" for cell in cells))


if __name__ == "__main__":
    main()
