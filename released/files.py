"""Files of released weights, read without running any of their code: OpenAI's TorchScript archive and
safetensors. released/convert.py renames what they hold onto model.py's modules.

  read_state_dict        any supported file -> its dict (a state dict, or a checkpoint of ours or open_clip's)
  read_torchscript_state_dict   OpenAI's CLIP release, a TorchScript zip, unpickled with an allow-list
  (a .safetensors file is released/safetensors_reader.py's)

What is checked, and why: a downloaded file may be crafted. Nothing in it runs: a pickle naming anything off
the allow-list (module.name) is refused, never handed to torch.jit.load, whose TorchScript __setstate__ can
create and overwrite files. Nothing in it costs more memory than the bytes it holds: zip members must be
stored (torch never compresses tensors or pickles; a deflated member inflates to whatever it claims), inside
the file and apart (two names over one payload are read twice); a TorchScript storage is read to its declared
numel x itemsize only; a safetensors header is checked as the safetensors library checks it (at most 100 MB,
tensors covering the data exactly, in order, shapes matching byte counts) and may not name a tensor twice.
Nor can a view cost more than its storage: a tensor may not view more elements than its storage holds (zero
strides would let 2 bytes stand for a tensor of any size, made real when converted), and a TorchScript module
tree may not reach one module twice (shared modules would name 2^40 tensors in 40 levels of a small pickle).
A refusal is a WeightFileError (a ValueError) whose message is one line.

Paper map: none (the paper fine-tunes pretrained weights; this is how they get in).
"""

import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import torch

from released.disk import WeightFileError, is_count
from released.safetensors_reader import is_safetensors, read_safetensors

CHUNK = 1 << 20  # bytes read at a time into a storage's buffer: the transient copy stays this small


def storage_elements(t: torch.Tensor) -> int:
    """The elements of t's dtype that the storage under t holds."""
    return t.untyped_storage().nbytes() // t.element_size()


def held_elements(tensors) -> int:
    """The elements the storages under `tensors` hold, each storage counted once however many views it has:
    what a model built from them can fill without repeating bytes."""
    held = {}
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        held[key] = max(held.get(key, 0), storage_elements(t))
    return sum(held.values())


def check_views(obj) -> None:
    """Refuses (WeightFileError) any tensor in obj (nested dicts, lists and tuples, each walked once) that views
    more elements than its storage holds: zero strides let a few bytes stand for a tensor of any size, and a
    copy (.float(), load_state_dict) makes it real."""
    seen, stack = set(), [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor) and x.numel() > storage_elements(x):
            raise WeightFileError(
                f"a {tuple(x.shape)} tensor views {x.numel():,} elements of a storage of {storage_elements(x):,}: "
                "its bytes repeated (zero strides), more than the file holds"
            )
        stack.extend(x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ())


# ----------------------------------------------------------------------------- zips: every byte in the file once


def check_zip_members(path: str, members: list[zipfile.ZipInfo]) -> None:
    """Refuses any of `members` whose bytes are not plainly in the file, once: a compressed member (its
    inflated size is what its header claims, not what the file holds: 1 MB of deflated zeros is 1 GiB read),
    one whose declared size runs past the file's end, or two whose bytes overlap (a zip's directory may
    point many names at one payload, and each name is read into memory of its own)."""
    spans = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for info in members:
            if info.compress_type != zipfile.ZIP_STORED:
                raise WeightFileError(
                    f"{info.filename} is compressed, which torch never does to weights (a compressed member can "
                    "inflate to any size): re-save the tensors with torch.save"
                )
            f.seek(info.header_offset)
            local = f.read(30)  # the member's own header: 30 bytes, then its name and an extra field
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise WeightFileError(f"{info.filename} has no header where the zip's directory says: a damaged zip")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            end = info.header_offset + 30 + name_length + extra_length + info.compress_size
            if info.file_size != info.compress_size or end > size:
                raise WeightFileError(f"{info.filename} claims {info.file_size} bytes, which the file does not hold")
            spans.append((info.header_offset, end, info.filename))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise WeightFileError(f"zip members {first} and {second} share bytes: one payload under two names")


