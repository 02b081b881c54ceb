"""Training and data faults (issue 18, part 4): a stop signal during a streak of skipped steps, a caption the
chunker cannot finish, and a --concepts file written for other captions. Every fixture is made here."""

import hashlib
import json
import os
import random
import signal

import pytest
import torch

import concepts
import train
from baselines.negatives import hard_negative
from data import eval_transform
from fixtures import image_bytes, write_cc3m, write_tar
from run.checkpoint import read_log
from sources import precompute
from sources.shards import expand_shards
from sources.stream import WebDataset

FAST = ["--batch-size", "4", "--workers", "0", "--log-every", "1"]
LOSS_OF = train.loss_of  # the real one: a test may patch it twice, each wrapper must wrap this one


# ----------------------------------------------------------------------------- 1. a signal during skipped steps


def nan_then_signal(signum: int, after_call: int):
    """train.loss_of, but every loss is NaN, and the process sends itself `signum` during call `after_call`
    (as Ctrl-C or a scheduler would, mid-step)."""
    real, calls = LOSS_OF, []

    def loss_of(*args):
        calls.append(1)
        if len(calls) == after_call:
            os.kill(os.getpid(), signum)
        loss, terms = real(*args)
        return loss * float("nan"), terms

    return loss_of


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_streak_of_skipped_steps_stops_and_saves(tmp_path, monkeypatch, capsys, signum):
    monkeypatch.setattr(train, "loss_of", nan_then_signal(signum, after_call=3))
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
    monkeypatch.setattr(train, "loss_of", nan_then_signal(signum, after_call=0))
    with pytest.raises(SystemExit) as failed:
        train.main([*argv, "--resume", "--max-nonfinite", "4"])
    assert "step 5" in str(failed.value.code) and "5 step(s) in a row" in str(failed.value.code)


# ----------------------------------------------------------------------------- 2. a caption the chunker cannot finish

LONG = ("a red dog chasing a blue ball on the green grass " * 21000)[:1_000_000]  # 1 MB: ~225,000 tokens


def shard_of(path, captions: list[str]) -> str:
    """A shard (img2dataset keys, .jpg + .txt) holding one sample per caption; returns its folder."""
    members = []
    for i, caption in enumerate(captions):
        members += [(f"{i:09d}.jpg", image_bytes(i)), (f"{i:09d}.txt", caption.encode())]
    os.makedirs(path, exist_ok=True)
    write_tar(os.path.join(path, "00000.tar"), members)
    return str(path)


class FailingChunker:
    """concepts._chunker, but parsing a caption with the word 'unchunkable' raises nltk.redos's TimeoutError."""

    def __init__(self, real):
        self.real = real

    def parse(self, tagged):
        if any(word == "unchunkable" for word, _ in tagged):
            raise TimeoutError("regular-expression match exceeded its 5.0s time limit")
        return self.real.parse(tagged)


@pytest.fixture
def failing_chunker(monkeypatch):
    concepts._extract_cached.cache_clear()  # phrases cached by an earlier test would never reach the chunker
    monkeypatch.setattr(concepts, "_chunker", FailingChunker(concepts._chunker))
    yield
    concepts._extract_cached.cache_clear()


def test_a_1mb_caption_is_cut_before_chunking(tmp_path, capsys):
    folder = shard_of(tmp_path / "shards", ["a man riding a horse", LONG, "a kitchen with white cabinets"])
    ds = WebDataset(expand_shards(folder), eval_transform(8), shuffle_buffer=0)
    samples = list(ds)  # before the bound: TimeoutError from nltk.redos, out of the stream
    assert [s["phrases"] for s in samples] == [
        ["a man", "a horse"],
        ["a red dog", "a blue ball", "the green grass"],  # from the first MAX_CAPTION_CHARS characters
        ["a kitchen", "white cabinets"],
    ]
    assert samples[1]["caption"] == LONG.strip() and ds.noted == {"caption_cut": 1} and ds.skipped == {}
    out = tmp_path / "concepts.jsonl"
    precompute.main(["--data-dir", folder, "--out", str(out), "--workers", "0"])
    (line,) = map(json.loads, open(out))
    assert "error" not in line and line["count"] == 3 and line["cut"] == 1 and line["failed"] == 0
    assert line["concepts"]["000000002"] == ["a kitchen", "white cabinets"]  # the samples after it are kept
    assert f"1 caption(s) over {concepts.MAX_CAPTION_CHARS} characters" in capsys.readouterr().out


