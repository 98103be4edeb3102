"""Wall time of `dgc-convert resnet50 --heads 4 --zeta 0.5`, end to end.

Usage: python benchmarks/convert_cli.py [--repeats 3] [MODEL ...]

Runs the installed console script in a fresh process each time (Python start,
imports, model build, two MAC counts, conversion, rendering) and prints each
wall time and the median, in seconds. Target on 2 CPU cores: under 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("args", nargs="*", default=["resnet50", "--heads", "4", "--zeta", "0.5"])
    options = parser.parse_args()
    # The script beside this interpreter (found without an activated environment), else the module.
    script = Path(sys.executable).with_name("dgc-convert")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "dgc_convert.cli"]
    command += options.args
    times = []
    for _ in range(options.repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    print(f"{' '.join(['dgc-convert', *options.args])}")
    print("runs (s): " + ", ".join(f"{t:.2f}" for t in times))
    print(f"median: {statistics.median(times):.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