# ----------------------------------------------------------------------------- TorchScript archives
# Reading OpenAI's release without running it. The file is a TorchScript archive: a zip holding
# <root>/data.pkl (a pickle of the module tree: each module an object of a "__torch__.*" class whose state
# is a dict of its attributes, tensors among them), <root>/data/<key> (raw tensor storages) and
# <root>/code/ (the model's TorchScript source). torch.jit.load would compile that code and run it;
# unpickling data.pkl with an allow-list of the few globals a weights pickle needs reads the tensors and
# nothing else. The storage types: every one that holds plain numbers, named as TorchScript names them
# (c10's scalar type + "Storage"); quantized storages need rebuild functions that are not on the list.
STORAGE_DTYPES = {
    f"{name}Storage": getattr(torch, dtype)
    for name, dtype in [
        ("Float", "float32"),
        ("Half", "float16"),
        ("BFloat16", "bfloat16"),
        ("Double", "float64"),
        ("ComplexFloat", "complex64"),
        ("ComplexDouble", "complex128"),
        ("Long", "int64"),
        ("Int", "int32"),
        ("Short", "int16"),
        ("Char", "int8"),
        ("Byte", "uint8"),
        ("Bool", "bool"),
        ("UInt16", "uint16"),  # these and the float8 types below: only on torch versions that have them
        ("UInt32", "uint32"),
        ("UInt64", "uint64"),
        ("Float8_e4m3fn", "float8_e4m3fn"),
        ("Float8_e5m2", "float8_e5m2"),
        ("Float8_e4m3fnuz", "float8_e4m3fnuz"),
        ("Float8_e5m2fnuz", "float8_e5m2fnuz"),
        ("Float8_e8m0fnu", "float8_e8m0fnu"),
    ]
    if hasattr(torch, dtype)
}


# What a user who trusts an archive can do: read it once where code may run, and keep only its tensors.
TRUSTED = "If you trust the file: torch.save(torch.jit.load(FILE).state_dict(), 'weights.pt'), and pass that"


class _ScriptObject:
    """Stands in for a TorchScript class while unpickling (a subclass per class, named as data.pkl names it):
    keeps the attribute dict, runs nothing. A state that is not a dict is refused: only the class's own
    TorchScript __setstate__, code, could say what it means."""

    state: dict = {}  # an object pickled without a state has no attributes

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise WeightFileError(
                f"data.pkl's {type(self).__name__} keeps its state as a {type(state).__name__}, which only its "
                f"own TorchScript __setstate__ (code, which this reader does not run) can read. {TRUSTED}"
            )
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if math.prod(size) > storage.numel():  # a view that repeats its storage's bytes (zero strides)
        raise WeightFileError(
            f"data.pkl views {math.prod(size):,} elements of a storage of {storage.numel():,}: its bytes repeated "
            "(zero strides), more than the file holds"
        )
    return storage.as_strided(size, stride, offset)  # a view: as_strided refuses one that leaves the storage


# Scripted (not traced) modules also pickle typed lists and dicts through these; each returns its value.
TYPED_CONTAINERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag"}


