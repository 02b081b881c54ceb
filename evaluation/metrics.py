"""Benchmark metrics as pure functions of scores, and embedding in batches.

Paper map (docs/paper.md, "What the paper reports"): every benchmark scores a model by cosine similarity of
L2-normalised embeddings, as the benchmarks' own code does: SugarCrepe (a caption against its hard negative),
SugarCrepe++ (image-to-text and text-only), zero-shot classification (a prompt ensemble) and retrieval (R@K both
ways). Each function below takes scores and returns what is counted, and is tested against values worked out by
hand.

Two rules throughout, so that a broken model never looks good: a wrong candidate that scores at least as
high as the right one counts against the model (a tie is wrong: a model that ignores its input never
scores 50% or 100%), and a non-finite score (NaN or inf, from a diverged model) is wrong wherever it
stands: as the right candidate's score it is a miss, as a wrong candidate's it beats the right one.
(Comparisons with NaN are all False in IEEE arithmetic, which would otherwise count as hits.)

Dimension legend: M benchmark examples, B images, X texts, C classes, P prompt templates, N patches,
D joint embedding width.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import CLIP


def above(right: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """right > wrong, elementwise, and both finite: the one comparison every metric below is made of."""
    return (right > wrong) & right.isfinite() & wrong.isfinite()


def pairwise_correct(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """SugarCrepe's rule. pos, neg (M,): cos(image, caption) and cos(image, negative) -> (M,) bool, correct iff
    pos > neg: a tie is wrong (a model that ignores the text must not score 50% or 100%)."""
    return above(pos, neg)


def itt_correct(i_p1: torch.Tensor, i_p2: torch.Tensor, i_n: torch.Tensor) -> torch.Tensor:
    """SugarCrepe++ image-to-text. cos(I, P1), cos(I, P2), cos(I, N), each (M,) -> (M,) bool: both
    positive captions score above the negative one."""
    return above(i_p1, i_n) & above(i_p2, i_n)


def tot_correct(p1_p2: torch.Tensor, p1_n: torch.Tensor, p2_n: torch.Tensor) -> torch.Tensor:
    """SugarCrepe++ text-only. cos(P1, P2), cos(P1, N), cos(P2, N), each (M,) -> (M,) bool: the two
    positives (same meaning, different words) are closer to each other than either is to the negative."""
    return above(p1_p2, p1_n) & above(p1_p2, p2_n)


def rank_of(right: torch.Tensor, scores: torch.Tensor, wrong: torch.Tensor, dim: int) -> torch.Tensor:
    """How many wrong candidates (where `wrong`) score at least as high as `right` along `dim`: the rank of the
    right candidate, ties against it. A non-finite right score ranks last; a non-finite wrong one counts."""
    beaten = ~above(right, scores) & wrong
    return torch.where(right.isfinite(), beaten.sum(dim=dim, keepdim=True), wrong.shape[dim]).squeeze(dim)


def retrieval_recall(sim: torch.Tensor, text_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """sim (B, X): image i against text j; text_image (X,): the image each text describes (several texts
    may share one). -> {'i2t-R@k': ..., 't2i-R@k': ...}. Image->text: a hit if the image's best caption
    ranks in the top k among all X texts; text->image: a hit if its image ranks in the top k among the B.
    The rank is the number of wrong candidates scoring at least as high, so ties count against the model."""
    own = text_image[None, :] == torch.arange(len(sim), device=sim.device)[:, None]  # (B, X)
    # each image's best caption; NaN ranks above every number in max(), so a NaN caption is the "best" one
    best = sim.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # (B, 1)
    i2t_rank = rank_of(best, sim, ~own, dim=1)  # (B,)
    true = sim[text_image, torch.arange(sim.shape[1], device=sim.device)]  # (X,)
    t2i_rank = rank_of(true[None, :], sim, ~own, dim=0)  # (X,)
    out = {f"i2t-R@{k}": (i2t_rank < k).float().mean().item() for k in ks}
    return out | {f"t2i-R@{k}": (t2i_rank < k).float().mean().item() for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """logits (B, C), labels (B,) -> {k: fraction of images whose class ranks in the top k} (ties against)."""
    other = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)  # (B, C)
    rank = rank_of(logits.gather(1, labels[:, None]), logits, other, dim=1)  # (B,): classes scoring as high
    return {k: (rank < k).float().mean().item() for k in ks}


def zeroshot_classifier(prompt_emb: torch.Tensor) -> torch.Tensor:
    """prompt_emb (C, P, D): every template filled with every class name -> (C, D) class embeddings: each
    prompt embedding normalised, averaged over the templates, re-normalised (CLIP's prompt ensemble)."""
    return F.normalize(F.normalize(prompt_emb, dim=-1).mean(dim=1), dim=-1)


def group_means(per_file: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, dict]:
    """{file: {'accuracy', 'count'}} -> each group's unweighted mean over its files, and 'mean' over all
    files, with the summed counts (SugarCrepe's add / replace / swap averages)."""
    out = {}
    every_file = [name for names in groups.values() for name in names]
    for group, names in [*groups.items(), ("mean", every_file)]:
        out[group] = {
            "accuracy": sum(per_file[n]["accuracy"] for n in names) / len(names),
            "count": sum(per_file[n]["count"] for n in names),
        }
    return out


def fraction(correct: torch.Tensor) -> dict:
    return {"accuracy": correct.float().mean().item(), "count": len(correct)}


@dataclass
class PairScores:
    """Every example of one category of pairs (an image, its true caption, a negative), as it was scored:
    what eval.py --report shows of the failures. `correct` is the rule the accuracy counts."""

    images: list  # per example: a scene index of `source` (the shapes benchmark), or an image file
    true: list[str]
    negative: list[str]
    pos: torch.Tensor  # (M,) score of the true caption
    neg: torch.Tensor  # (M,) score of the negative
    source: object = None  # the ShapesBenchmark the scene indices index; None for image files

    @property
    def correct(self) -> torch.Tensor:
        return pairwise_correct(self.pos, self.neg)  # (M,) bool


# ----------------------------------------------------------------------------- embedding in batches


@torch.no_grad()
def embed_images(model: CLIP, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    out = [
        model.encode_image(images[i : i + batch_size].to(device))[0].float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)  # (B, D)


@torch.no_grad()
def embed_image_tokens(model: CLIP, images: torch.Tensor, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, C, S, S) -> (x (B, D), u (B, N, D)): global and patch embeddings, for text-conditioned scores."""
    out = [model.encode_image(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat([x.float().cpu() for x, _ in out]), torch.cat([u.float().cpu() for _, u in out])


@torch.no_grad()
def embed_texts(
    model: CLIP, tokenizer, texts: list[str], batch_size: int, device, desc: str | None = None
) -> torch.Tensor:
    starts = tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=desc is None)
    out = [model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float().cpu() for i in starts]
    return torch.cat(out)  # (len(texts), D)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of L2-normalised (M, D) embeddings -> (M,)."""
    return (a * b).sum(dim=-1)
