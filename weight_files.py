"""Files of released weights, read without running any of their code: OpenAI's TorchScript archive and
safetensors. pretrained.py renames what they hold onto model.py's modules.

  read_state_dict        any supported file -> its dict (a state dict, or a checkpoint of ours or open_clip's)
  read_torchscript_state_dict   OpenAI's CLIP release, a TorchScript zip, unpickled with an allow-list
  read_safetensors       a .safetensors file (open_clip's hub repositories ship them): a JSON header and
                         raw little-endian buffers, read with a dozen lines instead of the safetensors package

Paper map: none (the paper fine-tunes pretrained weights; this is how they get in).
"""

import json
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict

import torch

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


def is_safetensors(path: str) -> bool:
    """A safetensors file opens with its header's length, then the header's first character, "{"."""
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:] == b"{" and struct.unpack("<Q", start[:8])[0] > 1


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, each read into a buffer of its own (one copy in memory)."""
    if sys.byteorder != "little":
        raise ValueError("reading safetensors (little-endian) needs a little-endian machine")
    tensors = {}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"{path}: a header of {length} bytes does not fit in the file: not safetensors")
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: {name} has dtype {info['dtype']}, which this reader does not know")
            dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            if end - begin != dtype.itemsize * int(torch.Size(info["shape"]).numel()):
                raise ValueError(f"{path}: {name} holds {end - begin} bytes, not a {info['dtype']} {info['shape']}")
            f.seek(8 + length + begin)
            raw = bytearray(f.read(end - begin))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    return tensors


def read_state_dict(path: str) -> dict:
    """The dict a weights file holds: a TorchScript archive's tensors, a safetensors file's tensors, or
    whatever torch.save wrote (a state dict, open_clip's {"state_dict": ...}, a checkpoint of ours), loaded
    with weights_only=True: a downloaded file may hold tensors and plain data, not code."""
    if is_torchscript(path):
        return read_torchscript_state_dict(path)
    if is_safetensors(path):
        return read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)
