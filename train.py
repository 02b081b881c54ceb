"""Train C2LIP or its baselines. Reads top to bottom: setup, data, model, optimizer, loop, checkpoint.

  python train.py                                  # C2LIP on the shapes world, CPU-sized, writes runs/c2lip
  python train.py --method siglip                  # the baseline: the same run without the concept losses
  python train.py --steps 20 --batch-size 16 --out /tmp/run   # a smoke test in seconds
  python train.py --data cc3m --data-dir /data/cc3m --caption-key shortLLA_captions --concept-key nounphrases \
      --model B/16 --epochs 5 --workers 8             # the paper's data and captions, from scratch
  torchrun --nproc_per_node 8 train.py --data cc3m --data-dir /data/cc3m --init ViT-B-16.pt \
      --method c2lip --lr 1e-5 --batch-size 96 --epochs 5   # the paper's recipe: fine-tune CLIP on 8 GPUs

Paper map (Section 3 and "Training setup" in ../shared/docs/paper.md):
  --method c2lip   L = L_sig + 1.0 * L_npc + 0.01 * L_xac   (--concept-weight, --pool-weight, --tau)
  --method siglip  L = L_sig                                 (the fine-tuned SigLIP baseline)
  --method clip    CLIP's softmax loss, t = 1/0.07 and no bias
  --method negclip L_sig with one rule-made hard negative per caption as extra texts that every image must
                   score below (concepts.hard_negative; the NegCLIP-style baseline, in SigLIP's form)
AdamW with betas (0.9, 0.98), eps 1e-6, no weight decay on biases, norms, or the logit scale and bias;
linear warm-up then cosine decay; bf16 autocast on CUDA. Under torchrun, --batch-size is per GPU and
the losses see the global batch (losses.gather).

Departures: the paper fine-tunes pretrained SigLIP on CC3M for 5 epochs at lr 1e-5; the defaults here
train a tiny model from scratch on the shapes world (lr 5e-4). `--init` starts from pretrained weights
instead: OpenAI's CLIP release, an open_clip state dict of the same architecture, or a checkpoint of ours
(the model, its tokenizer and its pixel normalisation come from the file; --model is then unused).
OpenAI's CLIP has no logit bias; the sigmoid losses get one chosen on the first batch (`--init-bias`).
`--logit-lr` gives the logit scale and bias their own learning rate (the paper uses one);
`--concept-labels phrase` and `--concept-logits own` are off by default.
`--holdout-combos` keeps data.HOLDOUT_COMBOS out of every training scene (eval.py's generalisation split);
`--world dense` trains in the shapes world where colours and shapes repeat within a scene (data.WORLDS).
Beside ckpt.pt and log.jsonl the run draws loss.png, one line per loss term (redrawn at every checkpoint).
Real data (`--data cc3m` or `wds`) streams tar shards (data.WebDataset), split across DataLoader workers
and, under torchrun, across ranks.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (HOLDOUT_COMBOS, SHARD_LAYOUT, WORLDS, BPETokenizer, Collate, ShapesDataset, ShapesWorld, StepBatches, WebDataset,
                  WordTokenizer, cache_dir, caption_word_counts, expand_shards, shard_sizes, tokenizer_from_state_dict,
                  train_transform)  # fmt: skip
from losses import clip_loss, concept_loss, gather, gather_owner, pooled_concept_loss, siglip_loss
from model import CLIP, PRESETS, CLIPConfig, convert_openai_state_dict, is_torchscript, read_torchscript_state_dict


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes", choices=["shapes", "cc3m", "wds"],
                   help="shapes: the embedded synthetic world; cc3m or wds: image-text tar shards in --data-dir")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="cc3m/wds: a folder of .tar shards, a glob, or DIR/{00000..00331}.tar")
    p.add_argument("--caption-key", default=None, help="cc3m/wds: caption from this <key>.json field (default: <key>.txt)")
    p.add_argument("--concept-key", default=None, help="cc3m/wds: concept phrases from this <key>.json field when present")
    p.add_argument("--concepts", default=None, help="cc3m/wds: phrases precomputed by `python concepts.py --data-dir ... --out FILE`")
    p.add_argument("--epochs", type=float, default=None, help="cc3m/wds: train this many passes over the shards (sets --steps)")
    p.add_argument("--world", default="simple", choices=list(WORLDS),
                   help="shapes: simple (2-4 objects, distinct colours and shapes) or dense (3-5 objects, colours and "
                        "shapes repeat within a scene; data.WORLDS)")  # fmt: skip
    p.add_argument("--holdout-combos", action="store_true",
                   help="shapes: no training scene holds a colour-shape pair of data.HOLDOUT_COMBOS (eval.py's held-out columns)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="cc3m/wds: samples held in the shuffle buffer of each reader")
    p.add_argument("--vocab-size", type=int, default=32000, help="cc3m/wds: most frequent caption words kept (rest: <unk>)")
    p.add_argument("--method", default="c2lip", choices=["c2lip", "siglip", "clip", "negclip"],
                   help="loss: C2LIP or a baseline (negclip: siglip plus a rule-made hard negative per caption)")
    p.add_argument("--concept-weight", type=float, default=1.0, help="weight of the concept loss L_npc (c2lip)")
    p.add_argument("--pool-weight", type=float, default=0.01, help="weight of the pooled concept loss L_xac (c2lip)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of the cross-modal pooling (paper: 1)")
    p.add_argument("--concept-labels", default="owner", choices=["owner", "phrase"],
                   help="owner: a phrase is positive only for its own image (authors); "
                        "phrase: for every image with the same normalised phrase")  # fmt: skip
    p.add_argument("--concept-logits", default="shared", choices=["shared", "own"],
                   help="shared: the concept losses use the caption loss's t and b (paper); own: a pair of their own "
                        "(CLIPConfig.concept_logits, started at t = 10, b = -10)")  # fmt: skip
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model size preset (model.py), when training from scratch")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from these weights: OpenAI's CLIP release (ViT-B-16.pt), an open_clip state dict, "
                        "or a checkpoint of ours; the model shape, tokenizer and normalisation come from the file")
    p.add_argument("--bpe", default=None, metavar="PATH",
                   help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for --init with CLIP weights "
                        "(default: the copy inside an installed open_clip_torch)")
    p.add_argument("--clip-act", default="quick_gelu", choices=["quick_gelu", "gelu"],
                   help="activation of --init CLIP weights, which their shapes cannot tell: quick_gelu for OpenAI's "
                        "(and open_clip's *-quickgelu) models, gelu for open_clip's own ViT-B-16 trainings")
    p.add_argument("--init-bias", default="auto",
                   help="logit bias for --init weights that have none (OpenAI's CLIP) under a sigmoid loss: auto "
                        "(midway between matched and unmatched logits of the first batch) or a number")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in total, default 600 (a resumed run continues to this)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--logit-lr", type=float, default=None, help="learning rate of logit scale and bias (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up length as a fraction of --steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the training scenes")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device string")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU and MPS")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (render or decode + NLTK chunking)")
    p.add_argument("--out", default=None, help="output folder for ckpt.pt, log.jsonl and loss.png (default: runs/<method>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps on GPU)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward pass: less memory, ~30%% more compute")  # fmt: skip
    p.add_argument("--ckpt-every", type=int, default=100, help="write the checkpoint every this many steps")
    p.add_argument("--log-every", type=int, default=10, help="append to log.jsonl every this many steps")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "ckpt_every", "log_every", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.data == "shapes":
        if args.epochs is not None:
            p.error("--epochs needs --data cc3m or wds: the shapes world is an endless stream (use --steps)")
    else:
        if args.holdout_combos or args.world != "simple":
            p.error("--holdout-combos and --world only apply to --data shapes")
        if args.data_dir is None:
            p.error(f"--data {args.data} needs --data-dir.\n{SHARD_LAYOUT}")
        try:
            expand_shards(args.data_dir)
        except FileNotFoundError as err:
            p.error(f"--data-dir: {err}")
        if args.concepts and not os.path.isfile(args.concepts):
            p.error(f"--concepts: no file {args.concepts}; write it with: python concepts.py --data-dir {args.data_dir} --out {args.concepts}")
    if args.epochs is not None and (args.epochs <= 0 or args.steps is not None):
        p.error("--epochs must be positive, and goes without --steps")
    args.steps = args.steps or 600  # with --epochs, main() sets it from the number of samples
    if args.tau <= 0:
        p.error("--tau must be positive")
    if args.method != "c2lip" and (args.concept_labels == "phrase" or args.concept_logits == "own"):
        p.error("--concept-labels phrase and --concept-logits own only apply to --method c2lip")
    if args.init_bias != "auto":
        try:
            float(args.init_bias)
        except ValueError:
            p.error(f"--init-bias must be 'auto' or a number, not {args.init_bias!r}")
    if args.bpe and not args.init:
        p.error("--bpe only applies with --init (training from scratch uses the word tokenizer)")
    if args.init and not os.path.exists(args.init):
        p.error(f"--init {args.init}: no such file. OpenAI's ViT-B/16 release is ViT-B-16.pt (see the README)")
    args.out = args.out or os.path.join("runs", args.method)
    return args


def shapes_world(args, image_size: int) -> ShapesWorld:
    return ShapesWorld(image_size, holdout=HOLDOUT_COMBOS if args.holdout_combos else (), **WORLDS[args.world])


def log0(*text) -> None:
    """Print on rank 0 only (every rank runs this file under torchrun)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*text, flush=True)


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":  # bf16 on CUDA; on CPU it measured no faster (bench/precision.py), so fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def loss_terms(model, batch: dict, args) -> dict[str, torch.Tensor]:
    """The unweighted loss terms of one batch: {'caption': L_sig, 'concept': L_npc, 'pooled': L_xac}.
    Under torchrun the embeddings of every rank are gathered first, so each loss sees the global batch."""
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    # The phrases (c2lip) or the hard negatives (negclip) go through forward as its third text input:
    # DistributedDataParallel only prepares gradient syncing for what forward computes.
    extra = {"c2lip": "concepts", "negclip": "negatives"}.get(args.method)
    image_emb, patch_emb, text_emb, extra_emb = model(batch["images"], batch["captions"], batch[extra] if extra else None)
    image_emb, text_emb = gather(image_emb), gather(text_emb)  # (B, D) each, B over all ranks
    t, b = raw.scale(), raw.bias()
    if args.method == "clip":
        return {"caption": clip_loss(image_emb, text_emb, t)}
    negatives = gather(extra_emb[batch["has_negative"]]) if args.method == "negclip" else None  # (M, D), M over all ranks
    terms = {"caption": siglip_loss(image_emb, text_emb, t, b, negatives)}
    if args.method == "c2lip":
        concept_emb = gather(extra_emb)  # (K, D), K over all ranks
        owner = gather_owner(batch["owner"], len(batch["images"]))  # (K,) indices into the global batch
        ids = gather(batch["phrase_ids"]) if args.concept_labels == "phrase" else None
        t, b = raw.concept_scale_bias()  # t and b again, unless --concept-logits own
        if args.concept_weight:
            terms["concept"] = concept_loss(image_emb, concept_emb, owner, t, b, ids)
        if args.pool_weight:
            patch_emb = gather(patch_emb)  # (B, N, D)
            terms["pooled"] = pooled_concept_loss(patch_emb, concept_emb, owner, t, b, args.tau, ids)
    return terms


