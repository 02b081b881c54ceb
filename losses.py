"""The losses of docs/paper.md, "Losses", as pure functions of embeddings.

  L = L_sig + 1.0 * L_npc + 0.01 * L_xac          c2lip_loss, the total

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
Passing `scene` (the shapes world's truth, shapes.object_codes) makes phrase k positive for every image
holding an object the phrase describes: its colour and shape, and its size when the phrase says one
("a red circle" is true of an image with a large red circle). No false negative is left; only the
synthetic world knows this truth, so it is a diagnostic rule (train.py --concept-labels scene).

Multi-GPU: the paper's losses see the global batch (768 images on 8 GPUs): every phrase meets every
image. objective.py gathers each rank's embeddings (devices.gather) before these functions run, so they
stay single-device code.

Dimension legend: B images (= captions), K concept phrases, N patches, D joint embedding width.
Inputs are L2-normalised embeddings; `scale` and `bias` are scalar tensors (t and b, not logit_scale).
"""

import torch
import torch.nn.functional as F

from pool import pooled_similarity


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """-sum log sigmoid(labels * logits) / count, for labels in {+1, -1}."""
    # In float32 even under bf16 autocast: a sum of B*K terms needs more than bf16's 8-bit mantissa.
    return -F.logsigmoid(labels * logits.float()).sum() / count


def siglip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
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


def scene_truth(phrase_codes: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: image i holds an object that phrase k describes. phrase_codes (K, 3) and objects (B, O, 3)
    hold (colour, shape, size) indices, -1 for a word the phrase does not say or an empty object slot; a
    phrase without a colour or a shape word describes no object here."""
    obj, code = objects[:, :, None, :], phrase_codes[None, None, :, :]  # (B, O, 1, 3), (1, 1, K, 3)
    same = obj == code  # (B, O, K, 3)
    fits = same[..., 0] & same[..., 1] & (same[..., 2] | (code[..., 2] < 0))  # (B, O, K): size only if said
    return fits.any(dim=1) & (phrase_codes[:, 0] >= 0) & (phrase_codes[:, 1] >= 0)  # (B, K)


def concept_labels(
    owner: torch.Tensor,
    num_images: int,
    phrase_ids: torch.Tensor | None = None,
    scene: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """z (B, K) in {+1, -1}: +1 where image i owns phrase k (or, with phrase_ids, an identical phrase; or,
    with scene = (phrase_codes (K, 3), objects (B, O, 3)), holds an object that phrase k describes)."""
    positive = owner[None, :] == torch.arange(num_images, device=owner.device)[:, None]  # (B, K)
    if scene is not None:
        positive = positive | scene_truth(*scene)  # the owner too, whatever NLTK made of its phrase
    elif phrase_ids is not None:
        _, ids = phrase_ids.unique(return_inverse=True)  # (K,) ids in 0 .. P-1, whatever their range
        has = torch.zeros(num_images, int(ids.max()) + 1, dtype=torch.bool, device=owner.device)  # (B, P)
        has[owner, ids] = True  # image o(k) has phrase id(k)
        positive = has[:, ids]  # (B, K)
    return positive.float() * 2 - 1


def concept_loss(image_emb, concept_emb, owner, scale, bias, phrase_ids=None, scene=None) -> torch.Tensor:
    """L_npc. image_emb x (B, D), concept_emb c (K, D), owner (K,): sigmoid loss on t * x_i.c_k + b."""
    logits = scale * image_emb @ concept_emb.T + bias  # (B, K)
    return sigmoid_loss(logits, concept_labels(owner, len(image_emb), phrase_ids, scene), len(concept_emb))


def pooled_concept_loss(
    patch_emb, concept_emb, owner, scale, bias, tau=1.0, phrase_ids=None, scene=None
) -> torch.Tensor:
    """L_xac. patch_emb u (B, N, D), concept_emb c (K, D), owner (K,): sigmoid loss on t * v_ik.c_k + b,
    where v_ik is image i pooled by phrase k (pool.py; computed without materialising v)."""
    logits = scale * pooled_similarity(concept_emb, patch_emb, tau).T + bias  # (B, K)
    return sigmoid_loss(logits, concept_labels(owner, len(patch_emb), phrase_ids, scene), len(concept_emb))


def c2lip_loss(
    image_emb,
    text_emb,
    concept_emb,
    patch_emb,
    owner,
    scale,
    bias,
    *,
    concept_weight=1.0,
    pool_weight=0.01,
    tau=1.0,
    phrase_ids=None,
    scene=None,
    concept_scale=None,
    concept_bias=None,
):
    """L = L_sig + concept_weight * L_npc + pool_weight * L_xac  -> (L, {"caption", "concept", "pooled"}).

    image_emb x (B, D), text_emb y (B, D), concept_emb c (K, D), patch_emb u (B, N, D), owner (K,). The
    paper's weights are 1.0 and 0.01, at tau = 1. A term of weight 0 is not computed (and not returned).
    concept_scale and concept_bias: the concept losses' own t and b (train.py --concept-logits own, a
    departure); by default they share the caption loss's, as in the paper. The terms are returned
    unweighted, for the log. phrase_ids and scene choose the concept labels (concept_labels)."""
    t, b = (scale, bias) if concept_scale is None else (concept_scale, concept_bias)
    terms = {"caption": siglip_loss(image_emb, text_emb, scale, bias)}
    if concept_weight:
        terms["concept"] = concept_loss(image_emb, concept_emb, owner, t, b, phrase_ids, scene)
    if pool_weight:
        terms["pooled"] = pooled_concept_loss(patch_emb, concept_emb, owner, t, b, tau, phrase_ids, scene)
    weights = {"caption": 1.0, "concept": concept_weight, "pooled": pool_weight}
    return sum(weights[name] * value for name, value in terms.items()), terms
