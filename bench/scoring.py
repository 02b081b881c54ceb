"""What scoring a real benchmark costs: SugarCrepe at full size through eval.py, with a ViT-B/16.

  python -m bench.scoring --folder /tmp/sc-bench                               # eval.py's defaults: batch 256
  python -m bench.scoring --folder /tmp/sc-bench --batch-size 64 --workers 2   # less memory

The folder gets SugarCrepe's official format at its full size (seven data/*.json files keyed by index,
7,511 records of {filename, caption, negative_caption}, 1,560 images of COCO's size, 640 x 480) and a
checkpoint of the B/16 preset (OpenAI's CLIP ViT-B/16 shape) with random weights and a word tokenizer of the
captions: what eval.py computes does not depend on the pixels or the weights, only on their sizes. Made
once, reused. Then `python eval.py --bench sugarcrepe` runs in a subprocess, timed, and its peak resident
memory is read from the kernel (the largest of eval.py and its DataLoader workers, each on its own).
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from data import WordTokenizer
from model import CLIP, PRESETS
from run.checkpoint import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"add_att": 692, "add_obj": 2062, "replace_att": 788, "replace_obj": 1652, "replace_rel": 1406}
FILES |= {"swap_att": 666, "swap_obj": 245}  # SugarCrepe's 7,511 records
IMAGES = 1560
WORDS = "a man woman dog cat red blue green small large table chair holding sitting on next to the with".split()


def make_fixture(folder: str) -> str:
    """The benchmark's files and a B/16 checkpoint in `folder` (once); -> the checkpoint's path."""
    ckpt = os.path.join(folder, "b16.pt")
    if os.path.exists(ckpt):
        return ckpt
    os.makedirs(os.path.join(folder, "val2017"), exist_ok=True)
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    pixels, rng = np.random.default_rng(0), random.Random(0)
    names = [f"{i:012d}.jpg" for i in range(IMAGES)]
    for name in names:
        image = pixels.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(folder, "val2017", name), quality=85)
    captions, k = [], 0
    for file, n in FILES.items():
        records = {}
        for _ in range(n):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))
            records[str(k)] = {"filename": names[k % IMAGES], "caption": caption, "negative_caption": caption + " a"}
            captions.append(caption)
            k += 1
        with open(os.path.join(folder, "data", f"{file}.json"), "w") as f:
            json.dump(records, f)
    cfg = PRESETS["B/16"]
    tokenizer = WordTokenizer.build(captions, cfg.text.context_length)
    torch.manual_seed(0)
    model = CLIP(cfg)
    save_checkpoint(ckpt, model=model.state_dict(), config=asdict(cfg), tokenizer=tokenizer.state_dict(), step=0)
    return ckpt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="where the fixture is made (about 0.9 GB), or found")
    p.add_argument("--batch-size", type=int, default=256, help="eval.py --batch-size")
    p.add_argument("--workers", type=int, default=4, help="eval.py --workers")
    args = p.parse_args()
    ckpt = make_fixture(args.folder)
    data, images = os.path.join(args.folder, "data"), os.path.join(args.folder, "val2017")
    command = [sys.executable, "eval.py", "--ckpt", ckpt, "--bench", "sugarcrepe", "--data-dir", data]
    command += ["--images", images, "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # Linux reports KiB
    print(done.stdout.strip().splitlines()[-1])  # the mean over the seven files
    print(f"SugarCrepe, B/16, batch {args.batch_size}, {args.workers} workers, {torch.get_num_threads()} threads:")
    print(f"  {seconds / 60:.1f} min, peak resident memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
