"""Training throughput (images/s) and model FLOPs utilisation, eager against torch.compile.

  python -m bench.throughput --model B/16 --batch-size 128 --method c2lip      # on a GPU: bf16 autocast
  python -m bench.throughput --model tiny --batch-size 32 --steps 3 --device cpu --no-compile   # smoke test

FLOPs per image follow the usual 6 x parameters x tokens rule for a training step (2 forward, 4 backward):
the ViT's parameters times its N + 1 tokens plus the text encoder's parameters times the caption length
(and, for c2lip, times the phrase tokens). MFU = achieved FLOP/s divided by --peak-tflops (default 989,
the dense bf16 peak of an H100/H200 SXM). The loss is the real C2LIP loss of train.py on random data.
"""

import argparse
import time
from dataclasses import replace

import torch

from bench.common import METHODS, step_loss
from model import CLIP, PRESETS
from run.devices import autocast_dtype, pick_device


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="B/16", choices=list(PRESETS), help="model preset")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--method", default="c2lip", choices=METHODS, help="loss")
    p.add_argument("--phrases", type=int, default=4, help="concept phrases per image (c2lip)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="as in train.py")
    p.add_argument("--no-compile", action="store_true", help="time eager mode only")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak for the MFU figure")
    args = p.parse_args()
    device = pick_device(args.device)
    dtype = autocast_dtype(args.precision, device)

    cfg = PRESETS[args.model]
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=49408))
    B, K, T, Tc = args.batch_size, args.batch_size * args.phrases, cfg.text.context_length, 8
    batch = {
        "images": torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, device=device),
        "captions": torch.randint(4, 49000, (B, T), device=device),
        "phrases": torch.randint(4, 49000, (K, Tc), device=device),
        "owner": torch.arange(B, device=device).repeat_interleave(args.phrases),
    }

    model = CLIP(cfg).to(device)
    n_vision = sum(p.numel() for p in model.visual.parameters())
    n_text = sum(p.numel() for p in model.text.parameters())
    n_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    text_tokens = T + (args.phrases * Tc if args.method == "c2lip" else 0)
    flops_per_image = 6 * (n_vision * (n_patches + 1) + n_text * text_tokens)
    print(
        f"{args.model} ({(n_vision + n_text) / 1e6:.0f}M parameters), batch {B}, {args.method}, {device}, {dtype}, "
        f"{flops_per_image * B / 1e12:.2f} TFLOP per step"
    )

    for compiled in (False,) if args.no_compile else (False, True):
        torch.manual_seed(0)
        model = CLIP(cfg).to(device)
        net = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = step_loss(net, batch, args.method)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / args.steps
        mfu = flops_per_image * B / seconds / (args.peak_tflops * 1e12)
        memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(
            f"  {'compiled' if compiled else 'eager':8s} {B / seconds:9.1f} images/s  {seconds * 1000:8.1f} ms/step  "
            f"MFU {mfu:.1%}{memory}"
        )


if __name__ == "__main__":
    main()
