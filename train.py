"""Train C2LIP or its baselines. Reads top to bottom: flags, schedule, data, model, optimizer, the loop.

  python train.py                                  # C2LIP on the shapes world, CPU-sized, writes runs/c2lip
  python train.py --method siglip                  # the baseline: the same run without the concept losses
  python train.py --steps 20 --batch-size 16 --out /tmp/run   # a smoke test in seconds
  python train.py --data cc3m --data-dir /data/cc3m --caption-key shortLLA_captions --concept-key nounphrases \\
      --model B/16 --epochs 5 --workers 8             # the paper's data and captions, from scratch
  torchrun --nproc_per_node 8 train.py --data cc3m --data-dir /data/cc3m --init ViT-B-16.pt \\
      --method c2lip --lr 1e-5 --batch-size 96 --epochs 5   # fine-tune CLIP on 8 GPUs

Paper map (Section 3 and "Training setup" in docs/paper.md):
  --method c2lip   L = L_sig + 1.0 * L_npc + 0.01 * L_xac   (--concept-weight, --pool-weight, --tau)
  --method siglip  L = L_sig                                 (the fine-tuned SigLIP baseline)
  --method clip    CLIP's softmax loss, t = 1/0.07 and no bias
  --method negclip L_sig with one rule-made hard negative per caption as extra texts that every image must
                   score below (negatives.py; the NegCLIP-style baseline, in SigLIP's form)
AdamW with betas (0.9, 0.98), eps 1e-6, no weight decay on biases, norms, or the logit scale and bias
(`param_groups`); linear warm-up then cosine decay (`lr_factor`); bf16 autocast on CUDA. Under torchrun,
--batch-size is per GPU and the losses see the global batch (objective.py).

Departures: the paper fine-tunes pretrained SigLIP on CC3M for 5 epochs at lr 1e-5; the defaults here
train a tiny model from scratch on the shapes world (lr 5e-4). `--init` starts from pretrained weights
instead: OpenAI's CLIP release, an open_clip state dict of the same architecture, or a checkpoint of ours
(the model, its tokenizer and its pixel normalisation come from the file; --model is then unused).
OpenAI's CLIP has no logit bias; the sigmoid losses get one chosen on the first batch (`--init-bias`).
`--init-scale` restarts t of --init weights at a given value (with a bias refitted the same way): the
threshold regime of released SigLIP weights (t ~ 112), for docs/mechanism.md.
`--logit-lr` gives the logit scale and bias their own learning rate (the paper uses one);
`--concept-labels phrase|scene` and `--concept-logits own` are off by default.
Beside ckpt.pt and log.jsonl the run draws loss.png, one line per loss term (redrawn at every checkpoint).
log.jsonl also holds the diagnostics of diagnostics.py: the fraction of positive pairs above the sigmoid's
threshold and, in the shapes world, the false negatives of the concept labels.
"""

