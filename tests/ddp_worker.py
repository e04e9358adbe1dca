"""Run under torchrun by test_distributed.py: a tiny two-process run on the CPU (gloo)."""

import sys
from pathlib import Path

from training.config import from_preset
from training.training_loop import train

cfg = from_preset("tiny")
cfg.data.limit = 256
cfg.train.steps = 4
cfg.train.checkpoint_every = 2
cfg.train.image_every = 2
cfg.train.log_every = 2
cfg.train.progress = False
cfg.train.threads = 1
train(cfg, Path(sys.argv[1]))
