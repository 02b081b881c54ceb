"""SigLIP ViT-B/16, the paper's backbone, in our own modules: parity with open_clip's ViT-B-16-SigLIP (timm's ViT and
its attention-pool head, open_clip's bidirectional text transformer) built with random weights, read from .bin and
.safetensors; the patch tokens of the authors' formula; the key map's errors; our safetensors reader; the MAP head
against an explicit formula; train.py --init and eval.py --ckpt end to end on a small SigLIP-style model saved in
open_clip's naming. open_clip, timm, safetensors and sentencepiece are test-only dependencies; nothing is downloaded."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as evaluate
import train
from data import eval_transform
from fixtures import spm_model_bytes
from model import CLIP, PRESETS, AttentionPool
from released.convert import convert_siglip_state_dict
from released.files import read_state_dict
from released.safetensors_reader import read_safetensors
from run.checkpoint import load_model

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
TEXTS = ["a photo of a dog.", "A RED circle, and a blue star!", "a red circle and a blue star " * 20, "café 😀", ""]


def perturbed(model):
    """open_clip and timm start biases at 0, LayerNorms at 1 and the logit bias at -10: move every tensor so that
    a dropped, swapped or transposed one shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def small_open_clip_siglip(monkeypatch, vocab_size: int = 600, context_length: int = 16):
    """open_clip's SigLIP architecture at a CPU-friendly size: timm's SigLIP ViT (no class token, MAP head) with 2
    blocks of width 128 on 32 px images in 8 px patches, and a 2-layer bidirectional text transformer read at the
    last position, with ViT-B-16-SigLIP's settings otherwise. open_clip names the timm model; the size is passed
    to timm here, as its create_model allows."""
    real = timm.create_model
    small = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
    with monkeypatch.context() as m:
        m.setattr(timm, "create_model", lambda name, **kw: real(name, **(kw | small)))
        torch.manual_seed(0)
        vision = dict(timm_model_name="vit_base_patch16_siglip_224", timm_pool="map", timm_proj="none", image_size=32)
        text = dict(
            context_length=context_length,
            vocab_size=vocab_size,
            width=128,
            heads=2,
            layers=2,
            no_causal_mask=True,
            proj_bias=True,
            pool_type="last",
            norm_kwargs={"eps": 1e-6},
        )
        model = open_clip.model.CustomTextCLIP(128, vision, text, init_logit_bias=-10.0)
    return perturbed(model)


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "sentencepiece.model"
    path.write_bytes(spm_model_bytes())
    return str(path)


def save(reference, path, form: str) -> str:
    state = reference.state_dict()
    if form == "safetensors":  # what the hub repository ships
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path), {"format": "pt"})
    elif form == "bin":  # open_clip_pytorch_model.bin: torch.save of the state dict
        torch.save(state, path)
    else:  # open_clip's training checkpoint, DistributedDataParallel's prefix included
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return str(path)


@torch.no_grad()
def authors_patch_tokens(reference, images) -> torch.Tensor:
    """The authors' patch tokens, from open_clip's modules: the v half of the MAP head's kv projection of the
    trunk's final tokens (heads merged), through the head's proj and residual MLP, normalised."""
    trunk = reference.visual.trunk
    tokens = trunk.forward_features(images)  # (B, N, W): patches, positions, blocks, final norm
    pool = trunk.attn_pool
    v = pool.kv(tokens).chunk(2, dim=-1)[1]  # (B, N, W)
    u = pool.proj(v)
    return F.normalize(u + pool.mlp(pool.norm(u)), dim=-1)


@torch.no_grad()
def max_differences(reference, path: str, spm: str, batch: int = 2) -> dict[str, float]:
    """Load `path` as eval.py does, and compare embeddings, logits and patch tokens with the open_clip model."""
    model, tokenizer, _ = load_model(path, CPU, spm=spm)
    size = model.cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    tokens = tokenizer(TEXTS)  # (5, context): the same ids for both (tests/test_sentencepiece.py checks them)
    ref_x, ref_y = reference.encode_image(images, normalize=True), reference.encode_text(tokens, normalize=True)
    x, u = model.encode_image(images)
    y = model.encode_text(tokens)
    ref_logits = reference.logit_scale.exp() * ref_x @ ref_y.T + reference.logit_bias
    return {
        "image": (x - ref_x).abs().max().item(),
        "text": (y - ref_y).abs().max().item(),
        "logits": (model.scale() * x @ y.T + model.bias() - ref_logits).abs().max().item(),
        "patches": (u - authors_patch_tokens(reference, images)).abs().max().item(),
    }


