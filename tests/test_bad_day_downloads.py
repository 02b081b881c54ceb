"""Downloads on a bad day (transfer.py, download.py), against test_download.py's local server with crafted
answers: 206s that name no version, answer a plain request or disagree about their size; endless bodies;
a server that stalls or trickles; an encoded body; HTML pages that open with a comment; redirects to
another origin, in a loop, or to ftp; a disk that fills up. Every body a test serves is bounded in bytes
and time, and every server listens on 127.0.0.1 only."""

import builtins
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import os
import threading
import urllib.request

import pytest

import test_download
from released import download, transfer
from released.download import DownloadError, Remote
from test_download import closed_port_url, payload, serve, validator

BIG = 300_000  # the size of payload()


class Crafted(test_download.Handler):
    """test_download's handler, but a GET of a path in server.crafted takes the next of its answers instead:
    (status, headers, body), the body bytes or an iterable of blocks (written until the client goes)."""

    def do_GET(self):
        server = self.server
        server.asked.append(dict(self.headers))
        answers = server.crafted.get(self.path)
        if not answers:
            return super().do_GET()
        server.log.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        status, headers, body = answers.pop(0)
        if headers.get("Transfer-Encoding") == "chunked":
            self.protocol_version = "HTTP/1.1"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client hung up: what it refused to read stays unsent
            for block in [body] if isinstance(body, bytes) else body:
                self.wfile.write(block)
                server.sent[self.path] = server.sent.get(self.path, 0) + len(block)


def running():
    """test_download's server with Crafted as its handler, and what Crafted reads."""
    return test_download.running(Crafted, crafted={}, asked=[], sent={}, release=threading.Event())


@pytest.fixture
def server():
    with running() as httpd:
        yield httpd


@pytest.fixture
def other():
    """A second server: another origin (another port) on the same loopback address."""
    with running() as httpd:
        yield httpd


