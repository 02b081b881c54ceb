"""Image-text tar shards (CC3M, or any webdataset): the stream train.py --data cc3m reads, and the
concept precompute.

Paper map ("Training setup" in docs/paper.md): the paper trains on CC3M with DreamLIP's short LLaVA
captions (`--caption-key shortLLA_captions`) and, in the authors' packed shards, noun phrases in each
sample's JSON (`--concept-key nounphrases`). Shards are plain tar files streamed with the standard
library's tarfile (no `webdataset` package): members grouped by key, <key>.jpg|jpeg|png|webp,
<key>.txt, optional <key>.json.

  WebDataset            one pass over the shards = one epoch of samples {"image", "caption", "concepts"}
  shard_sizes           samples per shard (img2dataset's _stats.json, sizes.json, or counted and cached)
  caption_word_counts   the word vocabulary of a from-scratch run, counted once and cached
  check_concepts_file   a file of phrases precomputed once (precompute_concepts.py) checked against the shards

Every sample that cannot be used is skipped and counted by reason (SKIP_REASONS), never fatal: a missing or
corrupt image, an empty or non-UTF-8 caption, a caption NLTK fails to cut into phrases (concepts.ConceptError),
a shard that cannot be read to its end (cut mid-member or at a member header). A sample kept but not as it
came is counted too (NOTED_REASONS): a caption cut to concepts.MAX_CAPTION_CHARS before its phrases were taken,
phrases in a --concepts file computed from another caption (its digest differs), extracted afresh instead.
"""

import glob
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import posixpath
import random
import re
import tarfile
from collections import Counter
from typing import NamedTuple

import torch
from tqdm import tqdm

from checkpoint import read_json, write_json
from concepts import MAX_CAPTION_CHARS, ConceptError, extract_concepts
from data import WordTokenizer, load_image
from devices import log0, rank_and_world

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the first one present is the sample's image
SKIP_REASONS = ("missing_image", "empty_caption", "corrupt_image", "corrupt_shard", "bad_encoding", "concepts_failed")
NOTED_REASONS = ("caption_cut", "stale_concepts")  # samples kept, but not as they came
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


def shard_groups(path: str, read=None):
    """Yield (key, {extension: bytes}) for each sample of a tar shard, in order. Members sharing a key (the
    member's path up to the first dot of its file name) are consecutive in a webdataset shard. Extensions
    outside `read` (None: all) appear with the value None: present but not read, so that passes over the
    captions only seek past the images."""
    with tarfile.open(path) as tar:
        key, group = None, {}
        for member in tar:
            folder, name = posixpath.split(member.name)
            stem, dot, ext = name.partition(".")
            if not member.isfile() or not dot:
                continue
            if posixpath.join(folder, stem) != key:
                if key is not None:
                    yield key, group
                key, group = posixpath.join(folder, stem), {}
            ext = ext.lower()
            group[ext] = tar.extractfile(member).read() if read is None or ext in read else None
        # tarfile ends quietly at a header cut short, as if the archive ended there; a whole archive ends with
        # two zero blocks (1,024 bytes) after its last member
        if os.path.getsize(path) - tar.offset < 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"{path} ends inside a member header (a download cut short)")
        if key is not None:
            yield key, group


def sample_meta(group: dict) -> dict:
    """The sample's <key>.json as a dict ({} if absent or unreadable)."""
    try:
        meta = json.loads(group["json"]) if group.get("json") else {}
    except ValueError:  # also UnicodeDecodeError
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


def shard_sizes(shards: list[str], cache: str) -> list[int]:
    """Samples per shard, for the progress bar and the schedule: img2dataset's <shard>_stats.json
    ('successes'), else a sizes.json beside the shards ({"00000.tar": n, ...}), else counted once from the
    tar headers and cached in cache/c2lip-sizes.json. Counts include samples that will later be skipped."""
    cache_path = os.path.join(cache, "c2lip-sizes.json")
    cached, sizes_json, sizes, todo = read_json(cache_path) or {}, {}, {}, []
    for shard in shards:
        stats = read_json(os.path.splitext(shard)[0] + "_stats.json") or {}
        folder = os.path.dirname(shard)
        if folder not in sizes_json:
            sizes_json[folder] = read_json(os.path.join(folder, "sizes.json")) or {}
        entry = cached.get(os.path.abspath(shard))  # [file bytes, samples]: a rewritten shard is recounted
        if isinstance(stats.get("successes"), int):
            sizes[shard] = stats["successes"]
        elif os.path.basename(shard) in sizes_json[folder]:
            sizes[shard] = int(sizes_json[folder][os.path.basename(shard)])
        elif entry and entry[0] == os.path.getsize(shard):
            sizes[shard] = entry[1]
        else:
            todo.append(shard)
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


