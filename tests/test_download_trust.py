"""Downloads that a bad network cannot turn into trusted files (download.py, transfer.py), against the local
server of test_download.py misbehaving on purpose: a file that changes between two tries, bodies of unknown
length or cut short, an HTML page served with status 200, a cached file that then does not parse, a zip that
holds the cache's own file names, a read-only cache, re-hashing, two releases whose files share a name, and
the digests that are published."""

import builtins
import errno
import hashlib
import io
import os
import shutil
import zipfile

import pytest
import torch

import eval as evaluate
import test_download
from fixtures import write_karpathy
from released import download
from released import weights as releases
from released.download import DownloadError, Remote
from released.tokenizers import find_spm_model
from run.checkpoint import load_model
from test_download import payload, serve, validator, zipped

CPU = torch.device("cpu")
server = test_download.server  # the local HTTP server, a fixture


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def recorded(path: str) -> str:
    return open(path + ".sha256").read().split()[0]


@pytest.mark.parametrize("kind", ["etag", "last-modified"])
@pytest.mark.parametrize("if_range", [True, False], ids=["honours-if-range", "ignores-if-range"])
def test_a_part_of_a_file_that_changed_on_the_server_is_restarted_not_spliced(
    server, monkeypatch, tmp_path, kind, if_range
):
    server.validator, server.if_range = kind, if_range
    old = serve(server, monkeypatch, "test/big.bin", payload(300_000), pinned=False)
    server.cut["/big.bin"] = 100_000
    with pytest.raises(DownloadError, match="run again to resume"):
        download.fetch("test/big.bin", str(tmp_path))
    new = payload(300_001)[:300_000]  # the same length, other bytes: a new version under the same URL
    server.files["/big.bin"] = new
    path = download.fetch("test/big.bin", str(tmp_path))
    assert open(path, "rb").read() == new and recorded(path) == sha(new)  # not old[:100000] + new[100000:]
    assert server.log[1][1:] == ("bytes=100000-", validator(server, old))  # If-Range names the .part's version
    if not if_range:  # the 206 named the new version: not appended, asked again from zero
        assert server.log[2][1:] == (None, None) and len(server.log) == 3
    assert not os.path.exists(path + ".part") and not os.path.exists(path + ".part.validator")


def test_a_part_whose_version_is_unknown_is_never_resumed(server, monkeypatch, tmp_path):
    server.validator = None  # no ETag, no Last-Modified: nothing can say the .part is of the file served now
    body = serve(server, monkeypatch, "test/big.bin", payload(), pinned=False)
    server.cut["/big.bin"] = 100_000
    with pytest.raises(DownloadError) as err:
        download.fetch("test/big.bin", str(tmp_path))
    assert open(download.fetch("test/big.bin", str(tmp_path)), "rb").read() == body
    assert server.log[1] == ("/big.bin", None, None)  # restarted, no Range
    assert "run again (the server names no version of the file, so it starts from zero)" in str(err.value)


def test_a_body_of_unknown_length_is_refused_unless_a_digest_can_tell(server, monkeypatch, tmp_path):
    server.length = None  # neither Content-Length nor chunking: the body ends when the connection closes
    body = serve(server, monkeypatch, "test/tofu.bin", payload(), pinned=False)
    server.cut["/tofu.bin"] = 100_000  # cut short, and nothing could tell
    with pytest.raises(DownloadError, match="gave no length") as err:
        download.fetch("test/tofu.bin", str(tmp_path))
    assert "by hand" in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "test" / "tofu.bin") and not os.path.exists(
        tmp_path / "test" / "tofu.bin.sha256"
    )
    # a pinned file: read to the end, and its digest decides
    serve(server, monkeypatch, "test/pinned.bin", body)
    server.cut["/pinned.bin"] = 100_000
    with pytest.raises(DownloadError, match="expected " + sha(body)):
        download.fetch("test/pinned.bin", str(tmp_path))
    assert open(download.fetch("test/pinned.bin", str(tmp_path)), "rb").read() == body


