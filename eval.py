"""Evaluate checkpoints on the paper's three axes, side by side (paper Section 4, in miniature).

  python eval.py                                                     # evaluates runs/c2lip/ckpt.pt
  python eval.py --ckpt runs/siglip/ckpt.pt runs/c2lip/ckpt.pt --json results.json
  python eval.py --ckpt ViT-B-16.pt runs/finetuned/ckpt.pt   # OpenAI's CLIP as released, beside a fine-tune

A checkpoint is one of ours, OpenAI's CLIP release or an open_clip state dict (train.load_weights); each
is evaluated with the tokenizer and pixel normalisation it was trained with.

`--bench shapes` measures, on held-out scenes of the synthetic world (data.py) that the checkpoint was
trained in (train.py --world; in the dense world an edit that names the same colour-shape pairs again,
such as swapping the colours of two circles, is no negative, and another edit is drawn):
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
                      heldout-swap-att, heldout-replace-att
                                   swap-att and replace-att edited at an object whose colour-shape pair
                                   is in data.HOLDOUT_COMBOS, on the scenes that hold one (36% of them):
                                   the compositional-generalisation split for runs trained with
                                   `train.py --holdout-combos`, which never saw those pairs together
  retrieval         image->text and text->image R@1 and R@5 over the held-out scenes (one caption each)
  zero-shot         single-object images classified among every colour-shape pair from prompts such as
                    "a photo of a red circle.", averaged over templates (CLIP's prompt ensemble)
  --score pooled    the same metrics again (named pooled/...), each image-text score replaced by the
                    text-conditioned one of the authors' optional evaluation wrapper: the image's patches
                    pooled by the text (pool.py, at --tau), against the text. A diagnostic; the paper's
                    plain scoring stays the default, and C2LIP's claim is about it (inference unchanged).

Pictures:
  python eval.py --show 3 --concepts "a red circle" "a tiny blue star" --ckpt A.pt B.pt --out attention.png
  draws the image (shapes test scene 3, or an image file) and, per phrase, its pooling weights over the
  patches as a heat map: a row per checkpoint (say, untrained and trained).

The paper's real benchmarks, on the official files (formats in ../shared/docs/formats.md):
  python eval.py --ckpt A.pt B.pt --bench sugarcrepe --data-dir sugar-crepe/data --images coco/val2017
  python eval.py --bench sugarcrepe++ --data-dir scpp/data --images coco/val2017
  python eval.py --bench zeroshot --data-dir imagenet/val --classnames imagenet_classes.txt
  python eval.py --bench zeroshot --zeroshot-set cifar10 --data-dir ~/data/cifar   # torchvision's files
  python eval.py --bench retrieval --data-dir coco --ann coco/coco_karpathy_test.json
  python eval.py --bench sugarcrepe zeroshot --data-dir sugarcrepe=sc/data zeroshot=imagenet/val ...
  sugarcrepe    7 files; correct iff cos(image, caption) > cos(image, negative) (a tie is wrong); accuracy
                per file, the add / replace / swap averages and the mean (unweighted over files)
  sugarcrepe++  5 files; ITT: both positives beat the negative on the image; TOT: the positives are
                closer to each other than either is to the negative (text encoder only)
  zeroshot      ImageFolder (or CIFAR-10/100), prompt-template ensemble, top-1 and top-5
  retrieval     Karpathy test split, image->text (a hit if any of the image's captions is in the top K)
                and text->image R@1, R@5, R@10
Every rank counts the wrong candidates that score at least as high as the right one: ties count against
the model, in every metric. Each metric function below is a pure function of scores, tested by hand.

Departure: the paper reports SugarCrepe, SugarCrepe++, ImageNet and COCO/Flickr retrieval on real
data; `--bench shapes` is the same protocol on a world where each category is generated exactly, with counts.
Dimension legend: B images, T text tokens, D joint embedding width, C classes, P prompt templates,
M benchmark examples, X texts, N = g x g patches, K phrases of a picture.
"""

import argparse
import itertools
import json
import math
import os
import random
import re
import sys
import textwrap
from collections import Counter
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data import (COLOURS, GRID, HOLDOUT_COMBOS, SHAPES, SIZES, WORLDS, ImageFiles, Obj, Scene, ShapesWorld, eval_transform,
                  image_to_tensor, load_image, tokenizer_from_state_dict)  # fmt: skip
from model import CLIP, CLIPConfig
from pool import pooled_similarity, pooling_weights
from train import load_weights, pick_device

BENCH_SEED = 1234  # the held-out scenes: split "test" of this seed, never seen in training
CATEGORIES = ["swap-att", "swap-obj", "replace-att", "replace-obj", "add-obj", "add-att", "phrase-att",
              "heldout-swap-att", "heldout-replace-att"]  # fmt: skip
