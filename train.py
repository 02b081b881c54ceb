"""Train C2LIP or a baseline. Reads top to bottom: the flags, the optimizer's recipe, one step (`step`), then the
run (`prepare`, `train`).

  python train.py                                  # C2LIP on the shapes world: 200 steps of 64, ~2 min on 2 cores
  python train.py --method siglip                  # the baseline: the same run without the concept losses
  python train.py --steps 20 --batch-size 16 --out /tmp/run   # a smoke test in seconds
  python train.py --data cc3m --data-dir /data/cc3m --caption-key shortLLA_captions --concept-key nounphrases \\
      --model B/16 --epochs 5 --workers 8             # the paper's data and captions, from scratch
  torchrun --nproc_per_node 8 train.py --data cc3m --data-dir /data/cc3m --init timm/ViT-B-16-SigLIP \\
      --caption-key shortLLA_captions --concept-key nounphrases --lr 1e-5 --weight-decay 0.1 --batch-size 96 \\
      --epochs 5 --warmup 50 --grad-clip 0 --npc-weight 1 --xac-weight 0.01 --seed 42 --precision bf16
                                                    # the authors' settings: SigLIP B/16 on 8 GPUs (docs/pretrained.md)
  torchrun --nproc_per_node 2 train.py ... --batch-size 96 --accum-freq 4   # the same 768-image batch on 2 GPUs

Paper map (docs/paper.md): `step` is one step of the paper's training. It embeds images, captions and concept
phrases (`embed`, model.py), takes L = L_sig + 1.0 L_npc + 0.01 L_xac (`loss_of`, losses.py, pool.py),
backpropagates, and lets AdamW update the weights with the paper's recipe (`param_groups`, `lr_factor`): betas
(0.9, 0.98), eps 1e-6, weight decay on weight matrices only (not on biases, norms, t and b), a linear warm-up
then a cosine decay. Three things enter the step through one call each, and only when asked for: under torchrun
the loss reads every GPU's embeddings (run/scale.py `gathered`); with --accum-freq K > 1 the step embeds K
micro-batches one at a time (run/scale.py `accumulated_step`); a baseline or a study option replaces `embed` and
`loss_of` (baselines/objectives.py). --init starts from released weights (run/start.py).

Departures (docs/departures.md lists each, with the authors' line): the defaults train a tiny model from
scratch on the shapes world at lr 5e-4 (the paper fine-tunes SigLIP ViT-B/16 on CC3M at 1e-5), with the gradient
clipped at norm 1 (the authors clip nothing; without the clip this run's loss does not leave its start);
the warm-up is 5% of the run unless --warmup 50; bf16 is autocast over float32 weights (the authors cast the
model to bf16); an epoch is one pass over the shards (theirs draws shards with replacement).
"""

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from baselines.objectives import add_study_flags, collate_extras
from baselines.objectives import objective as objective_of
from data import Collate
from losses import c2lip_loss
from model import CLIP, PRESETS
from released.weights import WEIGHT_NAMES, add_weight_flags
from run.checkpoint import RunInUse, locked, log_record, save_checkpoint
from run.devices import add_device_flag, autocast_dtype, log0, setup
from run.diagnostics import batch_diagnostics
from run.flags import HelpFormatter, check_args
from run.pictures import plot_losses
from run.resume import Stop, resume_state, skip_or_stop, stop_on_full_disk, truncate_log
from run.scale import accumulated_step, gathered
from run.start import fit_bias, start_model
from sources.loader import training_batches
from sources.shapes import WORLDS
from sources.shards import shard_plan

METHODS = ("c2lip", "siglip", "clip", "negclip")
STEPS = 200  # --steps when neither it nor --epochs is given: with --batch-size 64, minutes on a laptop CPU


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    add_study_flags(p)  # baselines/objectives.py: --concept-labels, --concept-logits (not the paper's)
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
    """batch (data.Collate) -> this rank's embeddings (model.py): x "image" (B, D), y "text" (B, D), c "phrase"
    (K, D) with "owner" (K,), the image o(k) of each phrase, and u "patch" (B, N, D) when L_xac reads it."""
    # The phrases go through forward with the rest: DistributedDataParallel syncs gradients only through forward.
    x, u, y, c = net(batch["images"], batch["captions"], batch["phrases"], patches=bool(args.xac_weight))
    emb = {"image": x, "text": y, "phrase": c, "owner": batch["owner"]}
    return emb if u is None else emb | {"patch": u}  # the patches are the largest tensor: kept only when read


