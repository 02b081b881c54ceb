"""The dense shapes world (shapes.WORLDS["dense"], train.py --world dense): colours and shapes repeat within a
scene, and eval.py's benchmark keeps only edits that make a false caption there."""

import random
from collections import Counter

import torch

import eval as evaluate
import train
from evaluation.shapes_benchmark import ShapesBenchmark, evaluate_shapes, false_swap, heldout_negatives, negatives
from run.checkpoint import load_model
from sources.shapes import HOLDOUT_COMBOS, WORLDS, ShapesWorld

DENSE = ShapesWorld(image_size=16, **WORLDS["dense"])


def claimed(text: str) -> Counter:
    """The colour-shape pairs a caption or phrase of the shapes world names."""
    words = text.replace(",", " ").replace(".", " ").split()
    return Counter(
        (a, b)
        for a, b in zip(words, words[1:])
        if b in {"circle", "square", "triangle", "star", "diamond", "hexagon", "pentagon"}
    )


def test_dense_scenes_repeat_colours_and_shapes_but_never_a_pair():
    scenes = [DENSE.scene(0, "train", i) for i in range(500)]
    assert {len(s.objects) for s in scenes} == {3, 4, 5}
    for s in scenes:
        pairs = [(o.colour, o.shape) for o in s.objects]
        assert len(set(pairs)) == len(pairs) and len({o.cell for o in s.objects}) == len(pairs)
    repeated = sum(
        len({o.colour for o in s.objects}) < len(s.objects) or len({o.shape for o in s.objects}) < len(s.objects)
        for s in scenes
    )
    assert repeated > 300  # most scenes: a bag of words no longer pins the binding down
    held = ShapesWorld(holdout=HOLDOUT_COMBOS, **WORLDS["dense"])
    assert not {(o.colour, o.shape) for i in range(300) for o in held.scene(0, "train", i).objects} & set(
        HOLDOUT_COMBOS
    )


def test_every_dense_negative_is_false_of_its_image():
    rng, held_rng, kept = random.Random(0), random.Random(1), Counter()
    for i in range(600):
        scene = DENSE.scene(3, "test", i)
        truth = Counter((o.colour, o.shape) for o in scene.objects)
        for cat, (pos, neg) in (
            negatives(scene, rng) | heldout_negatives(scene, set(HOLDOUT_COMBOS), held_rng)
        ).items():
            kept[cat] += 1
            assert claimed(pos) <= truth
            if cat == "add-att":  # names a wrong size: the pairs stay those of the image
                assert claimed(neg) == truth and neg != pos
            else:  # claims a colour-shape pair the image does not hold (as often)
                assert not claimed(neg) <= truth, (cat, pos, neg)
    assert kept["swap-att"] > 550 and kept["phrase-att"] > 550 and kept["replace-att"] == 600


def test_simple_world_never_redraws_a_swap():
    """Distinct colours and shapes make every swap false, so false_swap keeps the first pair and takes
    nothing from the generator: the simple world's benchmark is the one it always was."""
    world, rng = ShapesWorld(), random.Random(0)
    for i in range(300):
        objs = list(world.scene(0, "test", i).objects)
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                state = rng.getstate()
                assert false_swap(objs, "colour", a, b, rng) == (a, b) and false_swap(objs, "shape", a, b, rng) == (
                    a,
                    b,
                )
                assert rng.getstate() == state


def test_train_and_eval_in_the_dense_world(tmp_path):
    ckpt = train.main(
        ["--world", "dense", "--steps", "2", "--batch-size", "8", "--workers", "0", "--out", str(tmp_path)]
    )
    assert torch.load(ckpt, weights_only=False)["args"]["world"] == "dense"
    results = evaluate.main(["--ckpt", ckpt, "--n", "40"])[ckpt]
    model, tokenizer, _ = load_model(ckpt, torch.device("cpu"))
    expect = evaluate_shapes(
        model, tokenizer, ShapesBenchmark(ShapesWorld(**WORLDS["dense"]), n=40), torch.device("cpu")
    )
    assert results == expect  # eval.py scored it on the dense world's scenes, the one it was trained in
