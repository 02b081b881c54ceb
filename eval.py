"""Evaluate checkpoints on the paper's three axes, side by side (paper Section 4, in miniature).

  python eval.py                                                     # evaluates runs/c2lip/ckpt.pt
  python eval.py --ckpt runs/siglip/ckpt.pt runs/c2lip/ckpt.pt --json results.json
  python eval.py --ckpt ViT-B-16.pt runs/finetuned/ckpt.pt   # OpenAI's CLIP as released, beside a fine-tune

A checkpoint is one of ours, OpenAI's CLIP release or an open_clip state dict (train.load_weights); each
is evaluated with the tokenizer and pixel normalisation it was trained with.

`--bench shapes` measures, on held-out scenes of the synthetic world (data.py):
  compositionality  SugarCrepe's categories that fit the world, scored exactly as SugarCrepe scores
                    them: one image, a true caption and a hard negative that differs in one way; correct
                    iff cos(image, caption) > cos(image, negative) with L2-normalised global embeddings
                    (a tie is wrong).
                      swap-att     two objects exchange colours     "a red circle and a blue star"
                                                                    -> "a blue circle and a red star"
                      swap-obj     two objects exchange shapes      -> "a red star and a blue circle"
                      replace-att  one colour becomes an absent one -> "a green circle and a blue star"
                      replace-obj  one shape becomes an absent one  -> "a red square and a blue star"
                      add-obj      an absent object is added        -> "... and a pink hexagon"
                      add-att      a wrong size is said for an object whose caption left it out
                      phrase-att   one object's phrase against the same phrase with another object's
                                   colour ("a red circle" vs "a blue circle" when both colours are in the
                                   image): binding at the level of a concept phrase, where the paper's
                                   mechanism acts first
  retrieval         image->text and text->image R@1 and R@5 over the held-out scenes (one caption each)
  zero-shot         single-object images classified among every colour-shape pair from prompts such as
                    "a photo of a red circle.", averaged over templates (CLIP's prompt ensemble)

Departure: the paper reports SugarCrepe, SugarCrepe++, ImageNet and COCO/Flickr retrieval on real
data; this is the same protocol on a world where each category is generated exactly, with counts.
Dimension legend: B images, T text tokens, D joint embedding width, C classes.
"""

import argparse
import json
import os
import random
import sys
from dataclasses import replace

import torch
from tqdm import tqdm

from data import COLOURS, GRID, SHAPES, SIZES, Obj, Scene, ShapesWorld, image_to_tensor, tokenizer_from_state_dict
from model import CLIP, CLIPConfig
from train import load_weights, pick_device

BENCH_SEED = 1234  # the held-out scenes: split "test" of this seed, never seen in training
CATEGORIES = ["swap-att", "swap-obj", "replace-att", "replace-obj", "add-obj", "add-att", "phrase-att"]
TEMPLATES = ["a photo of {}.", "{}.", "there is {}.", "an image showing {}."]