import argparse
import itertools
import json
import math
import os
import time
from dataclasses import asdict, replace
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import save_checkpoint
from data import Collate, WordTokenizer, train_transform
from devices import add_device_flag, autocast_dtype, log0, setup
from diagnostics import batch_diagnostics
from model import CLIP, PRESETS, CLIPConfig
from objective import METHODS, Objective, loss_terms
from pictures import plot_losses
from pretrained import add_weight_flags, balanced_bias, load_weights
from released_tokenizers import tokenizer_from_state_dict
from shapes import HOLDOUT_COMBOS, WORLDS, ShapesDataset, ShapesWorld, StepBatches
from webdata import SHARD_LAYOUT, WebDataset, cache_dir, caption_word_counts, expand_shards, shard_sizes


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        default="shapes",
        choices=["shapes", "cc3m"],
        help="shapes: the embedded synthetic world; cc3m: image-text tar shards in --data-dir (CC3M's, or "
        "any webdataset's)",
    )
    p.add_argument("--data-dir", default=None, help="cc3m: a folder of .tar shards, a glob, or DIR/{00000..00331}.tar")
    p.add_argument("--caption-key", default=None, help="cc3m: caption from this <key>.json field (default: <key>.txt)")
    p.add_argument("--concept-key", default=None, help="cc3m: concept phrases from this <key>.json field when present")
    p.add_argument(
        "--concepts", default=None, help="cc3m: phrases precomputed by `python webdata.py --data-dir ... --out FILE`"
    )
    p.add_argument(
        "--epochs", type=float, default=None, help="cc3m: train this many passes over the shards (sets --steps)"
    )
    p.add_argument(
        "--world",
        default="simple",
        choices=list(WORLDS),
        help="shapes: simple (2-4 objects, distinct colours and shapes) or dense (3-5 objects, colours and "
        "shapes repeat within a scene; shapes.WORLDS)",
    )
    p.add_argument(
        "--holdout-combos",
        action="store_true",
        help="shapes: no training scene holds a colour-shape pair of shapes.HOLDOUT_COMBOS (eval's heldout-* scores)",
    )
    p.add_argument(
        "--shuffle-buffer", type=int, default=1000, help="cc3m: samples held in the shuffle buffer of each reader"
    )
    p.add_argument("--vocab-size", type=int, default=32000, help="cc3m: most frequent caption words kept (rest: <unk>)")
    p.add_argument(
        "--method",
        default="c2lip",
        choices=METHODS,
        help="loss: C2LIP or a baseline (negclip: siglip plus a rule-made hard negative per caption)",
    )
    p.add_argument("--concept-weight", type=float, default=1.0, help="weight of the concept loss L_npc (c2lip)")
    p.add_argument("--pool-weight", type=float, default=0.01, help="weight of the pooled concept loss L_xac (c2lip)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of the cross-modal pooling (paper: 1)")
    p.add_argument(
        "--concept-labels",
        default="owner",
        choices=["owner", "phrase", "scene"],
        help="owner: a phrase is positive only for its own image (authors); "
        "phrase: for every image with the same normalised phrase; scene (shapes world only): for every "
        "image holding an object the phrase describes (no false negatives)",
    )
    p.add_argument(
        "--concept-logits",
        default="shared",
        choices=["shared", "own"],
        help="shared: the concept losses use the caption loss's t and b (paper); own: a pair of their own "
        "(CLIPConfig.concept_logits, started at t = 10, b = -10)",
    )
    p.add_argument(
        "--model",
        default="tiny",
        choices=list(PRESETS),
        help="model size preset (model.py), when training from scratch",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="PATH",
        help="start from these weights: OpenAI's CLIP release (ViT-B-16.pt), an open_clip state dict, "
        "or a checkpoint of ours; the model shape, tokenizer and normalisation come from the file",
    )
    add_weight_flags(p)
    p.add_argument(
        "--init-bias",
        default="auto",
        help="logit bias for --init weights that have none (OpenAI's CLIP) under a sigmoid loss: auto "
        "(midway between matched and unmatched logits of the first batch) or a number",
    )
    p.add_argument(
        "--init-scale",
        type=float,
        default=None,
        metavar="T",
        help="with --init: start the logit scale at t = T instead of the weights' own, and the bias from "
        "--init-bias (auto: refitted on the first batch at this t)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps in total, default 600 (a resumed run continues to this)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="images per step (per GPU under torchrun)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--logit-lr", type=float, default=None, help="learning rate of logit scale and bias (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up length as a fraction of --steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the training scenes")
    add_device_flag(p)
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU and MPS",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="DataLoader worker processes (render or decode + NLTK chunking)"
    )
    p.add_argument(
        "--out", default=None, help="output folder for ckpt.pt, log.jsonl and loss.png (default: runs/<method>)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps on GPU)")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute each transformer block in the backward pass: less memory, ~30%% more compute",
    )
    p.add_argument("--ckpt-every", type=int, default=100, help="write the checkpoint every this many steps")
    p.add_argument(
        "--log-every", type=int, default=10, help="append to log.jsonl (and show on the bar) every this many steps"
    )
    return p


