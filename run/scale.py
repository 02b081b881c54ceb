"""What it takes to train at the paper's scale: the global batch gathered across GPUs, and gradient
accumulation (train.py --accum-freq), which gives the paper's 768-image batch on fewer GPUs.

Paper map (docs/paper.md, "The paper's training recipe"): the paper trains on 8 GPUs and its losses see
the global batch: image tokens and phrases are all-gathered across GPUs. `gather` does that, with
gradients; `gather_embeddings` gathers a rank's embeddings and offsets its phrase owners; `gathered` wraps a
loss so that it reads them. On one process none of this runs. Departures (docs/departures.md): the gather
carries gradients (theirs does not: see `gather`); the authors' L_npc scores each GPU's own images against the
gathered phrases (labelled by global owner, an index past this GPU's images on every GPU but the first), here
every phrase meets every image; accumulated micro-batches offset their phrase owners (theirs are not).

Dimension legend: n_r rows held by rank r of W ranks; B_r, K_r the images and phrases of this rank's
micro-batches together (accumulated_step); N patches, D joint width.
"""

import itertools
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch.nn.parallel import DistributedDataParallel

from run.devices import rank_and_world


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (n_r, ...) from every rank along dim 0 -> (sum_r n_r, ...); ranks may hold different n_r.

    Every rank computes the same global loss L. torch.distributed.nn's all_gather is differentiable: its backward
    sends each rank the gradients every rank computed for its rows, summed, so rank r receives W * dL/dx_r, and
    DistributedDataParallel's average over the W ranks leaves exactly dL/dtheta, the gradient of one process
    holding the whole batch (tests/test_distributed.py). open_clip's default, which the authors' C2LIP_Loss
    uses, gathers without autograd and puts the rank's own rows back in place: those rows still carry dL/dx_r
    to the encoders, but only once, so after the average every encoder weight gets dL/dtheta / W, while t and b,
    which every rank reads whole, get dL/dt and dL/db (tested too). AdamW divides each weight's gradient by its
    own running magnitude, so a constant 1/W changes its update only against eps; clipped or plain SGD, it would.
    """
    if rank_and_world()[1] == 1:
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
    rank, world = rank_and_world()
    if world == 1:
        return owner
    counts = gather(torch.tensor([num_images], device=owner.device))  # (W,)
    return gather(owner + counts[:rank].sum())


def gather_embeddings(emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's embeddings concatenated in rank order; owners index the gathered images."""
    out = {name: gather(value) for name, value in emb.items() if name != "owner"}
    if "owner" in emb:
        out["owner"] = gather_owner(emb["owner"], len(emb["image"]))
    return out


def gathered(loss_of):
    """loss_of(model, emb, args), but of every rank's embeddings together (`gather_embeddings`): what train.py's
    step minimises under torchrun, where each rank embeds its own slice of the global batch."""

    def loss_of_global_batch(model, emb: dict, args):
        return loss_of(model, gather_embeddings(emb), args)

    return loss_of_global_batch


def accumulated_step(net, micro_batches: list[dict], embed, loss_of, args, dtype: torch.dtype = torch.float32):
    """(L, {term: unweighted value}) of the batch made of the micro-batches (data.Collate batches), and in
    every parameter's .grad the gradient of L: what one step on the micro-batches concatenated would give
    (tested), while the encoders hold the activations of one micro-batch at a time. `embed(net, batch, args)`
    gives a micro-batch's embeddings on this rank and `loss_of(model, embeddings, args)` their loss (train.py's, wrapped
    by `gathered` under torchrun); `dtype` is the autocast precision. The values returned are detached.

    Why a cache of embeddings, not a sum of micro-batch losses: every caption, phrase and negative is scored
    against every image of the batch, so a micro-batch alone is a different loss. But L depends on the weights
    only through the embeddings e, and dL/de needs the embeddings only. Three passes, the scheme of open_clip's
    --accum-freq: (1) embed every micro-batch without gradients; (2) the loss of the whole batch on the cache
    (gathered across ranks), and dL/de, dL/dt, dL/db; (3) each micro-batch embedded again with gradients, fed
    its rows of dL/de. Its price, a second forward pass, and its memory are in docs/scale.md. Under DDP every
    micro-batch but the last runs under no_sync, and the last backward also carries dL/dt and dL/db.
    """
    ddp = isinstance(net, DistributedDataParallel)
    model = net.module if ddp else net
    device = micro_batches[0]["images"].device.type

    def autocast():
        return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    # 1. the cache: every micro-batch's embeddings, without the encoders' activations
    with torch.no_grad(), autocast():
        cache = [embed(net, batch, args) for batch in micro_batches]
    whole = {name: torch.cat([e[name] for e in cache]) for name in cache[0]}  # "image" (B_r, D), "patch" (B_r, N, D)
    if "owner" in whole:  # micro-batch j's owners index its own images: offset them past the images before it
        images_before = itertools.accumulate([len(e["image"]) for e in cache[:-1]], initial=0)
        whole["owner"] = torch.cat([e["owner"] + first for e, first in zip(cache, images_before)])  # (K_r,)
    names = [name for name, value in whole.items() if value.is_floating_point()]  # not owner, phrase_ids
    for name in names:
        whole[name].requires_grad_()  # leaves: backward stops here, at dL/de

    # 2. the loss of the whole batch (the global batch under torchrun) and its gradient at the embeddings
    with autocast():
        loss, terms = loss_of(model, whole, args)
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
                emb = embed(net, batch, args)
            tensors, grad_tensors = [emb[n] for n in names], [parts[n][j] for n in names]
            if last:
                tensors += [p for p, _ in logit_grads]
                grad_tensors += [g for _, g in logit_grads]
            torch.autograd.backward(tensors, grad_tensors)
    return loss.detach(), {name: value.detach() for name, value in terms.items()}
