"""The training loop: fetch -> D step -> G+E step -> EMA -> log / snapshot.

Beside it: training/device.py (process group, device, autocast), training/schedules.py (EMA,
learning-rate and loss schedules, batch-norm recomputation), training/run_files.py (config,
metrics, grids, progress) and training/checkpoint.py.

One code path for one process and for ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs). Every rank
runs the same steps on its own data and noise; gradients are averaged by DDP, so every rank holds
the same weights. Rank 0 alone writes the run folder: ``config.json``, ``metrics.jsonl``,
``samples/*.png`` and ``checkpoints/``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import (
    resolve_checkpoint,
    resume_point,
    run_config,
    save_checkpoint,
)
from training.config import (
    ConfigError,
    DataFacts,
    RunConfig,
    validate,
)
from training.data import load_dataset
from training.device import (
    autocast,
    backend_for,
    backend_settings,
    setup_distributed,
    to_device,
    unwrap,
)
from training.losses import (
    discriminator_loss,
    encoder_stage_forward,
    encoder_stage_loss,
    forward,
    generator_encoder_loss,
    latent_discriminator_loss,
    recon_count,
    weighted_total,
)
from training.networks import build_networks
from training.run_files import (
    EvalHook,
    MetricsLog,
    prepare_run_dir,
    progress_bar,
    progress_stats,
    total_steps,
    write_grids,
)
from training.schedules import (
    ENCODER_STAGE,
    ema_beta,
    recompute_batch_norm,
    schedules,
    set_learning_rates,
    update_ema,
)

log = logging.getLogger(__name__)

# --- pieces of the loop ---------------------------------------------------------------------


def fingerprint(nets: dict[str, nn.Module], ema: dict[str, nn.Module]) -> str:
    """SHA-256 of every weight and buffer: equal on all ranks when DDP kept them in sync."""
    digest = hashlib.sha256()
    for group in (nets, ema):
        for name in sorted(group):
            for key, tensor in unwrap(group[name]).state_dict().items():
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def restore(
    state: dict[str, Any], model: Networks, gen: torch.Generator, rank: int, device: torch.device
) -> int:
    """Load a checkpoint's weights, EMA, optimiser states and this rank's RNG states (data order,
    torch's global generator and, on a GPU, the device's, which draws the instance and encoder
    noise there); returns its step."""
    for k, net in model.nets.items():
        net.load_state_dict(state["nets"][k])
    for k, net in model.ema.items():
        net.load_state_dict(state["ema"][k])
    for k, opt in model.optimizers.items():
        if k in state["optim"]:  # the encoder stage's is saved once the run has one
            opt.load_state_dict(state["optim"][k])
    if "scaler" in state:  # fp16 runs
        model.scaler.load_state_dict(state["scaler"])
    gen.set_state(state["rng"]["data"][rank])
    torch.set_rng_state(state["rng"]["torch"][rank])
    cuda = state["rng"].get("cuda", [None] * (rank + 1))[rank]  # absent before it was saved
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    return int(state["step"])


# --- the loop -------------------------------------------------------------------------------


@dataclass
class Networks:
    """The networks being trained (DDP-wrapped under torchrun), their EMA and optimisers."""

    nets: dict[str, nn.Module]  # G, Dx and, for aegan, E and Dz
    ema: dict[str, nn.Module]  # exponential moving averages of G (and E): what is exported
    # "D" (Dx, Dz), "GE" (G, E) and, for a run with an encoder stage, ENCODER_STAGE (E alone)
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler  # fp16: scales the losses of both steps; otherwise a no-op

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device) -> Networks:
        """Identical on every rank: built from the run's seed."""
        torch.manual_seed(cfg.train.seed)
        nets = {k: v.to(device) for k, v in build_networks(cfg.model, cfg.loss.mode).items()}
        ema: dict[str, nn.Module] = {
            k: copy.deepcopy(nets[k]).requires_grad_(False) for k in ("G", "E") if k in nets
        }
        betas = (cfg.optim.beta1, cfg.optim.beta2)

        def adam(names: tuple[str, ...], lr: float) -> torch.optim.Optimizer:
            params = [p for k in names if k in nets for p in nets[k].parameters()]
            return torch.optim.Adam(params, lr=lr, betas=betas)

        optimizers = {
            "D": adam(("Dx", "Dz"), cfg.optim.lr_d),
            "GE": adam(("G", "E"), cfg.optim.lr_g),
        }
        if cfg.train.encoder_stage_steps > 0 and "E" in nets:
            optimizers[ENCODER_STAGE] = adam(("E",), cfg.optim.lr_encoder_stage)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        return cls(nets, ema, optimizers, scaler)

    def state(self) -> dict[str, Any]:
        return {
            "nets": {k: unwrap(v).state_dict() for k, v in self.nets.items()},
            "ema": {k: v.state_dict() for k, v in self.ema.items()},
            "optim": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
        }


