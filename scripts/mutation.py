#!/usr/bin/env python3
"""Mutation testing of the core modules with mutmut: how many planted bugs does the suite catch?

    nice -n 19 .venv/bin/python scripts/mutation.py [--max-children 2] [--json docs/mutation.json]

The repository is copied to ``build/mutation/PART/`` (tracked and untracked, not ignored, files) and
mutmut runs there, so the working tree is never touched. mutmut first runs the selected tests once
to learn which tests reach which function; each mutant then runs only the tests that reached the
function it changes. Not in CI; docs/TESTING.md records the last run and how long it took.

``--sample 5`` runs a systematic sample: the mutants whose number ends in 0 or 5 (every fifth
mutant of every function), for a machine that cannot run them all in the time at hand; the score
is then over that sample.

``--part`` picks the modules (:data:`PARTS`): ``core-service`` (the default: the core and the
service, with their tests) or ``training-export`` (the training and export modules, whose tests
train models), each in its own ``build/mutation/PART``. Each names whole modules, or the named
functions of a module (the rest of it is fenced off with mutmut's ``# pragma: no mutate
start/end`` in the copy only). A second run reuses the results of unchanged functions;
``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Module -> the top-level functions/classes mutated in it (None: all of them), in two parts that
# run apart (--part): the core and the service (with their own tests), and the training and
# export modules (whose tests train models, minutes each).
CORE_SERVICE: dict[str, list[str] | None] = {
    # The whole core and the whole service, but for code that runs when the service module is
    # imported, before mutmut switches a mutant on: the @endpoint declarations (answers.py) and
    # the explorer's mount (ui.py); the tests of the service cover them.
    "aegan_core/bundle.py": None,
    "aegan_core/manifest.py": None,
    "aegan_core/images.py": None,
    "aegan_core/latents.py": None,
    "aegan_core/files.py": None,
    "aegan_core/runtime.py": None,
    # Not the ONNX protobuf of the CUDA check's one-node graph (_varint ... check_graph: ONNX
    # Runtime runs it whatever shapes and names it declares, so most of their mutants are
    # equivalent; test_cuda runs the graph) nor the child process's entry point (_main).
    "aegan_core/cuda.py": [
        "DeviceError",
        "CudaOptions",
        "driver_reason",
        "captured_stderr",
        "library_text",
        "preload_libraries",
        "check_expected",
        "check",
        "_joined",
        "check_in_subprocess",
    ],
    "aegan_core/errors.py": None,
    "aegan_core/gallery.py": None,
    # bentoml.service replaces the class with a Service, which mutmut's method trampolines cannot
    # patch: the endpoints (thin: they delegate to aegan_serve/app.py) are left out.
    "aegan_serve/service.py": ["InMemoryFile"],
    "aegan_serve/app.py": None,
    "aegan_serve/config.py": None,
    "aegan_serve/auth.py": None,
    "aegan_serve/quotas.py": None,
    "aegan_serve/apikeys.py": None,
    "aegan_serve/requestlog.py": None,
    "aegan_serve/middleware.py": None,
    "aegan_serve/batching.py": None,
    "aegan_serve/openapi.py": None,
}
TRAINING_EXPORT: dict[str, list[str] | None] = {
    "training/losses.py": None,
    # The EMA, schedules and resume parts of the loop; train() itself is covered by the loop
    # tests.
    "training/schedules.py": ["ema_beta", "update_ema", "schedules"],
    "training/training_loop.py": ["restore"],
    "training/checkpoint.py": None,
    "training/metrics/registry.py": None,
    "training/metrics/frechet.py": None,
    "training/metrics/gaussian.py": None,
    "training/metrics/precision_recall.py": None,
    "training/metrics/coverage.py": None,
    "training/metrics/reconstruction.py": None,
    "training/metrics/vectors.py": None,
    # The parity checks of the export (not the exporter or the fp16 converter).
    "export/onnx_export.py": [
        "ParityResult",
        "probe_inputs",
        "torch_outputs",
        "session",
        "max_abs_error",
        "check_fp32",
        "check_fp16",
        "_require",
    ],
}

# The tests mutmut may run for each part. Left out: the torchrun test and the end-to-end server
# tests (they run the code in subprocesses, which mutmut cannot follow) and the repository checks.
TRAINING_EXPORT_TESTS = [
    "tests/test_training.py",
    "tests/test_checkpoint.py",
    "tests/test_bundle.py",
    "tests/test_parity.py",
    "tests/test_export.py",
    "tests/test_metrics.py",
]
CORE_SERVICE_TESTS = [
    "tests/test_bundle.py",
    "tests/test_directions.py",
    "tests/test_files.py",
    "tests/test_service.py",
    "tests/test_service_images.py",
    "tests/test_service_latents.py",
    "tests/test_service_runtime.py",
    "tests/test_service_hostile.py",
    "tests/test_service_similar.py",
    "tests/test_app.py",
    "tests/test_settings.py",
    "tests/test_auth.py",
    "tests/test_quotas.py",
    "tests/test_request_guard.py",
    "tests/test_batching.py",
    "tests/test_openapi.py",
    "tests/test_gallery.py",
    "tests/test_manifest.py",
    "tests/test_cuda.py",
    "tests/test_deploy.py",
    "tests/test_ui.py",
    "tests/test_requestlog.py",
]
PYTEST_ARGS = ["-m", "not slow", "-p", "no:cacheprovider", "-x", "-q"]
# Tests that start Python in a subprocess, which cannot load mutmut's instrumented copy.
PYTEST_ARGS += [
    "--deselect=tests/test_export.py::test_cli_force_replaces_a_bundle_and_saves_it_in_the_bentoml_store",
    "--deselect=tests/test_service_runtime.py::test_the_service_imports_no_torch",
    # It reads the service's source text, which in the mutated copy holds every mutant's strings.
    "--deselect=tests/test_deploy.py::test_the_service_reads_no_variable_its_environment_does_not_declare",
    # Starts a Ray cluster (20 s) for the batch job's queries; the gallery's search is tested in
    # process by the rest of test_gallery.py.
    "--deselect=tests/test_gallery.py::test_aegan_similar_encodes_the_queries_on_ray",
]
PARTS = {
    "core-service": (CORE_SERVICE, CORE_SERVICE_TESTS),
    "training-export": (TRAINING_EXPORT, TRAINING_EXPORT_TESTS),
    "all": ({**CORE_SERVICE, **TRAINING_EXPORT}, TRAINING_EXPORT_TESTS + CORE_SERVICE_TESTS[1:]),
}
ALSO_COPY = [
    "models",
    "bentofile.yaml",
    "README.md",
    "constraints.txt",
    "requirements-serve.txt",
    # read by the tests of the whole service: the benchmarks they rehearse, the deployment files
    "bench",
    "deploy",
    "Dockerfile",
    "scripts",
    "docs",
]


def repository_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def fence_off(source: str, keep: list[str]) -> str:
    """Wrap every top-level function or class not in ``keep`` in no-mutate pragmas."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    fenced = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if node.name not in keep:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            fenced.append((first, node.end_lineno or node.lineno))
    for first, last in reversed(fenced):
        lines.insert(last, "# pragma: no mutate end\n")
        lines.insert(first - 1, "# pragma: no mutate start\n")
    missing = set(keep) - {n.name for n in tree.body if hasattr(n, "name")}
    if missing:
        raise SystemExit(f"PARTS name functions that do not exist: {sorted(missing)}")
    return "".join(lines)


