"""train.py and eval.py end to end, a few steps on CPU."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval as evaluate
import train
from baselines.objectives import ConceptLogitsCLIP
from data import Collate
from evaluation.shapes_benchmark import ShapesBenchmark, evaluate_shapes
from fixtures import batch_loss, crash_after_first_checkpoint, step_args
from run.checkpoint import checkpoint_parts, load_model
from sources.shapes import ShapesDataset, ShapesWorld

FAST = ["--batch-size", "8", "--workers", "0", "--log-every", "1"]


@pytest.mark.parametrize("method", ["c2lip", "siglip", "clip", "negclip"])
def test_train_writes_checkpoint_and_log(tmp_path, method):
    ckpt = train.main(["--method", method, "--steps", "3", "--out", str(tmp_path), *FAST])
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 3 and state["args"]["method"] == method and state["tokenizer"]["vocab"][0] == "<pad>"
    assert state["command"] == f"python train.py --method {method} --steps 3 --out {tmp_path} " + " ".join(FAST)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    # t after one step at lr 5e-4 (warm-up): still CLIP's 1/0.07 for its softmax loss, SigLIP's 10 for the others
    assert records[0]["scale"] == pytest.approx(1 / 0.07 if method == "clip" else 10.0, rel=0.01)
    terms = {
        "c2lip": {"L_sig", "L_npc", "L_xac"},
        "siglip": {"L_sig"},
        "clip": {"L_clip"},
        "negclip": {"L_sig"},
    }[method]
    assert terms <= set(records[-1]) and not ({"L_sig", "L_npc", "L_xac", "L_clip"} - terms) & set(records[-1])
    assert ("logit_bias" in state["model"]) == (method != "clip")  # CLIP's softmax form has no bias
    assert Image.open(tmp_path / "loss.png").size == (640, 400)  # the loss curve beside the log


def test_train_with_heldout_pairs(tmp_path):
    state = torch.load(
        train.main(["--holdout-combos", "--steps", "1", "--out", str(tmp_path), *FAST]), weights_only=False
    )
    assert state["args"]["holdout_combos"] is True


def test_resume_replays_the_uninterrupted_run(tmp_path, monkeypatch):
    common = ["--steps", "4", "--precision", "fp32", "--ckpt-every", "2", *FAST]
    straight = torch.load(train.main([*common, "--out", str(tmp_path / "a")]), weights_only=False)

    crash_after_first_checkpoint(monkeypatch, [*common, "--out", str(tmp_path / "b")])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 2
    resumed = torch.load(train.main([*common, "--out", str(tmp_path / "b"), "--resume"]), weights_only=False)
    assert resumed["step"] == 4
    for k, v in straight["model"].items():
        torch.testing.assert_close(v, resumed["model"][k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_eval_compares_checkpoints_and_writes_json(tmp_path):
    a = train.main(["--method", "siglip", "--steps", "2", "--out", str(tmp_path / "a"), *FAST])
    b = train.main(["--method", "c2lip", "--steps", "2", "--out", str(tmp_path / "b"), *FAST])
    out = tmp_path / "r.json"
    results = evaluate.main(["--ckpt", a, b, "--n", "40", "--json", str(out)])
    saved = json.load(open(out))["results"]
    assert set(saved) == {a, b} and saved == results
    bench = ShapesBenchmark(ShapesWorld(), n=40)
    for ckpt in (a, b):  # each column is its checkpoint's scores on the same 40 held-out scenes
        model, tokenizer, _ = load_model(ckpt, torch.device("cpu"))
        assert results[ckpt] == evaluate_shapes(model, tokenizer, bench, torch.device("cpu"))
    assert saved[a]["swap-att"]["count"] == 40 and saved[a]["zeroshot-top1"]["count"] == 56 * 4
    assert 0 < saved[a]["add-att"]["count"] < 40


def test_cli_errors_name_the_flag(tmp_path):
    bad = subprocess.run([sys.executable, train.__file__, "--steps", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps" in bad.stderr
    bad = subprocess.run([sys.executable, train.__file__, "--method", "negclap"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--method" in bad.stderr
    bad = subprocess.run(
        [sys.executable, train.__file__, "--holdout-combos", "--data", "wds", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--holdout-combos" in bad.stderr
    missing = subprocess.run(
        [sys.executable, evaluate.__file__, "--ckpt", str(tmp_path / "none.pt")], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "python train.py" in missing.stderr


def test_concept_losses_with_their_own_logit_scale_and_bias(tmp_path):
    """--concept-logits own: a second (t, b) pair that only the concept losses use; it sits in the logit
    parameter group (--logit-lr 0 freezes both pairs while the encoders learn), is logged and saved, and a
    fine-tune from weights without it starts it fresh at t = 10, b = -10."""
    base = train.main(["--method", "siglip", "--steps", "2", "--out", str(tmp_path / "base"), *FAST])
    own = train.main(
        [
            "--method",
            "c2lip",
            "--concept-logits",
            "own",
            "--init",
            base,
            "--logit-lr",
            "0",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "own"),
            *FAST,
        ]
    )
    before, after = torch.load(base, weights_only=False)["model"], torch.load(own, weights_only=False)["model"]
    assert (
        after["concept_logit_scale"].exp().item() == pytest.approx(10.0) and after["concept_logit_bias"].item() == -10.0
    )
    assert torch.equal(after["logit_bias"], before["logit_bias"]) and torch.equal(
        after["logit_scale"], before["logit_scale"]
    )
    assert not torch.equal(after["text.proj"], before["text.proj"])
    record = json.loads(open(tmp_path / "own" / "log.jsonl").readlines()[-1])
    assert record["concept_scale"] == pytest.approx(10.0) and record["concept_bias"] == -10.0

    state = torch.load(own, weights_only=True)
    cfg, tokenizer = checkpoint_parts(state)
    model = ConceptLogitsCLIP(cfg)
    model.load_state_dict(state["model"])
    _, _, evaluated = load_model(own, torch.device("cpu"))  # eval.py reads it too: the pair is training's only
    assert "concept_logit_scale" in evaluated["model"]
    scenes = ShapesDataset(ShapesWorld(), 0, "train", 4)
    args = step_args("c2lip", "--concept-logits", "own")
    _, terms = batch_loss(model, Collate(tokenizer)([scenes[i] for i in range(4)]), args)
    terms["L_sig"].backward(retain_graph=True)
    assert (
        model.concept_logit_scale.grad is None and model.logit_scale.grad is not None
    )  # the caption loss keeps to its pair
    model.zero_grad()
    terms["L_npc"].backward()
    assert model.concept_logit_scale.grad is not None and model.logit_scale.grad is None

    shared = train.main(["--method", "c2lip", "--init", own, "--steps", "1", "--out", str(tmp_path / "shared"), *FAST])
    assert "concept_logit_scale" not in torch.load(shared, weights_only=False)["model"]
    with pytest.raises(SystemExit):
        train.get_args(["--method", "siglip", "--concept-logits", "own"])


def test_a_run_ends_by_saying_where_its_files_are_and_how_to_evaluate(tmp_path, capsys):
    ckpt = train.main(["--steps", "1", "--out", str(tmp_path), *FAST])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    for name in ("ckpt.pt", "log.jsonl", "loss.png"):
        assert str(tmp_path / name) in last and (tmp_path / name).exists()
    assert last.endswith(f"python eval.py --ckpt {ckpt}")


def test_the_default_schedule_is_the_short_one_and_the_flags_still_reach_the_long_one():
    args = train.get_args([])
    assert (args.steps, args.batch_size, args.out) == (200, 64, "runs/c2lip")  # the README's first block
    assert (train.get_args(["--steps", "600", "--batch-size", "128"]).steps, args.lr) == (600, 5e-4)