def train(
    cfg: RunConfig | None,
    run_dir: Path,
    *,
    resume: bool = False,
    steps: int | None = None,
    device: str | None = None,
    eval_hook: EvalHook | None = None,
    encoder_stage_steps: int | None = None,
) -> Path | None:
    """Train the run in ``run_dir``, or resume it (``resume=True``, ``cfg=None``: the config comes
    from its newest loadable checkpoint; ``steps`` may extend it, ``device`` move it, and
    ``encoder_stage_steps`` give a finished run an encoder stage or lengthen its stage: neither
    changes the steps before). Returns the final checkpoint path on rank 0, None on other ranks."""
    run_dir = Path(run_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, state = _run_config(cfg, run_dir, resume, steps, world)
    if encoder_stage_steps is not None:
        cfg.train.encoder_stage_steps = encoder_stage_steps
        validate(cfg)
    if device is not None:
        cfg.train.device = device
        validate(cfg)
    with backend_settings(cfg.train):
        return _train(cfg, state, run_dir, resume, eval_hook)


def _train(
    cfg: RunConfig,
    state: dict[str, Any] | None,
    run_dir: Path,
    resume: bool,
    eval_hook: EvalHook | None,
) -> Path | None:
    rank, world, device = setup_distributed(cfg.train.device)
    if resume and rank == 0:
        log.info("resuming %s from step %d", run_dir, state["step"] if state else 0)
    t = cfg.train
    if rank == 0:
        log.info("training on %s (%s, %s)", device, t.precision, backend_for(device))
    if t.threads:
        torch.set_num_threads(t.threads)

    data = load_dataset(cfg.data)
    validate(cfg, DataFacts(data.kind, data.shape, len(data), data.source))
    cfg.model.data_shape = list(data.shape)
    model = Networks.build(cfg, device)

    # Data order and noise: per rank, resumable.
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank)
    torch.manual_seed(t.seed * 1000 + rank)  # instance noise
    start = 0 if state is None else restore(state, model, gen, rank, device)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model.nets = {k: DistributedDataParallel(v, device_ids=ids) for k, v in model.nets.items()}
    nets, ema = model.nets, model.ema
    opt_d, opt_ge = model.optimizers["D"], model.optimizers["GE"]
    total = total_steps(cfg)

    fixed_z = torch.randn(
        t.grid_size, cfg.model.latent_dim, generator=torch.Generator().manual_seed(t.seed)
    ).to(device)
    fixed_x = data.samples[:32].to(device)
    # On a GPU the dataset is copied there once (train.data_on_device), or batches go through
    # pinned memory; on the CPU batches are gathered in place.
    on_device = device.type == "cuda" and t.data_on_device
    samples = data.samples.to(device) if on_device else data.samples
    scaler = model.scaler

    writer = rank == 0
    if writer:
        prepare_run_dir(run_dir, cfg, start)
    recon_adv = cfg.loss.adv_x_recon > 0  # otherwise Dx never sees G(E(x))
    n_recon = recon_count(t.batch_size, cfg.loss.recon_share)
    metrics = MetricsLog(run_dir / "metrics.jsonl", cfg, world, writer, eval_hook)
    with progress_bar(writer and t.progress) as progress:
        task = progress.add_task("train", total=total, completed=start, stats="")
        for step in range(start, total):
            if step >= t.steps:  # the encoder stage
                if step == t.steps and t.bn_recompute_batches:
                    recompute_batch_norm(ema, samples, cfg, device)  # of the decoder it keeps
                terms = encoder_stage_step(model, samples, cfg, gen, device, step, world)
            else:
                noise_std, recon_x_weight = schedules(step, t.steps, cfg.loss)
                set_learning_rates(model.optimizers, step, t.steps, cfg.optim)

                # (1) Fetch a batch of data and prior noise.
                idx = torch.randint(len(samples), (t.batch_size,), generator=gen)
                x = (
                    samples[to_device(idx, device)]
                    if on_device
                    else to_device(samples[idx], device)
                )
                z = to_device(
                    torch.randn(t.batch_size, cfg.model.latent_dim, generator=gen), device
                )
                with autocast(t.precision, device):
                    passes = forward(
                        nets, x, z, n_recon, cfg.loss.encoder_noise, cfg.loss.recon_in_g_batch
                    )

                    # (2) Update Dx and Dz on real vs generated (generator side detached).
                    d_terms = discriminator_loss(nets, x, passes, noise_std, recon_adv=recon_adv)
                opt_d.zero_grad(set_to_none=True)
                scaler.scale(weighted_total(d_terms, cfg.loss)).backward()
                scaler.step(opt_d)

                # (3) Update G and E together: fool the updated discriminators, reconstruct x and z.
                with autocast(t.precision, device):
                    ge_terms = generator_encoder_loss(
                        nets, x, passes, noise_std, recon_adv=recon_adv
                    )
                opt_ge.zero_grad(set_to_none=True)
                scaler.scale(weighted_total(ge_terms, cfg.loss, recon_x_weight)).backward()
                scaler.step(opt_ge)
                scaler.update()

                # (4) Exponential moving average of G and E. Under DDP, batch-norm statistics
                # are first taken from rank 0 (as DDP does at each forward) so every rank
                # averages alike.
                if world > 1:
                    for net in nets.values():
                        for buffer in unwrap(net).buffers():
                            dist.broadcast(buffer, 0)
                beta = ema_beta(step, t.ema_halflife)
                for k, net in ema.items():
                    update_ema(net, unwrap(nets[k]), beta)
                terms = {**d_terms, **ge_terms}

            # (5) Log, grids, checkpoints.
            done = step + 1
            metrics.add(terms)
            _after_step(
                model,
                gen,
                cfg,
                done,
                run_dir,
                rank,
                world,
                device,
                data.kind,
                metrics,
                progress,
                task,
                fixed_z,
                fixed_x,
                samples,
            )
    final = resolve_checkpoint(run_dir) if writer else None
    if world > 1:
        dist.barrier()
    return final