def stage(workdir: Path, fresh: bool, part: str, timeout_multiplier: float) -> None:
    """Copy the repository into ``workdir`` (keeping mutmut's results unless ``fresh``)."""
    scope, tests = PARTS[part]
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in repository_files():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    for module, keep in scope.items():
        if keep is not None:
            path = workdir / module
            path.write_text(fence_off(path.read_text(), keep))
    config = {
        "source_paths": [
            "aegan_core",
            "aegan_serve",
            "aegan_batch",
            "aegan_cli",
            "training",
            "export",
        ],
        "only_mutate": list(scope),
        "pytest_add_cli_args": PYTEST_ARGS,
        "pytest_add_cli_args_test_selection": tests,
        "also_copy": ALSO_COPY,
        "process_isolation": "forkserver",  # torch is not fork-safe after it has started threads
        # a mutant's tests may take this many times their clean run (plus a second) before it
        # counts as a timeout (caught); changing it re-runs only the timeouts
        "timeout_multiplier": timeout_multiplier,
    }
    with open(workdir / "pyproject.toml", "a") as f:
        f.write("\n[tool.mutmut]\n")
        for key, value in config.items():
            f.write(f"{key} = {json.dumps(value)}\n")


# --sample N: the last digits of the mutant numbers that are run (every N-th mutant).
SAMPLE_DIGITS = {1: "0123456789", 2: "02468", 5: "05", 10: "0"}


# mutmut files an exception of its own test runner (pytest's exit 4 for a test id it cannot select
# again, say) under "timeout", which counts as caught. Those mutants were not tested: they are
# counted apart, as "test command failed", and not in the score.
RUNNER_ERROR = 255


def runner_errors(workdir: Path) -> set[str]:
    """The mutants whose run ended in an exception of mutmut's test runner."""
    failed: set[str] = set()
    for meta in (workdir / "mutants").rglob("*.meta"):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        failed |= {name for name, code in codes.items() if code == RUNNER_ERROR}
    return failed


