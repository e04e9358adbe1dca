"""Property-based fuzzing of the running service from its own OpenAPI document (schemathesis).

Starts ``bentoml serve`` with the shipped bundle and its default settings, runs ``schemathesis
run`` over every operation of ``/docs.json`` (all test phases: examples, coverage of the schema's
edges, fuzzing) with every check, and records how many requests were generated, how many were
answered 5xx and which checks failed. Two passes: the operations without uploads with all checks;
the upload operations (/encode, /reconstruct, /interpolate) with all but
``positive_data_acceptance``, since any bytes are a valid upload by the document and only images
are accepted (docs/RELIABILITY.md).

    .venv/bin/python bench/fuzz.py                      # about 14 000 requests, 25 minutes
    .venv/bin/python bench/fuzz.py --max-examples 100   # a quick look

Writes docs/bench-fuzz.json and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402

UPLOAD_PATHS = "^/(encode|reconstruct|interpolate)$"
PASSES = {  # name: the arguments that select its operations and checks
    "no-uploads": ["--checks", "all", "--exclude-path-regex", UPLOAD_PATHS],
    "uploads": [
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--include-path-regex",
        UPLOAD_PATHS,
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=2000, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=bench.REPO / "docs" / "bench-fuzz.json")
    args = parser.parse_args()

    command, env, port = bench.service({})
    passes = {}
    with bench.start("service", command, env, port) as server:
        started = time.perf_counter()
        for name, selection in PASSES.items():
            passes[name] = run_pass(server.base, selection, args.max_examples, args.seed)
        seconds = time.perf_counter() - started
        rss = server.rss_mib()
    failures: dict[str, int] = {}
    for result in passes.values():
        for check, n in result["failures"].items():
            failures[check] = failures.get(check, 0) + n
    server_errors = sum(n for name, n in failures.items() if "Server error" in name)
    report = {
        "command": " ".join(sys.argv),
        "max_examples": args.max_examples,
        "seed": args.seed,
        "generated_requests": sum(r["generated_requests"] or 0 for r in passes.values()),
        "failures": failures,
        "server_errors": server_errors,
        "seconds": round(seconds, 1),
        "rss_after_mib": rss,
        "passes": passes,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, result in passes.items():
        print(f"--- {name}", result["summary"], sep="\n")
    print(
        f"{report['generated_requests']} generated requests in {seconds:.0f} s, "
        f"{server_errors} server errors, failures {report['failures'] or 'none'}; wrote {args.out}"
    )


def run_pass(base: str, selection: list[str], max_examples: int, seed: int) -> dict:
    """One ``schemathesis run`` over the selected operations: requests, failures, its summary."""
    run = subprocess.run(
        [
            str(bench.BIN / "schemathesis"),
            "run",
            f"{base}/docs.json",
            *selection,
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--continue-on-failure",
            "--workers",
            "2",
            "--request-timeout",
            "60",
        ],
        capture_output=True,
        text=True,
    )
    output = run.stdout + run.stderr
    generated = re.search(r"(\d+) generated", output)
    return {
        "arguments": selection,
        "generated_requests": int(generated.group(1)) if generated else None,
        "failures": {name: int(n) for name, n in re.findall(r"❌ (ST\d+ [^:]+): (\d+)", output)},
        "exit_code": run.returncode,
        "summary": output[output.rfind("SUMMARY") :][-3000:],
        # what schemathesis reports as errors (not failed checks: e.g. a request it could not send)
        "errors": output[output.find("ERRORS") : output.rfind("SUMMARY")][-6000:]
        if "ERRORS" in output
        else "",
    }


if __name__ == "__main__":
    main()
