"""train.py's flags checked before anything runs: every wrong value is an argparse error naming its flag.

Not part of the paper. What is checked: numbers in range, flags that go together (--epochs with shards,
--init-scale with --init, the study's label and logit options with --method c2lip), the shards and a
--concepts file that fits them, a usable --device and --out, and --init naming a file or a release.
"""

import argparse
import itertools
import os
import shlex

from model import PRESETS
from released.download import WEIGHTS
from run.devices import device_problem
from run.resume import out_problem
from sources.concepts_file import OldConceptsFile, check_concepts_file
from sources.shards import SHARD_LAYOUT, expand_shards


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of train.py and eval.py: the docstring as written, and every flag's default that its help does not
    already say (a flag whose default is None or off has none to say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, steps: int) -> argparse.Namespace:
    """args, checked (p.error on the first problem), with --out and --steps given their defaults (`steps`)."""
    check_numbers(p, args)
    if args.data == "shapes" and args.epochs is not None:
        p.error("--epochs needs --data cc3m: the shapes world is an endless stream (use --steps)")
    if args.data != "shapes":
        check_shards(p, args)
    args.steps = args.steps or steps  # with --epochs, train() sets it from the number of samples
    if args.method != "c2lip" and (args.concept_labels != "owner" or args.concept_logits == "own"):
        p.error("--concept-labels phrase|scene and --concept-logits own only apply to --method c2lip")
    if args.init_scale is not None and (not args.init or not 0 < args.init_scale <= 100):
        p.error("--init-scale needs --init, and a value in (0, 100] (t is clamped at 100)")
    if args.method == "clip" and args.batch_size * int(os.environ.get("WORLD_SIZE", "1")) < 2:
        p.error("--method clip needs a global --batch-size of at least 2: with one image its softmax loss is 0")
    if args.init_bias != "auto":
        try:
            float(args.init_bias)
        except ValueError:
            p.error(f"--init-bias must be 'auto' or a number, not {args.init_bias!r}")
    check_init(p, args)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if message := device_problem(args.device):
        p.error(f"--device {args.device}: {message}")
    args.out = args.out or os.path.join("runs", args.method)
    if problem := out_problem(args.out):
        p.error(f"--out {args.out}: {problem}")
    return args


def check_numbers(p: argparse.ArgumentParser, args) -> None:
    """Every numeric flag within its range, or an argparse error naming it."""
    for name in ("steps", "batch_size", "accum_freq", "ckpt_every", "log_every", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.tau > 0:
        p.error("--tau must be positive")
    for name in ("lr", "logit_lr", "weight_decay", "grad_clip", "workers", "shuffle_buffer", "max_nonfinite"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    if not args.warmup >= 0:
        p.error("--warmup must be 0 or more: a fraction of --steps below 1, else a number of steps")
    if args.epochs is not None and (not args.epochs > 0 or args.steps is not None):
        p.error("--epochs must be positive, and goes without --steps")


def check_init(p: argparse.ArgumentParser, args) -> None:
    """--init names a file or a release; the flags that only apply to it are not given without it."""
    if (args.bpe or args.spm) and not args.init:
        p.error("--bpe and --spm only apply with --init (training from scratch uses the word tokenizer)")
    if PRESETS[args.model].text.pooling == "last" and not args.init:
        p.error(
            f"--model {args.model} is SigLIP's shape, for --init weights: its text is read at the last position "
            "of a full context, which the word tokenizer does not fill"
        )
    if args.init and not os.path.exists(args.init) and args.init not in WEIGHTS:
        names = ", ".join(WEIGHTS)
        p.error(
            f"--init {args.init}: no such file, and not one of the names {names}. SigLIP's release is "
            "open_clip_model.safetensors (see docs/pretrained.md)"
        )


def check_shards(p: argparse.ArgumentParser, args) -> None:
    """--data cc3m: the shards exist and a --concepts file fits them, or an argparse error naming the flag."""
    if args.holdout_combos or args.world != "simple":
        p.error("--holdout-combos and --world only apply to --data shapes")
    if args.concept_labels == "scene":
        p.error("--concept-labels scene needs --data shapes: only the synthetic world knows which images show a phrase")
    if args.data_dir is None:
        p.error(f"--data {args.data} needs --data-dir.\n{SHARD_LAYOUT}")
    try:
        shards = expand_shards(args.data_dir)
    except FileNotFoundError as err:
        p.error(f"--data-dir: {err}")
    if args.concepts and not os.path.isfile(args.concepts):
        p.error(f"--concepts: no file {args.concepts}; write it with: {precompute_command(args, args.concepts)}")
    if args.concepts:
        try:
            check_concepts_file(args.concepts, shards, args.caption_key)
        except OldConceptsFile as err:
            p.error(f"--concepts: {err}; rewrite it with: {precompute_command(args, args.concepts)} --overwrite")
        except ValueError as err:  # the file may be right for other shards: the command writes a new one
            root, ext = os.path.splitext(args.concepts)
            new = next(f"{root}-{i}{ext}" for i in itertools.count(2) if not os.path.exists(f"{root}-{i}{ext}"))
            p.error(f"--concepts: {err}; write one for these shards with: {precompute_command(args, new)}")


def precompute_command(args, out: str) -> str:
    """The command that writes a --concepts file for this run's shards and caption key."""
    command = f"python -m sources.precompute --data-dir {shlex.quote(args.data_dir)} --out {shlex.quote(out)}"
    return command + (f" --caption-key {shlex.quote(args.caption_key)}" if args.caption_key else "")
