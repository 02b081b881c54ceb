"""download.py against a local HTTP server that the tests start on the loopback address (no internet): a fetch
with its bar, a cache hit that makes no request, a digest mismatch refused, an interrupted transfer resumed
with Range and If-Range, the offline message, zip extraction; then a named weights file through
run/checkpoint.load_model and eval.py --download on SugarCrepe's and SugarCrepe++'s formats. The server misbehaves
on purpose in test_download_trust.py."""

import contextlib
import email.utils
import hashlib
import http.server
import io
import os
import socket
import threading
import zipfile

import pytest
import torch
import torchvision

import eval as evaluate
import train
from fixtures import (
    SUGARCREPE_FILES,
    SUGARCREPE_PP_FILES,
    write_checkpoint,
    write_karpathy,
    write_sugarcrepe,
    write_sugarcrepe_pp,
)
from released import download
from released import weights as releases
from released.download import DownloadError, Remote
from run.checkpoint import load_model

CPU = torch.device("cpu")
FAST = ["--workers", "0", "--batch-size", "4"]


class Handler(http.server.BaseHTTPRequestHandler):
    """GET of server.files[path]. Each version of a file has a validator: a strong ETag (server.validator
    "etag", the default), a Last-Modified date ("last-modified"), or none (None). "Range: bytes=N-" is honoured
    when server.ranges, unless If-Range names another version (then the whole file, 200) or server.if_range
    is False (a server that ignores If-Range). The body's end is told by server.length: "content-length"
    (the default), "chunked", or None (the connection closes). server.content_type is sent as it is. The body
    of a path in server.cut is cut after that many bytes of the file, once (the connection closes mid-body)."""

    timeout = 10  # a stuck client cannot hold a handler thread for longer

    def do_GET(self):
        server = self.server
        server.log.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        version = validator(server, body)
        start, header, if_range = 0, self.headers.get("Range"), self.headers.get("If-Range")
        if header and server.ranges and (if_range in (None, version) or not server.if_range):
            start = int(header.removeprefix("bytes=").split("-")[0])
        if server.length == "chunked":
            self.protocol_version = "HTTP/1.1"  # chunked transfer coding is HTTP/1.1's
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if version:
            self.send_header("ETag" if server.validator == "etag" else "Last-Modified", version)
        if server.content_type:
            self.send_header("Content-Type", server.content_type)
        if server.length == "content-length":
            self.send_header("Content-Length", str(len(body) - start))
        elif server.length == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cut = server.cut.pop(self.path, None)
        rest = body[start:] if cut is None else body[start:cut]
        if server.length == "chunked":  # one chunk announcing the whole rest of the file, then the last chunk
            rest = f"{len(body) - start:x}\r\n".encode() + rest + (b"\r\n0\r\n\r\n" if cut is None else b"")
        self.wfile.write(rest)
        self.close_connection = True

    def log_message(self, *args):
        pass


def validator(server, body: bytes) -> str | None:
    """The validator of this version of a file: a strong ETag or a date, both from its digest."""
    digest = hashlib.sha256(body).hexdigest()
    if server.validator == "etag":
        return f'"{digest[:16]}"'
    if server.validator == "last-modified":
        return email.utils.formatdate(1_600_000_000 + int(digest[:6], 16), usegmt=True)
    return None