def test_a_chunked_body_cut_short_keeps_what_arrived_then_resumes(server, monkeypatch, tmp_path):
    server.length = "chunked"
    body = serve(server, monkeypatch, "test/big.bin", payload(), pinned=False)
    server.cut["/big.bin"] = 100_000
    path = str(tmp_path / "test" / "big.bin")
    with pytest.raises(DownloadError, match="stopped after 100000 bytes \\(IncompleteRead\\); run again to resume"):
        download.fetch("test/big.bin", str(tmp_path))
    assert open(path + ".part", "rb").read() == body[:100_000]  # http.client had read them: they are kept
    assert open(download.fetch("test/big.bin", str(tmp_path)), "rb").read() == body and recorded(path) == sha(body)
    assert server.log[1][1] == "bytes=100000-"


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json"])
def test_an_html_page_served_with_200_is_refused(server, monkeypatch, tmp_path, content_type):
    """A proxy's or a host's error page in place of an unpinned file: by its Content-Type, else by its start."""
    server.content_type = content_type
    page = b"\n<!DOCTYPE html>\n<html><body>Quota exceeded</body></html>\n"
    serve(server, monkeypatch, "coco/coco_karpathy_test.json", page, pinned=False)
    with pytest.raises(DownloadError, match="HTML page") as err:
        download.fetch("coco/coco_karpathy_test.json", str(tmp_path))
    assert "\n" not in str(err.value) and "by hand" in str(err.value)
    assert sorted(os.listdir(tmp_path / "coco")) == ["coco_karpathy_test.json.lock"]  # nothing kept, nothing trusted
    serve(server, monkeypatch, "test/page.html", page, pinned=False)  # a file that is HTML is not refused
    assert open(download.fetch("test/page.html", str(tmp_path)), "rb").read() == page


def test_a_cached_benchmark_file_that_does_not_parse_names_itself_to_delete(server, monkeypatch, tmp_path):
    write_karpathy(str(tmp_path / "coco"))
    server.content_type = "application/json"
    serve(server, monkeypatch, "coco/coco_karpathy_test.json", b'[{"image": "val2014/a.jpg", "capt', pinned=False)
    serve(server, monkeypatch, "coco/val2014.zip", zipped(str(tmp_path / "coco" / "val2014"), "val2014"), pinned=False)
    cache = str(tmp_path / "cache")
    argv = ["--ckpt", "unused.pt", "--bench", "retrieval", "--download", "--cache-dir", cache]
    with pytest.raises(SystemExit) as err:
        evaluate.main(argv)
    cached = os.path.join(cache, "coco", "coco_karpathy_test.json")
    assert f"{cached} is the cached download of coco/coco_karpathy_test.json: delete it" in str(err.value.code)


def test_cached_weights_and_tokenizers_that_do_not_parse_name_themselves_to_delete(server, monkeypatch, tmp_path):
    cache = str(tmp_path / "cache")
    serve(server, monkeypatch, "openai/ViT-B-16", b"\x80\x02 not a pickle, not a zip" * 100, pinned=False)
    with pytest.raises(SystemExit) as err:
        load_model("openai/ViT-B-16", CPU, cache=cache)
    message = str(err.value.code)
    assert message.startswith("error: openai/ViT-B-16: not a weights file") and "\n" not in message
    assert (
        f"{os.path.join(cache, 'openai', 'ViT-B-16.pt')} is the cached download of openai/ViT-B-16: delete" in message
    )
    # CLIP weights whose BPE vocabulary comes from the cache, and the cached vocabulary is not gzip
    open_clip = pytest.importorskip("open_clip")
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=16)
    text = open_clip.model.CLIPTextCfg(width=64, heads=1, layers=1)
    weights = str(tmp_path / "clip.pt")
    torch.save(open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).state_dict(), weights)

    def not_installed(path):
        raise FileNotFoundError("no open_clip copy")

    monkeypatch.setattr(releases, "find_bpe_vocab", not_installed)
    serve(server, monkeypatch, "openai/bpe_simple_vocab_16e6", b"#version: 0.2 but not gzip\n", pinned=False)
    with pytest.raises(SystemExit) as err:
        load_model(weights, CPU, cache=cache)
    bpe = os.path.join(cache, "openai", "bpe_simple_vocab_16e6.txt.gz")
    assert f"{bpe} is the cached download of openai/bpe_simple_vocab_16e6: delete it" in str(err.value.code)


