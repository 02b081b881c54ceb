"""A .safetensors file read with a few dozen lines instead of the safetensors package (open_clip's hub
repositories ship them): a JSON header and raw little-endian buffers.

  is_safetensors     whether a file opens as one
  safetensors_layout every tensor's place in the data, checked as the safetensors library checks a header
  read_safetensors   the tensors, each read into a buffer of its own

A downloaded file may be crafted: the header is at most 100 MB, may not name a tensor twice, and its tensors
cover the data exactly, in order, with shapes matching their byte counts; a refusal is one line
(released/files.py WeightFileError). Paper map: none (the paper fine-tunes pretrained weights).
"""

import json
import math
import os
import struct
import sys

import torch

from released.disk import DuplicateKey, WeightFileError, is_count, unique_keys

# A safetensors file: 8 bytes, the header's length as a little-endian unsigned 64-bit integer; the header,
# JSON, {name: {"dtype", "shape", "data_offsets": [begin, end]}} (and an optional "__metadata__" of strings);
# then the tensors' raw bytes, row-major and little-endian, offsets counted from the end of the header.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


def is_safetensors(path: str) -> bool:
    """A safetensors file opens with its header's length, then the header's first character, "{"."""
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:] == b"{" and struct.unpack("<Q", start[:8])[0] > 1


def safetensors_layout(header: dict, data_bytes: int) -> list[tuple[int, int, str, torch.dtype, list[int]]]:
    """(begin, end, name, dtype, shape) of every tensor in a safetensors header, in file order, checked as
    the safetensors library checks them: offsets two non-negative integers, shapes lists of non-negative
    integers whose product x the dtype's size is the tensor's byte count, tensors one after another from
    byte 0 that cover the `data_bytes` after the header exactly (no gap, no overlap, nothing left over), and
    "__metadata__" strings to strings. Raises WeightFileError naming the first tensor that fails."""
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightFileError("__metadata__ must map strings to strings")
    tensors = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise WeightFileError(f"{name}: needs dtype, shape and data_offsets")
        kind, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(kind, str) or kind not in SAFETENSORS_DTYPES:
            raise WeightFileError(f"{name} has dtype {kind}, which this reader does not know")
        if not isinstance(shape, list) or not all(map(is_count, shape)):
            raise WeightFileError(f"{name} has shape {json.dumps(shape)}: not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
            raise WeightFileError(f"{name} has data_offsets {json.dumps(offsets)}: not two non-negative integers")
        (begin, end), dtype = offsets, SAFETENSORS_DTYPES[kind]
        if end - begin != dtype.itemsize * math.prod(shape):  # an end before its begin is refused here too
            raise WeightFileError(f"{name} spans bytes {begin} to {end}, not the size of a {kind} {shape}")
        tensors.append((begin, end, name, dtype, shape))
    tensors.sort(key=lambda t: t[:2])
    position = 0
    for begin, end, name, _, _ in tensors:
        if begin != position:
            raise WeightFileError(f"{name} starts at byte {begin} of the data, not {position}: a gap or an overlap")
        position = end
    if position != data_bytes:
        raise WeightFileError(f"the tensors cover {position} bytes, the file holds {data_bytes} after its header")
    return tensors


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, each read into a buffer of its own (one copy in memory, of bytes
    that each belong to one tensor). Raises WeightFileError for a header safetensors_layout refuses."""
    if sys.byteorder != "little":
        raise WeightFileError("reading safetensors (little-endian) needs a little-endian machine")
    tensors = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        (length,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        if length > min(MAX_HEADER, size - 8):
            raise WeightFileError(f"a header of {length:,} bytes: more than the file holds or {MAX_HEADER:,}")
        try:
            header = json.loads(f.read(length).decode("utf-8"), object_pairs_hook=unique_keys)
        except DuplicateKey as err:
            raise WeightFileError(f"the header names {err.args[0]!r} twice") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise WeightFileError(f"the header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise WeightFileError(f"the header is a JSON {type(header).__name__}, not an object")
        for begin, end, name, dtype, shape in safetensors_layout(header, size - 8 - length):
            raw = bytearray(end - begin)  # read straight into it: the tensors follow one another
            if f.readinto(raw) != len(raw):
                raise WeightFileError(f"{name}: the file ends early")
            tensors[name] = (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)).reshape(shape)
    return tensors
