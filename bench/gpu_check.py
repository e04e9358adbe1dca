"""The first run on a CUDA machine, in one command: what works, how fast, how exact. JSON out.

    .venv/bin/python bench/gpu_check.py                      # at most 8 minutes; gpu-check.json
    .venv/bin/python bench/gpu_check.py --out /tmp/gpu.json --budget-s 300

Needs the ``train`` extra (torch, onnx); torch's CUDA build for the torch steps, and for the ONNX
Runtime steps onnxruntime-gpu with its CUDA libraries (the ``gpu`` extra, or the CUDA image). Each
step is reported as ``ok``, ``failed`` (with the error) or ``skipped`` (with the reason: no CUDA
device, no usable CUDA provider, out of time), so the same command runs on the CPU, where every
CUDA step is skipped. No dataset is needed: training runs on random images of the shipped model's
shape (the cost of a step does not depend on the pixels).

Steps:
  machine            host, torch and ONNX Runtime builds, GPUs
  graph_interpreter  the shipped graphs re-run in torch (float64) against ONNX Runtime on the CPU:
                     checks the interpreter the operator_error step relies on
  operator_error     the shipped graphs' operators on CUDA in fp32 (TF32 off and on), fp16 and bf16,
                     max abs error against float64 on the CPU
  training           steps per second of both modes (aegan, gan), fp32 and bf16, on CUDA
  resume             a run on CUDA stopped at a checkpoint and resumed equals one that was not
                     (train.deterministic), and whether it does without deterministic kernels
  torch_cold_start   first and warm run of G and E per batch size on CUDA (cudnn.benchmark off/on)
  ort_provider       the service's CUDA check and ModelRuntime on CUDA: providers, IO binding,
                     fp16 graphs, start-up time (warm-up of every batch size)
  ort_parity         ONNX Runtime CUDA against CPU: fp32 with TF32 off and on, fp16
  ort_cold_start     first run per batch size of fresh CUDA sessions, HEURISTIC against EXHAUSTIVE
  serve              ``bentoml serve`` with AEGAN_DEVICE=cuda: time to ready, /info, /generate,
                     memory
  memory             this process's peak host memory and torch's device memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aegan_core.bundle import DEFAULT_MODEL_DIR, ENCODER, GENERATOR, load_bundle  # noqa: E402

BUDGET_S = 480  # the whole check: 8 minutes
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the service's CUDA buckets up to its GPU batch


class Skip(Exception):
    """A step that cannot run here; the message says why."""


def torch_cuda_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return f"torch sees no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"


def needs_torch_cuda(ctx: dict[str, Any]) -> Any:
    """torch, when the torch steps can run: on CUDA, or on the CPU in a rehearsal."""
    import torch

    reason = torch_cuda_reason()
    if reason and not ctx["rehearsal"]:
        raise Skip(reason)
    return torch


def ort_cuda_reason() -> str | None:
    from aegan_core.cuda import DeviceError, check

    try:
        check()
    except DeviceError as exc:
        return f"no usable ONNX Runtime CUDA provider: {exc}"
    return None


def synced(torch: Any, fn: Callable[[], Any]) -> float:
    """Seconds of ``fn()`` with the GPU's queue drained before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


# --- the shipped graphs in torch ------------------------------------------------------------------


