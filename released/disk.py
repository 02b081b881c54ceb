"""Files written whole or not at all, and JSON read without trusting it.

  atomic_write   a file appears whole or not at all: a crash or a full disk leaves the old one, never a part
  write_json     JSON written so
  read_json      JSON read back, or None when it is missing or unreadable (nested too deep included)
  unique_keys    json's object_pairs_hook that refuses a key given twice (DuplicateKey)
  WeightFileError  what a weights reader raises for a file it refuses, in one line

Not part of the paper: downloads (released/transfer.py), checkpoints (run/checkpoint.py) and the shards'
cached counts (sources/shards.py) are written with them.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """with atomic_write(path) as f: ...  writes to a temporary file renamed to `path` when the block ends
    without an exception; readers see the old file or the new one, never a part. The temporary name holds
    the process id, so two writers never share one."""
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
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep for json
        return None


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs: list[tuple]) -> dict:
    """json's object_pairs_hook: an object, refused (DuplicateKey) if a key repeats. json itself keeps the last
    value, which would let a safetensors header name a tensor twice, or drop a SugarCrepe record unseen."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


class WeightFileError(ValueError):
    """A weights file our readers refuse (released/files.py, safetensors_reader.py); the message is one line
    saying what was wrong with it."""


def is_count(x) -> bool:
    return type(x) is int and x >= 0  # JSON's true and pickle's True are not counts, though a bool is an int
