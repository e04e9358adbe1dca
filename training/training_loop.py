"""The training loop: fetch -> D step -> G+E step -> EMA -> log / snapshot.

One code path for one process and for ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs). Every rank
runs the same steps on its own data and noise; gradients are averaged by DDP, so every rank holds
the same weights. Rank 0 alone writes the run folder: ``config.json``, ``metrics.jsonl``,
``samples/*.png`` and ``checkpoints/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aegan_serve.images import save_grid
from training.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    remove_temp_files,
    resolve_checkpoint,
    resume_point,
    save_checkpoint,
    write_atomic,
)
from training.config import ConfigError, LossConfig, RunConfig
from training.data import Dataset, load_dataset
from training.losses import discriminator_loss, forward, generator_encoder_loss, weighted_total
from training.networks import build_networks

log = logging.getLogger(__name__)

# Called on rank 0 after each metrics record: (step, record, ema networks) -> extra fields.
EvalHook = Callable[[int, dict[str, Any], dict[str, nn.Module]], dict[str, Any]]


# --- process group --------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun, joins the process group (NCCL on GPUs, gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net


# --- pieces of the loop ---------------------------------------------------------------------


def fingerprint(nets: dict[str, nn.Module], ema: dict[str, nn.Module]) -> str:
    """SHA-256 of every weight and buffer: equal on all ranks when DDP kept them in sync."""
    digest = hashlib.sha256()
    for group in (nets, ema):
        for name in sorted(group):
            for key, tensor in _unwrap(group[name]).state_dict().items():
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ema_beta(step: int, halflife: float) -> float:
    """Per-step EMA decay for a half-life in steps, warmed up so early averages are not stale."""
    return min(0.5 ** (1.0 / halflife), (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)  # batch-norm statistics follow the live network


def schedules(step: int, steps: int, loss: LossConfig) -> tuple[float, float]:
    """(instance noise std, image reconstruction weight) at ``step`` of a run of ``steps``: both
    linear over the run, noise from ``instance_noise`` to 0 and the weight from ``recon_x`` to
    ``recon_x * recon_x_final`` at the last step."""
    frac = step / max(1, steps - 1)
    noise_std = loss.instance_noise * (1.0 - frac)
    recon_x_weight = loss.recon_x * (1.0 - frac * (1.0 - loss.recon_x_final))
    return noise_std, recon_x_weight


def restore(
    state: dict[str, Any],
    nets: dict[str, nn.Module],
    ema: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    gen: torch.Generator,
    rank: int,
) -> int:
    """Load a checkpoint's weights, EMA, optimiser states and this rank's RNG states (data order
    and torch's global generator, which draws the instance noise); returns its step."""
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    for k, net in ema.items():
        net.load_state_dict(state["ema"][k])
    for k, opt in optimizers.items():
        opt.load_state_dict(state["optim"][k])
    gen.set_state(state["rng"]["data"][rank])
    torch.set_rng_state(state["rng"]["torch"][rank])
    return int(state["step"])


def check_data(cfg: RunConfig, data: Dataset) -> None:
    """The data decides the model's data shape; the family must suit it."""
    if cfg.model.arch == "conv" and data.kind != "image":
        raise ConfigError("--arch", f"conv networks need images; {data.source} holds vectors")
    if data.kind == "image" and cfg.model.arch == "conv":
        c, h, w = data.shape
        if h != w or h not in (28, 32, 64):
            raise ConfigError(
                "--arch", f"conv networks take square 28/32/64 px images, not {h}x{w}"
            )
    if cfg.model.data_shape and tuple(cfg.model.data_shape) != data.shape:
        raise ConfigError(
            "--data", f"data shape {data.shape} differs from the run's {cfg.model.data_shape}"
        )
    cfg.model.data_shape = list(data.shape)
    if len(data) < cfg.train.batch_size:
        raise ConfigError("--batch-size", f"{data.source} has only {len(data)} samples")


def write_grids(
    ema: dict[str, nn.Module], fixed_z: torch.Tensor, fixed_x: torch.Tensor, folder: Path, step: int
) -> None:
    """Samples of the EMA generator on fixed noise; real images above their reconstructions."""
    folder.mkdir(parents=True, exist_ok=True)
    for net in ema.values():
        net.eval()
    with torch.no_grad():
        fakes = ema["G"](fixed_z).cpu().numpy()
        save_grid(fakes, str(folder / f"fakes-{step:07d}.png"))
        if "E" in ema:
            recon = ema["G"](ema["E"](fixed_x)).cpu()
            n = min(8, len(fixed_x))
            rows = [
                torch.cat([fixed_x[i : i + n].cpu(), recon[i : i + n]]) for i in range(0, 32, n)
            ]
            save_grid(torch.cat(rows).numpy(), str(folder / f"recon-{step:07d}.png"), nrow=n)
    for net in ema.values():
        net.train()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we resume from, and a last record cut
    off by a crash in the middle of its write; the history is replaced atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a record cut off mid-write
            continue
        recorded = record.get("step") if isinstance(record, dict) else None
        if isinstance(recorded, int) and recorded <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


# --- the loop -------------------------------------------------------------------------------


def train(
    cfg: RunConfig | None,
    run_dir: Path,
    *,
    resume: bool = False,
    steps: int | None = None,
    eval_hook: EvalHook | None = None,
) -> Path | None:
    """Train the run in ``run_dir``, or resume it (``resume=True``, ``cfg=None``: the config comes
    from its newest loadable checkpoint; ``steps`` may extend it). Returns the final checkpoint
    path on rank 0, None on other ranks."""
    run_dir = Path(run_dir)
    rank, world, device = setup_distributed()
    state = None
    if resume:
        state, raw_config = resume_point(run_dir)
        try:
            cfg = RunConfig.from_dict(raw_config)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{run_dir}: the run's config cannot be read ({exc})") from exc
        if state is not None and len(state["rng"]["data"]) != world:
            raise ConfigError(
                "--resume",
                f"checkpoint was written by {len(state['rng']['data'])} process(es), "
                f"this run has {world}",
            )
        if rank == 0:
            log.info("resuming %s from step %d", run_dir, state["step"] if state else 0)
    if cfg is None:
        raise ValueError("train() needs a config unless it resumes")
    if steps is not None:
        cfg.train.steps = steps
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)

    data = load_dataset(cfg.data)
    check_data(cfg, data)
    mode = cfg.loss.mode

    # Networks, their EMA and optimisers: identical on every rank (same seed).
    torch.manual_seed(t.seed)
    nets = {k: v.to(device) for k, v in build_networks(cfg.model, mode).items()}
    ema = {k: copy.deepcopy(nets[k]).requires_grad_(False) for k in ("G", "E") if k in nets}
    d_params = [p for k in ("Dx", "Dz") if k in nets for p in nets[k].parameters()]
    ge_params = [p for k in ("G", "E") if k in nets for p in nets[k].parameters()]
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_d = torch.optim.Adam(d_params, lr=cfg.optim.lr_d, betas=betas)
    opt_ge = torch.optim.Adam(ge_params, lr=cfg.optim.lr_g, betas=betas)

    # Data order and noise: per rank, resumable.
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank)
    torch.manual_seed(t.seed * 1000 + rank)  # instance noise
    optimizers = {"D": opt_d, "GE": opt_ge}
    start = 0 if state is None else restore(state, nets, ema, optimizers, gen, rank)

    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        nets = {k: DistributedDataParallel(v, device_ids=ids) for k, v in nets.items()}

    fixed = torch.Generator().manual_seed(t.seed)
    fixed_z = torch.randn(t.grid_size, cfg.model.latent_dim, generator=fixed).to(device)
    fixed_x = data.samples[:32].to(device)
    samples = data.samples  # kept on the CPU; batches move to the device

    writer = rank == 0
    metrics_path = run_dir / "metrics.jsonl"
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_temp_files(run_dir)
        if removed:
            log.info("removed %d temporary file(s) of cut-off writes", len(removed))
        write_atomic(run_dir / CONFIG_FILE, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        _truncate_metrics(metrics_path, start)

    def snapshot(step: int) -> Path:
        rng_data, rng_torch = [gen.get_state()], [torch.get_rng_state()]
        fingerprints = [fingerprint(nets, ema)]
        if world > 1:  # every rank's RNG goes into the one checkpoint rank 0 writes
            rng_data, rng_torch, fingerprints = [None] * world, [None] * world, [None] * world
            dist.all_gather_object(rng_data, gen.get_state())
            dist.all_gather_object(rng_torch, torch.get_rng_state())
            dist.all_gather_object(fingerprints, fingerprint(nets, ema))
            if len(set(fingerprints)) != 1:
                raise RuntimeError(f"ranks hold different weights at step {step}: {fingerprints}")
        path = None
        if writer:
            path = save_checkpoint(
                {
                    "step": step,
                    "config": cfg.to_dict(),
                    "nets": {k: _unwrap(v).state_dict() for k, v in nets.items()},
                    "ema": {k: v.state_dict() for k, v in ema.items()},
                    "optim": {k: opt.state_dict() for k, opt in optimizers.items()},
                    "rng": {"data": rng_data, "torch": rng_torch},
                    "rank_fingerprints": fingerprints,
                },
                run_dir,
                t.keep_checkpoints,
            )
        if world > 1:
            dist.barrier()
        return path

    progress = _progress(writer and t.progress)
    task = progress.add_task("train", total=t.steps, completed=start, stats="")
    sums: dict[str, torch.Tensor] = {}
    interval_start, interval_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    final = None
    with progress:
        for step in range(start, t.steps):
            noise_std, recon_x_weight = schedules(step, t.steps, cfg.loss)

            # (1) Fetch a batch of data and prior noise.
            idx = torch.randint(len(samples), (t.batch_size,), generator=gen)
            x = samples[idx].to(device, non_blocking=True)
            z = torch.randn(t.batch_size, cfg.model.latent_dim, generator=gen).to(device)
            passes = forward(nets, x, z)

            # (2) Update Dx and Dz on real vs generated (generator side detached).
            d_terms = discriminator_loss(nets, x, passes, noise_std)
            opt_d.zero_grad(set_to_none=True)
            weighted_total(d_terms, cfg.loss).backward()
            opt_d.step()

            # (3) Update G and E together: fool the updated discriminators, reconstruct x and z.
            ge_terms = generator_encoder_loss(nets, x, passes, noise_std)
            opt_ge.zero_grad(set_to_none=True)
            weighted_total(ge_terms, cfg.loss, recon_x_weight).backward()
            opt_ge.step()

            # (4) Exponential moving average of G and E. Under DDP, batch-norm statistics are
            # first taken from rank 0 (as DDP does at each forward) so every rank averages alike.
            if world > 1:
                for net in nets.values():
                    for buffer in net.module.buffers():
                        dist.broadcast(buffer, 0)
            beta = ema_beta(step, t.ema_halflife)
            for k, net in ema.items():
                update_ema(net, _unwrap(nets[k]), beta)

            # (5) Log, grids, checkpoints.
            done = step + 1
            for k, v in {**d_terms, **ge_terms}.items():  # summed on the device: no sync per step
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()
            interval_steps += 1
            if done % t.log_every == 0 or done == t.steps:
                elapsed = time.perf_counter() - interval_start
                record = {k: float(v) / interval_steps for k, v in sums.items()}
                if not all(map(_finite, record.values())):
                    raise FloatingPointError(f"non-finite loss at step {done}: {record}")
                record = {
                    "step": done,
                    "time_s": round(time.perf_counter() - run_start, 3),
                    "images_per_s": round(t.batch_size * world * interval_steps / elapsed, 1),
                    **record,
                }
                if writer:
                    if eval_hook is not None:
                        record.update(eval_hook(done, record, ema))
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    stats = " ".join(
                        f"{k.removeprefix('loss/')}={record[k]:.3f}"
                        for k in ("loss/Dx/real", "loss/G/adv_x", "loss/GE/recon_x")
                        if k in record
                    )
                    progress.update(task, stats=f"{stats} {record['images_per_s']:.0f} img/s")
                sums, interval_start, interval_steps = {}, time.perf_counter(), 0
            if writer and data.kind == "image" and _due(done, t.image_every, t.steps):
                write_grids(ema, fixed_z, fixed_x, run_dir / "samples", done)
            if _due(done, t.checkpoint_every, t.steps):
                final = snapshot(done)
            progress.update(task, completed=done)
    if world > 1:
        dist.barrier()
    return final if final is not None else (resolve_checkpoint(run_dir) if writer else None)


def _due(done: int, every: int, total: int) -> bool:
    return done == total or (every > 0 and done % every == 0)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _progress(enabled: bool) -> Any:
    """A rich progress bar with the live figures, or a silent stand-in."""
    if not enabled:
        return _NoProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )


class _NoProgress(nullcontext):
    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass
