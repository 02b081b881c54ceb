"""What a training run starts from: its checkpoint (--resume), released weights (--init), or a preset.

  start_model    the model, its config and tokenizer, from one of the three
  init_model     --init's weights (a file, a release's name, or a checkpoint of ours) as a model on its device,
                 with the logit scale and bias the loss needs
  fit_bias       --init-bias auto: the bias chosen on the first batch (`balanced_bias`)

Departures (docs/paper.md): OpenAI's CLIP has no logit bias, which the sigmoid losses need: it gets one
midway between the matched and unmatched logits of the first batch. SigLIP's weights bring their own t and b.
--init-scale restarts t at a given value (for docs/mechanism.md), with the bias refitted at it.

Dimension legend: B images (= captions), D joint embedding width.
"""

import itertools
import math
import sys
from dataclasses import replace

import torch

from baselines.objectives import model_class
from model import CLIP, PRESETS, CLIPConfig
from released.download import DownloadError
from released.weights import load_weights, weight_options
from run.checkpoint import checkpoint_parts, previous_hint
from run.devices import log0
from sources.loader import word_tokenizer


def start_model(args, resume: dict | None, plan, device) -> tuple[CLIP, object, object, bool]:
    """(model on `device`, config, tokenizer, whether its logit bias is to be fitted on the first batch) of the run
    being resumed (its weights are loaded with the optimizer's), of --init's weights, or of a preset from
    scratch, with a word vocabulary of the training captions."""
    if args.init and not resume:
        model, cfg, tokenizer, unfitted_bias = init_model(args, device)
    else:
        if resume:
            if args.init:
                log0(f"resuming {args.out}: --init {args.init} is not read again")
            cfg, tokenizer = checkpoint_parts(resume)  # resume_state checked them
        else:
            cfg = PRESETS[args.model]
            tokenizer = word_tokenizer(args, cfg.text.context_length, plan)
            cfg = replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer)))
            if args.method == "clip":  # CLIP's softmax form: t = 1/0.07 and no bias
                cfg = replace(cfg, init_logit_scale=math.log(1 / 0.07), init_logit_bias=None)
        model, unfitted_bias = model_class(args)(cfg).to(device), False  # CLIP, or the study's
    model.visual.grad_checkpointing = model.text.grad_checkpointing = args.grad_checkpointing
    return model, cfg, tokenizer, unfitted_bias


def init_model(args, device) -> tuple[CLIP, CLIPConfig, object, bool]:
    """(model on `device` with --init's weights, its config, its tokenizer, whether its logit bias is still to
    be fitted on the first batch). The loss decides whether there is a bias: CLIP's softmax form has none;
    released CLIP weights get one for the sigmoid losses (--init-bias). --init-scale replaces the weights'
    t, and with it their bias, which only fits the t it was learned with. One line for anything unreadable."""
    try:
        ckpt = load_weights(args.init, **weight_options(args))
        cfg, tokenizer = checkpoint_parts(ckpt)
    except (DownloadError, ValueError, FileNotFoundError) as err:  # offline; not weights; no tokenizer file
        sys.exit(f"error: --init {args.init}: {err}{previous_hint(args.init, '--init')}")
    init = ckpt["model"]
    has_bias = "logit_bias" in init and args.init_scale is None
    if args.init_scale is not None:
        init["logit_scale"] = torch.tensor(math.log(args.init_scale))
        cfg = replace(cfg, init_logit_scale=math.log(args.init_scale))
    if args.method == "clip":
        init.pop("logit_bias", None)
    elif not has_bias:
        init["logit_bias"] = torch.tensor(-10.0 if args.init_bias == "auto" else float(args.init_bias))
    cfg = replace(cfg, init_logit_bias=init["logit_bias"].item() if "logit_bias" in init else None)
    try:
        model = model_class(args)(cfg).to(device)
        # The concept losses' own (t, b) is a choice of this run: kept from the weights when both have one,
        # else started fresh (or dropped).
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith("concept_logit_")}
        model.load_state_dict(
            fresh | {k: v for k, v in init.items() if not k.startswith("concept_logit_") or k in fresh}
        )
    except (ValueError, RuntimeError, MemoryError, SystemError) as err:  # checkpoint_parts foresaw none of these
        sys.exit(f"error: --init {args.init}: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
    return model, cfg, tokenizer, args.method != "clip" and not has_bias and args.init_bias == "auto"


def fit_bias(model: CLIP, cfg: CLIPConfig, stream, device) -> tuple[CLIPConfig, object]:
    """--init-bias auto: the logit bias from the first batch (`balanced_bias`), which is then trained on as
    usual; returns the config that records it and the stream, first batch included. Every rank computes it;
    DistributedDataParallel then keeps rank 0's."""
    first = next(stream)
    with torch.no_grad():
        model.logit_bias.fill_(balanced_bias(model, {k: v.to(device) for k, v in first.items()}))
    return replace(cfg, init_logit_bias=model.logit_bias.item()), itertools.chain([first], stream)


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
