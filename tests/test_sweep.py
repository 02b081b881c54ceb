"""study/sweep.py, the study's one command, end to end on a tiny protocol (2 pretraining steps, 1 fine-tuning step)."""

import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from evaluation.metrics import embed_texts
from evaluation.shapes_benchmark import ShapesBenchmark
from run.checkpoint import load_model
from sources.shapes import ShapesWorld
from study import sweep

TINY = ["--pretrain-steps", "2", "--finetune-steps", "1", "--batch-size", "4", "--n", "12", "--seeds", "0", "1"]


def test_sweep_trains_reports_failures_and_reuses_its_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.ROWS, "broken", (["--method", "c2lip", "--tau", "-1"], "a run that cannot start"))
    argv = [*TINY, "--root", str(tmp_path), "--rows", "pretrained", "siglip", "broken"]
    result = sweep.main(argv)
    rows = result["rows"]
    for name in ("pretrained", "siglip"):  # mean and sample std over the seeds' runs
        runs = rows[name]["runs"]
        assert [r["status"] for r in runs.values()] == ["done", "done"]
        a, b = (runs[seed]["metrics"]["swap-att"] for seed in (0, 1))
        assert rows[name]["mean"]["swap-att"] == pytest.approx((a + b) / 2)
        assert rows[name]["std"]["swap-att"] == pytest.approx(abs(a - b) / 2**0.5)
    pre, fine = (
        [rows[name]["runs"][seed]["metrics"]["i2t-R@1"] for seed in (0, 1)] for name in ("pretrained", "siglip")
    )
    assert rows["pretrained"]["paired"]["mean"]["i2t-R@1"] == pytest.approx((pre[0] - fine[0] + pre[1] - fine[1]) / 2)
    metrics = rows["siglip"]["runs"][1]["metrics"]  # the diagnostics: the end of the training log ...
    with open(tmp_path / "siglip" / "seed1" / "log.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    assert (metrics["L_sig"], metrics["t"], metrics["b"]) == (last["L_sig"], last["scale"], last["bias"])
    assert "L_npc" not in metrics  # ... and the text encoder's binding: caption against swap-att negative
    model, tokenizer, _ = load_model(str(tmp_path / "siglip" / "seed1" / "ckpt.pt"), torch.device("cpu"))
    swaps = ShapesBenchmark(ShapesWorld(), n=12).pairs["swap-att"]
    pos, neg = (embed_texts(model, tokenizer, [p[k] for p in swaps], 256, "cpu") for k in (1, 2))
    assert len(swaps) == 12 and metrics["swap-text-cos"] == pytest.approx(F.cosine_similarity(pos, neg).mean().item())
    finetune = torch.load(tmp_path / "siglip" / "seed0" / "ckpt.pt", weights_only=False)["args"]
    assert finetune["init"] == os.path.join(
        str(tmp_path), "pretrain", "seed0", "ckpt.pt"
    )  # its seed's pretrained model
    assert all(r["status"] == "failed" and "exited with 2" in r["error"] for r in rows["broken"]["runs"].values())
    assert "| broken | 0/2 |" in result["markdown"] and "| siglip | 2/2 |" in result["markdown"]
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["rows"]["siglip"]["mean"] == pytest.approx(rows["siglip"]["mean"], nan_ok=True)

    monkeypatch.setattr(
        sweep.subprocess, "run", lambda *a, **k: pytest.fail("a finished or failed run was trained again")
    )
    again = sweep.main(argv)
    assert again["markdown"] == result["markdown"]
    with pytest.raises(SystemExit, match="delete the folder"):  # the same folders, other flags
        sweep.main([*argv, "--finetune-steps", "2"])


def test_a_run_stopped_by_a_signal_is_resumed_not_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, returncode=-2))
    with pytest.raises(SystemExit, match="run the same command again to resume"):
        sweep.main([*TINY, "--root", str(tmp_path), "--rows", "pretrained"])
    with open(tmp_path / "pretrain" / "seed0" / "run.json") as f:
        assert json.load(f)["status"] == "new"


def test_unknown_row_is_named():
    with pytest.raises(SystemExit):
        sweep.main(["--rows", "c2lip", "nonsense"])


def test_mechanism_study_shares_one_pretraining_and_scores_through_the_pooling(tmp_path):
    argv = [*TINY, "--study", "mechanism", "--root", str(tmp_path), "--rows", "siglip", "c2lip scene"]
    result = sweep.main(argv)
    assert os.listdir(tmp_path / "pretrain") == ["seed0"]  # seeds 0 and 1 fine-tune the pretrained model of seed 0
    for seed in (0, 1):
        args = torch.load(tmp_path / "c2lip_scene" / f"seed{seed}" / "ckpt.pt", weights_only=False)["args"]
        assert args["init"] == os.path.join(str(tmp_path), "pretrain", "seed0", "ckpt.pt") and args["seed"] == seed
        assert args["init_scale"] == 100 and args["concept_labels"] == "scene"
    metrics = result["rows"]["c2lip scene"]["runs"][0]["metrics"]
    assert 0 <= metrics["pooled/phrase-att"] <= 1 and metrics["t"] == pytest.approx(100, rel=1e-3)
    assert metrics["fn/phrase"] == 0 and metrics["pos/phrase"] >= 1  # the scene rule leaves no false negative
    with open(tmp_path / "siglip" / "seed1" / "log.jsonl") as f:
        tail = [json.loads(line) for line in f.readlines()[-sweep.DIAG_TAIL :]]
    siglip = result["rows"]["siglip"]["runs"][1]["metrics"]
    assert siglip["above/caption"] == pytest.approx(sum(r["above/caption"] for r in tail) / len(tail))
    assert (
        "| c2lip scene | 2 | " in result["markdown"] and "siglip's caption loss on fresh scenes" in result["markdown"]
    )