def get_args(argv=None) -> argparse.Namespace:
    p = get_parser()
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "ckpt_every", "log_every", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.data == "shapes" and args.epochs is not None:
        p.error("--epochs needs --data cc3m: the shapes world is an endless stream (use --steps)")
    if args.data != "shapes":
        if args.concept_labels == "scene":
            p.error(
                "--concept-labels scene needs --data shapes: only the synthetic world knows which images show a phrase"
            )
        if args.holdout_combos or args.world != "simple":
            p.error("--holdout-combos and --world only apply to --data shapes")
        if args.data_dir is None:
            p.error(f"--data {args.data} needs --data-dir.\n{SHARD_LAYOUT}")
        try:
            expand_shards(args.data_dir)
        except FileNotFoundError as err:
            p.error(f"--data-dir: {err}")
        if args.concepts and not os.path.isfile(args.concepts):
            p.error(
                f"--concepts: no file {args.concepts}; write it with: "
                f"python webdata.py --data-dir {args.data_dir} --out {args.concepts}"
            )
    if args.epochs is not None and (args.epochs <= 0 or args.steps is not None):
        p.error("--epochs must be positive, and goes without --steps")
    args.steps = args.steps or 600  # with --epochs, shard_plan() sets it from the number of samples
    if args.tau <= 0:
        p.error("--tau must be positive")
    if args.method != "c2lip" and (args.concept_labels != "owner" or args.concept_logits == "own"):
        p.error("--concept-labels phrase|scene and --concept-logits own only apply to --method c2lip")
    if args.init_scale is not None and (not args.init or not 0 < args.init_scale <= 100):
        p.error("--init-scale needs --init, and a value in (0, 100] (t is clamped at 100)")
    if args.init_bias != "auto":
        try:
            float(args.init_bias)
        except ValueError:
            p.error(f"--init-bias must be 'auto' or a number, not {args.init_bias!r}")
    if args.bpe and not args.init:
        p.error("--bpe only applies with --init (training from scratch uses the word tokenizer)")
    if args.init and not os.path.exists(args.init):
        p.error(f"--init {args.init}: no such file. OpenAI's ViT-B/16 release is ViT-B-16.pt (see docs/pretrained.md)")
    args.out = args.out or os.path.join("runs", args.method)
    return args