def test_a_zip_is_extracted_into_its_own_folder_and_cannot_replace_cached_files(server, monkeypatch, tmp_path):
    cache = str(tmp_path / "cache")
    split = serve(server, monkeypatch, "coco/coco_karpathy_test.json", b'[{"image": "a", "caption": ["b"]}]', False)
    ann = download.fetch("coco/coco_karpathy_test.json", cache)
    record = open(ann + ".sha256").read()
    os.makedirs(tmp_path / "evil")
    open(tmp_path / "evil" / "coco_karpathy_test.json", "w").write("[]")
    open(tmp_path / "evil" / "coco_karpathy_test.json.sha256", "w").write(sha(b"[]") + "  coco_karpathy_test.json\n")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:  # a zip whose top-level entries are the names of cached files
        for name in sorted(os.listdir(tmp_path / "evil")):
            z.write(tmp_path / "evil" / name, name)
    serve(server, monkeypatch, "coco/val2014.zip", out.getvalue(), pinned=False)
    root = download.fetch_zip("coco/val2014.zip", cache)
    assert open(ann, "rb").read() == split and open(ann + ".sha256").read() == record
    assert root == os.path.join(cache, "coco", "val2014.unzipped")
    assert open(os.path.join(root, "coco_karpathy_test.json")).read() == "[]"
    assert download.fetch("coco/coco_karpathy_test.json", cache) == ann