TEMPLATES = ["a photo of {}.", "{}.", "there is {}.", "an image showing {}."]
BENCHES = ["shapes", "sugarcrepe", "sugarcrepe++", "zeroshot", "retrieval"]
SUGARCREPE = {"add": ["add_att", "add_obj"], "replace": ["replace_att", "replace_obj", "replace_rel"], "swap": ["swap_att", "swap_obj"]}
SUGARCREPE_PP = {"replace": ["replace_att", "replace_obj", "replace_rel"], "swap": ["swap_att", "swap_obj"]}
# Zero-shot prompts when --templates is not given (a short ensemble in the spirit of CLIP's; CLIP used 18
# templates for CIFAR and 80 for ImageNet: pass those with --templates to compare with published numbers).
ZEROSHOT_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a good photo of a {}.",
    "a bad photo of a {}.", "a close-up photo of a {}.", "a photo of a small {}.", "a photo of a large {}.",
    "a low resolution photo of a {}.", "a cropped photo of a {}.",
]  # fmt: skip

COCO_VAL2017 = "the COCO val2017 images (images.cocodataset.org/zips/val2017.zip) in IMAGES, default DIR/val2017"
LAYOUT = {
    "sugarcrepe": "Expected DIR/{add_att,add_obj,replace_att,replace_obj,replace_rel,swap_att,swap_obj}.json, the data/ "
                  f"folder of github.com/RAIVNLab/sugar-crepe, and {COCO_VAL2017}.",
    "sugarcrepe++": "Expected DIR/{replace_att,replace_obj,replace_rel,swap_att,swap_obj}.json, the data/ folder of "
                    f"github.com/Sri-Harsha/scpp (also huggingface.co/datasets/Aman-J/SugarCrepe_pp), and {COCO_VAL2017}.",
    "zeroshot": "Expected an ImageFolder, DIR/<class folder>/<images>, classes in sorted folder order, e.g. ImageNet's "
                "validation set (image-net.org) sorted into its 1,000 WordNet-id folders (the usual valprep.sh), with "
                "--classnames FILE giving one class name per line in that order; or --zeroshot-set cifar10 / cifar100 "
                "with torchvision's CIFAR files in DIR.",
    "retrieval": 'Expected --ann FILE, a JSON list of {"image": "<path under DIR>", "caption": ["...", ...]}: the '
                 "Karpathy test split as released with BLIP (github.com/salesforce/BLIP: coco_karpathy_test.json, "
                 "flickr30k_test.json), and the images under DIR: COCO's val2014/ (images.cocodataset.org/zips/"
                 "val2014.zip) or Flickr30k's flickr30k-images/ (request form at shannon.cs.illinois.edu/DenotationGraph).",
}  # fmt: skip


def fail(message: str):
    """Stop with a message the user can act on (no traceback)."""
    sys.exit(f"error: {message}")


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


def edited(objs: list[Obj], changes: dict[int, dict]) -> list[Obj]:
    """The objects with some fields changed: {object index: {field: new value}}."""
    return [replace(o, **changes.get(k, {})) for k, o in enumerate(objs)]


def pairs_of(objs) -> Counter:
    """The colour-shape pairs a caption of these objects claims. An edit of colours or shapes gives a false
    caption exactly when these differ: some claimed pair is then not in the image as often as claimed."""
    return Counter((o.colour, o.shape) for o in objs)


def swapped(objs: list[Obj], field: str, i: int, j: int) -> list[Obj]:
    """Objects i and j exchange their colour or their shape."""
    return edited(objs, {i: {field: getattr(objs[j], field)}, j: {field: getattr(objs[i], field)}})


def false_swap(objs: list[Obj], field: str, i: int, j: int, rng: random.Random) -> tuple[int, int] | None:
    """(i, j) if swapping their `field` makes a false caption, else another pair that does (drawn from rng),
    else None. With distinct colours and shapes every pair does, so the simple world never redraws; in
    the dense world "a red circle and a blue circle" swapped is the same claim, and is not a negative."""
    if pairs_of(swapped(objs, field, i, j)) != pairs_of(objs):
        return i, j
    good = [(a, b) for a, b in itertools.combinations(range(len(objs)), 2) if pairs_of(swapped(objs, field, a, b)) != pairs_of(objs)]
    return rng.choice(good) if good else None


def negatives(scene: Scene, rng: random.Random) -> dict[str, tuple[str, str]]:
    """(true text, negative text) of each category that this scene admits, in the scene's own wording."""
    caption = ShapesWorld.caption
    objs = list(scene.objects)
    out = {}
    i, j = rng.sample(range(len(objs)), 2)  # every scene has at least two objects
    for cat, field in (("swap-att", "colour"), ("swap-obj", "shape")):
        pair = false_swap(objs, field, i, j, rng)
        if pair:
            out[cat] = (caption(scene), caption(scene, swapped(objs, field, *pair)))

    free_colours = [c for c in COLOURS if c not in {o.colour for o in objs}]
    free_shapes = [s for s in SHAPES if s not in {o.shape for o in objs}]
    out["replace-att"] = (caption(scene), caption(scene, edited(objs, {i: {"colour": rng.choice(free_colours)}})))
    out["replace-obj"] = (caption(scene), caption(scene, edited(objs, {i: {"shape": rng.choice(free_shapes)}})))
    extra = Obj(rng.choice(free_colours), rng.choice(free_shapes), rng.choice(list(SIZES)), -1, True)
    added = objs[:]
    added.insert(rng.randrange(len(objs) + 1), extra)
    out["add-obj"] = (caption(scene), caption(scene, added))

    unsaid = [k for k, o in enumerate(objs) if not o.said_size]
    if unsaid:
        k = rng.choice(unsaid)
        wrong = next(s for s in SIZES if s != objs[k].size)
        out["add-att"] = (caption(scene), caption(scene, edited(objs, {k: {"size": wrong, "said_size": True}})))

    # a phrase with another object's colour, unless an object of that colour and shape is in the image
    wrong = [(a, b) for a, b in itertools.permutations(range(len(objs)), 2) if (objs[b].colour, objs[a].shape) not in pairs_of(objs)]
    if wrong:
        a, b = (i, j) if (i, j) in wrong else rng.choice(wrong)
        out["phrase-att"] = (objs[a].phrase(), replace(objs[a], colour=objs[b].colour).phrase())
    return out


