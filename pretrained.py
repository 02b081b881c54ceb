"""Released weights in this repository's own modules: OpenAI's CLIP ViT-B/16 and open_clip state dicts.

The paper fine-tunes pretrained weights; none of OpenAI's or open_clip's code runs here. Their weights
are renamed onto model.py's modules (`convert_openai_state_dict`, the config read off the shapes),
OpenAI's TorchScript release is read without executing it (`read_torchscript_state_dict`), and
`load_weights` turns any supported file into a checkpoint in this repository's format: {"config",
"model", "tokenizer"}, with the tokenizer the weights were trained with (released_tokenizers.py). A release
can be named instead of a file (`openai/ViT-B-16`, the names of download.WEIGHTS): it is downloaded once
into a cache folder and checked there (download.py), as is CLIP's BPE vocabulary when none is at hand.

Departures: the paper starts from SigLIP ViT-B/16; the released weights this file can read are OpenAI's
CLIP ViT-B/16 (and open_clip models of the same architecture). OpenAI's CLIP has no logit bias, which
the sigmoid losses need: `balanced_bias` chooses one from the first batch (train.py --init-bias auto).

Dimension legend: B images (= captions), D joint embedding width.
"""

import argparse
import math
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import asdict

import torch

from download import WEIGHTS, add_cache_flag, fetch, resolve_weights
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from released_tokenizers import BPETokenizer, find_bpe_vocab, tokenizer_from_state_dict

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
TOWERS = {"visual.transformer.resblocks": "visual.blocks", "transformer.resblocks": "text.blocks"}
# Scalars OpenAI's archive keeps beside the weights, checked against the shapes; and the causal mask,
# which open_clip builds as a buffer (kept by TorchScript) and our attention computes itself.
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


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
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  keys with no place in our model ({len(unmapped)}): {unmapped}"
        )

    positions = state["visual.positional_embedding"].shape[0]
    grid = math.isqrt(positions - 1)  # 1 class token + grid x grid patches
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    vocab, t_width = state["token_embedding.weight"].shape
    if grid * grid + 1 != positions or v_width % head_width or t_width % head_width:
        raise ValueError(
            f"unexpected shapes: {positions} image positions, widths {v_width}/{t_width}, {head_width}-wide heads"
        )
    v_layers, t_layers = (layers[tower] for tower in TOWERS)
    bias = state.get("logit_bias")
    cfg = CLIPConfig(
        vision=VisionConfig(
            image_size=grid * patch,
            patch_size=patch,
            width=v_width,
            layers=v_layers,
            heads=v_width // head_width,
            activation=activation,
            normalise="clip",
        ),
        text=TextConfig(
            vocab_size=vocab,
            context_length=state["positional_embedding"].shape[0],
            width=t_width,
            layers=t_layers,
            heads=t_width // head_width,
            pad_id=0,
            activation=activation,
        ),
        embed_dim=state["visual.proj"].shape[1],
        init_logit_scale=float(state["logit_scale"]),
        init_logit_bias=None if bias is None else float(bias),
    )
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


# Reading OpenAI's release without running it. The file is a TorchScript archive: a zip holding
# <root>/data.pkl (a pickle of the module tree: each module an object of a "__torch__.*" class whose state
# is a dict of its attributes, tensors among them), <root>/data/<key> (raw tensor storages) and
# <root>/code/ (the model's TorchScript source). torch.jit.load would compile that code; unpickling
# data.pkl with an allow-list of the few globals a weights pickle needs reads the tensors and nothing else.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


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


def clip_bpe(bpe: str | None = None, cache: str | None = None) -> str:
    """CLIP's BPE vocabulary: --bpe as given; else the copy inside an installed open_clip_torch; else OpenAI's
    file, downloaded once into the cache (download.py)."""
    if bpe is not None:
        return bpe
    try:
        return find_bpe_vocab(None)
    except FileNotFoundError:
        return fetch("openai/bpe_simple_vocab_16e6", cache)


def load_weights(path: str, bpe: str | None = None, activation: str = "quick_gelu", cache: str | None = None) -> dict:
    """A checkpoint in our format ({"config", "model", "tokenizer", ...}) from any of:
      - a checkpoint of ours, returned as it is;
      - OpenAI's CLIP release, a TorchScript archive, read without running its code (read_torchscript_state_dict);
      - an open_clip state dict of the same architecture (torch.save; under "state_dict" in open_clip's
        training checkpoints). CLIP weights get CLIP's BPE tokenizer, read from `bpe` (clip_bpe).
    `path` may also be a name of download.WEIGHTS ("openai/ViT-B-16"): the release, fetched once into the
    cache folder `cache` and checked (DownloadError when that fails).
    torch.load runs with weights_only=True: a downloaded file may hold tensors and plain data, not code."""
    name, path = path, resolve_weights(path, cache)
    if not os.path.isfile(path):
        raise ValueError("not a file")
    if is_torchscript(path):
        state = read_torchscript_state_dict(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and runtime errors: whatever it is, it is not weights we can read
            raise ValueError(f"not a weights file torch can read safely ({type(err).__name__})") from None
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict or a checkpoint")
        if "model" in state and "config" in state:
            return state
        state = state.get("state_dict", state)
    cfg, state = convert_openai_state_dict(state, activation)
    tokenizer = BPETokenizer.from_file(clip_bpe(bpe, cache), cfg.text.context_length)
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
    """The flags that say how to read released CLIP weights; train.py (--init) and eval.py (--ckpt) share them."""
    parser.add_argument(
        "--bpe",
        default=None,
        metavar="PATH",
        help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for CLIP weights (default: the copy "
        "inside an installed open_clip_torch, else OpenAI's file downloaded once into --cache-dir; our "
        "checkpoints carry their tokenizer)",
    )
    parser.add_argument(
        "--clip-act",
        default="quick_gelu",
        choices=["quick_gelu", "gelu"],
        help="activation of CLIP weights, which their shapes cannot tell: quick_gelu for OpenAI's "
        "(and open_clip's *-quickgelu) models, gelu for open_clip's own ViT-B-16 trainings",
    )
    add_cache_flag(parser)


# for --init / --ckpt help: the names download.py can fetch
WEIGHT_NAMES = f"or a released model by name, downloaded once and checked: {', '.join(WEIGHTS)}"


def load_model(
    path: str, device: torch.device, bpe: str | None = None, activation: str = "quick_gelu", cache: str | None = None
):
    """(model in eval mode, its tokenizer, the checkpoint in our format) of any file load_weights reads, or of a
    name of download.WEIGHTS; exits with a message the user can act on when the file is missing, cannot be
    downloaded or is not weights this model can hold."""
    if not os.path.exists(path) and path not in WEIGHTS:
        sys.exit(
            f"error: no checkpoint at {path}. Train one first: python train.py --out {os.path.dirname(path) or '.'}"
            f" (or pass CLIP weights, e.g. OpenAI's ViT-B-16.pt, or a name: {', '.join(WEIGHTS)})"
        )
    try:
        ckpt = load_weights(path, bpe, activation, cache)
        model = CLIP(CLIPConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:  # no vocabulary; other weights; offline
        sys.exit(f"error: {path}: {err}")
    if not all(p.isfinite().all() for p in model.parameters()):  # a diverged run: every score would be noise
        sys.exit(f"error: {path}: the weights hold NaN or inf values (a diverged run?); refusing to score them")
    return model.to(device).eval(), tokenizer_from_state_dict(ckpt["tokenizer"]), ckpt
