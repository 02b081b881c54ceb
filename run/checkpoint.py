"""The files a training run leaves, written so that a run is never lost: the checkpoint, its log, and a lock on
the run's folder; and any checkpoint or released weights as a model to evaluate (`load_model`).

Not part of the paper. A run writes OUT/ckpt.pt (the unwrapped, uncompiled model's state_dict with the
optimizer, config, step, tokenizer and seed), keeps the checkpoint before it as OUT/ckpt-prev.pt, and
appends a JSON record to OUT/log.jsonl every --log-every steps. Every file is written to a temporary
name and then renamed (released/disk.py), so an interrupted write never leaves a half file where a whole one was; a
checkpoint is only ever written from finite weights (train.py checks them), and it is read back with
torch.load(weights_only=True): tensors and plain data, never code, and its config must fit its tensors
before any module is built (config_fits). A checkpoint that cannot be used is refused in one line, which
names ckpt-prev.pt and its step when that one can be read; a full disk stops the run with both files as
they were. Continuing a run is run/resume.py's concern.
"""

import contextlib
import json
import os
import sys

import torch

from baselines.objectives import concept_scale_bias
from model import CLIP, CLIPConfig
from released.convert import some
from released.disk import atomic_write
from released.download import WEIGHTS
from released.files import check_views, held_elements
from released.tokenizers import tokenizer_from_state_dict
from released.weights import load_weights

try:
    import fcntl  # POSIX; on Windows the lock below is skipped
except ImportError:
    fcntl = None


def save_checkpoint(path: str, **state) -> None:
    """Write the checkpoint atomically; the one it replaces stays beside it as <name>-prev.pt. A write that
    fails (a full disk) leaves both files as they were and no temporary file."""
    with atomic_write(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as err:  # torch's zip writer, closed after a failed write, fails again and hides why
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())  # a full disk can also surface here, and must before the old files are moved
        if os.path.exists(path):
            os.replace(path, previous(path))


def previous(path: str) -> str:
    return path.removesuffix(".pt") + "-prev.pt"


def load_checkpoint(path: str) -> dict:
    """A checkpoint of ours, read with weights_only=True. ValueError with one line saying what is wrong:
    not a file, not a torch file, not a checkpoint of this repository, a tensor that repeats its bytes
    (check_views), or a config or tokenizer that does not fit (checkpoint_parts)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for a file it cannot read
        raise ValueError(f"{path} is not a checkpoint torch can read safely ({type(err).__name__})") from None
    if not isinstance(state, dict) or not {"model", "config", "tokenizer", "step"} <= set(state):
        raise ValueError(f"{path} is a torch file but not a checkpoint of train.py (no model, config, tokenizer, step)")
    try:
        check_views(state)  # the optimizer's tensors too: a view that repeats its bytes fails the first step
        checkpoint_parts(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return state


def checkpoint_parts(state: dict) -> tuple[CLIPConfig, object]:
    """(config, tokenizer) of a checkpoint in our format ({"model", "config", "tokenizer", ...}). ValueError in
    one line naming what is missing or does not fit: one of the three, a config that is not model.py's, a
    tokenizer of an unknown kind or malformed, or one with more tokens or a longer context than the model."""
    missing = [k for k in ("model", "config", "tokenizer") if k not in state]
    if missing or not isinstance(state["model"], dict):
        what = f"no {' and no '.join(missing)}" if missing else "a model that is not a state dict"
        raise ValueError(f"a checkpoint with {what}: not one train.py wrote (model, config, tokenizer), nor weights")
    try:
        config = {k: v for k, v in state["config"].items() if k != "concept_logits"}  # older checkpoints have it
        cfg = CLIPConfig.from_dict(config)
    except KeyError as err:
        raise ValueError(f"its config has no {err}: not a checkpoint train.py wrote (vision, text, ...)") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"its config is not model.py's, not a checkpoint train.py wrote ({err})") from None
    config_fits(cfg, state["model"])
    tokenizer = tokenizer_from_state_dict(state["tokenizer"])
    if len(tokenizer) > cfg.text.vocab_size or tokenizer.context_length > cfg.text.context_length:
        raise ValueError(
            f"its tokenizer ({len(tokenizer)} tokens, a context of {tokenizer.context_length}) does not fit its "
            f"model ({cfg.text.vocab_size} tokens, a context of {cfg.text.context_length})"
        )
    return cfg, tokenizer


SIZES = {
    "vision": ("image_size", "patch_size", "width", "heads"),
    "text": ("vocab_size", "context_length", "width", "heads"),
}


def least_parameters(cfg: CLIPConfig) -> int:
    """At least the parameters CLIP(cfg) holds, by arithmetic (nothing is built): each block's attention and
    MLP (12 W^2 + 13 W with its LayerNorms), the patch and token embeddings, the positions, the projection."""
    v, t = cfg.vision, cfg.text
    block = lambda width: 12 * width * width + 13 * width  # noqa: E731
    vision = v.layers * block(v.width) + (3 * v.patch_size**2 + (v.image_size // v.patch_size) ** 2) * v.width
    return vision + t.layers * block(t.width) + (t.vocab_size + t.context_length + cfg.embed_dim) * t.width


def check_sizes(cfg: CLIPConfig) -> None:
    """Sizes that are positive integers (layers: not negative), heads that divide the width, patches the image."""
    for tower, names in SIZES.items():
        sub = getattr(cfg, tower)
        for name in (*names, "layers"):
            if type(getattr(sub, name)) is not int or getattr(sub, name) < (name != "layers"):
                raise ValueError(f"its config's {tower}.{name} is {getattr(sub, name)!r}, not a count")
        if sub.width % sub.heads or (tower == "vision" and sub.image_size % sub.patch_size):
            raise ValueError(f"its config's {tower} width or image size does not divide into its heads or patches")
    if type(cfg.embed_dim) is not int or cfg.embed_dim < 1:
        raise ValueError(f"its config's embed_dim is {cfg.embed_dim!r}, not a count")


def config_fits(cfg: CLIPConfig, model: dict) -> None:
    """Refuses, in one line and before any module is built, a config its checkpoint's tensors cannot fill: bad
    sizes (check_sizes), more parameters (least_parameters) than the tensors' storages hold or more blocks
    than the tensors could be named for (12 each), then any tensor missing, left over or of another shape
    than the model, built on the meta device (no memory), expects. A 1.9 KB file asking for 10^7 blocks
    is refused here, not by the allocator."""
    check_sizes(cfg)
    tensors = [t for t in model.values() if isinstance(t, torch.Tensor)]
    need, held, blocks = least_parameters(cfg), held_elements(tensors), cfg.vision.layers + cfg.text.layers
    if need > held or 12 * blocks > len(tensors):
        raise ValueError(
            f"its config ({blocks} blocks, widths {cfg.vision.width} and {cfg.text.width}) needs at least {need:,} "
            f"parameters in {12 * blocks:,} tensors, its model holds {held:,} in {len(tensors):,}"
        )
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in CLIP(cfg).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as err:  # a setting model.py does not know
        raise ValueError(f"its config is not model.py's ({type(err).__name__}: {err})") from None
    shape = lambda k: tuple(getattr(model[k], "shape", ("not a tensor",)))  # noqa: E731
    study = lambda k: k.startswith("concept_logit_")  # noqa: E731  the study's pair (baselines/objectives.py)
    missing, extra = [k for k in expected if k not in model], [k for k in model if k not in expected and not study(k)]
    what = [f"{len(missing)} missing ({some(missing)})"] * bool(missing)
    what += [f"{len(extra)} unexpected ({some(extra)})"] * bool(extra)
    what += [f"{k} is {shape(k)}, the config makes {v}" for k, v in expected.items() if k in model and shape(k) != v]
    if what:
        raise ValueError(f"its model's tensors do not fit its config: {'; '.join(what[:4])}")


def previous_hint(path: str, flag: str) -> str:
    """For a message about a checkpoint that cannot be used: '' or, when the one before it (<name>-prev.pt)
    can be read, a clause naming it, its step and how to use it instead (`flag`: --resume, --ckpt, --init)."""
    prev = previous(path)
    if prev == path or not os.path.isfile(prev):
        return ""
    try:
        step = load_checkpoint(prev)["step"]
    except ValueError:
        return ""
    move = f"move it into place (mv {prev} {path})"
    use = f"{move} and run again with --resume" if flag == "--resume" else f"pass it to {flag}, or {move}"
    return f"; {prev}, the checkpoint before it, can be read and holds step {step}: {use}"


def saved_steps(path: str) -> str:
    """Which step each checkpoint file of a run holds, for a message after a write failed: 'A holds step 4,
    B holds step 2'. Steps are read through a memory map, without reading the weights."""
    held = []
    for f in (path, previous(path)):
        if os.path.exists(f):
            try:
                held.append(f"{f} holds step {torch.load(f, map_location='cpu', weights_only=True, mmap=True)['step']}")
            except Exception:  # torn, or not ours: said as such, the message is about the write
                held.append(f"{f} cannot be read")
    return ", ".join(held) if held else "no checkpoint was written yet"