def heldout_negatives(scene: Scene, holdout, rng: random.Random) -> dict[str, tuple[str, str]]:
    """swap-att and replace-att edited at an object whose (colour, shape) is in `holdout`, a pair that a run
    trained with --holdout-combos never saw together; {} if the scene has no such object."""
    caption, objs = ShapesWorld.caption, list(scene.objects)
    held = [k for k, o in enumerate(objs) if (o.colour, o.shape) in holdout]
    if not held:
        return {}
    i = rng.choice(held)
    j = rng.choice([k for k in range(len(objs)) if k != i])
    free_colours = [c for c in COLOURS if c not in {o.colour for o in objs}]
    out = {"heldout-replace-att": (caption(scene), caption(scene, edited(objs, {i: {"colour": rng.choice(free_colours)}})))}
    if pairs_of(swapped(objs, "colour", i, j)) == pairs_of(objs):  # the same claim (dense world): another partner
        others = [k for k in range(len(objs)) if k != i and pairs_of(swapped(objs, "colour", i, k)) != pairs_of(objs)]
        if not others:
            return out
        j = rng.choice(others)
    return {"heldout-swap-att": (caption(scene), caption(scene, swapped(objs, "colour", i, j)))} | out


class ShapesBenchmark:
    """Everything the shapes benchmark scores, generated once from (world, n, seed)."""

    def __init__(self, world: ShapesWorld, n: int = 1000, seed: int = BENCH_SEED, per_class: int = 4, normalise: str = "symmetric",
                 holdout=HOLDOUT_COMBOS):  # fmt: skip
        rng, held_rng, holdout = random.Random(seed), random.Random(f"heldout:{seed}"), set(map(tuple, holdout))
        self.normalise = normalise  # the pixel normalisation of the models this benchmark can score
        self.scenes = [world.scene(seed, "test", i) for i in range(n)]
        self.images = torch.stack([image_to_tensor(world.render(s), normalise) for s in self.scenes])  # (B, C, H, W)
        self.captions = [world.caption(s) for s in self.scenes]
        self.pairs = {c: [] for c in CATEGORIES}  # category -> [(scene index, true text, negative text)]
        for idx, scene in enumerate(self.scenes):
            # the held-out pairs draw from their own generator: the other categories stay as they were
            for cat, (pos, neg) in (negatives(scene, rng) | heldout_negatives(scene, holdout, held_rng)).items():
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


# ----------------------------------------------------------------------------- metrics: pure functions of scores


