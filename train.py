"""Train C2LIP or its baselines. Reads top to bottom: flags, schedule, data, model, optimizer, the loop.

  python train.py                                  # C2LIP on the shapes world, CPU-sized, writes runs/c2lip
  python train.py --method siglip                  # the baseline: the same run without the concept losses
  python train.py --steps 20 --batch-size 16 --out /tmp/run   # a smoke test in seconds
  python train.py --data cc3m --data-dir /data/cc3m --caption-key shortLLA_captions --concept-key nounphrases \\
      --model B/16 --epochs 5 --workers 8             # the paper's data and captions, from scratch
  torchrun --nproc_per_node 8 train.py --data cc3m --data-dir /data/cc3m --init open_clip_model.safetensors \\
      --caption-key shortLLA_captions --concept-key nounphrases --lr 1e-5 --batch-size 96 --epochs 5 \\
      --warmup 50                                   # the paper's recipe: SigLIP B/16 on 8 GPUs (docs/pretrained.md)
  torchrun --nproc_per_node 8 train.py --data cc3m --data-dir /data/cc3m --init openai/ViT-B-16 \\
      --method c2lip --lr 1e-5 --batch-size 96 --epochs 5   # the same from OpenAI's CLIP, downloaded once
  torchrun --nproc_per_node 2 train.py ... --batch-size 96 --accum-freq 4   # the same 768-image batch on 2 GPUs

Paper map (Section 3 and "Training setup" in docs/paper.md):
  --method c2lip   L = L_sig + 1.0 * L_npc + 0.01 * L_xac   (--concept-weight, --pool-weight, --tau)
  --method siglip  L = L_sig                                 (the fine-tuned SigLIP baseline)
  --method clip    CLIP's softmax loss, t = 1/0.07 and no bias
  --method negclip L_sig with one rule-made hard negative per caption as extra texts that every image must
                   score below (negatives.py; the NegCLIP-style baseline, in SigLIP's form)
AdamW with betas (0.9, 0.98), eps 1e-6, no weight decay on biases, norms, or the logit scale and bias
(`param_groups`); linear warm-up then cosine decay (`lr_factor`); bf16 autocast on CUDA. Under torchrun,
--batch-size is per GPU and the losses see the global batch (objective.py). --accum-freq K makes a step's batch K
micro-batches of --batch-size, with the loss and gradient of the whole batch (objective.accumulated_step).

Departures: the paper fine-tunes pretrained SigLIP on CC3M for 5 epochs at lr 1e-5; the defaults here
train a tiny model from scratch on the shapes world (lr 5e-4). `--init` starts from pretrained weights
instead: SigLIP ViT-B/16 as open_clip releases it (the paper's), OpenAI's CLIP release (a file, or the name
openai/ViT-B-16: downloaded once by download.py) or an open_clip CLIP state dict, or a checkpoint of ours (the
model, its tokenizer and its preprocessing come from the file; --model is then unused). OpenAI's CLIP has no
logit bias; the sigmoid losses get one chosen on the first batch (`--init-bias`). The paper warms up for 50
steps (`--warmup 50`); the default is 5% of the run.
`--logit-lr` gives the logit scale and bias their own learning rate (the paper uses one);
`--concept-labels phrase|scene` and `--concept-logits own` are off by default. `--init-scale` restarts t of
--init weights at a given value (with a bias refitted the same way): the threshold regime of released SigLIP
weights (t ~ 112), for docs/mechanism.md. log.jsonl also holds the diagnostics of diagnostics.py: the
fraction of positive pairs above the sigmoid's threshold and, in the shapes world, the false negatives of
the concept labels.
Beside ckpt.pt and log.jsonl the run draws loss.png, one line per loss term (redrawn at every checkpoint).
"""

