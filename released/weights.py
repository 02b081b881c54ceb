"""Released weights in this repository's own modules: OpenAI's CLIP ViT-B/16, open_clip's CLIP state dicts,
and open_clip's SigLIP ViT-B/16 (ViT-B-16-SigLIP, the paper's backbone).

The paper fine-tunes pretrained weights; none of OpenAI's, open_clip's or timm's code runs here. Files are
read without executing anything (weight_files.py), their tensors renamed onto model.py's modules with the
config read off the shapes (`convert_openai_state_dict`, `convert_siglip_state_dict`), and `load_weights`
turns any supported file into a checkpoint in this repository's format: {"config", "model", "tokenizer"},
with the tokenizer the weights were trained with (released_tokenizers.py). A release can be named instead of
a file (`openai/ViT-B-16`, the names of download.WEIGHTS): it is downloaded once into a cache folder and
checked there (download.py), as is CLIP's BPE vocabulary when none is at hand.

Departures: OpenAI's CLIP has no logit bias, which the sigmoid losses need: `balanced_bias` chooses one
from the first batch (train.py --init-bias auto). SigLIP's weights bring their own t and b.

Dimension legend: B images (= captions), D joint embedding width.
"""

import argparse
import math
import os
import re
import sys
from dataclasses import asdict

import torch

from checkpoint import checkpoint_parts, previous_hint
from download import WEIGHTS, add_cache_flag, fetch, refetch_hint, resolve_weights
from model import CLIP, SIGLIP_TEXT, SIGLIP_VISION, CLIPConfig, TextConfig, VisionConfig
from released_tokenizers import BPETokenizer, SigLIPTokenizer, find_bpe_vocab, find_spm_model
from weight_files import WeightFileError, read_state_dict

# ----------------------------------------------------------------------------- CLIP (OpenAI/open_clip naming)
# OpenAI's release (a TorchScript archive) and open_clip's state dicts share one naming; only the names
# differ from ours, never the layout: nn.MultiheadAttention packs q, k, v into one in_proj matrix in that
# order, which is exactly our qkv Linear, and OpenAI's projections are already (width, embed) matrices
# applied as x @ proj. Every bias and LayerNorm has a counterpart; the patch convolution has no bias there
# either. So the conversion is a rename plus a check that nothing is missing or left over.

TOP_NAMES = {  # theirs -> ours, outside the residual blocks
    "visual.conv1.weight": "visual.patchify.weight",
    "visual.class_embedding": "visual.class_token",
    "visual.positional_embedding": "visual.positions",
    "visual.ln_pre.weight": "visual.ln_pre.weight",
    "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight",
    "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj": "visual.proj",
    "token_embedding.weight": "text.token_embedding.weight",
    "positional_embedding": "text.positions",
    "ln_final.weight": "text.ln_final.weight",
    "ln_final.bias": "text.ln_final.bias",
    "text_projection": "text.proj",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",  # only in models trained with the sigmoid loss; optional
}
BLOCK_NAMES = {  # theirs -> ours, inside each residual block
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.out.weight",
    "attn.out_proj.bias": "attn.out.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.0.weight",
    "mlp.c_fc.bias": "mlp.0.bias",
    "mlp.c_proj.weight": "mlp.2.weight",
    "mlp.c_proj.bias": "mlp.2.bias",
}
TOWERS = {
    "visual.transformer.resblocks": ("visual.blocks", BLOCK_NAMES),
    "transformer.resblocks": ("text.blocks", BLOCK_NAMES),
}
# Scalars OpenAI's archive keeps beside the weights, checked against the shapes; and the causal mask,
# which open_clip builds as a buffer (kept by TorchScript) and our attention computes itself.
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


