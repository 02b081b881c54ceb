"""Train C2LIP or its baselines. Reads top to bottom: setup, data, model, optimizer, loop, checkpoint.

  python train.py                                  # C2LIP on the shapes world, CPU-sized, writes runs/c2lip
  python train.py --method siglip                  # the baseline: the same run without the concept losses
  python train.py --steps 20 --batch-size 16 --out /tmp/run   # a smoke test in seconds
  python train.py --data cc3m --data-dir /data/cc3m --caption-key shortLLA_captions --concept-key nounphrases \
      --model B/16 --epochs 5 --workers 8             # the paper's data and captions (from scratch: see below)

Paper map (Section 3 and "Training setup" in ../shared/docs/paper.md):
  --method c2lip   L = L_sig + 1.0 * L_npc + 0.01 * L_xac   (--concept-weight, --pool-weight, --tau)
  --method siglip  L = L_sig                                 (the fine-tuned SigLIP baseline)
  --method clip    CLIP's softmax loss, t = 1/0.07 and no bias
AdamW with betas (0.9, 0.98), eps 1e-6, no weight decay on biases, norms, or the logit scale and bias;
linear warm-up then cosine decay; bf16 autocast where it is faster.

Departures: the paper fine-tunes pretrained SigLIP on CC3M for 5 epochs at lr 1e-5; the defaults here
train a tiny model from scratch on the shapes world (lr 5e-4). `--logit-lr` gives the logit scale and
bias their own learning rate (the paper uses one); `--concept-labels phrase` is off by default.
Real data (`--data cc3m` or `wds`) streams tar shards (data.WebDataset); no pretrained weights are loaded,
and there is no multi-GPU launcher: the reader splits shards across distributed ranks when
torch.distributed is initialised, but this script trains on one device.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
from tqdm import tqdm

from data import (SHARD_LAYOUT, Collate, ShapesDataset, ShapesWorld, StepBatches, WebDataset, WordTokenizer, cache_dir,
                  caption_word_counts, expand_shards, shard_sizes, train_transform)  # fmt: skip
from losses import clip_loss, concept_loss, pooled_concept_loss, siglip_loss
from model import CLIP, PRESETS, CLIPConfig


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes", choices=["shapes", "cc3m", "wds"],
                   help="shapes: the embedded synthetic world; cc3m or wds: image-text tar shards in --data-dir")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="cc3m/wds: a folder of .tar shards, a glob, or DIR/{00000..00331}.tar")
    p.add_argument("--caption-key", default=None, help="cc3m/wds: caption from this <key>.json field (default: <key>.txt)")
    p.add_argument("--concept-key", default=None, help="cc3m/wds: concept phrases from this <key>.json field when present")
    p.add_argument("--concepts", default=None, help="cc3m/wds: phrases precomputed by `python concepts.py --data-dir ... --out FILE`")
    p.add_argument("--epochs", type=float, default=None, help="cc3m/wds: train this many passes over the shards (sets --steps)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="cc3m/wds: samples held in the shuffle buffer of each reader")
    p.add_argument("--vocab-size", type=int, default=32000, help="cc3m/wds: most frequent caption words kept (rest: <unk>)")
    p.add_argument("--method", default="c2lip", choices=["c2lip", "siglip", "clip"], help="loss: C2LIP or a baseline")
    p.add_argument("--concept-weight", type=float, default=1.0, help="weight of the concept loss L_npc (c2lip)")
    p.add_argument("--pool-weight", type=float, default=0.01, help="weight of the pooled concept loss L_xac (c2lip)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of the cross-modal pooling (paper: 1)")
    p.add_argument("--concept-labels", default="owner", choices=["owner", "phrase"],
                   help="owner: a phrase is positive only for its own image (authors); "
                        "phrase: for every image with the same normalised phrase")  # fmt: skip
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model size preset (model.py)")
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
    p.add_argument("--out", default=None, help="output folder for ckpt.pt and log.jsonl (default: runs/<method>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
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
    if args.method == "clip" and args.concept_labels == "phrase":
        p.error("--concept-labels only applies to --method c2lip")
    args.out = args.out or os.path.join("runs", args.method)
    return args


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


def loss_terms(model: CLIP, batch: dict, args) -> dict[str, torch.Tensor]:
    """The unweighted loss terms of one batch: {'caption': L_sig, 'concept': L_npc, 'pooled': L_xac}."""
    image_emb, patch_emb = model.encode_image(batch["images"])  # (B, D), (B, N, D)
    text_emb = model.encode_text(batch["captions"])  # (B, D)
    t, b = model.scale(), model.bias()
    if args.method == "clip":
        return {"caption": clip_loss(image_emb, text_emb, t)}
    terms = {"caption": siglip_loss(image_emb, text_emb, t, b)}
    if args.method == "c2lip":
        concept_emb = model.encode_text(batch["concepts"])  # (K, D): phrases run as their own short sequences
        owner = batch["owner"]
        ids = batch["phrase_ids"] if args.concept_labels == "phrase" else None
        if args.concept_weight:
            terms["concept"] = concept_loss(image_emb, concept_emb, owner, t, b, ids)
        if args.pool_weight:
            terms["pooled"] = pooled_concept_loss(patch_emb, concept_emb, owner, t, b, args.tau, ids)
    return terms


def lr_factor(step: int, args) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at --steps."""
    warmup = max(1, round(args.warmup * args.steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))


