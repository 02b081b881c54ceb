"""One line, not a traceback: checkpoints that lack a part or cannot be read, weights that are not weights, a full
disk, an --out that is a file, a corrupt --show image, benchmark records that cannot be scored (docs/failures.md).
Every fixture is made here, in the real formats."""

import errno
import json
import os
import shlex
import signal

import pytest
import torch
from test_failures import evaluate_fails, exits_with, run

import eval as evaluate
import train
from fixtures import write_checkpoint


def tokenizer_of_999_words(state):
    state["tokenizer"]["vocab"] = [f"w{i}" for i in range(999)]  # more tokens than the model embeds


@pytest.mark.parametrize(
    "spoil,needle",
    [
        (lambda s: s.pop("tokenizer"), "a checkpoint with no tokenizer"),
        (lambda s: s["config"].pop("text"), "its config has no 'text'"),
        (lambda s: s["tokenizer"].update(kind="wordpiece"), "unknown tokenizer kind 'wordpiece'"),
        (lambda s: s["tokenizer"].pop("vocab"), "the checkpoint's word tokenizer is malformed (no field 'vocab')"),
        (lambda s: s.update(tokenizer="word"), "the checkpoint's tokenizer is a str, not a tokenizer's state"),
        (tokenizer_of_999_words, "its tokenizer (1003 tokens, a context of 24) does not fit its model (65 tokens"),
    ],
)
def test_a_checkpoint_lacking_a_part_stops_eval_init_and_resume_with_one_line(tmp_path, spoil, needle):
    path = write_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    state = torch.load(path, weights_only=True)
    spoil(state)
    torch.save(state, path)
    exits_with(lambda: evaluate.main(["--ckpt", path, "--n", "5"]), f"{path}: {needle}")
    exits_with(lambda: run(["--init", path, "--steps", "1"], tmp_path / "new"), f"--init {path}: {needle}")
    if "tokenizer" in state:  # without one, resume_state has always refused it
        exits_with(lambda: run(["--resume", "--steps", "1"], tmp_path / "run"), f"--resume: {path}: {needle}")


def test_init_refuses_a_file_that_is_not_weights_and_a_folder_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not weights at all")
    exits_with(lambda: run(["--init", str(garbage)], tmp_path / "a"), "not a weights file torch can read safely")
    folder = os.path.dirname(write_checkpoint(str(tmp_path / "run" / "ckpt.pt")))
    exits_with(lambda: run(["--init", folder], tmp_path / "b"), f"its checkpoint is {folder}/ckpt.pt")


def full_disk_at(monkeypatch, module, opened: str, call: int) -> dict:
    """module's open(), but the write of the `call`-th file opened whose name holds `opened` fails with
    ENOSPC after its first bytes; returns the bytes of the run's checkpoints when that write begins."""
    real, calls, before = open, [], {}

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written = self.f.write(data)
            return self.written

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, *args, **kwargs):
        f = real(path, *args, **kwargs)
        if opened in os.path.basename(path):
            calls.append(path)
            if len(calls) == call:
                folder = os.path.dirname(path)
                saved = [os.path.join(folder, n) for n in ("ckpt.pt", "ckpt-prev.pt")]
                before.update({os.path.basename(f): open(f, "rb").read() for f in saved if os.path.exists(f)})
                return Full(f)
        return f

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    return before


def test_a_full_disk_while_saving_keeps_both_checkpoints_and_says_which_step_each_holds(tmp_path, monkeypatch):
    from released import disk  # atomic_write opens the temporary file there

    before = full_disk_at(monkeypatch, disk, "ckpt.pt.tmp", 3)  # the third checkpoint, at step 3
    message = exits_with(lambda: run(["--steps", "4", "--ckpt-every", "1", "--overwrite"], tmp_path), "No space left")
    assert f"{tmp_path}/ckpt.pt holds step 2, {tmp_path}/ckpt-prev.pt holds step 1" in message, message
    assert message.endswith("--resume") and "--overwrite" not in message
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt-prev.pt", "ckpt.pt", "log.jsonl", "loss.png"]