def pairwise_correct(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """SugarCrepe's rule. pos, neg (M,): cos(image, caption) and cos(image, negative) -> (M,) bool, correct iff
    pos > neg: a tie is wrong (a model that ignores the text must not score 50% or 100%)."""
    return pos > neg


def itt_correct(i_p1: torch.Tensor, i_p2: torch.Tensor, i_n: torch.Tensor) -> torch.Tensor:
    """SugarCrepe++ image-to-text. cos(I, P1), cos(I, P2), cos(I, N), each (M,) -> (M,) bool: both
    positive captions score above the negative one."""
    return (i_p1 > i_n) & (i_p2 > i_n)


def tot_correct(p1_p2: torch.Tensor, p1_n: torch.Tensor, p2_n: torch.Tensor) -> torch.Tensor:
    """SugarCrepe++ text-only. cos(P1, P2), cos(P1, N), cos(P2, N), each (M,) -> (M,) bool: the two
    positives (same meaning, different words) are closer to each other than either is to the negative."""
    return (p1_p2 > p1_n) & (p1_p2 > p2_n)


def retrieval_recall(sim: torch.Tensor, text_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """sim (B, X): image i against text j; text_image (X,): the image each text describes (several texts
    may share one). -> {'i2t-R@k': ..., 't2i-R@k': ...}. Image->text: a hit if the image's best caption
    ranks in the top k among all X texts; text->image: a hit if its image ranks in the top k among the B.
    The rank is the number of wrong candidates scoring at least as high, so ties count against the model."""
    own = text_image[None, :] == torch.arange(len(sim), device=sim.device)[:, None]  # (B, X)
    best = sim.masked_fill(~own, float("-inf")).max(dim=1).values  # (B,): each image's best caption
    i2t_rank = ((sim >= best[:, None]) & ~own).sum(dim=1)  # (B,)
    true = sim[text_image, torch.arange(sim.shape[1], device=sim.device)]  # (X,)
    t2i_rank = ((sim >= true[None, :]) & ~own).sum(dim=0)  # (X,)
    out = {f"i2t-R@{k}": (i2t_rank < k).float().mean().item() for k in ks}
    return out | {f"t2i-R@{k}": (t2i_rank < k).float().mean().item() for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """logits (B, C), labels (B,) -> {k: fraction of images whose class ranks in the top k} (ties against)."""
    rank = (logits >= logits.gather(1, labels[:, None])).sum(dim=1) - 1  # (B,): classes scoring at least as high
    return {k: (rank < k).float().mean().item() for k in ks}


def zeroshot_classifier(prompt_emb: torch.Tensor) -> torch.Tensor:
    """prompt_emb (C, P, D): every template filled with every class name -> (C, D) class embeddings: each
    prompt embedding normalised, averaged over the templates, re-normalised (CLIP's prompt ensemble)."""
    return F.normalize(F.normalize(prompt_emb, dim=-1).mean(dim=1), dim=-1)


def group_means(per_file: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, dict]:
    """{file: {'accuracy', 'count'}} -> each group's unweighted mean over its files, and 'mean' over all
    files, with the summed counts (SugarCrepe's add / replace / swap averages)."""
    out = {}
    for group, names in [*groups.items(), ("mean", [n for names in groups.values() for n in names])]:
        out[group] = {"accuracy": sum(per_file[n]["accuracy"] for n in names) / len(names),
                      "count": sum(per_file[n]["count"] for n in names)}  # fmt: skip
    return out


def fraction(correct: torch.Tensor) -> dict:
    return {"accuracy": correct.float().mean().item(), "count": len(correct)}


# ----------------------------------------------------------------------------- embedding in batches


@torch.no_grad()
def embed_images(model: CLIP, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    out = [model.encode_image(images[i : i + batch_size].to(device))[0].float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)  # (B, D)


@torch.no_grad()
def embed_image_tokens(model: CLIP, images: torch.Tensor, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, C, H, W) -> (x (B, D), u (B, N, D)): global and patch embeddings, for text-conditioned scores."""
    out = [model.encode_image(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat([x.float().cpu() for x, _ in out]), torch.cat([u.float().cpu() for _, u in out])


@torch.no_grad()
def embed_texts(model: CLIP, tokenizer, texts: list[str], batch_size: int, device, desc: str | None = None) -> torch.Tensor:
    starts = tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=desc is None)
    out = [model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float().cpu() for i in starts]
    return torch.cat(out)  # (len(texts), D)


@torch.no_grad()
def embed_image_dataset(model: CLIP, dataset, args, device, desc: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Items image (C, H, W) or (image, label), decoded in DataLoader workers -> (B, D) embeddings, labels or None."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    embs, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        if isinstance(batch, (list, tuple)):
            batch, label = batch
            labels.append(label)
        embs.append(model.encode_image(batch.to(device))[0].float().cpu())
    return torch.cat(embs), (torch.cat(labels) if labels else None)  # (B, D), (B,)


def embed_examples(model: CLIP, tokenizer, files: dict[str, list[tuple]], args, device, name: str) -> dict:
    """files {file: [(image path, text, text, ...)]} -> {file: (images (M, D), [texts (M, D), ...])}, in the
    order of the tuples; every distinct image and text is embedded once (SugarCrepe's 7,511 examples
    share 1,560 images)."""
    paths = list(dict.fromkeys(ex[0] for exs in files.values() for ex in exs))
    texts = list(dict.fromkeys(t for exs in files.values() for ex in exs for t in ex[1:]))
    images = ImageFiles(paths, eval_transform(model.cfg.vision.image_size, model.cfg.vision.normalise))  # the model's own image size
    image_emb = embed_image_dataset(model, images, args, device, f"{name} images")[0]  # (images, D)
    text_emb = embed_texts(model, tokenizer, texts, args.batch_size, device, f"{name} texts")  # (texts, D)
    row, col = {p: i for i, p in enumerate(paths)}, {t: i for i, t in enumerate(texts)}
    return {
        f: (image_emb[[row[ex[0]] for ex in exs]], [text_emb[[col[ex[k]] for ex in exs]] for k in range(1, len(exs[0]))])
        for f, exs in files.items()
    }  # fmt: skip


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of L2-normalised (M, D) embeddings -> (M,)."""
    return (a * b).sum(dim=-1)


# ----------------------------------------------------------------------------- the shapes benchmark, scored


def paired_pooled_cos(text_emb: torch.Tensor, patch_emb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """text_emb (M, D), patch_emb (M, N, D) -> (M,): text m against image m pooled by text m, i.e. the
    diagonal of pool.pooled_similarity, computed pair by pair (vmap) instead of for all M x M pairs."""
    return torch.vmap(lambda c, u: pooled_similarity(c[None], u[None], tau)[0, 0])(text_emb, patch_emb)


def evaluate_shapes(model: CLIP, tokenizer, bench: ShapesBenchmark, device, batch_size: int = 256,
                    score: str = "plain", tau: float = 1.0) -> dict:  # fmt: skip
    """Every category, retrieval and zero-shot on the shapes benchmark. score="plain" (the paper's, the
    default): cos(x_i, y) of the global image embedding, inference unchanged. score="pooled" (a diagnostic,
    as in the authors' optional evaluation wrapper): every image-text score, in every metric, becomes
    v . y with v the image's patches pooled by that text (pool.py at `tau`); metrics are named pooled/..."""
    pooled = score == "pooled"
    if pooled:
        image_emb, patch_emb = embed_image_tokens(model, bench.images, batch_size, device)  # (B, D), (B, N, D)
    else:
        image_emb, patch_emb = embed_images(model, bench.images, batch_size, device), None  # (B, D)

    def paired(idx: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:  # image idx[m] vs text m -> (M,)
        return paired_pooled_cos(text_emb, patch_emb[idx], tau) if pooled else cos(image_emb[idx], text_emb)

    def table(x: torch.Tensor, u: torch.Tensor | None, text_emb: torch.Tensor) -> torch.Tensor:  # -> (B, X)
        return pooled_similarity(text_emb, u, tau).T if pooled else x @ text_emb.T

    results = {}
    for cat, pairs in bench.pairs.items():
        if not pairs:  # a category no scene admits (e.g. held-out pairs in a tiny benchmark)
            results[cat] = {"accuracy": float("nan"), "count": 0}
            continue
        idx = torch.tensor([p[0] for p in pairs])
        pos = embed_texts(model, tokenizer, [p[1] for p in pairs], batch_size, device)
        neg = embed_texts(model, tokenizer, [p[2] for p in pairs], batch_size, device)
        results[cat] = fraction(pairwise_correct(paired(idx, pos), paired(idx, neg)))
    caption_emb = embed_texts(model, tokenizer, bench.captions, batch_size, device)  # (B, D)
    sim = table(image_emb, patch_emb, caption_emb)  # (B, B): image i, caption j
    for metric, value in retrieval_recall(sim, torch.arange(len(sim)), ks=(1, 5)).items():
        results[metric] = {"accuracy": value, "count": len(sim)}
    # zero-shot: single-object images, classes = every colour-shape pair, prompts averaged over TEMPLATES
    articled = [("an " if n[0] in "aeiou" else "a ") + n for n in bench.classes]
    prompts = embed_texts(model, tokenizer, [t.format(a) for a in articled for t in TEMPLATES], batch_size, device)
    classifier = zeroshot_classifier(prompts.view(len(articled), len(TEMPLATES), -1))  # (C, D)
    if pooled:
        logits = table(*embed_image_tokens(model, bench.single_images, batch_size, device), classifier)  # (B, C)
    else:
        logits = table(embed_images(model, bench.single_images, batch_size, device), None, classifier)  # (B, C)
    for k, value in topk_accuracy(logits, bench.labels, (1, 5)).items():
        results[f"zeroshot-top{k}"] = {"accuracy": value, "count": len(logits)}
    return {f"pooled/{k}" if pooled else k: v for k, v in results.items()}


# ----------------------------------------------------------------------------- the real benchmarks: files


def read_json_file(path: str, bench: str):
    if not os.path.isfile(path):
        fail(f"--bench {bench}: no file {path}.\n{LAYOUT[bench]}")
    with open(path) as f:
        return json.load(f)


def check_images(paths: list[str], bench: str) -> None:
    """Every image a benchmark names must exist: a score on part of a benchmark is not its score."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        fail(f"--bench {bench}: {len(missing)} of {len(set(paths))} images are missing, e.g. {missing[0]}.\n{LAYOUT[bench]}")


def load_sugarcrepe(data_dir: str, images: str, bench: str = "sugarcrepe") -> dict[str, list[tuple]]:
    """SugarCrepe's files -> {file: [(image path, caption, negative)]}; SugarCrepe++'s (bench='sugarcrepe++')
    -> {file: [(image path, caption, caption2, negative)]}. SugarCrepe: a JSON object keyed by a string index
    (keys need not be contiguous); SugarCrepe++: a JSON list of records."""
    if bench == "sugarcrepe":
        groups, fields = SUGARCREPE, ["caption", "negative_caption"]
    else:
        groups, fields = SUGARCREPE_PP, ["caption", "caption2", "negative_caption"]
    files = {}
    for name in [n for names in groups.values() for n in names]:
        path = os.path.join(data_dir, name + ".json")
        data = read_json_file(path, bench)
        records = list(data.values()) if bench == "sugarcrepe" and isinstance(data, dict) else data
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            fail(f"--bench {bench}: {path} is not in the official format.\n{LAYOUT[bench]}")
        try:
            files[name] = [(os.path.join(images, r["filename"]), *(r[k] for k in fields)) for r in records]
        except KeyError as err:
            fail(f"--bench {bench}: a record of {path} has no field {err}; expected filename, {', '.join(fields)}")
    check_images([ex[0] for exs in files.values() for ex in exs], bench)
    return files


def load_zeroshot(data_dir: str, args) -> tuple[torch.utils.data.Dataset, list[str], list[str]]:
    """-> (dataset of (PIL image, label), class names, templates)."""
    if args.zeroshot_set == "imagefolder":
        try:
            dataset = torchvision.datasets.ImageFolder(data_dir, loader=load_image)
        except (FileNotFoundError, RuntimeError) as err:
            fail(f"--bench zeroshot: {err}\n{LAYOUT['zeroshot']}")
        names = [c.replace("_", " ") for c in dataset.classes]
        if not args.classnames and all(re.fullmatch(r"n\d{8}", c) for c in dataset.classes):
            fail(f"--bench zeroshot: the class folders of {data_dir} are WordNet ids (ImageNet): pass --classnames FILE, "
                 "one name per line in sorted folder order (see the README).")  # fmt: skip
    else:
        cifar = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[args.zeroshot_set]
        try:
            dataset = cifar(data_dir, train=False, download=False)  # the test split; never downloads here
        except RuntimeError:
            fetch = f"torchvision.datasets.{cifar.__name__}('{data_dir}', train=False, download=True)"
            fail(f"--bench zeroshot: torchvision's {cifar.__name__} files are not in {data_dir}. Fetch them once with\n"
                 f"  python -c \"import torchvision; {fetch}\"")  # fmt: skip
        names = [c.replace("_", " ") for c in dataset.classes]  # built into the dataset's files: 'maple_tree' -> 'maple tree'
    if args.classnames:
        with open(args.classnames) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != len(dataset.classes):
            fail(f"--classnames: {len(names)} names in {args.classnames} for {len(dataset.classes)} classes in {data_dir}")
    templates = ZEROSHOT_TEMPLATES
    if args.templates:
        with open(args.templates) as f:
            templates = [line.strip() for line in f if line.strip()]
        if not templates or not all("{}" in t for t in templates):
            fail(f"--templates: {args.templates} must hold templates, one per line, each with {{}} for the class name")
    return dataset, names, templates


def load_retrieval(data_dir: str, ann: str) -> tuple[list[str], list[str], torch.Tensor]:
    """Karpathy-split JSON -> (image paths (B), captions (X), text_image (X,): the image of each caption)."""
    ann = ann if os.path.isfile(ann) else os.path.join(data_dir, ann)
    records = read_json_file(ann, "retrieval")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "image" in r and "caption" in r for r in records):
        fail(f"--bench retrieval: {ann} is not in the expected format.\n{LAYOUT['retrieval']}")
    paths, texts, text_image = [], [], []
    for i, r in enumerate(records):
        captions = [r["caption"]] if isinstance(r["caption"], str) else r["caption"]
        paths.append(os.path.join(data_dir, r["image"]))
        texts += captions
        text_image += [i] * len(captions)
    check_images(paths, "retrieval")
    return paths, texts, torch.tensor(text_image)


# ----------------------------------------------------------------------------- the real benchmarks: scores


def evaluate_sugarcrepe(model: CLIP, tokenizer, files: dict, args, device) -> dict:
    per_file = {}
    for name, (image, (pos, neg)) in embed_examples(model, tokenizer, files, args, device, "sugarcrepe").items():
        per_file[name] = fraction(pairwise_correct(cos(image, pos), cos(image, neg)))
    return {f"sugarcrepe/{k}": v for k, v in (per_file | group_means(per_file, SUGARCREPE)).items()}


def evaluate_sugarcrepe_pp(model: CLIP, tokenizer, files: dict, args, device) -> dict:
    itt, tot = {}, {}
    for name, (image, (p1, p2, neg)) in embed_examples(model, tokenizer, files, args, device, "sugarcrepe++").items():
        itt[name] = fraction(itt_correct(cos(image, p1), cos(image, p2), cos(image, neg)))
        tot[name] = fraction(tot_correct(cos(p1, p2), cos(p1, neg), cos(p2, neg)))
    results = {}
    for task, per_file in (("ITT", itt), ("TOT", tot)):
        results |= {f"sugarcrepe++/{task}/{k}": v for k, v in (per_file | group_means(per_file, SUGARCREPE_PP)).items()}
    return results


def evaluate_zeroshot(model: CLIP, tokenizer, data: tuple, args, device) -> dict:
    dataset, names, templates = data
    dataset.transform = eval_transform(model.cfg.vision.image_size, model.cfg.vision.normalise)
    image_emb, labels = embed_image_dataset(model, dataset, args, device, "zeroshot images")  # (B, D), (B,)
    prompts = embed_texts(model, tokenizer, [t.format(n) for n in names for t in templates], args.batch_size, device, "zeroshot prompts")
    classifier = zeroshot_classifier(prompts.view(len(names), len(templates), -1))  # (C, D)
    accuracy = topk_accuracy(image_emb @ classifier.T, labels, (1, 5))  # logits (B, C)
    return {f"zeroshot/top{k}": {"accuracy": v, "count": len(labels)} for k, v in accuracy.items()}


def evaluate_retrieval(model: CLIP, tokenizer, data: tuple, args, device) -> dict:
    paths, texts, text_image = data
    images = ImageFiles(paths, eval_transform(model.cfg.vision.image_size, model.cfg.vision.normalise))
    image_emb = embed_image_dataset(model, images, args, device, "retrieval images")[0]  # (B, D)
    text_emb = embed_texts(model, tokenizer, texts, args.batch_size, device, "retrieval texts")  # (X, D)
    recall = retrieval_recall(image_emb @ text_emb.T, text_image)  # sim (B, X)
    return {f"retrieval/{k}": {"accuracy": v, "count": len(paths) if k.startswith("i2t") else len(texts)} for k, v in recall.items()}


# ----------------------------------------------------------------------------- pictures: where a phrase looks

CELL, GAP, TITLE, LABEL = 160, 8, 16, 40  # picture layout in pixels: cell side, gap, row title, phrase label


def show_image(spec: str, size: int, seed: int, world: str = "simple") -> Image.Image:
    """--show's image: a shapes test scene index (of the benchmark seed, in the model's world) rendered at the
    model's size, or an image file cropped as eval_transform crops it."""
    if spec.isdigit():
        world = ShapesWorld(size, **WORLDS[world])
        return world.render(world.scene(seed, "test", int(spec)))
    if not os.path.isfile(spec):
        fail(f"--show {spec}: neither a shapes test scene index nor an image file")
    return T.Compose(eval_transform(size).transforms[:-1])(load_image(spec))  # resize and crop, still a picture


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


def show_attention(args, device) -> str:
    """--show: the attention picture of every --ckpt (a row each) for --concepts, written to --out."""
    rows, titles, image = [], [], None
    for path in args.ckpt:
        model, tokenizer, ckpt = load_checkpoint(path, device, args.bpe, args.clip_act)
        tau = checkpoint_tau(args, ckpt)
        picture = show_image(args.show, model.cfg.vision.image_size, args.bench_seed, checkpoint_world(ckpt))
        image = picture if image is None else image  # the first model's copy is drawn; each model reads its own
        rows.append(attention_maps(model, tokenizer, image_to_tensor(picture, model.cfg.vision.normalise), args.concepts, tau, device))
        titles.append(f"{path}  (tau {tau:g})")
    attention_picture(image, rows, args.concepts, titles).save(args.out)
    print(f"wrote {args.out}")
    return args.out


def checkpoint_world(ckpt: dict) -> str:
    """The shapes world the checkpoint was trained in (train.py --world): its benchmark is drawn from it."""
    return (ckpt.get("args") or {}).get("world", "simple")


def checkpoint_tau(args, ckpt: dict) -> float:
    """--tau, else the pooling temperature the checkpoint was trained with, else the paper's 1."""
    return args.tau if args.tau is not None else float((ckpt.get("args") or {}).get("tau", 1.0))


# ----------------------------------------------------------------------------- report


def markdown_table(results: dict[str, dict]) -> str:
    names = list(results)
    metrics = list(next(iter(results.values())))
    lines = ["| metric | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for m in metrics:
        count = next(iter(results.values()))[m]["count"]
        lines.append(f"| {m} | {count} | " + " | ".join(f"{results[n][m]['accuracy']:.3f}" for n in names) + " |")
    return "\n".join(lines)


def bench_dirs(values: list[str], benches: list[str], parser) -> dict[str, str]:
    """--data-dir values, 'DIR' (every benchmark) or 'BENCH=DIR' -> {bench: DIR} for the real benchmarks asked for."""
    named = dict(v.split("=", 1) for v in values if v.split("=", 1)[0] in BENCHES)
    plain = [v for v in values if v.split("=", 1)[0] not in BENCHES]
    if len(plain) > 1:
        parser.error("--data-dir takes one plain DIR; name the others BENCH=DIR")
    dirs = {b: named.get(b, plain[0] if plain else None) for b in benches if b != "shapes"}
    for bench, folder in dirs.items():
        if folder is None:
            parser.error(f"--bench {bench} needs --data-dir DIR (or {bench}=DIR).\n{LAYOUT[bench]}")
    return dirs


def main(argv=None) -> dict | str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=["runs/c2lip/ckpt.pt"], help="checkpoints to compare, a column each")
    p.add_argument("--bench", nargs="+", default=["shapes"], choices=BENCHES, help="benchmarks to run, in one table")
    p.add_argument("--n", type=int, default=1000, help="held-out scenes in the shapes benchmark")
    p.add_argument("--bench-seed", type=int, default=BENCH_SEED, help="seed that draws the shapes benchmark")
    p.add_argument("--data-dir", nargs="+", default=[], metavar="[BENCH=]DIR",
                   help="the real benchmarks' data: one DIR for all, or BENCH=DIR each; sugarcrepe(++): the JSON "
                        "files, zeroshot: the ImageFolder (or CIFAR) root, retrieval: the images' root")  # fmt: skip
    p.add_argument("--images", default=None, help="sugarcrepe, sugarcrepe++: the COCO val2017 folder (default DIR/val2017)")
    p.add_argument("--zeroshot-set", default="imagefolder", choices=["imagefolder", "cifar10", "cifar100"],
                   help="zeroshot: an ImageFolder (ImageNet val ...), or torchvision's CIFAR-10/100 test files in DIR")  # fmt: skip
    p.add_argument("--classnames", default=None, help="zeroshot: class names, one per line, in sorted class-folder order")
    p.add_argument("--templates", default=None, help="zeroshot: prompt templates, one per line, {} for the class name")
    p.add_argument("--ann", default=None, help="retrieval: Karpathy-split JSON list of {image, caption: [...]}")
    p.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes that decode benchmark images")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device string")
    p.add_argument("--json", default=None, help="also write the results, with counts, to this JSON file")
    p.add_argument("--bpe", default=None, metavar="PATH",
                   help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for a --ckpt of CLIP weights "
                        "(default: the copy inside an installed open_clip_torch; our checkpoints carry their tokenizer)")
    p.add_argument("--clip-act", default="quick_gelu", choices=["quick_gelu", "gelu"],
                   help="activation of a --ckpt of CLIP weights: quick_gelu for OpenAI's, gelu for open_clip's own ViT-B-16")
    p.add_argument("--score", nargs="+", default=["plain"], choices=["plain", "pooled"],
                   help="shapes: plain (the paper's global-embedding cosine) and/or pooled (each image pooled by the text "
                        "it is scored against, a diagnostic; its metrics are named pooled/...)")  # fmt: skip
    p.add_argument("--tau", type=float, default=None,
                   help="pooling temperature of --score pooled and --show (default: the checkpoint's training --tau, else 1)")
    p.add_argument("--show", default=None, metavar="IMAGE_OR_INDEX",
                   help="instead of benchmarks, draw where each of --concepts looks in this image (a shapes test scene "
                        "index of --bench-seed, or an image file): the pooling weights over the patches, a row per --ckpt")
    p.add_argument("--concepts", nargs="+", default=None, metavar="PHRASE", help="--show: the phrases to draw")
    p.add_argument("--out", default="attention.png", help="--show: the PNG to write")
    args = p.parse_args(argv)
    if args.tau is not None and args.tau <= 0:
        p.error("--tau must be positive")
    if (args.show is None) != (args.concepts is None):
        p.error("--show and --concepts go together: --show IMAGE_OR_INDEX --concepts PHRASE [PHRASE ...]")
    if "pooled" in args.score and set(args.bench) != {"shapes"}:
        p.error("--score pooled applies to --bench shapes only")
    if args.show is not None:
        return show_attention(args, pick_device(args.device))
    if args.n < 5:
        p.error("--n must be at least 5 (R@5 needs five captions)")
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be at least 1 and --workers at least 0")
    if "retrieval" in args.bench and not args.ann:
        p.error(f"--bench retrieval needs --ann FILE.\n{LAYOUT['retrieval']}")
    args.bench = list(dict.fromkeys(args.bench))
    dirs = bench_dirs(args.data_dir, args.bench, p)
    device = pick_device(args.device)

    data = {}  # every benchmark's files are read and checked before any model runs
    for bench, folder in dirs.items():
        if bench in ("sugarcrepe", "sugarcrepe++"):
            data[bench] = load_sugarcrepe(folder, args.images or os.path.join(folder, "val2017"), bench)
        elif bench == "zeroshot":
            data[bench] = load_zeroshot(folder, args)
        elif bench == "retrieval":
            data[bench] = load_retrieval(folder, args.ann)

    results, shapes, shapes_key = {}, None, None
    for path in tqdm(args.ckpt, desc="checkpoints", disable=len(args.ckpt) == 1):
        model, tokenizer, ckpt = load_checkpoint(path, device, args.bpe, args.clip_act)
        size, normalise = model.cfg.vision.image_size, model.cfg.vision.normalise
        results[path] = {}
        for bench in args.bench:
            if bench == "shapes":
                key = (size, normalise, checkpoint_world(ckpt))  # a benchmark fits the models of one key
                if key != shapes_key:
                    world = ShapesWorld(size, **WORLDS[key[2]])
                    shapes, shapes_key = ShapesBenchmark(world, args.n, args.bench_seed, normalise=normalise), key
                for score in dict.fromkeys(args.score):
                    tau = checkpoint_tau(args, ckpt)
                    results[path] |= evaluate_shapes(model, tokenizer, shapes, device, args.batch_size, score, tau)
            elif bench == "sugarcrepe":
                results[path] |= evaluate_sugarcrepe(model, tokenizer, data[bench], args, device)
            elif bench == "sugarcrepe++":
                results[path] |= evaluate_sugarcrepe_pp(model, tokenizer, data[bench], args, device)
            elif bench == "zeroshot":
                results[path] |= evaluate_zeroshot(model, tokenizer, data[bench], args, device)
            elif bench == "retrieval":
                results[path] |= evaluate_retrieval(model, tokenizer, data[bench], args, device)
    print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": args.bench, "data": dirs, "n": args.n, "bench_seed": args.bench_seed, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
