"""Image-text tar shards (CC3M, or any webdataset) read with the standard library: what a run needs to know
of them before its first step.

Paper map (docs/paper.md, "The paper's training recipe"): the paper trains on CC3M with DreamLIP's short
LLaVA captions (`--caption-key shortLLA_captions`) and, in the authors' packed shards, noun phrases in each
sample's JSON (`--concept-key nounphrases`). Shards are plain tar files read with tarfile (no `webdataset`
package): members grouped by key, <key>.jpg|jpeg|png|webp, <key>.txt, optional <key>.json.

  expand_shards         a folder, a glob or a brace range -> the shard paths
  shard_groups          the samples of a shard, member by member (a tar cut short is an error, not an end; a
                        name given twice or a sparse member marks its sample unusable, unread)
  shard_captions        (key, caption) of every usable sample, images not read
  shard_sizes           samples per shard (img2dataset's _stats.json, sizes.json, or counted and cached)
  caption_word_counts   the word vocabulary of a from-scratch run, counted once and cached
  shard_plan            the shards, their cache folder, and the steps of an epoch at a global batch

The stream itself is sources/stream.py; a file of precomputed phrases, sources/concepts_file.py.
"""

import glob
import hashlib
import json
import math
import os
import posixpath
import re
import tarfile
from collections import Counter
from typing import NamedTuple

from tqdm import tqdm

from data import WordTokenizer
from released.disk import read_json, write_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the first one present is the sample's image

SHARD_LAYOUT = """Expected webdataset tar shards: a folder of *.tar files, a glob ('DIR/*.tar') or a brace range
('DIR/{00000..00331}.tar'). Each shard holds samples as members named <key>.<ext>: <key>.jpg (or .jpeg, .png,
.webp) with <key>.txt (the caption) and optionally <key>.json (metadata, or the caption and concept fields that
--caption-key / --concept-key name); img2dataset also writes <shard>_stats.json beside each shard.
CC3M: download it with img2dataset (github.com/rom1504/img2dataset, its cc3m example, --output_format webdataset)
from Google's Conceptual Captions TSV (ai.google.com/research/ConceptualCaptions/download), or fetch a re-hosted
copy packed as cc3m-train-0000.tar ... cc3m-train-0575.tar (for example pixparse/cc3m-wds on the Hugging Face hub)."""


