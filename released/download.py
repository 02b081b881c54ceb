"""Named files fetched once into a cache: released weights, CLIP's BPE vocabulary, the benchmarks' files.

  python train.py --init openai/ViT-B-16 ...               # OpenAI's release, downloaded once, checked
  python eval.py --bench sugarcrepe --download             # SugarCrepe's JSON files and COCO val2017

Not part of the paper: the plumbing that lets the design card's commands run from nothing, as openai/CLIP's
clip.load, open_clip's pretrained= and torchvision's download=True do for their users. `FILES` names every
file this repository can fetch, with its URL, its place in the cache (keyed by its full name, so that two
releases whose files share a name never share a path) and, wherever one is published, its SHA-256.
`fetch(name)` returns the file's path in the cache folder and touches the network only when the file is not
there yet:
  - the cache folder is --cache-dir, else $C2LIP_CACHE, else $XDG_CACHE_HOME/c2lip (~/.cache/c2lip);
  - the download goes to <file>.part (transfer.py: resumed only when the server vouches that its file has not
    changed; an HTML page, or a body whose end cannot be told, is refused), and the .part is renamed to <file>
    only once it is complete and its SHA-256 checked, so a file under its real name is always whole;
  - a download stops at the file's size where it is published, else at a cap each entry states (`most`,
    a few times its size): a server that sends more is refused (transfer.py);
  - files with nothing published to pin are trusted on first use: the digest of the first download is
    recorded beside the file (<file>.sha256) and every later use checks the file against it;
  - the record (kept for pinned files too) holds the size and modification time the file was hashed at: a
    later use hashes the file again only when they changed (a 6 GB zip is not read at every run);
  - a cached file is used without taking a lock, and nothing is written unless its record is out of date
    (refreshed where the cache can be written), so a shared, read-only cache works; a lock on <file>.lock
    makes concurrent processes (torchrun's ranks) wait for one download;
  - offline, one line names the URL, the cache path and how to place the file there by hand.
Training data (CC3M) is never fetched here: it is 3M images from their original hosts (img2dataset, see
docs/real-data.md).
"""

import contextlib
import hashlib
import os
import re
import shutil
import zipfile
from dataclasses import dataclass

from tqdm import tqdm

from released.disk import atomic_write
from released.transfer import CHUNK, DownloadError, discard, download

try:
    import fcntl  # POSIX; on Windows concurrent downloads are not serialised
except ImportError:
    fcntl = None


MOST = 16 << 30  # the cap of an entry that states none: above every file here (val2014.zip, 6 GB)


@dataclass(frozen=True)
class Remote:
    url: str
    sha256: str | None  # None: nothing published to pin; trusted on first use (see the module docstring)
    size: str  # for --help and the docs: the official size where there is one, else an estimate, said as such
    path: str | None = None  # in the cache folder; None: <name>/<the URL's file name>
    most: int = MOST  # bytes the download may bring: the file's size where published, else a cap stated here


