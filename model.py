"""The two encoders of a CLIP/SigLIP model, written from scratch.

Paper map (../shared/docs/paper.md, "Notation"):
  x_i   = CLIP.encode_image(images)[0]   the L2-normalised global image embedding (class token)
  u_ij  = CLIP.encode_image(images)[1]   the L2-normalised patch embeddings in the joint space
  y_i   = CLIP.encode_text(captions)     the L2-normalised caption embedding
  c_k   = CLIP.encode_text(phrases)      the same text encoder on a short, separate sequence
  t, b  = CLIP.logit_scale.exp(), CLIP.logit_bias   learned, shared by every loss (the paper); with
          CLIPConfig.concept_logits the concept losses get a pair of their own (CLIP.concept_scale_bias)

C2LIP changes nothing here: its losses only need the patch tokens to live in the joint space, so each
patch output goes through the same final LayerNorm and projection as the class token (the paper's
recipe for a CLS-pooled ViT). Inference is the plain CLIP forward pass.

Pretrained weights: `convert_openai_state_dict` maps OpenAI's CLIP release (read from its TorchScript
archive by `read_torchscript_state_dict`, without running its code) or an open_clip state dict of the
same architecture onto these modules; the config is inferred from the shapes. Everything those weights
need is a config option here: QuickGELU (`activation`), the 77-token causal context, end-of-text
pooling, the final projections, the stored logit scale, and the pixel normalisation they were trained
with (`VisionConfig.normalise`, applied by data.py).

Departures from the paper and the authors' code (an open_clip fork fine-tuning SigLIP ViT-B/16):
  - The paper's backbone pools images with SigLIP's attention-pool head; this ViT uses a class token,
    like OpenAI's CLIP, so the patch embeddings are the "CLS-pooled ViT" case of paper.md. The paper's
    recipe starts from SigLIP; the pretrained weights this file can load are OpenAI's CLIP ViT-B/16.
  - The text feature is read at an explicit end-of-text index computed from the padding (see
    TextTransformer), never by argmax over token ids.

Dimension legend:
  B images (or texts) in a batch, C=3 colour channels, H=W image side, P patch side,
  N = (H/P)^2 patches, T text tokens, W a transformer's width, D the joint embedding width.
"""

import math
import pickle
import re
import zipfile
from collections import OrderedDict
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
    # The paper shares one pair; the README's study measures both (train.py --concept-logits own).
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

    def forward(self, images: torch.Tensor, texts: torch.Tensor, concepts: torch.Tensor | None = None):
        """Every embedding the losses need, in one call (DistributedDataParallel syncs gradients only
        through forward): x (B, D), u (B, N, D), y (B, D), and c (K, D) or None without phrases."""
        image_emb, patch_emb = self.encode_image(images)
        # Phrases run through the text encoder as their own short sequences, never inside the caption.
        concept_emb = self.encode_text(concepts) if concepts is not None else None
        return image_emb, patch_emb, self.encode_text(texts), concept_emb

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
# order, which is exactly our qkv Linear, and OpenAI's projections are already (width, embed) matrices
# applied as x @ proj. Every bias and LayerNorm has a counterpart; the patch convolution has no bias there
# either. So the conversion is a rename plus a check that nothing is missing or left over.

TOP_NAMES = {  # theirs -> ours, outside the residual blocks
    "visual.conv1.weight": "visual.patchify.weight",
    "visual.class_embedding": "visual.class_token",
    "visual.positional_embedding": "visual.positions",
    "visual.ln_pre.weight": "visual.ln_pre.weight", "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight", "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj": "visual.proj",
    "token_embedding.weight": "text.token_embedding.weight",
    "positional_embedding": "text.positions",
    "ln_final.weight": "text.ln_final.weight", "ln_final.bias": "text.ln_final.bias",
    "text_projection": "text.proj",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",  # only in models trained with the sigmoid loss; optional
}  # fmt: skip
BLOCK_NAMES = {  # theirs -> ours, inside each residual block
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.out.weight", "attn.out_proj.bias": "attn.out.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.0.weight", "mlp.c_fc.bias": "mlp.0.bias",
    "mlp.c_proj.weight": "mlp.2.weight", "mlp.c_proj.bias": "mlp.2.bias",
}  # fmt: skip
TOWERS = {"visual.transformer.resblocks": "visual.blocks", "transformer.resblocks": "text.blocks"}
# Scalars OpenAI's archive keeps beside the weights, checked against the shapes; and the causal mask,
# which open_clip builds as a buffer (kept by TorchScript) and our attention computes itself.
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


