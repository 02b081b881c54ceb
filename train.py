"""Train C2LIP or a baseline. Reads top to bottom: flags, the optimizer's recipe, one step, then the run:
setup -> data -> model -> optimizer -> loop -> checkpoint.

  python train.py                                  # C2LIP on the shapes world: 200 steps of 64, ~2 min on 2 cores
  python train.py --method siglip                  # the baseline: the same run without the concept losses
  python train.py --steps 20 --batch-size 16 --out /tmp/run   # a smoke test in seconds
  python train.py --data cc3m --data-dir /data/cc3m --caption-key shortLLA_captions --concept-key nounphrases \\
      --model B/16 --epochs 5 --workers 8             # the paper's data and captions, from scratch
  torchrun --nproc_per_node 8 train.py --data cc3m --data-dir /data/cc3m --init timm/ViT-B-16-SigLIP \\
      --caption-key shortLLA_captions --concept-key nounphrases --lr 1e-5 --batch-size 96 --epochs 5 \\
      --warmup 50                                   # the paper's recipe: SigLIP B/16 on 8 GPUs (docs/pretrained.md)
  torchrun --nproc_per_node 2 train.py ... --batch-size 96 --accum-freq 4   # the same 768-image batch on 2 GPUs

Paper map (docs/paper.md): a step embeds images, captions and concept phrases (`embed`, model.py), gathers
them across GPUs (run/scale.py) and minimises L = L_sig + 1.0 L_npc + 0.01 L_xac (`loss_of`, losses.py,
pool.py) with the paper's AdamW recipe (`param_groups`, `lr_factor`): betas (0.9, 0.98), eps 1e-6, no weight
decay on biases, norms, t and b, warm-up then cosine decay, gradients clipped at norm 1, bf16 on CUDA.
Baselines and the study's options are in baselines/, --init in run/start.py. Departures: the defaults train
a tiny model from scratch on the shapes world at lr 5e-4 (the paper fine-tunes SigLIP ViT-B/16 on CC3M at
1e-5: docs/pretrained.md); the warm-up is 5% of the run unless --warmup 50.
"""

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from baselines.losses import LABEL_RULES, RULE_KEYS, baseline_loss, concept_labels, phrase_ids
from baselines.negatives import hard_negatives
from data import Collate
from losses import c2lip_loss
from model import CLIP, PRESETS
from released.weights import WEIGHT_NAMES, add_weight_flags
from run.checkpoint import RunInUse, locked, log_record, save_checkpoint
from run.devices import add_device_flag, autocast_dtype, log0, setup
from run.diagnostics import batch_diagnostics
from run.flags import check_args
from run.pictures import plot_losses
from run.resume import Stop, resume_state, skip_or_stop, stop_on_full_disk, truncate_log
from run.scale import accumulated_step, gather_embeddings
from run.start import fit_bias, start_model
from sources.loader import training_batches
from sources.shapes import WORLDS, truth
from sources.shards import shard_plan

