"""What changes with the step: the EMA of the weights, the learning rates and loss weights over
a run, and the batch-norm statistics of the EMA networks."""

from __future__ import annotations

import torch
from torch import nn

from training.config import LossConfig, OptimConfig, RunConfig

ENCODER_STAGE = "E_stage"  # the optimiser of E in the encoder stage


def ema_beta(step: int, halflife: float) -> float:
    """Per-step EMA decay for a half-life in steps, warmed up so early averages are not stale."""
    return min(0.5 ** (1.0 / halflife), (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)  # batch-norm statistics follow the live network


def run_fraction(step: int, steps: int) -> float:
    """How far ``step`` is through a run of ``steps``: 0 at the first step, 1 at the last and
    after it (a bench may step on past a run's length)."""
    return min(1.0, step / max(1, steps - 1))


def schedules(step: int, steps: int, loss: LossConfig) -> tuple[float, float]:
    """(instance noise std, image reconstruction weight) at ``step`` of a run of ``steps``: both
    linear over the run, noise from ``instance_noise`` to 0 and the weight from ``recon_x`` to
    ``recon_x * recon_x_final`` at the last step."""
    frac = run_fraction(step, steps)
    noise_std = loss.instance_noise * (1.0 - frac)
    recon_x_weight = loss.recon_x * (1.0 - frac * (1.0 - loss.recon_x_final))
    return noise_std, recon_x_weight


def set_learning_rates(
    optimizers: dict[str, torch.optim.Optimizer], step: int, steps: int, optim: OptimConfig
) -> None:
    """Both optimisers' learning rates at ``step``: linear from ``lr_g``/``lr_d`` at step 0 to
    ``lr_final`` times them at the last step and after it. Set every step from the step number, so
    a resumed run follows the schedule it was on (a run extended with more steps follows the new
    schedule, as the loss schedules do)."""
    factor = 1.0 - run_fraction(step, steps) * (1.0 - optim.lr_final)
    for name, opt in optimizers.items():
        if name == ENCODER_STAGE:  # constant: optim.lr_encoder_stage
            continue
        for group in opt.param_groups:
            group["lr"] = (optim.lr_d if name == "D" else optim.lr_g) * factor


@torch.no_grad()
def recompute_batch_norm(
    ema: dict[str, nn.Module], samples: torch.Tensor, cfg: RunConfig, device: torch.device
) -> None:
    """The batch-norm statistics of the EMA networks, measured on ``train.bn_recompute_batches``
    batches in training mode with a cumulative average (G on prior draws, E on training data),
    instead of those copied from the live networks. The draws come from a generator seeded by the
    run's seed alone: the training RNG is untouched (resume gives the same run) and a frozen
    network gets the same statistics every time."""
    t = cfg.train
    gen = torch.Generator().manual_seed(t.seed * 7919 + 17)
    for key in sorted(ema):
        net = ema[key]
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            continue
        momenta = [m.momentum for m in norms]
        was_training = net.training
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
        net.train()
        for _ in range(t.bn_recompute_batches):
            if key == "G":
                inputs = torch.randn(t.batch_size, cfg.model.latent_dim, generator=gen)
            else:
                inputs = samples[torch.randint(len(samples), (t.batch_size,), generator=gen)]
            net(inputs.to(device))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)