def reader_index() -> tuple[int, int]:
    """(this reader, number of readers): every DataLoader worker of every distributed rank is a reader."""
    rank, ranks = rank_and_world()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, ranks * workers


def shuffled(items, size: int, rng: random.Random):
    """A shuffle buffer: hold `size` items and emit a random one each time a new one arrives, then the rest.
    Streaming data cannot be permuted as a whole; shards are shuffled too, so samples mix across shards."""
    buffer = []
    for item in items:
        if len(buffer) < max(size, 1):
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class WebDataset(torch.utils.data.IterableDataset):
    """One pass over tar shards = one epoch of samples {'image': (C, H, W), 'caption', 'concepts'}, the dicts
    Collate reads.

    Readers (DataLoader workers x distributed ranks) take every n-th shard of a per-epoch shuffle of the
    shards, or, when there are fewer shards than readers, every n-th sample. Samples pass a shuffle buffer
    of raw bytes (decoding after the buffer keeps it small), then are decoded: caption from <key>.txt or
    the JSON field caption_key; concept phrases from the JSON field concept_key when the sample has it, else
    from a file written by `python precompute_concepts.py --out FILE` when the file's digest of the caption is
    this caption's (`caption_digest`), else extracted here (concepts.py).

    A missing image, an empty caption, a corrupt image, a caption NLTK fails on or an unreadable shard is
    skipped and counted, never fatal; .noted counts the samples kept but changed (NOTED_REASONS). The counts
    live in shared memory that DataLoader workers inherit, so .skipped, read in the main process, holds every
    reader's counts (since this object was made: each pass counts its bad samples again). Set .epoch before
    each pass: it seeds the shuffles.
    """

    def __init__(
        self,
        shards: list[str],
        transform,
        caption_key: str | None = None,
        concept_key: str | None = None,
        concepts_file: str | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        self.shards, self.transform, self.caption_key, self.concept_key = shards, transform, caption_key, concept_key
        self.concepts_file, self.shuffle_buffer, self.seed, self.epoch = concepts_file, shuffle_buffer, seed, 0
        self.concepts_index = concepts_index(concepts_file) if concepts_file else {}
        self._skips = multiprocessing.Array("q", len(SKIP_REASONS))  # shared with the DataLoader workers
        self._notes = multiprocessing.Array("q", len(NOTED_REASONS))

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: samples skipped so far} over all readers of this process's DataLoaders."""
        return {reason: n for reason, n in zip(SKIP_REASONS, self._skips[:]) if n}

    @property
    def noted(self) -> dict[str, int]:
        """{reason: samples kept but changed so far}, like .skipped."""
        return {reason: n for reason, n in zip(NOTED_REASONS, self._notes[:]) if n}

    def _skip(self, reason: str) -> None:
        with self._skips.get_lock():
            self._skips[SKIP_REASONS.index(reason)] += 1

    def _note(self, reason: str) -> None:
        with self._notes.get_lock():
            self._notes[NOTED_REASONS.index(reason)] += 1

    def _groups(self, shards: list[str], stride: int, offset: int):
        """(key, raw group, (precomputed phrases, their caption's digest) or None) of every stride-th sample."""
        index = 0
        for shard in shards:
            name = os.path.basename(shard)
            table = (
                shard_concepts(self.concepts_file, self.concepts_index[name][0]) if name in self.concepts_index else {}
            )
            try:
                for key, group in shard_groups(shard):
                    index += 1
                    if (index - 1) % stride == offset:
                        yield key, group, table.get(key)
            except (tarfile.TarError, OSError):  # a truncated or unreadable shard: keep what was read of it
                self._skip("corrupt_shard")

    def _sample(self, key: str, group: dict, precomputed: tuple | None) -> dict | None:
        image_ext = next((e for e in IMAGE_EXTS if e in group), None)
        if image_ext is None:
            return self._skip("missing_image")
        meta = sample_meta(group)
        caption = sample_caption(group, meta, self.caption_key)
        if caption is None:
            return self._skip("bad_encoding")
        if not caption:
            return self._skip("empty_caption")
        # The augmentation draws from a generator seeded by (seed, epoch, sample): a pure function of the sample,
        # whichever reader or worker decodes it, so a run resumed at an epoch boundary sees exactly the pixels
        # an uninterrupted run would have seen.
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}:{key}".encode(), digest_size=8).digest()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(digest, "little") >> 1)
                image = self.transform(load_image(group[image_ext]))
        except OSError:  # data.load_image's way of saying "corrupt"
            return self._skip("corrupt_image")
        named = meta.get(self.concept_key) if self.concept_key else None
        if isinstance(named, list) and all(isinstance(p, str) for p in named):
            concepts = named  # the authors' shards: 'nounphrases' (an empty list: Collate uses the caption)
        elif precomputed is not None and precomputed[1] == caption_digest(caption):
            concepts = precomputed[0]
        else:
            # Phrases of another caption (a file for other data, or another --caption-key) are not trained on:
            # extracted afresh, as for a sample the file lacks, and counted; the sample itself is good.
            if precomputed is not None:
                self._note("stale_concepts")
            try:  # nltk.redos's limit is wall clock: on a loaded machine even a short caption can run past it
                concepts = extract_concepts(caption)
            except ConceptError:
                return self._skip("concepts_failed")
            if len(caption) > MAX_CAPTION_CHARS:
                self._note("caption_cut")
        return {"image": image, "caption": caption, "concepts": list(concepts)}

    def __iter__(self):
        reader, readers = reader_index()
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)  # the same permutation in every reader
        if len(order) >= readers:
            groups = self._groups(order[reader::readers], 1, 0)
        else:
            groups = self._groups(order, readers, reader)
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{reader}")
        for key, group, precomputed in shuffled(groups, self.shuffle_buffer, rng):
            sample = self._sample(key, group, precomputed)
            if sample is not None:
                yield sample


