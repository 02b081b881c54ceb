"""Pretrained CLIP weights in our from-scratch model (pretrained.py's key map and load_weights): parity with
open_clip for a small custom configuration and for ViT-B-16, through a saved state dict, an open_clip
training checkpoint and a TorchScript archive; the key map's errors; the logit bias chosen for the sigmoid
loss; train.py --init and eval.py --ckpt end to end. open_clip is a test-only dependency: its models are
built here with random weights, nothing is downloaded."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import eval as evaluate
import train
from evaluation.shapes_benchmark import ShapesBenchmark, evaluate_shapes
from model import CLIP
from released.convert import convert_openai_state_dict
from released.files import read_torchscript_state_dict
from run.checkpoint import load_model
from run.start import balanced_bias
from sources.shapes import ShapesWorld

open_clip = pytest.importorskip("open_clip")
OpenCLIP, CLIPTextCfg, CLIPVisionCfg = open_clip.model.CLIP, open_clip.model.CLIPTextCfg, open_clip.model.CLIPVisionCfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
# A "!" that does not merge (id 0, the pad id, inside the text), accents and emoji, and a caption long
# enough to be cut at 77 tokens with the end token last.
TEXTS = ["a photo of a dog.", "wow!$5 deal", "a red circle and a blue star " * 12, "café 😀"]


def perturbed(model):
    """open_clip starts biases at 0 and LayerNorms at 1; move every tensor so a dropped or swapped one shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def small_open_clip(quick_gelu: bool = True):
    """2 layers per tower, 32 px images in 8 px patches, OpenAI's vocabulary and 77-token context."""
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32)
    text = CLIPTextCfg(width=128, heads=2, layers=2)
    return perturbed(OpenCLIP(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu))


def as_openai_archive(reference, path, image_size: int):
    """A TorchScript archive like OpenAI's release: the traced model, with the three scalars it carries
    as tensors (open_clip keeps two of them as plain ints, which tracing would drop; set them aside)."""
    scalars = {"input_resolution": image_size, "context_length": 77, "vocab_size": 49408}
    kept = {name: reference.__dict__.pop(name) for name in scalars if name in reference.__dict__}
    for name, value in scalars.items():
        reference.register_buffer(name, torch.tensor(value))
    images, tokens = torch.zeros(1, 3, image_size, image_size), open_clip.tokenize(["a dog"])
    with torch.no_grad():
        traced = torch.jit.trace_module(
            reference, {"encode_image": (images,), "encode_text": (tokens,)}, check_trace=False
        )
    traced.save(str(path))
    for name in scalars:
        delattr(reference, name)
    reference.__dict__.update(kept)


@torch.no_grad()
def max_differences(reference, path, activation: str) -> dict[str, float]:
    """Load `path` as eval.py does, and compare embeddings and logits with the open_clip model."""
    model, tokenizer, _ = load_model(str(path), CPU, activation=activation)
    size = model.cfg.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    ref_x = reference.encode_image(images, normalize=True)  # (2, D)
    ref_y = reference.encode_text(open_clip.tokenize(TEXTS), normalize=True)  # (4, D), padded to 77
    x, _ = model.encode_image(images)
    y = model.encode_text(tokenizer(TEXTS))  # padded to the longest text only
    return {
        "image": (x - ref_x).abs().max().item(),
        "text": (y - ref_y).abs().max().item(),
        "logits": (model.scale() * x @ y.T - reference.logit_scale.exp() * ref_x @ ref_y.T).abs().max().item(),
    }


@pytest.mark.parametrize("form", ["state_dict", "open_clip_checkpoint", "torchscript"])
def test_small_custom_config_matches_open_clip(tmp_path, monkeypatch, form):
    reference = small_open_clip()
    path = tmp_path / "small.pt"
    if form == "state_dict":
        torch.save(reference.state_dict(), path)
    elif form == "open_clip_checkpoint":  # what open_clip's training script writes, DDP prefix included
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, path)
    else:
        as_openai_archive(reference, path, 32)
        monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("the archive's code must not be loaded"))
    diffs = max_differences(reference, path, "quick_gelu")
    print(form, diffs)
    assert max(diffs.values()) < 1e-5, diffs


