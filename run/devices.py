"""Where the computation runs: the device, the autocast precision, and torchrun's processes.

Paper map ("Training setup" in docs/paper.md): the paper trains on 8 GPUs in bf16, and its losses see the
global batch: image tokens and phrases are all-gathered across GPUs. `gather` does that, with gradients.

Devices are chosen explicitly: CUDA, then Apple's MPS, then the CPU (`--device` overrides), and every
autocast goes through torch.autocast(device_type=...), never a CUDA-only API. bf16 is the default on
CUDA only: on CPU it measured no faster (bench/step.py).

Dimension legend: n_r rows held by rank r of W ranks.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


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


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (n_r, ...) from every rank along dim 0 -> (sum_r n_r, ...); ranks may hold different n_r.

    Why the gather must carry gradients: rank r's images are the negatives of every other rank's texts
    and phrases. A plain all_gather returns constants, so the gradient of those terms would never reach
    the encoder that produced them and each rank would learn only from its own slice of the batch.
    torch.distributed.nn's all_gather is differentiable: its backward sends each rank the gradients
    that every rank computed for its rows, summed. Every rank computes the same global loss L, so rank r
    receives W * dL/dx_r; DistributedDataParallel then averages parameter gradients over the W ranks,
    which leaves exactly dL/dtheta, the gradient of one process holding the whole batch (tested).
    """
    if rank_and_world()[1] == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(n) for n in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])  # all_gather needs equal shapes
    if x.is_floating_point():
        parts = dist_fn.all_gather(padded)
    else:  # integer labels carry no gradient
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def gather_owner(owner: torch.Tensor, num_images: int) -> torch.Tensor:
    """Owners (K_r,) index this rank's images; in the gathered batch they are offset by the images of
    the ranks before it."""
    rank, world = rank_and_world()
    if world == 1:
        return owner
    counts = gather(torch.tensor([num_images], device=owner.device))  # (W,)
    return gather(owner + counts[:rank].sum())