@pytest.mark.parametrize("form", ["safetensors", "bin", "open_clip_checkpoint"])
def test_small_siglip_matches_open_clip(tmp_path, monkeypatch, spm_file, form):
    reference = small_open_clip_siglip(monkeypatch)
    diffs = max_differences(reference, save(reference, tmp_path / f"small.{form}", form), spm_file)
    print(form, diffs)
    assert max(diffs.values()) < 1e-5, diffs


def test_vit_b_16_siglip_matches_open_clip(tmp_path, spm_file):
    """The real size, open_clip's ViT-B-16-SigLIP, from both file formats; a batch of 2 on CPU. Its config is
    the "siglip-B/16" preset."""
    torch.manual_seed(0)
    reference = perturbed(open_clip.create_model("ViT-B-16-SigLIP", pretrained=None))
    for form in ("bin", "safetensors"):
        start = time.time()
        diffs = max_differences(reference, save(reference, tmp_path / f"ViT-B-16-SigLIP.{form}", form), spm_file)
        print(form, diffs, f"{time.time() - start:.1f}s")
        assert max(diffs.values()) < 1e-5, diffs
    cfg, _ = convert_siglip_state_dict(reference.state_dict())
    preset = PRESETS["siglip-B/16"]
    assert (cfg.vision, cfg.text, cfg.embed_dim) == (preset.vision, preset.text, preset.embed_dim)
    assert math.isclose(cfg.init_logit_bias, reference.logit_bias.item(), rel_tol=1e-6)


def test_open_clip_computes_exact_gelu(monkeypatch):
    """big_vision trained SigLIP with tanh-approximated GELU, but open_clip's port, the model the paper fine-tuned,
    computes exact GELU in both towers; the converted model follows open_clip, and the approximation would show."""
    reference = small_open_clip_siglip(monkeypatch)
    gelus = [m for m in reference.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 5 and {m.approximate for m in gelus} == {"none"}  # 2 + 2 blocks and the MAP head
    images = torch.randn(2, 3, 32, 32)
    for activation, agrees in (("gelu", True), ("gelu_tanh", False)):
        cfg, state = convert_siglip_state_dict(reference.state_dict(), activation)
        model = CLIP(cfg).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            gap = (model.encode_image(images)[0] - reference.encode_image(images, normalize=True)).abs().max().item()
        assert (gap < 1e-5) == agrees, (activation, gap)


def test_key_map_lists_missing_and_unknown_keys(monkeypatch):
    state = small_open_clip_siglip(monkeypatch).state_dict()
    state["visual.trunk.cls_token"] = torch.zeros(1, 1, 128)  # a timm ViT with a class token
    del state["visual.trunk.attn_pool.kv.bias"]
    with pytest.raises(ValueError) as err:
        convert_siglip_state_dict(state)
    assert "visual.trunk.cls_token" in str(err.value) and "visual.trunk.attn_pool.kv.bias" in str(err.value)
    assert "SigLIP" in str(err.value)


def test_safetensors_reader_matches_the_package(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 7),
    }
    path = str(tmp_path / "t.safetensors")
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    ours, theirs = read_safetensors(path), safetensors_torch.load_file(path)
    assert set(ours) == set(theirs) == set(tensors)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape and torch.equal(ours[name], t), name
    assert set(read_state_dict(path)) == set(tensors)  # told apart from torch.save files by its header
    with open(path, "r+b") as f:  # a header that lies about a tensor's size is an error, not garbage
        length = f.read(8)
        header = length + f.read(int.from_bytes(length, "little"))
        f.seek(0)
        f.write(header.replace(b'"shape":[3,4]', b'"shape":[4,4]'))
    with pytest.raises(ValueError, match="f32"):
        read_safetensors(path)


def test_map_head_agrees_with_explicit_formula():
    """The pooled output: per head h, softmax_j(q_h . k_hj / sqrt(d)) weighted values, heads side by side, then the
    output path; the patch tokens: the output path of each value vector."""
    torch.manual_seed(0)
    head, x = AttentionPool(16, 4, "gelu", 1e-6), torch.randn(2, 5, 16)
    q = head.q(head.probe)  # (W,)
    k, v = head.kv(x).chunk(2, dim=-1)  # (B, N, W) each
    pooled = torch.zeros(2, 16)
    for b in range(2):
        for h in range(4):
            s = slice(4 * h, 4 * h + 4)
            weights = torch.softmax(torch.stack([q[s] @ k[b, j, s] / 2.0 for j in range(5)]), 0)
            pooled[b, s] = sum(weights[j] * v[b, j, s] for j in range(5))
    out, tokens = head(x)
    torch.testing.assert_close(out, head.output_path(pooled), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, head.output_path(v))
    assert head(x, patches=False)[1] is None


