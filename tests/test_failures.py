"""A user's bad day, one test per case of docs/failures.md: broken models are never scored as good, runs are never
lost or overwritten by accident, and bad inputs stop with one line naming what is wrong (or are skipped and
counted). Every fixture is made here, in the real formats."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import eval as evaluate
import train
from evaluation.metrics import itt_correct, pairwise_correct, retrieval_recall, topk_accuracy, tot_correct
from fixtures import write_cc3m, write_checkpoint, write_tar
from run.checkpoint import locked, read_log
from run.pictures import plot_losses
from sources import precompute
from sources.shards import caption_word_counts, expand_shards, shard_groups
from sources.stream import WebDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "4", "--workers", "0", "--log-every", "1"]
NAN = float("nan")
LOSS_OF = train.loss_of  # the real one: a test may patch it twice, each wrapper must wrap this one


def run(argv, tmp_path, *extra):
    return train.main([*argv, "--out", str(tmp_path), *FAST, *extra])


def exits_with(fn, needle: str, capsys=None):
    """fn() must stop with a SystemExit whose message (or argparse's stderr) holds `needle`."""
    with pytest.raises(SystemExit) as err:
        fn()
    message = capsys.readouterr().err if capsys is not None and err.value.code == 2 else str(err.value.code)
    assert needle in message, message
    return message


# ----------------------------------------------------------------------------- 1. a NaN model scores nothing


def test_every_metric_counts_a_non_finite_score_as_wrong():
    assert pairwise_correct(torch.tensor([NAN, 1.0, 0.5]), torch.tensor([0.0, NAN, 0.2])).tolist() == [
        False,
        False,
        True,
    ]
    nan3 = torch.full((3,), NAN)
    assert not itt_correct(nan3, nan3, nan3).any() and not tot_correct(nan3, nan3, nan3).any()
    nan_model = retrieval_recall(torch.full((4, 4), NAN), torch.arange(4), ks=(1, 4))
    assert nan_model == {"i2t-R@1": 0.0, "i2t-R@4": 0.0, "t2i-R@1": 0.0, "t2i-R@4": 0.0}
    sim = torch.eye(4)
    sim[0, 2] = NAN  # a wrong candidate with no score beats the right one: image 0 and text 2 miss
    assert retrieval_recall(sim, torch.arange(4), ks=(1,)) == {"i2t-R@1": 0.75, "t2i-R@1": 0.75}
    assert topk_accuracy(torch.full((2, 6), NAN), torch.tensor([0, 3]), ks=(1, 5)) == {1: 0.0, 5: 0.0}


def test_eval_refuses_non_finite_weights(tmp_path):
    path = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    state = torch.load(path, weights_only=True)
    state["model"]["text.proj"] = torch.full_like(state["model"]["text.proj"], NAN)
    torch.save(state, path)
    exits_with(lambda: evaluate.main(["--ckpt", path, "--n", "5"]), "NaN or inf")


# ----------------------------------------------------------------------------- 2. a non-finite loss stops the run


def nan_at(bad_calls: set[int]):
    """train.loss_of, but the loss of the calls numbered in bad_calls (from 1) is NaN."""
    real, calls = LOSS_OF, []

    def loss_of(*args):
        calls.append(1)
        loss, terms = real(*args)
        return (loss * NAN if len(calls) in bad_calls else loss), terms

    return loss_of


def test_a_non_finite_loss_stops_before_any_checkpoint_is_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "loss_of", nan_at({3, 4, 5, 6}))
    message = exits_with(lambda: run(["--steps", "6", "--ckpt-every", "2"], tmp_path), "step 3")
    assert "not finite" in message and "keeps the last good weights" in message
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 2 and all(v.isfinite().all() for v in state["model"].values())
    # two bad steps in a row may be skipped; a good step starts the count again, so step 5 is one in a row
    monkeypatch.setattr(train, "loss_of", nan_at({2, 3, 5}))
    ckpt = run(["--steps", "6", "--max-nonfinite", "2"], tmp_path / "skip")
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    assert [r["step"] for r in read_log(tmp_path / "skip" / "log.jsonl")] == [1, 4, 6]  # steps 2, 3 and 5 skipped


# ----------------------------------------------------------------------------- 3. --resume never runs code


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    out, created = tmp_path / "run", tmp_path / "created-by-pickle"
    out.mkdir()
    with open(out / "ckpt.pt", "wb") as f:
        pickle.dump({"model": Payload(str(created))}, f)
    exits_with(lambda: run(["--steps", "2", "--resume"], out), "not a checkpoint torch can read safely")
    assert not created.exists()