@contextlib.contextmanager
def running(handler=Handler, **extra):
    """A server on 127.0.0.1 (a free port) in a thread, with the settings Handler reads and `extra` (what a
    subclass reads), stopped when the block ends; an Event `release` in `extra` is set first."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.files, httpd.log, httpd.cut, httpd.ranges, httpd.if_range = {}, [], {}, True, True
    httpd.validator, httpd.length, httpd.content_type = "etag", "content-length", "application/octet-stream"
    for name, value in extra.items():
        setattr(httpd, name, value)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        if "release" in extra:
            extra["release"].set()  # a handler that waits on purpose stops waiting
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server():
    """A server on 127.0.0.1 (a free port) in a thread, stopped when the test ends."""
    with running() as httpd:
        yield httpd


def serve(server, monkeypatch, name: str, body: bytes, pinned: bool = True, url_path: str | None = None) -> bytes:
    """Serve `body` and point the registry entry `name` at it (with its true digest when `pinned`), kept in the
    cache where the registry keeps it, or (a name of a test) at the name itself."""
    url_path = url_path or "/" + os.path.basename(name if "." in os.path.basename(name) else name + ".pt")
    server.files[url_path] = body
    path = download.FILES[name].path if name in download.FILES else name
    remote = Remote(server.url + url_path, hashlib.sha256(body).hexdigest() if pinned else None, "test", path)
    monkeypatch.setitem(download.FILES, name, remote)
    if name in download.WEIGHTS:
        monkeypatch.setitem(download.WEIGHTS, name, remote)
    return body


def payload(n: int = 300_000) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8).tolist())


def test_fetch_writes_the_file_and_draws_a_bar_with_sizes(server, monkeypatch, tmp_path, capsys):
    body = serve(server, monkeypatch, "test/blob.bin", payload())
    path = download.fetch("test/blob.bin", str(tmp_path))
    assert path == str(tmp_path / "test" / "blob.bin") and open(path, "rb").read() == body
    assert not os.path.exists(path + ".part")
    bar = capsys.readouterr().err
    assert "blob.bin" in bar and "100%" in bar and "293k" in bar  # 300,000 bytes in KiB


def test_cache_hit_makes_no_request_and_is_checked(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "test/pinned.bin", payload())
    serve(server, monkeypatch, "test/tofu.bin", payload(1000), pinned=False)
    for name in ("test/pinned.bin", "test/tofu.bin"):
        first = download.fetch(name, str(tmp_path))
        assert download.fetch(name, str(tmp_path)) == first
    assert len(server.log) == 2  # one request per file, none for the cache hits
    # trust on first use: the digest is recorded, and a file changed later is refused without a request
    tofu = str(tmp_path / "test" / "tofu.bin")
    assert open(tofu + ".sha256").read().split()[0] == hashlib.sha256(payload(1000)).hexdigest()
    for path, name in ((tofu, "test/tofu.bin"), (str(tmp_path / "test" / "pinned.bin"), "test/pinned.bin")):
        with open(path, "r+b") as f:
            f.write(b"x")
        with pytest.raises(DownloadError, match="changed on disk"):
            download.fetch(name, str(tmp_path))
    assert len(server.log) == 2


def test_checksum_mismatch_is_refused_and_leaves_nothing(server, monkeypatch, tmp_path):
    server.files["/weights.pt"] = b"not the release" * 1000
    monkeypatch.setitem(
        download.FILES, "test/weights", Remote(server.url + "/weights.pt", "0" * 64, "test", "test/weights.pt")
    )
    with pytest.raises(DownloadError, match="expected 0000") as err:
        download.fetch("test/weights", str(tmp_path))
    assert "refused" in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(tmp_path / "test") == ["weights.pt.lock"]  # no file, no .part


def test_interrupted_transfer_leaves_no_whole_file_then_resumes_with_range(server, monkeypatch, tmp_path):
    body = serve(server, monkeypatch, "test/big.bin", payload())
    server.cut["/big.bin"] = 100_000
    path = str(tmp_path / "test" / "big.bin")
    with pytest.raises(DownloadError, match="closed after 100000 of 300000 bytes; run again to resume"):
        download.fetch("test/big.bin", str(tmp_path))
    assert not os.path.exists(path) and os.path.getsize(path + ".part") == 100_000
    assert download.fetch("test/big.bin", str(tmp_path)) == path and open(path, "rb").read() == body
    resumed = ("/big.bin", "bytes=100000-", validator(server, body))  # If-Range: the version the .part is of
    assert server.log == [("/big.bin", None, None), resumed] and not os.path.exists(path + ".part")


def test_a_server_that_ignores_range_restarts_from_zero(server, monkeypatch, tmp_path):
    body = serve(server, monkeypatch, "test/big.bin", payload())
    server.ranges = False
    os.makedirs(tmp_path / "test")
    open(tmp_path / "test" / "big.bin.part", "wb").write(b"stale bytes of another try")
    open(tmp_path / "test" / "big.bin.part.validator", "w").write(validator(server, body))
    path = download.fetch("test/big.bin", str(tmp_path))
    assert open(path, "rb").read() == body and server.log[0][1:] == ("bytes=26-", validator(server, body))


def closed_port_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/ViT-B-16.pt"


def test_offline_is_one_line_naming_the_url_the_cache_path_and_the_manual_step(monkeypatch, tmp_path):
    url = closed_port_url()
    monkeypatch.setitem(download.FILES, "test/offline", Remote(url, None, "test"))
    with pytest.raises(DownloadError) as err:
        download.fetch("test/offline", str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and url in message and "by hand" in message
    assert str(tmp_path / "test" / "offline" / "ViT-B-16.pt") in message  # the full name, then the URL's file


def test_cache_folder_flag_then_environment_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(download.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_dir() == str(tmp_path / "xdg" / "c2lip")
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "env"))
    assert download.cache_dir() == str(tmp_path / "env")
    assert download.cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(download.CACHE_ENV)
    assert download.cache_dir() == os.path.expanduser("~/.cache/c2lip")


def zipped(folder: str, arcroot: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in sorted(os.listdir(folder)):
            z.write(os.path.join(folder, name), f"{arcroot}/{name}")
    return out.getvalue()


def test_zip_is_extracted_once_into_a_folder_of_its_own(server, monkeypatch, tmp_path):
    os.makedirs(tmp_path / "src")
    open(tmp_path / "src" / "a.jpg", "wb").write(b"jpeg bytes")
    serve(server, monkeypatch, "coco/val2017.zip", zipped(str(tmp_path / "src"), "val2017"), pinned=False)
    root = download.fetch_zip("coco/val2017.zip", str(tmp_path / "cache"))
    assert root == str(tmp_path / "cache" / "coco" / "val2017.unzipped")
    assert open(os.path.join(root, "val2017", "a.jpg"), "rb").read() == b"jpeg bytes"
    assert not os.path.exists(str(tmp_path / "cache" / "coco" / "val2017.zip.extracting"))
    os.remove(os.path.join(root, "val2017", "a.jpg"))  # a finished extraction is not redone
    assert download.fetch_zip("coco/val2017.zip", str(tmp_path / "cache")) == root and len(server.log) == 1
    assert not os.path.exists(os.path.join(root, "val2017", "a.jpg"))


# ----------------------------------------------------------------------------- named weights, --download


def test_named_weights_resolve_through_load_model(server, monkeypatch, tmp_path, capsys):
    """--ckpt openai/ViT-B-16 and --init openai/ViT-B-16: the registry entry (pointed at the local server)
    is downloaded once, checked, and loaded as the file itself would be."""
    ckpt = write_checkpoint(str(tmp_path / "src" / "ckpt.pt"))
    serve(server, monkeypatch, "openai/ViT-B-16", open(ckpt, "rb").read())
    cache = str(tmp_path / "cache")
    model, tokenizer, state = load_model("openai/ViT-B-16", CPU, cache=cache)
    reference, _, _ = load_model(ckpt, CPU)
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert os.path.exists(os.path.join(cache, "openai", "ViT-B-16.pt"))
    load_model("openai/ViT-B-16", CPU, cache=cache)
    assert len(server.log) == 1
    assert train.get_args(["--init", "openai/ViT-B-16"]).init == "openai/ViT-B-16"
    with pytest.raises(SystemExit):
        evaluate.get_args(["--help"])
    assert "openai/ViT-B-16" in capsys.readouterr().out  # listed in --help
    # offline, with nothing cached: one line, no traceback
    monkeypatch.setitem(download.WEIGHTS, "openai/ViT-B-16", Remote(closed_port_url(), None, "test"))
    monkeypatch.setitem(download.FILES, "openai/ViT-B-16", download.WEIGHTS["openai/ViT-B-16"])
    with pytest.raises(SystemExit) as err:
        load_model("openai/ViT-B-16", CPU, cache=str(tmp_path / "empty"))
    assert str(err.value.code).startswith("error: openai/ViT-B-16: could not reach http://127.0.0.1:")
    assert "\n" not in str(err.value.code)


def test_clip_bpe_is_fetched_when_neither_given_nor_installed(server, monkeypatch, tmp_path):
    def not_installed(path):
        raise FileNotFoundError("no open_clip")

    monkeypatch.setattr(releases, "find_bpe_vocab", not_installed)
    body = serve(server, monkeypatch, "openai/bpe_simple_vocab_16e6", b"#version: 0.2\nl o\n", url_path="/bpe.txt.gz")
    path = releases.clip_bpe(None, str(tmp_path))
    assert path == str(tmp_path / "openai" / "bpe_simple_vocab_16e6.txt.gz") and open(path, "rb").read() == body
    assert releases.clip_bpe("mine.txt.gz", str(tmp_path)) == "mine.txt.gz" and len(server.log) == 1


def test_eval_download_fetches_sugarcrepe_and_coco_then_scores_as_from_folders(server, monkeypatch, tmp_path):
    """eval.py --bench sugarcrepe sugarcrepe++ --download with the registry pointed at fixture files in the
    official formats: the same scores as reading the folders, and a second run makes no request."""
    sc, scpp = write_sugarcrepe(str(tmp_path / "sc")), write_sugarcrepe_pp(str(tmp_path / "scpp"))
    for name in SUGARCREPE_FILES:
        serve(server, monkeypatch, f"sugarcrepe/{name}.json", open(f"{sc}/{name}.json", "rb").read(), pinned=False)
    for name in SUGARCREPE_PP_FILES:
        body = open(f"{scpp}/{name}.json", "rb").read()
        serve(server, monkeypatch, f"sugarcrepe++/{name}.json", body, pinned=False, url_path=f"/pp/{name}.json")
    serve(server, monkeypatch, "coco/val2017.zip", zipped(f"{sc}/val2017", "val2017"), pinned=False)
    ckpt = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    cache = str(tmp_path / "cache")
    argv = ["--ckpt", ckpt, "--bench", "sugarcrepe", "sugarcrepe++", *FAST]
    fetched = evaluate.main([*argv, "--download", "--cache-dir", cache])[ckpt]
    assert len(server.log) == 7 + 5 + 1
    local = evaluate.main(
        [*argv, "--data-dir", f"sugarcrepe={sc}", f"sugarcrepe++={scpp}", "--images", f"{sc}/val2017"]
    )
    assert fetched == local[ckpt] and fetched["sugarcrepe/mean"]["count"] == 28
    assert evaluate.main([*argv, "--download", "--cache-dir", cache])[ckpt] == fetched and len(server.log) == 13


def test_eval_download_fetches_the_karpathy_split_and_coco_val2014(server, monkeypatch, tmp_path):
    ann = write_karpathy(str(tmp_path / "coco"))
    serve(server, monkeypatch, "coco/coco_karpathy_test.json", open(ann, "rb").read(), pinned=False)
    serve(server, monkeypatch, "coco/val2014.zip", zipped(str(tmp_path / "coco" / "val2014"), "val2014"), pinned=False)
    ckpt = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    argv = ["--ckpt", ckpt, "--bench", "retrieval", *FAST]
    fetched = evaluate.main([*argv, "--download", "--cache-dir", str(tmp_path / "cache")])[ckpt]
    local = evaluate.main([*argv, "--data-dir", str(tmp_path / "coco"), "--ann", ann])[ckpt]
    assert fetched == local and fetched["retrieval/t2i-R@1"]["count"] == 6 and len(server.log) == 2


def test_eval_download_refuses_imagenet_and_hands_cifar_to_torchvision(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.get_args(["--bench", "zeroshot", "--download"])
    assert "licence" in capsys.readouterr().err
    calls = []

    def offline_cifar(root, train, download):
        calls.append((root, train, download))
        raise OSError("<urlopen error [Errno 111] Connection refused>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline_cifar)
    argv = ["--ckpt", "unused.pt", "--bench", "zeroshot", "--zeroshot-set", "cifar10", "--download"]
    with pytest.raises(SystemExit) as err:
        evaluate.main([*argv, "--cache-dir", str(tmp_path)])
    assert calls == [(str(tmp_path / "cifar"), False, True)] and "Connection refused" in str(err.value.code)


def test_named_siglip_weights_fetch_their_tokenizer(tmp_path, monkeypatch):
    """The SigLIP name brings T5's SentencePiece model from the registry when none is given or beside the weights;
    a named file that is not in the registry, or an --spm that is missing, still says where to get it."""
    assert "timm/ViT-B-16-SigLIP" in download.WEIGHTS and "t5/cc_en.32000" in download.TOKENIZERS
    asked = []
    monkeypatch.setattr(releases, "fetch", lambda name, cache=None: asked.append((name, cache)) or "spm-file")
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"")
    assert releases.siglip_spm(None, str(weights), "timm/ViT-B-16-SigLIP", "cache") == "spm-file"
    assert asked == [("t5/cc_en.32000", "cache")]
    for spm, name in [(None, str(weights)), (str(tmp_path / "missing.model"), "timm/ViT-B-16-SigLIP")]:
        with pytest.raises(FileNotFoundError, match="SentencePiece"):
            releases.siglip_spm(spm, str(weights), name)
