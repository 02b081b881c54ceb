"""Continuing a run (train.py --resume) and stopping one cleanly: what a run does when it is interrupted.

  resume_state   the checkpoint to continue from, refusing a run with other flags, past its end, or one that
                 would be overwritten by accident (--overwrite)
  truncate_log   a resumed run replays the steps after its checkpoint: they are logged once, not twice
  Stop           Ctrl-C (SIGINT) or a scheduler's SIGTERM stops the loop after the current step; it saves and
                 prints the command that resumes (resume_command); under torchrun the ranks agree on the step
  skip_or_stop   a step whose loss or gradient is not finite is skipped, up to --max-nonfinite in a row

DataLoader workers leave those signals to the main process (sources/loader.py `ignore_signals`). Not part of
the paper. docs/failures.md lists what each case does, with its test.
"""

import contextlib
import errno
import json
import os
import shlex
import signal
import sys

import torch

from released.disk import atomic_write
from run.checkpoint import load_checkpoint, previous, previous_hint, read_log, saved_steps
from run.devices import log0

# Flags a resumed run may change; any other must equal the checkpoint's, or the run would silently become
# another experiment under the old name.
RESUMABLE_CHANGES = set(
    "steps epochs resume overwrite out workers device precision compile grad_checkpointing log_every ckpt_every "
    "max_nonfinite data_dir concepts init bpe clip_act cache_dir".split()
)


def resume_state(args, ckpt_path: str, log_path: str) -> dict | None:
    """The checkpoint to continue from (--resume), or None to start afresh. Refuses, in one line each, to
    overwrite a run by accident, to read a file that is not a checkpoint, and to continue a run with other
    flags or past its end. A folder with no checkpoint holds no run, whatever its log says (a run that failed
    before its first checkpoint leaves one): it starts afresh, its log replaced."""
    saved = [f for f in (ckpt_path, previous(ckpt_path)) if os.path.exists(f)]
    if not saved:
        if os.path.exists(log_path):
            if os.path.getsize(log_path):
                log0(f"{args.out} holds no checkpoint, so no run: its {os.path.basename(log_path)} is replaced")
            with contextlib.suppress(FileNotFoundError):  # under torchrun every rank removes it
                os.remove(log_path)
        if args.resume:
            log0(f"--resume: no checkpoint in {args.out} yet, starting from step 0")
        return None
    if not args.resume:
        if not args.overwrite:
            files = ", ".join(os.path.basename(f) for f in [*saved, log_path] if os.path.exists(f))
            sys.exit(f"error: {args.out} holds a run ({files}): --resume continues it, --overwrite replaces it")
        for f in [*saved, log_path]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
        return None
    path = saved[0]
    try:
        state = load_checkpoint(path)
    except ValueError as err:
        sys.exit(f"error: --resume: {err}{previous_hint(path, '--resume')}")
    changed = [k for k, v in state.get("args", {}).items() if k not in RESUMABLE_CHANGES and vars(args).get(k, v) != v]
    if changed:
        theirs = " ".join(f"--{k.replace('_', '-')} {state['args'][k]}" for k in changed)
        sys.exit(f"error: --resume: {path} was trained with {theirs}; resume with those, or use another --out")
    if state["step"] > args.steps:
        sys.exit(f"error: --resume: {path} is at step {state['step']}, past --steps {args.steps}")
    return state


def truncate_log(path: str, step: int) -> None:
    """Keep the records of steps <= step: a resumed run replays the steps after its checkpoint, and its log
    must not hold them twice."""
    if os.path.exists(path):
        kept = [r for r in read_log(path) if r["step"] <= step]
        with atomic_write(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def out_problem(out: str) -> str | None:
    """Why `out` cannot be a run's folder (it, or a folder above it, is a file), or None."""
    existing = out
    while existing and not os.path.exists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        return f"{existing} is a file, not a folder: pass a folder for the run (it is made if missing)"
    return None


def resume_command(command: str) -> str:
    """The command that continues a run: `command` with --resume, without --overwrite (they exclude each other)."""
    words = [w for w in shlex.split(command) if w != "--overwrite"]
    return shlex.join(words + ["--resume"] * ("--resume" not in words))


class Stop:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) ask the loop to stop after the current step; it then
    saves and says how to resume. Under torchrun every rank must stop at the same step, so the flag is agreed
    on by an all_reduce each step."""

    def __init__(self, world_size: int, device):
        self.signal, self.world_size, self.device = None, world_size, device

    def __enter__(self):
        self.old = {s: signal.signal(s, self.catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def catch(self, signum, frame) -> None:
        self.signal = signum

    def exit(self, step: int, ckpt_path: str, command: str) -> None:
        """After the checkpoint of `step` is saved: say so and how to resume, and exit with 128 + the signal."""
        log0(f"\nstopped by {signal.Signals(self.signal).name} after step {step}; saved {ckpt_path}")
        log0(f"resume with:  {resume_command(command)}")
        sys.exit(128 + self.signal)

    def requested(self) -> bool:
        if self.world_size == 1:
            return self.signal is not None
        flag = torch.tensor([0 if self.signal is None else self.signal], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signal = int(flag) or None
        return self.signal is not None


def skip_or_stop(args, step: int, in_a_row: int, ckpt_path: str) -> None:
    """A step whose loss or gradient is not finite is skipped (the weights are left as they were), up to
    --max-nonfinite in a row; one more stops the run before anything is saved."""
    if in_a_row <= args.max_nonfinite:
        log0(f"step {step + 1}: non-finite loss or gradient, step skipped ({in_a_row} in a row)")
        return
    saved = f"{ckpt_path} keeps the last good weights" if os.path.exists(ckpt_path) else "no checkpoint was written"
    what = f"the loss or its gradient is not finite ({in_a_row} step(s) in a row)"
    sys.exit(f"error: step {step + 1}: {what}; the run stops and {saved}. Lower --lr (now {args.lr:g}) perhaps")


def stop_on_full_disk(err: OSError, out: str, command: str) -> None:
    """A full disk while the run writes: stop in one line saying which step each checkpoint holds (a checkpoint
    is written whole or not at all, so the ones there are good) and how to continue. Other errors go on up."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise err
    held = saved_steps(os.path.join(out, "ckpt.pt"))
    sys.exit(
        f"error: writing to {out}: {err.strerror}; the run stops with {held}, as they were before the "
        f"failed write. Free some space, then continue with: {resume_command(command)}"
    )
