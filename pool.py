"""Parameter-free cross-modal attention pooling: the view of an image that L_xac reads (docs/paper.md, "The losses").

The paper's second fix: a global image embedding mixes every object before the loss sees it, so a
phrase such as "a tiny red circle" is compared with a blend of the whole scene. Instead, let the phrase
c_k attend over the image's patch embeddings u_ij and compare it with that concept-specific view:

    a_ijk = softmax_j(u_ij . c_k / tau)         attention of phrase k over the N patches of image i
    v_ik  = normalise(sum_j a_ijk u_ij)         the image as phrase k sees it
    s_ik  = v_ik . c_k                          the score the XAC loss reads (losses.py)

There are no parameters: the phrase is the query and the patches are both keys and values. Every
(phrase, image) pair is scored, including phrases of other images (the negatives).

Two forms of the same computation:
  cross_modal_pool   materialises v (K, B, D): the readable definition, used for pictures and tests.
  pooled_similarity  gives s (K, B) without ever building v, which at the paper's global batch
                     (B = 768 images, N = 196 patches, D = 768) and, say, 4 phrases an image (K ~ 3,000)
                     would take 7 GB in fp32.
                     With w_ik = sum_j a_ijk u_ij and G_i = U_i U_i^T the (N, N) Gram matrix of image i:
                         w_ik . c_k = sum_j a_ijk (u_ij . c_k)        (the attention logits, reused)
                         |w_ik|^2   = a_ik^T G_i a_ik
                     The attention logits u_ij . c_k cost K B N D in both forms; what changes is the rest:
                     K B N^2 for the norms instead of K B N D for the weighted sums, and memory (K, B, N)
                     instead of (K, B, D). Phrases are processed in chunks so that (chunk, B, N) stays under
                     `max_elements`; with several chunks, each is recomputed in the backward pass
                     (activation checkpointing), which bounds peak memory by one chunk.

Departures (docs/departures.md): none in the formula. The authors' code loops over phrases in Python and has no
temperature (tau = 1); this scores all K x B pairs at once and exposes tau. It normalises v with F.normalize's
eps (1e-12), theirs with 1e-8. With unit vectors and tau = 1 the logits
lie in [-1, 1], so the weights differ by at most e^2 and the pooling is close to a mean; a smaller tau
makes it sharper.

Dimension legend: K concept phrases, B images, N patches per image, D joint embedding width.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MAX_ELEMENTS = 1 << 25  # (chunk, B, N) floats per intermediate: 128 MB in fp32


def pooling_weights(phrase_emb: torch.Tensor, patch_emb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """phrase_emb (K, D), patch_emb (B, N, D) -> a (K, B, N): each row a softmax over the N patches."""
    logits = torch.einsum("kd,bnd->kbn", phrase_emb, patch_emb) / tau  # (K, B, N)
    return logits.softmax(dim=-1)


def cross_modal_pool(phrase_emb: torch.Tensor, patch_emb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """phrase_emb (K, D), patch_emb (B, N, D) -> v (K, B, D), L2-normalised: image i pooled by phrase k."""
    weights = pooling_weights(phrase_emb, patch_emb, tau)  # (K, B, N)
    pooled = torch.einsum("kbn,bnd->kbd", weights, patch_emb)  # (K, B, D)
    return F.normalize(pooled, dim=-1)


def _similarity_chunk(phrase_emb, patch_emb, gram, tau: float) -> torch.Tensor:
    sim = torch.einsum("kd,bnd->kbn", phrase_emb, patch_emb)  # (k, B, N): u_ij . c_k
    weights = (sim / tau).softmax(dim=-1)  # (k, B, N)
    dot = (weights * sim).sum(-1)  # (k, B): w_ik . c_k
    sq_norm = (torch.einsum("kbn,bnm->kbm", weights, gram) * weights).sum(-1)  # (k, B): |w_ik|^2
    return dot / sq_norm.clamp_min(1e-24).sqrt()  # F.normalize's eps, squared


def pooled_similarity(phrase_emb, patch_emb, tau: float = 1.0, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """phrase_emb (K, D), patch_emb (B, N, D) -> s (K, B) = v_ik . c_k, equal to
    (cross_modal_pool(c, u, tau) * c[:, None]).sum(-1) without building the (K, B, D) tensor."""
    B, N, _ = patch_emb.shape
    gram = patch_emb @ patch_emb.transpose(1, 2)  # (B, N, N): u_ij . u_il
    chunk = max(1, max_elements // (B * N))
    if len(phrase_emb) <= chunk:
        return _similarity_chunk(phrase_emb, patch_emb, gram, tau)
    recompute = torch.is_grad_enabled()
    parts = [
        checkpoint(_similarity_chunk, c, patch_emb, gram, tau, use_reentrant=False)
        if recompute
        else _similarity_chunk(c, patch_emb, gram, tau)
        for c in phrase_emb.split(chunk)
    ]
    return torch.cat(parts)  # (K, B)
