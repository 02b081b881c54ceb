"""The shapes world's compositional-generalisation split: colour-shape pairs held out of training scenes
(sources/shapes.HOLDOUT_COMBOS, train.py --holdout-combos) and the shapes benchmark's held-out categories."""

import re

from data import WordTokenizer
from evaluation.shapes_benchmark import CATEGORIES, ShapesBenchmark
from sources.shapes import HOLDOUT_COMBOS, WORLDS, ShapesWorld

HELD = set(HOLDOUT_COMBOS)


def pairs(scene) -> set:
    return {(o.colour, o.shape) for o in scene.objects}


def test_holdout_keeps_its_pairs_out_of_training_scenes_only():
    plain, held = ShapesWorld(), ShapesWorld(holdout=HOLDOUT_COMBOS)
    seen = set().union(*(pairs(held.scene(0, "train", i)) for i in range(400)))
    assert not seen & HELD and len(seen) == 8 * 7 - len(HELD)  # every other pair still occurs
    for i in range(200):
        assert held.scene(0, "test", i) == plain.scene(0, "test", i)
        scene = plain.scene(0, "train", i)
        if not pairs(scene) & HELD:  # a scene without a held-out pair is drawn exactly as before
            assert held.scene(0, "train", i) == scene
    share = sum(bool(pairs(plain.scene(0, "test", i)) & HELD) for i in range(400)) / 400
    assert 0.25 < share < 0.5


def test_heldout_categories_edit_a_heldout_object_and_leave_the_others_alone():
    world = ShapesWorld(image_size=16)
    bench, plain = ShapesBenchmark(world, n=60), ShapesBenchmark(world, n=60, holdout=())
    for cat in CATEGORIES:
        if not cat.startswith("heldout-"):
            assert bench.pairs[cat] == plain.pairs[cat]  # the held-out pairs draw from their own generator
    assert not plain.pairs["heldout-swap-att"] and not plain.pairs["heldout-replace-att"]
    swaps, replaces = bench.pairs["heldout-swap-att"], bench.pairs["heldout-replace-att"]
    assert 10 < len(swaps) == len(replaces) < 40
    for idx, pos, neg in swaps + replaces:
        scene = bench.scenes[idx]
        assert pos == world.caption(scene) and neg != pos
        gone = [o for o in scene.objects if not re.search(rf"\b{o.phrase()}\b", neg)]  # the edited objects
        assert any((o.colour, o.shape) in HELD for o in gone)
    for _, pos, neg in swaps:  # a swap keeps the bag of words ('an' read as 'a': it follows the colour)
        assert sorted(re.sub(r"\ban\b", "a", pos).split()) == sorted(re.sub(r"\ban\b", "a", neg).split())


def test_no_negative_holds_a_word_that_no_training_caption_holds():
    """The word tokenizer reads an unseen word as <unk>, which alone would tell a negative from its caption:
    in the simple world an object added to a scene of four made "five shapes: ..." (36 of 1,000 add-obj)."""
    for name, kwargs in WORLDS.items():
        world = ShapesWorld(image_size=16, **kwargs)
        seen = {w for i in range(3000) for w in WordTokenizer.split(world.caption(world.scene(0, "train", i)))}
        assert world.words() == seen  # the vocabulary is exactly what training captions hold
        bench = ShapesBenchmark(world, n=300)
        for cat, pairs in bench.pairs.items():
            unseen = {w for _, _, neg in pairs for w in WordTokenizer.split(neg)} - seen
            assert not unseen, (name, cat, unseen)
        four = [i for i, s in enumerate(bench.scenes) if len(s.objects) == world.max_objects and s.template == 5]
        assert four and not {idx for idx, _, _ in bench.pairs["add-obj"]} & set(four)  # "{n} shapes: ...": left out
        assert len(bench.pairs["add-obj"]) == len(bench.scenes) - len(four)
