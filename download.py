"""Named files fetched once into a cache: released weights, CLIP's BPE vocabulary, the benchmarks' files.

  python train.py --init openai/ViT-B-16 ...               # OpenAI's release, downloaded once, checked
  python eval.py --bench sugarcrepe --download             # SugarCrepe's JSON files and COCO val2017

Not part of the paper: the plumbing that lets the design card's commands run from nothing, as openai/CLIP's
clip.load, open_clip's pretrained= and torchvision's download=True do for their users. `FILES` names every
file this repository can fetch, with its URL and, where the release is stable and its digest could be
established, its SHA-256. `fetch(name)` returns the file's path in the cache folder and touches the network
only when the file is not there yet:
  - the cache folder is --cache-dir, else $C2LIP_CACHE, else $XDG_CACHE_HOME/c2lip (~/.cache/c2lip);
  - the download goes to <file>.part, which is renamed to <file> only once it is complete and its SHA-256
    checked, so a file under its real name is always whole; a .part left by an interrupted transfer is
    resumed with an HTTP Range request (restarted from zero if the server ignores it);
  - files with no pinned digest are trusted on first use: the digest of the first download is recorded
    beside the file (<file>.sha256) and every later use checks the file against it;
  - a lock on <file>.lock makes concurrent processes (torchrun's ranks) wait for one download;
  - offline, one line names the URL, the cache path and how to place the file there by hand.
Only the standard library's urllib talks to the network (and tqdm draws the bar). Training data (CC3M) is
never fetched here: it is 3M images from their original hosts (img2dataset, see docs/real-data.md).
"""

import contextlib
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass

from tqdm import tqdm

from checkpoint import atomic_write

try:
    import fcntl  # POSIX; on Windows concurrent downloads are not serialised
except ImportError:
    fcntl = None


@dataclass(frozen=True)
class Remote:
    url: str
    sha256: str | None  # None: no digest could be pinned; trusted on first use (see the module docstring)
    size: str  # for --help and the docs: the official size where there is one, else an estimate, said as such


# Commits the benchmark files are pinned at (raw.githubusercontent.com serves a file at a commit unchanged).
SUGARCREPE_COMMIT = "0047054b243992f0fad63d6f64f7544862daf846"  # RAIVNLab/sugar-crepe, data/*_obj naming
SCPP_COMMIT = "cfdcd827e2725427752fdc582f82d1695d983417"  # Sri-Harsha/scpp
SUGARCREPE_URL = f"https://raw.githubusercontent.com/RAIVNLab/sugar-crepe/{SUGARCREPE_COMMIT}/data/"
SCPP_URL = f"https://raw.githubusercontent.com/Sri-Harsha/scpp/{SCPP_COMMIT}/data/"
BLIP_URL = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"

# Weights that `--init NAME` (train.py) and `--ckpt NAME` (eval.py) accept. A new release is one entry here
# (and one in TOKENIZERS if it brings its own vocabulary), nothing else.
WEIGHTS = {
    # The URL of "ViT-B/16" in openai/CLIP's clip/clip.py; the folder name is the file's SHA-256, which
    # clip.load checks too.
    "openai/ViT-B-16": Remote(
        "https://openaipublic.azureedge.net/clip/models/"
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        "about 350 MB (estimate)",
    ),
    # open_clip's ViT-B-16-SigLIP (WebLI), the paper's backbone, as its hub repository ships it. No digest
    # is published with it: trusted on first use.
    "timm/ViT-B-16-SigLIP": Remote(
        "https://huggingface.co/timm/ViT-B-16-SigLIP/resolve/main/open_clip_model.safetensors",
        None,
        "about 800 MB (estimate)",
    ),
}
TOKENIZERS = {
    # clip/bpe_simple_vocab_16e6.txt.gz of openai/CLIP, 1,356,917 bytes. The digest is that of the copy
    # shipped inside open_clip_torch 3.3.0 (computed here), the same digest other projects record for
    # openai/CLIP's file; the file has not changed since CLIP's release.
    "openai/bpe_simple_vocab_16e6": Remote(
        "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz",
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
        "1.3 MB",
    ),
    # T5's English SentencePiece model (cc_en.32000), the vocabulary of SigLIP's text tower; trusted on
    # first use.
    "t5/cc_en.32000": Remote(
        "https://storage.googleapis.com/t5-data/vocabs/cc_en.32000/sentencepiece.model",
        None,
        "about 0.8 MB (estimate)",
    ),
}
# The benchmarks' files. No digest of these could be obtained on the machine this was written on (no
# internet): each is trusted on first use, and pinned at a commit or a fixed release URL.
BENCHMARK_FILES = {
    **{
        f"sugarcrepe/{n}.json": Remote(SUGARCREPE_URL + f"{n}.json", None, "under 1 MB each (estimate)")
        for n in ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
    },
    **{
        f"sugarcrepe++/{n}.json": Remote(SCPP_URL + f"{n}.json", None, "under 1 MB each (estimate)")
        for n in ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
    },
    # COCO's own zips: cocodataset.org lists val2017 as "5K images, 1GB" and val2014 as "40K images, 6GB".
    "coco/val2017.zip": Remote("http://images.cocodataset.org/zips/val2017.zip", None, "1 GB (official)"),
    "coco/val2014.zip": Remote("http://images.cocodataset.org/zips/val2014.zip", None, "6 GB (official)"),
    # The Karpathy test split as released with BLIP (github.com/salesforce/BLIP): a JSON list of
    # {image, caption: [...]}, image paths under COCO's val2014/. (Flickr30k's images need a request form.)
    "coco/coco_karpathy_test.json": Remote(BLIP_URL + "coco_karpathy_test.json", None, "about 2 MB (estimate)"),
}
FILES = WEIGHTS | TOKENIZERS | BENCHMARK_FILES

