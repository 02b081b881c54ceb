"""What the sigmoid losses see during training, logged by train.py at the log interval (docs/mechanism.md).

Paper map (docs/paper.md, "The losses"): every loss scores a pair with the logit t * cos + b and a sigmoid, so
a matching pair counts as matched only when t * cos > -b, i.e. when its cosine is above the threshold
-b/t. At SigLIP's start (t = 10, b = -10) the threshold is 1, which no pair of distinct vectors reaches:
every positive stays in the loss's linear regime and is pulled with the same force, however well it
already fits. The released SigLIP weights the paper starts from have t near 112 and a threshold near
0.1. So the first thing to watch is which fraction of the positives is above the threshold:

  above/caption   fraction of matching image-caption pairs with t * x_i.y_i + b > 0
  above/phrase    fraction of (image, own phrase) pairs, k with o(k) = i, above the concept losses'
                  threshold (their own t and b under --concept-logits own); these pairs are positive
                  under every label rule, so the fraction compares across runs and methods

The second is what the concept labels get wrong. The shapes world knows which images truly show a
phrase (sources/shapes.scene_truth: an object of its colour and shape, and size if it says one):

  pos/phrase      mean over phrases of the images labelled positive by the run's label rule
                  (--concept-labels; the owner rule for methods without concept losses)
  fn/phrase       mean over phrases of the images that truly show the phrase but are labelled negative:
                  the false negatives, the only pairs the loss pushes apart for being true

Cost: one forward pass without gradients over the batch, at the log interval only (every 10 steps by
default, ~3% of the training time). A separate pass rather than the loss's own embeddings: it needs
the phrases for every method (the SigLIP baseline never embeds them), and it keeps the training
step as it is. Under torchrun each rank measures its own slice of the batch; rank 0 logs it.

Dimension legend: B images (= captions), K concept phrases, D joint embedding width.
"""

import torch

from baselines.losses import concept_labels
from baselines.objectives import concept_scale_bias


def threshold_fractions(image, text, concept, owner, scale, bias, concept_scale, concept_bias) -> dict:
    """image x (B, D), text y (B, D), concept c (K, D), owner (K,) -> {"above/caption", "above/phrase"}."""
    caption = scale * (image * text).sum(-1) + bias  # (B,) logits of the matching pairs
    phrase = concept_scale * (image[owner] * concept).sum(-1) + concept_bias  # (K,) logits of (o(k), k)
    return {"above/caption": (caption > 0).float().mean().item(), "above/phrase": (phrase > 0).float().mean().item()}


def label_counts(labels: torch.Tensor, truth: torch.Tensor) -> dict:
    """labels (B, K) in {+1, -1}, truth (B, K) bool -> {"pos/phrase", "fn/phrase"}, means over the K phrases."""
    positive = labels > 0
    return {
        "pos/phrase": positive.sum(0).float().mean().item(),
        "fn/phrase": (truth & ~positive).sum(0).float().mean().item(),
    }


@torch.no_grad()
def batch_diagnostics(model, batch: dict, concept_rule: str = "owner") -> dict:
    """The diagnostics above for one batch (data.Collate) under the model's current weights; the label
    counts only where the batch carries the shapes world's truth ("objects", "phrase_codes")."""
    image, _ = model.encode_image(batch["images"])  # (B, D)
    text, phrase = model.encode_text(batch["captions"]), model.encode_text(batch["phrases"])  # (B, D), (K, D)
    owner = batch["owner"]
    out = threshold_fractions(image, text, phrase, owner, model.scale(), model.bias(), *concept_scale_bias(model))
    if "objects" in batch:
        labels = concept_labels(concept_rule, owner, len(image), batch)  # (B, K)
        truth = concept_labels("scene", owner, len(image), batch) > 0  # (B, K): the owner, and the scene's truth
        out |= label_counts(labels, truth)
    return out
