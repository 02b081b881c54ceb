"""The losses of paper.md, "Losses", as pure functions of embeddings.

  L = L_sig + 1.0 * L_npc + 0.01 * L_xac          (C2LIP; train.py adds them up)

  L_sig  siglip_loss          caption vs image, sigmoid form, one positive per row       (divided by B)
  L_npc  concept_loss         phrase vs global image, several positives per image         (divided by K)
  L_xac  pooled_concept_loss  phrase vs the image pooled by that phrase (pool.py)          (divided by K)
  clip_loss                   the softmax (InfoNCE) form, for the CLIP baseline

Every sigmoid loss has the form  -sum log sigmoid(z * (t * cos + b)) / count,  with z = +1 for a
matching pair and -1 otherwise, t = exp(logit_scale) and b = logit_bias shared by all three losses.

Concept labels (z for phrases): by default phrase k is positive only for its owner image o(k), as in
the authors' code, so an identical phrase owned by another image is a negative. Passing `phrase_ids`
((K,) integer id of each normalised phrase) makes phrase k positive for every image that owns a phrase
with the same id: in a small world "a large red circle" appears in several images of one batch, and
the owner rule turns those into false negatives. This is a departure, off by default.

Dimension legend: B images (= captions), K concept phrases, N patches, D joint embedding width.
Inputs are L2-normalised embeddings; `scale` and `bias` are scalar tensors (t and b, not logit_scale).
"""

import torch
import torch.nn.functional as F

from pool import cross_modal_pool


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """-sum log sigmoid(labels * logits) / count, for labels in {+1, -1}."""
    # In float32 even under bf16 autocast: a sum of B*K terms needs more than bf16's 8-bit mantissa.
    return -F.logsigmoid(labels * logits.float()).sum() / count


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """L_sig. image_emb (B, D), text_emb (B, D): image i matches caption i and no other."""
    logits = scale * image_emb @ text_emb.T + bias  # (B, B)
    labels = 2 * torch.eye(len(logits), device=logits.device) - 1  # +1 on the diagonal, -1 elsewhere
    return sigmoid_loss(logits, labels, len(logits))


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: each image picks its caption among B, and each caption its image."""
    logits = (scale * image_emb @ text_emb.T).float()  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def concept_labels(owner: torch.Tensor, num_images: int, phrase_ids: torch.Tensor | None = None) -> torch.Tensor:
    """z (B, K) in {+1, -1}: +1 where image i owns phrase k (or, with phrase_ids, an identical phrase)."""
    if phrase_ids is None:
        positive = owner[None, :] == torch.arange(num_images, device=owner.device)[:, None]  # (B, K)
    else:
        has = torch.zeros(num_images, int(phrase_ids.max()) + 1, dtype=torch.bool, device=owner.device)  # (B, P)
        has[owner, phrase_ids] = True  # image o(k) has phrase id(k)
        positive = has[:, phrase_ids]  # (B, K)
    return positive.float() * 2 - 1


def concept_loss(image_emb, concept_emb, owner, scale, bias, phrase_ids=None) -> torch.Tensor:
    """L_npc. image_emb x (B, D), concept_emb c (K, D), owner (K,): sigmoid loss on t * x_i.c_k + b."""
    logits = scale * image_emb @ concept_emb.T + bias  # (B, K)
    return sigmoid_loss(logits, concept_labels(owner, len(image_emb), phrase_ids), len(concept_emb))


def pooled_concept_loss(patch_emb, concept_emb, owner, scale, bias, tau=1.0, phrase_ids=None) -> torch.Tensor:
    """L_xac. patch_emb u (B, N, D), concept_emb c (K, D), owner (K,): sigmoid loss on t * v_ik.c_k + b,
    where v_ik is image i pooled by phrase k (pool.py)."""
    pooled = cross_modal_pool(concept_emb, patch_emb, tau)  # (K, B, D)
    cos = (pooled * concept_emb[:, None, :]).sum(-1).T  # (B, K): v_ik . c_k
    logits = scale * cos + bias
    return sigmoid_loss(logits, concept_labels(owner, len(patch_emb), phrase_ids), len(concept_emb))
