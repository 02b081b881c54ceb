"""Time one training step (forward + backward + AdamW) side by side, in one process.

  python bench/step.py                              # tiny model, batch 128: fp32 vs bf16, siglip vs c2lip
  python bench/step.py --model small --batch-size 64 --json step.json
  python bench/step.py --open-clip --batch-size 8   # our B/16 against open_clip's ViT-B-16, fp32

Runs take turns step by step (`--warmup` untimed steps, then `--steps` timed ones each), so a noisy
machine slows every configuration alike. Read the ratios, not the absolute seconds.

With --open-clip (needs `pip install open_clip_torch`, a test-only dependency; random weights, nothing
downloaded) both models get the same 224 px images and 77-token texts, the same SigLIP loss and the same
AdamW, so the ratio compares the two transformer implementations.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import Collate, WordTokenizer  # noqa: E402
from devices import pick_device  # noqa: E402
from losses import siglip_loss  # noqa: E402
from model import CLIP, PRESETS  # noqa: E402
from objective import Objective, loss_terms  # noqa: E402
from shapes import ShapesDataset, ShapesWorld  # noqa: E402


def interleaved_timing(runs: dict, args, device) -> dict[str, float]:
    """runs: name -> (loss function of no arguments, optimizer). Seconds per step of each."""
    seconds = {name: 0.0 for name in runs}
    for i in range(args.warmup + args.steps):
        for name, (loss_fn, opt) in runs.items():
            t0 = time.perf_counter()
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                seconds[name] += time.perf_counter() - t0
    return {name: s / args.steps for name, s in seconds.items()}


def methods_and_precisions(args, device) -> dict:
    cfg = PRESETS[args.model]
    data = ShapesDataset(ShapesWorld(image_size=cfg.vision.image_size), seed=0, split="train", length=args.batch_size)
    samples = [data[i] for i in range(len(data))]
    tokenizer = WordTokenizer.build([s["caption"] for s in samples], cfg.text.context_length)
    batch = {k: v.to(device) for k, v in Collate(tokenizer)(samples).items()}
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer)))

    def make_run(method: str, dtype: torch.dtype):
        torch.manual_seed(0)
        model = CLIP(cfg).to(device)
        loss_args = Objective(method)

        def loss_fn():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return loss_terms(model, batch, loss_args)[0]

        return loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-4)

    runs = {
        f"{m} {d}": make_run(m, dt)
        for m in ("siglip", "c2lip")
        for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    per_step = interleaved_timing(runs, args, device)
    print(
        f"{args.model}, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, {args.steps} steps each"
    )
    for name, sec in per_step.items():
        print(f"  {name:12s} {sec * 1000:8.1f} ms/step")
    ratios = {
        "bf16 / fp32 (siglip)": per_step["siglip bf16"] / per_step["siglip fp32"],
        "bf16 / fp32 (c2lip)": per_step["c2lip bf16"] / per_step["c2lip fp32"],
        "c2lip / siglip (fp32)": per_step["c2lip fp32"] / per_step["siglip fp32"],
        "c2lip / siglip (bf16)": per_step["c2lip bf16"] / per_step["siglip bf16"],
    }
    for name, r in ratios.items():
        print(f"  {name:22s} {r:.2f}x")
    return {"s_per_step": per_step, "ratios": ratios}


def against_open_clip(args, device) -> dict:
    import open_clip  # test-only dependency

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    texts = torch.randint(1, 49406, (args.batch_size, 77), device=device)
    texts[:, 0], texts[:, -1] = 49406, 49407  # full-length texts: open_clip always runs all 77 positions
    t, b = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    cfg = PRESETS["B/16"]
    ours = CLIP(replace(cfg, text=replace(cfg.text, vocab_size=49408))).to(device)
    theirs = open_clip.create_model("ViT-B-16", pretrained=None).to(device)

    def ours_loss():
        return siglip_loss(ours.encode_image(images)[0], ours.encode_text(texts), t, b)

    def theirs_loss():
        return siglip_loss(theirs.encode_image(images, normalize=True), theirs.encode_text(texts, normalize=True), t, b)

    runs = {
        "ours B/16": (ours_loss, torch.optim.AdamW(ours.parameters(), lr=1e-5)),
        "open_clip ViT-B-16": (theirs_loss, torch.optim.AdamW(theirs.parameters(), lr=1e-5)),
    }
    per_step = interleaved_timing(runs, args, device)
    print(
        f"B/16 training step, batch {args.batch_size}, {device}, fp32, {torch.get_num_threads()} threads, "
        f"{args.steps} steps each"
    )
    for (name, sec), model in zip(per_step.items(), (ours, theirs)):
        print(f"  {name:20s} {sec:7.2f} s/step   {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    ratio = per_step["ours B/16"] / per_step["open_clip ViT-B-16"]
    print(f"  ours / open_clip     {ratio:.2f}x")
    return {"s_per_step": per_step, "ours_over_open_clip": ratio}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset (without --open-clip)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--open-clip", action="store_true", help="time our B/16 against open_clip's ViT-B-16 instead")
    p.add_argument("--json", default=None, help="write the timings to this file")
    args = p.parse_args()
    device = pick_device(args.device)
    result = against_open_clip(args, device) if args.open_clip else methods_and_precisions(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(device), **result}, f, indent=1)


if __name__ == "__main__":
    main()