def test_vit_b_16_matches_open_clip_from_state_dict_and_torchscript(tmp_path):
    """The real size: open_clip's ViT-B-16 (GELU; OpenAI's weights would take quick_gelu), batch of 2 on CPU."""
    torch.manual_seed(0)
    reference = perturbed(open_clip.create_model("ViT-B-16"))  # pretrained=None: random weights
    torch.save(reference.state_dict(), tmp_path / "ViT-B-16-random.pt")
    as_openai_archive(reference, tmp_path / "ViT-B-16-random-torchscript.pt", 224)
    for name in ("ViT-B-16-random.pt", "ViT-B-16-random-torchscript.pt"):
        start = time.time()
        diffs = max_differences(reference, tmp_path / name, "gelu")
        print(name, diffs, f"{time.time() - start:.1f}s")
        assert max(diffs.values()) < 1e-5, diffs


def test_the_activation_matters():
    """The shapes cannot tell QuickGELU from GELU: the wrong choice loads fine and computes something else."""
    reference = small_open_clip(quick_gelu=True)
    cfg, converted = convert_openai_state_dict(reference.state_dict(), "gelu")
    assert cfg.vision.activation == cfg.text.activation == "gelu"
    wrong = CLIP(cfg).eval()
    wrong.load_state_dict(converted)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gap = (wrong.encode_image(images)[0] - reference.encode_image(images, normalize=True)).abs().max().item()
    assert gap > 1e-3


def test_config_inferred_from_shapes():
    cfg, state = convert_openai_state_dict(open_clip.create_model("ViT-B-16").state_dict(), "quick_gelu")
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads) == (224, 16, 768, 12, 12)
    assert (t.vocab_size, t.context_length, t.width, t.layers, t.heads, t.pad_id) == (49408, 77, 512, 12, 8, 0)
    assert cfg.embed_dim == 512 and v.normalise == "clip" and cfg.init_logit_bias is None
    assert math.isclose(math.exp(cfg.init_logit_scale), 1 / 0.07, rel_tol=1e-5)
    assert state["visual.blocks.3.attn.qkv.weight"].shape == (2304, 768) and "logit_bias" not in state


