"""The paper's recipe as train.py runs it, and evaluation that records no autograd graph.

docs/paper.md ("Total", "The paper's training recipe"): L = L_sig + 1.0 L_npc + 0.01 L_xac at tau = 1; AdamW with
betas (0.9, 0.98) and eps 1e-6, weight decay 0.1 on weight matrices only; a linear warm-up, then a cosine decay. Two
departures of the defaults (docs/departures.md): the gradient norm clipped at 1 (the authors clip nothing) and a
warm-up of 5% of the run; the authors' command (train.py's docstring) sets both as theirs. Each is read twice: from
the parsed flags, and from what a few steps of train.main hand the optimizer (a step pre-hook sees its groups and the
gradient it is about to apply) and the losses (the loss functions wrapped in whichever module calls them). So the
tests pin behaviour, not where the code lives. A step whose gradient is not finite, even with a finite loss, never
reaches the weights.

Evaluation: every embedding helper returns tensors without an autograd graph even when called with grad mode on,
every benchmark scores with the encoders run without one, eval.py runs in inference mode as a whole, and scoring
many images keeps at most one batch's activations alive (docs/failures.md).
"""

import contextlib
import functools
import gc
import inspect
import json
import math
import os
import sys
import weakref
from argparse import Namespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import eval as evaluate
import fixtures
import model as model_module
import train
from evaluation import benchmarks
from evaluation.metrics import embed_image_tokens, embed_images, embed_texts
from evaluation.shapes_benchmark import ShapesBenchmark, evaluate_shapes
from losses import c2lip_loss, owner_labels, sig_loss, xac_loss
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from pool import pooled_similarity
from run.checkpoint import load_model
from sources.shapes import ShapesWorld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
FAST = ["--batch-size", "4", "--workers", "0", "--log-every", "1", "--precision", "fp32"]
NAN = float("nan")


# ----------------------------------------------------------------------------- recording what a run hands on


def patch_everywhere(monkeypatch, real, replacement) -> None:
    """Replace the function `real` in every module of the repository that holds it (its own, and each that did
    `from module import name`), so that a test does not depend on which file calls it."""
    patched = 0
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if not path.startswith(ROOT) or path.startswith(os.path.join(ROOT, "tests")):
            continue
        for name, value in list(vars(module).items()):
            if value is real:
                monkeypatch.setattr(module, name, replacement)
                patched += 1
    assert patched, f"no module of the repository uses {real.__name__}"


def recording(real, calls: list):
    """`real`, appending (its arguments by name, defaults filled in; its result) to `calls` at every call."""
    signature = inspect.signature(real)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        result = real(*args, **kwargs)
        calls.append((dict(bound.arguments), result))
        return result

    return wrapper


@contextlib.contextmanager
def optimizer_steps():
    """[{optimizer, grad_norm, lr}] of every optimizer.step() in the block, as the step is about to be taken:
    the norm of the gradient it will apply, and each group's learning rate."""
    steps = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.cat(grads).norm().item()
        steps.append({"optimizer": optimizer, "grad_norm": norm, "lr": [g["lr"] for g in optimizer.param_groups]})

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        yield steps
    finally:
        handle.remove()


def train_and_record(out, flags: list[str]) -> dict:
    """train.main(flags) with every optimizer step, every call of the C2LIP loss and of the pooling recorded."""
    losses, pools = [], []
    with pytest.MonkeyPatch.context() as m, optimizer_steps() as steps:
        patch_everywhere(m, c2lip_loss, recording(c2lip_loss, losses))
        patch_everywhere(m, pooled_similarity, recording(pooled_similarity, pools))
        ckpt = train.main([*flags, "--out", str(out), *FAST])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return dict(steps=steps, losses=losses, pools=pools, ckpt=torch.load(ckpt, weights_only=True), log=log)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """4 steps of the default run (C2LIP on the shapes world), warming up over 2 steps so that the run shows
    both halves of the schedule."""
    return train_and_record(tmp_path_factory.mktemp("recipe"), ["--steps", "4", "--warmup", "2"])


