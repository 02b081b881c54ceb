"""Time one training step (forward + backward + AdamW) side by side, in one process.

  python -m bench.step                              # tiny model, batch 128: fp32 vs bf16, siglip vs c2lip
  python -m bench.step --model small --batch-size 64 --json step.json
  python -m bench.step --open-clip --batch-size 8   # our B/16 against open_clip's ViT-B-16, fp32
  python -m bench.step --open-clip-siglip --batch-size 8 --steps 3 --warmup 1   # SigLIP B/16, the paper's backbone

Runs take turns step by step (`--warmup` untimed steps, then `--steps` timed ones each), so a noisy
machine slows every configuration alike. Read the ratios, not the absolute seconds.

With --open-clip or --open-clip-siglip (needs `pip install open_clip_torch`, and timm for SigLIP: test-only
dependencies; random weights, nothing downloaded) both models get the same 224 px images and full-length texts
(77 tokens for CLIP, 64 for SigLIP), the same SigLIP loss and the same AdamW, so the ratio compares the two
implementations. Neither computes patch tokens (open_clip's models do not; ours skips them when no loss reads
them, as train.py does for the baselines).
"""

import argparse
import json
import time
from dataclasses import replace

import torch

from bench.common import step_loss
from data import Collate, WordTokenizer
from losses import sig_loss
from model import CLIP, PRESETS
from run.devices import pick_device
from sources.shapes import ShapesDataset, ShapesWorld


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

        def loss_fn():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return step_loss(model, batch, method)[0]

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


# our preset, open_clip's model, text length, vocabulary size, start id (None: none), end id
PAIRS = {
    "clip": ("B/16", "ViT-B-16", 77, 49408, 49406, 49407),
    "siglip": ("siglip-B/16", "ViT-B-16-SigLIP", 64, 32000, None, 1),
}


def against_open_clip(args, device, pair: str) -> dict:
    import open_clip  # test-only dependency

    preset, name, length, vocab, start, end = PAIRS[pair]
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    texts = torch.randint(2, vocab - 2, (args.batch_size, length), device=device)
    texts[:, -1] = end  # full-length texts: open_clip always runs every position
    if start is not None:
        texts[:, 0] = start
    t, b = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    cfg = PRESETS[preset]
    ours = CLIP(replace(cfg, text=replace(cfg.text, vocab_size=vocab))).to(device)
    theirs = open_clip.create_model(name, pretrained=None).to(device)

    def ours_loss():
        return sig_loss(ours.encode_image(images, patches=False)[0], ours.encode_text(texts), t, b)

    def theirs_loss():
        return sig_loss(theirs.encode_image(images, normalize=True), theirs.encode_text(texts, normalize=True), t, b)

    names = (f"ours {preset}", f"open_clip {name}")
    runs = {
        names[0]: (ours_loss, torch.optim.AdamW(ours.parameters(), lr=1e-5)),
        names[1]: (theirs_loss, torch.optim.AdamW(theirs.parameters(), lr=1e-5)),
    }
    per_step = interleaved_timing(runs, args, device)
    print(
        f"{preset} training step, batch {args.batch_size}, {device}, fp32, {torch.get_num_threads()} threads, "
        f"{args.steps} steps each"
    )
    for (run, sec), model in zip(per_step.items(), (ours, theirs)):
        print(f"  {run:26s} {sec:7.2f} s/step   {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    ratio = per_step[names[0]] / per_step[names[1]]
    print(f"  {'ours / open_clip':26s} {ratio:7.2f}x")
    return {"s_per_step": per_step, "ours_over_open_clip": ratio}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset (without --open-clip*)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--open-clip", action="store_true", help="time our B/16 against open_clip's ViT-B-16 instead")
    p.add_argument(
        "--open-clip-siglip",
        action="store_true",
        help="time our siglip-B/16 against open_clip's ViT-B-16-SigLIP instead",
    )
    p.add_argument("--json", default=None, help="write the timings to this file")
    args = p.parse_args()
    device = pick_device(args.device)
    if args.open_clip or args.open_clip_siglip:
        result = against_open_clip(args, device, "siglip" if args.open_clip_siglip else "clip")
    else:
        result = methods_and_precisions(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(device), **result}, f, indent=1)


if __name__ == "__main__":
    main()