def _read_member(archive: zipfile.ZipFile, name: str, nbytes: int) -> bytearray:
    """The member's bytes, which must be exactly `nbytes` (what data.pkl says its storage holds), read in
    chunks into one buffer: however large the member claims to be, no more than `nbytes` is read."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise WeightFileError(f"data.pkl refers to {name}, which the archive does not hold") from None
    if info.file_size != nbytes:
        raise WeightFileError(f"{name} holds {info.file_size} bytes, data.pkl says its storage holds {nbytes}")
    raw = bytearray(nbytes)
    with archive.open(info) as member:
        for start in range(0, nbytes, CHUNK):
            chunk = member.read(min(CHUNK, nbytes - start))
            if len(chunk) != min(CHUNK, nbytes - start):
                raise WeightFileError(f"{name} ends early")
            raw[start : start + len(chunk)] = chunk
    return raw


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(archive.open(root + "data.pkl"))
        self.archive, self.root, self.storages = archive, root, {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(f"{module}.{name}", (_ScriptObject,), {})
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if module == "torch.jit._pickle" and name in TYPED_CONTAINERS:
            return lambda value, *type_tag: value
        raise WeightFileError(
            f"data.pkl names {module}.{name}, which is not on this reader's allow-list (tensors of plain numbers "
            f"and their containers): only torch.jit.load, which runs the archive's code, could read it. {TRUSTED}"
        )

    def persistent_load(self, pid):
        # ("storage", type, key, device, numel), the type being a name find_class returned
        kind = pid[1] if isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[1], str) else None
        if kind not in STORAGE_DTYPES or pid[0] != "storage" or not isinstance(pid[2], str) or not is_count(pid[4]):
            raise WeightFileError(f"data.pkl refers to {str(pid)[:80]}, not to a storage of plain numbers")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            dtype = STORAGE_DTYPES[storage_type]
            raw = _read_member(self.archive, f"{self.root}data/{key}", numel * dtype.itemsize)
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return self.storages[key]


def is_torchscript(path: str) -> bool:
    """TorchScript archives carry their code; torch.save zips (ours, open_clip's) do not."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any("code/" in n for n in archive.namelist())
    except zipfile.BadZipFile:
        return False  # read_state_dict says what is wrong with it


def _module_tensors(obj: _ScriptObject, prefix: str, seen: set):
    """(name, tensor) of every tensor attribute of the module tree under obj. Each module is walked once: one
    reached a second time (shared by two parents, or its own ancestor) is refused, since each path to it
    would name its tensors again (2^n names from n levels of two references to one module)."""
    if id(obj) in seen:
        raise WeightFileError(
            f"data.pkl reaches the module {prefix[:-1][:120]} by a second path: not a tree of modules"
        )
    seen.add(id(obj))
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject):
            yield from _module_tensors(value, prefix + name + ".", seen)


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the module tree in a TorchScript archive, named as state_dict() names
    them: parameters and buffers, plus any tensor kept as a plain attribute (a causal attn_mask; the
    scalars input_resolution, context_length, vocab_size of OpenAI's release). Raises WeightFileError, in
    one line, for anything else: an archive that only its own code could read is not weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pickles:
                raise WeightFileError("a zip with code/ but no data.pkl: not a TorchScript archive")
            root = min(pickles, key=len)[: -len("data.pkl")]
            read = (root + "data.pkl", root + "byteorder")  # and the storages, under data/: all this reader reads
            check_zip_members(
                path, [i for i in archive.infolist() if i.filename in read or i.filename.startswith(root + "data/")]
            )
            if root + "byteorder" in archive.namelist() and archive.read(root + "byteorder") != b"little":
                raise WeightFileError("a big-endian archive, which this reader does not support")
            top = _WeightsUnpickler(archive, root).load()
            if not isinstance(top, _ScriptObject):
                raise WeightFileError(f"data.pkl holds a {type(top).__name__}, not a module")
            return dict(_module_tensors(top, "", set()))
    except WeightFileError:
        raise
    except Exception as err:  # a damaged zip, a pickle that is not a module tree, a view outside its storage
        detail = " ".join(str(err).split())[:300]  # one line, whatever torch or zipfile wrote
        raise WeightFileError(
            f"not a TorchScript archive this reader understands ({type(err).__name__}: {detail})"
        ) from None


def read_state_dict(path: str) -> dict:
    """The dict a weights file holds: a TorchScript archive's tensors, a safetensors file's tensors, or
    whatever torch.save wrote (a state dict, open_clip's {"state_dict": ...}, a checkpoint of ours), loaded
    with weights_only=True: a downloaded file may hold tensors and plain data, not code. A torch.save zip's
    members are checked first (check_zip_members): torch.load would inflate a compressed one, or read one
    payload once for every name pointing at it; what it returns, after (check_views)."""
    if is_torchscript(path):
        return read_torchscript_state_dict(path)
    if is_safetensors(path):
        return read_safetensors(path)  # released/safetensors_reader.py
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
        except zipfile.BadZipFile as err:
            raise WeightFileError(f"a damaged zip ({err})") from None
        check_zip_members(path, members)
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_views(state)
    return state
