"""The two encoders of a CLIP/SigLIP model, written from scratch.

Paper map (docs/paper.md, "Notation"):
  x_i   = CLIP.encode_image(images)[0]   the L2-normalised global image embedding
  u_ij  = CLIP.encode_image(images)[1]   the L2-normalised patch embeddings in the joint space
  y_i   = CLIP.encode_text(captions)     the L2-normalised caption embedding
  c_k   = CLIP.encode_text(phrases)      the same text encoder on a short, separate sequence
  t, b  = CLIP.scale(), CLIP.bias()              learned, shared by the three losses: t = exp(logit_scale),
                                                 clamped at 100 where it is read; b = logit_bias

C2LIP changes nothing here: its losses only need the patches in the joint space. One ViT, two poolings:
  "cls"  OpenAI's CLIP: a class token is x; the final LayerNorm and projection of every patch is u.
  "map"  SigLIP's (the paper's backbone, in timm's layout): no class token, SigLIP's attention-pool head
         gives x, and each patch's value vector through the head's output path is u (AttentionPool).
One text transformer, causal and read at the end-of-text token (CLIP) or bidirectional and read at the
last position (SigLIP). Presets name the combinations; inference is the plain forward pass.

released/convert.py renames released weights onto these modules; what they need is a config option:
activation (OpenAI's QuickGELU), LayerNorm eps, t and b, preprocessing (`normalise`, `resize`: data.py).

Departures from the authors' code (an open_clip fork fine-tuning SigLIP ViT-B/16; docs/departures.md): the
CLIP text feature is read at an explicit end-of-text index, never by argmax over token ids; t is clamped at 100
where it is read, not clamped to [1, 100] after each step.
SigLIP computes exact GELU, as open_clip's port that the paper fine-tuned ("gelu_tanh": big_vision's).

Dimension legend:
  B images (or texts) in a batch, C=3 colour channels, S image side, P patch side,
  N = (S/P)^2 patches, T text tokens, W a transformer's width, D the joint embedding width.
"""

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 160
    layers: int = 5
    heads: int = 4
    activation: str = "gelu"  # a key of ACTIVATIONS (OpenAI's weights were trained with QuickGELU)
    pooling: str = "cls"  # "cls" (OpenAI's CLIP layout) | "map" (SigLIP's: no class token, attention-pool head)
    eps: float = 1e-5  # LayerNorm epsilon: torch's default (CLIP), 1e-6 (SigLIP)
    # The pixels the weights expect, kept in the checkpoint so that eval.py feeds a model what it trained on:
    # normalise, a key of data.NORMALISE ("symmetric": [0, 255] -> [-1, 1], ours and SigLIP's; "clip": OpenAI's
    # mean/std); resize, "crop" (shorter side, then the centre: CLIP) or "squash" (the whole image: SigLIP).
    normalise: str = "symmetric"
    resize: str = "crop"


@dataclass
class TextConfig:
    vocab_size: int = 64  # overwritten from the tokenizer when a model is built for training
    context_length: int = 48
    width: int = 128
    layers: int = 4
    heads: int = 4
    pad_id: int = 0  # the tokenizer pads with this id, always after the end-of-text token
    activation: str = "gelu"  # a key of ACTIVATIONS
    causal: bool = True  # CLIP's causal mask; SigLIP's text attends both ways (and to the padding)
    pooling: str = "eot"  # "eot": the end-of-text token (CLIP) | "last": the last position of the context (SigLIP)
    eps: float = 1e-5  # LayerNorm epsilon
    proj_bias: bool = False  # SigLIP's text projection has a bias


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    # SigLIP's initialisation: t = 10, b = -10. CLIP's softmax loss uses t = 1/0.07 and no bias (None).
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float | None = -10.0

    @staticmethod
    def from_dict(d: dict) -> "CLIPConfig":
        d = dict(d)
        return CLIPConfig(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


# What makes the towers SigLIP's, whatever their size (released/convert.py configures converted weights with
# it); the text is padded with T5's end token, id 1.
SIGLIP_VISION = dict(pooling="map", eps=1e-6, resize="squash")
SIGLIP_TEXT = dict(pad_id=1, causal=False, pooling="last", eps=1e-6, proj_bias=True)

PRESETS = {
    # 2.4M parameters (with the shapes world's 40 words): trains on a laptop CPU in minutes.
    "tiny": CLIPConfig(),
    "small": CLIPConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=256, layers=8, heads=8),
        text=TextConfig(context_length=48, width=256, layers=6, heads=8),
        embed_dim=256,
    ),
    # The shape of OpenAI's CLIP ViT-B/16.
    "B/16": CLIPConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12),
        text=TextConfig(context_length=77, width=512, layers=12, heads=8),
        embed_dim=512,
    ),
    # The shape of SigLIP ViT-B/16 (open_clip's ViT-B-16-SigLIP, the paper's backbone): a MAP-pooled ViT
    # without a projection (D = W = 768), a 64-token bidirectional text transformer, T5's 32,000 pieces.
    "siglip-B/16": CLIPConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, **SIGLIP_VISION),
        text=TextConfig(vocab_size=32000, context_length=64, width=768, layers=12, heads=12, **SIGLIP_TEXT),
        embed_dim=768,
    ),
}

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on t = exp(logit_scale): keeps the logits from blowing up