def read_only(monkeypatch, folder: str) -> None:
    """Make `folder` behave as a read-only file system for this process (the tests may run as root, for whom
    file modes would not stop a write): every way download.py writes raises EROFS there."""
    folder = os.path.abspath(folder)

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(folder + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_mkdir = builtins.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        return real_mkdir(path, *args, **kwargs) if os.path.exists(path) or not inside(path) else refuse(path)

    def guarded(real):
        return lambda path, *args, **kwargs: refuse(path) if inside(path) else real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    for module, name in [(os, "replace"), (os, "rename"), (os, "remove"), (os, "utime"), (shutil, "rmtree")]:
        monkeypatch.setattr(module, name, guarded(getattr(module, name)))


def snapshot(folder) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def test_a_read_only_cache_is_read_and_never_written(server, monkeypatch, tmp_path):
    cache = str(tmp_path / "shared")
    serve(server, monkeypatch, "test/pinned.bin", payload())
    serve(server, monkeypatch, "test/tofu.bin", payload(1000), pinned=False)
    os.makedirs(tmp_path / "src")
    open(tmp_path / "src" / "a.jpg", "wb").write(b"jpeg bytes")
    serve(server, monkeypatch, "coco/val2017.zip", zipped(str(tmp_path / "src"), "val2017"), pinned=False)
    for name in ("test/pinned.bin", "test/tofu.bin"):  # filled by an administrator, locks and all
        download.fetch(name, cache)
    download.fetch_zip("coco/val2017.zip", cache)
    os.makedirs(tmp_path / "shared" / "hand")  # and a pinned file placed by hand: no lock, no record
    open(tmp_path / "shared" / "hand" / "pinned.bin", "wb").write(payload())
    serve(server, monkeypatch, "hand/pinned.bin", payload())
    for name in os.listdir(tmp_path / "shared" / "test"):
        if name.endswith(".lock"):
            os.remove(tmp_path / "shared" / "test" / name)  # copied without its lock files
    before = snapshot(cache)
    read_only(monkeypatch, cache)
    for name in ("test/pinned.bin", "test/tofu.bin", "hand/pinned.bin"):
        assert open(download.fetch(name, cache), "rb").read() == server.files["/" + os.path.basename(name)]
    assert os.listdir(os.path.join(download.fetch_zip("coco/val2017.zip", cache), "val2017")) == ["a.jpg"]
    assert snapshot(cache) == before and len(server.log) == 3  # nothing written, nothing asked
    serve(server, monkeypatch, "test/missing.bin", payload(10), pinned=False)  # not there: one line, no traceback
    with pytest.raises(DownloadError, match="cannot write to the cache folder .* pass --cache-dir"):
        download.fetch("test/missing.bin", cache)


def test_a_cached_file_is_hashed_again_only_when_its_size_or_mtime_changes(server, monkeypatch, tmp_path):
    hashed = []
    real = download.sha256_of
    monkeypatch.setattr(download, "sha256_of", lambda path: hashed.append(path) or real(path))
    body = serve(server, monkeypatch, "test/tofu.bin", payload(), pinned=False)
    path = download.fetch("test/tofu.bin", str(tmp_path))
    assert len(hashed) == 1  # the download
    an_hour_ago = os.stat(path).st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(an_hour_ago, an_hour_ago))  # touched: hashed once, recorded again
    download.fetch("test/tofu.bin", str(tmp_path))
    assert len(hashed) == 2
    for _ in range(3):
        download.fetch("test/tofu.bin", str(tmp_path))
    assert len(hashed) == 2  # unchanged: not read again
    with open(path, "r+b") as f:  # changed on disk, size kept, mtime moved
        f.write(b"x" if body[:1] != b"x" else b"y")
    with pytest.raises(DownloadError, match="changed on disk"):
        download.fetch("test/tofu.bin", str(tmp_path))
    # a zip: extracted once, then neither hashed nor read again
    os.makedirs(tmp_path / "src")
    open(tmp_path / "src" / "a.jpg", "wb").write(b"jpeg bytes")
    serve(server, monkeypatch, "coco/val2014.zip", zipped(str(tmp_path / "src"), "val2014"), pinned=False)
    root = download.fetch_zip("coco/val2014.zip", str(tmp_path))
    hashed.clear()
    assert download.fetch_zip("coco/val2014.zip", str(tmp_path)) == root and hashed == []


def test_two_releases_whose_files_share_a_name_are_kept_apart(server, monkeypatch, tmp_path):
    bodies = {}
    for name in ("hub/ViT-A", "hub/ViT-B"):  # open_clip's hub repositories all call their file this
        url_path = f"/{name}/open_clip_model.safetensors"
        server.files[url_path] = bodies[name] = payload(len(name) * 1000 + len(bodies))
        monkeypatch.setitem(download.FILES, name, Remote(server.url + url_path, None, "test"))  # no path given
    paths = {name: download.fetch(name, str(tmp_path)) for name in bodies}
    assert all(open(paths[n], "rb").read() == bodies[n] for n in bodies) and len(server.log) == 2
    assert paths["hub/ViT-A"] == str(tmp_path / "hub" / "ViT-A" / "open_clip_model.safetensors")
    # the registry: a path of its own for every name, the layouts the readers expect kept
    cache = str(tmp_path / "c")
    paths = [download.cache_path(name, cache) for name in download.FILES]
    assert len(set(paths)) == len(paths)
    assert download.cache_path("sugarcrepe/add_att.json", cache) == os.path.join(cache, "sugarcrepe", "add_att.json")
    siglip = download.cache_path("timm/ViT-B-16-SigLIP", cache)
    assert siglip == os.path.join(cache, "timm", "ViT-B-16-SigLIP", "open_clip_model.safetensors")
    os.makedirs(os.path.dirname(siglip))
    open(os.path.join(os.path.dirname(siglip), "sentencepiece.model"), "wb").close()
    assert find_spm_model(None, beside=siglip) == os.path.join(os.path.dirname(siglip), "sentencepiece.model")