def test_text_read_at_the_last_position_needs_full_rows():
    cfg = PRESETS["siglip-B/16"]
    small = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, image_size=32, patch_size=16, width=64, layers=1, heads=1),
        text=dataclasses.replace(cfg.text, vocab_size=10, context_length=8, width=32, layers=1, heads=1),
        embed_dim=64,
    )
    model = CLIP(small).eval()
    assert model.encode_text(torch.ones(2, 8, dtype=torch.long)).shape == (2, 64)
    with pytest.raises(ValueError, match="full 8-token rows"):
        model.encode_text(torch.ones(2, 5, dtype=torch.long))
    x, u = model.encode_image(torch.randn(1, 3, 32, 32), patches=False)
    assert x.shape == (1, 64) and u is None and model.encode_image(torch.randn(1, 3, 32, 32))[1].shape == (1, 4, 64)
    with pytest.raises(ValueError, match="no projection"):
        CLIP(dataclasses.replace(small, embed_dim=32))


def test_squash_keeps_the_whole_image():
    """SigLIP's evaluation resizes the whole image to a square (open_clip's resize_mode "squash"); CLIP's crops."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left, which a centre crop cuts off
    squash, crop = eval_transform(16, "symmetric", "squash")(img), eval_transform(16, "symmetric", "crop")(img)
    assert squash.shape == crop.shape == (3, 16, 16)
    assert squash[2, 8, 0] > 0.9 and crop[2, 8, 0] < -0.9  # blue channel in [-1, 1]


def test_fine_tune_and_evaluate_from_converted_siglip_weights(tmp_path, monkeypatch, spm_file, capsys):
    """train.py --init on open_clip's SigLIP safetensors with the SentencePiece model beside it (the paper's recipe,
    CPU-sized), resume, then eval.py on the fine-tune and on the weights as released."""
    weights = tmp_path / "hub" / "open_clip_model.safetensors"
    weights.parent.mkdir()
    reference = small_open_clip_siglip(monkeypatch)
    save(reference, weights, "safetensors")
    (weights.parent / "spiece.model").write_bytes(open(spm_file, "rb").read())  # found beside the weights
    common = [
        "--init",
        str(weights),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--lr",
        "1e-5",
        "--warmup",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    state = torch.load(train.main([*common, "--steps", "2"]), weights_only=False)
    assert state["tokenizer"]["kind"] == "sentencepiece" and len(state["tokenizer"]["model"]["pieces"]) == 600
    text, vision = state["config"]["text"], state["config"]["vision"]
    assert (text["pooling"], text["causal"], text["context_length"], text["pad_id"]) == ("last", False, 16, 1)
    assert (vision["pooling"], vision["normalise"], vision["resize"], vision["eps"]) == (
        "map",
        "symmetric",
        "squash",
        1e-6,
    )
    bias = reference.logit_bias.item()  # SigLIP's own bias is kept, not fitted on the first batch
    assert f"b = {bias:.2f}" in capsys.readouterr().out and state["config"]["init_logit_bias"] == pytest.approx(bias)
    resumed = torch.load(train.main([*common, "--steps", "3", "--resume"]), weights_only=False)
    assert resumed["step"] == 3 and resumed["tokenizer"] == state["tokenizer"]
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    results = evaluate.main(["--ckpt", ckpt, "--n", "5"])
    assert 0.0 <= results[ckpt]["zeroshot-top1"]["accuracy"] <= 1.0
    # the released weights, converted on the fly with the tokenizer named by --spm
    cmd = [
        sys.executable,
        "eval.py",
        "--ckpt",
        str(weights),
        "--spm",
        spm_file,
        "--n",
        "5",
        "--json",
        str(tmp_path / "r.json"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.load(open(tmp_path / "r.json"))["results"][str(weights)]["swap-att"]["count"] == 5


def test_siglip_weights_need_their_tokenizer(tmp_path, monkeypatch, capsys):
    weights = save(small_open_clip_siglip(monkeypatch), tmp_path / "open_clip_pytorch_model.bin", "bin")
    with pytest.raises(SystemExit) as exit:
        load_model(weights, CPU)
    assert "--spm" in str(exit.value) and "cc_en.32000" in str(exit.value)
    for argv, flag in [(["--spm", "x.model"], "--spm"), (["--model", "siglip-B/16"], "siglip-B/16")]:
        with pytest.raises(SystemExit) as exit:
            train.get_args(argv)
        assert exit.value.code == 2 and flag in capsys.readouterr().err
