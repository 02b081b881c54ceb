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
  loss_terms          the three in a row: what the training loop calls for a step of one batch
  accumulated_step    the loss and its gradient for a batch of micro-batches, embedded one at a time
                      (train.py --accum-freq): the paper's 768-image batch on fewer GPUs, every negative kept

Dimension legend: B images (= captions), K concept phrases, M hard negatives, N patches, D joint width;
B_r, K_r the images and phrases of this rank's micro-batches together (accumulated_step).
"""

import itertools
from contextlib import nullcontext
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
    patches = objective.method == "c2lip" and bool(objective.pool_weight)  # only L_xac reads the patches
    images, captions = batch["images"], batch["captions"]
    image_emb, patch_emb, text_emb, extra_emb = net(images, captions, batch[extra] if extra else None, patches)
    out = {"image": image_emb, "text": text_emb}
    if objective.method == "negclip":
        out["negatives"] = extra_emb[batch["has_negative"]]  # (M, D): captions no rule applies to have none
    if objective.method == "c2lip":
        out |= {"concept": extra_emb, "owner": batch["owner"], "phrase_ids": batch["phrase_ids"]}
        out |= {k: batch[k] for k in ("objects", "phrase_codes") if k in batch}  # gathered like the rest
        if patches:  # the patches are the largest tensor: kept only when L_xac reads them
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


def accumulated_step(net, micro_batches: list[dict], objective: Objective, dtype: torch.dtype = torch.float32):
    """(L, {term: unweighted value}) of the batch made of the micro-batches (data.Collate batches), and in
    every parameter's .grad the gradient of L: what `loss_terms` on the micro-batches concatenated, then
    backward, would give (tested), while the encoders hold the activations of one micro-batch at a time.
    The values returned are detached; `dtype` is the autocast precision (train.py --precision).

    Why a cache of embeddings, and not the usual sum of micro-batch losses: these losses are not sums over
    examples. Every caption, phrase and hard negative is scored against every image of the batch, so a
    micro-batch of 96 alone gives each caption 95 negatives where the batch of 768 gives 767: a different
    loss, however it is scaled. But L depends on the weights theta only through the embeddings e, so
        dL/dtheta = sum over micro-batches j of  dL/de_j . de_j/dtheta,
    and the first factor needs the embeddings only, not the encoders' activations. Three passes, the
    scheme of open_clip's --accum-freq (which the authors' code forks):
      1. embed every micro-batch without gradients and keep what the losses read: image, caption, phrase
         and patch embeddings, hard negatives; phrase owners offset to index the whole batch's images.
      2. concatenate (and gather across ranks, as loss_terms does), make the cached tensors leaves that
         require grad, compute L of the whole batch and dL/de. t and b enter L directly, not through the
         encoders: their gradient is complete here.
      3. micro-batch by micro-batch, embed again with gradients (the same numbers: the model has no
         dropout) and back-propagate the cached dL/de_j into the encoders; .grad adds up the parts.
    The price is a second forward pass of every micro-batch (bench/accumulation.py measures it).

    Memory: the cache holds B_r x (2 + N) x D values (image, caption, patches) and a row per phrase or
    negative, and their gradient as much again, in the precision autocast produced (bf16 on CUDA, half of
    fp32). The patches dominate: at the paper's size 768 x 196 x 768 = 116M values, 231 MB in bf16 (462 MB
    in fp32), twice that with their gradient. The plain step holds the same embeddings, beside every
    activation of the batch; the cache is what is left of the batch once the activations are gone.

    Under torchrun (net in DistributedDataParallel) each rank caches its own micro-batches and step 2
    gathers them, so rank r's cache receives W * dL/de_r and DDP's average over the W ranks leaves
    dL/dtheta, as in the plain step (devices.gather). DDP averages at the end of every backward; here it
    must do so once per step, so all micro-batches but the last run under net.no_sync() and add up
    locally. The last backward also carries dL/dt and dL/db, as extra roots: DDP expects a gradient for
    every parameter in the backward it synchronises, and the average of the W equal values (every rank
    computed the same global L) is dL/dt itself.
    """
    ddp = isinstance(net, DistributedDataParallel)
    model = net.module if ddp else net
    device = micro_batches[0]["images"].device.type

    def autocast():
        return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    # 1. the cache: every micro-batch's embeddings, without the encoders' activations
    with torch.no_grad(), autocast():
        cache = [embed(net, batch, objective) for batch in micro_batches]
    whole = {name: torch.cat([e[name] for e in cache]) for name in cache[0]}  # "image" (B_r, D), "patch" (B_r, N, D)
    if "owner" in whole:  # micro-batch j's owners index its own images: offset them past the images before it
        images_before = itertools.accumulate([len(e["image"]) for e in cache[:-1]], initial=0)
        whole["owner"] = torch.cat([e["owner"] + first for e, first in zip(cache, images_before)])  # (K_r,)
    names = [name for name, value in whole.items() if value.is_floating_point()]  # not owner, phrase_ids
    for name in names:
        whole[name].requires_grad_()  # leaves: backward stops here, at dL/de

    # 2. the loss of the whole batch (the global batch under torchrun) and its gradient at the embeddings
    with autocast():
        loss, terms = objective_loss(model, gather_embeddings(whole), objective)
    logit = [p for n, p in model.named_parameters() if "logit_" in n and p.requires_grad]  # t and b: read by L
    grads = torch.autograd.grad(loss, [whole[n] for n in names] + logit, allow_unused=True)
    # an embedding no loss term reads (a term of weight 0) has gradient 0; an unused parameter none at all
    cached = {n: torch.zeros_like(whole[n]) if g is None else g for n, g in zip(names, grads)}
    logit_grads = [(p, g) for p, g in zip(logit, grads[len(names) :]) if g is not None]

    # 3. each micro-batch again, with gradients, fed its rows of dL/de
    parts = {n: cached[n].split([len(e[n]) for e in cache]) for n in names}  # micro-batch j's rows: parts[n][j]
    for j, batch in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        with nullcontext() if last or not ddp else net.no_sync():  # DDP averages in the last backward only
            with autocast():
                emb = embed(net, batch, objective)
            tensors, grad_tensors = [emb[n] for n in names], [parts[n][j] for n in names]
            if last:
                tensors += [p for p, _ in logit_grads]
                grad_tensors += [g for _, g in logit_grads]
            torch.autograd.backward(tensors, grad_tensors)
    return loss.detach(), {name: value.detach() for name, value in terms.items()}