import argparse
import contextlib
import errno
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (
    RunInUse,
    Stop,
    checkpoint_parts,
    ignore_signals,
    locked,
    log_record,
    out_problem,
    previous_hint,
    resume_command,
    resume_state,
    save_checkpoint,
    saved_steps,
    skip_or_stop,
    truncate_log,
)
from data import Collate, WordTokenizer, train_transform
from devices import add_device_flag, autocast_dtype, device_problem, log0, setup
from diagnostics import batch_diagnostics
from download import WEIGHTS, DownloadError
from model import CLIP, PRESETS, CLIPConfig
from objective import METHODS, Objective, accumulated_step, loss_terms
from pictures import plot_losses
from pretrained import WEIGHT_NAMES, add_weight_flags, balanced_bias, load_weights, weight_options
from shapes import HOLDOUT_COMBOS, WORLDS, ShapesDataset, ShapesWorld, StepBatches
from webdata import (
    SHARD_LAYOUT,
    OldConceptsFile,
    ShardPlan,
    WebDataset,
    caption_word_counts,
    check_concepts_file,
    endless,
    expand_shards,
    shard_plan,
)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data").add_argument
    data("--data", default="shapes", choices=["shapes", "cc3m"], help="the shapes world, or image-text tar shards")
    data("--data-dir", help="cc3m: a folder of .tar shards, a glob, or DIR/{00000..00331}.tar (any webdataset)")
    data("--caption-key", help="cc3m: the caption from this <key>.json field (default: <key>.txt)")
    data("--concept-key", help="cc3m: concept phrases from this <key>.json field when a sample has it")
    data("--concepts", help="cc3m: phrases precomputed by `python precompute_concepts.py --out FILE`")
    data("--epochs", type=float, help="cc3m: this many passes over the shards (sets --steps)")
    data("--shuffle-buffer", type=int, default=1000, help="cc3m: samples in each reader's shuffle buffer")
    data("--vocab-size", type=int, default=32000, help="cc3m: caption words kept, most frequent first (rest: <unk>)")
    data("--world", default="simple", choices=list(WORLDS), help="shapes: simple, or dense (shapes.WORLDS)")
    data("--holdout-combos", action="store_true", help="shapes: keep shapes.HOLDOUT_COMBOS out of training scenes")
    loss = p.add_argument_group("loss").add_argument
    loss("--method", default="c2lip", choices=METHODS, help="C2LIP, or a baseline (the module docstring)")
    loss("--concept-weight", type=float, default=1.0, help="weight of the concept loss L_npc (c2lip)")
    loss("--pool-weight", type=float, default=0.01, help="weight of the pooled concept loss L_xac (c2lip)")
    loss("--tau", type=float, default=1.0, help="temperature of the cross-modal pooling (paper: 1)")
    labels = "owner: a phrase is positive for its own image only (authors); phrase: for every image with that "
    labels += "phrase; scene (shapes world): for every image holding an object the phrase describes"
    loss("--concept-labels", default="owner", choices=["owner", "phrase", "scene"], help=labels)
    logits = "shared: the concept losses use the caption loss's t and b (paper); own: a pair from t = 10, b = -10"
    loss("--concept-logits", default="shared", choices=["shared", "own"], help=logits)
    model = p.add_argument_group("model").add_argument
    model("--model", default="tiny", choices=list(PRESETS), help="size preset (model.py) when training from scratch")
    init = f"start from SigLIP's or CLIP's released weights (.safetensors/.bin/.pt) or our checkpoint, {WEIGHT_NAMES}"
    model("--init", metavar="PATH_OR_NAME", help=init)
    add_weight_flags(p)
    scale = "with --init: start the logit scale at t = T (the bias from --init-bias, auto: refitted at this t)"
    model("--init-scale", type=float, metavar="T", help=scale)
    model(
        "--init-bias", default="auto", help="logit bias for --init weights without one: auto (first batch) or a number"
    )
    opt = p.add_argument_group("optimizer").add_argument
    opt("--steps", type=int, help="optimizer steps in total, default 600 (a resumed run continues to this)")
    opt("--batch-size", type=int, default=128, help="images per micro-batch (per GPU under torchrun), see --accum-freq")
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
    p = get_parser()
    args = p.parse_args(argv)
    check_numbers(p, args)
    if args.data == "shapes" and args.epochs is not None:
        p.error("--epochs needs --data cc3m: the shapes world is an endless stream (use --steps)")
    if args.data != "shapes":
        check_shards(p, args)
    args.steps = args.steps or 600  # with --epochs, train() sets it from the number of samples
    if args.method != "c2lip" and (args.concept_labels != "owner" or args.concept_logits == "own"):
        p.error("--concept-labels phrase|scene and --concept-logits own only apply to --method c2lip")
    if args.init_scale is not None and (not args.init or not 0 < args.init_scale <= 100):
        p.error("--init-scale needs --init, and a value in (0, 100] (t is clamped at 100)")
    if args.method == "clip" and args.batch_size * int(os.environ.get("WORLD_SIZE", "1")) < 2:
        p.error("--method clip needs a global --batch-size of at least 2: with one image its softmax loss is 0")
    if args.init_bias != "auto":
        try:
            float(args.init_bias)
        except ValueError:
            p.error(f"--init-bias must be 'auto' or a number, not {args.init_bias!r}")
    if (args.bpe or args.spm) and not args.init:
        p.error("--bpe and --spm only apply with --init (training from scratch uses the word tokenizer)")
    if PRESETS[args.model].text.pooling == "last" and not args.init:
        p.error(
            f"--model {args.model} is SigLIP's shape, for --init weights: its text is read at the last position "
            "of a full context, which the word tokenizer does not fill"
        )
    if args.init and not os.path.exists(args.init) and args.init not in WEIGHTS:
        names = ", ".join(WEIGHTS)
        p.error(
            f"--init {args.init}: no such file, and not one of the names {names}. SigLIP's release is "
            "open_clip_model.safetensors (see docs/pretrained.md)"
        )
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if message := device_problem(args.device):
        p.error(f"--device {args.device}: {message}")
    args.out = args.out or os.path.join("runs", args.method)
    if problem := out_problem(args.out):
        p.error(f"--out {args.out}: {problem}")
    return args


