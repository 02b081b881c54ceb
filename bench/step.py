"""Time one training step (forward + backward + AdamW) side by side, in one process.

  python bench/step.py                       # tiny model, batch 128, CPU: fp32 vs bf16, siglip vs c2lip
  python bench/step.py --model small --batch-size 64 --json step.json

Each configuration runs `--warmup` untimed steps, then `--steps` timed ones, interleaved round-robin so
that a noisy machine slows every configuration alike. Ratios are what to read, not absolute seconds.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import Collate, ShapesDataset, ShapesWorld, WordTokenizer  # noqa: E402
from model import CLIP, PRESETS  # noqa: E402
from train import loss_terms, pick_device  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--json", default=None, help="write the timings to this file")
    args = p.parse_args()
    device = pick_device(args.device)

    cfg = PRESETS[args.model]
    world = ShapesWorld(image_size=cfg.vision.image_size)
    data = ShapesDataset(world, seed=0, split="train", length=args.batch_size)
    tokenizer = WordTokenizer.build([data[i]["caption"] for i in range(len(data))], cfg.text.context_length)
    batch = Collate(tokenizer)([data[i] for i in range(len(data))])
    batch = {k: v.to(device) for k, v in batch.items()}
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer)))

    configs = {f"{m} {d}": (m, dt) for m in ("siglip", "c2lip") for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    runs = {}
    for name, (method, dtype) in configs.items():
        torch.manual_seed(0)
        model = CLIP(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_args = SimpleNamespace(method=method, concept_weight=1.0, pool_weight=0.01, tau=1.0, concept_labels="owner")
        runs[name] = (model, opt, loss_args, dtype)

    def step(model, opt, loss_args, dtype):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = sum(loss_terms(model, batch, loss_args).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = {name: 0.0 for name in runs}
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            step(*run)
            if i >= args.warmup:
                seconds[name] += time.perf_counter() - t0
    per_step = {name: s / args.steps for name, s in seconds.items()}

    print(f"{args.model}, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, {args.steps} steps each")
    for name, s in per_step.items():
        print(f"  {name:12s} {s * 1000:8.1f} ms/step")
    ratios = {
        "bf16 / fp32 (siglip)": per_step["siglip bf16"] / per_step["siglip fp32"],
        "bf16 / fp32 (c2lip)": per_step["c2lip bf16"] / per_step["c2lip fp32"],
        "c2lip / siglip (fp32)": per_step["c2lip fp32"] / per_step["siglip fp32"],
        "c2lip / siglip (bf16)": per_step["c2lip bf16"] / per_step["siglip bf16"],
    }
    for name, r in ratios.items():
        print(f"  {name:22s} {r:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(device), "ms_per_step": {k: v * 1000 for k, v in per_step.items()}, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