def graph_function(path: Path) -> Callable[[Any], Any]:
    """The ONNX graph at ``path`` as a torch function of its one input, in the input's dtype and
    on its device. Knows the operators the exported networks use; any other is an error."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (input_name,) = [i.name for i in model.graph.input if i.name not in weights]
    output_name = model.graph.output[0].name
    nodes = [
        (
            n.op_type,
            list(n.input),
            n.output[0],
            {a.name: helper.get_attribute_value(a) for a in n.attribute},
        )
        for n in model.graph.node
    ]

    def pads(attrs: dict[str, Any]) -> list[int]:
        p = list(attrs.get("pads", [0, 0, 0, 0]))
        if p[:2] != p[2:] or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError(f"asymmetric or automatic padding {attrs}")
        return p[:2]

    def run(x: Any) -> Any:
        values = {input_name: x}
        for name, array in weights.items():
            tensor = torch.from_numpy(np.array(array))
            values[name] = tensor.to(x.device, x.dtype) if tensor.is_floating_point() else tensor
        for op, inputs, output, attrs in nodes:
            args = [values[i] if i else None for i in inputs]
            if op == "Gemm":
                a, b = args[0], args[1]
                a = a.T if attrs.get("transA") else a
                b = b.T if attrs.get("transB") else b
                y = attrs.get("alpha", 1.0) * (a @ b)
                if len(args) > 2 and args[2] is not None:
                    y = y + attrs.get("beta", 1.0) * args[2]
            elif op == "Conv":
                y = F.conv2d(
                    args[0],
                    args[1],
                    args[2] if len(args) > 2 else None,
                    attrs.get("strides", [1, 1]),
                    pads(attrs),
                    attrs.get("dilations", [1, 1]),
                    attrs.get("group", 1),
                )
            elif op == "ConvTranspose":
                y = F.conv_transpose2d(
                    args[0],
                    args[1],
                    args[2] if len(args) > 2 else None,
                    attrs.get("strides", [1, 1]),
                    pads(attrs),
                    attrs.get("output_padding", [0, 0]),
                    attrs.get("group", 1),
                    attrs.get("dilations", [1, 1]),
                )
            elif op == "Reshape":
                shape = [int(s) for s in args[1].tolist()]
                if not attrs.get("allowzero", 0):
                    shape = [args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
                y = args[0].reshape(shape)
            elif op == "Relu":
                y = torch.relu(args[0])
            elif op == "LeakyRelu":
                y = F.leaky_relu(args[0], attrs.get("alpha", 0.01))
            elif op == "Tanh":
                y = torch.tanh(args[0])
            elif op == "Sigmoid":
                y = torch.sigmoid(args[0])
            elif op == "Identity":
                y = args[0]
            else:
                raise NotImplementedError(f"{path.name}: operator {op} is not interpreted here")
            values[output] = y
        return values[output_name]

    return run


def shipped_inputs(bundle: Any, rows: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        GENERATOR: rng.standard_normal((rows, bundle.latent_dim)),
        ENCODER: rng.uniform(-1.0, 1.0, (rows, *bundle.data_shape)),
    }


# --- the steps ------------------------------------------------------------------------------------


def step_machine(ctx: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 2),
                }
            )
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "torch_cuda_reason": torch_cuda_reason(),
        "gpus": gpus,
        "onnxruntime": ort.__version__,
        "onnxruntime_packages": {p: version(p) for p in ("onnxruntime", "onnxruntime-gpu")},
        "onnxruntime_providers": ort.get_available_providers(),
        "ort_cuda_reason": ctx["ort_cuda_reason"],
    }


def step_graph_interpreter(ctx: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    bundle = ctx["bundle"]
    found = {}
    for role, x in shipped_inputs(bundle).items():
        session = ort.InferenceSession(str(bundle.file(role)), providers=["CPUExecutionProvider"])
        expected = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
        got = graph_function(bundle.file(role))(torch.from_numpy(x)).numpy()
        found[role] = {"max_abs_error_float64_vs_ort_cpu": float(np.abs(got - expected).max())}
        if found[role]["max_abs_error_float64_vs_ort_cpu"] > 1e-4:
            raise RuntimeError(f"the torch re-run of {role} disagrees with ONNX Runtime: {found}")
    return found


def step_operator_error(ctx: dict[str, Any]) -> dict[str, Any]:
    torch = needs_torch_cuda(ctx)
    device = ctx["torch_device"]
    bundle = ctx["bundle"]
    found: dict[str, Any] = {}
    for role, x in shipped_inputs(bundle, rows=ctx["batch_sizes"][-1]).items():
        run = graph_function(bundle.file(role))
        reference = run(torch.from_numpy(x)).numpy()  # float64 on the CPU
        errors = {}
        for name, dtype, tf32 in (
            ("fp32", torch.float32, False),
            ("fp32_tf32", torch.float32, True),
            ("fp16", torch.float16, False),
            ("bf16", torch.bfloat16, False),
        ):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            with torch.no_grad():
                y = run(torch.from_numpy(x).to(device, dtype)).float().cpu().numpy()
            errors[name] = float(np.abs(y - reference).max())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True  # torch's defaults
        found[role] = {"max_abs_error_vs_float64": errors}
    return found


def _random_images(folder: Path, shape: tuple[int, ...], count: int = 2048) -> Path:
    path = folder / "images.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.uniform(0, 1, (count, *shape)).astype(np.float32))  # .npy images: [0, 1]
    return path


def _cuda_run(
    ctx: dict[str, Any], data: Path, steps: int, loss: dict[str, Any] | None = None, **train: Any
) -> Any:
    """The shipped model's networks and recipe (fmnist-cpu) on ``data``, on CUDA (a rehearsal:
    on the CPU, a few steps)."""
    from training.config import from_preset, validate

    cfg = from_preset("fmnist-cpu")
    cfg.data.source = str(data)
    t = cfg.train
    t.steps, t.log_every, t.checkpoint_every, t.image_every, t.progress = steps, steps, 0, 0, False
    t.device = ctx["torch_device"]
    for key, value in train.items():
        setattr(cfg.train, key, value)
    for key, value in (loss or {}).items():
        setattr(cfg.loss, key, value)
    if ctx["rehearsal"]:  # the same code on small networks, so the CPU gets through it
        cfg.model.width, cfg.model.hidden, cfg.train.batch_size = 8, 32, 16
    return validate(cfg)


def step_training(ctx: dict[str, Any]) -> dict[str, Any]:
    needs_torch_cuda(ctx)
    from training.training_loop import train

    tmp = Path(ctx["tmp"])
    data = _random_images(tmp, tuple(ctx["bundle"].data_shape))
    found = {}
    for mode in ("aegan", "gan"):
        for precision in ("fp32", "bf16"):
            run = tmp / f"train-{mode}-{precision}"
            # 240 steps logged every 40: the first record (start-up, cuDNN plans) is left out
            steps, every = (6, 2) if ctx["rehearsal"] else (240, 40)
            mode_loss = {"mode": mode}
            cfg = _cuda_run(ctx, data, steps, mode_loss, precision=precision, log_every=every)
            train(cfg, run)
            lines = (run / "metrics.jsonl").read_text().splitlines()
            timed = [json.loads(line) for line in lines][1:]
            images_per_s = float(np.mean([r["images_per_s"] for r in timed]))
            losses = [v for r in timed for k, v in r.items() if k.startswith("loss/")]
            found[f"{mode}-{precision}"] = {
                "batch_size": cfg.train.batch_size,
                "images_per_s": round(images_per_s, 1),
                "steps_per_s": round(images_per_s / cfg.train.batch_size, 2),
                "finite_losses": bool(np.isfinite(losses).all()),
            }
    return found


def step_resume(ctx: dict[str, Any]) -> dict[str, Any]:
    torch = needs_torch_cuda(ctx)
    from training.checkpoint import load_checkpoint
    from training.training_loop import train

    tmp = Path(ctx["tmp"])
    data = _random_images(tmp, tuple(ctx["bundle"].data_shape), 512)

    def weights(path: Path) -> dict[str, Any]:
        state = load_checkpoint(path)
        return {
            f"{g}.{n}.{k}": v
            for g in ("nets", "ema")
            for n in state[g]
            for k, v in state[g][n].items()
        }

    def same(deterministic: bool) -> bool:
        def cfg() -> Any:
            noisy = {"instance_noise": 0.2}  # draws from the GPU's generator every step
            return _cuda_run(ctx, data, 8, noisy, checkpoint_every=4, deterministic=deterministic)

        tag = "det" if deterministic else "nondet"
        straight = weights(train(cfg(), tmp / f"straight-{tag}"))
        run = tmp / f"resumed-{tag}"
        train(cfg(), run)
        (run / "checkpoints" / "step-0000008.pt").unlink()
        resumed = weights(train(None, run, resume=True))
        return all(torch.equal(straight[k], resumed[k]) for k in straight)

    found = {"bit_exact_deterministic": same(True), "bit_exact_default": same(False)}
    if not found["bit_exact_deterministic"]:
        raise RuntimeError(f"a deterministic run resumed on CUDA differs: {found}")
    return found


def step_torch_cold_start(ctx: dict[str, Any]) -> dict[str, Any]:
    torch = needs_torch_cuda(ctx)
    device = ctx["torch_device"]
    bundle = ctx["bundle"]
    found: dict[str, Any] = {}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        for role in (GENERATOR, ENCODER):
            run = graph_function(bundle.file(role))
            shape = (bundle.latent_dim,) if role == GENERATOR else tuple(bundle.data_shape)
            sizes = {}
            for n in ctx["batch_sizes"]:
                x = torch.randn((n, *shape), device=device)
                with torch.no_grad():
                    first = synced(torch, lambda x=x, run=run: run(x))
                    warm = min(synced(torch, lambda x=x, run=run: run(x)) for _ in range(3))
                sizes[str(n)] = {"first_ms": round(first * 1e3, 3), "warm_ms": round(warm * 1e3, 3)}
            found[f"{role}-benchmark_{'on' if benchmark else 'off'}"] = sizes
    torch.backends.cudnn.benchmark = False
    return found


def needs_ort_cuda(ctx: dict[str, Any]) -> None:
    if ctx["ort_cuda_reason"]:
        raise Skip(ctx["ort_cuda_reason"])


def step_ort_provider(ctx: dict[str, Any]) -> dict[str, Any]:
    needs_ort_cuda(ctx)
    from aegan_core.runtime import CUDA, ModelRuntime

    found = {}
    for fp16 in (False, True):
        started = time.perf_counter()
        model = ModelRuntime(ctx["bundle"], "cuda", fp16=fp16, max_rows=BATCH_SIZES[-1])
        found["fp16" if fp16 else "fp32"] = {
            "start_s": round(time.perf_counter() - started, 3),  # sessions + warm-up of buckets
            "provider": model.provider,
            "session_providers": model.generator.session.get_providers(),
            "io_binding": model.generator.device_id is not None,
            "precision": model.precision,
            "fp16_max_abs_error_vs_cpu": model.fp16_error,
        }
        if model.provider != CUDA:
            raise RuntimeError(f"ModelRuntime did not run on CUDA: {model.cuda_reason}")
    return found


def step_ort_parity(ctx: dict[str, Any]) -> dict[str, Any]:
    needs_ort_cuda(ctx)
    from aegan_core.cuda import CudaOptions
    from aegan_core.runtime import ModelRuntime

    bundle = ctx["bundle"]
    cpu = ModelRuntime(bundle, "cpu")
    inputs = {r: x.astype(np.float32) for r, x in shipped_inputs(bundle, 256).items()}
    expected = {GENERATOR: cpu.generate(inputs[GENERATOR]), ENCODER: cpu.encode(inputs[ENCODER])}
    found = {}
    for name, tf32, fp16 in (
        ("fp32", False, False),
        ("fp32_tf32", True, False),
        ("fp16", False, True),
    ):
        model = ModelRuntime(bundle, "cuda", fp16=fp16, cuda=CudaOptions(tf32=tf32), max_rows=256)
        got = {GENERATOR: model.generate(inputs[GENERATOR]), ENCODER: model.encode(inputs[ENCODER])}
        found[name] = {r: float(np.abs(got[r] - expected[r]).max()) for r in got}
    found["fp32_within_1e-4"] = max(found["fp32"].values()) <= 1e-4
    return found


def step_ort_cold_start(ctx: dict[str, Any]) -> dict[str, Any]:
    needs_ort_cuda(ctx)
    import onnxruntime as ort

    from aegan_core.cuda import CudaOptions
    from aegan_core.runtime import session_options

    bundle = ctx["bundle"]
    inputs = {r: x.astype(np.float32) for r, x in shipped_inputs(bundle, BATCH_SIZES[-1]).items()}
    found: dict[str, Any] = {}
    for search in ("HEURISTIC", "EXHAUSTIVE"):
        options = CudaOptions(algo_search=search)
        for role in (GENERATOR, ENCODER):
            session = ort.InferenceSession(
                str(bundle.file(role)),
                sess_options=session_options(1),
                providers=options.providers(),
            )
            name = session.get_inputs()[0].name
            sizes = {}
            for n in BATCH_SIZES:
                started = time.perf_counter()
                session.run(None, {name: inputs[role][:n]})
                first = time.perf_counter() - started
                warm = []
                for _ in range(3):
                    started = time.perf_counter()
                    session.run(None, {name: inputs[role][:n]})
                    warm.append(time.perf_counter() - started)
                sizes[str(n)] = {
                    "first_ms": round(first * 1e3, 3),
                    "warm_ms": round(min(warm) * 1e3, 3),
                }
            found[f"{role}-{search}"] = sizes
    return found


def step_serve(ctx: dict[str, Any]) -> dict[str, Any]:
    needs_ort_cuda(ctx)
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AEGAN_DEVICE": "cuda", "BENTOML_DO_NOT_TRACK": "True"}
    command = [
        str(Path(sys.executable).parent / "bentoml"),
        "serve",
        "aegan_serve.service:AEGAN",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    log = Path(ctx["tmp"]) / "serve.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"bentoml serve exited ({process.returncode}): {log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > 180:
                raise RuntimeError(f"not ready after 180 s: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        ready_s = time.perf_counter() - started

        def post(path: str, body: dict[str, Any]) -> Any:
            request = urllib.request.Request(
                base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())

        info = post("/info", {})
        generated = post("/generate", {"n": 8, "seed": 1})
        parent = psutil.Process(process.pid)
        rss = {
            str(p.pid): round(p.memory_info().rss / 2**20, 1)
            for p in [parent, *parent.children(recursive=True)]
        }
        found = {
            "ready_s": round(ready_s, 2),
            "runtime": info["runtime"],
            "generate_images": len(generated["images"]),
            "rss_mib": rss,
        }
        if info["runtime"]["provider"] != "CUDAExecutionProvider":
            raise RuntimeError(f"the server does not run on CUDA: {info['runtime']}")
        return found
    finally:
        sys.path.insert(0, str(REPO / "tests"))
        from process_helpers import stop_group  # psutil comes with bentoml

        stop_group(process, timeout=30)


def step_memory(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {
        "host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "children_peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }
    reason = torch_cuda_reason()
    if reason:
        found["device"] = {"skipped": reason}
    else:
        free, total = torch.cuda.mem_get_info()
        found["device"] = {
            "torch_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "torch_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
            "free_mib": round(free / 2**20, 1),
            "total_mib": round(total / 2**20, 1),
        }
    return found


# Each step with a generous estimate of its seconds on a GPU: one that does not fit in what is
# left of the budget is skipped, so the whole check ends in time.
STEPS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], float]] = [
    ("machine", step_machine, 5),
    ("graph_interpreter", step_graph_interpreter, 10),
    ("operator_error", step_operator_error, 20),
    ("ort_provider", step_ort_provider, 30),
    ("ort_parity", step_ort_parity, 30),
    ("ort_cold_start", step_ort_cold_start, 60),
    ("torch_cold_start", step_torch_cold_start, 30),
    ("training", step_training, 150),
    ("resume", step_resume, 60),
    ("serve", step_serve, 90),
    ("memory", step_memory, 2),
]


def run_checks(
    bundle_dir: Path, budget_s: float, only: list[str] | None = None, rehearsal: bool = False
) -> dict[str, Any]:
    """Every step (or those in ``only``) within ``budget_s``. ``rehearsal``: the torch steps run
    on the CPU (a few steps each), to try their code where there is no GPU; not GPU figures."""
    started = time.monotonic()
    report: dict[str, Any] = {
        "budget_s": budget_s,
        "bundle": str(bundle_dir),
        "rehearsal_on_cpu": rehearsal,
        "steps": {},
    }
    with tempfile.TemporaryDirectory(prefix="aegan-gpu-check-") as tmp:
        ctx = {
            "bundle": load_bundle(bundle_dir),
            "tmp": tmp,
            "ort_cuda_reason": ort_cuda_reason(),
            "rehearsal": rehearsal,
            "torch_device": "cpu" if rehearsal else "cuda",
            "batch_sizes": BATCH_SIZES[:4] if rehearsal else BATCH_SIZES,
        }
        for name, step, estimate_s in STEPS:
            if only and name not in only:
                continue
            left = budget_s - (time.monotonic() - started)
            entry: dict[str, Any]
            step_started = time.monotonic()
            if estimate_s > left and name not in ("machine", "memory"):
                entry = {
                    "status": "skipped",
                    "reason": f"out of time ({left:.0f} s left, needs about {estimate_s:.0f} s)",
                }
            else:
                try:
                    entry = {"status": "ok", "results": step(ctx)}
                except Skip as skip:
                    entry = {"status": "skipped", "reason": str(skip)}
                except Exception as exc:  # a failed check is a result: report it, go on
                    tail = traceback.format_exc()[-4000:]
                    entry = {
                        "status": "failed",
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": tail,
                    }
            entry["seconds"] = round(time.monotonic() - step_started, 2)
            report["steps"][name] = entry
            print(
                f"{name}: {entry['status']} ({entry['seconds']} s)"
                + (
                    f": {entry.get('reason') or entry.get('error')}"
                    if entry["status"] != "ok"
                    else ""
                ),
                flush=True,
            )
    report["total_s"] = round(time.monotonic() - started, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="JSON report")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_MODEL_DIR, help="model bundle")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for all steps")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    parser.add_argument(
        "--rehearsal",
        action="store_true",
        help="run the torch steps on the CPU (a few steps each) to try the code without a GPU; "
        "its figures are not GPU figures",
    )
    args = parser.parse_args()
    report = run_checks(args.bundle, args.budget_s, args.only, args.rehearsal)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, entry in report["steps"].items() if entry["status"] == "failed"]
    failures = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"report: {args.out} ({report['total_s']} s){failures}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
