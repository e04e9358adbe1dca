"""Run under torchrun by test_distributed.py: a tiny two-process run on the CPU (gloo), also on a
host with GPUs: the device is set, not left to auto. Each rank writes its backend and device to its
own file beside the run directory (torchrun interleaves the ranks' stdout)."""

import sys
from pathlib import Path

import torch.distributed as dist

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
cfg.train.device = "cpu"
train(cfg, Path(sys.argv[1]))
rank = dist.get_rank()
report = f"rank {rank}: backend {dist.get_backend()}, device {cfg.train.device}"
Path(sys.argv[1]).with_name(f"rank-{rank}.txt").write_text(report)
