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
  precompute            the concept phrases of every shard, in a process pool, resumable:

  python webdata.py --data-dir /data/cc3m --out /data/cc3m-concepts.jsonl --workers 16   # Ctrl-C, rerun to resume

The precompute writes one JSON line per shard, {"shard": "00000.tar", "caption_key": null, "count": n,
"concepts": {"<sample key>": ["a dog", ...], ...}}; `train.py --concepts FILE` reads it. Shards are known by
file name, so one file serves one shard set.
"""

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import posixpath
import random
import re
import signal
import sys
import tarfile
import time
from collections import Counter

import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import read_json, write_json
from concepts import extract_concepts
from data import WordTokenizer, load_image
from devices import rank_and_world

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the first one present is the sample's image
SKIP_REASONS = ("missing_image", "empty_caption", "corrupt_image", "corrupt_shard")
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
        if key is not None:
            yield key, group


def sample_meta(group: dict) -> dict:
    """The sample's <key>.json as a dict ({} if absent or unreadable)."""
    try:
        meta = json.loads(group["json"]) if group.get("json") else {}
    except ValueError:  # also UnicodeDecodeError
        return {}
    return meta if isinstance(meta, dict) else {}


def sample_caption(group: dict, meta: dict, caption_key: str | None) -> str:
    """The named JSON field if caption_key is given, else <key>.txt (else the JSON's 'caption'); '' if none."""
    if caption_key:
        text = meta.get(caption_key)
    elif group.get("txt") is not None:
        text = group["txt"].decode("utf-8", errors="replace")
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
    in cache/c2lip-words-<hash of the shard list and caption key>.json."""
    digest = hashlib.sha1(json.dumps([sorted(map(os.path.abspath, shards)), caption_key]).encode()).hexdigest()[:12]
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
    from a file written by `python webdata.py --data-dir ... --out FILE`, else extracted here (concepts.py).

    A missing image, an empty caption, a corrupt image or an unreadable shard is skipped and counted, never
    fatal. The counts live in shared memory that DataLoader workers inherit, so .skipped, read in the main
    process, holds every reader's counts (since this object was made: each pass counts its bad samples
    again). Set .epoch before each pass: it seeds the shuffles.
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

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: samples skipped so far} over all readers of this process's DataLoaders."""
        return {reason: n for reason, n in zip(SKIP_REASONS, self._skips[:]) if n}

    def _skip(self, reason: str) -> None:
        with self._skips.get_lock():
            self._skips[SKIP_REASONS.index(reason)] += 1

    def _groups(self, shards: list[str], stride: int, offset: int):
        """(key, raw group, precomputed phrases or None) of every stride-th sample of the shards."""
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

    def _sample(self, key: str, group: dict, phrases: list[str] | None) -> dict | None:
        image_ext = next((e for e in IMAGE_EXTS if e in group), None)
        if image_ext is None:
            return self._skip("missing_image")
        meta = sample_meta(group)
        caption = sample_caption(group, meta, self.caption_key)
        if not caption:
            return self._skip("empty_caption")
        try:
            image = self.transform(load_image(group[image_ext]))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's ways of saying "corrupt"
            return self._skip("corrupt_image")
        named = meta.get(self.concept_key) if self.concept_key else None
        if isinstance(named, list) and all(isinstance(p, str) for p in named):
            concepts = named  # the authors' shards: 'nounphrases' (an empty list: Collate uses the caption)
        else:
            concepts = phrases if phrases is not None else extract_concepts(caption)
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
        for key, group, phrases in shuffled(groups, self.shuffle_buffer, rng):
            sample = self._sample(key, group, phrases)
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


def shard_concepts(path: str, offset: int) -> dict[str, list[str]]:
    """{sample key: phrases} of the shard whose line starts at `offset` (see concepts_index)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline())["concepts"]


def _shard_job(job: tuple[str, str | None]) -> tuple[str, dict[str, list[str]]]:
    """One shard's {key: phrases}; runs in a pool process."""
    shard, caption_key = job
    return os.path.basename(shard), {key: extract_concepts(c) for key, c in shard_captions(shard, caption_key)}


def precompute(shards: list[str], out: str, workers: int, caption_key: str | None = None) -> float:
    """Append the concepts of every shard not yet in `out`; returns captions per second."""
    done = concepts_index(out) if os.path.exists(out) else {}
    if os.path.exists(out):  # cut a line torn by an interruption, so that appending starts clean
        os.truncate(out, max((o + n for o, n in done.values()), default=0))
    todo = [(s, caption_key) for s in shards if os.path.basename(s) not in done]
    print(
        f"{out}: {len(shards) - len(todo)} of {len(shards)} shards already done, {len(todo)} to do, {workers} processes"
    )
    # Ctrl-C reaches every process of the group: the pool ignores it, this process stops the pool.
    pool = (
        multiprocessing.Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if workers > 0 and todo else None
    )
    captions, t0 = 0, time.time()
    try:
        with open(out, "a") as f, tqdm(total=len(todo), desc="concepts", unit="shard") as bar:
            for name, table in pool.imap_unordered(_shard_job, todo) if pool else map(_shard_job, todo):
                f.write(
                    json.dumps({"shard": name, "caption_key": caption_key, "count": len(table), "concepts": table})
                    + "\n"
                )
                f.flush()  # a finished shard survives an interruption
                captions += len(table)
                bar.update()
                bar.set_postfix(captions_per_s=f"{captions / (time.time() - t0):.0f}")
    finally:
        if pool:
            pool.terminate()
    rate = captions / max(time.time() - t0, 1e-9)
    if todo:
        print(f"{captions} captions in {time.time() - t0:.1f}s: {rate:.0f} captions/s")
    return rate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the tar shards: a folder, a glob or a brace range")
    parser.add_argument(
        "--out", required=True, help="the JSON-lines file to write; shards already in it are skipped (resume)"
    )
    parser.add_argument(
        "--caption-key", default=None, help="read captions from this <key>.json field, as train.py does"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (0: all in this process)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    try:
        shards = expand_shards(args.data_dir)
    except FileNotFoundError as err:
        parser.error(f"--data-dir: {err}")
    try:
        return precompute(shards, args.out, args.workers, args.caption_key)
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the shards finished so far are in {args.out}; run the same command to resume")


if __name__ == "__main__":
    main()
