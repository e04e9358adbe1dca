"""Property-based fuzzing of the running service from its own OpenAPI document (schemathesis).

Starts ``bentoml serve`` with the shipped bundle and its default settings, runs ``schemathesis
run`` over every operation of ``/docs.json`` (all test phases: examples, coverage of the schema's
edges, fuzzing) with the checks the suite's bounded run uses, and records how many requests were
generated, how many were answered 5xx and which checks failed.

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

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=2000, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=bench.REPO / "docs" / "bench-fuzz.json")
    args = parser.parse_args()

    command, env, port = bench.service({})
    with bench.start("service", command, env, port) as server:
        started = time.perf_counter()
        run = subprocess.run(
            [
                str(bench.BIN / "schemathesis"),
                "run",
                f"{server.base}/docs.json",
                "--checks",
                ",".join(CHECKS),
                "--max-examples",
                str(args.max_examples),
                "--seed",
                str(args.seed),
                "--continue-on-failure",
                "--workers",
                "2",
                "--request-timeout",
                "60",
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        rss = server.rss_mib()
    output = run.stdout + run.stderr
    generated = re.search(r"(\d+) generated", output)
    failures = re.findall(r"❌ (ST\d+ [^:]+): (\d+)", output)
    server_errors = sum(int(n) for name, n in failures if "Server error" in name)
    report = {
        "command": " ".join(sys.argv),
        "max_examples": args.max_examples,
        "seed": args.seed,
        "generated_requests": int(generated.group(1)) if generated else None,
        "failures": {name: int(n) for name, n in failures},
        "server_errors": server_errors,
        "seconds": round(seconds, 1),
        "exit_code": run.returncode,
        "rss_after_mib": rss,
        "summary": output[output.rfind("SUMMARY") :][-3000:],
        # what schemathesis reports as errors (not failed checks: e.g. a request it could not send)
        "errors": output[output.find("ERRORS") : output.rfind("SUMMARY")][-6000:]
        if "ERRORS" in output
        else "",
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(report["summary"])
    print(
        f"{report['generated_requests']} generated requests in {seconds:.0f} s, "
        f"{server_errors} server errors, failures {report['failures'] or 'none'}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
