"""Wall time of ``aegan --help`` (and of each command's --help) against importing torch, in fresh
interpreters, median of ``--repeats`` runs each, the cases interleaved; with ``--baseline REV``,
also ``aegan --help`` of an earlier revision (checked out in a temporary git worktree) in the same
rounds, and the ratio of the two paired round by round:

    .venv/bin/python bench/cli_startup.py --repeats 20 --baseline e9dcec3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "aegan --help": ["-m", "aegan_cli", "--help"],
    "aegan train --help": ["-m", "aegan_cli", "train", "--help"],
    "aegan eval --help": ["-m", "aegan_cli", "eval", "--help"],
    "python -c 'import torch'": ["-c", "import torch"],
}


def seconds(args: list[str], root: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=root, env=env)
    return time.perf_counter() - start


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """Revision ``rev`` in a temporary git worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)  # fmt: skip
        try:
            yield tree
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=True)


def timings(cases: dict[str, tuple[list[str], Path]], repeats: int) -> dict[str, list[float]]:
    """Every case once per round, in an order that rotates from round to round, so that a
    change in the machine's load falls on all cases alike; one unmeasured round first."""
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            took = seconds(*cases[name])
            if round_:
                times[name].append(took)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--baseline", default=None, help="an earlier revision to time as well")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {args.repeats} runs each")
    cases = {name: (argv, ROOT) for name, argv in CASES.items()}
    with contextlib.ExitStack() as stack:
        baseline = f"aegan --help at {args.baseline}"
        if args.baseline:
            tree = stack.enter_context(checkout(args.baseline))
            # its module was training.cli before aegan_cli
            new = (tree / "aegan_cli.py").exists() or (tree / "aegan_cli").exists()
            module = "aegan_cli" if new else "training.cli"
            cases[baseline] = (["-m", module, "--help"], tree)
        times = timings(cases, args.repeats)
    for name, taken in times.items():
        print(f"{name:<28} {1000 * statistics.median(taken):7.0f} ms (median)")
    if args.baseline:
        ratios = [
            now / then for now, then in zip(times["aegan --help"], times[baseline], strict=True)
        ]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(
            f"aegan --help / baseline, paired by round: median {statistics.median(ratios):.3f} "
            f"(quartiles {low:.3f}-{high:.3f})"
        )


if __name__ == "__main__":
    main()
