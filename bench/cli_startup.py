"""Wall time of ``aegan --help`` (and of each command's --help) against importing torch, in fresh
interpreters, median of ``--repeats`` runs each; with ``--baseline REV``, also ``aegan --help`` of
an earlier revision (checked out in a temporary git worktree) in the same run:

    .venv/bin/python bench/cli_startup.py --repeats 20 --baseline e9dcec3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "aegan --help": ["-m", "aegan_cli", "--help"],
    "aegan train --help": ["-m", "aegan_cli", "train", "--help"],
    "aegan eval --help": ["-m", "aegan_cli", "eval", "--help"],
    "python -c 'import torch'": ["-c", "import torch"],
}


def median_seconds(args: list[str], repeats: int, root: Path = ROOT) -> float:
    times = []
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=root, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def baseline_help(rev: str, repeats: int) -> float:
    """``aegan --help`` of revision ``rev`` (its module was training.cli before aegan_cli)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)  # fmt: skip
        try:
            module = "aegan_cli" if (tree / "aegan_cli.py").is_file() else "training.cli"
            return median_seconds(["-m", module, "--help"], repeats, tree)
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--baseline", default=None, help="an earlier revision to time as well")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {args.repeats} runs each")
    for name, argv in CASES.items():
        print(f"{name:<28} {1000 * median_seconds(argv, args.repeats):7.0f} ms (median)")
    if args.baseline:
        seconds = baseline_help(args.baseline, args.repeats)
        label = f"aegan --help at {args.baseline}"
        print(f"{label:<28} {1000 * seconds:7.0f} ms (median)")


if __name__ == "__main__":
    main()
