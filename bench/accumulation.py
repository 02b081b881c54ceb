"""Gradient accumulation (train.py --accum-freq): peak memory and step time of K micro-batches against one
batch of the same total size.

  python -m bench.accumulation --threads 1          # tiny model, CPU: 128 images as 1, 2, 4 and 8 micro-batches
  python -m bench.accumulation --device cuda --model B/16 --batch-size 256   # on a GPU, bf16 (not yet run)

Every configuration trains the same model on the same images (one shapes-world batch, collated as K
micro-batches as train.py's loader does) with the same loss: K = 1 is train.py's plain step
(bench/common.py), K > 1 is run/scale.accumulated_step, whose gradient is that of the whole batch.
K = 1 must fit in memory too: --batch-size is the largest batch the device takes in one piece.

Time: one optimizer step each (forward, backward, AdamW), the configurations taking turns step by step
(`--warmup` untimed steps, then `--steps` timed ones each), so a noisy machine slows all of them alike.
Read the ratios to K = 1: what the recomputation (a second forward pass of every micro-batch) costs.

Memory: the peak extra memory of one forward + backward beyond the model and the batch. On CPU each
configuration runs in a fresh subprocess, measured as its peak RSS minus its RSS before the step (as
bench/pool.py does; the peak here is VmHWM of /proc/self/status); on CUDA it comes from the allocator
(torch.cuda.max_memory_allocated).
On a shared CPU, --threads 1 keeps other processes' load from distorting the times (OpenMP threads that
wait on each other slow small operations, the micro-batches', most).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch

from bench.common import METHODS, embed, loss_of, step_loss
from data import Collate, WordTokenizer
from model import CLIP, PRESETS
from run.devices import autocast_dtype, pick_device
from run.scale import accumulated_step
from sources.shapes import ShapesDataset, ShapesWorld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # python -m bench.accumulation runs here


def setup(args, device):
    """(model config, {K: the batch as K micro-batches on the device} for every K of --accum, a batch of two
    images for warming up)."""
    cfg = PRESETS[args.model]
    data = ShapesDataset(ShapesWorld(image_size=cfg.vision.image_size), seed=0, split="train", length=args.batch_size)
    samples = [data[i] for i in range(len(data))]
    tokenizer = WordTokenizer.build([s["caption"] for s in samples], cfg.text.context_length)
    collate = Collate(tokenizer)
    splits = {}
    for k in args.accum:
        size = args.batch_size // k
        parts = [collate(samples[j * size : (j + 1) * size]) for j in range(k)]
        splits[k] = [{name: v.to(device) for name, v in part.items()} for part in parts]
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer)))
    warm = {name: v.to(device) for name, v in collate(samples[:2]).items()}
    return cfg, splits, warm


def train_step(model, micro_batches, method, dtype):
    """One step's loss and gradient, as train.py takes it."""
    if len(micro_batches) > 1:
        return accumulated_step(model, micro_batches, embed, loss_of, method, dtype)[0]
    with torch.autocast(micro_batches[0]["images"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = step_loss(model, micro_batches[0], method)[0]
    loss.backward()
    return loss.detach()


def new_model(args, cfg, device):
    torch.manual_seed(0)
    model = CLIP(cfg).to(device)
    model.visual.grad_checkpointing = model.text.grad_checkpointing = args.grad_checkpointing
    return model


def peak_extra_bytes(args, cfg, micro_batches, warm, method, dtype, device) -> int:
    """Peak memory of one forward + backward beyond what the model and the batch already hold."""
    model = new_model(args, cfg, device)
    # A first step on two images pages in the code of every kernel the step runs (on CPU, over 100 MB of
    # RSS that the first step of any size pays once), so that the figure counts tensors only.
    train_step(model, [warm] * min(2, len(micro_batches)), method, dtype)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, micro_batches, method, dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # The peak resident set of this process's memory map (VmHWM), reset first where Linux allows it, so that
    # rendering the batch does not count. Not getrusage's ru_maxrss: it survives fork + exec, so a child
    # reports at least its parent's peak (that of the four models timed above).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS
    except OSError:
        pass
    base = status_bytes("VmRSS")
    train_step(model, micro_batches, method, dtype)
    return status_bytes("VmHWM") - base


def status_bytes(field: str) -> int:
    """A memory figure of /proc/self/status (Linux), in bytes."""
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def memory_in_subprocess(k: int) -> int:
    """Runs this script again with --memory-child K: a fresh process whose peak holds one configuration only."""
    argv = [a for a in sys.argv[1:] if a != "--skip-memory"]
    child = subprocess.run(
        [sys.executable, "-m", "bench.accumulation", *argv, "--memory-child", str(k)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])["extra_bytes"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset")
    p.add_argument("--batch-size", type=int, default=128, help="images per optimizer step, split into K micro-batches")
    p.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4, 8], help="values of K (1: the plain step)")
    p.add_argument("--method", default="c2lip", choices=METHODS, help="loss, as train.py --method")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps, or auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="as in train.py")
    p.add_argument("--grad-checkpointing", action="store_true", help="as in train.py")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-memory", action="store_true", help="time only")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args()
    if args.memory_child is not None:
        args.accum = [args.memory_child]
    if any(args.batch_size % k for k in args.accum):
        p.error(f"--batch-size {args.batch_size} must be a multiple of every --accum value")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    method = args.method  # c2lip or siglip, as train.py --method
    cfg, splits, warm = setup(args, device)
    if args.memory_child is not None:
        extra = peak_extra_bytes(args, cfg, splits[args.memory_child], warm, method, dtype, device)
        print(json.dumps({"extra_bytes": extra}))
        return

    # time: every configuration from the same weights, taking turns
    runs = {}
    for k in args.accum:
        model = new_model(args, cfg, device)
        runs[k] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    seconds = {k: 0.0 for k in args.accum}
    for i in range(args.warmup + args.steps):
        for k, (model, opt) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            train_step(model, splits[k], method, dtype)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                seconds[k] += time.perf_counter() - t0
    per_step = {k: s / args.steps for k, s in seconds.items()}

    del runs  # free their weights and optimizer state before the memory runs
    memory = {}
    if not args.skip_memory:
        for k in args.accum:
            if device.type == "cuda":
                memory[k] = peak_extra_bytes(args, cfg, splits[k], warm, method, dtype, device)
            else:
                memory[k] = memory_in_subprocess(k)

    print(
        f"{args.model}, {args.method}, {args.batch_size} images per step, {device}, {dtype}, "
        f"{torch.get_num_threads()} threads, {args.steps} steps each"
    )
    first = args.accum[0]
    for k in args.accum:
        label = "one batch" if k == 1 else f"{k} x {args.batch_size // k}"
        line = (
            f"  K {k:2d} ({label:>9s})  {per_step[k] * 1000:9.1f} ms/step  {per_step[k] / per_step[first]:5.2f}x time"
        )
        if memory:
            line += f"  {memory[k] / 1e6:9.1f} MB peak extra  {memory[k] / memory[first]:5.2f}x memory"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            result = {"args": vars(args), "device": str(device), "s_per_step": per_step, "extra_bytes": memory}
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