def loss_of(model: CLIP, emb: dict[str, torch.Tensor], args) -> tuple[torch.Tensor, dict]:
    """(L, {term: unweighted value}) = L_sig + 1.0 L_npc + 0.01 L_xac (losses.py, pool.py), at the model's t, b."""
    x, y, c, u, owner = emb["image"], emb["text"], emb["phrase"], emb.get("patch"), emb["owner"]
    weights = dict(npc_weight=args.npc_weight, xac_weight=args.xac_weight, tau=args.tau)
    return c2lip_loss(x, y, c, u, owner, model.scale(), model.bias(), **weights)


def step(run: "Run", micro_batches: list[dict], lr: float, args, objective) -> tuple[torch.Tensor, dict, bool]:
    """One optimizer step -> (L, {term: value}, whether it was applied). Embed the batch and take the loss
    (`objective`: train.py's `embed` and `loss_of` for the paper's run), backpropagate, and let AdamW update the
    weights at `lr` times each group's peak rate. A non-finite loss or gradient never reaches the weights."""
    (embed, loss_of), net, model, optimizer, dtype = objective, run.net, run.model, run.optimizer, run.dtype
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr
    optimizer.zero_grad(set_to_none=True)
    if len(micro_batches) == 1:
        with torch.autocast(micro_batches[0]["images"].device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, terms = loss_of(model, embed(net, micro_batches[0], args), args)
        loss.backward()
    else:  # --accum-freq K > 1: the loss and gradient of the K micro-batches together (run/scale.py)
        loss, terms = accumulated_step(net, micro_batches, embed, loss_of, args, dtype)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)  # inf: norm only
    # Reading the norm waits for the device once per step, as AMP's GradScaler does.
    applied = bool(torch.isfinite(loss.detach() + grad_norm))
    if applied:
        optimizer.step()
    return loss, terms, applied


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


@dataclass
class Run:
    """What the loop reads and updates. `model` is the plain module (checkpoints hold its state_dict: no
    "module." or "_orig_mod." prefixes); `net` is what a step calls: compiled and/or wrapped for DDP."""

    model: CLIP
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: object
    tokenizer: object
    dataset: object
    stream: object  # the micro-batches, from the run's first step on
    plan: object  # cc3m: the shards' epochs (sources/shards.py); None for the shapes world
    start: int  # the step the run starts from: 0, or the checkpoint's
    nonfinite: int  # skipped non-finite steps in a row
    dtype: torch.dtype  # autocast's
    ckpt_path: str
    log_path: str


