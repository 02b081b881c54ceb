"""train.py's optimizer recipe: the learning-rate schedule (lr_factor) and AdamW's parameter groups
(param_groups), each against a version written out here, and the schedule as train.main applies it."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import train
from baselines.objectives import ConceptLogitsCLIP
from model import CLIP, CLIPConfig, TextConfig, VisionConfig

SMALL = CLIPConfig(
    vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4),
    text=TextConfig(vocab_size=20, context_length=12, width=32, layers=2, heads=4),
    embed_dim=24,
)


def naive_lr_factor(step, steps, warmup):
    """A linear ramp to 1 over w = max(1, round(warmup * steps)) steps, then a half cosine period from 1 down
    to 0 at `steps`, written as cos^2 (0.5 (1 + cos x) = cos^2(x / 2))."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return math.cos(math.pi / 2 * (step - w) / (steps - w)) ** 2


def test_warm_up_then_cosine_by_hand():
    f = [train.lr_factor(s, 100, 0.05) for s in range(100)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # round(0.05 * 100) = 5 warm-up steps
    assert f[5] == 1.0  # the cosine starts at the peak
    assert train.lr_factor(5 + 95 / 2, 100, 0.05) == pytest.approx(0.5)  # halfway down the cosine
    assert 0 < f[99] < 1e-3  # the last step is small, not 0: the decay reaches 0 at step 100
    assert all(f[s + 1] < f[s] for s in range(5, 99))  # decreasing after the warm-up


def test_at_least_one_warm_up_step():
    """warmup 0 still takes one step to reach the peak: step 0 is at 1, and the cosine starts at step 1."""
    assert [train.lr_factor(s, 10, 0.0) for s in range(2)] == [1.0, 1.0]
    assert train.lr_factor(2, 10, 0.0) == pytest.approx(math.cos(math.pi / 2 / 9) ** 2)
    assert train.lr_factor(0, 10, 0.01) == 1.0 and train.lr_factor(1, 10, 0.01) == 1.0  # round(0.1) = 0 -> 1


def test_a_warmup_of_1_or_more_counts_steps():
    """--warmup below 1 is a fraction of the run, 1 or more a number of steps: --warmup 1 is one step at the peak
    (not a warm-up over the whole run), --warmup 50 the paper's 50 steps."""
    assert [train.lr_factor(s, 10, 1) for s in range(3)] == pytest.approx([1.0, 1.0, math.cos(math.pi / 2 / 9) ** 2])
    assert [train.lr_factor(s, 100, 50) for s in (0, 49, 50)] == pytest.approx([1 / 50, 1.0, 1.0])


@pytest.mark.parametrize(
    "steps,warmup", [(100, 0.05), (10, 0.0), (7, 0.3), (1, 0.05), (4, 0.5), (600, 0.05), (50, 0.05)]
)
def test_lr_factor_matches_the_formula_at_every_step(steps, warmup):
    got = [train.lr_factor(s, steps, warmup) for s in range(steps)]
    assert got == pytest.approx([naive_lr_factor(s, steps, warmup) for s in range(steps)], abs=1e-12)


def expected_groups(model: CLIP) -> dict[str, set[str]]:
    """Each parameter's group from what it is, not from its shape: the weights of Linear, Conv2d and Embedding
    layers, the projections and the position tables decay; biases, LayerNorms and the class token do not; the
    logit scale and bias (and the concept losses' own pair) are the third group."""
    groups = {"decay": set(), "no_decay": set(), "logit": set()}
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if name in ("logit_scale", "logit_bias", "concept_logit_scale", "concept_logit_bias"):
                groups["logit"].add(full)
            elif isinstance(module, nn.LayerNorm) or name in ("bias", "class_token"):
                groups["no_decay"].add(full)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or name in ("proj", "positions"):
                groups["decay"].add(full)
            else:
                raise AssertionError(f"a parameter this test does not know: {full}")
    return groups


@pytest.mark.parametrize(
    "cfg,logit_names",
    [
        (SMALL, {"logit_scale", "logit_bias"}),
        (
            (SMALL, ConceptLogitsCLIP),  # the study's --concept-logits own
            {"logit_scale", "logit_bias", "concept_logit_scale", "concept_logit_bias"},
        ),
        (replace(SMALL, init_logit_bias=None), {"logit_scale"}),  # CLIP's softmax form: no bias
    ],
)
def test_param_groups_split_decay_no_decay_and_logits(cfg, logit_names):
    cfg, build = cfg if isinstance(cfg, tuple) else (cfg, CLIP)
    model = build(cfg)
    named = dict(model.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    groups = train.param_groups(model, 1e-3, 0.05, 0.1)
    assert len(groups) == 3
    decay, no_decay, logit = ([name_of[id(p)] for p in g["params"]] for g in groups)
    # every parameter in exactly one group
    assert sorted(decay + no_decay + logit) == sorted(named)
    assert set(decay) == {n for n, p in named.items() if p.ndim >= 2}
    assert set(no_decay) == {n for n, p in named.items() if p.ndim == 1}
    assert set(logit) == logit_names
    assert {"decay": set(decay), "no_decay": set(no_decay), "logit": set(logit)} == expected_groups(model)
    for name in ("visual.blocks.0.attn.qkv.weight", "visual.proj", "text.token_embedding.weight", "text.proj"):
        assert name in decay, name
    for name in ("visual.class_token", "visual.blocks.1.attn.qkv.bias", "text.ln_final.weight", "visual.ln_pre.bias"):
        assert name in no_decay, name
    layer_norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    assert layer_norms and not layer_norms & {id(p) for p in groups[0]["params"]}
    assert not [n for n in decay if n.endswith(".bias")]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]
    assert [g["base_lr"] for g in groups] == [1e-3, 1e-3, 0.05]


def test_logit_lr_defaults_to_lr():
    groups = train.param_groups(CLIP(SMALL), 2e-4, None, 0.2)
    assert [g["base_lr"] for g in groups] == [2e-4, 2e-4, 2e-4]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0, 0.0]


def test_train_applies_the_schedule(tmp_path):
    """4 steps, warm-up 0.5 = 2 steps: the rate is 1e-3 x (0.5, 1, 1, 0.5), the last the cosine's midpoint."""
    flags = "--steps 4 --batch-size 4 --workers 0 --log-every 1 --warmup 0.5 --lr 1e-3".split()
    ckpt = train.main([*flags, "--out", str(tmp_path)])
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["lr"] == pytest.approx(1e-3 * train.lr_factor(r["step"] - 1, 4, 0.5), rel=1e-12)
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    # the saved optimizer: every group at the last step's rate, from its own base rate and decay
    saved = torch.load(ckpt, weights_only=False)["optimizer"]["param_groups"]
    assert [(g["base_lr"], g["weight_decay"]) for g in saved] == [(1e-3, 0.1), (1e-3, 0.0), (1e-3, 0.0)]
    assert [g["lr"] for g in saved] == pytest.approx([5e-4] * 3)