def check_numbers(p: argparse.ArgumentParser, args) -> None:
    """Every numeric flag within its range, or an argparse error naming it."""
    for name in ("steps", "batch_size", "accum_freq", "ckpt_every", "log_every", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.tau > 0:
        p.error("--tau must be positive")
    for name in ("lr", "logit_lr", "weight_decay", "grad_clip", "workers", "shuffle_buffer", "max_nonfinite"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    if not args.warmup >= 0:
        p.error("--warmup must be 0 or more: a fraction of --steps below 1, else a number of steps")
    if args.epochs is not None and (not args.epochs > 0 or args.steps is not None):
        p.error("--epochs must be positive, and goes without --steps")


def check_shards(p: argparse.ArgumentParser, args) -> None:
    """--data cc3m: the shards exist and a --concepts file fits them, or an argparse error naming the flag."""
    if args.holdout_combos or args.world != "simple":
        p.error("--holdout-combos and --world only apply to --data shapes")
    if args.concept_labels == "scene":
        p.error("--concept-labels scene needs --data shapes: only the synthetic world knows which images show a phrase")
    if args.data_dir is None:
        p.error(f"--data {args.data} needs --data-dir.\n{SHARD_LAYOUT}")
    try:
        shards = expand_shards(args.data_dir)
    except FileNotFoundError as err:
        p.error(f"--data-dir: {err}")
    if args.concepts and not os.path.isfile(args.concepts):
        p.error(f"--concepts: no file {args.concepts}; write it with: {precompute_command(args, args.concepts)}")
    if args.concepts:
        try:
            check_concepts_file(args.concepts, shards, args.caption_key)
        except OldConceptsFile as err:
            p.error(f"--concepts: {err}; rewrite it with: {precompute_command(args, args.concepts)} --overwrite")
        except ValueError as err:  # the file may be right for other shards: the command writes a new one
            root, ext = os.path.splitext(args.concepts)
            new = next(f"{root}-{i}{ext}" for i in itertools.count(2) if not os.path.exists(f"{root}-{i}{ext}"))
            p.error(f"--concepts: {err}; write one for these shards with: {precompute_command(args, new)}")


def precompute_command(args, out: str) -> str:
    """The command that writes a --concepts file for this run's shards and caption key."""
    command = f"python precompute_concepts.py --data-dir {shlex.quote(args.data_dir)} --out {shlex.quote(out)}"
    return command + (f" --caption-key {shlex.quote(args.caption_key)}" if args.caption_key else "")


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


# ----------------------------------------------------------------------------- data, tokenizer and model


def shapes_world(args, image_size: int) -> ShapesWorld:
    return ShapesWorld(image_size, holdout=HOLDOUT_COMBOS if args.holdout_combos else (), **WORLDS[args.world])


def config_and_tokenizer(args, resume: dict | None, shards: ShardPlan | None) -> tuple[CLIPConfig, object, dict | None]:
    """The model's shape and tokenizer, from the run being resumed, from --init (with its weights), or a preset
    with a word vocabulary of the training captions."""
    if resume:
        if args.init:
            log0(f"resuming {args.out}: --init {args.init} is not read again")
        return *checkpoint_parts(resume), None  # resume_state checked them
    if args.init:
        try:
            ckpt = load_weights(args.init, **weight_options(args))
            cfg, tokenizer = checkpoint_parts(ckpt)
        except (DownloadError, ValueError, FileNotFoundError) as err:  # offline; not weights; no tokenizer file
            sys.exit(f"error: --init {args.init}: {err}{previous_hint(args.init, '--init')}")
        return replace(cfg, concept_logits=args.concept_logits == "own"), tokenizer, ckpt["model"]
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
    reads its own scenes or shards; hard negatives (negclip) are made in the DataLoader workers. With
    --accum-freq K these are micro-batches, K per step."""
    size, normalise = cfg.vision.image_size, cfg.vision.normalise
    collate = Collate(tokenizer, negatives=args.method == "negclip")
    # page-locked batches make the copy to the GPU asynchronous (non_blocking); workers leave signals to us
    loading = dict(collate_fn=collate, num_workers=args.workers, pin_memory=device.type == "cuda")
    loading |= dict(worker_init_fn=ignore_signals)
    if args.data == "shapes":  # an endless stream of fresh scenes, resumable at any step (shapes.StepBatches)
        # The sampler counts micro-batches: step s reads numbers sK ... sK + K - 1, so a resumed run replays
        # them, and the step sees the scenes a batch of K x --batch-size would hold.
        K = args.accum_freq
        dataset = ShapesDataset(
            shapes_world(args, size), args.seed, "train", args.steps * K * args.batch_size * world_size, normalise
        )
        sampler = StepBatches(args.batch_size, start * K, args.steps * K, rank, world_size)
        return dataset, torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loading)
    # Shards: an epoch is steps_per_epoch steps of K micro-batches each (webdata.shard_plan)
    dataset = WebDataset(
        shards.paths,
        train_transform(size, normalise),
        args.caption_key,
        args.concept_key,
        args.concepts,
        args.shuffle_buffer,
        args.seed,
    )
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, **loading)
    return dataset, endless(loader, dataset, first_epoch=start // shards.steps_per_epoch)


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
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        held = saved_steps(os.path.join(args.out, "ckpt.pt"))
        sys.exit(
            f"error: writing to {args.out}: {err.strerror}; the run stops with {held}, as they were before the "
            f"failed write. Free some space, then continue with: {resume_command(command)}"
        )
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def train(args, rank: int, world_size: int, device, stop: Stop, command: str) -> str:
    # ---- setup
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = resume_state(args, ckpt_path, log_path)
    start = resume["step"] if resume else 0
    if resume and rank == 0:
        truncate_log(log_path, start)  # the steps after the checkpoint are replayed: logged once, not twice

    # ---- data, tokenizer, model
    global_batch = args.batch_size * world_size * args.accum_freq
    shards = shard_plan(args.data_dir, args.out, global_batch) if args.data != "shapes" else None
    if shards and args.epochs is not None:
        args.steps = max(1, round(args.epochs * shards.steps_per_epoch))
    cfg, tokenizer, init = config_and_tokenizer(args, resume, shards)
    dataset, loader = batches(args, cfg, tokenizer, start, rank, world_size, shards, device)
    model, cfg, unfitted_bias = make_model(args, cfg, init, device)
    stream = iter(loader)  # after the model: starting a DataLoader draws from torch's generator
    if unfitted_bias:
        cfg, stream = fit_bias(model, cfg, stream, device)
    if init is not None:
        bias = "no bias" if model.logit_bias is None else f"b = {model.logit_bias.item():.2f}"
        log0(f"initialised from {args.init}: t = {model.scale().item():.1f}, {bias}")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log0(f"model {args.init or args.model}: {n_params:.2f}M parameters, {world_size} x {device}, autocast {dtype}")
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
            if not all(p.isfinite().all() for p in model.parameters()):
                sys.exit(f"error: step {step}: the weights are no longer finite; {ckpt_path} keeps the last good ones")
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), config=asdict(cfg))
            state |= dict(step=step, args=vars(args), tokenizer=tokenizer.state_dict(), seed=args.seed)
            state["nonfinite"] = nonfinite  # a streak of skipped steps goes on across a resume
            save_checkpoint(ckpt_path, **state)
            plot_losses(log_path, os.path.join(args.out, "loss.png"))  # the log so far (every record is flushed)

    # ---- loop
    model.train()
    bar = tqdm(total=args.steps, initial=start, desc=f"train {args.method}", dynamic_ncols=True, disable=rank != 0)
    t0, nonfinite = time.time(), resume.get("nonfinite", 0) if resume else 0
    # a step's K micro-batches, drawn K at a time from the one stream (zip of K references to one iterator)
    steps = zip(*[stream] * args.accum_freq)
    with open(log_path if rank == 0 else os.devnull, "a") as log:
        for step, micro_batches in zip(range(start, args.steps), steps):
            micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, args.steps, args.warmup)
            optimizer.zero_grad(set_to_none=True)
            if args.accum_freq == 1:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss, terms = loss_terms(net, micro_batches[0], objective)
                loss.backward()
            else:  # the loss of the K micro-batches together; leaves its gradient in .grad
                loss, terms = accumulated_step(net, micro_batches, objective, dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
            # A non-finite loss or gradient must never reach the weights. Checking it waits for the device
            # once per step, as AMP's GradScaler does for the same reason. A skipped step still reaches the
            # stop check and the checkpoint below: a signal during a streak of them must stop the run.
            finite = bool(torch.isfinite(loss.detach() + grad_norm))
            nonfinite = 0 if finite else nonfinite + 1
            if finite:
                optimizer.step()
            else:
                skip_or_stop(args, step, nonfinite, ckpt_path)
            bar.update()
            # .item() waits for the device: read the values at the log interval only, not every step
            if finite and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
                lr = optimizer.param_groups[0]["lr"]
                seen = dict(epoch=dataset.epoch, skipped=dataset.skipped, noted=dataset.noted) if shards else None
                record = log_record(step + 1, loss, terms, model, lr, time.time() - t0, seen)
                record |= batch_diagnostics(model, micro_batches[0], objective.concept_labels)  # no-grad, this batch
                skipped = {"skipped": sum(record["skipped"].values())} if record.get("skipped") else {}
                bar.set_postfix({k: f"{record[k]:.3f}" for k in terms} | {"t": f"{record['scale']:.1f}"} | skipped)
                log.write(json.dumps(record) + "\n")
                log.flush()
            if stop.requested():
                checkpoint(step + 1)
                log0(f"\nstopped by {signal.Signals(stop.signal).name} after step {step + 1}; saved {ckpt_path}")
                log0(f"resume with:  {resume_command(command)}")
                sys.exit(128 + stop.signal)
            if (step + 1) % args.ckpt_every == 0:
                checkpoint(step + 1)
    bar.close()
    if getattr(dataset, "skipped", None):
        log0(f"skipped samples (corrupt or incomplete, each pass counts them again): {dataset.skipped}")
    if getattr(dataset, "noted", None):
        log0(f"samples kept but changed (each pass counts them again): {dataset.noted}")

    # ---- checkpoint
    checkpoint(args.steps)
    log0(f"wrote {ckpt_path} after {time.time() - t0:.0f}s; evaluate with: python eval.py --ckpt {ckpt_path}")
    return ckpt_path


if __name__ == "__main__":
    main()