def results(workdir: Path, mutmut: Path, digits: str) -> dict[str, object]:
    failed = runner_errors(workdir)
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    by_module: dict[str, Counter[str]] = {}
    status: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\w.]+__mutmut_\d+): (.+)$", line)
        if m and m.group(1)[-1] in digits:
            name, state = m.group(1), m.group(2).strip()
            state = "test command failed" if name in failed else state
            status[name] = state
            module = re.split(r"\.x[_\u01c1]", name)[0]  # x_function or xǁClassǁmethod
            by_module.setdefault(module, Counter())[state] += 1
    counts = Counter(status.values())
    # A mutant that makes the tests fail (killed) or hang (timeout) is caught; one that survives or
    # that no test reaches is missed. Mutants not run yet ("not checked") are left out.
    caught = counts.get("killed", 0) + counts.get("timeout", 0)
    not_tested = ("skipped", "not checked", "test command failed")
    considered = sum(n for state, n in counts.items() if state not in not_tested)
    return {
        "score_percent": round(100.0 * caught / max(1, considered), 1),
        "caught": caught,
        "mutants_run": considered,
        "mutants_not_run": counts.get("not checked", 0),
        "test_command_failed": counts.get("test command failed", 0),
        "by_status": dict(sorted(counts.items())),
        "by_module": {k: dict(sorted(v.items())) for k, v in sorted(by_module.items())},
        "not_killed": sorted(name for name, state in status.items() if state != "killed"),
    }


def forget_test_map(path: Path) -> None:
    """Make mutmut take every test for a new one, so that its next run maps them all again.
    Its results, and the hashes that tell it which functions changed, are kept."""
    if path.exists():
        stats = json.loads(path.read_text())
        stats["duration_by_test"] = {}
        stats["tests_by_mangled_function_name"] = {}
        path.write_text(json.dumps(stats))


def check_order(workdir: Path, part: str) -> int:
    """Run each distinct set of tests that mutmut gives a mutated function of ``part``, in the
    order its workers run them (fastest first, stopping at the first failure), on the unmutated
    copy in ``workdir``. A set that fails there would count its mutants as killed by a failure of
    its own (a test that depends on the order of the tests before it)."""
    stats = json.loads((workdir / "mutants" / "mutmut-stats.json").read_text())
    duration = stats["duration_by_test"]
    modules = tuple(name.removesuffix(".py").replace("/", ".") + ".x" for name in PARTS[part][0])
    sets: dict[tuple[str, ...], list[str]] = {}
    for function, tests in stats["tests_by_mangled_function_name"].items():
        if function.startswith(modules):
            ordered = tuple(sorted(tests, key=lambda test: duration[test]))
            sets.setdefault(ordered, []).append(function)
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    failing = 0
    for n, (tests, functions) in enumerate(sorted(sets.items(), key=lambda kv: -len(kv[0])), 1):
        cmd = [sys.executable, "-m", "pytest", "-p", "no:randomly", *PYTEST_ARGS, *tests]
        run = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
        last = (run.stdout.strip().splitlines() or [""])[-1]
        print(f"{n}/{len(sets)} {len(tests)} tests ({functions[0]}, ...): {last}", flush=True)
        if run.returncode != 0:
            failing += 1
            print("\n".join(line for line in run.stdout.splitlines() if "FAILED" in line))
    print(f"{len(sets)} test sets of {sum(map(len, sets.values()))} functions; {failing} failing")
    return 1 if failing else 0


def planted(source: str, name: str, diff: str) -> str | None:
    """``source`` with the change of mutant ``name`` that ``mutmut show`` gave as ``diff`` (a
    hunk of the function, dedented), made inside that function; None if it is not found there."""
    body = diff.split("\n@@", 1)[1].split("\n", 1)[1].splitlines()
    lines = [line or " " for line in body]  # an empty line of context has lost its space
    old = [line[1:] for line in lines if line[0] in "- "]
    new = [line[1:] for line in lines if line[0] in "+ "]
    parts = re.split(r"\.x_|\u01c1", name.split("__mutmut_")[0])  # x_function or xǁClassǁmethod
    start = source.find(f"class {parts[1]}") if len(parts) > 2 else 0
    start = source.find(f"def {parts[-1]}(", max(start, 0))
    if start < 0:
        return None
    start = source.rfind("\n", 0, start) + 1  # from the line's start (`async def`, a method)
    for indent in ("", "    ", "        "):
        block = "\n".join(indent + line if line else line for line in old)
        at = source.find(block, start)
        if at >= 0:
            changed = "\n".join(indent + line if line else line for line in new)
            return source[:at] + changed + source[at + len(block) :]
    return None


