"""Training and data faults (issue 18, part 4): a stop signal during a streak of skipped steps, a caption the
chunker cannot finish, and a --concepts file written for other captions. Every fixture is made here."""

import os
import signal

import pytest
import torch

import objective
import train
from checkpoint import read_log

FAST = ["--batch-size", "4", "--workers", "0", "--log-every", "1"]


# ----------------------------------------------------------------------------- 1. a signal during skipped steps


def nan_then_signal(signum: int, after_call: int):
    """train.loss_terms, but every loss is NaN, and the process sends itself `signum` during call `after_call`
    (as Ctrl-C or a scheduler would, mid-step)."""
    real, calls = objective.loss_terms, []

    def loss_terms(*args):
        calls.append(1)
        if len(calls) == after_call:
            os.kill(os.getpid(), signum)
        loss, terms = real(*args)
        return loss * float("nan"), terms

    return loss_terms


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_streak_of_skipped_steps_stops_and_saves(tmp_path, monkeypatch, capsys, signum):
    monkeypatch.setattr(train, "loss_terms", nan_then_signal(signum, after_call=3))
    argv = ["--steps", "8", "--max-nonfinite", "1000", "--ckpt-every", "1000", "--out", str(tmp_path), *FAST]
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == 128 + signum  # sweep.py reads 130 / 143 as an interruption, not a finished run
    output = capsys.readouterr().out
    assert f"stopped by {signal.Signals(signum).name} after step 3" in output and "--resume" in output
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 3 and state["nonfinite"] == 3  # every step was skipped: the streak is kept
    assert read_log(tmp_path / "log.jsonl") == []  # a skipped step logs nothing
    # resumed, the streak goes on from 3: with --max-nonfinite 4 the second skipped step stops the run
    monkeypatch.setattr(train, "loss_terms", nan_then_signal(signum, after_call=0))
    with pytest.raises(SystemExit) as failed:
        train.main([*argv, "--resume", "--max-nonfinite", "4"])
    assert "step 5" in str(failed.value.code) and "5 step(s) in a row" in str(failed.value.code)