# ----------------------------------------------------------------------------- the recipe: flags


def paper_lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """docs/paper.md's schedule, written out: a linear ramp to the peak over `warmup_steps` steps, then a half
    cosine down to 0 at `steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (steps - warmup_steps)))


def test_the_flags_default_to_the_papers_recipe():
    args = train.get_args([])
    assert (args.method, args.npc_weight, args.xac_weight, args.tau) == ("c2lip", 1.0, 0.01, 1.0)
    assert (args.concept_labels, args.concept_logits, args.logit_lr) == ("owner", "shared", None)
    assert (args.weight_decay, args.accum_freq) == (0.1, 1)
    assert args.grad_clip == 1.0  # a departure of the tiny default (docs/departures.md): the authors clip nothing
    # The loss's own defaults are the flags': whoever calls it without train.py gets the paper's loss too.
    defaults = {k: p.default for k, p in inspect.signature(c2lip_loss).parameters.items()}
    assert (defaults["npc_weight"], defaults["xac_weight"], defaults["tau"]) == (1.0, 0.01, 1.0)
    # The warm-up: 5% of the run by default (the departure docs/paper.md names), the paper's 50 steps on request.
    assert args.warmup == 0.05
    assert [train.lr_factor(s, 600, args.warmup) for s in range(600)] == pytest.approx(
        [paper_lr_factor(s, 600, 30) for s in range(600)], abs=1e-12
    )
    paper = train.get_args(["--warmup", "50"]).warmup
    assert [train.lr_factor(s, 1000, paper) for s in range(1000)] == pytest.approx(
        [paper_lr_factor(s, 1000, 50) for s in range(1000)], abs=1e-12
    )


# The authors' scripts/train_full_model_wds_data.sh: its settings, as train.py's flags name them.
AUTHORS = dict(lr=1e-5, weight_decay=0.1, batch_size=96, epochs=5.0, warmup=50.0, grad_clip=0.0, npc_weight=1.0)
AUTHORS |= dict(xac_weight=0.01, seed=42, precision="bf16", init="timm/ViT-B-16-SigLIP", data="cc3m")
AUTHORS |= dict(caption_key="shortLLA_captions", concept_key="nounphrases", method="c2lip", tau=1.0, accum_freq=1)
AUTHORS |= dict(concept_labels="owner", concept_logits="shared", logit_lr=None)


def authors_command(text: str) -> list[str]:
    """The words of the command in `text` that starts "torchrun --nproc_per_node 8 train.py", its lines joined."""
    start = text.index("torchrun --nproc_per_node 8 train.py")
    lines = []
    for line in text[start:].splitlines():
        lines.append(line.split("#")[0].strip().rstrip("\\"))
        if not line.split("#")[0].rstrip().endswith("\\"):
            break
    return " ".join(lines).split()


def test_the_authors_command_is_their_settings():
    """train.py's docstring and docs/departures.md give one command for the paper's run: 8 processes, and every
    flag the authors' script sets (lr, weight decay, batch per GPU, epochs, warm-up, both loss weights, no
    clipping, seed, bf16), with train.py's defaults for the rest equal to theirs too."""
    command = authors_command(train.__doc__)
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "departures.md")) as f:
        assert authors_command(f.read()) == command
    assert command[:4] == ["torchrun", "--nproc_per_node", "8", "train.py"]
    flags = command[4:]
    flags[flags.index("--data-dir") + 1] = "/tmp"  # a placeholder path: only the parse is read
    args = train.get_parser().parse_args(flags)
    assert {k: getattr(args, k) for k in AUTHORS} == AUTHORS


