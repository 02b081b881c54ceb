"""What docs/mechanism.md rests on: the scene label rule (against a naive loop over the scenes' objects), the
training diagnostics (against values worked out by hand), and train.py's --concept-labels scene and --init-scale."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import train
from baselines.losses import concept_labels, phrase_ids
from data import Collate, WordTokenizer
from losses import npc_loss, owner_labels, xac_loss
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from run.diagnostics import batch_diagnostics, label_counts, threshold_fractions
from sources.shapes import SIZES, ShapesDataset, ShapesWorld, phrase_code, scene_truth, truth
from test_losses import naive_sigmoid

FAST = ["--batch-size", "8", "--workers", "0", "--log-every", "1"]


def shapes_batch(n=24, seed=0, world=None):
    """n scenes of the shapes world through Collate, with the scenes themselves and every phrase's text."""
    data = ShapesDataset(world or ShapesWorld(), seed, "train", n)
    samples = [data[i] for i in range(n)]
    tokenizer = WordTokenizer.build([s["caption"] for s in samples], context_length=48)
    phrases = [p for s in samples for p in s["phrases"]]
    return (
        Collate(tokenizer, [truth, phrase_ids])(samples),
        [data.world.scene(seed, "train", i) for i in range(n)],
        phrases,
        tokenizer,
    )


def naive_truth(scenes, phrases) -> list[list[bool]]:
    """[i][k]: scene i holds an object phrase k describes, read from the words and the scene's objects."""
    out = []
    for scene in scenes:
        row = []
        for phrase in phrases:
            words = phrase.split()
            sizes = [w for w in words if w in SIZES]
            row.append(
                any(o.colour in words and o.shape in words and (not sizes or o.size == sizes[0]) for o in scene.objects)
            )
        out.append(row)
    return out


@pytest.mark.parametrize("world", [ShapesWorld(), ShapesWorld(min_objects=3, max_objects=5, repeats=True)])
def test_scene_truth_matches_a_loop_over_the_objects(world):
    batch, scenes, phrases, _ = shapes_batch(world=world)
    assert len(phrases) == len(batch["owner"])  # every caption of this world has phrases
    true = scene_truth(batch["phrase_codes"], batch["objects"])
    assert true.tolist() == naive_truth(scenes, phrases)
    assert true[batch["owner"], torch.arange(len(phrases))].all()  # a phrase is true of its own image
    assert true.sum() > len(phrases)  # and, in a batch of 24, of other images too: the owner rule's false negatives


def test_phrase_code_reads_the_words():
    assert phrase_code("a large red circle") == (0, 0, 0)
    assert phrase_code("a blue star") == (2, 3, -1)
    assert phrase_code("a picture") == (-1, -1, -1)


def test_concept_losses_with_scene_labels_match_the_loop():
    batch, scenes, phrases, _ = shapes_batch()
    B, K = len(scenes), len(phrases)
    g = torch.Generator().manual_seed(1)
    x, c = F.normalize(torch.randn(B, 8, generator=g), dim=-1), F.normalize(torch.randn(K, 8, generator=g), dim=-1)
    u = F.normalize(torch.randn(B, 5, 8, generator=g), dim=-1)
    owner, labels = batch["owner"], concept_labels("scene", batch["owner"], B, batch)
    true = naive_truth(scenes, phrases)
    positive = lambda i, k: true[i][k] or int(owner[k]) == i
    expect = naive_sigmoid(x @ c.T, positive, 7.0, -3.0, K)
    got = npc_loss(x, c, labels, torch.tensor(7.0), torch.tensor(-3.0))
    assert math.isclose(got.item(), expect, rel_tol=1e-5)
    pooled = xac_loss(u, c, labels, torch.tensor(7.0), torch.tensor(-3.0), 0.5)
    assert labels.tolist() == [[1.0 if positive(i, k) else -1.0 for k in range(K)] for i in range(B)]
    assert pooled.item() > 0


def test_threshold_fractions_and_label_counts_by_hand():
    # t = 10, b = -9: a pair is above the threshold iff its cosine is above 0.9
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cosines 1.0 (logit +1) and 0.8 (logit -1)
    c = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])  # owned by 0, 0, 1: cosines 0.8, 1.0, 1.0
    t, b = torch.tensor(10.0), torch.tensor(-9.0)
    got = threshold_fractions(x, y, c, torch.tensor([0, 0, 1]), t, b, t, b)
    assert got == {"above/caption": 0.5, "above/phrase": pytest.approx(2 / 3)}
    labels = owner_labels(torch.tensor([0, 0, 1]), 2)  # the owner rule
    shows = torch.tensor([[True, True, False], [True, False, True]])  # image 1 also shows phrase 0
    assert label_counts(labels, shows) == {"pos/phrase": 1.0, "fn/phrase": pytest.approx(1 / 3)}


def test_batch_diagnostics_count_false_negatives_per_rule():
    batch, scenes, phrases, tokenizer = shapes_batch()
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=32, layers=1, heads=2),
        text=TextConfig(vocab_size=len(tokenizer), context_length=48, width=32, layers=1, heads=2),
        embed_dim=16,
    )
    model = CLIP(cfg)
    true = naive_truth(scenes, phrases)
    owner = batch["owner"].tolist()
    K = len(phrases)
    fn_owner = sum(true[i][k] and owner[k] != i for i in range(len(scenes)) for k in range(K)) / K
    got = batch_diagnostics(model, batch, "owner")
    assert got["pos/phrase"] == 1.0 and got["fn/phrase"] == pytest.approx(fn_owner) and got["fn/phrase"] > 0
    scene = batch_diagnostics(model, batch, "scene")
    assert scene["fn/phrase"] == 0.0 and scene["pos/phrase"] == pytest.approx(sum(map(sum, true)) / K)
    phrase = batch_diagnostics(model, batch, "phrase")
    assert 0 <= phrase["fn/phrase"] < got["fn/phrase"] and 1 <= phrase["pos/phrase"] < scene["pos/phrase"]
    # at t = 10, b = -10 (the initial pair) no pair of unit vectors clears the threshold of 1
    assert got["above/caption"] == got["above/phrase"] == 0.0


def test_train_scene_labels_and_init_scale(tmp_path, capsys):
    base = train.main(["--method", "siglip", "--steps", "2", "--out", str(tmp_path / "base"), *FAST])
    record = json.loads(open(tmp_path / "base" / "log.jsonl").readlines()[-1])
    assert {"above/caption", "above/phrase", "pos/phrase", "fn/phrase"} <= set(record)  # every method logs them
    scene = ["--method", "c2lip", "--concept-labels", "scene", "--init", base, "--init-scale", "100", "--lr", "0"]
    ckpt = train.main([*scene, "--steps", "1", "--out", str(tmp_path / "ft"), *FAST])
    state = torch.load(ckpt, weights_only=False)
    assert state["model"]["logit_scale"].exp().item() == pytest.approx(100.0)
    before = torch.load(base, weights_only=False)["model"]["logit_bias"].item()
    assert state["model"]["logit_bias"].item() != pytest.approx(before)  # refitted at t = 100 (--init-bias auto)
    assert json.loads(open(tmp_path / "ft" / "log.jsonl").readlines()[-1])["fn/phrase"] == 0.0
    for argv, flag in [
        (["--concept-labels", "scene", "--data", "cc3m", "--data-dir", str(tmp_path)], "--concept-labels scene"),
        (["--method", "siglip", "--concept-labels", "scene"], "--concept-labels"),
        (["--init-scale", "50"], "--init-scale"),
    ]:
        with pytest.raises(SystemExit):
            train.get_args(argv)
        assert flag in capsys.readouterr().err
