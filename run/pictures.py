"""Pictures, drawn with PIL and numpy: the loss curve, where a phrase looks, and the shapes world.

  plot_losses        OUT/loss.png beside OUT/log.jsonl, one line per loss term (train.py redraws it at
                     every checkpoint)
  attention_picture  per phrase, the cross-modal pooling weights a_ijk over the patches (pool.py,
                     docs/paper.md, "The losses") as a heat map over the image, a row per model (eval.py --show)
  contact_sheet      training scenes of the shapes world with their captions and concept phrases:

  python -m run.pictures --n 4 --out docs/shapes.png

Dimension legend: K phrases, N = g x g patches, D joint embedding width.
"""

import argparse
import math
import os
import textwrap

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFont

from concepts import extract_concepts
from data import eval_transform, load_image
from evaluation.metrics import embed_texts
from model import CLIP
from pool import pooling_weights
from run.checkpoint import read_log
from sources.shapes import WORLDS, ShapesWorld

# term -> line colour
LOSS_TERMS = {"L_sig": (31, 119, 180), "L_npc": (214, 39, 40), "L_xac": (44, 160, 44), "L_clip": (148, 103, 189)}


def plot_losses(log_path: str, out_path: str, size: tuple[int, int] = (640, 400)) -> str | None:
    """log.jsonl -> a PNG of each loss term against the step, one line per term, with axes and a legend
    (PIL's default font). Unweighted terms, as logged: the weights of the sum are in the run's config.
    Returns out_path, or None for a log with no records yet."""
    records = read_log(log_path)
    # a diverged run logs nan or inf: those points are left out rather than breaking the picture (and the run)
    lines = {
        term: [(r["step"], r[term]) for r in records if math.isfinite(r.get(term, math.nan))] for term in LOSS_TERMS
    }
    lines = {term: points for term, points in lines.items() if points}
    if not lines:
        return None
    (width, height), (left, right, top, bottom) = size, (56, 100, 16, 36)
    steps = [s for points in lines.values() for s, _ in points]
    values = [v for points in lines.values() for _, v in points]
    x0, x1, y0, y1 = min(steps), max(steps), min(values), max(values)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)  # a single point or a flat line still has an axis

    def pixel(step: float, value: float) -> tuple[float, float]:
        return (
            left + (step - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom),
        )

    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):  # tick labels: five values up the y axis, three steps along the x axis
        value = y0 + (y1 - y0) * k / 4
        draw.text((4, pixel(x0, value)[1] - 5), f"{value:.3g}", fill="black", font=font)
    for step in sorted({x0, (x0 + x1) // 2, x1}):
        draw.text((pixel(step, y0)[0] - 8, height - bottom + 4), str(step), fill="black", font=font)
    draw.text(((width - right) // 2, height - 16), "step", fill="black", font=font)
    draw.text((left + 4, 2), "loss (each term unweighted)", fill="black", font=font)
    for k, (term, points) in enumerate(lines.items()):
        colour = LOSS_TERMS[term]
        draw.line([pixel(*p) for p in points] * (1 + (len(points) == 1)), fill=colour, width=2)  # a lone point: a dot
        y = top + 8 + 16 * k  # the legend, right of the plot
        draw.line([(width - right + 8, y), (width - right + 28, y)], fill=colour, width=2)
        draw.text((width - right + 34, y - 6), term, fill="black", font=font)
    img.save(out_path)
    return out_path


# ----------------------------------------------------------------------------- where a phrase looks

CELL, GAP, TITLE, LABEL = 160, 8, 16, 40  # picture layout in pixels: cell side, gap, row title, phrase label


def show_image(spec: str, size: int, seed: int, world: str = "simple") -> Image.Image:
    """--show's image: a shapes test scene index (of the benchmark seed, in the model's world) rendered at the
    model's size, or an image file cropped as eval_transform crops it. OSError naming --show for a path that
    is not a file or an image that cannot be decoded."""
    if spec.isdigit():
        world = ShapesWorld(size, **WORLDS[world])
        return world.render(world.scene(seed, "test", int(spec)))
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--show {spec}: neither a shapes test scene index nor an image file")
    try:
        image = load_image(spec)
    except OSError as err:  # its message names the file and what PIL said
        raise OSError(f"--show {err}") from None
    return T.Compose(eval_transform(size).transforms[:-1])(image)  # resize and crop, still a picture


@torch.no_grad()
def attention_maps(model: CLIP, tokenizer, image: torch.Tensor, phrases: list[str], tau: float, device) -> np.ndarray:
    """image (C, H, W) -> (K, g, g): each phrase's pooling weights a_j = softmax_j(u_j . c / tau) over the
    g x g patches (pool.pooling_weights), the weights the XAC loss pools the image with."""
    _, patch_emb = model.encode_image(image[None].to(device))  # (1, N, D)
    phrase_emb = embed_texts(model, tokenizer, phrases, len(phrases), device)  # (K, D)
    weights = pooling_weights(phrase_emb, patch_emb.float().cpu(), tau)[:, 0]  # (K, N)
    side = math.isqrt(weights.shape[1])
    return weights.view(len(phrases), side, side).numpy()  # (K, g, g): patches in row-major order


def heat(values: np.ndarray) -> np.ndarray:
    """(h, w) in [0, 1] -> (h, w, 3) colours from black through red and yellow to white (a 'hot' map)."""
    return np.stack([np.clip(3 * values - k, 0, 1) for k in range(3)], axis=-1) * 255


def attention_picture(image: Image.Image, rows: list[np.ndarray], phrases: list[str], titles: list[str]) -> Image.Image:
    """A sheet with one row per model (rows[r]: (K, g, g) weights, titles[r]): the image, then per phrase
    its weights as a heat map over the image. Each map is scaled to its own peak, and its label says how
    far that peak is above a flat pooling (1 / N): a map bright everywhere is a pooling close to a mean."""
    font = ImageFont.load_default()
    base = np.asarray(image.convert("RGB").resize((CELL, CELL), Image.NEAREST), dtype=np.float32)  # (CELL, CELL, 3)
    row_height = TITLE + LABEL + CELL + GAP
    sheet = Image.new("RGB", (GAP + (len(phrases) + 1) * (CELL + GAP), GAP + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (maps, title) in enumerate(zip(rows, titles)):
        top = GAP + r * row_height
        draw.text((GAP, top), title, fill="black", font=font)
        draw.text((GAP, top + TITLE), "image", fill="black", font=font)
        sheet.paste(Image.fromarray(base.astype(np.uint8)), (GAP, top + TITLE + LABEL))
        for k, (phrase, weights) in enumerate(zip(phrases, maps)):
            left = GAP + (k + 1) * (CELL + GAP)
            scaled = Image.fromarray((weights / weights.max()).astype(np.float32)).resize((CELL, CELL), Image.NEAREST)
            blend = 0.35 * base + 0.65 * heat(np.asarray(scaled))  # (CELL, CELL, 3)
            sheet.paste(Image.fromarray(blend.astype(np.uint8)), (left, top + TITLE + LABEL))
            label = textwrap.wrap(phrase, 26)[:2] + [f"peak {weights.max() * weights.size:.1f}x flat"]
            draw.multiline_text((left, top + TITLE), "\n".join(label), fill="black", font=font, spacing=1)
    return sheet


def contact_sheet(n: int, seed: int = 0, split: str = "train") -> Image.Image:
    """n scenes of the shapes world, each beside its caption and its concept phrases (concepts.py)."""
    world, zoom, width = ShapesWorld(), 3, 560
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (width, n * (64 * zoom + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        scene = world.scene(seed, split, i)
        top = i * (64 * zoom + 8) + 4
        sheet.paste(world.render(scene).resize((64 * zoom, 64 * zoom), Image.NEAREST), (4, top))
        caption = world.caption(scene)
        lines = textwrap.wrap(caption, 52) + ["", "concepts:"] + [f"  {c}" for c in extract_concepts(caption)]
        for k, line in enumerate(lines):
            draw.text((64 * zoom + 14, top + 4 + 14 * k), line, fill="black", font=font)
    return sheet


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6, help="scenes to draw")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to draw from")
    p.add_argument("--out", default="shapes.png", help="output PNG")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    contact_sheet(args.n, args.seed, args.split).save(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