def load_checkpoint(path: str, device: torch.device, bpe: str | None = None, activation: str = "quick_gelu") -> tuple[CLIP, object, dict]:
    """(model in eval mode, its tokenizer, the checkpoint in our format; CLIP weights are converted)."""
    if not os.path.exists(path):
        sys.exit(f"error: no checkpoint at {path}. Train one first: python train.py --out {os.path.dirname(path) or '.'}"
                 " (or pass CLIP weights, e.g. OpenAI's ViT-B-16.pt)")
    try:
        ckpt = load_weights(path, bpe, activation)
    except (FileNotFoundError, ValueError) as err:  # no BPE vocabulary; weights of another architecture
        sys.exit(f"error: {path}: {err}")
    model = CLIP(CLIPConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer_from_state_dict(ckpt["tokenizer"]), ckpt


# ----------------------------------------------------------------------------- the shapes benchmark


def negatives(scene: Scene, rng: random.Random) -> dict[str, tuple[str, str]]:
    """(true text, negative text) of each category that this scene admits, in the scene's own wording."""
    caption = ShapesWorld.caption
    objs = list(scene.objects)
    out = {}

    def edited(changes: dict[int, dict]) -> list[Obj]:
        return [replace(o, **changes.get(k, {})) for k, o in enumerate(objs)]

    i, j = rng.sample(range(len(objs)), 2)  # every scene has at least two objects
    out["swap-att"] = (caption(scene), caption(scene, edited({i: {"colour": objs[j].colour}, j: {"colour": objs[i].colour}})))
    out["swap-obj"] = (caption(scene), caption(scene, edited({i: {"shape": objs[j].shape}, j: {"shape": objs[i].shape}})))

    free_colours = [c for c in COLOURS if c not in {o.colour for o in objs}]
    free_shapes = [s for s in SHAPES if s not in {o.shape for o in objs}]
    out["replace-att"] = (caption(scene), caption(scene, edited({i: {"colour": rng.choice(free_colours)}})))
    out["replace-obj"] = (caption(scene), caption(scene, edited({i: {"shape": rng.choice(free_shapes)}})))
    extra = Obj(rng.choice(free_colours), rng.choice(free_shapes), rng.choice(list(SIZES)), -1, True)
    added = objs[:]
    added.insert(rng.randrange(len(objs) + 1), extra)
    out["add-obj"] = (caption(scene), caption(scene, added))

    unsaid = [k for k, o in enumerate(objs) if not o.said_size]
    if unsaid:
        k = rng.choice(unsaid)
        wrong = next(s for s in SIZES if s != objs[k].size)
        out["add-att"] = (caption(scene), caption(scene, edited({k: {"size": wrong, "said_size": True}})))

    out["phrase-att"] = (objs[i].phrase(), replace(objs[i], colour=objs[j].colour).phrase())
    return out


class ShapesBenchmark:
    """Everything the shapes benchmark scores, generated once from (world, n, seed)."""

    def __init__(self, world: ShapesWorld, n: int = 1000, seed: int = BENCH_SEED, per_class: int = 4, normalise: str = "symmetric"):
        rng = random.Random(seed)
        self.normalise = normalise  # the pixel normalisation of the models this benchmark can score
        self.scenes = [world.scene(seed, "test", i) for i in range(n)]
        self.images = torch.stack([image_to_tensor(world.render(s), normalise) for s in self.scenes])  # (B, C, H, W)
        self.captions = [world.caption(s) for s in self.scenes]
        self.pairs = {c: [] for c in CATEGORIES}  # category -> [(scene index, true text, negative text)]
        for idx, scene in enumerate(self.scenes):
            for cat, (pos, neg) in negatives(scene, rng).items():
                self.pairs[cat].append((idx, pos, neg))
        # zero-shot: one object per image, classes = every (colour, shape) pair
        self.classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
        singles, self.labels = [], []
        for label, name in enumerate(self.classes):
            colour, shape = name.split()
            for _ in range(per_class):
                obj = Obj(colour, shape, rng.choice(list(SIZES)), rng.randrange(GRID * GRID), True)
                singles.append(Scene((obj,), 0, rng.randint(0, 40), ((rng.uniform(-1, 1), rng.uniform(-1, 1)),)))
                self.labels.append(label)
        self.single_images = torch.stack([image_to_tensor(world.render(s), normalise) for s in singles])
        self.labels = torch.tensor(self.labels)


@torch.no_grad()
def embed_images(model: CLIP, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    out = [model.encode_image(images[i : i + batch_size].to(device))[0].float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)  # (B, D)


@torch.no_grad()
def embed_texts(model: CLIP, tokenizer, texts: list[str], batch_size: int, device) -> torch.Tensor:
    out = [model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(out)  # (len(texts), D)


def recall_at_k(sim: torch.Tensor, k: int) -> float:
    """sim (B, B) with the match of row i in column i: the fraction of rows whose match ranks in the top k.
    Ties count against the match (rank = number of other columns scoring at least as high)."""
    true = sim.diagonal()[:, None]  # (B, 1)
    rank = (sim >= true).sum(dim=1) - 1  # (B,)
    return (rank < k).float().mean().item()


def evaluate_shapes(model: CLIP, tokenizer, bench: ShapesBenchmark, device, batch_size: int = 256) -> dict:
    image_emb = embed_images(model, bench.images, batch_size, device)  # (B, D)
    caption_emb = embed_texts(model, tokenizer, bench.captions, batch_size, device)  # (B, D)
    results = {}
    for cat, pairs in bench.pairs.items():
        idx = torch.tensor([p[0] for p in pairs])
        pos = embed_texts(model, tokenizer, [p[1] for p in pairs], batch_size, device)
        neg = embed_texts(model, tokenizer, [p[2] for p in pairs], batch_size, device)
        correct = (image_emb[idx] * pos).sum(-1) > (image_emb[idx] * neg).sum(-1)  # a tie is wrong
        results[cat] = {"accuracy": correct.float().mean().item(), "count": len(pairs)}
    sim = image_emb @ caption_emb.T  # (B, B): image i, caption j
    for k in (1, 5):
        results[f"i2t-R@{k}"] = {"accuracy": recall_at_k(sim, k), "count": len(sim)}
        results[f"t2i-R@{k}"] = {"accuracy": recall_at_k(sim.T, k), "count": len(sim)}
    # zero-shot: a class embedding is the normalised mean of its normalised prompt embeddings
    articled = [("an " if n[0] in "aeiou" else "a ") + n for n in bench.classes]
    prompts = embed_texts(model, tokenizer, [t.format(a) for a in articled for t in TEMPLATES], batch_size, device)
    classifier = torch.nn.functional.normalize(prompts.view(len(articled), len(TEMPLATES), -1).mean(1), dim=-1)  # (C, D)
    logits = embed_images(model, bench.single_images, batch_size, device) @ classifier.T  # (B, C)
    top5 = logits.topk(5, dim=1).indices  # (B, 5)
    for k in (1, 5):
        hit = (top5[:, :k] == bench.labels[:, None]).any(dim=1)
        results[f"zeroshot-top{k}"] = {"accuracy": hit.float().mean().item(), "count": len(hit)}
    return results


def markdown_table(results: dict[str, dict]) -> str:
    names = list(results)
    metrics = list(next(iter(results.values())))
    lines = ["| metric | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for m in metrics:
        count = next(iter(results.values()))[m]["count"]
        lines.append(f"| {m} | {count} | " + " | ".join(f"{results[n][m]['accuracy']:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=["runs/c2lip/ckpt.pt"], help="checkpoints to compare, a column each")
    p.add_argument("--bench", nargs="+", default=["shapes"], choices=["shapes"], help="benchmarks to run")
    p.add_argument("--n", type=int, default=1000, help="held-out scenes in the shapes benchmark")
    p.add_argument("--bench-seed", type=int, default=BENCH_SEED, help="seed that draws the benchmark")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device string")
    p.add_argument("--json", default=None, help="also write the results, with counts, to this JSON file")
    p.add_argument("--bpe", default=None, metavar="PATH",
                   help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for a --ckpt of CLIP weights "
                        "(default: the copy inside an installed open_clip_torch; our checkpoints carry their tokenizer)")
    p.add_argument("--clip-act", default="quick_gelu", choices=["quick_gelu", "gelu"],
                   help="activation of a --ckpt of CLIP weights: quick_gelu for OpenAI's, gelu for open_clip's own ViT-B-16")
    args = p.parse_args(argv)
    if args.n < 5:
        p.error("--n must be at least 5 (R@5 needs five captions)")
    device = pick_device(args.device)

    results, bench = {}, None
    for path in tqdm(args.ckpt, desc="checkpoints", disable=len(args.ckpt) == 1):
        model, tokenizer, ckpt = load_checkpoint(path, device, args.bpe, args.clip_act)
        size, normalise = model.cfg.vision.image_size, model.cfg.vision.normalise
        if bench is None or bench.images.shape[-1] != size or bench.normalise != normalise:
            bench = ShapesBenchmark(ShapesWorld(image_size=size), args.n, args.bench_seed, normalise=normalise)
        results[path] = evaluate_shapes(model, tokenizer, bench, device)
    print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "shapes", "n": args.n, "bench_seed": args.bench_seed, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