# ----------------------------------------------------------------------------- 4, 5. no run is overwritten or shared


def test_an_existing_run_is_not_overwritten_by_accident(tmp_path):
    run(["--steps", "2"], tmp_path)
    before = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_text()
    exits_with(lambda: run(["--steps", "2"], tmp_path), "--resume continues it, --overwrite replaces it")
    assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_text()) == before
    run(["--steps", "1", "--overwrite"], tmp_path)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "ckpt-prev.pt").exists()  # --overwrite starts afresh


def test_precompute_never_writes_into_an_unrelated_file(tmp_path, capsys):
    shards, notes = write_cc3m(str(tmp_path / "cc3m")), tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    argv = ["--data-dir", shards, "--out", str(notes), "--workers", "0"]
    exits_with(lambda: precompute.main(argv), "is not a concepts file", capsys)
    assert notes.read_text() == "my notes\n"


def test_a_second_process_on_the_same_out_is_refused(tmp_path):
    with locked(str(tmp_path)):  # as if another training process held the folder
        exits_with(lambda: run(["--steps", "1"], tmp_path), "in use by another training process")
    assert not (tmp_path / "ckpt.pt").exists()


# ----------------------------------------------------------------------------- 6, 7. shards cut short


def test_precompute_records_a_bad_shard_and_goes_on(tmp_path):
    shards = write_cc3m(str(tmp_path / "cc3m"))
    (tmp_path / "cc3m" / "00002.tar").write_bytes(os.urandom(3000))
    out = tmp_path / "concepts.jsonl"
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0"])
    records = {r["shard"]: r for r in map(json.loads, open(out))}
    assert set(records) == {"00000.tar", "00001.tar", "00002.tar"} and "error" in records["00002.tar"]
    assert records["00001.tar"]["count"] == 4 and "error" not in records["00001.tar"]
    before = out.read_text()
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0"])
    assert out.read_text() == before  # the rerun has nothing left to do: it finishes


def sixteen_samples(path):
    members = []
    for i in range(16):
        members += [(f"{i:09d}.txt", f"a red circle number {i}".encode()), (f"{i:09d}.json", b"{}")]
    write_tar(str(path), members)


def test_a_tar_cut_at_a_member_header_is_counted(tmp_path):
    whole = tmp_path / "whole.tar"
    sixteen_samples(whole)
    with tarfile.open(whole) as tar:
        cut = tar.getmembers()[16].offset + 100  # inside the header of sample 8's first member
    bad = tmp_path / "cut" / "00000.tar"
    bad.parent.mkdir()
    bad.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(tarfile.ReadError, match="member header"):
        list(shard_groups(str(bad)))
    assert len(list(shard_groups(str(whole)))) == 16
    ds = WebDataset([str(bad)], lambda img: img, shuffle_buffer=0)
    assert list(ds) == [] and ds.skipped == {"missing_image": 7, "corrupt_shard": 1}


# ----------------------------------------------------------------------------- 8. --concepts is checked


@pytest.mark.parametrize(
    "content,needle",
    [
        (json.dumps({"shard": "00000.tar", "concepts": {"000000000": "a dog"}}) + "\n", "line 1"),  # a string
        ("", "holds no shard"),
        (None, "line 1"),  # binary
        (json.dumps({"shard": "99999.tar", "concepts": {}}) + "\n", "another shard set"),
        (json.dumps({"shard": "00000.tar", "concepts": {}}) + "\n{not json\n", "line 2"),
    ],
)
def test_a_concepts_file_that_does_not_fit_is_refused(tmp_path, capsys, content, needle):
    shards, path = write_cc3m(str(tmp_path / "cc3m")), tmp_path / "c.jsonl"
    path.write_bytes(os.urandom(200) + b"\n" if content is None else content.encode())
    argv = ["--data", "cc3m", "--data-dir", shards, "--concepts", str(path)]
    exits_with(lambda: train.get_args(argv), needle, capsys)


# ----------------------------------------------------------------------------- 9, 12. benchmark files made by others


def evaluate_fails(bench, argv, needle):
    return exits_with(lambda: evaluate.main(["--ckpt", bench["ckpt"], *argv, "--workers", "0"]), needle)


def test_retrieval_refuses_an_image_without_captions(bench):
    records = json.load(open(bench["ann"]))
    records[1]["caption"] = []
    json.dump(records, open(bench["ann"], "w"))
    coco = os.path.dirname(bench["ann"])
    evaluate_fails(bench, ["--bench", "retrieval", "--data-dir", coco, "--ann", bench["ann"]], "record 1")