def read_log(path: str) -> list[dict]:
    """The records of a log.jsonl, in order. A line that is not a whole JSON record (a write torn by a
    crash) is left out rather than failing every later reader."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def log_record(step: int, loss, terms: dict, model, optimizer, seconds: float, dataset) -> dict:
    """One line of log.jsonl: the loss and its unweighted terms, t and b (and the concept losses' own pair),
    the learning rate, the wall time and, for a stream of shards, its epoch and the samples it skipped (or
    kept but changed) so far."""
    record = {
        "step": step,
        "loss": loss.item(),
        **{k: v.item() for k, v in terms.items()},
        "scale": model.scale().item(),
        "bias": model.bias().item(),
    }
    if hasattr(model, "concept_logit_scale"):  # the study's (baselines/objectives.py)
        record |= dict(zip(("concept_scale", "concept_bias"), (v.item() for v in concept_scale_bias(model))))
    record |= {"lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2)}
    if hasattr(dataset, "skipped"):  # a stream of shards (sources/stream.py)
        record |= dict(epoch=dataset.epoch, skipped=dataset.skipped, noted=dataset.noted)
    return record


class RunInUse(RuntimeError):
    pass


@contextlib.contextmanager
def locked(folder: str):
    """Hold an exclusive lock on folder/.lock for the block: a second process on the same folder is refused
    (RunInUse) instead of interleaving its checkpoints and log with the first one's."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInUse(f"{folder} is in use by another training process (its .lock is held)") from None
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


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
        model = CLIP(cfg)  # the study's concept logit pair (--concept-logits own) is read in training only
        model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("concept_logit_")})
        if not all(p.isfinite().all() for p in model.parameters()):  # a diverged run: every score would be noise
            raise ValueError("the weights hold NaN or inf values (a diverged run?); refusing to score them")
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:  # no tokenizer; other weights; offline
        sys.exit(f"error: {path}: {' '.join(str(err).split())}{previous_hint(path, '--ckpt')}")
    except (MemoryError, SystemError) as err:  # what no check above foresaw: still one line
        sys.exit(f"error: {path}: reading or building it ran out of memory ({type(err).__name__})")
    return model.to(device).eval(), tokenizer, ckpt
