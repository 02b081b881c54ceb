"""Where the computation runs: the device, the autocast precision, and torchrun's processes.

Not part of the paper, which trains on 8 GPUs in bf16 (docs/paper.md, "The paper's training recipe"):
devices are chosen explicitly, CUDA, then Apple's MPS, then the CPU (`--device` overrides), and every
autocast goes through torch.autocast(device_type=...), never a CUDA-only API. bf16 is the default on CUDA
only: on CPU it measured no faster (bench/step.py). Under torchrun every rank runs train.py; `setup` joins
the process group (NCCL on GPUs, gloo on CPUs) and run/scale.py gathers the global batch.
"""

import argparse
import os

import torch
import torch.distributed as dist


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    """--device, shared by train.py and eval.py."""
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device string")


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_problem(name: str) -> str | None:
    """Why --device NAME cannot be used here, or None if it can."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return "not a torch device (auto, cpu, cuda, cuda:1, mps, ...)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine (torch.cuda.is_available() is False)"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "Apple's MPS is not available on this machine"
    return None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """--precision -> the autocast dtype: auto is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `python train.py` is rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    if pick_device(device_name).type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:  # CPU processes talk over gloo: slow, but it runs the same code path anywhere
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def log0(*text) -> None:
    """Print on rank 0 only (every rank runs train.py under torchrun)."""
    if rank_and_world()[0] == 0:
        print(*text, flush=True)