def test_a_caption_the_chunker_fails_on_is_a_counted_skip(tmp_path, capsys, failing_chunker):
    captions = ["a man riding a horse", "an unchunkable red car", "a kitchen with white cabinets", "a giraffe"]
    folder = shard_of(tmp_path / "shards", captions)
    ds = WebDataset(expand_shards(folder), eval_transform(8), shuffle_buffer=0)
    assert [s["caption"] for s in ds] == captions[:1] + captions[2:] and ds.skipped == {"concepts_failed": 1}
    out = tmp_path / "concepts.jsonl"
    precompute.main(["--data-dir", folder, "--out", str(out), "--workers", "0"])
    (line,) = map(json.loads, open(out))
    assert "error" not in line and line["failed"] == 1 and line["count"] == 3
    assert set(line["concepts"]) == {"000000000", "000000002", "000000003"}  # the rest of the shard goes on
    assert "1 caption(s) NLTK failed on" in capsys.readouterr().out
    # train.py goes on too, and counts the skip in its log
    run = ["--data", "cc3m", "--data-dir", folder, "--steps", "2", "--out", str(tmp_path / "run"), *FAST]
    train.main([*run, "--batch-size", "2"])
    assert read_log(tmp_path / "run" / "log.jsonl")[-1]["skipped"] == {"concepts_failed": 1}
    # --method negclip tags captions for its hard negatives: that caption gets none
    assert hard_negative("an unchunkable red car and a blue star", random.Random(0)) is None
    assert hard_negative(LONG, random.Random(0)) is None


# ----------------------------------------------------------------------------- 3. a --concepts file of other captions


def caption_digest(caption: str) -> str:
    """What a concepts file records of each caption: 8 bytes of blake2b, as hex."""
    return hashlib.blake2b(caption.encode(), digest_size=8).hexdigest()


def refused(argv, capsys) -> str:
    """train.get_args(argv) must stop with an argparse error (exit 2); returns its message."""
    with pytest.raises(SystemExit) as err:
        train.get_args(argv)
    assert err.value.code == 2
    return capsys.readouterr().err


def other_dataset(path) -> str:
    """img2dataset's usual names (00000.tar, keys 000000000 ...) over other pictures and captions."""
    return shard_of(path, ["a yellow taxi in the snow", "two owls on a branch", "a lighthouse at dusk"])


def test_a_concepts_file_of_another_dataset_with_the_same_names_is_refused(tmp_path, capsys):
    ours, out = write_cc3m(str(tmp_path / "cc3m")), tmp_path / "concepts.jsonl"
    precompute.main(["--data-dir", ours, "--out", str(out), "--workers", "0"])
    train.get_args(["--data", "cc3m", "--data-dir", ours, "--concepts", str(out)])  # its own shards: accepted
    theirs = other_dataset(tmp_path / "other")
    message = refused(["--data", "cc3m", "--data-dir", theirs, "--concepts", str(out)], capsys)
    expected = caption_digest("a dog chasing a red ball on the grass")
    found = caption_digest("a yellow taxi in the snow")
    assert f"00000.tar, sample 000000000: caption digest {expected} in the file, {found} in the shard" in message
    assert f"--data-dir {theirs} --out {tmp_path / 'concepts-2.jsonl'}" in message  # not over the good file
    # past the samples checked at start-up, a stale line is not trained on: its phrases are extracted afresh
    ds = WebDataset(expand_shards(theirs), eval_transform(8), concepts_file=str(out), shuffle_buffer=0)
    assert [s["phrases"] for s in ds] == [
        ["a yellow taxi", "the snow"],
        ["two owls", "a branch"],
        ["a lighthouse", "dusk"],
    ]
    assert ds.noted == {"stale_concepts": 3}


def test_a_concepts_file_read_with_another_caption_key_is_refused(tmp_path, capsys):
    shards, out = write_cc3m(str(tmp_path / "cc3m")), tmp_path / "concepts.jsonl"
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0", "--caption-key", "shortLLA_captions"])
    argv = ["--data", "cc3m", "--data-dir", shards, "--concepts", str(out)]
    train.get_args([*argv, "--caption-key", "shortLLA_captions"])  # as written: accepted
    message = refused(argv, capsys)  # read from <key>.txt
    assert "line 1 (00000.tar) was computed from the JSON field 'shortLLA_captions'" in message
    assert "this run reads <key>.txt" in message and "--caption-key shortLLA_captions" in message
    # resuming the precompute with another caption key would mix the two in one file
    with pytest.raises(SystemExit):
        precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0", "--caption-key", "caption"])
    assert "written with --caption-key shortLLA_captions" in capsys.readouterr().err


def test_a_concepts_file_in_the_old_format_is_refused_with_the_command_that_rewrites_it(tmp_path, capsys):
    shards, out = write_cc3m(str(tmp_path / "cc3m")), tmp_path / "concepts.jsonl"
    old = {"shard": "00001.tar", "caption_key": None, "concepts": {"s0001_0000": ["a man", "a horse"]}, "count": 1}
    out.write_text(json.dumps(old) + "\n")  # as the precompute wrote it before caption digests
    message = refused(["--data", "cc3m", "--data-dir", shards, "--concepts", str(out)], capsys)
    command = f"python -m sources.precompute --data-dir {shards} --out {out} --overwrite"
    assert "no caption digests" in message and command in message
    with pytest.raises(SystemExit):  # resumed without --overwrite, the precompute would append to it
        precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0"])
    assert "--overwrite" in capsys.readouterr().err
    precompute.main(command.split()[3:] + ["--workers", "0"])
    train.get_args(["--data", "cc3m", "--data-dir", shards, "--concepts", str(out)])  # accepted now
    assert len(open(out).readlines()) == 2