PUBLISHED = {
    "sugarcrepe/add_att.json": "012d88d729693d193760e6f3393b06a1cf874380a9db0062e937201199fe044d",
    "sugarcrepe/add_obj.json": "1b9d76b93139a937b8dc1ada92a4f05ecc821bb3c291d752428bafadd4bb0682",
    "sugarcrepe/replace_att.json": "9fe55fd4c0a9ad1f85d486d9f6d0215b41f867eb025026e7f7b5ce44352545ee",
    "sugarcrepe/replace_obj.json": "9d299600639947e9d15281a9ded1382b376cf4ea088a8d08a1314bfe76e81898",
    "sugarcrepe/replace_rel.json": "356bcc2fc4c6aed3f4d9fd50acc58489bb1fe70c28791f9368d4cbf9ea39cdc9",
    "sugarcrepe/swap_att.json": "7a7ce04e5c4c80412b48c6f0c1347fb1a2f5d54c0be6aa429b64d390e442f8d0",
    "sugarcrepe/swap_obj.json": "073cdb8e253d053614e80710834d9773b09dbc1dd0a412f6f9492262caa1dcad",
    "sugarcrepe++/replace_att.json": "6826413592894754eeca02aeebbcbbc8b95a7456998abcc714e71c033ce6fe87",
    "sugarcrepe++/replace_obj.json": "5c6dc499ec8f511a8aa4ec1b7b5eb0eca90317488abe36ec39573355e2d361ab",
    "sugarcrepe++/replace_rel.json": "040fb95d3f0619bf515db60879e99709a87a5e9b4f524ec3403b127243480fd4",
    "sugarcrepe++/swap_att.json": "450d0fd9fcad3e6f44950dc634e7f901ab1c6d9c60a569ade5ae8ffb3d203ad8",
    "sugarcrepe++/swap_obj.json": "5f33cae824de431a7ecd3c5de6301f689815f9497aa36d96b154bbaf117b201b",
    "timm/ViT-B-16-SigLIP": "81942ea8c09b9e41963357cca5d2682118bf7eb7491c2ae51a28bc4f4f95b194",
    "openai/ViT-B-16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "openai/bpe_simple_vocab_16e6": "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
}
TRUSTED_ON_FIRST_USE = {"t5/cc_en.32000", "coco/val2017.zip", "coco/val2014.zip", "coco/coco_karpathy_test.json"}


def test_what_is_published_is_pinned_and_a_file_with_another_digest_is_refused(server, monkeypatch, tmp_path):
    assert {name: download.FILES[name].sha256 for name in PUBLISHED} == PUBLISHED
    assert {name for name, remote in download.FILES.items() if remote.sha256 is None} == TRUSTED_ON_FIRST_USE
    assert "/resolve/41f575766f40e752fdd1383e9565b7f02388c1c4/" in download.FILES["timm/ViT-B-16-SigLIP"].url
    name, served = "sugarcrepe/add_att.json", b'{"0": {"filename": "a.jpg", "caption": "a", "negative_caption": "b"}}'
    server.files["/add_att.json"] = served  # the right URL's content changed: the pin refuses it
    monkeypatch.setitem(download.FILES, name, Remote(server.url + "/add_att.json", PUBLISHED[name], "test", name))
    with pytest.raises(DownloadError) as err:
        download.fetch(name, str(tmp_path))
    message = str(err.value)
    assert sha(served) in message and PUBLISHED[name] in message and "/add_att.json" in message
    assert str(tmp_path / "sugarcrepe" / "add_att.json") in message and "\n" not in message
    assert not os.path.exists(tmp_path / "sugarcrepe" / "add_att.json")
