"""The shapes benchmark: SugarCrepe's protocol on held-out scenes of the shapes world, with counts.

Paper map (docs/paper.md, "What the paper reports"): the paper reports SugarCrepe (compositionality), zero-shot
classification and retrieval. Here every category is generated exactly from held-out scenes (split "test" of
BENCH_SEED, never seen in training) of the world a checkpoint was trained in:
  compositionality  one image, a true caption and a hard negative that differs in one way; correct iff
                    cos(image, caption) > cos(image, negative) with L2-normalised global embeddings.
                      swap-att     two objects exchange colours     "a red circle and a blue star"
                                                                    -> "a blue circle and a red star"
                      swap-obj     two objects exchange shapes      -> "a red star and a blue circle"
                      replace-att  one colour becomes an absent one -> "a green circle and a blue star"
                      replace-obj  one shape becomes an absent one  -> "a red square and a blue star"
                      add-obj      an absent object is added        -> "... and a pink hexagon"
                      add-att      a wrong size is said for an object whose caption left it out
                      phrase-att   one object's phrase against the same phrase with another object's
                                   colour ("a red circle" vs "a blue circle" when both colours are in the
                                   image): binding at the level of a concept phrase
                      heldout-swap-att, heldout-replace-att
                                   swap-att and replace-att edited at an object whose colour-shape pair
                                   is in shapes.HOLDOUT_COMBOS, on the scenes that hold one (36% of them):
                                   the compositional-generalisation split for runs trained with
                                   `train.py --holdout-combos`, which never saw those pairs together
                    In the dense world an edit that names the same colour-shape pairs again (swapping the
                    colours of two circles) is no negative, and another edit is drawn. A negative holding a
                    word that no training caption holds ("five shapes: ..." for an object added to a scene of
                    four in the simple world) is left out: the word alone would give it away.
  retrieval         image->text and text->image R@1 and R@5 over the held-out scenes (one caption each)
  zero-shot         single-object images classified among every colour-shape pair from prompts such as
                    "a photo of a red circle.", averaged over templates (CLIP's prompt ensemble)
  score="pooled"    the same metrics again (named pooled/...), each image-text score replaced by the
                    text-conditioned one: the image's patches pooled by the text (pool.py), against the
                    text. The authors' code has an unused wrapper with the same idea and another pooling
                    (a near-even mean over the patches the text scores positively). A diagnostic; the paper's claim is
                    about plain scoring (inference unchanged).

Dimension legend: B images, M benchmark examples, X texts, C classes, N patches, D joint embedding width.
"""

import itertools
import random
from collections import Counter
from dataclasses import replace

import torch

from concepts import article
from data import WordTokenizer, image_to_tensor
from evaluation.metrics import (
    PairScores,
    cos,
    embed_image_tokens,
    embed_images,
    embed_texts,
    fraction,
    pairwise_correct,
    retrieval_recall,
    topk_accuracy,
    zeroshot_classifier,
)
from model import CLIP
from pool import pooled_similarity
from sources.shapes import COLOURS, GRID, HOLDOUT_COMBOS, SHAPES, SIZES, Obj, Scene, ShapesWorld

BENCH_SEED = 1234  # the held-out scenes: split "test" of this seed, never seen in training
CATEGORIES = [
    "swap-att",
    "swap-obj",
    "replace-att",
    "replace-obj",
    "add-obj",
    "add-att",
    "phrase-att",
    "heldout-swap-att",
    "heldout-replace-att",
]
TEMPLATES = ["a photo of {}.", "{}.", "there is {}.", "an image showing {}."]


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
    good = [
        (a, b)
        for a, b in itertools.combinations(range(len(objs)), 2)
        if pairs_of(swapped(objs, field, a, b)) != pairs_of(objs)
    ]
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
    wrong = [
        (a, b)
        for a, b in itertools.permutations(range(len(objs)), 2)
        if (objs[b].colour, objs[a].shape) not in pairs_of(objs)
    ]
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
    out = {
        "heldout-replace-att": (caption(scene), caption(scene, edited(objs, {i: {"colour": rng.choice(free_colours)}})))
    }
    if pairs_of(swapped(objs, "colour", i, j)) == pairs_of(objs):  # the same claim (dense world): another partner
        others = [k for k in range(len(objs)) if k != i and pairs_of(swapped(objs, "colour", i, k)) != pairs_of(objs)]
        if not others:
            return out
        j = rng.choice(others)
    return {"heldout-swap-att": (caption(scene), caption(scene, swapped(objs, "colour", i, j)))} | out


