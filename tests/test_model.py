import math

import pytest
import torch
import torch.nn.functional as F

from model import CLIP, PRESETS, SIGLIP_TEXT, SIGLIP_VISION, Attention, CLIPConfig, TextConfig, VisionConfig

SMALL = CLIPConfig(
    vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4),
    text=TextConfig(vocab_size=20, context_length=12, width=32, layers=2, heads=4),
    embed_dim=24,
)


def test_shapes_and_normalisation():
    torch.manual_seed(0)
    model = CLIP(SMALL)
    x, u = model.encode_image(torch.randn(3, 3, 16, 16))
    assert x.shape == (3, 24) and u.shape == (3, 16, 24)
    y = model.encode_text(torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]]))
    assert y.shape == (2, 24)
    for e in (x, u, y):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[:-1]))


def test_patches_share_the_class_token_head():
    """u_ij must be ln_post + proj of the patch outputs, exactly as the class token: compare with a
    forward pass that applies the head by hand."""
    torch.manual_seed(0)
    model = CLIP(SMALL).eval()
    v = model.visual
    images = torch.randn(2, 3, 16, 16)
    tokens = v.patchify(images).flatten(2).transpose(1, 2)
    tokens = torch.cat([v.class_token.expand(2, 1, -1), tokens], 1) + v.positions
    tokens = v.ln_pre(tokens)
    for block in v.blocks:
        tokens = block(tokens)
    head = F.normalize(v.ln_post(tokens) @ v.proj, dim=-1)
    x, u = model.encode_image(images)
    torch.testing.assert_close(x, head[:, 0])
    torch.testing.assert_close(u, head[:, 1:])


def test_attention_agrees_with_explicit_formula():
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    for causal in (False, True):
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(4)
        if causal:
            scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16)
        torch.testing.assert_close(attn(x, causal=causal), attn.out(y), atol=1e-5, rtol=1e-5)


def test_text_feature_ignores_padding_and_later_tokens():
    torch.manual_seed(0)
    model = CLIP(SMALL).eval()
    short = torch.tensor([[2, 5, 6, 3]])
    padded = torch.tensor([[2, 5, 6, 3, 0, 0, 0]])
    torch.testing.assert_close(model.encode_text(short), model.encode_text(padded))
    # the feature is read at the end token: changing a word before it changes the feature
    assert not torch.allclose(model.encode_text(short), model.encode_text(torch.tensor([[2, 5, 7, 3]])))


def test_text_feature_at_end_token_not_argmax():
    """The end token (id 3) is not the largest id here, so argmax pooling would read the wrong place."""
    torch.manual_seed(0)
    model = CLIP(SMALL).eval()
    tokens = torch.tensor([[2, 19, 18, 3, 0]])
    text = model.text
    h = text.token_embedding(tokens) + text.positions[:5]
    for block in text.blocks:
        h = block(h, causal=True)
    expect = F.normalize(text.ln_final(h)[0, 3] @ text.proj, dim=-1)
    torch.testing.assert_close(model.encode_text(tokens)[0], expect)


def test_logit_scale_and_bias_init_and_clamp():
    model = CLIP(SMALL)
    assert math.isclose(model.scale().item(), 10.0, rel_tol=1e-6) and model.bias().item() == -10.0
    clip = CLIP(
        CLIPConfig(
            vision=SMALL.vision,
            text=SMALL.text,
            embed_dim=24,
            init_logit_scale=math.log(1 / 0.07),
            init_logit_bias=None,
        )
    )
    assert math.isclose(clip.scale().item(), 1 / 0.07, rel_tol=1e-5) and clip.bias().item() == 0.0
    assert clip.logit_bias is None
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    assert clip.scale().item() == 100.0


def test_presets():
    b16 = PRESETS["B/16"]
    assert (b16.vision.image_size, b16.vision.patch_size, b16.vision.width, b16.vision.layers, b16.vision.heads) == (
        224,
        16,
        768,
        12,
        12,
    )
    assert (b16.text.width, b16.text.layers, b16.text.heads, b16.embed_dim) == (512, 12, 8, 512)
    assert CLIPConfig.from_dict(__import__("dataclasses").asdict(b16)) == b16