def save_checkpoint(path: str, **state) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a broken ckpt.pt."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    device = pick_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = torch.load(ckpt_path, map_location="cpu", weights_only=False) if args.resume and os.path.exists(ckpt_path) else None

    # ---- data
    cfg = PRESETS[args.model]
    start = resume["step"] if resume else 0
    if args.data == "shapes":  # an endless stream of fresh scenes, batch `step` = scenes step*B ... step*B + B - 1
        world = ShapesWorld(image_size=cfg.vision.image_size)
        if resume:
            tokenizer = WordTokenizer.from_state_dict(resume["tokenizer"])
        else:  # a few thousand captions hold every word of this small world
            captions = [world.caption(world.scene(args.seed, "train", i)) for i in range(2000)]
            tokenizer = WordTokenizer.build(captions, context_length=cfg.text.context_length)
        dataset = ShapesDataset(world, args.seed, "train", length=args.steps * args.batch_size)
        batches = torch.utils.data.DataLoader(
            dataset, batch_sampler=StepBatches(args.batch_size, start, args.steps), collate_fn=Collate(tokenizer),
            num_workers=args.workers, persistent_workers=False,
        )  # fmt: skip
    else:  # tar shards: one pass over them is an epoch; sample counts and caption words are cached
        shards = expand_shards(args.data_dir)
        cache = cache_dir(shards, args.out)
        samples = sum(shard_sizes(shards, cache))
        ranks = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        steps_per_epoch = max(1, math.ceil(samples / (args.batch_size * ranks)))
        if args.epochs is not None:
            args.steps = max(1, round(args.epochs * steps_per_epoch))
        print(f"{len(shards)} shards, {samples} samples: {steps_per_epoch} steps per epoch, {args.steps / steps_per_epoch:.2f} epochs")
        if resume:
            tokenizer = WordTokenizer.from_state_dict(resume["tokenizer"])
        else:
            counts = caption_word_counts(shards, args.caption_key, cache)
            tokenizer = WordTokenizer.from_counts(counts, cfg.text.context_length, max_size=args.vocab_size)
        dataset = WebDataset(shards, train_transform(cfg.vision.image_size), args.caption_key, args.concept_key,
                             args.concepts, args.shuffle_buffer, args.seed)  # fmt: skip
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=Collate(tokenizer), num_workers=args.workers)
        batches = endless(loader, dataset, first_epoch=start // steps_per_epoch)

    # ---- model
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer)))
    if args.method == "clip":  # CLIP's softmax form: t = 1/0.07 and no bias
        cfg = replace(cfg, init_logit_scale=math.log(1 / 0.07), init_logit_bias=None)
    if resume:
        cfg = CLIPConfig.from_dict(resume["config"])
    model = CLIP(cfg).to(device)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, autocast {dtype}")
    print("config:", json.dumps({"model": asdict(cfg), "args": vars(args)}))

    # ---- optimizer: no weight decay on biases, norms (1-d tensors) or the logit scale and bias
    logit = [p for n, p in model.named_parameters() if n.startswith("logit_")]
    decay = [p for n, p in model.named_parameters() if not n.startswith("logit_") and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if not n.startswith("logit_") and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay, "base_lr": args.lr},
            {"params": no_decay, "weight_decay": 0.0, "base_lr": args.lr},
            {"params": logit, "weight_decay": 0.0, "base_lr": args.logit_lr or args.lr},
        ],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        print(f"resumed from {ckpt_path} at step {start}")

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
            config=asdict(cfg), args=vars(args), tokenizer=tokenizer.state_dict(), seed=args.seed,
        )  # fmt: skip

    # ---- loop
    weights = {"caption": 1.0, "concept": args.concept_weight, "pooled": args.pool_weight}
    model.train()
    bar = tqdm(total=args.steps, initial=start, desc=f"train {args.method}", dynamic_ncols=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        for step, batch in zip(range(start, args.steps), batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, args)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                terms = loss_terms(model, batch, args)
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
                          "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}  # fmt: skip
                if args.data != "shapes":
                    record |= {"epoch": dataset.epoch, "skipped": skipped}
                log.write(json.dumps(record) + "\n")
                log.flush()
            if (step + 1) % args.ckpt_every == 0:
                checkpoint(step + 1)
    bar.close()
    if getattr(dataset, "skipped", None):
        print(f"skipped samples (corrupt or incomplete, each pass counts them again): {dataset.skipped}")

    # ---- checkpoint
    checkpoint(args.steps)
    print(f"wrote {ckpt_path} after {time.time() - t0:.0f}s; evaluate with: python eval.py --ckpt {ckpt_path}")
    return ckpt_path


if __name__ == "__main__":
    main()
