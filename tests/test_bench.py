"""The speed benchmarks time train.py's step: bench/common.py rebuilds it (scripts do not import scripts), and
must give train.py's step's loss and gradients; and a benchmark runs as `python -m bench.NAME`."""

import os
import subprocess
import sys

import pytest
import torch

from bench.common import step_loss
from data import Collate, WordTokenizer
from fixtures import batch_loss, step_args
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from sources.shapes import ShapesDataset, ShapesWorld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["c2lip", "siglip"])
def test_the_benchmarks_step_is_train_py_s(method):
    data = ShapesDataset(ShapesWorld(image_size=16), 0, "train", 6)
    samples = [data[i] for i in range(6)]
    tokenizer = WordTokenizer.build([s["caption"] for s in samples], context_length=32)
    batch = Collate(tokenizer)(samples)
    cfg = CLIPConfig(
        VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
        TextConfig(vocab_size=len(tokenizer), context_length=32, width=32, layers=1, heads=2),
        embed_dim=16,
    )
    results = []
    for loss_of in (lambda m: step_loss(m, batch, method), lambda m: batch_loss(m, batch, step_args(method))):
        torch.manual_seed(0)
        model = CLIP(cfg)
        loss, terms = loss_of(model)
        loss.backward()
        results.append((loss, terms, {n: p.grad for n, p in model.named_parameters()}))
    (loss, terms, grads), (their_loss, their_terms, their_grads) = results
    torch.testing.assert_close(loss, their_loss)
    assert terms.keys() == their_terms.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, their_grads[name], msg=name)


def test_a_benchmark_runs_as_a_module():
    command = [sys.executable, "-m", "bench.pool", "--size", "3", "5", "4", "8", "--repeats", "1", "--skip-memory"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "faster" in out.stdout and "gradient difference" in out.stdout