def test_overfits_one_batch():
    """A few dozen steps of the SigLIP loss on one batch of random images and texts drive it down."""
    from losses import sig_loss

    torch.manual_seed(0)
    model = CLIP(SMALL)
    images = torch.randn(8, 3, 16, 16)
    texts = torch.randint(4, 20, (8, 6))
    texts[:, 0], texts[:, -1] = 2, 3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        x, _ = model.encode_image(images)
        loss = sig_loss(x, model.encode_text(texts), model.scale(), model.bias())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CLIP(SMALL)
    images, texts = torch.randn(2, 3, 16, 16), torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.visual.grad_checkpointing = model.text.grad_checkpointing = recompute
        x, u, y, _ = model(images, texts)
        (x.sum() + u.square().mean() + (x * y).sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_end_token_found_when_the_pad_id_also_occurs_inside_the_text():
    """CLIP's BPE pads with 0, and 0 is also a real token (a "!" that did not merge: "wow!$5" gives
    [start, wow, !, $, 5, end]). The feature must still be read at the end token, not one earlier."""
    torch.manual_seed(0)
    model = CLIP(SMALL).eval()
    tokens = torch.tensor([[2, 5, 0, 7, 3, 0, 0], [2, 5, 6, 7, 3, 0, 0]])
    text = model.text
    h = text.token_embedding(tokens) + text.positions[:7]
    for block in text.blocks:
        h = block(h, causal=True)
    expect = F.normalize(text.ln_final(h)[:, 4] @ text.proj, dim=-1)  # position 4 holds the end token
    torch.testing.assert_close(model.encode_text(tokens), expect)


def test_quick_gelu_option():
    from model import QuickGELU, VisionConfig

    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    cfg = CLIPConfig(
        vision=VisionConfig(**{**SMALL.vision.__dict__, "activation": "quick_gelu"}), text=SMALL.text, embed_dim=24
    )
    model = CLIP(cfg)
    assert isinstance(model.visual.blocks[0].mlp[1], QuickGELU) and isinstance(
        model.text.blocks[0].mlp[1], torch.nn.GELU
    )
    assert set(model.state_dict()) == set(CLIP(SMALL).state_dict())  # the activation has no weights: same keys


class Scripted(torch.nn.Module):
    """Scripting (unlike tracing) keeps typed lists and ints, which TorchScript pickles through helpers."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = [1, 2]
        self.scale = 3
        self.conv = torch.nn.Conv2d(3, 4, 2, bias=False)
        self.register_buffer("mask", torch.ones(2, 2).triu(1))

    def forward(self, x):
        return self.conv(x) * self.scale


def test_torchscript_reader_runs_no_code_and_refuses_what_it_cannot_read(tmp_path, monkeypatch):
    """Read without torch.jit.load; a pickle naming anything off the allow-list is refused in one line naming it,
    never handed to torch.jit.load (whose TorchScript __setstate__ can create and overwrite files)."""
    import zipfile

    from released import files as model

    torch.manual_seed(0)
    path = str(tmp_path / "scripted.pt")
    torch.jit.script(Scripted()).save(path)
    expect = torch.jit.load(path).state_dict()
    assert model.is_torchscript(path) and not model.is_torchscript(__file__)
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load must never be reached"))
    got = model.read_torchscript_state_dict(path)
    assert set(got) == set(expect) == {"conv.weight", "mask"} and all(torch.equal(got[k], expect[k]) for k in got)
    crafted = str(tmp_path / "crafted.pt")  # the same archive, its pickle naming os.system (posix.system)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(crafted, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data.replace(b"collections\nOrderedDict\n", b"posix\nsystem\n"))
    for archive, needle in [(crafted, "posix.system"), (path, "torch.jit._pickle.build_intlist")]:
        if archive == path:  # something the list has not met: refused all the same, named
            monkeypatch.setattr(model, "TYPED_CONTAINERS", set())
        with pytest.raises(ValueError) as err:
            model.read_state_dict(archive)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- every LayerNorm in its place

SIGLIP_SMALL = CLIPConfig(
    vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, **SIGLIP_VISION),
    text=TextConfig(vocab_size=20, context_length=12, width=32, layers=2, heads=4, **SIGLIP_TEXT),
    embed_dim=32,
)


def perturb_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Every LayerNorm moved off the identity, each its own way: at initialisation they are all the same function
    (weight 1, bias 0), so one used in place of another would go unseen."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def block_by_hand(block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The pre-norm residual block: ln_1 before the attention, ln_2 before the MLP."""
    x = x + block.attn(block.ln_1(x), causal=causal)
    return x + block.mlp(block.ln_2(x))


def map_head_by_hand(head, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's MAP head: the probe's attention per head over the tokens, heads side by side; then the output path,
    out and a residual MLP on the head's own norm, for the pooled vector and for each value vector (the patches)."""
    B, N, W = x.shape
    h = head.heads
    q = head.q(head.probe).view(h, W // h)  # (heads, W / heads)
    k, v = head.kv(x).chunk(2, dim=-1)  # (B, N, W) each
    weights = (torch.einsum("hd,bnhd->bhn", q, k.view(B, N, h, W // h)) / math.sqrt(W // h)).softmax(-1)
    pooled = torch.einsum("bhn,bnhd->bhd", weights, v.view(B, N, h, W // h)).reshape(B, W)

    def path(z):
        z = head.out(z)
        return z + head.mlp(head.norm(z))

    return path(pooled), path(v)


def vision_by_hand(v, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = v.patchify(images).flatten(2).transpose(1, 2)  # (B, N, W)
    if v.pooling == "cls":
        x = torch.cat([v.class_token.expand(len(x), 1, -1), x], 1)
    x = v.ln_pre(x + v.positions)
    for block in v.blocks:
        x = block_by_hand(block, x, causal=False)
    x = v.ln_post(x)
    if v.pooling == "map":
        pooled, patches = map_head_by_hand(v.head, x)
    else:
        pooled, patches = x[:, 0] @ v.proj, x[:, 1:] @ v.proj
    return F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1)


def text_by_hand(t, tokens: torch.Tensor, read_at: list[int]) -> torch.Tensor:
    x = t.token_embedding(tokens) + t.positions[: tokens.shape[1]]
    for block in t.blocks:
        x = block_by_hand(block, x, causal=t.causal)
    x = t.ln_final(x)[torch.arange(len(x)), read_at] @ t.proj
    return F.normalize(x if t.proj_bias is None else x + t.proj_bias, dim=-1)


@pytest.mark.parametrize("cfg", [SMALL, SIGLIP_SMALL], ids=["clip", "siglip"])
def test_every_layer_norm_is_applied_where_it_belongs(cfg):
    """Each block's ln_1 and ln_2 (image and text towers), ln_pre, ln_post, ln_final and the MAP head's norm, with
    every norm perturbed: the encoders against a forward pass written out with each norm named."""
    torch.manual_seed(0)
    model = perturb_norms(CLIP(cfg))
    close = dict(atol=1e-5, rtol=1e-4)
    for blocks, causal in ((model.visual.blocks, False), (model.text.blocks, cfg.text.causal)):
        h = torch.randn(2, 5, 32)
        for block in blocks:
            assert not torch.allclose(block.ln_1(h), block.ln_2(h))  # a swap would show
            torch.testing.assert_close(block(h, causal), block_by_hand(block, h, causal), **close)
    images = torch.randn(2, 3, 16, 16)
    for got, expect in zip(model.encode_image(images), vision_by_hand(model.visual, images)):
        torch.testing.assert_close(got, expect, **close)
    if cfg.text.pooling == "last":  # SigLIP: full rows padded with id 1, read at the last position
        tokens, read_at = torch.tensor([[5, 6, 7] + [1] * 9, [8, 9, 10, 11, 12] + [1] * 7]), [11, 11]
    else:
        tokens, read_at = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 8, 9, 10, 3]]), [3, 5]
    torch.testing.assert_close(model.encode_text(tokens), text_by_hand(model.text, tokens, read_at), **close)
