"""The two encoders of a CLIP/SigLIP model, written from scratch.

Paper map (docs/paper.md, "Notation"):
  x_i   = CLIP.encode_image(images)[0]   the L2-normalised global image embedding (class token)
  u_ij  = CLIP.encode_image(images)[1]   the L2-normalised patch embeddings in the joint space
  y_i   = CLIP.encode_text(captions)     the L2-normalised caption embedding
  c_k   = CLIP.encode_text(phrases)      the same text encoder on a short, separate sequence
  t, b  = CLIP.logit_scale.exp(), CLIP.logit_bias   learned, shared by every loss (the paper); with
          CLIPConfig.concept_logits the concept losses get a pair of their own (CLIP.concept_scale_bias)

C2LIP changes nothing here: its losses only need the patch tokens to live in the joint space, so each
patch output goes through the same final LayerNorm and projection as the class token (the paper's
recipe for a CLS-pooled ViT). Inference is the plain CLIP forward pass.

Released weights are renamed onto these modules by pretrained.py. Everything OpenAI's CLIP weights need
is a config option here: QuickGELU (`activation`), the 77-token causal context, end-of-text pooling, the
final projections, the stored logit scale, and the pixel normalisation they were trained with
(`VisionConfig.normalise`, applied by data.py).

Departures from the paper and the authors' code (an open_clip fork fine-tuning SigLIP ViT-B/16):
  - The paper's backbone pools images with SigLIP's attention-pool head; this ViT uses a class token,
    like OpenAI's CLIP, so the patch embeddings are the "CLS-pooled ViT" case of docs/paper.md. The paper's
    recipe starts from SigLIP; the pretrained weights this file can load are OpenAI's CLIP ViT-B/16.
  - The text feature is read at an explicit end-of-text index computed from the padding (see
    TextTransformer), never by argmax over token ids.

Dimension legend:
  B images (or texts) in a batch, C=3 colour channels, H=W image side, P patch side,
  N = (H/P)^2 patches, T text tokens, W a transformer's width, D the joint embedding width.
"""

import math
from dataclasses import dataclass, field

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
    activation: str = "gelu"  # "gelu" | "quick_gelu" (OpenAI's weights were trained with QuickGELU)
    # The pixel normalisation the weights expect, a key of data.NORMALISE: "symmetric" maps [0, 255] to
    # [-1, 1] (models trained here), "clip" is OpenAI's mean/std. Kept in the config, and so in every
    # checkpoint, so that eval.py feeds a model exactly the pixels it was trained on.
    normalise: str = "symmetric"


@dataclass
class TextConfig:
    vocab_size: int = 64  # overwritten from the tokenizer when a model is built for training
    context_length: int = 48
    width: int = 128
    layers: int = 4
    heads: int = 4
    pad_id: int = 0  # the tokenizer pads with this id, always after the end-of-text token
    activation: str = "gelu"  # "gelu" | "quick_gelu"


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    # SigLIP's initialisation: t = 10, b = -10. CLIP's softmax loss uses t = 1/0.07 and no bias (None).
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float | None = -10.0
    # A departure, off by default: a second (t, b) pair for the concept losses, from SigLIP's t = 10, b = -10.
    # The paper shares one pair; docs/study.md measures both (train.py --concept-logits own).
    concept_logits: bool = False

    @staticmethod
    def from_dict(d: dict) -> "CLIPConfig":
        d = dict(d)
        return CLIPConfig(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


PRESETS = {
    # About 2.5M parameters: trains on the shapes world on a laptop CPU in minutes.
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


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), ACTIVATIONS[activation](), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, causal: bool, recompute: bool) -> torch.Tensor:
    """Apply the blocks in turn. With recompute (--grad-checkpointing), each block's activations are
    dropped after the forward pass and recomputed in the backward pass: memory for compute."""
    for block in blocks:
        x = checkpoint(block, x, causal, use_reentrant=False) if recompute else block(x, causal)
    return x


