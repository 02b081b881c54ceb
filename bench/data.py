"""Does the shapes loader keep up with training? Samples/s of the generator against the training step.

  python -m bench.data            # one process: render + caption + NLTK concepts, vs a c2lip step

Measured in one run: the time to produce a batch (rendering, captions, NLTK chunking of every caption,
collate) in one process, and the time of one training step of the tiny model on that batch. A ratio
above 1 means one loader process outruns the model.
"""

import argparse
import time
from dataclasses import replace

import torch

from bench.common import step_loss
from concepts import _extract_cached
from data import Collate, WordTokenizer
from model import CLIP, PRESETS
from sources.shapes import ShapesDataset, ShapesWorld


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--batches", type=int, default=5, help="batches to time on each side")
    args = p.parse_args()
    B = args.batch_size

    world = ShapesWorld()
    data = ShapesDataset(world, seed=0, split="train", length=10**9)
    tokenizer = WordTokenizer.build([data[i]["caption"] for i in range(500)], PRESETS["tiny"].text.context_length)
    collate = Collate(tokenizer)
    _extract_cached.cache_clear()  # time NLTK on captions it has not seen, as in training

    t0 = time.perf_counter()
    for step in range(args.batches):
        batch = collate([data[1000 + step * B + j] for j in range(B)])
    loader_s = (time.perf_counter() - t0) / args.batches
    t0 = time.perf_counter()
    for i in range(args.batches * B):
        world.render(world.scene(0, "train", 10**6 + i))
    render_s = (time.perf_counter() - t0) / args.batches

    cfg = PRESETS["tiny"]
    model = CLIP(replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer))))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(args.batches + 1):  # the first step is a warm-up
        if i == 1:
            t0 = time.perf_counter()
        loss = step_loss(model, batch, "c2lip")[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / args.batches

    print(f"batch {B}, {torch.get_num_threads()} torch threads")
    print(f"  render only           {B / render_s:8.0f} images/s")
    print(f"  loader (one process)  {B / loader_s:8.0f} samples/s  (render + caption + NLTK concepts + collate)")
    print(f"  c2lip training step   {B / step_s:8.0f} images/s  (tiny model, fp32)")
    print(f"  loader / training     {step_s / loader_s:8.1f}x")


if __name__ == "__main__":
    main()