def test_bf16_autocast_keeps_float32_weights_and_a_float32_loss():
    """A departure (docs/departures.md): the authors cast the model to bf16; here bf16 is autocast, the weights
    stay float32, and every loss term is summed in float32 though the matrix products ran in bf16."""
    torch.manual_seed(0)
    vision, text = (
        VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2),
        TextConfig(width=32, layers=1),
    )
    model = CLIP(CLIPConfig(vision=vision, text=text, embed_dim=16))
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(1, 60, (3, 5))
    args = fixtures.step_args("c2lip")
    batch = {"images": images, "captions": tokens, "phrases": tokens, "owner": torch.arange(3)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = train.embed(model, batch, args)
        loss, terms = train.loss_of(model, emb, args)
    assert emb["image"].dtype == torch.bfloat16  # the encoders ran in bf16
    assert loss.dtype == torch.float32 and {v.dtype for v in terms.values()} == {torch.float32}
    loss.backward()
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_the_loss_functions_default_to_the_papers_weights_and_tau():
    """c2lip_loss called without weights is L_sig + 1.0 L_npc + 0.01 L_xac, pooled at tau = 1."""
    g = torch.Generator().manual_seed(0)
    x, y, c = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (4, 4, 6))
    u = torch.nn.functional.normalize(torch.randn(4, 5, 8, generator=g), dim=-1)
    owner, t, b = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor(10.0), torch.tensor(-10.0)
    total, terms = c2lip_loss(x, y, c, u, owner, t, b)
    torch.testing.assert_close(terms["L_xac"], xac_loss(u, c, owner_labels(owner, 4), t, b, tau=1.0))
    torch.testing.assert_close(terms["L_sig"], sig_loss(x, y, t, b))
    torch.testing.assert_close(total, terms["L_sig"] + 1.0 * terms["L_npc"] + 0.01 * terms["L_xac"])


# ----------------------------------------------------------------------------- the recipe: what a run does


