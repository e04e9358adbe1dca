"""What one training step of `aegan` and `gan` costs, and what each network pass inside it costs.

Two measurements in one run, on one preset (fmnist-cpu unless --preset says otherwise):

1. **Passes.** Each network (G, E, Dx, Dz) at the batch size, twice and three times it: the median
   milliseconds of a forward pass, and of a forward plus a backward to the weights and the input
   (what the G+E step pays for a discriminator it looks through). Batching two or three passes of
   one network into one call saves what ``2 x one`` or ``3 x one`` exceeds the batched cost.
2. **Steps.** Whole steps as the training loop runs them (fetch, D step, G+E step, EMA), with the
   losses of ``training/losses.py`` as they are at this commit and, with ``--baseline REV``, as
   they were at git revision REV (loaded from git into a module of its own). Every (losses, mode)
   pair takes its turn in each round, in a seeded random order, so all see the same machine
   conditions; the medians and the ratios aegan / gan of each version are reported.

    nice -n 10 python bench/step_cost.py --threads 1 --baseline e9dcec3 \\
        --out docs/bench-step-cost.json

``--variant 'loss.recon_share=0.25 loss.adv_x_recon=0'`` (repeatable) times, in the same rounds,
an AEGAN of the current losses with those settings as well; ``step_ms`` holds it under ``aegan
SETTINGS`` and ``over_gan`` its step against the GAN's.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import torch

from training import losses as current_losses
from training.config import DataFacts, RunConfig, apply_assignment, from_preset, validate
from training.data import load_dataset
from training.networks import build_networks
from training.schedules import ema_beta, schedules, set_learning_rates, update_ema

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import machine  # noqa: E402


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


class Trainer:
    """The networks, optimisers and data of one mode, stepping exactly as the training loop."""

    def __init__(self, cfg: RunConfig, seed: int = 0, losses: ModuleType = current_losses) -> None:
        mode = cfg.loss.mode
        self.losses = losses
        self.data = load_dataset(cfg.data)
        data = self.data
        validate(cfg, DataFacts(data.kind, data.shape, len(data), data.source))
        cfg.model.data_shape = list(data.shape)
        self.cfg = cfg
        torch.manual_seed(seed)
        self.nets = build_networks(cfg.model, mode)
        kept = [k for k in ("G", "E") if k in self.nets]
        self.ema = {k: copy.deepcopy(self.nets[k]).requires_grad_(False) for k in kept}
        d = [p for k in ("Dx", "Dz") if k in self.nets for p in self.nets[k].parameters()]
        ge = [p for k in ("G", "E") if k in self.nets for p in self.nets[k].parameters()]
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        self.opt_d = torch.optim.Adam(d, lr=cfg.optim.lr_d, betas=betas)
        self.opt_ge = torch.optim.Adam(ge, lr=cfg.optim.lr_g, betas=betas)
        self.gen = torch.Generator().manual_seed(seed)
        self.step_index = 0

    def batch(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        size = size or self.cfg.train.batch_size
        idx = torch.randint(len(self.data), (size,), generator=self.gen)
        z = torch.randn(size, self.cfg.model.latent_dim, generator=self.gen)
        return self.data.samples[idx], z

    def step(self) -> None:
        t, loss = self.cfg.train, self.cfg.loss
        noise_std, recon_x_weight = schedules(self.step_index, t.steps, loss)
        optimizers = {"D": self.opt_d, "GE": self.opt_ge}
        set_learning_rates(optimizers, self.step_index, t.steps, self.cfg.optim)
        x, z = self.batch()
        lo = self.losses
        # Settings other than the defaults (--variant) run with the current losses only: a
        # baseline revision's forward gets only the arguments it had.
        args: list[Any] = []
        if loss.recon_share < 1 or loss.encoder_noise > 0:
            args.append(current_losses.recon_count(t.batch_size, loss.recon_share))
        if loss.encoder_noise > 0:
            args.append(loss.encoder_noise)
        passes = lo.forward(self.nets, x, z, *args)
        kw = {} if loss.adv_x_recon > 0 else {"recon_adv": False}
        d_terms = lo.discriminator_loss(self.nets, x, passes, noise_std, **kw)
        self.opt_d.zero_grad(set_to_none=True)
        lo.weighted_total(d_terms, loss).backward()
        self.opt_d.step()
        ge_terms = lo.generator_encoder_loss(self.nets, x, passes, noise_std, **kw)
        self.opt_ge.zero_grad(set_to_none=True)
        lo.weighted_total(ge_terms, loss, recon_x_weight).backward()
        self.opt_ge.step()
        beta = ema_beta(self.step_index, t.ema_halflife)
        for k, net in self.ema.items():
            update_ema(net, self.nets[k], beta)
        self.step_index += 1


def losses_at(rev: str) -> ModuleType:
    """``training/losses.py`` as it was at git revision ``rev``, as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:training/losses.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "losses_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("losses_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pass_costs(trainer: Trainer, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of forward and forward+backward of each network at 1x, 2x, 3x the batch."""
    nets, b = trainer.nets, trainer.cfg.train.batch_size
    costs: dict[str, dict[str, float]] = {}
    for name, net in nets.items():
        for times in (1, 2, 3):
            x, z = trainer.batch(b * times)
            inp = z if name in ("G", "Dz") else x
            inp = inp.clone().requires_grad_(True)

            def fwd(net=net, inp=inp) -> None:
                net(inp)

            def fwd_bwd(net=net, inp=inp) -> None:
                net.zero_grad(set_to_none=True)
                net(inp).float().mean().backward()

            costs.setdefault(name, {})[f"forward_{times}x"] = _median_ms(fwd, repeats)
            costs[name][f"forward_backward_{times}x"] = _median_ms(fwd_bwd, repeats)
        net.zero_grad(set_to_none=True)
    return costs


@click.command()
@click.option("--preset", default="fmnist-cpu")
@click.option("--rounds", default=30, help="Rounds; each times --steps steps of each pair.")
@click.option("--steps", default=1, help="Timed steps per pair per round (after 3 warm-up).")
@click.option("--repeats", default=15, help="Timed calls per pass measurement.")
@click.option("--threads", default=1)
@click.option("--baseline", default=None, metavar="REV", help="Also time the losses of REV.")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="'SEC.KEY=V ...'",
    help="Also time an AEGAN of the current losses with these settings (repeatable).",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write results JSON.")
def main(
    preset: str,
    rounds: int,
    steps: int,
    repeats: int,
    threads: int,
    baseline: str | None,
    variants: tuple[str, ...],
    out: Path | None,
) -> None:
    torch.set_num_threads(threads)
    versions = {"current": current_losses}
    if baseline:
        versions[baseline] = losses_at(baseline)
    trainers = {}
    for version, module in versions.items():
        for mode in ("aegan", "gan"):
            cfg = from_preset(preset)
            cfg.loss.mode = mode
            trainers[(version, mode)] = Trainer(validate(cfg), losses=module)
    for variant in variants:
        cfg = from_preset(preset)
        for assignment in variant.split():
            apply_assignment(cfg, assignment)
        if cfg.loss.mode != "aegan":
            raise click.BadParameter(
                f"{variant!r}: variants are AEGAN steps", param_hint="--variant"
            )
        trainers[("current", f"aegan {variant}")] = Trainer(validate(cfg))
    passes = pass_costs(trainers[("current", "aegan")], repeats)
    for trainer in trainers.values():
        for _ in range(3):
            trainer.step()
    step_s: dict[tuple[str, str], list[float]] = {k: [] for k in trainers}
    order = list(trainers)
    for i in range(rounds):
        random.Random(i).shuffle(order)
        for key in order:
            trainer = trainers[key]
            for _ in range(steps):
                start = time.perf_counter()
                trainer.step()
                step_s[key].append(time.perf_counter() - start)
    medians: dict[str, dict[str, float]] = {}
    for (version, mode), times in step_s.items():
        medians.setdefault(version, {})[mode] = round(1000 * statistics.median(times), 2)
    summary = {
        "machine": machine(),
        "preset": preset,
        "batch_size": trainers[("current", "aegan")].cfg.train.batch_size,
        "threads": threads,
        "rounds": rounds,
        "steps_per_round": steps,
        "baseline": baseline,
        "pass_ms": passes,
        "step_ms": medians,
        "loss_settings": {  # what each timed trainer ran with (preset, then --variant)
            mode: asdict(trainer.cfg.loss)
            for (v, mode), trainer in trainers.items()
            if v == "current"
        },
        "aegan_over_gan": {v: round(m["aegan"] / m["gan"], 3) for v, m in medians.items()},
        "over_gan": {
            v: {mode: round(ms / m["gan"], 3) for mode, ms in m.items() if mode != "gan"}
            for v, m in medians.items()
        },
    }
    click.echo(json.dumps(summary, indent=2))
    if out:
        out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