def test_key_map_lists_missing_and_unknown_keys():
    state = small_open_clip().state_dict()
    state["visual.attn_pool.query"] = torch.zeros(4)  # e.g. a SigLIP-style attention-pool head
    del state["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError) as err:
        convert_openai_state_dict(state)
    assert "visual.attn_pool.query" in str(err.value) and "transformer.resblocks.1.mlp.c_fc.bias" in str(err.value)
    state = small_open_clip().state_dict() | {"input_resolution": torch.tensor(224)}
    with pytest.raises(ValueError, match="input_resolution"):
        convert_openai_state_dict(state)  # the archive's scalar disagrees with the 32 px the shapes say
    state = small_open_clip().state_dict() | {"logit_bias": torch.tensor(-12.5)}
    cfg, converted = convert_openai_state_dict(state)  # a sigmoid-trained model keeps its bias
    assert cfg.init_logit_bias == -12.5 and converted["logit_bias"].item() == -12.5


def test_torchscript_reader_matches_torch_jit_load(tmp_path):
    reference = small_open_clip()
    as_openai_archive(reference, tmp_path / "ts.pt", 32)
    ours = read_torchscript_state_dict(str(tmp_path / "ts.pt"))
    theirs = torch.jit.load(str(tmp_path / "ts.pt"), map_location="cpu").state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert int(ours["input_resolution"]) == 32 and "attn_mask" in ours  # both ignored by the key map


def test_balanced_bias_by_hand():
    """Matched pairs at cosine 0.3, the rest at 0.1, t = 100: b = -100 * (0.3 + 0.1) / 2 = -20."""

    class Fixed(torch.nn.Module):
        def encode_image(self, images):
            return images, None

        def encode_text(self, captions):
            return captions

        def scale(self):
            return torch.tensor(100.0)

    B, D = 4, 8
    x = torch.eye(B, D)  # image i = unit vector e_i, so cos(x_i, y_j) = component i of y_j
    y = torch.cat(
        [0.1 * torch.ones(B, B) + 0.2 * torch.eye(B), torch.zeros(B, D - B)], 1
    )  # 0.3 on its image, 0.1 elsewhere
    y[:, B] = (1 - (y**2).sum(1)).sqrt()  # unit length, topped up along a direction no image has
    assert math.isclose(balanced_bias(Fixed(), {"images": x, "captions": y}), -20.0, rel_tol=1e-5)


def test_train_init_from_clip_weights_then_resume_and_eval(tmp_path, capsys):
    weights = tmp_path / "small-random.pt"
    torch.save(small_open_clip().state_dict(), weights)
    common = [
        "--init",
        str(weights),
        *"--batch-size 4 --workers 0 --log-every 1".split(),
        "--out",
        str(tmp_path / "run"),
    ]
    state = torch.load(train.main([*common, "--steps", "2"]), weights_only=False)
    out = capsys.readouterr().out
    assert state["tokenizer"]["kind"] == "clip_bpe" and len(state["tokenizer"]["merges"]) == 48894
    assert state["config"]["vision"]["normalise"] == "clip" and state["config"]["text"]["activation"] == "quick_gelu"
    bias = state["config"]["init_logit_bias"]  # chosen on the first batch, not SigLIP's -10
    assert math.isfinite(bias) and bias != -10.0 and f"b = {bias:.2f}" in out
    # resume picks the BPE tokenizer and config from the checkpoint, --init is not read again
    resumed = torch.load(train.main([*common, "--steps", "3", "--resume"]), weights_only=False)
    assert resumed["step"] == 3 and resumed["tokenizer"] == state["tokenizer"]
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    results = evaluate.main(["--ckpt", ckpt, "--n", "5"])[ckpt]
    assert results["zeroshot-top1"]["count"] == 56 * 4 and results["swap-att"]["count"] == 5
    # scored at the model's own image size (32 px) and pixel normalisation (CLIP's), with its BPE tokenizer
    model, tokenizer, _ = load_model(ckpt, CPU)
    world = ShapesWorld(model.cfg.vision.image_size)
    bench = ShapesBenchmark(world, n=5, normalise=model.cfg.vision.normalise)
    assert results == evaluate_shapes(model, tokenizer, bench, CPU)


@pytest.mark.parametrize("method,init_bias,expect", [("clip", "auto", None), ("siglip", "-5", -5.0)])
def test_train_init_bias_follows_the_loss(tmp_path, method, init_bias, expect):
    weights = tmp_path / "small-random.pt"
    torch.save(small_open_clip().state_dict(), weights)
    args = ["--init", str(weights), "--method", method, "--init-bias", init_bias, "--out", str(tmp_path / "run")]
    args += "--steps 1 --batch-size 2 --workers 0".split()
    state = torch.load(train.main(args), weights_only=False)
    assert state["config"]["init_logit_bias"] == expect and ("logit_bias" in state["model"]) == (expect is not None)


def test_eval_cli_on_converted_weights(tmp_path):
    """`python eval.py --bench shapes --ckpt FILE` with an open_clip state dict, converted on the fly.
    (Small custom config: a B/16-sized run embeds 229 images at 224 px, minutes on this CPU.)"""
    path = tmp_path / "ViT-shaped-random.pt"
    torch.save(small_open_clip().state_dict(), path)
    cmd = [
        sys.executable,
        "eval.py",
        "--bench",
        "shapes",
        "--ckpt",
        str(path),
        "--n",
        "5",
        "--json",
        str(tmp_path / "r.json"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    results = json.load(open(tmp_path / "r.json"))["results"][str(path)]
    assert results["swap-att"]["count"] == 5 and results["zeroshot-top1"]["count"] == 56 * 4


def test_cli_errors_name_the_flag(tmp_path, capsys):
    for argv, flag in [
        (["--init", str(tmp_path / "none.pt")], "--init"),
        (["--init-bias", "high"], "--init-bias"),
        (["--bpe", "x.gz"], "--bpe"),
    ]:
        with pytest.raises(SystemExit) as exit:
            train.get_args(argv)
        assert exit.value.code == 2 and flag in capsys.readouterr().err
