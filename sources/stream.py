"""The training stream of tar shards: `train.py --data cc3m` reads one epoch after another of it.

  WebDataset   one pass over the shards = one epoch of samples {"image", "caption", "phrases"}
  endless      epoch after epoch of batches, each epoch's shuffles seeded by (seed, epoch)

Every sample that cannot be used is skipped and counted by reason (SKIP_REASONS), never fatal: a missing or
corrupt image, an empty or non-UTF-8 caption, a caption NLTK fails to cut into phrases (concepts.ConceptError),
a shard that cannot be read to its end (cut mid-member or at a member header), a member name given twice or a
GNU sparse member (sources/shards.py `shard_groups`), an image of more than data.MAX_PIXELS pixels, a member or
an image whose reading or decoding raised MemoryError. A sample kept but not as it came is counted too
(NOTED_REASONS): a caption cut to concepts.MAX_CAPTION_CHARS before its phrases were taken, phrases in a
--concepts file computed from another caption (its digest differs), extracted afresh instead, phrases cut to
MAX_PHRASES.

Dimension legend: C=3 channels, S image side.
"""

import hashlib
import multiprocessing
import os
import random
import tarfile

import torch

from concepts import MAX_CAPTION_CHARS, ConceptError, extract_concepts
from data import TooManyPixels, load_image
from sources.concepts_file import caption_digest, concepts_index, shard_concepts
from sources.shards import IMAGE_EXTS, sample_caption, sample_meta, shard_groups

SKIP_REASONS = (
    "missing_image",
    "empty_caption",
    "corrupt_image",
    "corrupt_shard",
    "bad_encoding",
    "concepts_failed",
    "repeated_name",
    "sparse_member",
    "too_many_pixels",
    "out_of_memory",
)

NOTED_REASONS = ("caption_cut", "stale_concepts", "phrases_cut")  # samples kept, but not as they came

# Phrases kept of one sample, its first ones: six times the most a shapes-world caption names (5, --world dense). A
# <key>.json naming 1,000,000 made Collate tokenize them all, and the batch's K with them. Cut, not skipped: the
# image and caption are good and, as for a caption over MAX_CAPTION_CHARS, the phrases of the caption's start
# are kept; counted as phrases_cut.
MAX_PHRASES = 32


def reader_index(rank: int = 0, ranks: int = 1) -> tuple[int, int]:
    """(this reader, number of readers): every DataLoader worker of every one of `ranks` processes is a reader."""
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
    """One pass over tar shards = one epoch of samples {'image': (C, S, S), 'caption', 'phrases'}, the dicts
    Collate reads.

    Readers (DataLoader workers x distributed ranks) take every n-th shard of a per-epoch shuffle of the
    shards, or, when there are fewer shards than readers, every n-th sample. Samples pass a shuffle buffer
    of raw bytes (decoding after the buffer keeps it small), then are decoded: caption from <key>.txt or
    the JSON field caption_key; concept phrases from the JSON field concept_key when the sample has it, else
    from a file written by `python -m sources.precompute --out FILE` when the file's digest of the caption is
    this caption's (`caption_digest`), else extracted here (concepts.py).

    A sample of SKIP_REASONS (a missing or corrupt image, an empty caption, a caption NLTK fails on, an
    unreadable shard, ...) is skipped and counted, never fatal; .noted counts the samples kept but changed
    (NOTED_REASONS). The counts live in shared memory that DataLoader workers inherit, so .skipped, read in the
    main process, holds every reader's counts (since this object was made: each pass counts its bad samples
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
        rank: int = 0,
        ranks: int = 1,
    ):
        self.shards, self.transform, self.caption_key, self.concept_key = shards, transform, caption_key, concept_key
        self.concepts_file, self.shuffle_buffer, self.seed, self.epoch = concepts_file, shuffle_buffer, seed, 0
        self.rank, self.ranks = rank, ranks  # this process among torchrun's (it reads its own shards)
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

    def summary(self) -> str:
        """What was skipped or changed so far, for the end of a run ('' if nothing)."""
        lines = [
            f"samples {what} (each pass counts them again): {n}"
            for what, n in (("skipped", self.skipped), ("kept but changed", self.noted))
            if n
        ]
        return "\n".join(lines)

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
        if group.problem:  # a name twice, a sparse member, a MemoryError (sources/shards.py)
            return self._skip(group.problem)
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
        except TooManyPixels:
            return self._skip("too_many_pixels")
        except OSError:  # data.load_image's way of saying "corrupt"
            return self._skip("corrupt_image")
        named = meta.get(self.concept_key) if self.concept_key else None
        if isinstance(named, list) and all(isinstance(p, str) for p in named):
            phrases = named  # the authors' shards: 'nounphrases' (an empty list: Collate uses the caption)
        elif precomputed is not None and precomputed[1] == caption_digest(caption):
            phrases = precomputed[0]
        else:
            # Phrases of another caption (a file for other data, or another --caption-key) are not trained on:
            # extracted afresh, as for a sample the file lacks, and counted; the sample itself is good.
            if precomputed is not None:
                self._note("stale_concepts")
            try:  # nltk.redos's limit is wall clock: on a loaded machine even a short caption can run past it
                phrases = extract_concepts(caption)
            except ConceptError:
                return self._skip("concepts_failed")
            if len(caption) > MAX_CAPTION_CHARS:
                self._note("caption_cut")
        if len(phrases) > MAX_PHRASES:
            self._note("phrases_cut")
        return {"image": image, "caption": caption, "phrases": list(phrases[:MAX_PHRASES])}

    def __iter__(self):
        reader, readers = reader_index(self.rank, self.ranks)
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)  # the same permutation in every reader
        if len(order) >= readers:
            groups = self._groups(order[reader::readers], 1, 0)
        else:
            groups = self._groups(order, readers, reader)
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{reader}")
        for key, group, precomputed in shuffled(groups, self.shuffle_buffer, rng):
            try:
                sample = self._sample(key, group, precomputed)
            except MemoryError:  # decoding its image, or parsing its JSON, needed more than the process could get
                sample = self._skip("out_of_memory")
            if sample is not None:
                yield sample


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
