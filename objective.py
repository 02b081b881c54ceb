"""What one training step minimises: the embeddings each method needs, gathered, and their loss.

Paper map (docs/paper.md, "Losses" and "Training setup"): C2LIP embeds the images, their captions and,
as a second batch of short texts through the same text encoder, the concept phrases; its loss
(losses.c2lip_loss) sees the global batch, so under torchrun every rank's embeddings are gathered first
(devices.gather). The baselines need less: the caption loss alone (siglip, clip), or the captions and
one hard negative per caption (negclip).

  Objective           the loss flags of train.py (--method, --concept-weight, --pool-weight, --tau,
                      --concept-labels), so that no caller has to fake an argparse namespace
  embed               one batch through the model -> its embeddings on this rank
  gather_embeddings   every rank's embeddings, concatenated, phrase owners offset to the global batch
  objective_loss      the loss of (gathered) embeddings -> (L, {term: unweighted value})
  loss_terms          the three in a row: what the training loop calls

Dimension legend: B images (= captions), K concept phrases, M hard negatives, N patches, D joint width.
"""

from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from devices import gather, gather_owner
from losses import c2lip_loss, clip_loss, siglip_loss

METHODS = ("c2lip", "siglip", "clip", "negclip")


@dataclass(frozen=True)
class Objective:
    method: str = "c2lip"  # c2lip | siglip | clip (softmax) | negclip (siglip with hard negatives)
    concept_weight: float = 1.0  # weight of L_npc (c2lip)
    pool_weight: float = 0.01  # weight of L_xac (c2lip)
    tau: float = 1.0  # temperature of the cross-modal pooling (c2lip)
    concept_labels: str = "owner"  # owner (the authors') | phrase (identical phrases) | scene (shapes truth)

    @classmethod
    def from_args(cls, args) -> "Objective":
        return cls(args.method, args.concept_weight, args.pool_weight, args.tau, args.concept_labels)


def embed(net, batch: dict, objective: Objective) -> dict[str, torch.Tensor]:
    """batch (data.Collate) -> {"image" (B, D), "text" (B, D)} and what the method adds: "patch" (B, N, D),
    "concept" (K, D), "owner" (K,), "phrase_ids" (K,) for c2lip, with the shapes world's truth "objects"
    (B, O, 3) and "phrase_codes" (K, 3) when the batch has it; "negatives" (M, D) for negclip."""
    # The phrases (c2lip) or the hard negatives (negclip) go through forward as its extra texts:
    # DistributedDataParallel only prepares gradient syncing for what forward computes.
    extra = {"c2lip": "concepts", "negclip": "negatives"}.get(objective.method)
    image_emb, patch_emb, text_emb, extra_emb = net(batch["images"], batch["captions"], batch[extra] if extra else None)
    out = {"image": image_emb, "text": text_emb}
    if objective.method == "negclip":
        out["negatives"] = extra_emb[batch["has_negative"]]  # (M, D): captions no rule applies to have none
    if objective.method == "c2lip":
        out |= {"concept": extra_emb, "owner": batch["owner"], "phrase_ids": batch["phrase_ids"]}
        out |= {k: batch[k] for k in ("objects", "phrase_codes") if k in batch}  # gathered like the rest
        if objective.pool_weight:  # the patches are the largest tensor: kept only when L_xac reads them
            out["patch"] = patch_emb
    return out


def gather_embeddings(emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's embeddings concatenated in rank order; owners index the gathered images."""
    out = {name: gather(value) for name, value in emb.items() if name != "owner"}
    if "owner" in emb:
        out["owner"] = gather_owner(emb["owner"], len(emb["image"]))
    return out


def objective_loss(model, emb: dict[str, torch.Tensor], objective: Objective):
    """(L, {term: unweighted value}) of the embeddings; t and b are read from the model."""
    t, b = model.scale(), model.bias()
    if objective.method == "clip":
        loss = clip_loss(emb["image"], emb["text"], t)
        return loss, {"caption": loss}
    if objective.method != "c2lip":
        loss = siglip_loss(emb["image"], emb["text"], t, b, emb.get("negatives"))
        return loss, {"caption": loss}
    concept_t, concept_b = model.concept_scale_bias()  # t and b again, unless --concept-logits own
    ids = emb["phrase_ids"] if objective.concept_labels == "phrase" else None
    scene = (emb["phrase_codes"], emb["objects"]) if objective.concept_labels == "scene" else None
    return c2lip_loss(
        emb["image"],
        emb["text"],
        emb["concept"],
        emb.get("patch"),
        emb["owner"],
        t,
        b,
        concept_weight=objective.concept_weight,
        pool_weight=objective.pool_weight,
        tau=objective.tau,
        phrase_ids=ids,
        scene=scene,
        concept_scale=concept_t,
        concept_bias=concept_b,
    )


def loss_terms(net, batch: dict, objective: Objective):
    """(L, {term: unweighted value}) of one batch, the global batch under torchrun."""
    model = net.module if isinstance(net, DistributedDataParallel) else net
    return objective_loss(model, gather_embeddings(embed(net, batch, objective)), objective)