CACHE_ENV = "C2LIP_CACHE"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched or did not match its digest; the message is one line the user can act on."""


def cache_dir(folder: str | None = None) -> str:
    """--cache-dir, else $C2LIP_CACHE, else the per-user cache: $XDG_CACHE_HOME/c2lip or ~/.cache/c2lip."""
    if folder or os.environ.get(CACHE_ENV):
        return os.path.expanduser(folder or os.environ[CACHE_ENV])
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "c2lip")


def cache_path(name: str, folder: str | None = None) -> str:
    """Where `name` lives in the cache: its folder in the name, the file name of its URL (openai/ViT-B-16.pt)."""
    url = FILES[name].url
    return os.path.join(cache_dir(folder), os.path.dirname(name), os.path.basename(url))


def add_cache_flag(parser) -> None:
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=f"where named weights and --download's files are kept (default: ${CACHE_ENV}, else "
        "$XDG_CACHE_HOME/c2lip or ~/.cache/c2lip)",
    )


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str):
    """Hold <path>.lock for the block; another process asking for the same file waits here, then finds it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def fetch(name: str, folder: str | None = None) -> str:
    """The path of the named file (a key of FILES) in the cache, downloaded and checked first if it is not there.
    A cached file is checked against its digest (pinned, or recorded on first use) and no request is made.
    Raises DownloadError with one line: offline, an HTTP error, an incomplete transfer, a digest mismatch."""
    remote, path = FILES[name], cache_path(name, folder)
    with file_lock(path):
        if os.path.exists(path):
            check(path, remote.sha256 or recorded_digest(path), remote.url)
            return path
        part = path + ".part"
        download(remote.url, part, path)
        digest = sha256_of(part)
        if remote.sha256 and digest != remote.sha256:
            os.remove(part)  # a wrong file is not worth resuming
            raise DownloadError(
                f"{remote.url} downloaded with SHA-256 {digest}, expected {remote.sha256}: refused and deleted "
                "(a changed or corrupted release, or a proxy's error page); try again, or place the right file "
                f"at {path} by hand"
            )
        if remote.sha256 is None:  # trust on first use: later uses are checked against this digest
            with atomic_write(path + ".sha256") as f:
                f.write(f"{digest}  {os.path.basename(path)}\n")
        os.replace(part, path)
    return path


def recorded_digest(path: str) -> str | None:
    """The digest recorded on first use, or None for a file placed by hand (its digest is recorded now)."""
    try:
        with open(path + ".sha256") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        with open(path + ".sha256", "w") as f:  # placed by hand: trusted now, checked from now on
            f.write(f"{sha256_of(path)}  {os.path.basename(path)}\n")
        return None


def check(path: str, expected: str | None, url: str) -> None:
    if expected is not None and (digest := sha256_of(path)) != expected:
        raise DownloadError(
            f"{path} has SHA-256 {digest}, expected {expected} (changed on disk?): delete it to download {url} again"
        )


def download(url: str, part: str, path: str) -> None:
    """url -> part, appending to what a previous try left there (HTTP Range), with a tqdm bar in bytes."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "c2lip"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    by_hand = f"download it by hand and place it at {path}"
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range is past the end: the .part is odd, start again from zero
            os.remove(part)
            return download(url, part, path)
        raise DownloadError(f"{url} answered HTTP {err.code} ({err.reason}); {by_hand}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not reach {url} ({reason}); offline? {by_hand}") from None
    if response.status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
        response.close()  # a range other than the one asked for: start again from zero
        os.remove(part)
        return download(url, part, path)
    with response:
        resumed = response.status == 206
        if not resumed:  # the server sent the whole file (it ignored Range, or there was nothing yet)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        done = have
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(path))
        try:
            with open(part, "ab" if resumed else "wb") as f, bar:
                while block := response.read(CHUNK):
                    f.write(block)
                    done += len(block)
                    bar.update(len(block))
        except (http.client.HTTPException, OSError) as err:
            raise DownloadError(
                f"{url}: the transfer stopped after {done} bytes ({type(err).__name__}); run again to resume "
                f"from {part}, or {by_hand}"
            ) from None
    if total is not None and done != total:
        raise DownloadError(
            f"{url}: the connection closed after {done} of {total} bytes; run again to resume from {part}, or {by_hand}"
        )


def fetch_zip(name: str, folder: str | None = None) -> str:
    """The folder a named zip is extracted into (its own folder in the cache), fetched and extracted once.
    The members go to a temporary folder first and are moved into place only when all are out; the file
    <zip>.extracted marks a finished extraction (until then a later call extracts again)."""
    path = fetch(name, folder)
    root, done = os.path.dirname(path), path + ".extracted"
    with file_lock(path):
        if os.path.exists(done):
            return root
        tmp = path + ".extracting"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with zipfile.ZipFile(path) as z:
                for member in tqdm(z.infolist(), desc=f"extracting {os.path.basename(path)}", unit="file"):
                    z.extract(member, tmp)  # zipfile drops absolute paths and ".." from member names
        except (zipfile.BadZipFile, OSError) as err:
            raise DownloadError(f"{path} could not be extracted ({err}); delete it to download it again") from None
        for entry in os.listdir(tmp):  # e.g. val2017/: replaces what an unfinished extraction left
            target = os.path.join(root, entry)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, entry), target)
        os.rmdir(tmp)
        open(done, "w").close()
    return root


def resolve_weights(name_or_path: str, folder: str | None = None) -> str:
    """--init / --ckpt: a file path as given (an existing file wins over a name), else a name of WEIGHTS
    fetched into the cache."""
    if name_or_path in WEIGHTS and not os.path.exists(name_or_path):
        return fetch(name_or_path, folder)
    return name_or_path
