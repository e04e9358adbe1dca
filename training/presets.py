"""The named presets of ``aegan train --preset`` and the defaults the CLI shows in its help: data
only, so that ``aegan --help`` need not import the run configuration (training/config.py applies
them)."""

from __future__ import annotations

from typing import Any

DEFAULT_NUM_SAMPLES = 10_000  # samples ``aegan eval`` generates and compares

# Named presets: overrides applied to the defaults of training/config.py's dataclasses.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The shipped default: Fashion-MNIST on a 2-core CPU in about an hour.
    "fmnist-cpu": {
        "data": {"source": "fashion-mnist"},
        "model": {"arch": "conv", "latent_dim": 32, "width": 32},
        "train": {"steps": 10000, "batch_size": 64},
    },
    # The same recipe, larger, for a GPU (its loss weights were tuned at the CPU preset's size).
    "fmnist-gpu": {
        "data": {"source": "fashion-mnist"},
        "model": {"arch": "conv", "latent_dim": 64, "width": 64},
        "train": {"steps": 50000, "batch_size": 128, "checkpoint_every": 5000},
    },
    # N x D vector data (--data FILE.npy or mixture:NAME), dense networks as in the original
    # AEGAN. Tuned against the GAN at equal wall-clock on the mixtures of training/mixtures.py
    # (bench/vectors.py, docs/RESULTS.md): about 8 CPU minutes per run there. Six hidden layers
    # per network and 12 000 steps: a deeper G, trained longer, turns sharper between modes, so
    # fewer samples fall between them. The reconstructions stay out of the image adversarial game
    # (adv_x_recon 0); the encoder is stochastic (encoder_noise), so the codes of tight modes fill
    # the prior; the reconstruction weight is high because the L1 term is a mean over coordinates
    # (diluted in 100-D); both learning rates anneal to 5 %, which sharpens the samples.
    "vectors-mlp": {
        "model": {"arch": "mlp", "latent_dim": 2, "hidden": 128, "depth": 6},
        "loss": {
            "adv_x": 3.0,
            "adv_x_recon": 0.0,
            "adv_z": 1.0,
            "recon_x": 30.0,
            "recon_z": 0.2,
            "recon_x_final": 1.0,
            "encoder_noise": 0.2,
        },
        "optim": {"lr_g": 1e-3, "lr_d": 1e-3, "lr_final": 0.05},
        "train": {"steps": 12000, "batch_size": 256, "image_every": 0},
    },
    # A few seconds on a CPU: smoke tests and demos.
    "tiny": {
        "data": {"source": "fashion-mnist", "limit": 512},
        "model": {"arch": "conv", "latent_dim": 8, "width": 8, "hidden": 32},
        "train": {
            "steps": 20,
            "batch_size": 16,
            "log_every": 5,
            "image_every": 10,
            "checkpoint_every": 10,
            "grid_size": 16,
        },
    },
}
DEFAULT_PRESET = "fmnist-cpu"
