"""The losses of paper.md, "Losses", as pure functions of embeddings.

  L = L_sig + 1.0 * L_npc + 0.01 * L_xac          (C2LIP; train.py adds them up)

  L_sig  siglip_loss          caption vs image, sigmoid form, one positive per row       (divided by B)
                              (with `negatives`: hard negative texts as extra columns, --method negclip)
  L_npc  concept_loss         phrase vs global image, several positives per image         (divided by K)
  L_xac  pooled_concept_loss  phrase vs the image pooled by that phrase (pool.py)          (divided by K)
  clip_loss                   the softmax (InfoNCE) form, for the CLIP baseline

Every sigmoid loss has the form  -sum log sigmoid(z * (t * cos + b)) / count,  with z = +1 for a
matching pair and -1 otherwise, t = exp(logit_scale) and b = logit_bias shared by all three losses
(train.py --concept-logits own, a departure, gives the two concept losses a pair of their own).

Concept labels (z for phrases): by default phrase k is positive only for its owner image o(k), as in
the authors' code, so an identical phrase owned by another image is a negative. Passing `phrase_ids`
((K,) integer id of each normalised phrase) makes phrase k positive for every image that owns a phrase
with the same id: in a small world "a large red circle" appears in several images of one batch, and
the owner rule turns those into false negatives. This is a departure, off by default.

Multi-GPU: the paper's losses see the global batch (768 images on 8 GPUs): every phrase meets every
image. `gather` concatenates each rank's embeddings before the loss functions run, so the functions
above stay single-device code (see `gather` for why it must carry gradients).

Dimension legend: B images (= captions), K concept phrases, N patches, D joint embedding width.
Inputs are L2-normalised embeddings; `scale` and `bias` are scalar tensors (t and b, not logit_scale).
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from pool import pooled_similarity


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """-sum log sigmoid(labels * logits) / count, for labels in {+1, -1}."""
    # In float32 even under bf16 autocast: a sum of B*K terms needs more than bf16's 8-bit mantissa.
    return -F.logsigmoid(labels * logits.float()).sum() / count


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """L_sig. image_emb (B, D), text_emb (B, D): image i matches caption i and no other.

    negatives (M, D), optional: texts that match no image (the hard negatives of --method negclip). They
    join the batch as M more columns, each with z = -1 for every image, still divided by B:
        L = -(1/B) [ sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)) + sum_i sum_m log sigmoid(-(t x_i.n_m + b)) ]
    so each image is pushed below every negative's threshold, its own caption's negative included."""
    texts = text_emb if negatives is None else torch.cat([text_emb, negatives])  # (B + M, D)
    logits = scale * image_emb @ texts.T + bias  # (B, B + M)
    labels = 2 * torch.eye(*logits.shape, device=logits.device) - 1  # +1 on the diagonal, -1 elsewhere
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
        _, ids = phrase_ids.unique(return_inverse=True)  # (K,) ids in 0 .. P-1, whatever their range
        has = torch.zeros(num_images, int(ids.max()) + 1, dtype=torch.bool, device=owner.device)  # (B, P)
        has[owner, ids] = True  # image o(k) has phrase id(k)
        positive = has[:, ids]  # (B, K)
    return positive.float() * 2 - 1


def concept_loss(image_emb, concept_emb, owner, scale, bias, phrase_ids=None) -> torch.Tensor:
    """L_npc. image_emb x (B, D), concept_emb c (K, D), owner (K,): sigmoid loss on t * x_i.c_k + b."""
    logits = scale * image_emb @ concept_emb.T + bias  # (B, K)
    return sigmoid_loss(logits, concept_labels(owner, len(image_emb), phrase_ids), len(concept_emb))


def pooled_concept_loss(patch_emb, concept_emb, owner, scale, bias, tau=1.0, phrase_ids=None) -> torch.Tensor:
    """L_xac. patch_emb u (B, N, D), concept_emb c (K, D), owner (K,): sigmoid loss on t * v_ik.c_k + b,
    where v_ik is image i pooled by phrase k (pool.py; computed without materialising v)."""
    logits = scale * pooled_similarity(concept_emb, patch_emb, tau).T + bias  # (B, K)
    return sigmoid_loss(logits, concept_labels(owner, len(patch_emb), phrase_ids), len(concept_emb))


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (n_r, ...) from every rank along dim 0 -> (sum_r n_r, ...); ranks may hold different n_r.

    Why the gather must carry gradients: rank r's images are the negatives of every other rank's texts
    and phrases. A plain all_gather returns constants, so the gradient of those terms would never reach
    the encoder that produced them and each rank would learn only from its own slice of the batch.
    torch.distributed.nn's all_gather is differentiable: its backward sends each rank the gradients
    that every rank computed for its rows, summed. Every rank computes the same global loss L, so rank r
    receives W * dL/dx_r; DistributedDataParallel then averages parameter gradients over the W ranks,
    which leaves exactly dL/dtheta, the gradient of one process holding the whole batch (tested).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(n) for n in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])  # all_gather needs equal shapes
    if x.is_floating_point():
        parts = dist_fn.all_gather(padded)
    else:  # integer labels carry no gradient
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def gather_owner(owner: torch.Tensor, num_images: int) -> torch.Tensor:
    """Owners (K_r,) index this rank's images; in the gathered batch they are offset by the images of
    the ranks before it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return owner
    counts = gather(torch.tensor([num_images], device=owner.device))  # (W,)
    return gather(owner + counts[: dist.get_rank()].sum())