def test_a_run_hands_adamw_the_papers_settings(recipe_run):
    steps, state = recipe_run["steps"], recipe_run["ckpt"]
    assert len(steps) == 4 and len({id(s["optimizer"]) for s in steps}) == 1
    optimizer = steps[0]["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(state["model"])  # every weight, once
    for group in optimizer.param_groups:
        assert (group["betas"], group["eps"], group["amsgrad"]) == ((0.9, 0.98), 1e-6, False)
        # weight decay 0.1 on weight matrices only; none on biases, norms, the logit scale and bias (0-d)
        assert {p.ndim >= 2 for p in group["params"]} == {group["weight_decay"] > 0}
        assert group["weight_decay"] in (0.0, 0.1)
    # a linear warm-up over --warmup 2 steps, then the cosine, at --lr 5e-4 in every group
    expect = [5e-4 * paper_lr_factor(s, 4, 2) for s in range(4)]
    assert expect == pytest.approx([2.5e-4, 5e-4, 5e-4, 2.5e-4])
    for step, lr in zip(steps, expect):
        assert step["lr"] == pytest.approx([lr] * len(optimizer.param_groups), rel=1e-12)


def test_a_run_clips_the_gradient_at_1_by_default(recipe_run):
    """A departure of the tiny default, not the paper's (docs/departures.md: without it the default run does not
    learn). An untrained model's gradient norm is far above 1 (about 66 at the first step): what AdamW receives
    is the clipped gradient, of norm 1."""
    norms = [s["grad_norm"] for s in recipe_run["steps"]]
    assert norms[0] == pytest.approx(1.0, rel=1e-3)  # float32 sums in another order than clip_grad_norm_'s
    assert all(n <= 1.0 + 1e-3 for n in norms)


def test_a_run_hands_the_loss_the_papers_weights_and_tau(recipe_run):
    losses, pools = recipe_run["losses"], recipe_run["pools"]
    assert len(losses) == 4  # one loss per step
    for _, (total, terms) in losses:
        assert set(terms) == {"L_sig", "L_npc", "L_xac"}
        torch.testing.assert_close(total, terms["L_sig"] + 1.0 * terms["L_npc"] + 0.01 * terms["L_xac"])
    assert len(pools) >= 4 and {args["tau"] for args, _ in pools} == {1.0}
    record = recipe_run["log"][-1]
    assert {"L_sig", "L_npc", "L_xac"} <= set(record) and record["scale"] == pytest.approx(10.0, rel=0.01)


def test_the_clip_is_the_flags_value_and_0_turns_it_off(tmp_path):
    clipped = train_and_record(tmp_path / "clip", ["--steps", "2", "--grad-clip", "0.25"])["steps"]
    assert [s["grad_norm"] for s in clipped] == pytest.approx([0.25, 0.25], rel=1e-3)
    unclipped = train_and_record(tmp_path / "off", ["--steps", "1", "--grad-clip", "0"])["steps"]
    assert unclipped[0]["grad_norm"] > 10  # the raw gradient of the first step (about 66)


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_step(tmp_path, capsys):
    """The second step's caption loss is finite, but its gradient is NaN (a backward hook poisons it): the step
    is skipped (--max-nonfinite 1), AdamW takes steps 1 and 3 only, and the weights stay finite."""
    calls = []

    def poisoned(*args, **kwargs):
        loss = sig_loss(*args, **kwargs)
        if loss.requires_grad:
            calls.append(loss.detach())
            if len(calls) == 2:
                loss.register_hook(lambda grad: torch.full_like(grad, NAN))
        return loss

    with pytest.MonkeyPatch.context() as m:
        patch_everywhere(m, sig_loss, poisoned)
        run = train_and_record(tmp_path, ["--steps", "3", "--max-nonfinite", "1"])
    assert len(calls) == 3 and all(c.isfinite() for c in calls)  # the loss itself was finite every time
    assert "step 2: non-finite loss or gradient, step skipped" in capsys.readouterr().out
    assert len(run["steps"]) == 2 and all(math.isfinite(s["grad_norm"]) for s in run["steps"])
    assert [r["step"] for r in run["log"]] == [1, 3]
    assert run["ckpt"]["step"] == 3 and all(v.isfinite().all() for v in run["ckpt"]["model"].values())
    for group in run["ckpt"]["optimizer"]["state"].values():  # the NaN never reached AdamW's moments either
        assert all(v.isfinite().all() for v in group.values())


# ----------------------------------------------------------------------------- evaluation records no graph


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """An untrained small model and every benchmark's fixture files, read as eval.py reads them."""
    root = tmp_path_factory.mktemp("bench")
    ckpt = fixtures.write_checkpoint(str(root / "a" / "ckpt.pt"), image_size=16)
    model, tokenizer, _ = load_model(ckpt, CPU)
    sc, scpp = fixtures.write_sugarcrepe(str(root / "sc")), fixtures.write_sugarcrepe_pp(str(root / "scpp"))
    zs, ann = fixtures.write_imagefolder(str(root / "zs")), fixtures.write_karpathy(str(root / "coco"))
    args = Namespace(batch_size=2, workers=0, zeroshot_set="imagefolder", classnames=None, templates=None)
    images = os.path.join(sc, "val2017")
    data = {
        "sugarcrepe": benchmarks.load_sugarcrepe(sc, images, "sugarcrepe"),
        "sugarcrepe++": benchmarks.load_sugarcrepe(scpp, images, "sugarcrepe++"),
        "zeroshot": benchmarks.load_zeroshot(zs, args),
        "retrieval": benchmarks.load_retrieval(str(root / "coco"), ann),
    }
    return dict(root=root, ckpt=ckpt, model=model, tokenizer=tokenizer, args=args, data=data, sc=sc, scpp=scpp)


def graph_free(tensors) -> bool:
    return all(t.grad_fn is None and not t.requires_grad for t in tensors)


def test_every_embedding_helper_returns_no_graph_with_grad_mode_on(bench, tmp_path):
    model, tokenizer, args = bench["model"], bench["tokenizer"], bench["args"]
    assert all(p.requires_grad for p in model.parameters())  # a graph would be recorded if a helper let it
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    paths = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for i, path in enumerate(paths):
        fixtures.save_image(path, i)
    files = {"f": [(paths[0], "a red dog", "a blue dog"), (paths[2], "a red car", "a blue car")]}
    with torch.enable_grad():
        x, u = embed_image_tokens(model, images, 2, CPU)
        emb, labels = benchmarks.embed_image_dataset(model, list(images), args, CPU, "images")
        ((ex_images, ex_texts),) = benchmarks.embed_examples(model, tokenizer, files, args, CPU, "f").values()
        out = [embed_images(model, images, 2, CPU), x, u, embed_texts(model, tokenizer, ["a red dog"] * 3, 2, CPU)]
    assert labels is None and emb.shape == (5, 16) and ex_images.shape == (2, 16)
    assert graph_free(out + [emb, ex_images, *ex_texts])


@contextlib.contextmanager
def encoder_outputs(model):
    """[(grad mode on?, inference mode on?, output tensors)] of every encode_image / encode_text of `model` in the
    block; patched on the instance, or on the class when model is the class."""
    calls = []

    def wrap(real):
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
            calls.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(), tensors))
            return out

        return wrapper

    with pytest.MonkeyPatch.context() as m:
        for name in ("encode_image", "encode_text"):
            m.setattr(model, name, wrap(getattr(model, name)))
        yield calls