def expand_braces(spec: str) -> list[str]:
    """'a{00..02}b{x,y}' -> ['a00bx', 'a00by', 'a01bx', ...]: shell-style brace ranges (zero-padded like the
    first bound) and lists, as webdataset shard specs use them."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    items = (
        [str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
        if r
        else m.group(1).split(",")
    )
    return [out for item in items for out in expand_braces(spec[: m.start()] + item + spec[m.end() :])]


def expand_shards(spec: str) -> list[str]:
    """A folder, a glob or a brace range -> the existing shard paths, sorted (a brace range may have gaps:
    img2dataset leaves out shards whose downloads all failed). FileNotFoundError naming the layout if none."""
    if os.path.isdir(spec):
        paths = glob.glob(os.path.join(spec, "*.tar"))
    else:
        paths = [
            p for s in expand_braces(spec) for p in (glob.glob(s) if glob.has_magic(s) else [s]) if os.path.isfile(p)
        ]
    if not paths:
        raise FileNotFoundError(f"no tar shards at {spec!r}.\n{SHARD_LAYOUT}")
    return sorted(set(paths))


class Sample(dict):
    """{extension: bytes, or None where not read} of one sample; .problem: why it cannot be used (one of
    sources/stream.py's SKIP_REASONS), or None."""

    problem: str | None = None


def shard_groups(path: str, read=None):
    """Yield (key, Sample {extension: bytes}) for each sample of a tar shard, in order. Members sharing a key
    (the member's path up to the first dot of its file name) are consecutive in a webdataset shard.
    Extensions outside `read` (None: all) appear with the value None: present but not read, so that passes
    over the captions only seek past the images.

    A member is read only if the file holds it: a member claiming bytes past the end of the file is a shard
    cut short (tarfile.ReadError, before anything is read). A sample comes with .problem set, the rest of it
    unread, when a member of it is GNU sparse ('sparse_member': its holes are zeros the file does not hold,
    so a 10 KB member can declare 3 GiB; webdataset writers never make one), when a name repeats
    ('repeated_name': an extension twice in a sample, or a key that came before in the shard; tar keeps
    both copies and a reader would silently take one), or when reading a member raised MemoryError
    ('out_of_memory')."""
    size = os.path.getsize(path)
    with tarfile.open(path) as tar:
        key, group, seen = None, Sample(), set()
        for member in tar:
            folder, name = posixpath.split(member.name)
            stem, dot, ext = name.partition(".")
            if not member.isfile() or not dot:
                continue
            if posixpath.join(folder, stem) != key:
                if key is not None:
                    yield key, group
                key, group = posixpath.join(folder, stem), Sample()
                group.problem = "repeated_name" if key in seen else None
                seen.add(key)
            ext = ext.lower()
            if not member.issparse() and member.offset_data + member.size > size:
                raise tarfile.ReadError(f"{path}: {member.name} claims {member.size} bytes past the end of the file")
            if group.problem is None and (member.issparse() or ext in group):
                group.problem = "sparse_member" if member.issparse() else "repeated_name"
            group[ext] = None
            if group.problem is None and (read is None or ext in read):
                try:
                    group[ext] = tar.extractfile(member).read()
                except MemoryError:
                    group.problem = "out_of_memory"
        # tarfile ends quietly at a header cut short, as if the archive ended there; a whole archive ends with
        # two zero blocks (1,024 bytes) after its last member
        if size - tar.offset < 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"{path} ends inside a member header (a download cut short)")
        if key is not None:
            yield key, group


def sample_meta(group: dict) -> dict:
    """The sample's <key>.json as a dict ({} if absent or unreadable)."""
    try:
        meta = json.loads(group["json"]) if group.get("json") else {}
    except (ValueError, RecursionError):  # also UnicodeDecodeError; RecursionError: nested too deep
        return {}
    return meta if isinstance(meta, dict) else {}


