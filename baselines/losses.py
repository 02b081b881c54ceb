"""What the baselines minimise, and the concept labels of the study's departures: none of it is C2LIP.

  baseline_loss    the loss of `train.py --method siglip | clip | negclip` from the gathered embeddings
  clip_loss        CLIP's softmax (InfoNCE) form, with t = 1/0.07 and no bias           (--method clip)
  negclip_loss     L_sig with hard negatives as extra columns every image must score below (--method negclip)
  concept_labels   z (B, K) of the concept losses under a label rule (--concept-labels):
                     owner   phrase k is positive for its owner image only (the paper's, losses.owner_labels)
                     phrase  ... and for every image owning an identical phrase (`phrase_ids`, a collate
                             extra); in a small world "a large red circle" appears in several images of one
                             batch, and the owner rule makes those false negatives
                     scene   ... and for every image holding an object the phrase describes, by the shapes
                             world's truth (sources/shapes.scene_truth): no false negative is left
  phrase_ids       a collate extra (data.Collate): a stable 64-bit id per normalised phrase

Dimension legend: B images (= captions), K concept phrases, M hard negatives, D joint embedding width.
"""

import hashlib

import torch
import torch.nn.functional as F

from concepts import normalise_phrase
from losses import owner_labels, sig_loss
from sources.shapes import scene_truth

RULE_KEYS = {"owner": (), "phrase": ("phrase_ids",), "scene": ("objects", "phrase_codes")}  # what each rule reads
LABEL_RULES = tuple(RULE_KEYS)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: each image picks its caption among B, and each caption its image."""
    logits = (t * image_emb @ text_emb.T).float()  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def negclip_loss(image_emb, text_emb, negatives, t, b) -> torch.Tensor:
    """L_sig with negatives (M, D), texts that match no image, as M more columns with z = -1 for every image,
    still divided by B: each image is pushed below every negative's threshold, its own caption's included.
        L = -(1/B) [ sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)) + sum_i sum_m log sigmoid(-(t x_i.n_m + b)) ]"""
    return sig_loss(image_emb, torch.cat([text_emb, negatives]), t, b)  # logits (B, B + M)


def baseline_loss(method: str, emb: dict[str, torch.Tensor], t, b) -> tuple[torch.Tensor, dict]:
    """(L, {term: value}) of a baseline: emb holds "image" (B, D), "text" (B, D), and "negatives" (M, D) for
    negclip (train.embed)."""
    if method == "clip":
        loss = clip_loss(emb["image"], emb["text"], t)
        return loss, {"L_clip": loss}
    if method == "negclip":
        loss = negclip_loss(emb["image"], emb["text"], emb["negatives"], t, b)
    else:
        loss = sig_loss(emb["image"], emb["text"], t, b)
    return loss, {"L_sig": loss}


def phrase_id(phrase: str) -> int:
    """A stable signed 64-bit id of the normalised phrase: equal in every process (unlike Python's hash()),
    so that ranks can compare the ids they gather."""
    digest = hashlib.blake2b(normalise_phrase(phrase).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def phrase_ids(samples: list[dict], phrases: list[str], tokenizer) -> dict:
    """Collate extra of --concept-labels phrase: {"phrase_ids": (K,)}."""
    return {"phrase_ids": torch.tensor([phrase_id(p) for p in phrases])}


def concept_labels(rule: str, owner: torch.Tensor, num_images: int, extras: dict) -> torch.Tensor:
    """z (B, K) in {+1, -1} of a label rule (LABEL_RULES), for owner (K,) and the gathered RULE_KEYS of the
    batch: phrase_ids (K,) for "phrase"; phrase_codes (K, 3) and objects (B, O, 3) for "scene"."""
    positive = owner_labels(owner, num_images) > 0  # (B, K)
    if rule == "scene":
        positive = positive | scene_truth(extras["phrase_codes"], extras["objects"])  # the owner too, always
    elif rule == "phrase":
        _, ids = extras["phrase_ids"].unique(return_inverse=True)  # (K,) ids in 0 .. P-1, whatever their range
        has = torch.zeros(num_images, int(ids.max()) + 1, dtype=torch.bool, device=owner.device)  # (B, P)
        has[owner, ids] = True  # image o(k) has phrase id(k)
        positive = has[:, ids]  # (B, K)
    return positive.float() * 2 - 1
