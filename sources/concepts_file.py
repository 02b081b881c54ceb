"""A file of concept phrases computed once (`python -m sources.precompute`), read and checked against the shards.

One JSON line per shard (sources/precompute.py writes it, its docstring gives the format). Shard names and
sample keys repeat across datasets (img2dataset's 00000.tar, 000000000, ...), so every line records the
caption key it read and a digest of every caption: `check_concepts_file` refuses, at start-up, a file of
other captions, and the stream re-extracts the phrases of a sample whose caption digest differs.
"""

import hashlib
import itertools
import json
import os
import re
import tarfile

from sources.shards import shard_captions


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
    is not a record of sources/precompute.py. A line torn by an interrupted precompute (no final newline) ends
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
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: nested too deep
                ok = False
            if not ok:
                raise ValueError(f"{path}, line {number}: not a record of sources/precompute.py (shard, concepts)")
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
                f"{path}, line {number} ({name}) has no caption digests (an older precompute wrote it), "
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
