"""Released weights renamed onto model.py's modules: OpenAI's CLIP ViT-B/16 and open_clip's CLIP state dicts,
and open_clip's SigLIP ViT-B/16 (ViT-B-16-SigLIP, the paper's backbone).

None of OpenAI's, open_clip's or timm's code runs here: their tensors are renamed onto our modules, and the
config is read off the shapes (`convert_openai_state_dict`, `convert_siglip_state_dict`), with the settings
the shapes cannot tell (activation, head width, SigLIP's eps and pooling) as arguments or constants.
Blocks are counted from the ones a file holds, never read off an index (a key numbered 10^8 would ask for
1.2e9 names), and the tensors renamed may not share bytes: each is copied at most once (to float32), not
once per name. A refusal is a ValueError in one line.
Reading the files is released/files.py's concern; turning one into a checkpoint, released/weights.py's.
"""

import itertools
import math
import re

import torch

from model import SIGLIP_TEXT, SIGLIP_VISION, CLIPConfig, TextConfig, VisionConfig
from released.files import held_elements

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


def some(names: list[str], shown: int = 5) -> str:
    """The first `shown` of names, each cut to 80 characters, and how many more: a bounded, one-line list."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n)[:80] for n in names[:shown]) + more


def rename(state: dict, top: dict, towers: dict, ignored: set, what: str) -> tuple[dict[str, str], list[int]]:
    """(theirs -> ours for every tensor our model holds, the number of blocks of each tower). `top` names the
    tensors outside the blocks ("logit_bias" is optional), `towers` maps each tower's block prefix to ours
    and the names inside a block. Raises ValueError, in one line, naming the blocks a tower lacks (blocks
    0 to n - 1 must all be there: a name's index alone never makes names for the blocks below it), the
    expected keys that are missing and the keys that have no place in our model (`ignored` ones aside)."""
    blocks = {tower: set() for tower in towers}
    for key in state:
        for tower in towers:
            if m := re.match(re.escape(tower) + r"\.([0-9]{1,9})\.", key):
                blocks[tower].add(int(m.group(1)))
    for tower, held in blocks.items():
        if len(held) <= max(held, default=-1):  # a gap: counted from the blocks the file holds, not its indices
            absent = list(itertools.islice((i for i in itertools.count() if i not in held), 3))
            raise ValueError(
                f"not a {what} that this model can hold: {tower} has {len(held)} blocks numbered up to "
                f"{max(held)}, not block(s) {', '.join(map(str, absent))}"
            )
    names = {k: v for k, v in top.items() if k != "logit_bias" or k in state}
    for tower, (ours, block_names) in towers.items():
        for i in range(len(blocks[tower])):
            names.update({f"{tower}.{i}.{a}": f"{ours}.{i}.{b}" for a, b in block_names.items()})
    missing = [k for k in names if k not in state]
    unmapped = [k for k in state if k not in names and k not in ignored]
    wrong = [k for k in names if k in state and not isinstance(state[k], torch.Tensor)]
    if missing or unmapped or wrong or not all(blocks.values()):
        found = {"missing keys": missing, "keys with no place in our model": unmapped, "not tensors": wrong}
        found = "; ".join(f"{kind} ({len(keys)}): {some(keys)}" for kind, keys in found.items() if keys)
        raise ValueError(f"not a {what} that this model can hold: {found or 'a tower without blocks'}")
    if sum(state[k].numel() for k in names) > held_elements(state[k] for k in names):
        raise ValueError(f"not a {what} that this model can hold: its tensors share bytes (views of one storage)")
    return names, [len(held) for held in blocks.values()]


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