# Commits the benchmark files are pinned at (raw.githubusercontent.com serves a file at a commit unchanged).
SUGARCREPE_COMMIT = "0047054b243992f0fad63d6f64f7544862daf846"  # RAIVNLab/sugar-crepe, data/*_obj naming
SCPP_COMMIT = "cfdcd827e2725427752fdc582f82d1695d983417"  # Sri-Harsha/scpp
SUGARCREPE_URL = f"https://raw.githubusercontent.com/RAIVNLab/sugar-crepe/{SUGARCREPE_COMMIT}/data/"
SCPP_URL = f"https://raw.githubusercontent.com/Sri-Harsha/scpp/{SCPP_COMMIT}/data/"
BLIP_URL = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
# The hub repository's commit whose open_clip_model.safetensors has the LFS SHA-256 pinned below.
SIGLIP_REVISION = "41f575766f40e752fdd1383e9565b7f02388c1c4"

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
        "openai/ViT-B-16.pt",
        1 << 30,
    ),
    # open_clip's ViT-B-16-SigLIP (WebLI), the paper's backbone, as its hub repository ships it, at a fixed
    # revision: the hub publishes the file's SHA-256 (its Git LFS object id), not a digest of `main`.
    "timm/ViT-B-16-SigLIP": Remote(
        f"https://huggingface.co/timm/ViT-B-16-SigLIP/resolve/{SIGLIP_REVISION}/open_clip_model.safetensors",
        "81942ea8c09b9e41963357cca5d2682118bf7eb7491c2ae51a28bc4f4f95b194",
        "about 800 MB (estimate)",
        most=2 << 30,
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
        "openai/bpe_simple_vocab_16e6.txt.gz",
        1_356_917,
    ),
    # T5's English SentencePiece model (cc_en.32000), the vocabulary of SigLIP's text tower. No digest is
    # published with it: trusted on first use.
    "t5/cc_en.32000": Remote(
        "https://storage.googleapis.com/t5-data/vocabs/cc_en.32000/sentencepiece.model",
        None,
        "about 0.8 MB (estimate)",
        most=16 << 20,
    ),
}
# The benchmark files at their pinned commits: SHA-256 and size of each git blob, which the raw URLs serve
# byte for byte. Kept in the cache as DIR/add_att.json ..., the layout evaluation/benchmarks.py reads.
SUGARCREPE_FILES = {
    "add_att": ("012d88d729693d193760e6f3393b06a1cf874380a9db0062e937201199fe044d", 158_863),
    "add_obj": ("1b9d76b93139a937b8dc1ada92a4f05ecc821bb3c291d752428bafadd4bb0682", 484_593),
    "replace_att": ("9fe55fd4c0a9ad1f85d486d9f6d0215b41f867eb025026e7f7b5ce44352545ee", 176_843),
    "replace_obj": ("9d299600639947e9d15281a9ded1382b376cf4ea088a8d08a1314bfe76e81898", 361_126),
    "replace_rel": ("356bcc2fc4c6aed3f4d9fd50acc58489bb1fe70c28791f9368d4cbf9ea39cdc9", 312_629),
    "swap_att": ("7a7ce04e5c4c80412b48c6f0c1347fb1a2f5d54c0be6aa429b64d390e442f8d0", 154_665),
    "swap_obj": ("073cdb8e253d053614e80710834d9773b09dbc1dd0a412f6f9492262caa1dcad", 57_569),
}
SCPP_FILES = {
    "replace_att": ("6826413592894754eeca02aeebbcbbc8b95a7456998abcc714e71c033ce6fe87", 226_275),
    "replace_obj": ("5c6dc499ec8f511a8aa4ec1b7b5eb0eca90317488abe36ec39573355e2d361ab", 456_601),
    "replace_rel": ("040fb95d3f0619bf515db60879e99709a87a5e9b4f524ec3403b127243480fd4", 392_738),
    "swap_att": ("450d0fd9fcad3e6f44950dc634e7f901ab1c6d9c60a569ade5ae8ffb3d203ad8", 198_206),
    "swap_obj": ("5f33cae824de431a7ecd3c5de6301f689815f9497aa36d96b154bbaf117b201b", 74_611),
}
BENCHMARK_FILES = {
    **{
        f"{bench}/{n}.json": Remote(url + f"{n}.json", digest, f"{size:,} bytes", f"{bench}/{n}.json", size)
        for bench, url, files in (
            ("sugarcrepe", SUGARCREPE_URL, SUGARCREPE_FILES),
            ("sugarcrepe++", SCPP_URL, SCPP_FILES),
        )
        for n, (digest, size) in files.items()
    },
    # COCO's own zips: cocodataset.org lists val2017 as "5K images, 1GB" and val2014 as "40K images, 6GB";
    # no digest is published with them, nor with BLIP's Karpathy split: trusted on first use.
    "coco/val2017.zip": Remote(
        "http://images.cocodataset.org/zips/val2017.zip", None, "1 GB (official)", "coco/val2017.zip", 2 << 30
    ),
    "coco/val2014.zip": Remote(
        "http://images.cocodataset.org/zips/val2014.zip", None, "6 GB (official)", "coco/val2014.zip", 12 << 30
    ),
    # The Karpathy test split as released with BLIP (github.com/salesforce/BLIP): a JSON list of
    # {image, caption: [...]}, image paths under COCO's val2014/. (Flickr30k's images need a request form.)
    "coco/coco_karpathy_test.json": Remote(
        BLIP_URL + "coco_karpathy_test.json",
        None,
        "about 2 MB (estimate)",
        "coco/coco_karpathy_test.json",
        64 << 20,
    ),
}
FILES = WEIGHTS | TOKENIZERS | BENCHMARK_FILES

CACHE_ENV = "C2LIP_CACHE"
FETCHED: dict[str, str] = {}  # path -> name of every file fetch() returned in this process (see refetch_hint)


def cache_dir(folder: str | None = None) -> str:
    """--cache-dir, else $C2LIP_CACHE, else the per-user cache: $XDG_CACHE_HOME/c2lip or ~/.cache/c2lip."""
    if folder or os.environ.get(CACHE_ENV):
        return os.path.expanduser(folder or os.environ[CACHE_ENV])
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "c2lip")


def cache_path(name: str, folder: str | None = None) -> str:
    """Where `name` lives in the cache: its entry's path (openai/ViT-B-16.pt), else the full name as a folder
    with the URL's file name in it (timm/ViT-B-16-SigLIP/open_clip_model.safetensors)."""
    remote = FILES[name]
    relative = remote.path or f"{name}/{os.path.basename(remote.url)}"
    return os.path.join(cache_dir(folder), *relative.split("/"))


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
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as err:
        raise DownloadError(
            f"cannot write to the cache folder {os.path.dirname(path)} ({err.strerror}) to fetch "
            f"{os.path.basename(path)}: pass --cache-dir DIR (or set ${CACHE_ENV}) to a folder you can write"
        ) from None
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def fetch(name: str, folder: str | None = None) -> str:
    """The path of the named file (a key of FILES) in the cache, downloaded and checked first if it is not there.
    A cached file is checked against its digest (pinned, or recorded on first use) and no request is made.
    Raises DownloadError with one line: offline, an HTTP error, an incomplete transfer, a digest mismatch."""
    remote, path = FILES[name], cache_path(name, folder)
    fetched = False
    if not os.path.exists(path):
        with file_lock(path):
            if fetched := not os.path.exists(path):  # not fetched by another process while this one waited
                get(remote, path)
    if not fetched:  # a fresh download was checked on its way in
        verify(path, remote)
    FETCHED[os.path.abspath(path)] = name
    return path


