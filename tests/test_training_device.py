"""Training's device, backend, determinism, data transfer and mixed-precision settings. GPUs are
stood in for (torch.cuda's answers monkeypatched) where the choice depends on them; the runs
themselves are on the CPU, on a built-in mixture (no dataset needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cli_helpers import run_aegan

from training import device, training_loop
from training.checkpoint import load_checkpoint
from training.config import ConfigError, RunConfig, from_preset, validate
from training.device import backend_for, backend_settings, resolve_device, to_device
from training.training_loop import train


def mixture_config(**train_overrides) -> RunConfig:
    cfg = from_preset("vectors-mlp")
    cfg.data.source = "mixture:ring8"
    cfg.model.hidden, cfg.model.depth = 32, 2
    t = cfg.train
    t.steps, t.batch_size, t.log_every, t.checkpoint_every, t.progress = 4, 32, 2, 2, False
    t.threads = 1
    for key, value in train_overrides.items():
        setattr(t, key, value)
    return validate(cfg)


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {
        f"{group}.{net}.{key}": value
        for group in ("nets", "ema")
        for net, weights_of_net in state[group].items()
        for key, value in weights_of_net.items()
    }


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """Pretend torch sees ``count`` GPUs."""

    def see(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return see


def test_device_choice(gpus):
    gpus(0)
    assert resolve_device("auto", 0, 1, 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device: cuda: torch sees no CUDA device"):
        resolve_device("cuda", 0, 1, 1)
    gpus(1)
    assert resolve_device("auto", 0, 1, 1) == torch.device("cuda", 0)
    assert resolve_device("cpu", 0, 1, 1) == torch.device("cpu")  # a GPU there, not taken
    # two ranks on a one-GPU host: both on the CPU, not both on GPU 0 (or rank 1 on no GPU)
    assert resolve_device("auto", 1, 2, 2) == resolve_device("auto", 0, 2, 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="GPU 1 asked for, torch sees 1"):
        resolve_device("cuda", 1, 2, 2)
    gpus(2)
    assert resolve_device("auto", 1, 2, 2) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", 0, 1, 1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="under torchrun use cuda"):
        resolve_device("cuda:1", 0, 2, 2)
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_settings_that_validate(device):
    assert validate(mixture_config(device=device)).train.device == device


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"device": "gpu"}, "--device"),
        ({"device": "cuda:x"}, "--device"),
        ({"precision": "fp8"}, "train.precision"),
        ({"deterministic": True, "cudnn_benchmark": True}, "train.cudnn_benchmark"),
    ],
)
def test_bad_device_settings_name_the_flag(overrides, flag):
    cfg = mixture_config()
    for key, value in overrides.items():
        setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=f"^{flag}:"):
        validate(cfg)


def test_cli_device_flag(tmp_path):
    result = run_aegan(["train", "--device", "cuda:1", "--dry-run"])
    assert result.returncode == 0, result.stderr
    assert '"device": "cuda:1"' in result.stdout
    result = run_aegan(["train", "--device", "tpu", "--dry-run"])
    assert result.returncode != 0 and "--device: must be auto, cpu, cuda or cuda:N" in result.stderr


def test_cuda_asked_for_where_torch_sees_none_is_a_usage_error(tmp_path, gpus):
    gpus(0)
    with pytest.raises(ConfigError, match="--device: cuda: torch sees no CUDA device"):
        train(mixture_config(device="cuda"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_deterministic_settings_hold_for_the_run_and_are_put_back(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with backend_settings(mixture_config(deterministic=True).train):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() == before
    with backend_settings(mixture_config(cudnn_benchmark=True).train):
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark


def test_batches_go_to_a_gpu_through_pinned_memory(monkeypatch):
    cpu = torch.arange(6.0)
    assert to_device(cpu, torch.device("cpu")) is cpu  # nothing to copy on the CPU
    calls: list[tuple] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", a, k)) or self
    )
    to_device(cpu, torch.device("cuda", 0))
    assert calls == ["pin", ("to", (torch.device("cuda", 0),), {"non_blocking": True})]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_autocasts_the_forward_passes(tmp_path, monkeypatch, precision):
    seen: list[tuple[bool, torch.dtype]] = []
    forward = training_loop.forward

    def recording(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(training_loop, "forward", recording)
    final = train(mixture_config(precision=precision), tmp_path)
    dtype = device.AUTOCAST_DTYPES[precision]
    assert seen == [(True, dtype)] * 4
    state = load_checkpoint(final)
    assert ("scaler" in state) == (precision == "fp16")  # fp16 gradients are scaled
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0
    seen.clear()
    train(mixture_config(), tmp_path / "fp32")
    assert seen == [(False, torch.get_autocast_dtype("cpu"))] * 4  # off by default


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_encoder_stage_runs_in_the_precision_of_the_run(tmp_path, monkeypatch, precision):
    """The encoder stage after the joint steps autocasts like them, and an fp16 stage resumes with
    its gradient scale to the same weights."""
    seen: list[tuple[bool, torch.dtype]] = []
    stage_forward = training_loop.encoder_stage_forward

    def recording(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return stage_forward(*args, **kwargs)

    monkeypatch.setattr(training_loop, "encoder_stage_forward", recording)
    straight = weights(train(mixture_config(precision=precision, encoder_stage_steps=2), tmp_path))
    assert seen == [(True, device.AUTOCAST_DTYPES[precision])] * 2
    run = tmp_path / "resumed"
    final = train(mixture_config(precision=precision, encoder_stage_steps=2), run)
    assert ("scaler" in load_checkpoint(final)) == (precision == "fp16")
    final.unlink()  # step 6: resume from step 4, the end of the joint steps
    resumed = weights(train(None, run, resume=True))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_an_fp16_run_resumes_with_its_gradient_scale(tmp_path):
    straight = weights(train(mixture_config(precision="fp16"), tmp_path / "straight"))
    run = tmp_path / "resumed"
    train(mixture_config(precision="fp16"), run)
    (run / "checkpoints" / "step-0000004.pt").unlink()
    resumed = weights(train(None, run, resume=True))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_deterministic_run_trains_deterministically_and_resumes_exactly(tmp_path, monkeypatch):
    seen: list[bool] = []
    forward = training_loop.forward
    monkeypatch.setattr(
        training_loop,
        "forward",
        lambda *a, **k: (
            seen.append(torch.are_deterministic_algorithms_enabled()) or forward(*a, **k)
        ),
    )
    straight = weights(train(mixture_config(deterministic=True), tmp_path / "straight"))
    assert seen == [True] * 4 and not torch.are_deterministic_algorithms_enabled()
    run = tmp_path / "resumed"
    train(mixture_config(deterministic=True), run)
    (run / "checkpoints" / "step-0000004.pt").unlink()
    resumed = weights(train(None, run, resume=True, device="cpu"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert load_checkpoint(run / "checkpoints" / "step-0000004.pt")["config"]["train"][
        "deterministic"
    ]