class ShapesBenchmark:
    """Everything the shapes benchmark scores, generated once from (world, n, seed)."""

    def __init__(
        self,
        world: ShapesWorld,
        n: int = 1000,
        seed: int = BENCH_SEED,
        per_class: int = 4,
        normalise: str = "symmetric",
        holdout=HOLDOUT_COMBOS,
    ):
        rng, held_rng, holdout = random.Random(seed), random.Random(f"heldout:{seed}"), set(map(tuple, holdout))
        self.normalise = normalise  # the pixel normalisation of the models this benchmark can score
        self.world = world  # renders scene i as the model saw it (eval.py --report's pictures)
        self.scenes = [world.scene(seed, "test", i) for i in range(n)]
        self.images = torch.stack([image_to_tensor(world.render(s), normalise) for s in self.scenes])  # (B, C, S, S)
        self.captions = [world.caption(s) for s in self.scenes]
        self.pairs = {c: [] for c in CATEGORIES}  # category -> [(scene index, true text, negative text)]
        words = world.words()
        for idx, scene in enumerate(self.scenes):
            # the held-out pairs draw from their own generator: the other categories stay as they were
            for cat, (pos, neg) in (negatives(scene, rng) | heldout_negatives(scene, holdout, held_rng)).items():
                # A word no training caption holds gives the negative away ("five shapes: ..." when an object
                # is added to a scene of the most objects): the scene admits no negative of that category.
                if set(WordTokenizer.split(neg)) <= words:
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


def paired_pooled_cos(text_emb: torch.Tensor, patch_emb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """text_emb (M, D), patch_emb (M, N, D) -> (M,): text m against image m pooled by text m, i.e. the
    diagonal of pool.pooled_similarity, computed pair by pair (vmap) instead of for all M x M pairs."""
    return torch.vmap(lambda c, u: pooled_similarity(c[None], u[None], tau)[0, 0])(text_emb, patch_emb)


def evaluate_shapes(
    model: CLIP,
    tokenizer,
    bench: ShapesBenchmark,
    device,
    batch_size: int = 256,
    score: str = "plain",
    tau: float = 1.0,
    records: dict | None = None,
) -> dict:
    """Every category, retrieval and zero-shot on the shapes benchmark. score="plain" (the paper's, the
    default): cos(x_i, y) of the global image embedding, inference unchanged. score="pooled" (a diagnostic,
    not the paper's): every image-text score, in every metric, becomes
    v . y with v the image's patches pooled by that text (pool.py at `tau`); metrics are named pooled/...
    `records`, when given, receives each category's examples with their scores ({metric: PairScores})."""
    pooled = score == "pooled"
    prefix = "pooled/" if pooled else ""
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
        pos_score, neg_score = paired(idx, pos), paired(idx, neg)  # (M,), (M,)
        results[cat] = fraction(pairwise_correct(pos_score, neg_score))
        if records is not None:  # eval.py --report: which examples were wrong, and by how much
            scenes, true, negative = (list(column) for column in zip(*pairs))
            records[prefix + cat] = PairScores(scenes, true, negative, pos_score, neg_score, bench)
    caption_emb = embed_texts(model, tokenizer, bench.captions, batch_size, device)  # (B, D)
    sim = table(image_emb, patch_emb, caption_emb)  # (B, B): image i, caption j
    for metric, value in retrieval_recall(sim, torch.arange(len(sim)), ks=(1, 5)).items():
        results[metric] = {"accuracy": value, "count": len(sim)}
    # zero-shot: single-object images, classes = every colour-shape pair, prompts averaged over TEMPLATES
    articled = [f"{article(n)} {n}" for n in bench.classes]
    prompts = embed_texts(model, tokenizer, [t.format(a) for a in articled for t in TEMPLATES], batch_size, device)
    classifier = zeroshot_classifier(prompts.view(len(articled), len(TEMPLATES), -1))  # (C, D)
    if pooled:
        logits = table(*embed_image_tokens(model, bench.single_images, batch_size, device), classifier)  # (B, C)
    else:
        logits = table(embed_images(model, bench.single_images, batch_size, device), None, classifier)  # (B, C)
    for k, value in topk_accuracy(logits, bench.labels, (1, 5)).items():
        results[f"zeroshot-top{k}"] = {"accuracy": value, "count": len(logits)}
    return {prefix + k: v for k, v in results.items()}


def checkpoint_world(ckpt: dict) -> str:
    """The shapes world the checkpoint was trained in (train.py --world): its benchmark is drawn from it."""
    return (ckpt.get("args") or {}).get("world", "simple")