def test_benchmark_files_with_problems_stop_with_one_line(bench, tmp_path):
    sc = ["--bench", "sugarcrepe", "--data-dir", bench["sc"]]
    path = os.path.join(bench["sc"], "swap_att.json")
    good = open(path).read()
    for broken, needle in [("", "not valid JSON"), ("{", "not valid JSON"), ("[]", "official format")]:
        open(path, "w").write(broken)
        evaluate_fails(bench, sc, needle)
    data = json.loads(good)
    data[next(iter(data))]["caption"] = None
    json.dump(data, open(path, "w"))
    evaluate_fails(bench, sc, "needs non-empty filename, caption, negative_caption")
    open(path, "w").write(good)
    image = os.path.join(bench["sc"], "val2017", "000000000285.jpg")
    open(image, "wb").write(open(image, "rb").read()[:60])  # a truncated COCO image
    evaluate_fails(bench, sc, "000000000285.jpg: cannot decode the image")


def test_bad_checkpoint_paths_and_flags_stop_with_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for ckpt, needle in [(tmp_path, "not a file"), (garbage, "not a weights file torch can read safely")]:
        exits_with(lambda c=ckpt: evaluate.main(["--ckpt", str(c), "--n", "5"]), needle)
    if not torch.cuda.is_available():
        exits_with(lambda: train.get_args(["--device", "cuda"]), "CUDA is not available", capsys)
    bad = ["--lr -1", "--workers -1", "--weight-decay -0.1", "--warmup -0.5", "--grad-clip -1", "--method clip"]
    for flags in bad:
        argv = flags.split() + (["--batch-size", "1"] if flags == "--method clip" else [])
        exits_with(lambda a=argv: train.get_args(a), flags.split()[0], capsys)


# ----------------------------------------------------------------------------- 10, 11. resume and its log


def test_resume_refuses_other_flags_and_an_earlier_end(tmp_path):
    run(["--steps", "3"], tmp_path)
    exits_with(lambda: run(["--steps", "4", "--resume", "--model", "small"], tmp_path), "--model tiny")
    exits_with(lambda: run(["--steps", "2", "--resume"], tmp_path), "past --steps 2")
    resumed = torch.load(run(["--steps", "4", "--resume", "--workers", "0"], tmp_path), weights_only=True)
    assert resumed["step"] == 4 and resumed["args"]["model"] == "tiny"


def test_a_torn_log_line_is_left_out_not_fatal(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0, "L_sig": 2.0}) + "\n" + '{"step": 2, "lo')
    assert [r["step"] for r in read_log(log)] == [1]
    assert plot_losses(str(log), str(tmp_path / "loss.png")) is not None


# ----------------------------------------------------------------------------- 13. signals save, and say how to resume


def test_sigint_finishes_the_step_saves_and_resumes_without_replaying_the_log(tmp_path):
    flags = ["--steps", "400", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "1000", "--out", str(tmp_path)]
    cmd = [sys.executable, "train.py", *flags, "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and len(read_log(log)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, output[-2000:]
    assert "Traceback" not in output and "resume with:" in output and "--resume" in output
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert 2 <= saved < 400 and read_log(log)[-1]["step"] == saved
    with open(log, "a") as f:  # records after the checkpoint (as if written before a kill -9) are dropped
        f.write(json.dumps({"step": saved + 1, "loss": 1.0}) + "\n")
    train.main([*flags, "--resume", "--steps", str(saved + 2), "--workers", "0"])
    assert [r["step"] for r in read_log(log)] == list(range(1, saved + 3))


# ----------------------------------------------------------------------------- 14. the smaller ones


def test_a_rewritten_shard_is_counted_again_and_bad_utf8_is_skipped(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    image = io.BytesIO()
    __import__("PIL.Image").Image.new("RGB", (8, 8)).save(image, format="PNG")
    write_tar(str(folder / "00000.tar"), [("a.png", image.getvalue()), ("a.txt", b"a red circle")])
    shards = expand_shards(str(folder))
    assert caption_word_counts(shards, None, str(tmp_path))["circle"] == 1
    time.sleep(0.01)
    write_tar(str(folder / "00000.tar"), [("a.png", image.getvalue()), ("a.txt", b"a blue star, a blue circle")])
    os.utime(folder / "00000.tar", (time.time() + 5, time.time() + 5))
    assert caption_word_counts(shards, None, str(tmp_path))["blue"] == 2  # not the stale cache
    write_tar(str(folder / "00000.tar"), [("a.png", image.getvalue()), ("a.txt", "caf\xe9".encode("latin-1"))])
    ds = WebDataset(shards, lambda img: img, shuffle_buffer=0)
    assert list(ds) == [] and ds.skipped == {"bad_encoding": 1}
