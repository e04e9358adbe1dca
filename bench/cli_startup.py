"""Wall time of ``aegan --help`` (and of each command's --help) against importing torch, in fresh
interpreters, median of ``--repeats`` runs each:

    .venv/bin/python bench/cli_startup.py --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "aegan --help": ["-m", "aegan_cli", "--help"],
    "aegan train --help": ["-m", "aegan_cli", "train", "--help"],
    "aegan eval --help": ["-m", "aegan_cli", "eval", "--help"],
    "python -c 'import torch'": ["-c", "import torch"],
}


def median_seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {args.repeats} runs each")
    for name, argv in CASES.items():
        print(f"{name:<28} {1000 * median_seconds(argv, args.repeats):7.0f} ms (median)")


if __name__ == "__main__":
    main()
