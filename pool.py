"""Parameter-free cross-modal attention pooling (paper Section 3.2, the XAC pooling).

The paper's second fix: a global image embedding mixes every object before the loss sees it, so a
phrase such as "a tiny red circle" is compared with a blend of the whole scene. Instead, let the phrase
c_k attend over the image's patch embeddings u_ij and compare it with that concept-specific view:

    a_ij = softmax_j(u_ij . c_k / tau)          attention of phrase k over the N patches of image i
    v_ik = normalise(sum_j a_ij u_ij)           the image as phrase k sees it

There are no parameters: the phrase is the query and the patches are both keys and values. Every
(phrase, image) pair is computed at once, including phrases of other images (the negatives).

Departure: none in the formula. The authors' code loops over phrases in Python and has no temperature
(tau = 1); this computes all K x B pairs in two einsums and exposes tau. With unit vectors and tau = 1
the logits lie in [-1, 1], so the weights differ by at most e^2 and the pooling is close to a mean;
a smaller tau makes it sharper.

Dimension legend: K concept phrases, B images, N patches per image, D joint embedding width.
"""

import torch
import torch.nn.functional as F


def pooling_weights(concept_emb: torch.Tensor, patch_emb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """concept_emb (K, D), patch_emb (B, N, D) -> a (K, B, N): each row a softmax over the N patches."""
    logits = torch.einsum("kd,bnd->kbn", concept_emb, patch_emb) / tau  # (K, B, N)
    return logits.softmax(dim=-1)


def cross_modal_pool(concept_emb: torch.Tensor, patch_emb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """concept_emb (K, D), patch_emb (B, N, D) -> v (K, B, D), L2-normalised: image i pooled by phrase k."""
    weights = pooling_weights(concept_emb, patch_emb, tau)  # (K, B, N)
    pooled = torch.einsum("kbn,bnd->kbd", weights, patch_emb)  # (K, B, D)
    return F.normalize(pooled, dim=-1)