def endless(block: bytes = b"\0" * (64 << 10), most: int = 64 << 20):
    """A body that goes on: `block` again and again, bounded at `most` bytes so that no test can run away."""
    for _ in range(most // len(block)):
        yield block


def chunked(blocks):
    """Blocks in HTTP/1.1's chunked coding (the handler speaks HTTP/1.0; the client reads the header)."""
    for block in blocks:
        yield f"{len(block):x}\r\n".encode() + block + b"\r\n"


def registry_at(server, monkeypatch, name: str, url_path: str) -> Remote:
    """The registry entry `name` as it is (digest, path, size or cap), its URL pointed at the local server."""
    remote = dataclasses.replace(download.FILES[name], url=server.url + url_path)
    monkeypatch.setitem(download.FILES, name, remote)
    return remote


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- 206: versions and sizes


def test_a_206_that_names_no_version_is_not_appended(server, monkeypatch, tmp_path):
    old = serve(server, monkeypatch, "test/big.bin", payload(), pinned=False)
    server.cut["/big.bin"] = 100_000
    with pytest.raises(DownloadError, match="run again to resume"):
        download.fetch("test/big.bin", str(tmp_path))
    new = payload(BIG + 1)[:BIG]  # the file changed; the server's 206 names no ETag, so nothing vouches for it
    server.files["/big.bin"] = new
    headers = {"Content-Range": f"bytes 100000-{BIG - 1}/{BIG}", "Content-Length": str(BIG - 100_000)}
    server.crafted["/big.bin"] = [(206, headers, new[100_000:])]
    path = download.fetch("test/big.bin", str(tmp_path))
    assert open(path, "rb").read() == new != old[:100_000] + new[100_000:]  # not spliced: asked again from zero
    assert open(path + ".sha256").read().split()[0] == sha(new)
    assert [entry[1] for entry in server.log] == [None, "bytes=100000-", None]


def test_a_206_to_a_request_for_the_whole_file_is_taken_only_if_it_is_the_whole_file(server, monkeypatch, tmp_path):
    body = serve(server, monkeypatch, "test/tofu.bin", payload(), pinned=False)
    first = {"Content-Range": f"bytes 0-99999/{BIG}", "Content-Length": "100000", "ETag": '"v1"'}
    server.crafted["/tofu.bin"] = [(206, first, body[:100_000])]
    with pytest.raises(DownloadError, match="answered 206 \\(a part of the file\\) to a request for all of it") as err:
        download.fetch("test/tofu.bin", str(tmp_path))
    assert "by hand" in one_line(err) and sorted(os.listdir(tmp_path / "test")) == ["tofu.bin.lock"]
    whole = {"Content-Range": f"bytes 0-{BIG - 1}/{BIG}", "Content-Length": str(BIG), "ETag": '"v1"'}
    server.crafted["/tofu.bin"] = [(206, whole, body)]
    assert open(download.fetch("test/tofu.bin", str(tmp_path)), "rb").read() == body


@pytest.mark.parametrize("length", ["shorter", "longer"])
def test_a_206s_sizes_are_its_content_ranges_not_its_content_length(server, monkeypatch, tmp_path, length):
    """Content-Length 100000 on "bytes 100000-299999/300000" (the file is 300000 bytes, not 200000), or 200000
    on "bytes 100000-199999/300000" (what follows the range is not the file)."""
    body = serve(server, monkeypatch, "test/big.bin", payload(), pinned=False)
    server.cut["/big.bin"] = 100_000
    with pytest.raises(DownloadError, match="run again to resume"):
        download.fetch("test/big.bin", str(tmp_path))
    version = {"ETag": validator(server, body)}
    if length == "shorter":
        headers = {"Content-Range": f"bytes 100000-{BIG - 1}/{BIG}", "Content-Length": "100000", **version}
        sent = body[100_000:200_000]
    else:
        headers = {"Content-Range": f"bytes 100000-199999/{BIG}", "Content-Length": "200000", **version}
        sent = body[100_000:200_000] + b"junk" * 25_000
    server.crafted["/big.bin"] = [(206, headers, sent)]
    path = str(tmp_path / "test" / "big.bin")
    with pytest.raises(DownloadError, match=f"closed after 200000 of {BIG} bytes; run again to resume"):
        download.fetch("test/big.bin", str(tmp_path))
    assert open(path + ".part", "rb").read() == body[:200_000]
    assert open(download.fetch("test/big.bin", str(tmp_path)), "rb").read() == body
    assert server.log[-1][1] == "bytes=200000-"


# ----------------------------------------------------------------------------- bytes and time


def test_a_body_longer_than_the_file_stops_at_its_size_or_its_cap(server, monkeypatch, tmp_path):
    # a pinned file of known size (SugarCrepe's add_att.json, 158,863 bytes), and a body with no length that
    # does not end: stopped one byte past the size, refused and deleted, not streamed to its end
    name = "sugarcrepe/add_att.json"
    remote = registry_at(server, monkeypatch, name, "/add_att.json")
    server.crafted["/add_att.json"] = [(200, {"ETag": '"v1"'}, endless())]
    with pytest.raises(DownloadError, match="sent more than 158863 bytes") as err:
        download.fetch(name, str(tmp_path))
    assert remote.most == 158_863 and "refused and deleted" in one_line(err)
    assert sorted(os.listdir(tmp_path / "sugarcrepe")) == ["add_att.json.lock"]
    # an unpinned file of unstated size (T5's vocabulary, a cap of 16 MiB), chunked and endless
    name = "t5/cc_en.32000"
    registry_at(server, monkeypatch, name, "/sentencepiece.model")
    headers = {"Transfer-Encoding": "chunked", "ETag": '"v1"'}
    server.crafted["/sentencepiece.model"] = [(200, headers, chunked(endless(most=24 << 20)))]
    with pytest.raises(DownloadError, match=f"sent more than {16 << 20} bytes"):
        download.fetch(name, str(tmp_path))
    assert download.FILES[name].most == 16 << 20 and not os.path.exists(
        download.cache_path(name, str(tmp_path)) + ".part"
    )
    # a length above the size: refused before the body is read
    server.crafted["/add_att.json"] = [(200, {"Content-Length": str(10**10), "ETag": '"v1"'}, endless(most=1 << 20))]
    with pytest.raises(DownloadError, match="gives the file 10000000000 bytes, more than the 158863") as err:
        download.fetch("sugarcrepe/add_att.json", str(tmp_path))
    assert sorted(os.listdir(tmp_path / "sugarcrepe")) == ["add_att.json.lock"]
    # the registry: every entry states its size or a cap of its own
    assert all(0 < remote.most < download.MOST for remote in download.FILES.values())
    for bench, files in [("sugarcrepe", download.SUGARCREPE_FILES), ("sugarcrepe++", download.SCPP_FILES)]:
        assert all(download.FILES[f"{bench}/{n}.json"].most == size for n, (_, size) in files.items())


def trickle(server, body: bytes):
    """One byte every 50 ms, 160 at most (8 s), then the connection closes."""
    for i in range(160):
        if server.release.wait(0.05):
            return
        yield body[i : i + 1]


def silence(server, body: bytes):
    """100 bytes, then nothing for 8 s (or until the test ends), then the connection closes."""
    yield body[:100]
    server.release.wait(8)


@pytest.mark.parametrize("stall", [silence, trickle])
def test_a_stalled_server_ends_the_transfer_and_the_part_resumes(server, monkeypatch, tmp_path, stall):
    monkeypatch.setattr(transfer, "STALL", 0.5, raising=False)  # 60 s in use; the rule is the same
    body = serve(server, monkeypatch, "test/slow.bin", payload(1000), pinned=False)
    headers = {"Content-Length": "1000", "ETag": validator(server, body)}
    server.crafted["/slow.bin"] = [(200, headers, stall(server, body))]
    path = str(tmp_path / "test" / "slow.bin")
    with pytest.raises(DownloadError, match="stalled after \\d+ bytes \\(less than 64 KiB in 0.5 s\\)") as err:
        download.fetch("test/slow.bin", str(tmp_path))
    kept = os.path.getsize(path + ".part")
    assert f"run again to resume from {path}.part" in one_line(err) and f"after {kept} bytes" in str(err.value)
    assert open(download.fetch("test/slow.bin", str(tmp_path)), "rb").read() == body
    assert server.log[-1][1] == f"bytes={kept}-"


# ----------------------------------------------------------------------------- what the bytes are


def test_an_encoded_body_is_refused_not_stored_as_the_file(server, monkeypatch, tmp_path):
    name = "coco/coco_karpathy_test.json"
    split = b'[{"image": "val2014/a.jpg", "caption": ["a cat"]}]' * 100
    serve(server, monkeypatch, name, split, pinned=False)
    encoded = gzip.compress(split)
    headers = {"Content-Encoding": "gzip", "Content-Length": str(len(encoded)), "Content-Type": "application/json"}
    server.crafted["/coco_karpathy_test.json"] = [(200, headers, encoded)]
    with pytest.raises(DownloadError, match="Content-Encoding gzip though identity was asked") as err:
        download.fetch(name, str(tmp_path))
    assert "by hand" in one_line(err) and server.asked[-1].get("Accept-Encoding") == "identity"
    assert sorted(os.listdir(tmp_path / "coco")) == ["coco_karpathy_test.json.lock"]  # nothing kept or trusted
    # a .gz file labelled gzip (Apache's AddEncoding for .gz): those bytes are the file
    name = "openai/bpe_simple_vocab_16e6"
    vocab = serve(server, monkeypatch, name, gzip.compress(b"#version: 0.2\nl o\n"), url_path="/bpe.txt.gz")
    headers = {"Content-Encoding": "gzip", "Content-Length": str(len(vocab))}
    server.crafted["/bpe.txt.gz"] = [(200, headers, vocab)]
    assert open(download.fetch(name, str(tmp_path)), "rb").read() == vocab


PAGES = {
    "comment": (
        "application/json",
        b"<!-- served by the proxy -->\n<!DOCTYPE html>\n<html><body>Sign in</body></html>",
    ),
    "xml": ("application/json", b'<?xml version="1.0"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0//EN">\n<html/>'),
    "head": ("application/octet-stream", b"\r\n<head><title>Quota exceeded</title></head><body></body>"),
    "xhtml": ("application/xhtml+xml", b'{"not": "a page by its bytes"}'),
}


@pytest.mark.parametrize("page", PAGES)
def test_an_html_page_is_told_past_comments_and_declarations(server, monkeypatch, tmp_path, page):
    server.content_type, body = PAGES[page]
    serve(server, monkeypatch, "coco/coco_karpathy_test.json", body, pinned=False)
    with pytest.raises(DownloadError, match="HTML page") as err:
        download.fetch("coco/coco_karpathy_test.json", str(tmp_path))
    assert "by hand" in one_line(err)
    assert sorted(os.listdir(tmp_path / "coco")) == ["coco_karpathy_test.json.lock"]
    assert not transfer.looks_like_html(b"<!-- a comment never closed " + b"x" * 100)


# ----------------------------------------------------------------------------- redirects


def test_a_redirect_to_another_origin_is_said_and_its_body_is_not_read(server, other, monkeypatch, tmp_path, capsys):
    body = serve(server, monkeypatch, "test/moved.bin", payload(), pinned=False)
    other.files["/moved.bin"] = body
    server.crafted["/moved.bin"] = [(302, {"Location": other.url + "/moved.bin"}, endless())]
    assert open(download.fetch("test/moved.bin", str(tmp_path)), "rb").read() == body
    note = f"note: {server.url}/moved.bin redirects to another origin, {other.url}"
    assert note in capsys.readouterr().err.splitlines()
    assert server.sent.get("/moved.bin", 0) < 32 << 20  # the redirect's 64 MiB body was not read to its end
    serve(server, monkeypatch, "test/here.bin", body, pinned=False)  # a redirect on the same origin: nothing said
    server.crafted["/there.bin"] = [(301, {"Location": "/here.bin"}, b"")]
    monkeypatch.setitem(download.FILES, "test/there.bin", Remote(server.url + "/there.bin", None, "test"))
    download.fetch("test/there.bin", str(tmp_path))
    assert "note:" not in capsys.readouterr().err


def test_a_redirect_loop_or_to_another_scheme_is_one_line(server, monkeypatch, tmp_path):
    monkeypatch.setitem(download.FILES, "test/loop.bin", Remote(server.url + "/loop.bin", None, "test"))
    server.crafted["/loop.bin"] = [(302, {"Location": "/loop.bin"}, b"moved")] * 50
    with pytest.raises(DownloadError, match="more than 5 redirects \\(a loop\\?\\)") as err:
        download.fetch("test/loop.bin", str(tmp_path))
    assert "by hand" in one_line(err) and len(server.log) == 6
    ftp = closed_port_url().replace("http://", "ftp://")
    monkeypatch.setitem(download.FILES, "test/ftp.bin", Remote(server.url + "/ftp.bin", None, "test"))
    server.crafted["/ftp.bin"] = [(302, {"Location": ftp}, b"")]
    with pytest.raises(DownloadError, match=f"redirects to {ftp}: refused \\(http or https only") as err:
        download.fetch("test/ftp.bin", str(tmp_path))
    one_line(err)
    redirects = transfer.Redirects("https://example.org/f.bin", "by hand")  # refused before any request
    with pytest.raises(DownloadError, match="never from https to http"):
        redirects.redirect_request(
            urllib.request.Request("https://example.org/f.bin"), io.BytesIO(), 302, "Found", {}, "http://example.org/f"
        )


# ----------------------------------------------------------------------------- a full disk


class FullDisk:
    """A file on a disk with `room` bytes free: a write fills what is left and says how much, the next raises."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), self.room)
        self.room -= self.file.write(bytes(data[:n]))
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_says_so_and_the_part_resumes_once_there_is_room(server, monkeypatch, tmp_path):
    body = serve(server, monkeypatch, "test/big.bin", payload(), pinned=False)
    path = str(tmp_path / "test" / "big.bin")
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if os.fspath(file) == path + ".part" and "a" in mode:
            return FullDisk(real_open(file, mode, *args, **kwargs), room=100_000)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(DownloadError, match="is full") as err:
        download.fetch("test/big.bin", str(tmp_path))
    message = one_line(err)
    assert f"the disk holding {tmp_path / 'test'} is full" in message
    assert f"{path}.part keeps the 100000 bytes written; free some space, then run again to resume" in message
    monkeypatch.setattr(builtins, "open", real_open)  # room again
    assert open(download.fetch("test/big.bin", str(tmp_path)), "rb").read() == body
    assert server.log[-1][1] == "bytes=100000-"
    # full when the digest is recorded, after the last byte: one line, not a traceback
    serve(server, monkeypatch, "test/last.bin", payload(1000), pinned=False)
    record = str(tmp_path / "test" / "last.bin.sha256")

    def no_room_for_the_record(file, mode="r", *args, **kwargs):
        if os.fspath(file).startswith(record) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_room_for_the_record)
    with pytest.raises(DownloadError, match="could not be recorded \\(No space left on device\\): free some space"):
        download.fetch("test/last.bin", str(tmp_path))