def rename(state: dict, top: dict, towers: dict, ignored: set, what: str) -> tuple[dict[str, str], list[int]]:
    """(theirs -> ours for every tensor our model holds, the number of blocks of each tower). `top` names the
    tensors outside the blocks ("logit_bias" is optional), `towers` maps each tower's block prefix to ours
    and the names inside a block. Raises ValueError listing every expected key that is missing and every
    key that has no place in our model (`ignored` ones aside)."""
    layers = {tower: 0 for tower in towers}
    for key in state:
        for tower in towers:
            if m := re.match(re.escape(tower) + r"\.(\d+)\.", key):
                layers[tower] = max(layers[tower], int(m.group(1)) + 1)
    names = {k: v for k, v in top.items() if k != "logit_bias" or k in state}
    for tower, (ours, block_names) in towers.items():
        for i in range(layers[tower]):
            names.update({f"{tower}.{i}.{a}": f"{ours}.{i}.{b}" for a, b in block_names.items()})
    missing = [k for k in names if k not in state]
    unmapped = [k for k in state if k not in names and k not in ignored]
    if missing or unmapped or not all(layers.values()):
        raise ValueError(
            f"not a {what} that this model can hold:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  keys with no place in our model ({len(unmapped)}): {unmapped}"
        )
    return names, list(layers.values())