def _after_step(
    model: Networks,
    gen: torch.Generator,
    cfg: RunConfig,
    done: int,
    run_dir: Path,
    rank: int,
    world: int,
    device: torch.device,
    kind: str,
    metrics: MetricsLog,
    progress: Progress,
    task: Any,
    fixed_z: torch.Tensor,
    fixed_x: torch.Tensor,
    samples: torch.Tensor,
) -> None:
    """Log, grids and checkpoints after step ``done``; the EMA networks' batch-norm statistics
    are recomputed first where a checkpoint or an evaluation is due (``bn_recompute_batches``)."""
    t, total = cfg.train, total_steps(cfg)
    checkpoint_due = _due(done, t.checkpoint_every, total)
    logging_due = metrics.due(done)
    eval_due = logging_due and t.eval_every > 0 and done % t.eval_every == 0
    if t.bn_recompute_batches and (checkpoint_due or eval_due):
        recompute_batch_norm(model.ema, samples, cfg, device)
    if logging_due:
        record = metrics.write(done, model.ema)
        progress.update(task, stats=progress_stats(record))
    if rank == 0 and kind == "image" and _due(done, t.image_every, total):
        write_grids(model.ema, fixed_z, fixed_x, run_dir / "samples", done)
    if checkpoint_due:
        snapshot(model, gen, cfg, done, run_dir, rank, world, device)
    progress.update(task, completed=done)


