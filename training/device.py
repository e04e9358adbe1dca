"""Where a run trains: the process group under ``torchrun`` (NCCL on GPUs, gloo on CPUs), the
device of each rank, backend settings and mixed-precision autocast."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.config import ConfigError, TrainConfig


def setup_distributed(device_setting: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun, joins the process group: NCCL on GPUs, gloo on
    the CPU (:func:`backend_for`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = resolve_device(device_setting, local_rank, local_world, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return rank, world, device


def resolve_device(setting: str, local_rank: int, local_world: int, world: int) -> torch.device:
    """The device of this process for ``train.device``. ``auto`` takes CUDA only when there is a
    GPU for every process on this host (two ranks on a one-GPU host train on the CPU, all of them:
    the ranks of one run share one backend)."""
    if setting == "cpu":
        return torch.device("cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "auto":
        return torch.device("cuda", local_rank) if gpus >= local_world else torch.device("cpu")
    if gpus == 0:
        raise ConfigError(
            "--device",
            f"{setting}: torch sees no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}: install torch's CUDA build, docs/SERVING.md)",
        )
    if ":" in setting and world > 1:
        raise ConfigError(
            "--device", f"{setting} is for one process; under torchrun use cuda (GPU LOCAL_RANK)"
        )
    index = int(setting.partition(":")[2] or local_rank)
    if index >= gpus:
        raise ConfigError("--device", f"{setting}: GPU {index} asked for, torch sees {gpus}")
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def backend_settings(t: TrainConfig) -> Iterator[None]:
    """The run's determinism and cuDNN settings (process-wide in torch), put back afterwards."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if t.deterministic:
        # cuBLAS needs a fixed workspace for reproducible results; read when its handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = t.cudnn_benchmark and not t.deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``: to a GPU through pinned memory, without blocking the host."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """Mixed precision of the forward passes for ``train.precision`` (``fp32``: off)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net