class Attention(nn.Module):
    """Multi-head self-attention. softmax(q k^T / sqrt(d)) v, computed by torch's fused kernel."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, W)
        # split the width into heads: (B, T, W) -> (B, heads, T, W / heads)
        q, k, v = (t.view(B, T, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, T, W / heads)
        y = y.transpose(1, 2).reshape(B, T, W)  # (B, T, W)
        return self.out(y)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI's cheaper stand-in for GELU. Its CLIP weights were trained with it,
    and the two differ by up to 0.02 per activation, enough to change every embedding noticeably."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": partial(nn.GELU, approximate="tanh")}


def mlp(width: int, activation: str) -> nn.Sequential:
    """The transformer's MLP, 4x wide: (..., W) -> (..., W)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")
    return nn.Sequential(nn.Linear(width, 4 * width), ACTIVATIONS[activation](), nn.Linear(4 * width, width))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, activation: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = mlp(width, activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, causal: bool, recompute: bool) -> torch.Tensor:
    """Apply the blocks in turn. With recompute (--grad-checkpointing), each block's activations are
    dropped after the forward pass and recomputed in the backward pass: memory for compute."""
    for block in blocks:
        x = checkpoint(block, x, causal, use_reentrant=False) if recompute else block(x, causal)
    return x


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention-pooling ("MAP") head: one learned probe query attends over the tokens
    (its own q and kv projections), then an output projection and a residual MLP on the LayerNorm of the
    result; no projection after it (the joint width is the ViT's).

    Patch tokens u (for L_xac) are the authors' choice: each patch's value vector (heads merged back to
    width W) through the same output path, u_j = out(v_j) + mlp(norm(out(v_j))): the pooled output if
    every head attended to patch j alone (docs/pretrained.md says why this is a choice)."""

    def __init__(self, width: int, heads: int, activation: str, eps: float):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(width**-0.5 * torch.randn(width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = mlp(width, activation)

    def output_path(self, x: torch.Tensor) -> torch.Tensor:
        """(..., W) -> (..., W): the output projection, then the residual MLP."""
        x = self.out(x)
        return x + self.mlp(self.norm(x))

    def forward(self, x: torch.Tensor, patches: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (B, N, W) -> (pooled (B, W), patch tokens (B, N, W) or None), not normalised."""
        B, N, W = x.shape
        h = self.heads
        q = self.q(self.probe).view(1, h, 1, W // h).expand(B, -1, -1, -1)  # (B, heads, 1, W / heads)
        k, v = self.kv(x).chunk(2, dim=-1)  # 2 x (B, N, W)
        k_heads, v_heads = (t.view(B, N, h, W // h).transpose(1, 2) for t in (k, v))  # (B, heads, N, W / heads)
        pooled = F.scaled_dot_product_attention(q, k_heads, v_heads).reshape(B, W)  # heads merged: (B, W)
        return self.output_path(pooled), self.output_path(v) if patches else None  # (B, W), (B, N, W)


class VisionTransformer(nn.Module):
    """ViT: patchify, [class token], learned positions, transform; project every token ("cls") or pool ("map")."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        if cfg.pooling not in ("cls", "map"):
            raise ValueError(f"unknown pooling {cfg.pooling!r}; expected 'cls' or 'map'")
        if cfg.pooling == "map" and embed_dim != cfg.width:
            raise ValueError(f"the MAP head has no projection: embed_dim {embed_dim} must equal the width {cfg.width}")
        self.pooling = cfg.pooling
        has_class_token = cfg.pooling == "cls"
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        scale = cfg.width**-0.5
        # A convolution with stride = kernel = P is a linear map applied to each P x P patch.
        self.patchify = nn.Conv2d(
            3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=not has_class_token
        )
        if has_class_token:
            self.class_token = nn.Parameter(scale * torch.randn(cfg.width))
        self.positions = nn.Parameter(scale * torch.randn(n_patches + has_class_token, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.eps) if has_class_token else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.activation, cfg.eps) for _ in range(cfg.layers))
        self.grad_checkpointing = False
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if has_class_token:
            self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))
        else:
            self.head = AttentionPool(cfg.width, cfg.heads, cfg.activation, cfg.eps)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S) -> (B, N, W): each P x P patch, row by row and left to right, through one linear
        map of its C P P pixels (the convolution's weights) plus its bias, if it has one."""
        x = self.patchify(images)  # (B, W, S/P, S/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, W)

    def forward(self, images: torch.Tensor, patches: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, C, S, S) -> (image embedding (B, D), patch embeddings (B, N, D)), not normalised.
        patches=False may skip the patch embeddings (None) where they cost compute (the MAP head)."""
        x = self.embed_patches(images)  # (B, N, W)
        if self.pooling == "cls":
            token = self.class_token.expand(x.shape[0], 1, -1).to(x.dtype)  # (B, 1, W)
            x = torch.cat([token, x], dim=1)  # (B, 1 + N, W)
        x = self.ln_pre(x + self.positions)
        x = run_blocks(self.blocks, x, causal=False, recompute=self.grad_checkpointing and self.training)
        x = self.ln_post(x)
        if self.pooling == "map":
            return self.head(x, patches)  # (B, D), (B, N, D)
        # The same LayerNorm and projection for the class token and for every patch token: this is
        # what puts the patches u_ij in the joint space where they can be compared with a phrase c_k.
        x = x @ self.proj  # (B, 1 + N, D)
        return x[:, 0], x[:, 1:]  # (B, D), (B, N, D)


class TextTransformer(nn.Module):
    """Text transformer: causal, read at the end-of-text token (CLIP), or bidirectional, read at the end (SigLIP)."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        if cfg.pooling not in ("eot", "last"):
            raise ValueError(f"unknown text pooling {cfg.pooling!r}; expected 'eot' or 'last'")
        self.pad_id, self.causal, self.pooling = cfg.pad_id, cfg.causal, cfg.pooling
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positions = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.activation, cfg.eps) for _ in range(cfg.layers))
        self.grad_checkpointing = False
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.proj = nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.width, embed_dim))
        self.proj_bias = nn.Parameter(torch.zeros(embed_dim)) if cfg.proj_bias else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) = [start, words..., end, pad, pad, ...] -> text feature (B, D), not normalised."""
        B, T = tokens.shape
        if T > self.context_length:
            raise ValueError(f"{T} tokens exceed the model's context length {self.context_length}")
        if self.pooling == "last" and T != self.context_length:
            # no mask: every position sees the padding, so rows must be padded to the full context as in training
            raise ValueError(f"last-position pooling reads full {self.context_length}-token rows, got {T}")
        x = self.token_embedding(tokens) + self.positions[:T]  # (B, T, W)
        x = run_blocks(self.blocks, x, causal=self.causal, recompute=self.grad_checkpointing and self.training)
        x = self.ln_final(x)
        if self.pooling == "last":
            x = x[:, -1]  # (B, W)
        else:
            # Why the end-of-text token carries the text: under the causal mask it is the first position
            # that has seen every word, and padding only follows it. Its index is that of the last non-pad
            # token: not argmax(token id) as in OpenAI's code, nor a count of non-pad tokens, which CLIP's
            # BPE would get wrong (docs/paper.md, "Reading the text at its end token").
            positions = torch.arange(T, device=tokens.device)
            eot = (positions * (tokens != self.pad_id)).amax(dim=1)  # (B,)
            x = x[torch.arange(B, device=x.device), eot]  # (B, W)
        x = x @ self.proj  # (B, D)
        return x if self.proj_bias is None else x + self.proj_bias


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None

    def encode_image(self, images: torch.Tensor, patches: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, C, S, S) -> (x: (B, D), u: (B, N, D), or None if not patches), both L2-normalised."""
        image, patch = self.visual(images, patches)
        return F.normalize(image, dim=-1), None if patch is None else F.normalize(patch, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, D), L2-normalised."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(
        self, images: torch.Tensor, captions: torch.Tensor, phrases: torch.Tensor | None = None, patches: bool = True
    ):
        """Every embedding the losses need, in one call (DistributedDataParallel syncs gradients only
        through forward): x (B, D), u (B, N, D) (None is allowed with patches=False), y (B, D), and c (K, D),
        the embeddings of `phrases` (K, Tc) through the same text encoder, or None. (The NegCLIP baseline
        passes its hard negatives as the second batch of texts.)"""
        image_emb, patch_emb = self.encode_image(images, patches)
        # Phrases run through the text encoder as their own short sequences, never inside the caption.
        phrase_emb = self.encode_text(phrases) if phrases is not None else None
        return image_emb, patch_emb, self.encode_text(captions), phrase_emb

    def scale(self) -> torch.Tensor:
        """t = exp(logit_scale), clamped at 100 as in CLIP, here where t is read, from above only. The authors'
        code clamps the parameter to [0, ln 100] after each optimizer step instead (docs/departures.md)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def bias(self) -> torch.Tensor:
        return self.logit_bias if self.logit_bias is not None else torch.zeros((), device=self.logit_scale.device)