def plant(workdir: Path, mutmut: Path, names: list[str], limit_s: int) -> int:
    """Each mutant planted by hand in a scratch copy of ``workdir``'s unmutated sources, and the
    tests mutmut gives it run in its order with no limit but ``limit_s``: what a timeout (or a
    kill) is made of. Prints the test that failed first, or that none did."""
    import tempfile

    stats = json.loads((workdir / "mutants" / "mutmut-stats.json").read_text())
    duration = stats["duration_by_test"]
    with tempfile.TemporaryDirectory(prefix="aegan-plant-") as scratch:
        copy = Path(scratch) / "repo"
        shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("mutants"), symlinks=True)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        for name in names:
            diff = subprocess.run(
                [str(mutmut), "show", name], cwd=workdir, capture_output=True, text=True
            ).stdout
            path = copy / re.search(r"^--- (\S+)", diff, re.M)[1]  # type: ignore[index]
            original = path.read_text()
            source = planted(original, name, diff)
            if source is None:
                print(f"{name}: its change was not found in {path.name}", flush=True)
                continue
            function = name.split("__mutmut_")[0]
            tests = sorted(stats["tests_by_mangled_function_name"][function], key=duration.get)
            estimate = sum(duration[test] for test in tests)
            cmd = [sys.executable, "-m", "pytest", "-p", "no:randomly", *PYTEST_ARGS, "--tb=line"]
            started = time.monotonic()
            path.write_text(source)
            try:
                run = subprocess.run(
                    [*cmd, *tests],
                    cwd=copy,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=limit_s,
                )
                out = run.stdout.strip().splitlines()
                failed = [line for line in out if line.startswith("FAILED")][:1]
                told = f"{out[-1] if out else ''} {' '.join(failed)}"
            except subprocess.TimeoutExpired:
                told = f"still running after {limit_s} s"
            finally:
                path.write_text(original)
            took = time.monotonic() - started
            print(
                f"{name}: {len(tests)} tests, {estimate:.1f} s in mutmut's first run, {took:.0f} s "
                f"here: {told}",
                flush=True,
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="default: build/mutation/PART")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument(
        "--timeout-multiplier",
        type=float,
        default=15.0,
        help="mutmut's timeout_multiplier (its default 15; lower on a quiet machine, to re-run "
        "timeouts faster)",
    )
    parser.add_argument(
        "--part", choices=sorted(PARTS), default="core-service", help="which modules to mutate"
    )
    parser.add_argument(
        "--sample", type=int, choices=sorted(SAMPLE_DIGITS), default=1, help="every N-th mutant"
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument(
        "--report", action="store_true", help="only summarise the results already in --workdir"
    )
    parser.add_argument(
        "--check-order",
        action="store_true",
        help="run each function's tests in mutmut's order on the unmutated copy (no mutants)",
    )
    parser.add_argument(
        "--remap",
        action="store_true",
        help="collect again which tests reach which function (keeping the results): mutmut "
        "maps only the tests it has not seen, so a test changed since keeps its old map",
    )
    parser.add_argument(
        "--plant",
        type=int,
        metavar="SECONDS",
        help="plant the named mutants by hand in a scratch copy and run their tests for up to "
        "SECONDS each, without mutmut (what a timeout is made of)",
    )
    parser.add_argument("mutants", nargs="*", help="only these mutants (mutmut's names or globs)")
    args = parser.parse_args()

    args.workdir = args.workdir or REPO / "build" / "mutation" / args.part
    mutmut = Path(sys.executable).with_name("mutmut")
    digits = SAMPLE_DIGITS[args.sample]
    if args.report:
        return summarise(args, mutmut, digits, seconds=None)
    if args.check_order:
        return check_order(args.workdir, args.part)
    if args.plant:
        return plant(args.workdir, mutmut, args.mutants, args.plant)
    stage(args.workdir, args.fresh, args.part, args.timeout_multiplier)
    if args.remap:
        forget_test_map(args.workdir / "mutants" / "mutmut-stats.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the tests must import the mutated copy, nothing else
    started = time.monotonic()
    names = args.mutants or ([f"*__mutmut_*[{digits}]"] if args.sample > 1 else [])
    cmd = [str(mutmut), "run", "--max-children", str(args.max_children), *names]
    run = subprocess.run(cmd, cwd=args.workdir, env=env)
    if run.returncode != 0:
        print(f"mutmut run failed ({run.returncode})", file=sys.stderr)
        return run.returncode
    return summarise(args, mutmut, digits, seconds=round(time.monotonic() - started))


def summarise(args: argparse.Namespace, mutmut: Path, digits: str, seconds: int | None) -> int:
    summary = {
        "command": " ".join(["nice -n 19 .venv/bin/python scripts/mutation.py", *sys.argv[1:]]),
        "sample": f"mutants numbered *[{digits}]" if args.sample > 1 else "all mutants",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "seconds": seconds,
        **results(args.workdir, mutmut, digits),
    }
    text = json.dumps(summary, indent=2) + "\n"
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
