"""Memory of ``aegan encode`` on a large job: a synthetic ``.npy`` of ``--rows`` 28x28 grey images
(1 000 000 by default, 784 MB, memory-mapped by the job), encoded by the shipped model locally and
with ``--ray`` (a Ray instance the command starts), while the resident memory (RSS) of the command
and of every process it started is sampled once a second from /proc.

    .venv/bin/python bench/encode_scale.py                      # 1M inputs, local then Ray
    .venv/bin/python bench/encode_scale.py --rows 50000 --out /tmp/scale.json   # a quick check

Per mode it records the job's own summary line, the wall-clock time, the peak resident memory of
the driver (the ``aegan`` process) and of the largest other process (a worker, or a Ray process),
and how flat they stay after the first minute: (max - min) / min of the driver's, and of the sum
over all processes, over the samples taken after ``--settle`` seconds. Resident memory is
``RssAnon`` (what the processes hold); ``VmRSS`` is recorded beside it, which adds the pages of
the memory-mapped .npy read so far (file pages the kernel drops when it needs the memory). Writes
docs/bench-encode-scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
SUMMARY = re.compile(r"(\d+) inputs, (\d+) encoded, (\d+) errors.* ([\d.]+) s, (\d+) images/s")


def write_npy(path: Path, rows: int, seed: int = 0) -> None:
    """Random uint8 images (rows, 1, 28, 28), written in blocks (no whole array in memory)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 1, 28, 28))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 50_000):
        stop = min(rows, start + 50_000)
        out[start:stop] = rng.integers(0, 256, (stop - start, 1, 28, 28), dtype=np.uint8)
    out.flush()
    del out


def session_rss(sid: int, kind: str = "RssAnon") -> dict[int, int]:
    """Resident memory in bytes of every process of session ``sid`` (the command and what it
    started): ``RssAnon`` (the memory a process holds: heap, buffers, arrays) or ``VmRSS`` (that,
    and the pages of the files it maps, such as the memory-mapped .npy, which the kernel reclaims
    when it needs them)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:  # field 6 of stat: the session id
                continue
            status = (stat.parent / "status").read_text()
            kib = int(re.search(rf"^{kind}:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
        except (OSError, ValueError, IndexError, AttributeError):
            continue
        found[int(stat.parent.name)] = kib * 1024
    return found


def flatness(values: list[int]) -> float | None:
    return round((max(values) - min(values)) / min(values), 3) if values else None


def run_mode(source: Path, dest: Path, extra: list[str], settle: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "aegan_cli", "encode", str(source), "--out", str(dest), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    samples: list[dict[str, Any]] = []
    while proc.poll() is None:
        rss, mapped = session_rss(proc.pid), session_rss(proc.pid, "VmRSS")
        if proc.pid in rss:
            others = [v for pid, v in rss.items() if pid != proc.pid]
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "driver": rss[proc.pid],
                    "largest_other": max(others, default=0),
                    "processes": len(rss),
                    "total": sum(rss.values()),
                    "driver_vmrss": mapped.get(proc.pid, 0),
                    "total_vmrss": sum(mapped.values()),
                }
            )
        time.sleep(1.0)
    out, err = proc.communicate()
    wall = time.monotonic() - started
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the command left behind
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    m = SUMMARY.search(out)
    return {
        "command": " ".join(["aegan", *cmd[3:]]),
        "summary": out.strip().splitlines()[-1],
        "images_per_s": int(m.group(5)) if m else None,
        "job_seconds": float(m.group(4)) if m else None,
        "wall_seconds": round(wall, 1),
        **steadiness(samples, settle),
        "samples": samples,
    }


def steadiness(samples: list[dict[str, Any]], settle: float) -> dict[str, Any]:
    """Peaks, and the flatness over the samples taken after ``settle`` seconds while every
    process of the job was up (not while Ray's processes start or stop)."""
    mib = 1 << 20
    steady = max((s["processes"] for s in samples), default=0)
    later = [s for s in samples if s["t"] >= settle and s["processes"] == steady]
    peaks = {
        f"peak_{name}_mib": round(max((s[key] for s in samples), default=0) / mib, 1)
        for name, key in (
            ("driver", "driver"),
            ("other", "largest_other"),
            ("total", "total"),
            ("driver_vmrss", "driver_vmrss"),
            ("total_vmrss", "total_vmrss"),
        )
    }
    return {
        **peaks,
        "settle_s": settle,
        "processes": steady,
        "samples_after_settle": len(later),
        "driver_flatness_after_settle": flatness([s["driver"] for s in later]),
        "total_flatness_after_settle": flatness([s["total"] for s in later]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--settle", type=float, default=60.0, help="seconds before flatness")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-encode-scale.json")
    parser.add_argument(
        "--report", action="store_true", help="recompute the figures of --out from its samples"
    )
    args = parser.parse_args()
    if args.report:
        report = json.loads(args.out.read_text())
        for result in report["modes"].values():
            result.update(steadiness(result["samples"], result["settle_s"]))
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        return
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "rows": args.rows,
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="aegan-scale-") as tmp:
        source = Path(tmp) / "images.npy"
        write_npy(source, args.rows)
        modes = {"local": []} if args.no_ray else {"local": [], "ray": ["--ray"]}
        for name, extra in modes.items():
            result = run_mode(source, Path(tmp) / name, extra, args.settle)
            report["modes"][name] = result
            shown = {k: v for k, v in result.items() if k != "samples"}
            print(name, json.dumps(shown), flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