def encoder_stage_step(
    model: Networks,
    samples: torch.Tensor,
    cfg: RunConfig,
    gen: torch.Generator,
    device: torch.device,
    step: int,
    world: int,
) -> dict[str, torch.Tensor]:
    """One step of the encoder stage: the EMA generator is the frozen decoder (eval mode); Dz
    and E take one step each; the EMA of E follows E. Returns the loss terms."""
    t, nets, ema = cfg.train, model.nets, model.ema
    decoder = ema["G"].eval()

    # (1) Fetch a batch of data and prior noise, as the joint steps do (train.data_on_device).
    idx = torch.randint(len(samples), (t.batch_size,), generator=gen)
    on_device = samples.device.type == "cuda"
    x = samples[to_device(idx, device)] if on_device else to_device(samples[idx], device)
    z = to_device(torch.randn(t.batch_size, cfg.model.latent_dim, generator=gen), device)
    scaler = model.scaler  # train.precision: the same mixed precision as the joint steps
    with autocast(t.precision, device):
        passes = encoder_stage_forward(nets["E"], decoder, x, z, cfg.loss.encoder_noise)

        # (2) Update Dz on the prior against E(x) and E(G(z)).
        d_terms = latent_discriminator_loss(nets, passes)
    model.optimizers["D"].zero_grad(set_to_none=True)
    scaler.scale(weighted_total(d_terms, cfg.loss)).backward()
    scaler.step(model.optimizers["D"])

    # (3) Update E: fool Dz, reconstruct x through the frozen G, and z.
    with autocast(t.precision, device):
        e_terms = encoder_stage_loss(nets, x, passes)
    opt_e = model.optimizers[ENCODER_STAGE]
    opt_e.zero_grad(set_to_none=True)
    scaler.scale(weighted_total(e_terms, cfg.loss, cfg.loss.recon_x)).backward()
    scaler.step(opt_e)
    scaler.update()

    # (4) EMA of E alone (G is frozen); batch norm as in the joint steps.
    if world > 1:
        for buffer in unwrap(nets["E"]).buffers():
            dist.broadcast(buffer, 0)
    update_ema(ema["E"], unwrap(nets["E"]), ema_beta(step, t.ema_halflife))
    return {**d_terms, **e_terms}


def _run_config(
    cfg: RunConfig | None, run_dir: Path, resume: bool, steps: int | None, world: int
) -> tuple[RunConfig, dict[str, Any] | None]:
    """The config to train with and, when resuming, the checkpoint state to continue from."""
    state = None
    if resume:
        state, raw_config = resume_point(run_dir)
        cfg = run_config(raw_config, run_dir)
        if state is not None and len(state["rng"]["data"]) != world:
            raise ConfigError(
                "--resume",
                f"checkpoint was written by {len(state['rng']['data'])} process(es), "
                f"this run has {world}",
            )
    if cfg is None:
        raise ValueError("train() needs a config unless it resumes")
    if steps is not None:
        cfg.train.steps = steps
    return cfg, state


def snapshot(
    model: Networks,
    gen: torch.Generator,
    cfg: RunConfig,
    step: int,
    run_dir: Path,
    rank: int,
    world: int,
    device: torch.device,
) -> Path | None:
    """A checkpoint written by rank 0 holding every rank's RNG states (the GPU's too, on a GPU);
    all ranks must hold the same weights (compared by fingerprint). Returns its path on rank 0."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    rng_data: list[Any] = [gen.get_state()]
    rng_torch: list[Any] = [torch.get_rng_state()]
    rng_cuda: list[Any] = [cuda]
    fingerprints: list[Any] = [fingerprint(model.nets, model.ema)]
    if world > 1:
        rng_data, rng_torch, rng_cuda = [None] * world, [None] * world, [None] * world
        fingerprints = [None] * world
        dist.all_gather_object(rng_data, gen.get_state())
        dist.all_gather_object(rng_torch, torch.get_rng_state())
        dist.all_gather_object(rng_cuda, cuda)
        dist.all_gather_object(fingerprints, fingerprint(model.nets, model.ema))
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"ranks hold different weights at step {step}: {fingerprints}")
    path = None
    if rank == 0:
        state = {
            "step": step,
            "config": cfg.to_dict(),
            **model.state(),
            "rng": {"data": rng_data, "torch": rng_torch, "cuda": rng_cuda},
            "rank_fingerprints": fingerprints,
        }
        path = save_checkpoint(state, run_dir, cfg.train.keep_checkpoints)
    if world > 1:
        dist.barrier()
    return path


def _due(done: int, every: int, total: int) -> bool:
    return done == total or (every > 0 and done % every == 0)