def convert_openai_state_dict(state: dict, activation: str = "quick_gelu", head_width: int = 64) -> tuple[CLIPConfig, dict]:
    """An OpenAI or open_clip CLIP state dict -> (our config, our state dict) for CLIP(cfg).load_state_dict.

    The config is read off the shapes. Two things the shapes cannot tell are arguments: the activation
    (OpenAI's weights and open_clip's "-quickgelu" models use QuickGELU, open_clip's own ViT-B-16 GELU)
    and the head width (64 in every OpenAI and open_clip ViT, so heads = width / 64). Raises ValueError
    listing every expected key that is missing and every key that has no place in our model.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DistributedDataParallel's prefix
    layers = {tower: 0 for tower in TOWERS}
    for key in state:
        for tower in TOWERS:
            if m := re.match(re.escape(tower) + r"\.(\d+)\.", key):
                layers[tower] = max(layers[tower], int(m.group(1)) + 1)
    names = {k: v for k, v in TOP_NAMES.items() if k != "logit_bias" or k in state}
    for tower, ours in TOWERS.items():
        for i in range(layers[tower]):
            names.update({f"{tower}.{i}.{a}": f"{ours}.{i}.{b}" for a, b in BLOCK_NAMES.items()})
    ignored = {k for k in state if k in OPENAI_SCALARS or k.split(".")[-1] == "attn_mask"}
    missing = [k for k in names if k not in state]
    unmapped = [k for k in state if k not in names and k not in ignored]
    if missing or unmapped or not all(layers.values()):
        raise ValueError(
            "not a CLIP ViT state dict in OpenAI/open_clip naming that this model can hold:\n"
            f"  missing keys ({len(missing)}): {missing}\n  keys with no place in our model ({len(unmapped)}): {unmapped}"
        )

    positions = state["visual.positional_embedding"].shape[0]
    grid = math.isqrt(positions - 1)  # 1 class token + grid x grid patches
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    vocab, t_width = state["token_embedding.weight"].shape
    if grid * grid + 1 != positions or v_width % head_width or t_width % head_width:
        raise ValueError(f"unexpected shapes: {positions} image positions, widths {v_width}/{t_width}, {head_width}-wide heads")
    v_layers, t_layers = (layers[tower] for tower in TOWERS)
    bias = state.get("logit_bias")
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=v_width, layers=v_layers,
                            heads=v_width // head_width, activation=activation, normalise="clip"),
        text=TextConfig(vocab_size=vocab, context_length=state["positional_embedding"].shape[0], width=t_width,
                        layers=t_layers, heads=t_width // head_width, pad_id=0, activation=activation),
        embed_dim=state["visual.proj"].shape[1],
        init_logit_scale=float(state["logit_scale"]),
        init_logit_bias=None if bias is None else float(bias),
    )  # fmt: skip
    expected = {"input_resolution": cfg.vision.image_size, "context_length": cfg.text.context_length, "vocab_size": vocab}
    for key in OPENAI_SCALARS:
        if key in state and int(state[key]) != expected[key]:
            raise ValueError(f"the archive says {key} = {int(state[key])}, the weights' shapes say {expected[key]}")
    # OpenAI's release stores fp16 weights; training keeps fp32 master weights (autocast does the rest).
    return cfg, {ours: state[theirs].float() for theirs, ours in names.items()}


# Reading OpenAI's release without running it. The file is a TorchScript archive: a zip holding
# <root>/data.pkl (a pickle of the module tree: each module an object of a "__torch__.*" class whose state
# is a dict of its attributes, tensors among them), <root>/data/<key> (raw tensor storages) and
# <root>/code/ (the model's TorchScript source). torch.jit.load would compile that code; unpickling
# data.pkl with an allow-list of the few globals a weights pickle needs reads the tensors and nothing else.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip


class _ScriptObject:
    """Stands in for any TorchScript class while unpickling: keeps the attribute dict, runs nothing."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return storage.as_strided(size, stride, offset)


# Scripted (not traced) modules also pickle typed lists and dicts through these; each returns its value.
TYPED_CONTAINERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag"}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(archive.open(root + "data.pkl"))
        self.archive, self.root, self.storages = archive, root, {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if module == "torch.jit._pickle" and name in TYPED_CONTAINERS:
            return lambda value, *type_tag: value
        raise pickle.UnpicklingError(f"{module}.{name} is not on the allow-list of a weights archive")

    def persistent_load(self, pid):
        _, storage_type, key, _, numel = pid  # ("storage", type, key, device, numel)
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.root}data/{key}"))
            dtype = STORAGE_DTYPES[storage_type]
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return self.storages[key]


def is_torchscript(path: str) -> bool:
    """TorchScript archives carry their code; torch.save zips (ours, open_clip's) do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("code/" in n for n in archive.namelist())


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the module tree in a TorchScript archive, named as state_dict() names
    them: parameters and buffers, plus any tensor kept as a plain attribute (a causal attn_mask; the
    scalars input_resolution, context_length, vocab_size of OpenAI's release)."""
    with zipfile.ZipFile(path) as archive:
        root = min((n for n in archive.namelist() if n.endswith("data.pkl")), key=len)[: -len("data.pkl")]
        if root + "byteorder" in archive.namelist() and archive.read(root + "byteorder") != b"little":
            raise ValueError(f"{path}: big-endian archives are not supported")
        try:
            top = _WeightsUnpickler(archive, root).load()
        except pickle.UnpicklingError as err:
            # An archive from a torch version that pickles something this allow-list has not met. Loading
            # it with torch compiles its TorchScript code (run by torch's interpreter, which cannot call
            # arbitrary Python), so it is the fallback, said out loud, not the way in.
            print(f"note: {path}: {err}; reading it with torch.jit.load instead")
            return torch.jit.load(path, map_location="cpu").state_dict()

    def walk(obj: _ScriptObject, prefix: str):
        for name, value in (obj.state if isinstance(obj.state, dict) else {}).items():
            if isinstance(value, torch.Tensor):
                yield prefix + name, value
            elif isinstance(value, _ScriptObject):
                yield from walk(value, prefix + name + ".")

    return dict(walk(top, ""))
