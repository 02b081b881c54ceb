"""Weight files that cannot run code or cost more memory than they hold (weight_files.py): a crafted TorchScript
archive is refused in one line and never reaches torch.jit.load; storages of plain numbers (complex, float8,
unsigned) are read as torch reads them; zip members that are compressed, oversized or overlapping are refused
before anything is read (ours or torch.load's); safetensors headers are checked as the safetensors library checks
them; and eval.py / train.py show the reader's own line. Every file is made here, in the real formats."""

import copy
import json
import struct
import zipfile
from typing import Tuple

import pytest
import torch

import eval as evaluate
import train
from released.files import STORAGE_DTYPES, read_state_dict, read_torchscript_state_dict
from released.safetensors_reader import MAX_HEADER, read_safetensors


def never(what: str):
    return lambda *args, **kwargs: pytest.fail(f"{what} must never be reached")


def one_line_exit(fn) -> str:
    """fn() must stop with a one-line SystemExit message (eval.py's and train.py's "error: ..."); returns it."""
    with pytest.raises(SystemExit) as err:
        fn()
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def rewrite_zip(src, dst, replace=None, deflate=(), aliases=None):
    """A copy of the zip at src with members (named by the end of their name) given other bytes (`replace`),
    deflated (`deflate`), or dropped for a directory entry pointing at another member's bytes (`aliases`,
    name -> the member whose bytes it takes)."""
    replace, aliases = replace or {}, aliases or {}
    ends = lambda name, suffixes: next((s for s in suffixes if name.endswith(s)), None)
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            if ends(info.filename, aliases):
                continue
            data = replace[ends(info.filename, replace)] if ends(info.filename, replace) else a.read(info)
            kind = zipfile.ZIP_DEFLATED if ends(info.filename, deflate) else zipfile.ZIP_STORED
            b.writestr(info.filename, data, compress_type=kind)
        root = a.namelist()[0].split("/")[0]
        for alias, target in aliases.items():
            entry = copy.copy(b.getinfo(f"{root}/{target}"))
            entry.filename = entry.orig_filename = f"{root}/{alias}"
            b.filelist.append(entry)  # written into the directory on close, pointing at target's bytes


def count_member_reads(monkeypatch) -> dict:
    """Bytes read out of each zip member, by member name, from here on."""
    counts, real = {}, zipfile.ZipExtFile.read

    def read(self, n=-1):
        data = real(self, n)
        counts[self.name] = counts.get(self.name, 0) + len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return counts


# ----------------------------------------------------------------------------- TorchScript archives


class WritesAFile(torch.nn.Module):
    """A module whose TorchScript __setstate__ creates (or overwrites) the file it names, with "AAAA": what
    torch.jit.load runs for whoever loads the archive. The complex64 buffer used to leave the allow-list."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.register_buffer("z", torch.zeros(2, dtype=torch.complex64))

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.z, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.target = state[1]
        self.training = state[2]
        written = torch.from_file(self.target, True, 4, dtype=torch.uint8)
        written.fill_(65)
        self.z = state[0] + written[:2].to(torch.complex64)


class PlainNumbers(torch.nn.Module):
    """A buffer of every storage type on the allow-list: complex, float8 and unsigned ones among them."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for dtype in set(STORAGE_DTYPES.values()):
            if dtype.is_complex:
                values = torch.randn(5, generator=g, dtype=dtype)
            else:  # eighths: exact in every float type (float8_e8m0fnu, powers of two only, rounds them)
                values = torch.randint(0, 2 if dtype == torch.bool else 100, (5,), generator=g)
                values = values / 8 if dtype.is_floating_point else values
            self.register_buffer("as_" + str(dtype).removeprefix("torch."), values.to(dtype))

    def forward(self, x):
        return x