class VisionTransformer(nn.Module):
    """ViT: patchify, prepend a class token, add learned positions, transform, project every token."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        scale = cfg.width**-0.5
        # A convolution with stride = kernel = P is a linear map applied to each P x P patch.
        self.patchify = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_token = nn.Parameter(scale * torch.randn(cfg.width))
        self.positions = nn.Parameter(scale * torch.randn(n_patches + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.activation) for _ in range(cfg.layers))
        self.grad_checkpointing = False
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) -> (class embedding (B, D), patch embeddings (B, N, D)), not normalised."""
        x = self.patchify(images)  # (B, W, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_token.expand(x.shape[0], 1, -1).to(x.dtype)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positions  # (B, 1 + N, W)
        x = self.ln_pre(x)
        x = run_blocks(self.blocks, x, causal=False, recompute=self.grad_checkpointing and self.training)
        # The same LayerNorm and projection for the class token and for every patch token: this is
        # what puts the patches u_ij in the joint space where they can be compared with a phrase c_k.
        x = self.ln_post(x) @ self.proj  # (B, 1 + N, D)
        return x[:, 0], x[:, 1:]  # (B, D), (B, N, D)


class TextTransformer(nn.Module):
    """Causal text transformer; the output at the end-of-text token is the text feature."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positions = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.activation) for _ in range(cfg.layers))
        self.grad_checkpointing = False
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.width, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) = [start, words..., end, pad, pad, ...] -> text feature (B, D), not normalised."""
        B, T = tokens.shape
        if T > self.context_length:
            raise ValueError(f"{T} tokens exceed the model's context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positions[:T]  # (B, T, W)
        x = run_blocks(self.blocks, x, causal=True, recompute=self.grad_checkpointing and self.training)
        x = self.ln_final(x)
        # Why the end-of-text token carries the text: under the causal mask it is the first position
        # that has seen every word. Padding only ever follows it, so the causal mask also keeps the
        # padding out of it and no padding mask is needed. Its index is that of the last non-pad token.
        # (OpenAI's code takes argmax(token id), which only works because the end token happens to
        # have the largest id in its vocabulary.) Not "number of non-pad tokens - 1": CLIP's BPE pads
        # with id 0, but id 0 is also a real token, a "!" that did not merge with what follows it
        # ("wow!$5" -> "wow", "!", "$</w>", "5</w>"), so counting would land before the end token. Both
        # readings agree for the word tokenizer, which reserves id 0 for padding.
        positions = torch.arange(T, device=tokens.device)
        eot = (positions * (tokens != self.pad_id)).amax(dim=1)  # (B,)
        x = x[torch.arange(B, device=x.device), eot]  # (B, W)
        return x @ self.proj  # (B, D)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None
        if cfg.concept_logits:
            self.concept_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.concept_logit_bias = nn.Parameter(torch.tensor(-10.0))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) -> (x: (B, D), u: (B, N, D)), both L2-normalised."""
        cls, patches = self.visual(images)
        return F.normalize(cls, dim=-1), F.normalize(patches, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, D), L2-normalised."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, texts: torch.Tensor, extra_texts: torch.Tensor | None = None):
        """Every embedding the losses need, in one call (DistributedDataParallel syncs gradients only
        through forward): x (B, D), u (B, N, D), y (B, D), and the embeddings (K, D) of extra_texts, a
        second batch of texts through the same encoder (the concept phrases of C2LIP, or the hard negatives
        of --method negclip), or None."""
        image_emb, patch_emb = self.encode_image(images)
        # Phrases run through the text encoder as their own short sequences, never inside the caption.
        extra_emb = self.encode_text(extra_texts) if extra_texts is not None else None
        return image_emb, patch_emb, self.encode_text(texts), extra_emb

    def scale(self) -> torch.Tensor:
        """t = exp(logit_scale), clamped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def bias(self) -> torch.Tensor:
        return self.logit_bias if self.logit_bias is not None else torch.zeros((), device=self.logit_scale.device)

    def concept_scale_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, b) of the concept losses: the shared pair, or their own with cfg.concept_logits. Why own: one
        bias cannot sit right for both tasks, 1 match in B captions against ~3 phrases per image among
        ~3B (a threshold a caption must cross versus one that many near-duplicate phrases must not)."""
        if not self.cfg.concept_logits:
            return self.scale(), self.bias()
        return self.concept_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE), self.concept_logit_bias


# ----------------------------------------------------------------------------- pretrained CLIP weights
# OpenAI's release (a TorchScript archive) and open_clip's state dicts share one naming; only the names
# differ from ours, never the layout: nn.MultiheadAttention packs q, k, v into one in_proj matrix in that