def lr_factor(step: int, args) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at --steps."""
    warmup = max(1, round(args.warmup * args.steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))


def load_weights(path: str, bpe: str | None = None, activation: str = "quick_gelu") -> dict:
    """A checkpoint in our format ({"config", "model", "tokenizer", ...}) from any of:
      - a checkpoint of ours, returned as it is;
      - OpenAI's CLIP release, a TorchScript archive, read without running its code (model.py);
      - an open_clip state dict of the same architecture (torch.save; under "state_dict" in open_clip's
        training checkpoints). CLIP weights get CLIP's BPE tokenizer, read from `bpe`.
    torch.load runs with weights_only=True: a downloaded file may hold tensors and plain data, not code."""
    if is_torchscript(path):
        state = read_torchscript_state_dict(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "model" in state and "config" in state:
            return state
        state = state.get("state_dict", state)
    cfg, state = convert_openai_state_dict(state, activation)
    tokenizer = BPETokenizer.from_file(bpe, cfg.text.context_length)
    return {"config": asdict(cfg), "model": state, "tokenizer": tokenizer.state_dict(), "converted_from": path}


@torch.no_grad()
def balanced_bias(model: CLIP, batch: dict) -> float:
    """A logit bias b for weights trained without one, from one batch: midway between the mean logit
    t * cos of the matching image-caption pairs and the mean logit of all other pairs.

    Why not SigLIP's b = -10: it is made for t = 10 and embeddings that start unrelated (cos ~ 0), where
    every pair starts at a logit of -10, "almost surely not a match", the right prior when 1 pair in B
    matches. A pretrained CLIP has t = 100 and cosines in a narrow band well above 0 (the modality gap),
    matched pairs only a little above the rest; with b = -10 every pair would start far above 0, "surely
    a match", and the first steps would spend the pretrained features pushing all pairs apart. Midway,
    matched pairs start above 0 and the others below: the sigmoid loss starts from CLIP's own ranking,
    and b is learned from there."""
    image_emb, _ = model.encode_image(batch["images"])  # (B, D)
    cos = image_emb @ model.encode_text(batch["captions"]).T  # (B, B)
    match = torch.eye(len(cos), dtype=torch.bool, device=cos.device)
    return -(model.scale() * (cos[match].mean() + cos[~match].mean()) / 2).item()


def save_checkpoint(path: str, **state) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a broken ckpt.pt."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


LOSS_TERMS = {"caption": (31, 119, 180), "concept": (214, 39, 40), "pooled": (44, 160, 44)}  # term -> line colour


def plot_losses(log_path: str, out_path: str, size: tuple[int, int] = (640, 400)) -> str | None:
    """log.jsonl -> a PNG of each loss term against the step, one line per term, with axes and a legend
    (PIL's default font). Unweighted terms, as logged: the weights of the sum are in the run's config.
    Returns out_path, or None for a log with no records yet."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    # a diverged run logs nan or inf: those points are left out rather than breaking the picture (and the run)
    lines = {term: [(r["step"], r[term]) for r in records if math.isfinite(r.get(term, math.nan))] for term in LOSS_TERMS}
    lines = {term: points for term, points in lines.items() if points}
    if not lines:
        return None
    (width, height), (left, right, top, bottom) = size, (56, 100, 16, 36)
    steps = [s for points in lines.values() for s, _ in points]
    values = [v for points in lines.values() for _, v in points]
    x0, x1, y0, y1 = min(steps), max(steps), min(values), max(values)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)  # a single point or a flat line still has an axis

    def pixel(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom))  # fmt: skip

    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):  # tick labels: five values up the y axis, three steps along the x axis
        value = y0 + (y1 - y0) * k / 4
        draw.text((4, pixel(x0, value)[1] - 5), f"{value:.3g}", fill="black", font=font)
    for step in sorted({x0, (x0 + x1) // 2, x1}):
        draw.text((pixel(step, y0)[0] - 8, height - bottom + 4), str(step), fill="black", font=font)
    draw.text(((width - right) // 2, height - 16), "step", fill="black", font=font)
    draw.text((left + 4, 2), "loss (each term unweighted)", fill="black", font=font)
    for k, (term, points) in enumerate(lines.items()):
        colour = LOSS_TERMS[term]
        draw.line([pixel(*p) for p in points] * (1 + (len(points) == 1)), fill=colour, width=2)  # a lone point: a dot
        y = top + 8 + 16 * k  # the legend, right of the plot
        draw.line([(width - right + 8, y), (width - right + 28, y)], fill=colour, width=2)
        draw.text((width - right + 34, y - 6), term, fill="black", font=font)
    img.save(out_path)
    return out_path


def setup_distributed(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `python train.py` is rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, pick_device(args.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if pick_device(args.device).type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:  # CPU processes talk over gloo: slow, but it runs the same code path anywhere
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


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
            raise RuntimeError(f"a pass over {len(dataset.shards)} shards gave no usable sample (skipped: "
                               f"{dataset.skipped}); check the shards and --caption-key")  # fmt: skip
        epoch += 1


def main(argv=None) -> str:
    # ---- setup
    args = get_args(argv)
    rank, world_size, device = setup_distributed(args)
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = torch.load(ckpt_path, map_location="cpu", weights_only=False) if args.resume and os.path.exists(ckpt_path) else None
    if args.resume and resume is None:
        log0(f"--resume: no checkpoint at {ckpt_path} yet, starting from step 0")

    # ---- data: the shapes world, or tar shards (one pass over them is an epoch; counts and words cached)
    start = resume["step"] if resume else 0
    if args.data != "shapes":
        shards = expand_shards(args.data_dir)
        cache = cache_dir(shards, args.out)
        samples = sum(shard_sizes(shards, cache))
        steps_per_epoch = max(1, math.ceil(samples / (args.batch_size * world_size)))
        if args.epochs is not None:
            args.steps = max(1, round(args.epochs * steps_per_epoch))
        log0(f"{len(shards)} shards, {samples} samples: {steps_per_epoch} steps per epoch, {args.steps / steps_per_epoch:.2f} epochs")

    # ---- the model's shape and tokenizer: from the run being resumed, from --init, or a preset
    init = None
    if resume:
        cfg, tokenizer = CLIPConfig.from_dict(resume["config"]), tokenizer_from_state_dict(resume["tokenizer"])
        if args.init:
            log0(f"resuming {ckpt_path}: --init {args.init} is not read again")
    elif args.init:
        ckpt = load_weights(args.init, args.bpe, args.clip_act)
        cfg, init, tokenizer = CLIPConfig.from_dict(ckpt["config"]), ckpt["model"], tokenizer_from_state_dict(ckpt["tokenizer"])
    else:
        cfg = PRESETS[args.model]
        if args.data == "shapes":  # a few thousand captions hold every word of this small world
            world = shapes_world(args, cfg.vision.image_size)
            captions = [world.caption(world.scene(args.seed, "train", i)) for i in range(2000)]
            tokenizer = WordTokenizer.build(captions, context_length=cfg.text.context_length)
        else:  # the most frequent words of every training caption, counted once
            counts = caption_word_counts(shards, args.caption_key, cache)
            tokenizer = WordTokenizer.from_counts(counts, cfg.text.context_length, max_size=args.vocab_size)
        cfg = replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer)))
        if args.method == "clip":  # CLIP's softmax form: t = 1/0.07 and no bias
            cfg = replace(cfg, init_logit_scale=math.log(1 / 0.07), init_logit_bias=None)

    if not resume:
        cfg = replace(cfg, concept_logits=args.concept_logits == "own")

    # --batch-size is per rank; each rank reads its own scenes or shards
    size, normalise = cfg.vision.image_size, cfg.vision.normalise
    collate = Collate(tokenizer, negatives=args.method == "negclip")  # hard negatives are made in the workers
    if args.data == "shapes":  # an endless stream of fresh scenes, resumable at any step (data.StepBatches)
        world = shapes_world(args, size)
        dataset = ShapesDataset(world, args.seed, "train", args.steps * args.batch_size * world_size, normalise)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=StepBatches(args.batch_size, start, args.steps, rank, world_size),
            collate_fn=collate, num_workers=args.workers,
        )  # fmt: skip
        batches = loader
    else:
        dataset = WebDataset(shards, train_transform(size, normalise), args.caption_key, args.concept_key,
                             args.concepts, args.shuffle_buffer, args.seed)  # fmt: skip
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers)
        batches = endless(loader, dataset, first_epoch=start // steps_per_epoch)

    # ---- model
    if init is not None:  # the loss decides whether there is a bias: CLIP's softmax form has none
        has_bias = "logit_bias" in init
        if args.method == "clip":
            init.pop("logit_bias", None)
        elif not has_bias:
            init["logit_bias"] = torch.tensor(-10.0 if args.init_bias == "auto" else float(args.init_bias))
        cfg = replace(cfg, init_logit_bias=init["logit_bias"].item() if "logit_bias" in init else None)
    model = CLIP(cfg).to(device)
    model.visual.grad_checkpointing = model.text.grad_checkpointing = args.grad_checkpointing
    if init is not None:
        # The concept losses' own (t, b) is a choice of this run: kept from the weights when both have
        # one, else started fresh (or dropped).
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith("concept_logit_")}
        model.load_state_dict(fresh | {k: v for k, v in init.items() if not k.startswith("concept_logit_") or k in fresh})
        if args.method != "clip" and not has_bias and args.init_bias == "auto":
            with torch.no_grad():  # every rank computes it; DistributedDataParallel then keeps rank 0's
                model.logit_bias.fill_(balanced_bias(model, {k: v.to(device) for k, v in next(iter(loader)).items()}))
            cfg = replace(cfg, init_logit_bias=model.logit_bias.item())
        bias = "no bias" if model.logit_bias is None else f"b = {model.logit_bias.item():.2f}"
        log0(f"initialised from {args.init}: t = {model.scale().item():.1f}, {bias}")
    name = args.init or args.model
    log0(f"model {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world_size} x {device}, autocast {dtype}")
    log0("config:", json.dumps({"model": asdict(cfg), "args": vars(args)}))

    # ---- optimizer: no weight decay on biases, norms (1-d tensors) or the logit scale and bias
    logit = [p for n, p in model.named_parameters() if "logit_" in n]
    decay = [p for n, p in model.named_parameters() if "logit_" not in n and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if "logit_" not in n and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay, "base_lr": args.lr},
            {"params": no_decay, "weight_decay": 0.0, "base_lr": args.lr},
            {"params": logit, "weight_decay": 0.0, "base_lr": args.lr if args.logit_lr is None else args.logit_lr},
        ],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        log0(f"resumed from {ckpt_path} at step {start}")
    # `model` stays the plain module (checkpoints hold its state_dict: no "module." or "_orig_mod."
    # prefixes); `net` is what the loop calls: compiled and/or wrapped for gradient averaging.
    net = torch.compile(model) if args.compile else model
    if world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(step: int) -> None:
        if rank != 0:  # one writer; every rank holds the same weights
            return
        save_checkpoint(
            ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
            config=asdict(cfg), args=vars(args), tokenizer=tokenizer.state_dict(), seed=args.seed,
        )  # fmt: skip
        plot_losses(log_path, os.path.join(args.out, "loss.png"))  # the log so far (every record is flushed)

    # ---- loop
    weights = {"caption": 1.0, "concept": args.concept_weight, "pooled": args.pool_weight}
    model.train()
    bar = tqdm(total=args.steps, initial=start, desc=f"train {args.method}", dynamic_ncols=True, disable=rank != 0)
    t0 = time.time()
    with open(log_path if rank == 0 else os.devnull, "a" if resume else "w") as log:
        for step, batch in zip(range(start, args.steps), batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, args)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                terms = loss_terms(net, batch, args)
            loss = sum(weights[name] * value for name, value in terms.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()

            bar.update()
            postfix = {k: f"{v.item():.3f}" for k, v in terms.items()} | {"t": f"{model.scale().item():.1f}"}
            skipped = getattr(dataset, "skipped", {})  # samples the stream dropped so far, by reason (data.py)
            bar.set_postfix(postfix | ({"skipped": sum(skipped.values())} if skipped else {}))
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                record = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                          "scale": model.scale().item(), "bias": model.bias().item(),
                          **(dict(zip(("concept_scale", "concept_bias"), (v.item() for v in model.concept_scale_bias())))
                             if cfg.concept_logits else {}),
                          "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}  # fmt: skip
                if args.data != "shapes":
                    record |= {"epoch": dataset.epoch, "skipped": skipped}
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
        dist.destroy_process_group()
    return ckpt_path


if __name__ == "__main__":
    main()
