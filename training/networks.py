"""The four AEGAN networks, from small blocks up: G (z -> x, also the decoder), E (x -> z), the
image discriminator Dx and the latent discriminator Dz. Two families: ``conv`` (DCGAN-like, images
of 28, 32 or 64 px) and ``mlp`` (N x D vectors, or images flattened as in the original dense AEGAN).

Shapes in comments use B = batch, C = channels, W = ``width``, L = latent_dim, for 28 px images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import ModelConfig

NET_NAMES = ("G", "E", "Dx", "Dz")


def upsamplings(size: int) -> int:
    """Stride-2 stages between the 7 px (28 px images) or 4 px (32, 64 px) base and full size."""
    return {28: 2, 32: 3, 64: 4}[size]


# --- blocks ---------------------------------------------------------------------------------


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Double the resolution: transposed conv, batch norm, ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution: strided conv, leaky ReLU (no normalisation: real and fake batches
    pass separately, and the same weights serve training and export)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with leaky ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2, True))
    return nn.Sequential(*layers)


# --- conv family ----------------------------------------------------------------------------


class ConvGenerator(nn.Module):
    def __init__(self, shape: tuple[int, int, int], latent_dim: int, width: int) -> None:
        super().__init__()
        channels, size, _ = shape
        n_up = upsamplings(size)
        self.base = size >> n_up  # 7 for 28 px, 4 for 32 and 64 px
        self.c0 = width * 2**n_up
        self.project = nn.Sequential(
            nn.Linear(latent_dim, self.c0 * self.base**2, bias=False),
            nn.BatchNorm1d(self.c0 * self.base**2),
            nn.ReLU(inplace=True),
        )
        self.ups = nn.Sequential(
            *[up_block(width * 2 ** (n_up - i), width * 2 ** (n_up - i - 1)) for i in range(n_up)]
        )
        self.to_image = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z)  # (B, 4W * 7 * 7)
        h = h.view(-1, self.c0, self.base, self.base)  # (B, 4W, 7, 7)
        h = self.ups(h)  # (B, W, 28, 28)
        return torch.tanh(self.to_image(h))  # (B, C, 28, 28) in [-1, 1]


class ConvEncoder(nn.Module):
    """Image -> vector; E with ``out_dim = latent_dim``, Dx with ``out_dim = 1``."""

    def __init__(self, shape: tuple[int, int, int], out_dim: int, width: int) -> None:
        super().__init__()
        channels, size, _ = shape
        n_down = upsamplings(size)
        self.downs = nn.Sequential(
            down_block(channels, width),
            *[down_block(width * 2**i, width * 2 ** (i + 1)) for i in range(n_down - 1)],
        )
        base = size >> n_down
        self.head = nn.Linear(width * 2 ** (n_down - 1) * base**2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.downs(x)  # (B, 2W, 7, 7)
        return self.head(h.flatten(1))  # (B, out_dim)


# --- mlp family -----------------------------------------------------------------------------


class MLPGenerator(nn.Module):
    def __init__(self, shape: tuple[int, ...], latent_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.squash = len(shape) == 3  # images live in [-1, 1]; vectors are unbounded
        self.net = mlp([latent_dim] + [hidden] * depth + [math.prod(shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.net(z)  # (B, prod(shape))
        h = torch.tanh(h) if self.squash else h
        return h.view(-1, *self.shape)  # (B, *shape)


class MLPEncoder(nn.Module):
    def __init__(self, shape: tuple[int, ...], out_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.net = mlp([math.prod(shape)] + [hidden] * depth + [out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (B, out_dim)


# --- the whole model ------------------------------------------------------------------------


def build_networks(cfg: ModelConfig, mode: str = "aegan") -> dict[str, nn.Module]:
    """G, Dx and, for ``mode='aegan'``, E and Dz, built from the config (and its ``data_shape``)."""
    shape = tuple(cfg.data_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"data_shape must be (C, H, W) or (D,), got {shape}")
    if cfg.arch == "conv":
        if len(shape) != 3:
            raise ValueError(f"conv networks need images; data shape is {shape}: use --arch mlp")
        nets: dict[str, nn.Module] = {
            "G": ConvGenerator(shape, cfg.latent_dim, cfg.width),
            "Dx": ConvEncoder(shape, 1, cfg.width),
        }
        if mode == "aegan":
            nets["E"] = ConvEncoder(shape, cfg.latent_dim, cfg.width)
    else:
        nets = {
            "G": MLPGenerator(shape, cfg.latent_dim, cfg.hidden, cfg.depth),
            "Dx": MLPEncoder(shape, 1, cfg.hidden, cfg.depth),
        }
        if mode == "aegan":
            nets["E"] = MLPEncoder(shape, cfg.latent_dim, cfg.hidden, cfg.depth)
    if mode == "aegan":
        nets["Dz"] = mlp([cfg.latent_dim, cfg.hidden, cfg.hidden, 1])
    return nets
