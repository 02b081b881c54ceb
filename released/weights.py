"""Any weights file (or a released model's name) as a checkpoint in this repository's format.

  load_weights   a checkpoint of ours, OpenAI's CLIP release, an open_clip CLIP or SigLIP state dict, or a
                 name of released/download.WEIGHTS -> {"config", "model", "tokenizer"}, with the tokenizer the
                 weights were trained with (released/tokenizers.py)

The paper fine-tunes pretrained weights; none of OpenAI's, open_clip's or timm's code runs here. Files are
read without executing anything (released/files.py) and renamed onto model.py's modules
(released/convert.py). A release named instead of a file is downloaded once into a cache folder and checked
there (released/download.py), as is CLIP's BPE vocabulary when none is at hand. Starting a training run
from them (train.py --init) is run/start.py's, evaluating them run/checkpoint.py's `load_model`.
"""

import argparse
import os
from dataclasses import asdict

from released.convert import convert_openai_state_dict, convert_siglip_state_dict, is_siglip
from released.download import WEIGHTS, add_cache_flag, fetch, refetch_hint, resolve_weights
from released.files import WeightFileError, read_state_dict
from released.tokenizers import BPETokenizer, SigLIPTokenizer, find_bpe_vocab, find_spm_model


def clip_bpe(bpe: str | None = None, cache: str | None = None) -> str:
    """CLIP's BPE vocabulary: --bpe as given; else the copy inside an installed open_clip_torch; else OpenAI's
    file, downloaded once into the cache (released/download.py)."""
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
        why = f": {' '.join(str(err).split())[:200]}" if isinstance(err, ValueError) else ""  # our reader's own line
        raise ValueError(
            f"{path} is not a tokenizer file {kind.__name__} can read ({type(err).__name__}{why}){refetch_hint(path)}"
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
    else is a ValueError in one line: our readers' own (released/files.WeightFileError, saying what was wrong),
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
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError("holds no state dict (tensors by name)")
    siglip = is_siglip(state)
    try:
        cfg, state = convert_siglip_state_dict(state) if siglip else convert_openai_state_dict(state, activation)
    except (IndexError, RuntimeError, TypeError, AttributeError) as err:  # a tensor of another rank or kind
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"holds tensors this model cannot take ({type(err).__name__}: {detail})") from None
    if siglip:
        tokenizer = read_tokenizer(SigLIPTokenizer, siglip_spm(spm, path, name, cache), cfg.text.context_length)
        if len(tokenizer) > cfg.text.vocab_size:  # T5's 32,000 pieces, 32,000 rows in ViT-B-16-SigLIP
            raise ValueError(f"the tokenizer has {len(tokenizer)} pieces, the weights embed {cfg.text.vocab_size}")
        cfg.text.pad_id = tokenizer.pad_id
    else:
        tokenizer = read_tokenizer(BPETokenizer, clip_bpe(bpe, cache), cfg.text.context_length)
    return {"config": asdict(cfg), "model": state, "tokenizer": tokenizer.state_dict(), "converted_from": name}


def add_weight_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say how to read released weights; train.py (--init) and eval.py (--ckpt) share them."""
    group = parser.add_argument_group("released weights (--init, --ckpt)")
    group.add_argument(
        "--bpe",
        default=None,
        metavar="PATH",
        help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for CLIP weights (default: the copy "
        "inside an installed open_clip_torch; our checkpoints carry their tokenizer)",
    )
    group.add_argument(
        "--clip-act",
        default="quick_gelu",
        choices=["quick_gelu", "gelu"],
        help="activation of CLIP weights, which their shapes cannot tell: quick_gelu for OpenAI's "
        "(and open_clip's *-quickgelu) models, gelu for open_clip's own ViT-B-16 trainings",
    )
    group.add_argument(
        "--spm",
        default=None,
        metavar="PATH",
        help="SigLIP's SentencePiece model (T5's cc_en.32000 sentencepiece.model, see docs/pretrained.md) for "
        "SigLIP weights (default: sentencepiece.model or spiece.model beside the weights; our checkpoints "
        "carry their tokenizer)",
    )
    add_cache_flag(group)


def weight_options(args) -> dict:
    """The weight flags of add_weight_flags, as load_weights' and load_model's keyword arguments."""
    return {"bpe": args.bpe, "activation": args.clip_act, "spm": args.spm, "cache": args.cache_dir}


# for --init / --ckpt help: the names released/download.py can fetch
WEIGHT_NAMES = f"or a released model by name, downloaded once and checked: {', '.join(WEIGHTS)}"
