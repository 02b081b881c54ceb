"""The training stream train.py reads: the word vocabulary of a run from scratch, and its micro-batches, from the
shapes world or from tar shards.

  word_tokenizer     a word vocabulary of the training captions (the --vocab-size most frequent, for shards)
  training_batches   (the dataset, its micro-batches from a step on); --batch-size per rank, each rank reading
                     its own scenes or shards, and the batches made in DataLoader workers (data.Collate)
  check_tagger       NLTK's tagger found (or downloaded) before any worker starts, else one line
  one_line_errors    an exception in a worker stops the run in one line, not a traceback

Resuming replays the batches an uninterrupted run would have seen: at any step in the shapes world (a scene
is a pure function of its index), at an epoch boundary for shards (sources/stream.py says why).
"""

import itertools
import re
import sys

import torch

from concepts import tagger
from data import WordTokenizer, train_transform
from run.resume import ignore_signals
from sources.shapes import HOLDOUT_COMBOS, WORLDS, ShapesDataset, ShapesWorld, StepBatches
from sources.shards import caption_word_counts
from sources.stream import WebDataset, endless


def shapes_world(args, image_size: int) -> ShapesWorld:
    """The world of train.py's flags (--world, --holdout-combos) at this image size."""
    return ShapesWorld(image_size, holdout=HOLDOUT_COMBOS if args.holdout_combos else (), **WORLDS[args.world])


def word_tokenizer(args, context_length: int, plan) -> WordTokenizer:
    """From scratch: a word vocabulary of the training captions (the most frequent --vocab-size for shards)."""
    if args.data == "shapes":  # a few thousand captions hold every word of this small world
        world = shapes_world(args, 0)
        captions = (world.caption(world.scene(args.seed, "train", i)) for i in range(2000))
        return WordTokenizer.build(captions, context_length)
    counts = caption_word_counts(plan.paths, args.caption_key, plan.cache)  # counted once, cached
    return WordTokenizer.from_counts(counts, context_length, max_size=args.vocab_size)


def training_batches(args, size: int, normalise: str, collate, start: int, rank: int, world_size: int, plan, device):
    """(the dataset, an iterable of micro-batches from step `start` on, --accum-freq K per step) of `size`-pixel
    images normalised as `normalise` says, made by `collate` in --workers DataLoader processes."""
    check_tagger(args)
    K = args.accum_freq
    # page-locked batches make the copy to the GPU asynchronous (non_blocking); workers leave signals to us
    loading = dict(collate_fn=collate, num_workers=args.workers, pin_memory=device.type == "cuda")
    loading |= dict(worker_init_fn=ignore_signals)
    if args.data == "shapes":  # fresh scenes, resumable at any step: step s reads micro-batches sK ... sK + K - 1
        scenes = args.steps * K * args.batch_size * world_size
        dataset = ShapesDataset(shapes_world(args, size), args.seed, "train", scenes, normalise)
        sampler = StepBatches(args.batch_size, start * K, args.steps * K, rank, world_size)
        return dataset, OneLineErrors(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loading))
    # shards: an epoch is steps_per_epoch steps of K micro-batches each (sources/shards.shard_plan)
    transform, files = train_transform(size, normalise), (args.caption_key, args.concept_key, args.concepts)
    dataset = WebDataset(plan.paths, transform, *files, args.shuffle_buffer, args.seed, rank, world_size)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, **loading)
    return dataset, one_line_errors(endless(loader, dataset, first_epoch=start // plan.steps_per_epoch))


def check_tagger(args) -> None:
    """NLTK's tagger, found or downloaded here in the main process before any worker starts: if it is missing,
    the run stops in one line. Every shapes scene is cut into phrases, whatever the --method; shards need it
    unless their phrases come with them (--concept-key, --concepts) and the method is not negclip (whose hard
    negatives tag every caption). A sample lacking its phrases then needs it: see one_line_errors."""
    if args.data == "cc3m" and (args.concept_key or args.concepts) and args.method != "negclip":
        return
    try:
        tagger()
    except RuntimeError as err:
        sys.exit("error: " + " ".join(str(err).split()))


# torch re-raises a worker's exception in the main process with the worker's traceback as its message
WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process (\d+)\.\nOriginal Traceback")


class OneLineErrors:
    """A DataLoader whose iterator is `one_line_errors` of its own (started at iter(), as the DataLoader's is)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return one_line_errors(iter(self.loader))


def one_line_errors(batches):
    """The batches of `batches`; an exception raised in a DataLoader worker stops the run in one line, its
    last line (the exception) without the traceback above it. Other exceptions go on up."""
    batches = iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:
            found = WORKER_ERROR.match(str(err))
            if found is None:
                raise
            lines = str(err).rstrip().splitlines()  # the traceback's frames are indented, the exception is not
            exception = " ".join(reversed(list(itertools.takewhile(lambda s: not s[:1].isspace(), lines[::-1]))))
            # a new line first: the progress bar's line has none yet (as for Stop.exit)
            sys.exit(f"\nerror: DataLoader worker {found[1]}: {exception} (--workers 0 shows the traceback)")
        yield batch
