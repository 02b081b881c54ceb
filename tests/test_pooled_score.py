"""eval.py's text-conditioned (pooled) scoring of the shapes benchmark, --score pooled."""

import re

import pytest
import torch
import torch.nn.functional as F

import eval as evaluate
from data import pad_batch
from evaluation import shapes_benchmark
from evaluation.shapes_benchmark import CATEGORIES, ShapesBenchmark
from fixtures import write_checkpoint
from pool import pooled_similarity
from run.checkpoint import load_model
from sources.shapes import ShapesWorld


def test_paired_pooled_cos_is_the_diagonal_of_pooled_similarity():
    torch.manual_seed(0)
    c, u = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 6, 8), dim=-1)
    for tau in (1.0, 0.1):
        torch.testing.assert_close(
            shapes_benchmark.paired_pooled_cos(c, u, tau), pooled_similarity(c, u, tau).diagonal()
        )


class PatchOnlyModel:
    """Stands in for CLIP: the global image embedding is zero (every plain score is 0, a tie, and ties count
    as wrong), while the patches carry the pixels (a fixed random projection); texts embed as sums of word
    vectors."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.proj, self.words = torch.randn(3 * 8 * 8, 16, generator=g), torch.randn(500, 16, generator=g)

    def encode_image(self, images):
        patches = (
            images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        )  # (B, N, 192)
        return torch.zeros(len(images), 16), F.normalize(patches @ self.proj, dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.words[tokens].sum(1), dim=-1)


def test_pooled_scoring_reads_the_patches():
    vocab = {}
    tokenizer = lambda texts: pad_batch(
        [[vocab.setdefault(w, len(vocab) + 1) for w in re.findall(r"\w+", t)] for t in texts]
    )  # noqa: E731
    bench = ShapesBenchmark(ShapesWorld(image_size=16), n=30, per_class=1)
    plain = shapes_benchmark.evaluate_shapes(PatchOnlyModel(), tokenizer, bench, "cpu", 64)
    pooled = shapes_benchmark.evaluate_shapes(PatchOnlyModel(), tokenizer, bench, "cpu", 64, "pooled", 0.1)
    assert set(pooled) == {f"pooled/{k}" for k in plain}
    assert all(v["accuracy"] == 0 for v in plain.values())  # every score ties, and ties are wrong
    assert sum(pooled[f"pooled/{k}"]["accuracy"] for k in CATEGORIES) / len(CATEGORIES) > 0.2
    assert pooled["pooled/i2t-R@5"]["accuracy"] > 0


def test_eval_score_flag(tmp_path):
    ckpt = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"), image_size=16)
    results = evaluate.main(
        ["--ckpt", ckpt, "--n", "30", "--score", "plain", "pooled", "--tau", "0.5", "--device", "cpu"]
    )[ckpt]
    model, tokenizer, _ = load_model(ckpt, torch.device("cpu"))
    bench = ShapesBenchmark(ShapesWorld(16), n=30)
    plain = shapes_benchmark.evaluate_shapes(model, tokenizer, bench, torch.device("cpu"))
    pooled = shapes_benchmark.evaluate_shapes(model, tokenizer, bench, torch.device("cpu"), score="pooled", tau=0.5)
    assert results == plain | pooled  # both scorings, the pooled one at --tau 0.5, in one column
    assert plain["heldout-swap-att"]["count"] == pooled["pooled/heldout-swap-att"]["count"] > 0
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--ckpt", ckpt, "--score", "pooled", "--bench", "zeroshot", "--data-dir", str(tmp_path)])
    assert err.value.code == 2