# ----------------------------------------------------------------------------- the optimizer's recipe


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The learning rate of step `step` (0-based) as a fraction of the peak: a linear warm-up over the first
    `warmup` fraction of the steps (at least one step), then a cosine decay to 0 at `steps`."""
    warmup_steps = max(1, round(warmup * steps))
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


# ----------------------------------------------------------------------------- data, tokenizer and model


def shapes_world(args, image_size: int) -> ShapesWorld:
    return ShapesWorld(image_size, holdout=HOLDOUT_COMBOS if args.holdout_combos else (), **WORLDS[args.world])


class ShardPlan(NamedTuple):
    paths: list[str]
    cache: str  # the folder of the cached sample counts and vocabulary
    steps_per_epoch: int


def shard_plan(args, world_size: int) -> ShardPlan:
    """The shards and their epoch length; sets --steps from --epochs."""
    shards = expand_shards(args.data_dir)
    cache = cache_dir(shards, args.out)
    samples = sum(shard_sizes(shards, cache))
    steps_per_epoch = max(1, math.ceil(samples / (args.batch_size * world_size)))
    if args.epochs is not None:
        args.steps = max(1, round(args.epochs * steps_per_epoch))
    log0(
        f"{len(shards)} shards, {samples} samples: {steps_per_epoch} steps per epoch, "
        f"{args.steps / steps_per_epoch:.2f} epochs"
    )
    return ShardPlan(shards, cache, steps_per_epoch)


def config_and_tokenizer(args, resume: dict | None, shards: ShardPlan | None) -> tuple[CLIPConfig, object, dict | None]:
    """The model's shape and tokenizer, from the run being resumed, from --init (with its weights), or a preset
    with a word vocabulary of the training captions."""
    if resume:
        if args.init:
            log0(f"resuming {args.out}: --init {args.init} is not read again")
        return CLIPConfig.from_dict(resume["config"]), tokenizer_from_state_dict(resume["tokenizer"]), None
    if args.init:
        ckpt = load_weights(args.init, args.bpe, args.clip_act)
        cfg = replace(CLIPConfig.from_dict(ckpt["config"]), concept_logits=args.concept_logits == "own")
        return cfg, tokenizer_from_state_dict(ckpt["tokenizer"]), ckpt["model"]
    cfg = PRESETS[args.model]
    if args.data == "shapes":  # a few thousand captions hold every word of this small world
        world = shapes_world(args, cfg.vision.image_size)
        captions = [world.caption(world.scene(args.seed, "train", i)) for i in range(2000)]
        tokenizer = WordTokenizer.build(captions, context_length=cfg.text.context_length)
    else:  # the most frequent words of every training caption, counted once
        counts = caption_word_counts(shards.paths, args.caption_key, shards.cache)
        tokenizer = WordTokenizer.from_counts(counts, cfg.text.context_length, max_size=args.vocab_size)
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer)), concept_logits=args.concept_logits == "own")
    if args.method == "clip":  # CLIP's softmax form: t = 1/0.07 and no bias
        cfg = replace(cfg, init_logit_scale=math.log(1 / 0.07), init_logit_bias=None)
    return cfg, tokenizer, None


def batches(args, cfg: CLIPConfig, tokenizer, start: int, rank: int, world_size: int, shards, device):
    """(the dataset, an iterable of batches from step `start` on). --batch-size is per rank, and each rank
    reads its own scenes or shards; hard negatives (negclip) are made in the DataLoader workers."""
    size, normalise = cfg.vision.image_size, cfg.vision.normalise
    collate = Collate(tokenizer, negatives=args.method == "negclip")
    pin = device.type == "cuda"  # page-locked batches make the copy to the GPU asynchronous (non_blocking)
    if args.data == "shapes":  # an endless stream of fresh scenes, resumable at any step (shapes.StepBatches)
        dataset = ShapesDataset(
            shapes_world(args, size), args.seed, "train", args.steps * args.batch_size * world_size, normalise
        )
        sampler = StepBatches(args.batch_size, start, args.steps, rank, world_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers, pin_memory=pin
        )
        return dataset, loader
    dataset = WebDataset(
        shards.paths,
        train_transform(size, normalise),
        args.caption_key,
        args.concept_key,
        args.concepts,
        args.shuffle_buffer,
        args.seed,
    )
    loader = torch.utils.data.DataLoader(
        dataset, args.batch_size, collate_fn=collate, num_workers=args.workers, pin_memory=pin
    )
    return dataset, endless(loader, dataset, first_epoch=start // shards.steps_per_epoch)


def endless(loader, dataset: WebDataset, first_epoch: int):
    """Batches of epoch first_epoch, then of the next epochs, without end. A resumed run restarts the stream
    at the start of the epoch it stopped in, so it sees that epoch's first samples again: a tar stream has
    no cheap way to seek to a sample, and part of one epoch seen twice does little harm."""
    epoch = first_epoch
    while True:
        dataset.epoch, empty = epoch, True  # seeds this pass's shard and sample shuffles
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(
                f"a pass over {len(dataset.shards)} shards gave no usable sample (skipped: "
                f"{dataset.skipped}); check the shards and --caption-key"
            )
        epoch += 1


def make_model(args, cfg: CLIPConfig, init: dict | None, device) -> tuple[CLIP, CLIPConfig, bool]:
    """(the model on its device with --init's weights if any, its config, whether its logit bias is still to
    be fitted on the first batch). The loss decides whether there is a bias: CLIP's softmax form has none;
    released CLIP weights get one for the sigmoid losses (--init-bias). --init-scale replaces the weights'
    t, and with it their bias, which only fits the t it was learned with."""
    has_bias = init is not None and "logit_bias" in init and args.init_scale is None
    if init is not None:
        if args.init_scale is not None:
            init["logit_scale"] = torch.tensor(math.log(args.init_scale))
            cfg = replace(cfg, init_logit_scale=math.log(args.init_scale))
        if args.method == "clip":
            init.pop("logit_bias", None)
        elif not has_bias:
            init["logit_bias"] = torch.tensor(-10.0 if args.init_bias == "auto" else float(args.init_bias))
        cfg = replace(cfg, init_logit_bias=init["logit_bias"].item() if "logit_bias" in init else None)
    model = CLIP(cfg).to(device)
    model.visual.grad_checkpointing = model.text.grad_checkpointing = args.grad_checkpointing
    if init is None:
        return model, cfg, False
    # The concept losses' own (t, b) is a choice of this run: kept from the weights when both have one,
    # else started fresh (or dropped).
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith("concept_logit_")}
    model.load_state_dict(fresh | {k: v for k, v in init.items() if not k.startswith("concept_logit_") or k in fresh})
    return model, cfg, args.method != "clip" and not has_bias and args.init_bias == "auto"


def fit_bias(model: CLIP, cfg: CLIPConfig, stream, device) -> tuple[CLIPConfig, object]:
    """--init-bias auto: the logit bias from the first batch (pretrained.balanced_bias), which is then trained
    on as usual. Every rank computes it; DistributedDataParallel then keeps rank 0's."""
    first = next(stream)
    with torch.no_grad():
        model.logit_bias.fill_(balanced_bias(model, {k: v.to(device) for k, v in first.items()}))
    return replace(cfg, init_logit_bias=model.logit_bias.item()), itertools.chain([first], stream)


