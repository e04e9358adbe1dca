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
    .venv/bin/python bench/fuzz.py --keys               # with API keys on (an admin key sent)

With ``--keys`` the server has API keys and a request quota far above the load (so the document
declares the keys, 401, 403 and the RateLimit headers, and schemathesis' "ignored auth" check
sends requests without the key), and the failed-key limit is raised so that those requests do not
lock the address out.

Writes docs/bench-fuzz.json and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402

from aegan_serve.apikeys import create_key  # noqa: E402

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
    parser.add_argument(
        "--out", type=Path, default=None, help="default docs/bench-fuzz[-keys].json"
    )
    parser.add_argument("--keys", action="store_true", help="API keys and quotas on")
    args = parser.parse_args()
    name = "bench-fuzz-keys.json" if args.keys else "bench-fuzz.json"
    args.out = args.out or bench.REPO / "docs" / name

    settings, headers = {}, []
    with tempfile.TemporaryDirectory(prefix="aegan-fuzz-") as folder:
        if args.keys:
            keys_file = Path(folder) / "keys.json"
            key = create_key(keys_file, "fuzz", ["admin"])
            settings = {
                "AEGAN_API_KEYS_FILE": str(keys_file),
                "AEGAN_AUTH_FAILURES_PER_MIN": "1000000",
                "AEGAN_QUOTA_REQUESTS_PER_S": "100000",
            }
            headers = ["--header", f"Authorization: Bearer {key}"]
        command, env, port = bench.service(settings)
        passes = {}
        with bench.start("service", command, env, port) as server:
            started = time.perf_counter()
            for name, selection in PASSES.items():
                passes[name] = run_pass(
                    server.base, selection + headers, args.max_examples, args.seed
                )
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
        "keys": args.keys,
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
        "arguments": [
            a if not a.startswith("Authorization") else "Authorization: …" for a in selection
        ],
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
