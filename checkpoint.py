"""The files a training run leaves: atomic writes, the checkpoint, and its log.

Not part of the paper. A run writes OUT/ckpt.pt (the unwrapped, uncompiled model's state_dict with the
optimizer, config, step, tokenizer and seed) and OUT/log.jsonl (a JSON record every --log-every steps).
Every file is written atomically, to a temporary name and then renamed, so that an interrupted write
never leaves a half file where a whole one was.
"""

import contextlib
import json
import os

import torch


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """with atomic_write(path) as f: ...  writes to a temporary file renamed to `path` when the block ends
    without an exception; readers see the old file or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj, indent: int | None = None) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)


def read_json(path: str):
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_checkpoint(path: str, **state) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def read_log(path: str) -> list[dict]:
    """The records of a log.jsonl, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