def test_a_crafted_archive_never_runs_its_code(tmp_path, monkeypatch):
    target, path = tmp_path / "written-by-the-archive", str(tmp_path / "ViT-B-16.pt")
    torch.jit.script(WritesAFile(str(target))).save(path)
    torch.jit.load(path)  # the threat is real: loading it with torch writes the file
    assert target.read_bytes() == b"AAAA"
    target.unlink()
    monkeypatch.setattr(torch.jit, "load", never("torch.jit.load"))
    message = one_line_exit(lambda: evaluate.main(["--ckpt", path, "--n", "5"]))
    assert "WritesAFile keeps its state as a tuple" in message and "__setstate__" in message
    message = one_line_exit(lambda: train.main(["--init", path, "--out", str(tmp_path / "run"), "--steps", "1"]))
    assert message.startswith(f"error: --init {path}: ") and "__setstate__" in message
    assert not target.exists()


def test_storages_of_plain_numbers_are_read_as_torch_reads_them(tmp_path, monkeypatch):
    path = str(tmp_path / "numbers.pt")
    torch.jit.script(PlainNumbers()).save(path)
    expect = torch.jit.load(path).state_dict()
    assert {torch.complex64, torch.complex128} <= {t.dtype for t in expect.values()}
    monkeypatch.setattr(torch.jit, "load", never("torch.jit.load"))
    got = read_torchscript_state_dict(path)
    assert set(got) == set(expect)
    for name, t in expect.items():  # compared as bytes: torch.equal has no float8 kernels
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def test_archive_storages_are_read_no_larger_than_they_say(tmp_path, monkeypatch):
    class Buffers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.zeros(1 << 18))  # 1 MiB of zeros: a deflated copy is 1 KB
            self.register_buffer("b", torch.ones(1 << 18))

        def forward(self, x):
            return x

    path = str(tmp_path / "ok.pt")
    torch.jit.script(Buffers()).save(path)
    counts = count_member_reads(monkeypatch)
    got = read_torchscript_state_dict(path)
    assert got["b"].sum() == 1 << 18 and sum(n for k, n in counts.items() if "/data/" in k) == 2 * 4 << 18
    for change, needle in [
        (dict(deflate=["data/0"]), "data/0 is compressed"),
        (dict(replace={"data/0": bytes(4 << 20)}), "data/0 holds 4194304 bytes, data.pkl says its storage holds"),
        (dict(replace={"data/0": bytes(4)}), "data/0 holds 4 bytes"),
        (dict(aliases={"data/1": "data/0"}), "share bytes: one payload under two names"),
    ]:
        crafted = str(tmp_path / "crafted.pt")
        rewrite_zip(path, crafted, **change)
        counts.clear()
        with pytest.raises(ValueError, match=needle):
            read_state_dict(crafted)
        assert sum(n for k, n in counts.items() if "/data/" in k) == 0, counts  # refused before reading a storage


def test_torch_save_zips_are_checked_before_torch_load(tmp_path, monkeypatch):
    """torch.load would inflate a deflated member whatever it claims (1 MB of deflated zeros: 1 GiB), and read
    one payload once per directory entry pointing at it."""
    path = str(tmp_path / "state.pt")
    torch.save({"a": torch.zeros(1 << 18), "b": torch.ones(1 << 18)}, path)
    assert read_state_dict(path)["b"].sum() == 1 << 18
    for change, needle in [
        (dict(deflate=["data/0"]), "data/0 is compressed"),
        (dict(aliases={"data/1": "data/0"}), "share bytes"),
    ]:
        crafted = str(tmp_path / "crafted.pt")
        rewrite_zip(path, crafted, **change)
        with monkeypatch.context() as m:
            m.setattr(torch, "load", never("torch.load"))
            with pytest.raises(ValueError, match=needle):
                read_state_dict(crafted)
        message = one_line_exit(lambda c=crafted: evaluate.main(["--ckpt", c, "--n", "5"]))
        assert needle in message


# ----------------------------------------------------------------------------- safetensors