def sample_caption(group: dict, meta: dict, caption_key: str | None) -> str | None:
    """The named JSON field if caption_key is given, else <key>.txt (else the JSON's 'caption'); '' if none,
    None if the .txt is not UTF-8 (training on U+FFFD replacement characters teaches nothing)."""
    if caption_key:
        text = meta.get(caption_key)
    elif group.get("txt") is not None:
        try:
            text = group["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None
    else:
        text = meta.get("caption")
    return text.strip() if isinstance(text, str) else ""


def shard_captions(path: str, caption_key: str | None = None):
    """Yield (key, caption) of the samples of a shard that have an image and a caption; images are not read."""
    for key, group in shard_groups(path, read={"txt", "json"}):
        if group.problem:
            continue
        caption = sample_caption(group, sample_meta(group), caption_key)
        if caption and any(e in group for e in IMAGE_EXTS):
            yield key, caption


def cache_dir(shards: list[str], fallback: str) -> str:
    """Where counts and vocabularies are cached: beside the shards if that folder is writable (every run on
    the data reuses them), else `fallback` (the run's output folder)."""
    folder = os.path.dirname(os.path.abspath(shards[0]))
    if os.access(folder, os.W_OK):
        return folder
    os.makedirs(fallback, exist_ok=True)
    return fallback


def read_dict(path: str) -> dict:
    """The JSON object in `path`, or {} if it is missing, unreadable or not an object."""
    found = read_json(path)
    return found if isinstance(found, dict) else {}


def is_count(x, shard: str) -> bool:
    """Whether x can be the number of samples of this shard: a whole number (not a bool, not Infinity), at
    most one per 512-byte tar header the file holds."""
    return type(x) is int and 0 <= x <= os.path.getsize(shard) // tarfile.BLOCKSIZE


def shard_sizes(shards: list[str], cache: str) -> list[int]:
    """Samples per shard, for the progress bar and the schedule: img2dataset's <shard>_stats.json
    ('successes'), else a sizes.json beside the shards ({"00000.tar": n, ...}), else counted once from the
    tar headers and cached in cache/c2lip-sizes.json. A value that cannot be a count (Infinity, a string, more
    samples than the file has headers) is passed over. Counts include samples that will later be skipped."""
    cache_path = os.path.join(cache, "c2lip-sizes.json")
    cached, sizes_json, sizes, todo = read_dict(cache_path), {}, {}, []
    for shard in shards:
        folder = os.path.dirname(shard)
        if folder not in sizes_json:
            sizes_json[folder] = read_dict(os.path.join(folder, "sizes.json"))
        entry = cached.get(os.path.abspath(shard))  # [file bytes, samples]: a rewritten shard is recounted
        fresh = isinstance(entry, list) and len(entry) == 2 and entry[0] == os.path.getsize(shard)
        found = [
            read_dict(os.path.splitext(shard)[0] + "_stats.json").get("successes"),
            sizes_json[folder].get(os.path.basename(shard)),
            entry[1] if fresh else None,
        ]
        n = next((n for n in found if is_count(n, shard)), None)
        if n is None:
            todo.append(shard)
        else:
            sizes[shard] = n
    for shard in tqdm(todo, desc="counting samples", unit="shard", disable=not todo):
        try:
            sizes[shard] = sum(any(e in g for e in IMAGE_EXTS) for _, g in shard_groups(shard, read=()))
        except (tarfile.TarError, OSError):
            sizes[shard] = 0  # unreadable: the reader will skip it and count it
        cached[os.path.abspath(shard)] = [os.path.getsize(shard), sizes[shard]]
    if todo:
        write_json(cache_path, cached)
    return [sizes[s] for s in shards]


def caption_word_counts(shards: list[str], caption_key: str | None, cache: str) -> Counter:
    """Word counts of every training caption (WordTokenizer.split), streamed over the shards once and cached
    in cache/c2lip-words-<hash>.json, the hash of the shards (path, size, modification time) and the caption
    key: a shard rewritten under the same name is counted again."""
    files = sorted((os.path.abspath(s), os.path.getsize(s), os.path.getmtime(s)) for s in shards)
    digest = hashlib.sha1(json.dumps([files, caption_key]).encode()).hexdigest()[:12]
    path = os.path.join(cache, f"c2lip-words-{digest}.json")
    cached = read_json(path)
    if cached:
        return Counter(cached["counts"])
    counts = Counter()
    for shard in tqdm(shards, desc="vocabulary", unit="shard"):
        try:
            for _, caption in shard_captions(shard, caption_key):
                counts.update(WordTokenizer.split(caption))
        except (tarfile.TarError, OSError):
            pass  # the reader skips and counts unreadable shards
    write_json(path, {"caption_key": caption_key, "shards": len(shards), "counts": counts})
    return counts


class ShardPlan(NamedTuple):
    paths: list[str]
    cache: str  # the folder of the cached sample counts and vocabulary
    steps_per_epoch: int
    samples: int

    def __str__(self) -> str:
        return f"{len(self.paths)} shards, {self.samples} samples: {self.steps_per_epoch} steps per epoch"


def shard_plan(spec: str, fallback_cache: str, global_batch: int) -> ShardPlan:
    """The shards of `spec`, where their counts are cached, and the steps of one epoch at this global batch."""
    shards = expand_shards(spec)
    cache = cache_dir(shards, fallback_cache)
    samples = sum(shard_sizes(shards, cache))
    steps_per_epoch = max(1, math.ceil(samples / global_batch))
    return ShardPlan(shards, cache, steps_per_epoch, samples)