# ----------------------------------------------------------------------------- precomputed concepts


def concepts_index(path: str) -> dict[str, tuple[int, int]]:
    """{shard name: (byte offset, byte length) of its line} in a concepts file. A line torn by an
    interrupted run (no final newline) is left out; only the shard name of each line is parsed."""
    index, offset = {}, 0
    with open(path, "rb") as f:
        for line in f:
            m = re.match(rb'\{"shard": ("(?:[^"\\]|\\.)*")', line)
            if m and line.endswith(b"\n"):
                index[json.loads(m.group(1))] = (offset, len(line))
            offset += len(line)
    return index


CHECKED_SAMPLES = 4  # per shard at start-up: a tar's first members (images are seeked past), not a pass over the data


class OldConceptsFile(ValueError):
    """A concepts file written before its lines recorded the captions their phrases came from."""


def caption_digest(caption: str) -> str:
    """What a concepts file records of each caption: 8 bytes of its blake2b, as hex (16 characters)."""
    return hashlib.blake2b(caption.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def caption_source(caption_key: str | None) -> str:
    return f"the JSON field '{caption_key}'" if caption_key else "<key>.txt"


def concepts_lines(path: str):
    """Yield (line number, record) for each whole line of a concepts file; ValueError naming the first line that
    is not a record of precompute_concepts.py. A line torn by an interrupted precompute (no final newline) ends
    the file: that shard is simply not in it."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                record = json.loads(line)
                table, digests = record["concepts"], record.get("digests", {})
                ok = isinstance(record["shard"], str) and isinstance(table, dict) and isinstance(digests, dict)
                ok = ok and all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in table.values())
                ok = ok and all(isinstance(d, str) for d in digests.values())
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if not ok:
                raise ValueError(f"{path}, line {number}: not a record of precompute_concepts.py (shard, concepts)")
            yield number, record


def check_concepts_file(path: str, shards: list[str], caption_key: str | None = None) -> None:
    """ValueError naming the first thing wrong with a concepts file for these shards and this caption key: not a
    concepts file at all (empty, binary, another format), a malformed line (with its number), no line for any of
    the shards (another shard set), no caption digests (OldConceptsFile), a line computed from another caption
    key, or a line whose first CHECKED_SAMPLES sample keys and caption digests are not the shard's (another
    dataset under the same names). Reading every caption would be a pass over the data: the samples after
    those are checked as they are read (WebDataset counts a mismatch as stale_concepts)."""
    names, heads = {os.path.basename(s): s for s in shards}, {}
    for number, record in concepts_lines(path):
        digests = record.get("digests")
        head = None if digests is None else list(itertools.islice(digests.items(), CHECKED_SAMPLES))
        heads[record["shard"]] = (number, record.get("caption_key"), head)
    if not heads:
        raise ValueError(f"{path} holds no shard's concepts")
    if not heads.keys() & names:
        raise ValueError(f"{path} holds none of these {len(names)} shards (it was written for another shard set)")
    for name, (number, key, head) in heads.items():
        if head is None:
            raise OldConceptsFile(
                f"{path}, line {number} ({name}) has no caption digests (an older precompute_concepts.py wrote it), "
                "so its phrases cannot be checked against the shards' captions"
            )
        if key != caption_key:
            use = f"--caption-key {key}" if key else "no --caption-key"
            raise ValueError(
                f"{path}, line {number} ({name}) was computed from {caption_source(key)} (read it with {use}), "
                f"this run reads {caption_source(caption_key)}"
            )
    for name in sorted(heads.keys() & names):
        if mismatch := first_mismatch(names[name], caption_key, heads[name][2]):
            raise ValueError(
                f"{path} does not match the shards: {name}, {mismatch} (written for other data under the same names?)"
            )


def first_mismatch(shard: str, caption_key: str | None, head: list[tuple[str, str]]) -> str | None:
    """Where the shard's first samples differ from a line's first (sample key, caption digest) pairs, or None."""
    try:
        found = [(k, caption_digest(c)) for k, c in itertools.islice(shard_captions(shard, caption_key), len(head))]
    except (tarfile.TarError, OSError):
        return None  # an unreadable shard: the reader skips it and counts it
    for i, ((key, digest), (their_key, their_digest)) in enumerate(zip(head, found)):
        if key != their_key:
            return f"sample {i + 1}: key {key} in the file, {their_key} in the shard"
        if digest != their_digest:
            return f"sample {key}: caption digest {digest} in the file, {their_digest} in the shard"
    return None


def shard_concepts(path: str, offset: int) -> dict[str, tuple[list[str], str | None]]:
    """{sample key: (phrases, digest of the caption they came from)} of the shard whose line starts at
    `offset` (see concepts_index)."""
    with open(path, "rb") as f:
        f.seek(offset)
        record = json.loads(f.readline())
    digests = record.get("digests", {})
    return {key: (phrases, digests.get(key)) for key, phrases in record["concepts"].items()}


# ----------------------------------------------------------------------------- epochs of a training run


class ShardPlan(NamedTuple):
    paths: list[str]
    cache: str  # the folder of the cached sample counts and vocabulary
    steps_per_epoch: int


def shard_plan(spec: str, fallback_cache: str, global_batch: int) -> ShardPlan:
    """The shards of `spec`, where their counts are cached, and the steps of one epoch at this global batch."""
    shards = expand_shards(spec)
    cache = cache_dir(shards, fallback_cache)
    samples = sum(shard_sizes(shards, cache))
    steps_per_epoch = max(1, math.ceil(samples / global_batch))
    log0(f"{len(shards)} shards, {samples} samples: {steps_per_epoch} steps per epoch")
    return ShardPlan(shards, cache, steps_per_epoch)


def endless(loader, dataset: WebDataset, first_epoch: int):
    """Batches of epoch first_epoch, then of the next epochs, without end. Resuming is exact at an epoch
    boundary: the shard order, the shuffle buffers and every sample's augmentation are functions of (seed,
    epoch). A run resumed mid-epoch restarts the stream at the start of that epoch (a tar stream has no cheap
    way to seek to a sample), so the batches it saw of that epoch before the checkpoint come again, and as
    many batches of the last epoch are not reached by --steps."""
    epoch = first_epoch
    while True:
        dataset.epoch, empty = epoch, True  # seeds this pass's shard and sample shuffles
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(
                f"a pass over {len(dataset.shards)} shards gave no usable sample (skipped: "
                f"{dataset.skipped}); check the shards and --caption-key"
            )
        epoch += 1