def write_safetensors(path, header, data: bytes = b"", text: str | None = None) -> str:
    raw = (text or json.dumps(header)).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def f32(begin: int, end: int, shape=None) -> dict:
    return {"dtype": "F32", "shape": shape if shape is not None else [(end - begin) // 4], "data_offsets": [begin, end]}


BAD_HEADERS = [  # (header, data bytes, what the refusal says)
    ({f"t{i}": f32(0, 1 << 20) for i in range(3)}, 1 << 20, "t1 starts at byte 0 of the data, not 1048576"),
    ({"a": f32(0, 8), "b": f32(4, 12)}, 12, "b starts at byte 4 of the data, not 8"),  # overlapping
    ({"a": f32(0, 4), "b": f32(8, 12)}, 12, "b starts at byte 8 of the data, not 4"),  # a gap
    ({"a": f32(0, 4)}, 8, "the tensors cover 4 bytes, the file holds 8"),  # bytes no tensor owns
    ({"a": f32(8, 4, [1])}, 8, "a spans bytes 8 to 4"),  # an end before its begin
    ({"a": f32(-4, 4, [2])}, 8, "a has data_offsets [-4, 4]"),
    ({"a": {**f32(0, 4), "data_offsets": [0, 4, 8]}}, 4, "not two non-negative integers"),
    ({"a": f32(0, 4, [-1, -1])}, 4, "a has shape [-1, -1]"),
    ({"a": f32(0, 4, [True])}, 4, "a has shape [true]"),
    ({"__metadata__": {"format": 1}, "a": f32(0, 4)}, 4, "__metadata__ must map strings to strings"),
    ('{"a": %s, "a": %s}' % (json.dumps(f32(0, 4)), json.dumps(f32(0, 4))), 4, "the header names 'a' twice"),
]


@pytest.mark.parametrize("header,size,needle", BAD_HEADERS)
def test_safetensors_headers_are_checked_as_the_library_checks_them(tmp_path, header, size, needle):
    text = header if isinstance(header, str) else None
    path = write_safetensors(tmp_path / "bad.safetensors", header, bytes(size), text)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        read_safetensors(path)
    load_file = pytest.importorskip("safetensors.torch").load_file
    if "twice" not in needle:  # the library keeps the last of two equal names; we refuse them
        with pytest.raises(pytest.importorskip("safetensors").SafetensorError):
            load_file(path)


def test_safetensors_order_of_the_header_does_not_matter(tmp_path):
    """Tensors are contiguous in the order of their offsets, whatever order the header lists them in."""
    data = struct.pack("<3f", 1.0, 2.0, 3.0)
    path = write_safetensors(
        tmp_path / "ok.safetensors", {"b": f32(4, 12), "e": f32(0, 0, [0, 3]), "a": f32(0, 4)}, data
    )
    got = read_safetensors(path)
    assert got["a"].tolist() == [1.0] and got["b"].tolist() == [2.0, 3.0] and got["e"].shape == (0, 3)


def test_safetensors_header_length_is_bounded(tmp_path):
    """A header of more than 100,000,000 bytes is refused before any of it is read (a sparse file: nothing is
    written to disk)."""
    path = tmp_path / "huge-header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER + 1) + b"{")
        f.truncate(8 + MAX_HEADER + 1 + 8)
    with pytest.raises(ValueError, match="a header of 100,000,001 bytes"):
        read_safetensors(str(path))


def test_the_cli_shows_the_readers_own_line(tmp_path):
    path = write_safetensors(
        tmp_path / "f8.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2)
    )
    message = one_line_exit(lambda: evaluate.main(["--ckpt", path, "--n", "5"]))
    assert message == f"error: {path}: w has dtype F8_E4M3, which this reader does not know"
    garbage = tmp_path / "garbage.pt"  # what torch.load refuses keeps the generic line
    garbage.write_bytes(b"not a checkpoint at all")
    message = one_line_exit(lambda: evaluate.main(["--ckpt", str(garbage), "--n", "5"]))
    assert "not a weights file torch can read safely (UnpicklingError)" in message