def get(remote: Remote, path: str) -> None:
    """Download, check and record: the .part gets the file's name only after all three."""
    part = path + ".part"
    download(remote.url, part, path, pinned=remote.sha256 is not None, most=remote.most)
    digest = sha256_of(part)
    if remote.sha256 and digest != remote.sha256:
        discard(part)  # a wrong file is not worth resuming
        raise DownloadError(
            f"{remote.url} downloaded with SHA-256 {digest}, expected {remote.sha256}: refused and deleted "
            "(a changed or corrupted release, or a proxy's error page); try again, or place the right file "
            f"at {path} by hand"
        )
    try:
        write_record(path, digest, part)  # before the rename: a file under its real name always has its record
        os.replace(part, path)
    except OSError as err:  # a disk that the download filled to the last byte
        raise DownloadError(f"{path} could not be recorded ({err.strerror}): free some space and run again") from None
    discard(part)


def read_record(path: str) -> tuple[str, tuple[int, int] | None] | None:
    """(digest, (size, mtime_ns) or None) recorded beside a file; None if there is no record. A record of an
    older version of this code, or of sha256sum, has the digest alone."""
    try:
        with open(path + ".sha256") as f:
            lines = f.read().splitlines()
        recorded = os.stat(path + ".sha256").st_mtime_ns
    except OSError:
        return None
    digest = lines[0].split()[0] if lines and lines[0].split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        return None
    stat = re.fullmatch(r"size (\d+) mtime_ns (\d+)", lines[1]) if len(lines) > 1 else None
    # A file changed within the clock tick in which its record was written keeps the recorded mtime (the
    # "racy" case of git's index): its size and mtime vouch for it only if it is older than its record.
    vouch = (int(stat[1]), int(stat[2])) if stat and int(stat[2]) < recorded else None
    return digest, vouch


def write_record(path: str, digest: str, source: str | None = None) -> None:
    """<path>.sha256: the digest, sha256sum's way, then the size and mtime of `source` (default: the file)."""
    st = os.stat(source or path)
    with atomic_write(path + ".sha256") as f:
        f.write(f"{digest}  {os.path.basename(path)}\nsize {st.st_size} mtime_ns {st.st_mtime_ns}\n")


def verify(path: str, remote: Remote) -> None:
    """A cached file against its pinned digest, else the one recorded when it was first fetched (a file placed
    by hand with no record is trusted now). Hashed only if its size or mtime changed since its record."""
    record = read_record(path)
    expected = remote.sha256 or (record[0] if record else None)
    st = os.stat(path)
    if record and record[0] == expected and record[1] == (st.st_size, st.st_mtime_ns):
        return
    digest = sha256_of(path)
    if expected is not None and digest != expected:
        raise DownloadError(
            f"{path} has SHA-256 {digest}, expected {expected} (changed on disk?): delete it to download "
            f"{remote.url} again"
        )
    with contextlib.suppress(OSError):  # a read-only cache: checked, and hashed again next time
        write_record(path, digest)


def refetch_hint(path: str) -> str:
    """For a reader's error about a file fetch() returned: '; <it> is ... delete it to download it again'."""
    name = FETCHED.get(os.path.abspath(path))
    return f"; {path} is the cached download of {name}: delete it to download it again" if name else ""


def fetch_zip(name: str, folder: str | None = None) -> str:
    """The folder a named zip is extracted into, a folder of its own beside it (coco/val2017.unzipped/ holds
    val2017/), fetched and extracted once. The members go to a temporary folder that is renamed into place
    when all are out: the folder exists only whole. Once it does, the zip is neither needed nor read."""
    path = cache_path(name, folder)
    root = os.path.splitext(path)[0] + ".unzipped"
    if os.path.isdir(root):
        return root
    fetch(name, folder)
    with file_lock(path):
        if os.path.isdir(root):
            return root
        tmp = path + ".extracting"
        shutil.rmtree(tmp, ignore_errors=True)  # what an unfinished extraction left
        try:
            with zipfile.ZipFile(path) as z:
                for member in tqdm(z.infolist(), desc=f"extracting {os.path.basename(path)}", unit="file"):
                    z.extract(member, tmp)  # zipfile drops absolute paths and ".." from member names
        except (zipfile.BadZipFile, OSError) as err:
            raise DownloadError(f"{path} could not be extracted ({err}); delete it to download it again") from None
        os.replace(tmp, root)
    return root


def resolve_weights(name_or_path: str, folder: str | None = None) -> str:
    """--init / --ckpt: a file path as given (an existing file wins over a name), else a name of WEIGHTS
    fetched into the cache."""
    if name_or_path in WEIGHTS and not os.path.exists(name_or_path):
        return fetch(name_or_path, folder)
    return name_or_path