def log_record(step: int, loss, terms: dict, model: CLIP, lr: float, seconds: float, dataset) -> dict:
    """One line of log.jsonl: the loss and its unweighted terms, t and b (and the concept losses' own pair),
    the learning rate, the wall time and, for shards, the epoch and the samples skipped so far."""
    record = {
        "step": step,
        "loss": loss.item(),
        **{k: v.item() for k, v in terms.items()},
        "scale": model.scale().item(),
        "bias": model.bias().item(),
    }
    if model.cfg.concept_logits:
        record |= dict(zip(("concept_scale", "concept_bias"), (v.item() for v in model.concept_scale_bias())))
    record |= {"lr": lr, "seconds": round(seconds, 2)}
    if isinstance(dataset, WebDataset):
        record |= {"epoch": dataset.epoch, "skipped": dataset.skipped}
    return record


def main(argv=None) -> str:
    # ---- setup
    args = get_args(argv)
    rank, world_size, device = setup(args.device)
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = (
        torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if args.resume and os.path.exists(ckpt_path)
        else None
    )
    if args.resume and resume is None:
        log0(f"--resume: no checkpoint at {ckpt_path} yet, starting from step 0")
    start = resume["step"] if resume else 0

    # ---- data, tokenizer, model
    shards = shard_plan(args, world_size) if args.data != "shapes" else None
    cfg, tokenizer, init = config_and_tokenizer(args, resume, shards)
    dataset, loader = batches(args, cfg, tokenizer, start, rank, world_size, shards, device)
    model, cfg, unfitted_bias = make_model(args, cfg, init, device)
    stream = iter(loader)  # after the model: starting a DataLoader draws from torch's generator
    if unfitted_bias:
        cfg, stream = fit_bias(model, cfg, stream, device)
    if init is not None:
        bias = "no bias" if model.logit_bias is None else f"b = {model.logit_bias.item():.2f}"
        log0(f"initialised from {args.init}: t = {model.scale().item():.1f}, {bias}")
    log0(
        f"model {args.init or args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{world_size} x {device}, autocast {dtype}"
    )
    log0("config:", json.dumps({"model": asdict(cfg), "args": vars(args)}))

    # ---- optimizer
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, args.logit_lr, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6
    )
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        log0(f"resumed from {ckpt_path} at step {start}")
    # `model` stays the plain module (checkpoints hold its state_dict: no "module." or "_orig_mod."
    # prefixes); `net` is what the loop calls: compiled and/or wrapped for gradient averaging.
    net = torch.compile(model) if args.compile else model
    if world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    objective = Objective.from_args(args)

    def checkpoint(step: int) -> None:
        if rank == 0:  # one writer; every rank holds the same weights
            save_checkpoint(
                ckpt_path,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                step=step,
                config=asdict(cfg),
                args=vars(args),
                tokenizer=tokenizer.state_dict(),
                seed=args.seed,
            )
            plot_losses(log_path, os.path.join(args.out, "loss.png"))  # the log so far (every record is flushed)

    # ---- loop
    model.train()
    bar = tqdm(total=args.steps, initial=start, desc=f"train {args.method}", dynamic_ncols=True, disable=rank != 0)
    t0 = time.time()
    with open(log_path if rank == 0 else os.devnull, "a" if resume else "w") as log:
        for step, batch in zip(range(start, args.steps), stream):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, args.steps, args.warmup)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, terms = loss_terms(net, batch, objective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            bar.update()
            # .item() waits for the device: read the values at the log interval only, not every step
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                lr = optimizer.param_groups[0]["lr"]
                record = log_record(step + 1, loss, terms, model, lr, time.time() - t0, dataset)
                record |= batch_diagnostics(model, batch, objective.concept_labels)  # a no-grad pass, this batch
                bar.set_postfix(
                    {k: f"{record[k]:.3f}" for k in terms}
                    | {"t": f"{record['scale']:.1f}"}
                    | ({"skipped": sum(record["skipped"].values())} if record.get("skipped") else {})
                )
                log.write(json.dumps(record) + "\n")
                log.flush()
            if (step + 1) % args.ckpt_every == 0:
                checkpoint(step + 1)
    bar.close()
    if getattr(dataset, "skipped", None):
        log0(f"skipped samples (corrupt or incomplete, each pass counts them again): {dataset.skipped}")

    # ---- checkpoint
    checkpoint(args.steps)
    log0(f"wrote {ckpt_path} after {time.time() - t0:.0f}s; evaluate with: python eval.py --ckpt {ckpt_path}")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return ckpt_path


if __name__ == "__main__":
    main()