def config_of(state: dict, vision: dict, text: dict, embed_dim: int, activation: str, head_width: int) -> CLIPConfig:
    """The config of released weights: each tower's fields as read off the shapes, its heads head_width wide,
    and the weights' own logit scale and bias (None: the weights have no bias)."""
    bias = state.get("logit_bias")
    return CLIPConfig(
        vision=VisionConfig(heads=vision["width"] // head_width, activation=activation, **vision),
        text=TextConfig(heads=text["width"] // head_width, activation=activation, **text),
        embed_dim=embed_dim,
        init_logit_scale=float(state["logit_scale"]),
        init_logit_bias=None if bias is None else float(bias),
    )


def convert_openai_state_dict(
    state: dict, activation: str = "quick_gelu", head_width: int = 64
) -> tuple[CLIPConfig, dict]:
    """An OpenAI or open_clip CLIP state dict -> (our config, our state dict) for CLIP(cfg).load_state_dict.

    The config is read off the shapes. Two things the shapes cannot tell are arguments: the activation
    (OpenAI's weights and open_clip's "-quickgelu" models use QuickGELU, open_clip's own ViT-B-16 GELU)
    and the head width (64 in every OpenAI and open_clip ViT, so heads = width / 64). Raises ValueError
    listing every expected key that is missing and every key that has no place in our model.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DistributedDataParallel's prefix
    ignored = {k for k in state if k in OPENAI_SCALARS or k.split(".")[-1] == "attn_mask"}
    names, (v_layers, t_layers) = rename(
        state, TOP_NAMES, TOWERS, ignored, "CLIP ViT state dict in OpenAI/open_clip naming"
    )

    positions = state["visual.positional_embedding"].shape[0]
    grid = math.isqrt(positions - 1)  # 1 class token + grid x grid patches
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    vocab, t_width = state["token_embedding.weight"].shape
    if grid * grid + 1 != positions or v_width % head_width or t_width % head_width:
        raise ValueError(
            f"unexpected shapes: {positions} image positions, widths {v_width}/{t_width}, {head_width}-wide heads"
        )
    vision = dict(image_size=grid * patch, patch_size=patch, width=v_width, layers=v_layers, normalise="clip")
    text = dict(vocab_size=vocab, context_length=state["positional_embedding"].shape[0], width=t_width, pad_id=0)
    cfg = config_of(state, vision, text | dict(layers=t_layers), state["visual.proj"].shape[1], activation, head_width)
    expected = {
        "input_resolution": cfg.vision.image_size,
        "context_length": cfg.text.context_length,
        "vocab_size": vocab,
    }
    for key in OPENAI_SCALARS:
        if key in state and int(state[key]) != expected[key]:
            raise ValueError(f"the archive says {key} = {int(state[key])}, the weights' shapes say {expected[key]}")
    # OpenAI's release stores fp16 weights; training keeps fp32 master weights (autocast does the rest).
    return cfg, {ours: state[theirs].float() for theirs, ours in names.items()}


# ----------------------------------------------------------------------------- SigLIP (open_clip/timm naming)
# open_clip's ViT-B-16-SigLIP is timm's ViT ("visual.trunk.*") beside open_clip's own bidirectional text
# transformer ("text.*", CLIP's block naming). timm's attention packs q, k, v into one qkv Linear, as ours;
# its MAP head keeps q and kv apart, as ours. Three tensors differ in layout, not content: timm keeps a
# batch axis on the positions (1, N, W) and the probe (1, 1, W), and open_clip's text projection is an
# nn.Linear, a (D, W) weight applied as x @ weight.T, where ours is a (W, D) matrix.
WB = ("weight", "bias")
HEAD_MODULES = {"q": "q", "kv": "kv", "proj": "out", "norm": "norm", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
TIMM_BLOCK_MODULES = {  # theirs -> ours, inside each of timm's ViT blocks
    "norm1": "ln_1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.out",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.2",
}
SIGLIP_TOP_NAMES = {
    "visual.trunk.patch_embed.proj.weight": "visual.patchify.weight",
    "visual.trunk.patch_embed.proj.bias": "visual.patchify.bias",
    "visual.trunk.pos_embed": "visual.positions",
    "visual.trunk.norm.weight": "visual.ln_post.weight",
    "visual.trunk.norm.bias": "visual.ln_post.bias",
    "visual.trunk.attn_pool.latent": "visual.head.probe",
    **{f"visual.trunk.attn_pool.{a}.{p}": f"visual.head.{b}.{p}" for a, b in HEAD_MODULES.items() for p in WB},
    "text.token_embedding.weight": "text.token_embedding.weight",
    "text.positional_embedding": "text.positions",
    "text.ln_final.weight": "text.ln_final.weight",
    "text.ln_final.bias": "text.ln_final.bias",
    "text.text_projection.weight": "text.proj",
    "text.text_projection.bias": "text.proj_bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
TIMM_BLOCK_NAMES = {f"{a}.{p}": f"{b}.{p}" for a, b in TIMM_BLOCK_MODULES.items() for p in WB}
SIGLIP_TOWERS = {
    "visual.trunk.blocks": ("visual.blocks", TIMM_BLOCK_NAMES),
    "text.transformer.resblocks": ("text.blocks", BLOCK_NAMES),
}
SIGLIP_LAYOUT = {  # ours -> how their tensor becomes ours
    "visual.positions": lambda t: t[0],  # (1, N, W) -> (N, W)
    "visual.head.probe": lambda t: t.reshape(-1),  # (1, 1, W) -> (W,)
    "text.proj": lambda t: t.T.contiguous(),  # (D, W) -> (W, D)
}


def is_siglip(state: dict) -> bool:
    """SigLIP's weights in open_clip's naming hold timm's ViT under visual.trunk; CLIP's do not."""
    return any(k.removeprefix("module.").startswith("visual.trunk.") for k in state)


def convert_siglip_state_dict(state: dict, activation: str = "gelu", head_width: int = 64) -> tuple[CLIPConfig, dict]:
    """An open_clip SigLIP state dict (ViT-B-16-SigLIP's naming) -> (our config, our state dict).

    The config is read off the shapes, with SigLIP's settings the shapes cannot tell (model.SIGLIP_VISION,
    SIGLIP_TEXT: LayerNorm eps 1e-6, bidirectional text read at the last position, squashed images, mean
    and std 0.5), exact GELU as open_clip computes it, and 64-wide heads (12 in B/16, also in the MAP head).
    Raises ValueError listing every expected key that is missing and every key with no place in our model.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    names, (v_layers, t_layers) = rename(
        state, SIGLIP_TOP_NAMES, SIGLIP_TOWERS, set(), "SigLIP state dict in open_clip/timm naming"
    )
    v_width, _, patch, _ = state["visual.trunk.patch_embed.proj.weight"].shape
    positions = state["visual.trunk.pos_embed"].shape[1]
    grid = math.isqrt(positions)  # grid x grid patches, no class token
    vocab, t_width = state["text.token_embedding.weight"].shape
    embed_dim = state["text.text_projection.weight"].shape[0]
    if grid * grid != positions or v_width % head_width or t_width % head_width or embed_dim != v_width:
        raise ValueError(
            f"unexpected shapes: {positions} image positions, widths {v_width}/{t_width}, joint width {embed_dim} "
            f"(the MAP head has no projection: it must be the image width), {head_width}-wide heads"
        )
    vision = dict(image_size=grid * patch, patch_size=patch, width=v_width, layers=v_layers, **SIGLIP_VISION)
    text = dict(vocab_size=vocab, context_length=state["text.positional_embedding"].shape[0], width=t_width)
    cfg = config_of(state, vision, text | dict(layers=t_layers, **SIGLIP_TEXT), embed_dim, activation, head_width)
    return cfg, {ours: SIGLIP_LAYOUT.get(ours, lambda t: t)(state[theirs].float()) for theirs, ours in names.items()}


# ----------------------------------------------------------------------------- any file -> our checkpoint


def clip_bpe(bpe: str | None = None, cache: str | None = None) -> str:
    """CLIP's BPE vocabulary: --bpe as given; else the copy inside an installed open_clip_torch; else OpenAI's
    file, downloaded once into the cache (download.py)."""
    if bpe is not None:
        return bpe
    try:
        return find_bpe_vocab(None)
    except FileNotFoundError:
        return fetch("openai/bpe_simple_vocab_16e6", cache)


def siglip_spm(spm: str | None, path: str, name: str, cache: str | None = None) -> str:
    """SigLIP's SentencePiece model: --spm as given; else one beside the weights; else, for weights named from
    download.WEIGHTS, T5's file fetched once into the cache."""
    try:
        return find_spm_model(spm, beside=path)
    except FileNotFoundError:
        if spm is not None or name not in WEIGHTS:
            raise
        return fetch("t5/cc_en.32000", cache)


def read_tokenizer(kind, path: str, context_length: int):
    """kind.from_file(path, context_length); a file it cannot read is a ValueError in one line naming it. Any
    exception: a gzip or protobuf reader meets garbage in many ways (a proxy's page saved as the file)."""
    try:
        return kind.from_file(path, context_length)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"{path} is not a tokenizer file {kind.__name__} can read ({type(err).__name__}){refetch_hint(path)}"
        ) from None


def load_weights(path: str, bpe=None, activation: str = "quick_gelu", spm=None, cache=None) -> dict:
    """A checkpoint in our format ({"config", "model", "tokenizer", ...}) from any of:
      - a checkpoint of ours, returned as it is;
      - OpenAI's CLIP release, a TorchScript archive, read without running its code;
      - an open_clip state dict (torch.save's .bin/.pt, or .safetensors; under "state_dict" in open_clip's
        training checkpoints) of a CLIP ViT or of SigLIP (ViT-B-16-SigLIP), told apart by their keys;
      - a name of download.WEIGHTS ("openai/ViT-B-16"): the release, fetched once into the cache folder
        `cache` and checked (DownloadError when that fails).
    CLIP weights get CLIP's BPE tokenizer (clip_bpe) and `activation` (their shapes cannot tell); SigLIP
    weights get SigLIP's SentencePiece tokenizer, read from `spm` (default: beside the weights). Anything
    else is a ValueError in one line: our readers' own (weight_files.WeightFileError, saying what was wrong),
    or, for what torch.load refuses (it runs with weights_only=True: a file that needs code is not weights),
    "not a weights file torch can read safely"."""
    name, path = path, resolve_weights(path, cache)
    if not os.path.isfile(path):
        inside = os.path.join(path, "ckpt.pt")  # a run's folder given for its checkpoint
        raise ValueError(
            f"not a file (a run's folder? its checkpoint is {inside})" if os.path.isfile(inside) else "not a file"
        )
    try:
        state = read_state_dict(path)
    except WeightFileError as err:  # our readers' own line says what was wrong
        raise WeightFileError(f"{err}{refetch_hint(path)}") from None
    except Exception as err:  # what torch.load raises: pickle, zip and runtime errors, all "not weights"
        raise ValueError(
            f"not a weights file torch can read safely ({type(err).__name__}){refetch_hint(path)}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict or a checkpoint")
    if "model" in state or "config" in state:  # ours (checkpoint_parts says what it lacks), not a state dict
        return state
    state = state.get("state_dict", state)
    if is_siglip(state):
        cfg, state = convert_siglip_state_dict(state)
        tokenizer = read_tokenizer(SigLIPTokenizer, siglip_spm(spm, path, name, cache), cfg.text.context_length)
        if len(tokenizer) > cfg.text.vocab_size:  # T5's 32,000 pieces, 32,000 rows in ViT-B-16-SigLIP
            raise ValueError(f"the tokenizer has {len(tokenizer)} pieces, the weights embed {cfg.text.vocab_size}")
        cfg.text.pad_id = tokenizer.pad_id
    else:
        cfg, state = convert_openai_state_dict(state, activation)
        tokenizer = read_tokenizer(BPETokenizer, clip_bpe(bpe, cache), cfg.text.context_length)
    return {"config": asdict(cfg), "model": state, "tokenizer": tokenizer.state_dict(), "converted_from": name}


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


def add_weight_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say how to read released weights; train.py (--init) and eval.py (--ckpt) share them."""
    parser.add_argument(
        "--bpe",
        default=None,
        metavar="PATH",
        help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for CLIP weights (default: the copy "
        "inside an installed open_clip_torch; our checkpoints carry their tokenizer)",
    )
    parser.add_argument(
        "--clip-act",
        default="quick_gelu",
        choices=["quick_gelu", "gelu"],
        help="activation of CLIP weights, which their shapes cannot tell: quick_gelu for OpenAI's "
        "(and open_clip's *-quickgelu) models, gelu for open_clip's own ViT-B-16 trainings",
    )
    parser.add_argument(
        "--spm",
        default=None,
        metavar="PATH",
        help="SigLIP's SentencePiece model (T5's cc_en.32000 sentencepiece.model, see docs/pretrained.md) for "
        "SigLIP weights (default: sentencepiece.model or spiece.model beside the weights; our checkpoints "
        "carry their tokenizer)",
    )
    add_cache_flag(parser)


def weight_options(args) -> dict:
    """The weight flags of add_weight_flags, as load_weights' and load_model's keyword arguments."""
    return {"bpe": args.bpe, "activation": args.clip_act, "spm": args.spm, "cache": args.cache_dir}


# for --init / --ckpt help: the names download.py can fetch
WEIGHT_NAMES = f"or a released model by name, downloaded once and checked: {', '.join(WEIGHTS)}"


def load_model(path: str, device: torch.device, **options):
    """(model in eval mode, its tokenizer, the checkpoint in our format) of any file load_weights reads, or of a
    name of download.WEIGHTS (options: load_weights' keyword arguments); exits with a message the user can act
    on when the file is missing, cannot be downloaded or is not weights this model can hold."""
    if not os.path.exists(path) and path not in WEIGHTS:
        sys.exit(
            f"error: no checkpoint at {path}. Train one first: python train.py --out {os.path.dirname(path) or '.'}"
            f" (or pass released weights: OpenAI's ViT-B-16.pt, open_clip's SigLIP open_clip_model.safetensors, or a"
            f" name: {', '.join(WEIGHTS)}){previous_hint(path, '--ckpt')}"
        )
    try:
        ckpt = load_weights(path, **options)
        cfg, tokenizer = checkpoint_parts(ckpt)
        model = CLIP(cfg)
        model.load_state_dict(ckpt["model"])
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:  # no tokenizer; other weights; offline
        sys.exit(f"error: {path}: {err}{previous_hint(path, '--ckpt')}")
    if not all(p.isfinite().all() for p in model.parameters()):  # a diverged run: every score would be noise
        sys.exit(f"error: {path}: the weights hold NaN or inf values (a diverged run?); refusing to score them")
    return model.to(device).eval(), tokenizer, ckpt