def test_a_full_disk_while_logging_stops_with_one_line(tmp_path, monkeypatch):
    full_disk_at(monkeypatch, train, "log.jsonl", 1)  # the log's second line, at step 2
    message = exits_with(lambda: run(["--steps", "4", "--ckpt-every", "1"], tmp_path), "No space left")
    assert f"the run stops with {tmp_path}/ckpt.pt holds step 1" in message and message.endswith("--resume")


def test_out_that_is_a_file_is_refused_naming_the_flag(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for out in (notes, notes / "run"):
        exits_with(lambda o=out: train.get_args(["--out", str(o)]), f"--out {out}: {notes} is a file", capsys)
    assert notes.read_text() == "my notes\n"


def test_show_a_corrupt_image_stops_with_one_line(bench, tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"\xff\xd8\xff not a jpeg")
    argv = ["--ckpt", bench["ckpt"], "--show", str(image), "--concepts", "a dog", "--out", str(tmp_path / "a.png")]
    exits_with(lambda: evaluate.main(argv), f"--show {image}: cannot decode the image")


@pytest.mark.parametrize("image", [None, 3, ["a.jpg"], ""])
def test_retrieval_refuses_a_record_whose_image_is_not_a_path(bench, image):
    records = json.load(open(bench["ann"]))
    records[1]["image"] = image
    json.dump(records, open(bench["ann"], "w"))
    argv = ["--bench", "retrieval", "--data-dir", os.path.dirname(bench["ann"]), "--ann", bench["ann"]]
    evaluate_fails(bench, argv, f"record 1 of {bench['ann']} needs an image path")


def test_sugarcrepe_refuses_a_duplicate_key_instead_of_dropping_a_record(bench):
    path = os.path.join(bench["sc"], "swap_att.json")
    text = open(path).read()  # keys "1", "4", "7", ...: the second record now shares the first one's key
    open(path, "w").write(text.replace('"4":', '"1":', 1))
    evaluate_fails(bench, ["--bench", "sugarcrepe", "--data-dir", bench["sc"]], f"{path} holds the key '1' twice")


def test_an_unreadable_checkpoint_names_the_one_before_it_and_its_step(tmp_path):
    run(["--steps", "3", "--ckpt-every", "2"], tmp_path)  # ckpt.pt: step 3, ckpt-prev.pt: step 2
    ckpt, prev = tmp_path / "ckpt.pt", tmp_path / "ckpt-prev.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # torn by a crash, a full disk, a bad copy
    found = f"; {prev}, the checkpoint before it, can be read and holds step 2:"
    message = exits_with(lambda: run(["--steps", "4", "--resume"], tmp_path), found)
    assert f"mv {prev} {ckpt}" in message
    exits_with(lambda: evaluate.main(["--ckpt", str(ckpt), "--n", "5"]), found + " pass it to --ckpt")
    exits_with(lambda: run(["--init", str(ckpt)], tmp_path / "b"), found + " pass it to --init")
    ckpt.unlink()
    exits_with(lambda: evaluate.main(["--ckpt", str(ckpt), "--n", "5"]), found + " pass it to --ckpt")


def test_the_command_printed_to_resume_an_overwrite_run_resumes_it(tmp_path, monkeypatch, capsys):
    class StopAtOnce(train.Stop):  # as if Ctrl-C came during the first step
        def requested(self):
            self.signal = signal.SIGINT
            return True

    run(["--steps", "1"], tmp_path)
    monkeypatch.setattr(train, "Stop", StopAtOnce)
    exits_with(lambda: run(["--steps", "3", "--overwrite"], tmp_path), str(128 + signal.SIGINT))
    command = capsys.readouterr().out.split("resume with:")[1].strip()
    monkeypatch.undo()
    assert torch.load(train.main(shlex.split(command)[2:]), weights_only=True)["step"] == 3
