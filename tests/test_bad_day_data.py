"""Data and benchmark faults (issue 29, items 10, 11, 18 and 20): tar members that claim more than the file holds or
name a sample twice, counts that are not counts, a sample with a million phrases, a MemoryError in one sample, JSON
nested 100,000 deep, benchmark image names outside the image folder, and a 169-megapixel PNG of 164 KB. Every
fixture is made here, in the real formats; nothing large is allocated, even by the code before the fixes: spies
fail a test at the first read or decode that must not happen."""

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

import pytest
from PIL import ImageFile

import eval as evaluate
import train
from data import Collate, WordTokenizer, eval_transform
from fixtures import image_bytes, write_tar
from sources import stream
from sources.shards import shard_captions, shard_sizes
from sources.stream import WebDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep: json's reader recurses once per level


def one_line_exit(fn, needle: str) -> str:
    """fn() must stop with a one-line "error: ..." SystemExit holding `needle`; returns the message."""
    with pytest.raises(SystemExit) as err:
        fn()
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message and needle in message, message
    return message


def shard(folder, samples: list[tuple[str, str, bytes]]) -> str:
    """folder/00000.tar holding (key, extension, bytes) members in this order; returns the shard's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "00000.tar")
    write_tar(path, [(f"{key}.{ext}", data) for key, ext, data in samples])
    return path


def pairs(keys) -> list[tuple[str, str, bytes]]:
    """An image and a caption for each key."""
    return [m for i, k in enumerate(keys) for m in ((k, "jpg", image_bytes(i)), (k, "txt", f"a red car {k}".encode()))]


@pytest.fixture
def reads(monkeypatch):
    """tarfile.TarFile.extractfile, recording the members read; reading a sparse member fails the test at once
    (the code before the fix read its declared 3 GiB of zeros)."""
    real, names = tarfile.TarFile.extractfile, []

    def spy(self, member):
        if member.issparse():
            pytest.fail(f"the sparse member {member.name} was read")
        names.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    return names


# ----------------------------------------------------------------------------- 10. members, names and counts


def make_sparse(path: str, name: str, real_size: int) -> None:
    """Turn the member `name` of an uncompressed tar into an old-GNU sparse member ('S') whose one data region is
    its stored bytes, declaring `real_size` bytes in all: the rest is holes, zeros that tar does not store."""
    with tarfile.open(path) as tar:
        offset, stored = tar.getmember(name).offset, tar.getmember(name).size
    with open(path, "r+b") as f:
        f.seek(offset)
        header = bytearray(f.read(tarfile.BLOCKSIZE))
        header[156:157] = b"S"
        header[257:265] = b"ustar  \0"  # GNU magic
        header[345:512] = bytes(167)  # the GNU fields: no atime, ctime, extension; one sparse region
        header[386:410] = b"%011o\0%011o\0" % (0, stored)
        header[483:495] = b"%011o\0" % real_size
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        f.seek(offset)
        f.write(header)


def test_a_sparse_member_declaring_3_gib_is_skipped_unread(tmp_path, reads):
    path = shard(tmp_path, pairs(["a", "b", "c"]))
    make_sparse(path, "b.jpg", 3 << 30)
    with tarfile.open(path) as tar:
        assert tar.getmember("b.jpg").issparse() and tar.getmember("b.jpg").size == 3 << 30
    ds = WebDataset([path], eval_transform(8), shuffle_buffer=0)
    assert [s["caption"] for s in ds] == ["a red car a", "a red car c"]
    assert ds.skipped == {"sparse_member": 1}
    assert [k for k, _ in shard_captions(path)] == ["a", "c"]


def test_a_member_claiming_bytes_past_the_end_of_the_file_is_not_read(tmp_path, reads):
    path = shard(tmp_path, pairs(["a", "b"]) + [("c", "jpg", bytes(100_000))])
    with tarfile.open(path) as tar:
        os.truncate(path, tar.getmember("c.jpg").offset_data + 10_000)  # its header claims 100,000 bytes
    ds = WebDataset([path], eval_transform(8), shuffle_buffer=0)
    assert [s["caption"] for s in ds] == ["a red car a", "a red car b"] and ds.skipped == {"corrupt_shard": 1}
    assert "c.jpg" not in reads  # refused from its header, before a read of what the file does not hold


def test_a_name_given_twice_is_skipped_and_counted_not_replaced_or_repeated(tmp_path):
    members = pairs(["a", "b"]) + [("b", "jpg", image_bytes(5))] + pairs(["c"]) + pairs(["a"])
    path = shard(tmp_path, members)  # b.jpg twice in a row: which image is b's? then sample a again
    ds = WebDataset([path], eval_transform(8), shuffle_buffer=0)
    assert [s["caption"] for s in ds] == ["a red car a", "a red car c"]
    assert ds.skipped == {"repeated_name": 2}
    assert [k for k, _ in shard_captions(path)] == ["a", "c"]  # the concepts precompute reads these


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e400", "true", "1000000000000000", "-3"])
def test_sizes_json_with_a_value_that_is_no_count_is_passed_over(tmp_path, value):
    path = shard(tmp_path / "shards", pairs(["a", "b", "c"]))
    (tmp_path / "shards" / "sizes.json").write_text('{"00000.tar": %s}' % value)
    assert shard_sizes([path], str(tmp_path)) == [3]  # counted from the tar headers instead


def test_a_sizes_json_nested_100k_deep_is_passed_over(tmp_path):
    path = shard(tmp_path / "shards", pairs(["a", "b"]))
    (tmp_path / "shards" / "sizes.json").write_text(DEEP)
    assert shard_sizes([path], str(tmp_path)) == [2]


# ----------------------------------------------------------------------------- 11. phrases and MemoryError


def test_a_sample_with_a_million_phrases_keeps_its_first_32_and_is_counted(tmp_path):
    phrases = [f"thing {i}" for i in range(1_000_000)]
    meta = json.dumps({"nounphrases": phrases}).encode()
    b = json.dumps({"nounphrases": ["a red car"]}).encode()
    path = shard(tmp_path, pairs(["a"]) + [("a", "json", meta)] + pairs(["b"]) + [("b", "json", b)])
    ds = WebDataset([path], eval_transform(8), concept_key="nounphrases", shuffle_buffer=0)
    samples = list(ds)
    assert [s["phrases"] for s in samples] == [phrases[:32], ["a red car"]]
    assert ds.noted == {"phrases_cut": 1} and ds.skipped == {}
    batch = Collate(WordTokenizer.build(["a red car thing"], context_length=8))(samples)
    assert batch["phrases"].shape[0] == 33 and batch["owner"].tolist() == [0] * 32 + [1]  # (K, Tc)


def test_a_memory_error_reading_a_member_is_a_counted_skip(tmp_path, monkeypatch):
    path = shard(tmp_path, pairs(["a", "b", "c"]))
    real = tarfile.TarFile.extractfile

    class Huge:
        def read(self):
            raise MemoryError

    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda t, m: Huge() if m.name == "b.jpg" else real(t, m))
    ds = WebDataset([path], eval_transform(8), shuffle_buffer=0)
    assert [s["caption"] for s in ds] == ["a red car a", "a red car c"] and ds.skipped == {"out_of_memory": 1}


def test_a_memory_error_decoding_an_image_is_a_counted_skip(tmp_path, monkeypatch):
    path = shard(tmp_path, pairs(["a", "b", "c"]))
    real = stream.load_image

    def load_image(source):
        if source == image_bytes(1):  # b's
            raise MemoryError
        return real(source)

    monkeypatch.setattr(stream, "load_image", load_image)
    ds = WebDataset([path], eval_transform(8), shuffle_buffer=0)
    assert [s["caption"] for s in ds] == ["a red car a", "a red car c"] and ds.skipped == {"out_of_memory": 1}


# ----------------------------------------------------------------------------- 18. benchmark files


def bench_fails(bench, argv, needle: str) -> str:
    return one_line_exit(lambda: evaluate.main(["--ckpt", bench["ckpt"], *argv, "--workers", "0"]), needle)


def test_benchmark_json_nested_100k_deep_stops_with_one_line(bench):
    swap = os.path.join(bench["sc"], "swap_att.json")
    open(swap, "w").write(DEEP)
    bench_fails(bench, ["--bench", "sugarcrepe", "--data-dir", bench["sc"]], f"{swap} nests its values too deep")
    open(bench["ann"], "w").write(DEEP)
    coco = os.path.dirname(bench["ann"])
    argv = ["--bench", "retrieval", "--data-dir", coco, "--ann", bench["ann"]]
    bench_fails(bench, argv, f"{bench['ann']} nests its values too deep")


def test_a_concepts_file_nested_100k_deep_is_refused_naming_the_flag_and_line(tmp_path, capsys):
    folder = os.path.dirname(shard(tmp_path / "shards", pairs(["a"])))
    concepts = tmp_path / "concepts.jsonl"
    concepts.write_text('{"shard": "00000.tar", "concepts": %s}\n' % DEEP)
    with pytest.raises(SystemExit) as err:
        train.get_args(["--data", "cc3m", "--data-dir", folder, "--concepts", str(concepts)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and f"error: --concepts: {concepts}, line 1: not a record" in last, last


def outside(tmp_path, folder: str, kind: str) -> str:
    """The name of a real picture outside `folder`: its absolute path, or a path climbing out with '..'."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes(3))
    return str(secret) if kind == "absolute" else os.path.relpath(secret, folder)