SCORERS = evaluate.SCORERS  # the real benchmarks, as eval.py scores them


@pytest.mark.parametrize("name", [*SCORERS, "shapes", "shapes-pooled"])
def test_every_benchmark_scores_without_a_graph(bench, name):
    model, tokenizer, args = bench["model"], bench["tokenizer"], bench["args"]
    with torch.enable_grad(), encoder_outputs(model) as calls:
        if name.startswith("shapes"):
            shapes = ShapesBenchmark(ShapesWorld(16), n=5, per_class=1)
            score = "pooled" if name == "shapes-pooled" else "plain"
            results = evaluate_shapes(model, tokenizer, shapes, CPU, 4, score, tau=0.5)
        else:
            results = SCORERS[name](model, tokenizer, bench["data"][name], args, CPU)
    assert results and calls and graph_free(t for _, _, tensors in calls for t in tensors)


def test_eval_runs_in_inference_mode_as_a_whole(bench):
    root = bench["root"]
    argv = ["--ckpt", bench["ckpt"], "--bench", "shapes", "sugarcrepe", "sugarcrepe++", "zeroshot", "retrieval"]
    argv += ["--data-dir", f"sugarcrepe={bench['sc']}", f"sugarcrepe++={bench['scpp']}", f"zeroshot={root / 'zs'}"]
    argv += [f"retrieval={root / 'coco'}", "--images", os.path.join(bench["sc"], "val2017")]
    argv += ["--ann", str(root / "coco" / "karpathy_test.json"), "--n", "5", "--workers", "0", "--batch-size", "4"]
    with encoder_outputs(model_module.CLIP) as calls:
        results = evaluate.main(argv)
    assert len(results[bench["ckpt"]]) > 40
    assert calls and all(not grad and inference for grad, inference, _ in calls)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # and nothing is left switched


def test_scoring_many_images_keeps_at_most_one_batchs_activations():
    """24 images in batches of 4 through a 2-block image tower, grad mode on: once the embeddings are returned,
    no block's output may still be alive (an autograd graph would keep those of all 6 batches: 12)."""
    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4),
        text=TextConfig(vocab_size=20, context_length=12, width=32, layers=1, heads=4),
        embed_dim=24,
    )
    model = CLIP(cfg).eval()
    outputs = []
    for block in model.visual.blocks:
        block.register_forward_hook(lambda module, inputs, output: outputs.append(weakref.ref(output)))
    images = list(torch.randn(24, 3, 16, 16))
    with torch.enable_grad():
        emb, _ = benchmarks.embed_image_dataset(model, images, Namespace(batch_size=4, workers=0), CPU, "images")
    gc.collect()
    alive = [o() for o in outputs if o() is not None]
    assert emb.shape == (24, 24) and len(outputs) == 6 * 2
    assert len(alive) <= 2, f"{len(alive)} block outputs of {len(outputs)} still held after scoring"