METHODS = ("c2lip", "siglip", "clip", "negclip")
STEPS = 200  # --steps when neither it nor --epochs is given: with --batch-size 64, minutes on a laptop CPU


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data").add_argument
    data("--data", default="shapes", choices=["shapes", "cc3m"], help="the shapes world, or image-text tar shards")
    data("--data-dir", help="cc3m: a folder of .tar shards, a glob, or DIR/{00000..00331}.tar (any webdataset)")
    data("--caption-key", help="cc3m: the caption from this <key>.json field (default: <key>.txt)")
    data("--concept-key", help="cc3m: concept phrases from this <key>.json field when a sample has it")
    data("--concepts", help="cc3m: phrases precomputed by `python -m sources.precompute --out FILE`")
    data("--epochs", type=float, help="cc3m: this many passes over the shards (sets --steps)")
    data("--shuffle-buffer", type=int, default=1000, help="cc3m: samples in each reader's shuffle buffer")
    data("--vocab-size", type=int, default=32000, help="cc3m: caption words kept, most frequent first (rest: <unk>)")
    data("--world", default="simple", choices=list(WORLDS), help="shapes: simple, or dense (sources/shapes.py)")
    data("--holdout-combos", action="store_true", help="shapes: keep HOLDOUT_COMBOS out of training scenes")
    loss = p.add_argument_group("loss").add_argument
    loss("--method", default="c2lip", choices=METHODS, help="C2LIP, or a baseline (baselines/)")
    loss("--npc-weight", type=float, default=1.0, help="weight of the concept loss L_npc (c2lip)")
    loss("--xac-weight", type=float, default=0.01, help="weight of the pooled concept loss L_xac (c2lip)")
    loss("--tau", type=float, default=1.0, help="temperature of the cross-modal pooling (paper: 1)")
    labels = "owner: a phrase is positive for its own image only (the paper's); phrase: for every image with "
    labels += "that phrase; scene (shapes world): for every image holding an object the phrase describes"
    loss("--concept-labels", default="owner", choices=LABEL_RULES, help=labels)
    logits = "shared: the concept losses use the caption loss's t and b (paper); own: a pair from t = 10, b = -10"
    loss("--concept-logits", default="shared", choices=["shared", "own"], help=logits)
    model = p.add_argument_group("model").add_argument
    model("--model", default="tiny", choices=list(PRESETS), help="size preset (model.py) when training from scratch")
    init = f"start from SigLIP's or CLIP's released weights (.safetensors/.bin/.pt) or our checkpoint, {WEIGHT_NAMES}"
    model("--init", metavar="PATH_OR_NAME", help=init)
    add_weight_flags(p)
    scale = "with --init: start the logit scale at t = T (the bias from --init-bias, auto: refitted at this t)"
    model("--init-scale", type=float, metavar="T", help=scale)
    bias = "logit bias for --init weights without one: auto (fitted on the first batch) or a number"
    model("--init-bias", default="auto", help=bias)
    opt = p.add_argument_group("optimizer").add_argument
    opt("--steps", type=int, help=f"optimizer steps in total, default {STEPS} (a resumed run continues to this)")
    opt("--batch-size", type=int, default=64, help="images per micro-batch (per GPU under torchrun), see --accum-freq")
    accum = "micro-batches per step, embedded one at a time, with the loss and gradient of the whole batch"
    opt("--accum-freq", type=int, default=1, metavar="K", help=accum + " (every negative kept; 2 forwards each)")
    opt("--lr", type=float, default=5e-4, help="peak learning rate")
    opt("--logit-lr", type=float, help="learning rate of the logit scale and bias (default: --lr)")
    opt("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices")
    opt("--warmup", type=float, default=0.05, help="linear warm-up: a fraction of --steps below 1, else steps")
    opt("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    run = p.add_argument_group("run").add_argument
    run("--seed", type=int, default=0, help="seed of the initialisation and of the training scenes")
    add_device_flag(p)
    run("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast: auto is bf16 on CUDA only")
    run("--workers", type=int, default=1, help="DataLoader worker processes (render or decode, NLTK chunking)")
    run("--out", help="folder of ckpt.pt, log.jsonl and loss.png (default: runs/<method>)")
    run("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run("--overwrite", action="store_true", help="start afresh in an --out that holds a run, replacing it")
    run("--max-nonfinite", type=int, default=0, help="non-finite steps skipped in a row before the run stops")
    run("--compile", action="store_true", help="torch.compile the model (slow start, faster steps on a GPU)")
    run("--grad-checkpointing", action="store_true", help="recompute each block in the backward pass: less memory")
    run("--ckpt-every", type=int, default=100, help="write the checkpoint every this many steps")
    run("--log-every", type=int, default=10, help="append to log.jsonl (and show on the bar) every this many steps")
    return p


def get_args(argv=None) -> argparse.Namespace:
    parser = get_parser()
    return check_args(parser, parser.parse_args(argv), STEPS)  # run/flags.py: an error names its flag


# ----------------------------------------------------------------------------- the optimizer's recipe


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The learning rate of step `step` (0-based) as a fraction of the peak: a linear warm-up over the first
    `warmup` fraction of the steps (`warmup` steps if it is 1 or more; at least one step), then a cosine
    decay to 0 at `steps`."""
    warmup_steps = max(1, round(warmup * steps if warmup < 1 else warmup))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


def param_groups(model: CLIP, lr: float, logit_lr: float | None, weight_decay: float) -> list[dict]:
    """AdamW's groups, the paper's recipe: weight decay on weight matrices only, none on biases and norms
    (1-d tensors) nor on the logit scale and bias, which learn at `logit_lr` (default: `lr`)."""
    named = list(model.named_parameters())
    logit = [p for n, p in named if "logit_" in n]
    decay = [p for n, p in named if "logit_" not in n and p.ndim >= 2]
    no_decay = [p for n, p in named if "logit_" not in n and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "base_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr},
        {"params": logit, "weight_decay": 0.0, "base_lr": lr if logit_lr is None else logit_lr},
    ]


# ----------------------------------------------------------------------------- one step


def embed(net, batch: dict, args) -> dict[str, torch.Tensor]:
    """batch (data.Collate) -> this rank's embeddings: "image" x (B, D), "text" y (B, D), and for c2lip
    "phrase" c (K, D), "owner" (K,), "patch" u (B, N, D) when L_xac reads them, and what a label rule reads
    (baselines/losses.py); for negclip, "negatives" (M, D)."""
    # The phrases (or the hard negatives) go through forward: DistributedDataParallel only prepares gradient
    # syncing for what forward computes.
    second = {"c2lip": "phrases", "negclip": "negatives"}.get(args.method)
    patches = args.method == "c2lip" and bool(args.xac_weight)  # only L_xac reads the patches
    image, patch, text, texts = net(batch["images"], batch["captions"], batch[second] if second else None, patches)
    emb = {"image": image, "text": text}
    if args.method == "negclip":
        emb["negatives"] = texts[batch["has_negative"]]  # (M, D): captions no rule applies to have none
    if args.method == "c2lip":
        rule_keys = RULE_KEYS[args.concept_labels]  # gathered with the embeddings: only what the rule reads
        emb |= {"phrase": texts, "owner": batch["owner"]} | {k: batch[k] for k in rule_keys}
        if patches:  # the patches are the largest tensor: kept only when L_xac reads them
            emb["patch"] = patch
    return emb


def loss_of(model: CLIP, emb: dict[str, torch.Tensor], args) -> tuple[torch.Tensor, dict]:
    """(L, {term: unweighted value}) of the (gathered) embeddings, with t and b read from the model."""
    t, b = model.scale(), model.bias()
    if args.method != "c2lip":
        return baseline_loss(args.method, emb, t, b)
    rule = args.concept_labels  # the paper's owner rule is c2lip_loss's own; the others are the study's
    labels = None if rule == "owner" else concept_labels(rule, emb["owner"], len(emb["image"]), emb)
    concept_t, concept_b = model.concept_scale_bias()  # t and b again, unless --concept-logits own
    x, y, c, u, owner = emb["image"], emb["text"], emb["phrase"], emb.get("patch"), emb["owner"]
    options = dict(npc_weight=args.npc_weight, xac_weight=args.xac_weight, tau=args.tau, labels=labels)
    return c2lip_loss(x, y, c, u, owner, t, b, **options, concept_t=concept_t, concept_b=concept_b)


def step_loss(net, batch: dict, args) -> tuple[torch.Tensor, dict]:
    """(L, {term: value}) of one batch: the global batch under torchrun (every rank's embeddings gathered)."""
    model = net.module if isinstance(net, DistributedDataParallel) else net
    return loss_of(model, gather_embeddings(embed(net, batch, args)), args)


# ----------------------------------------------------------------------------- the run


def main(argv=None) -> str:
    args = get_args(argv)
    rank, world_size, device = setup(args.device)
    command = "python train.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        with locked(args.out) if rank == 0 else contextlib.nullcontext(), Stop(world_size, device) as stop:
            return train(args, rank, world_size, device, stop, command)
    except RunInUse as err:
        sys.exit(f"error: --out {err}; wait for it, or pass another --out")
    except OSError as err:  # a full disk: a checkpoint is written whole or not at all, the ones there stay good
        stop_on_full_disk(err, args.out, command)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def train(args, rank: int, world_size: int, device, stop: Stop, command: str) -> str:
    # ---- setup: the run's folder, and the checkpoint it continues from (--resume)
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = resume_state(args, ckpt_path, log_path)
    start = resume["step"] if resume else 0
    if resume and rank == 0:
        truncate_log(log_path, start)  # the steps after the checkpoint are replayed: logged once, not twice
    batch = args.batch_size * world_size * args.accum_freq  # the global batch of a step
    plan = shard_plan(args.data_dir, args.out, batch) if args.data == "cc3m" else None  # epochs of shards
    if plan and args.epochs is not None:
        args.steps = max(1, round(args.epochs * plan.steps_per_epoch))

    # ---- model, then data: micro-batches in the layout every loss reads (data.Collate)
    model, cfg, tokenizer, unfitted_bias = start_model(args, resume, plan, device)  # run/start.py
    extras = [truth] if args.data == "shapes" else []  # the world's truth: diagnostics, --concept-labels scene
    extras += [phrase_ids] * (args.concept_labels == "phrase") + [hard_negatives] * (args.method == "negclip")
    collate, size, normalise = Collate(tokenizer, extras), cfg.vision.image_size, cfg.vision.normalise
    dataset, loader = training_batches(args, size, normalise, collate, start, rank, world_size, plan, device)
    stream = iter(loader)  # after the model: starting a DataLoader draws from torch's generator
    if unfitted_bias:
        cfg, stream = fit_bias(model, cfg, stream, device)
    n, bias = sum(p.numel() for p in model.parameters()) / 1e6, model.logit_bias  # t, b as fitted or read
    started = f"t = {model.scale().item():.1f}, " + ("no bias" if bias is None else f"b = {bias.item():.2f}")
    log0(f"model {args.init or args.model}: {n:.2f}M parameters, {started}, {world_size} x {device}, autocast {dtype}")
    log0("config:", json.dumps({"model": asdict(cfg), "args": vars(args)}))

    # ---- optimizer
    groups = param_groups(model, args.lr, args.logit_lr, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        log0(f"resumed from {ckpt_path} at step {start}")
    # `model` stays the plain module (checkpoints hold its state_dict: no "module." or "_orig_mod."
    # prefixes); `net` is what the loop calls: compiled and/or wrapped for gradient averaging.
    net = torch.compile(model) if args.compile else model
    if world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        if rank == 0:  # one writer; every rank holds the same weights
            if not all(p.isfinite().all() for p in model.parameters()):
                sys.exit(f"error: step {step}: the weights are no longer finite; {ckpt_path} keeps the last good ones")
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), config=asdict(cfg), step=step)
            state |= dict(args=vars(args), tokenizer=tokenizer.state_dict(), seed=args.seed, nonfinite=nonfinite)
            state["command"] = command  # the run's command line, for eval.py --report
            save_checkpoint(ckpt_path, **state)
            plot_losses(log_path, os.path.join(args.out, "loss.png"))  # the log so far (every record is flushed)

    # ---- loop: a step's K micro-batches are drawn K at a time from the one stream
    model.train()
    bar = tqdm(total=args.steps, initial=start, desc=f"train {args.method}", dynamic_ncols=True, disable=rank != 0)
    t0, nonfinite = time.time(), resume.get("nonfinite", 0) if resume else 0  # a streak goes on across a resume
    with open(log_path if rank == 0 else os.devnull, "a") as log:
        for step, micro_batches in zip(range(start, args.steps), zip(*[stream] * args.accum_freq)):
            micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, args.steps, args.warmup)
            optimizer.zero_grad(set_to_none=True)
            if args.accum_freq == 1:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss, terms = step_loss(net, micro_batches[0], args)
                loss.backward()
            else:  # the loss of the K micro-batches together (run/scale.py); leaves its gradient in .grad
                loss, terms = accumulated_step(net, micro_batches, embed, loss_of, args, dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
            # A non-finite loss or gradient must never reach the weights. Checking it waits for the device
            # once per step, as AMP's GradScaler does. A skipped step still reaches the stop check below.
            finite = bool(torch.isfinite(loss.detach() + grad_norm))
            nonfinite = 0 if finite else nonfinite + 1
            if finite:
                optimizer.step()
            else:
                skip_or_stop(args, step, nonfinite, ckpt_path)
            bar.update()
            # .item() waits for the device: read the values at the log interval only, not every step
            if finite and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
                record = log_record(step + 1, loss, terms, model, optimizer, time.time() - t0, dataset)
                record |= batch_diagnostics(model, micro_batches[0], args.concept_labels)  # no-grad, this batch
                skipped = {"skipped": sum(record["skipped"].values())} if record.get("skipped") else {}
                bar.set_postfix({k: f"{record[k]:.3f}" for k in terms} | {"t": f"{record['scale']:.1f}"} | skipped)
                log.write(json.dumps(record) + "\n")
                log.flush()
            if stop.requested():  # Ctrl-C or SIGTERM: save, say how to resume, exit 128 + the signal
                save(step + 1)
                stop.exit(step + 1, ckpt_path, command)
            if (step + 1) % args.ckpt_every == 0:
                save(step + 1)
    bar.close()
    if plan and (summary := dataset.summary()):
        log0(summary)  # the samples skipped or changed, by reason

    # ---- checkpoint
    save(args.steps)
    files = f"{ckpt_path}, {log_path} and {os.path.join(args.out, 'loss.png')}"  # the weights, the log, its curve
    log0(f"wrote {files} after {time.time() - t0:.0f}s; evaluate with: python eval.py --ckpt {ckpt_path}")
    return ckpt_path


if __name__ == "__main__":
    main()