def name_first_image(path: str, name: str) -> None:
    """SugarCrepe's file `path` with its record '1' naming the image `name`."""
    records = json.load(open(path))
    records["1"]["filename"] = name
    json.dump(records, open(path, "w"))


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_a_benchmark_image_outside_its_folder_is_refused_not_scored(bench, tmp_path, kind):
    val2017, path = os.path.join(bench["sc"], "val2017"), os.path.join(bench["sc"], "add_att.json")
    name = outside(tmp_path, val2017, kind)
    assert os.path.isfile(os.path.join(val2017, name))  # what the code before the fix scored
    name_first_image(path, name)
    bench_fails(bench, ["--bench", "sugarcrepe", "--data-dir", bench["sc"]], f"record '1' of {path} names the image")
    coco = os.path.dirname(bench["ann"])
    records = json.load(open(bench["ann"]))
    records[2]["image"] = outside(tmp_path, coco, kind)
    json.dump(records, open(bench["ann"], "w"))
    argv = ["--bench", "retrieval", "--data-dir", coco, "--ann", bench["ann"]]
    bench_fails(bench, argv, f"record 2 of {bench['ann']} names the image")


# ----------------------------------------------------------------------------- 20. a 169-megapixel PNG


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A whole, valid 13,000 x 13,000 grey PNG (169 million black pixels) of 164 KB: under twice PIL's
    Image.MAX_IMAGE_PIXELS, so PIL only warns; decoded to RGB it is 507 MB."""
    side, row, deflate = 13_000, bytes(13_001), zlib.compressobj(9)  # each row: filter byte 0, then the pixels
    idat = b"".join([deflate.compress(row * 1000) for _ in range(side // 1000)] + [deflate.flush()])
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture
def no_big_decode(monkeypatch):
    """Decoding an image of over 100 million pixels fails the test at once, before it costs memory."""
    real = ImageFile.ImageFile.load

    def load(self):
        if self.size[0] * self.size[1] > 100_000_000:
            pytest.fail(f"an image of {self.size[0]} x {self.size[1]} pixels was decoded")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_169_megapixel_png_is_skipped_in_training_before_decoding(tmp_path, bomb, no_big_decode):
    from PIL import Image

    with pytest.warns(Image.DecompressionBombWarning), Image.open(io.BytesIO(bomb)) as img:
        assert img.size == (13_000, 13_000) and len(bomb) < 200_000  # PIL opens it: it passes PIL's own check
    members = pairs(["a"]) + [("b", "png", bomb), ("b", "txt", b"a black square")] + pairs(["c"])
    ds = WebDataset([shard(tmp_path, members)], eval_transform(8), shuffle_buffer=0)
    assert [s["caption"] for s in ds] == ["a red car a", "a red car c"] and ds.skipped == {"too_many_pixels": 1}


def test_a_169_megapixel_png_stops_eval_with_one_line_before_decoding(bench, tmp_path, bomb, no_big_decode):
    image = os.path.join(bench["sc"], "val2017", "000000000285.jpg")  # a benchmark image, a PNG inside
    open(image, "wb").write(bomb)
    sc = ["--bench", "sugarcrepe", "--data-dir", bench["sc"]]
    bench_fails(bench, sc, f"sugarcrepe images: {image}: 13000 x 13000 pixels, over the 33,554,432 read here")
    show = ["--show", image, "--concepts", "a dog", "--out", str(tmp_path / "a.png")]
    one_line_exit(lambda: evaluate.main(["--ckpt", bench["ckpt"], *show]), f"--show {image}: 13000 x 13000 pixels")


# ----------------------------------------------------------------------------- the scripts themselves


def script(*argv: str) -> tuple[int, str]:
    """Run a script of the repository as a user would: (exit code, stderr)."""
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr


def test_the_scripts_end_with_one_line_and_a_nonzero_exit(bench, tmp_path):
    """eval.py --bench and train.py --data cc3m --concepts, run as processes: the last line of stderr is the
    error, and nothing else is printed (no traceback, no warning)."""
    val2017, path = os.path.join(bench["sc"], "val2017"), os.path.join(bench["sc"], "add_att.json")
    name = outside(tmp_path, val2017, "dotdot")
    name_first_image(path, name)
    code, err = script(
        "eval.py", "--ckpt", bench["ckpt"], "--bench", "sugarcrepe", "--data-dir", bench["sc"], "--workers", "0"
    )
    expected = (
        f"error: --bench sugarcrepe: record '1' of {path} names the image {name!r}, which is not inside {val2017}"
    )
    assert code == 1 and err.splitlines() == [expected], err
    folder = os.path.dirname(shard(tmp_path / "shards", pairs(["a"])))
    concepts = tmp_path / "concepts.jsonl"
    concepts.write_text('{"shard": "00000.tar", "concepts": %s}\n' % DEEP)
    code, err = script("train.py", "--data", "cc3m", "--data-dir", folder, "--concepts", str(concepts))
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"train.py: error: --concepts: {concepts}, line 1: not a record"), err
