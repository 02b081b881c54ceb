"""The training stream train.py reads: the word vocabulary of a run from scratch, and its micro-batches, from the
shapes world or from tar shards.

  word_tokenizer     a word vocabulary of the training captions (the --vocab-size most frequent, for shards)
  training_batches   (the dataset, its micro-batches from a step on); --batch-size per rank, each rank reading
                     its own scenes or shards, and the batches made in DataLoader workers (data.Collate)
  check_tagger       NLTK's tagger found (or downloaded) before any worker starts, else one line
  one_line_errors    an exception in a worker stops the run in one line, not a traceback
  ignore_signals     workers leave Ctrl-C and SIGTERM to the main process, but end when it exits

Resuming replays the batches an uninterrupted run would have seen: at any step in the shapes world (a scene
is a pure function of its index), at an epoch boundary for shards (sources/stream.py says why).
"""

import itertools
import multiprocessing
import os
import re
import signal
import sys
import threading

import torch

from concepts import tagger
from data import WordTokenizer, train_transform
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


def ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and a scheduler's SIGTERM to the main process, which stops cleanly, but
    obey a SIGTERM from the main process itself: Python's multiprocessing sends one to every worker as the main
    process exits and then waits for them, so a worker that ignored it would hang the exit of a run that failed.
    Only sigwaitinfo says who sent a signal: SIGTERM is blocked in the worker (a thread it starts later inherits
    the mask) and one thread waits for it. Where sigwaitinfo is missing (macOS, Windows) SIGTERM ends a worker
    whoever sends it, so a scheduler's SIGTERM to every process may stop a run without its clean save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.signal(signal.SIGTERM, lambda *_: None)  # not SIG_IGN: an ignored signal is dropped, never waited for
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = multiprocessing.parent_process().pid  # the main process, whichever start method made the worker
    threading.Thread(target=end_on_sigterm_from, args=(parent,), daemon=True).start()


def end_on_sigterm_from(parent: int) -> None:
    """In a worker: wait for a SIGTERM that `parent` sends, then end at once. The exit status is 0 because
    the main process asked for it (torch's SIGCHLD handler would raise on a worker killed by a signal)."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)
