"""The NegCLIP-style baseline: rule-made hard negatives (baselines/negatives.py), their batch (a data.Collate
extra), the loss with extra negative columns (baselines/losses.negclip_loss) against a naive loop, and
train.py's step with them."""

import math
import os
import random
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

from baselines.losses import negclip_loss
from baselines.negatives import hard_negative, hard_negatives, phrase_slots, slot_words
from data import Collate, WordTokenizer
from fixtures import batch_loss, step_args
from losses import sig_loss
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from sources.shapes import ShapesDataset, ShapesWorld
from test_losses import naive_sigmoid


def slot_texts(caption):
    text, phrases = phrase_slots(caption)
    return [[text[s:e] for s, e in slots] for slots, _ in phrases]


def test_slots_run_from_the_head_noun_leftwards():
    assert slot_texts("a tiny red circle, a large blue star and an orange hexagon.") == [
        ["circle", "red", "tiny"],
        ["star", "blue", "large"],
        ["hexagon", "orange"],
    ]
    assert slot_texts("Two young women sitting at a wooden table") == [["women", "young"], ["table", "wooden"]]
    assert slot_words(["a tiny red circle and a blue star", "a green star"]) == {
        0: ["circle", "star"],
        1: ["blue", "green", "red"],
        2: ["tiny"],
    }


def test_swap_exchanges_the_words_of_one_slot():
    caption = "a tiny red circle and a large blue star"
    seen = {hard_negative(caption, random.Random(seed)) for seed in range(40)}  # no pool: swaps only
    assert seen == {"a tiny blue circle and a large red star", "a large red circle and a tiny blue star"}


def test_replace_takes_an_absent_word_of_the_same_slot_and_fixes_the_article():
    pool = {0: ["circle", "star"], 1: ["orange", "red"]}
    seen = {hard_negative("A red circle.", random.Random(seed), pool) for seed in range(40)}
    assert seen == {"A red star.", "An orange circle."}  # never "A orange", never the caption itself
    swapped = {hard_negative("an orange star and a red circle", random.Random(s)) for s in range(10)}
    assert swapped == {"a red star and an orange circle"}


def test_no_rule_no_negative():
    assert hard_negative("a circle", random.Random(0)) is None  # one phrase, nothing to swap, no pool
    assert hard_negative("a red circle and a red star", random.Random(0)) is None  # the same word in the slot
    assert hard_negative("on the left", random.Random(0), {0: ["dog"]}) is None  # no noun phrase


def test_real_caption_keeps_its_wording():
    neg = hard_negative("A brown dog runs after a red ball.", random.Random(0))
    assert neg == "A red dog runs after a brown ball."


def test_command_line_prints_negatives():
    caption = "a tiny red circle and a large blue star"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a script in a folder runs as a module
    command = [sys.executable, "-m", "baselines.negatives", caption]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root)
    negative = out.stdout.split("negative: ")[1].strip()
    assert negative in {"a tiny blue circle and a large red star", "a large red circle and a tiny blue star"}


def test_shapes_negatives_change_the_binding_and_nothing_else():
    world = ShapesWorld()
    captions = [world.caption(world.scene(5, "train", i)) for i in range(300)]
    pool = slot_words(captions)
    kinds = set()
    for caption in captions:
        neg = hard_negative(caption, random.Random(caption), pool)
        assert neg is not None and neg != caption, caption
        # words without punctuation, 'an' read as 'a' (the article follows the word after it)
        a, b = ([{"an": "a"}.get(w, w) for w in re.findall(r"\w+", text)] for text in (caption, neg))
        assert len(a) == len(b)
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        if sorted(a) == sorted(b):  # a swap: the same bag of words
            kinds.add("swap")
            assert len(changed) == 2
        else:  # a replace: one word, by another of its kind
            kinds.add("replace")
            assert len(changed) == 1, (caption, neg)
            old, new = changed[0]
            assert any(old in words and new in words for words in pool.values()), (old, new)
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", neg), neg
    assert kinds == {"swap", "replace"}


def test_collate_adds_negatives_and_masks_captions_without_one():
    captions = ["a tiny red circle and a large blue star", "a circle", "a green star"]
    tok = WordTokenizer.build(captions, context_length=16)
    samples = [{"image": torch.zeros(3, 8, 8), "caption": c, "phrases": []} for c in captions]
    batch = Collate(tok, [hard_negatives])(samples)
    assert batch["has_negative"].tolist() == [True, True, True]  # "a circle" -> "a star" (slot 0 of the pool)
    pool = slot_words(captions)
    for row, caption in zip(batch["negatives"], captions):
        assert tok.decode(row.tolist()) == hard_negative(caption, random.Random(f"negative:{caption}"), pool)
    lonely = Collate(tok, [hard_negatives])(samples[1:2])  # alone in its batch, "a circle" has no negative
    assert lonely["has_negative"].tolist() == [False] and lonely["negatives"].shape == (1, 2)
    assert "negatives" not in Collate(tok)(samples)  # off unless asked: other methods' batches are unchanged


def test_negclip_loss_with_negative_columns_matches_loop():
    g = torch.Generator().manual_seed(3)
    x, y, n = (F.normalize(torch.randn(k, 8, generator=g), dim=-1) for k in (4, 4, 3))
    t, b = torch.tensor(7.0), torch.tensor(-3.0)
    expect = naive_sigmoid(x @ torch.cat([y, n]).T, lambda i, j: i == j, 7.0, -3.0, len(x))  # divided by B, not B + M
    assert math.isclose(negclip_loss(x, y, n, t, b).item(), expect, rel_tol=1e-5)
    assert math.isclose(negclip_loss(x, y, n[:0], t, b).item(), sig_loss(x, y, t, b).item(), rel_tol=1e-6)


def test_negclip_loss_terms_score_the_batch_negatives():
    world = ShapesWorld(image_size=16)
    dataset = ShapesDataset(world, 0, "train", 6)
    samples = [dataset[i] for i in range(6)]
    tok = WordTokenizer.build([s["caption"] for s in samples], context_length=32)
    batch = Collate(tok, [hard_negatives])(samples)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
        TextConfig(vocab_size=len(tok), context_length=32, width=32, layers=1, heads=2),
        embed_dim=16,
    )
    model = CLIP(cfg)
    _, negclip = batch_loss(model, batch, step_args("negclip"))
    _, siglip = batch_loss(model, batch, step_args("siglip"))
    assert set(negclip) == {"L_sig"}
    x, _ = model.encode_image(batch["images"])
    y, n = model.encode_text(batch["captions"]), model.encode_text(batch["negatives"])[batch["has_negative"]]
    expect = negclip_loss(x, y, n, model.scale(), model.bias())
    torch.testing.assert_close(negclip["L_sig"], expect)
    assert negclip["L_sig"] > siglip["L_sig"]  # the negatives add terms, each positive
    batch["has_negative"][1] = False  # as for a caption no rule applies to: its row is an empty text, never scored
    _, masked = batch_loss(model, batch, step_args("negclip"))
    n = model.encode_text(batch["negatives"])[batch["has_negative"]]  # (5, D)
    torch.testing.assert_close(masked["L_sig"], negclip_loss(x, y, n, model.scale(), model.bias()))
