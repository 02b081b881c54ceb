"""The steps that are not the paper's: what a baseline, or C2LIP under one of the study's options, embeds and
minimises in place of train.py's `embed` and `loss_of`. train.py's `step` runs whichever pair `objective` gives;
with the paper's flags that is train.py's own, and nothing here runs.

  add_study_flags     --concept-labels, --concept-logits
  objective           the (embed, loss_of) pair of a run's flags
  collate_extras      what these steps (and the run's diagnostics) read besides the paper's batch (data.Collate)
  baseline_embed      --method siglip, clip: images and captions only; negclip: and the captions' hard negatives
  with_rule_keys      the paper's embed, plus what a label rule reads (--concept-labels phrase | scene)
  study_loss          C2LIP's three terms (losses.py) under another label rule (baselines/losses.py) or with the
                      concept losses' own logit pair (--concept-logits own)
  ConceptLogitsCLIP   the model with that pair, which starts from SigLIP's t = 10, b = -10; `model_class` picks it

Dimension legend: B images (= captions), K concept phrases, M hard negatives, N patches, D joint embedding width.
"""

import math

import torch
import torch.nn as nn

from baselines.losses import LABEL_RULES, RULE_KEYS, baseline_loss, concept_labels, phrase_ids
from baselines.negatives import hard_negatives
from losses import npc_loss, sig_loss, xac_loss
from model import CLIP, MAX_LOGIT_SCALE
from sources.shapes import truth


def add_study_flags(p) -> None:
    """train.py's flags for the study's departures from the paper's loss, off by default."""
    study = p.add_argument_group("the study's options (docs/study.md), not the paper's").add_argument
    labels = "owner: a phrase is positive for its own image only (the paper's); phrase: for every image with "
    labels += "that phrase; scene (shapes world): for every image holding an object the phrase describes"
    study("--concept-labels", default="owner", choices=LABEL_RULES, help=labels)
    logits = "shared: the concept losses use the caption loss's t and b (paper); own: a pair from t = 10, b = -10"
    study("--concept-logits", default="shared", choices=["shared", "own"], help=logits)


def objective(args, embed, loss_of) -> tuple:
    """(embed, loss_of) of the run: a baseline's (--method), the study's (--concept-labels other than owner,
    --concept-logits own), else the paper's pair, given by train.py."""
    if args.method != "c2lip":
        return baseline_embed, baseline_loss_of
    if args.concept_labels != "owner" or args.concept_logits == "own":
        return with_rule_keys(embed), study_loss
    return embed, loss_of


def collate_extras(args) -> list:
    """data.Collate's extras for the run: the shapes world's truth (the run's diagnostics, and the scene rule),
    the phrase ids of the phrase rule, the hard negatives of NegCLIP."""
    extras = [truth] if args.data == "shapes" else []
    return extras + [phrase_ids] * (args.concept_labels == "phrase") + [hard_negatives] * (args.method == "negclip")


def baseline_embed(net, batch: dict, args) -> dict:
    """batch -> "image" x (B, D), "text" y (B, D), and for negclip "negatives" (M, D), through forward (which
    DistributedDataParallel needs): texts that match no image, one per caption a rule applies to."""
    negatives = batch["negatives"] if args.method == "negclip" else None
    image, _, text, texts = net(batch["images"], batch["captions"], negatives, False)
    emb = {"image": image, "text": text}
    if negatives is not None:
        emb["negatives"] = texts[batch["has_negative"]]  # (M, D): captions no rule applies to have none
    return emb


def baseline_loss_of(model: CLIP, emb: dict, args) -> tuple[torch.Tensor, dict]:
    return baseline_loss(args.method, emb, model.scale(), model.bias())


def with_rule_keys(embed):
    """The paper's embed, plus the batch's keys that --concept-labels reads (RULE_KEYS): gathered with the
    embeddings under torchrun, as the owners are."""

    def embed_with_rule_keys(net, batch: dict, args) -> dict:
        return embed(net, batch, args) | {k: batch[k] for k in RULE_KEYS[args.concept_labels]}

    return embed_with_rule_keys


def study_loss(model: CLIP, emb: dict, args) -> tuple[torch.Tensor, dict]:
    """(L, {term: value}): c2lip_loss's three terms, with the labels z (B, K) of --concept-labels and the concept
    terms at the (t, b) of --concept-logits."""
    x, y, c, u = emb["image"], emb["text"], emb["phrase"], emb.get("patch")
    labels = concept_labels(args.concept_labels, emb["owner"], len(x), emb)  # (B, K)
    ct, cb = concept_scale_bias(model)
    terms = {"L_sig": sig_loss(x, y, model.scale(), model.bias())}
    if args.npc_weight:
        terms["L_npc"] = npc_loss(x, c, labels, ct, cb)
    if args.xac_weight:
        terms["L_xac"] = xac_loss(u, c, labels, ct, cb, args.tau)
    weights = {"L_sig": 1.0, "L_npc": args.npc_weight, "L_xac": args.xac_weight}
    return sum(weights[name] * value for name, value in terms.items()), terms


class ConceptLogitsCLIP(CLIP):
    """CLIP with a second (t, b) pair for the concept losses (--concept-logits own). The paper shares one pair;
    docs/study.md measures both. Why one might not suffice: one bias cannot sit right for both tasks, 1 match
    in B captions against ~3 phrases per image among ~3B (a threshold a caption must cross versus one that many
    near-duplicate phrases must not)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.concept_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.concept_logit_bias = nn.Parameter(torch.tensor(-10.0))


def model_class(args) -> type:
    return ConceptLogitsCLIP if args.concept_logits == "own" else CLIP


def concept_scale_bias(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, b) of the concept losses: the model's own concept pair, else the shared one."""
    if not isinstance(model, ConceptLogitsCLIP):
        return model.scale(), model.bias()
    return model.concept_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE), model.concept_logit_bias
