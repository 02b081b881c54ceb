"""The training stream train.py reads: the word vocabulary of a run from scratch, and its micro-batches, from the
shapes world or from tar shards.

  word_tokenizer     a word vocabulary of the training captions (the --vocab-size most frequent, for shards)
  training_batches   (the dataset, its micro-batches from a step on); --batch-size per rank, each rank reading
                     its own scenes or shards, and the batches made in DataLoader workers (data.Collate)

Resuming replays the batches an uninterrupted run would have seen: at any step in the shapes world (a scene
is a pure function of its index), at an epoch boundary for shards (sources/stream.py says why).
"""

import torch

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
    K = args.accum_freq
    # page-locked batches make the copy to the GPU asynchronous (non_blocking); workers leave signals to us
    loading = dict(collate_fn=collate, num_workers=args.workers, pin_memory=device.type == "cuda")
    loading |= dict(worker_init_fn=ignore_signals)
    if args.data == "shapes":  # fresh scenes, resumable at any step: step s reads micro-batches sK ... sK + K - 1
        scenes = args.steps * K * args.batch_size * world_size
        dataset = ShapesDataset(shapes_world(args, size), args.seed, "train", scenes, normalise)
        sampler = StepBatches(args.batch_size, start * K, args.steps * K, rank, world_size)
        return dataset, torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loading)
    # shards: an epoch is steps_per_epoch steps of K micro-batches each (sources/shards.shard_plan)
    transform, files = train_transform(size, normalise), (args.caption_key, args.concept_key, args.concepts)
    dataset = WebDataset(plan.paths, transform, *files, args.shuffle_buffer, args.seed, rank, world_size)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, **loading)
    return dataset, endless(loader, dataset, first_epoch=start // plan.steps_per_epoch)
