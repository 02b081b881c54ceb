"""The losses of docs/paper.md, "The losses", as pure functions of embeddings.

  L = L_sig + 1.0 * L_npc + 0.01 * L_xac          c2lip_loss, the total

  L_sig  sig_loss   caption vs image: one positive per image                          (divided by B)
  L_npc  npc_loss   phrase vs global image: as many positives per image as phrases      (divided by K)
  L_xac  xac_loss   phrase vs the image pooled by that phrase (pool.py)                 (divided by K)

Every term has SigLIP's sigmoid form  -sum log sigmoid(z * (t * cos + b)) / count,  with z = +1 for a
matching pair and -1 otherwise, and t = exp(logit_scale), b = logit_bias shared by the three terms.
Phrase k is positive for its owner image o(k) only (`owner_labels`), as in the authors' code: an
identical phrase owned by another image of the batch is a negative.

Under torchrun these functions see the global batch: train.py gathers every rank's embeddings first
(run/scale.py), so they stay single-device code. The baselines' losses, and the study's other label rules
and logit pair, are in baselines/.

Dimension legend: B images (= captions), K concept phrases, N patches, D joint embedding width.
Inputs are L2-normalised embeddings; t and b are scalar tensors (t = exp(logit_scale), not logit_scale).
"""

import torch
import torch.nn.functional as F

from pool import pooled_similarity


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """-sum log sigmoid(labels * logits) / count, for labels in {+1, -1}."""
    # In float32 even under bf16 autocast: a sum of B*K terms needs more than bf16's 8-bit mantissa.
    return -F.logsigmoid(labels * logits.float()).sum() / count


def sig_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L_sig. image_emb x (B, D), text_emb y (B, D): image i matches caption i and no other."""
    logits = t * image_emb @ text_emb.T + b  # (B, B)
    labels = 2 * torch.eye(*logits.shape, device=logits.device) - 1  # +1 on the diagonal, -1 elsewhere
    return sigmoid_loss(logits, labels, len(logits))


def owner_labels(owner: torch.Tensor, num_images: int) -> torch.Tensor:
    """owner (K,): the image o(k) of each phrase -> z (B, K), +1 where image i owns phrase k, else -1."""
    positive = owner[None, :] == torch.arange(num_images, device=owner.device)[:, None]  # (B, K)
    return positive.float() * 2 - 1


def npc_loss(image_emb, phrase_emb, labels, t, b) -> torch.Tensor:
    """L_npc. image_emb x (B, D), phrase_emb c (K, D), labels z (B, K): sigmoid loss on t * x_i.c_k + b."""
    logits = t * image_emb @ phrase_emb.T + b  # (B, K)
    return sigmoid_loss(logits, labels, len(phrase_emb))


def xac_loss(patch_emb, phrase_emb, labels, t, b, tau: float = 1.0) -> torch.Tensor:
    """L_xac. patch_emb u (B, N, D), phrase_emb c (K, D), labels z (B, K): sigmoid loss on t * s_ik + b, where
    s_ik = v_ik.c_k and v_ik is image i pooled by phrase k (pool.py, computed without materialising v)."""
    logits = t * pooled_similarity(phrase_emb, patch_emb, tau).T + b  # (B, K)
    return sigmoid_loss(logits, labels, len(phrase_emb))


def c2lip_loss(image_emb, text_emb, phrase_emb, patch_emb, owner, t, b, *, npc_weight=1.0, xac_weight=0.01, tau=1.0):
    """L = L_sig + npc_weight * L_npc + xac_weight * L_xac  -> (L, {"L_sig", "L_npc", "L_xac"}).

    image_emb x (B, D), text_emb y (B, D), phrase_emb c (K, D), patch_emb u (B, N, D), owner (K,). The
    paper's weights are 1.0 and 0.01, at tau = 1. A term of weight 0 is not computed (nor returned, and
    patch_emb may then be None). The terms come back unweighted, for the log."""
    labels = owner_labels(owner, len(image_emb))  # (B, K)
    terms = {"L_sig": sig_loss(image_emb, text_emb, t, b)}
    if npc_weight:
        terms["L_npc"] = npc_loss(image_emb, phrase_emb, labels, t, b)
    if xac_weight:
        terms["L_xac"] = xac_loss(patch_emb, phrase_emb, labels, t, b, tau)
    weights = {"L_sig": 1.0, "L_npc": npc_weight, "L_xac": xac_weight}
    return sum(weights[name] * value for name, value in terms.items()), terms