def prepare(args, rank: int, world_size: int, device) -> Run:
    """The run's folder, model, data and optimizer, at step 0 or at the checkpoint --resume continues from."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = resume_state(args, ckpt_path, log_path)
    start = resume["step"] if resume else 0
    if resume and rank == 0:
        truncate_log(log_path, start)  # the steps after the checkpoint are replayed: logged once, not twice
    batch = args.batch_size * world_size * args.accum_freq  # the global batch of a step
    plan = shard_plan(args.data_dir, args.out, batch) if args.data == "cc3m" else None  # epochs of shards
    if plan:
        log0(plan)  # its shards, samples and steps per epoch
        if args.epochs is not None:
            args.steps = max(1, round(args.epochs * plan.steps_per_epoch))

    # model, then data: micro-batches in the layout every loss reads (data.Collate)
    model, cfg, tokenizer, unfitted_bias = start_model(args, resume, plan, device)  # run/start.py
    collate, size, normalise = Collate(tokenizer, collate_extras(args)), cfg.vision.image_size, cfg.vision.normalise
    dataset, loader = training_batches(args, size, normalise, collate, start, rank, world_size, plan, device)
    stream = iter(loader)  # after the model: starting a DataLoader draws from torch's generator
    if unfitted_bias:
        cfg, stream = fit_bias(model, cfg, stream, device)
    n, bias = sum(p.numel() for p in model.parameters()) / 1e6, model.logit_bias  # t, b as fitted or read
    started = f"t = {model.scale().item():.1f}, " + ("no bias" if bias is None else f"b = {bias.item():.2f}")
    dtype = autocast_dtype(args.precision, device)
    log0(f"model {args.init or args.model}: {n:.2f}M parameters, {started}, {world_size} x {device}, autocast {dtype}")
    log0("config:", json.dumps({"model": asdict(cfg), "args": vars(args)}))

    groups = param_groups(model, args.lr, args.logit_lr, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        log0(f"resumed from {ckpt_path} at step {start}")
    net = torch.compile(model) if args.compile else model
    if world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    nonfinite = resume.get("nonfinite", 0) if resume else 0  # a streak of skipped steps goes on across a resume
    state = (cfg, tokenizer, dataset, stream, plan, start, nonfinite, dtype, ckpt_path, log_path)
    return Run(model, net, optimizer, *state)


def train(args, rank: int, world_size: int, device, stop: Stop, command: str) -> str:
    """The loop: a step per batch from the run's start to --steps; the log, the checkpoint and Ctrl-C between steps."""
    run, t0 = prepare(args, rank, world_size, device), time.time()
    objective = objective_of(args, embed, loss_of)  # baselines/objectives.py: the paper's pair, or what replaces it
    if world_size > 1:
        objective = (objective[0], gathered(objective[1]))  # run/scale.py: the loss of every rank's embeddings
    run.model.train()
    bar = tqdm(total=args.steps, initial=run.start, desc=f"train {args.method}", dynamic_ncols=True, disable=rank != 0)
    with open(run.log_path if rank == 0 else os.devnull, "a") as log:
        # a step's K micro-batches (--accum-freq K) are drawn K at a time from the one stream
        for i, micro_batches in zip(range(run.start, args.steps), zip(*[run.stream] * args.accum_freq)):
            micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
            lr = lr_factor(i, args.steps, args.warmup)
            loss, terms, applied = step(run, micro_batches, lr, args, objective)
            run.nonfinite = 0 if applied else run.nonfinite + 1
            if not applied:  # skipped, or the run stops (--max-nonfinite)
                skip_or_stop(args, i, run.nonfinite, run.ckpt_path)
            bar.update()
            # .item() waits for the device: read the values at the log interval only, not every step
            if applied and ((i + 1) % args.log_every == 0 or i + 1 == args.steps):
                record = log_record(i + 1, loss, terms, run.model, run.optimizer, time.time() - t0, run.dataset)
                record |= batch_diagnostics(run.model, micro_batches[0], args.concept_labels)  # no-grad, this batch
                skipped = {"skipped": sum(record["skipped"].values())} if record.get("skipped") else {}
                bar.set_postfix({k: f"{record[k]:.3f}" for k in terms} | {"t": f"{record['scale']:.1f}"} | skipped)
                log.write(json.dumps(record) + "\n")
                log.flush()
            if stop.requested():  # Ctrl-C or SIGTERM: save, say how to resume, exit 128 + the signal
                save(run, args, rank, i + 1, command)
                stop.exit(i + 1, run.ckpt_path, command)
            if (i + 1) % args.ckpt_every == 0:
                save(run, args, rank, i + 1, command)
    bar.close()
    if run.plan and (summary := run.dataset.summary()):
        log0(summary)  # the samples skipped or changed, by reason
    save(run, args, rank, args.steps, command)
    files = f"{run.ckpt_path}, {run.log_path} and {os.path.join(args.out, 'loss.png')}"  # weights, log, its curve
    log0(f"wrote {files} after {time.time() - t0:.0f}s; evaluate with: python eval.py --ckpt {run.ckpt_path}")
    return run.ckpt_path


def save(run: Run, args, rank: int, step: int, command: str) -> None:
    """The checkpoint of `step` (rank 0 writes it: every rank holds the same weights), with the run's command line
    (for eval.py --report), and the loss picture."""
    if rank != 0:
        return
    if not all(p.isfinite().all() for p in run.model.parameters()):
        sys.exit(f"error: step {step}: the weights are no longer finite; {run.ckpt_path} keeps the last good ones")
    state = dict(model=run.model.state_dict(), optimizer=run.optimizer.state_dict(), config=asdict(run.cfg), step=step)
    state |= dict(args=vars(args), tokenizer=run.tokenizer.state_dict(), seed=args.seed, nonfinite=run.nonfinite)
    save_checkpoint(run.ckpt_path, **state, command=command)
    plot_losses(run.log_path, os.path.join(args.out, "loss.png"))  # the log so far (every record is flushed)


if __name__ == "__main__":
    main()
