"""A new user's first run, offline (docs/failures.md): a missing NLTK tagger stops the run in one line before any
DataLoader worker starts; an error in a worker, or in the main process while workers run, ends the process with a
non-zero exit instead of hanging it; a folder that a failed run left without a checkpoint is no run to protect.
A run that would hang is killed at LIMIT seconds and the test fails."""

import multiprocessing
import os
import signal
import subprocess
import sys

import nltk
import pytest
import torch

import concepts
import train
from run.checkpoint import read_log
from sources.loader import ignore_signals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--steps", "2", "--batch-size", "4", "--log-every", "1"]
LIMIT = 180  # seconds: far above what these runs take on a loaded CPU; a hang is the only way to reach it


def train_in_subprocess(prelude: str, argv: list[str], env: dict | None = None) -> tuple[int, list[str]]:
    """`python train.py ARGV` in its own process group, after `prelude` (Python) has run in it: (exit code, the
    lines it printed). The group is killed at LIMIT seconds (workers too), and the test fails."""
    code = f"{prelude}\nimport sys, train\nsys.argv = ['train.py', *{argv!r}]\ntrain.main()"
    env = os.environ | (env or {})
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"still running after {LIMIT}s (a hang); it printed:\n{output[-3000:]}")
    return proc.returncode, [line for line in output.replace("\r", "\n").splitlines() if line.strip()]


def no_tagger(folder) -> str:
    """A prelude: NLTK searches only the empty `folder`, and a download fails (no internet is used)."""
    return f"import nltk\nnltk.data.path[:] = [{str(folder)!r}]\nnltk.download = lambda *a, **k: False"


def test_a_missing_tagger_stops_the_first_run_in_one_line_and_the_next_run_starts(tmp_path):
    out, empty = tmp_path / "run", tmp_path / "nltk_data"
    empty.mkdir()
    argv = [*FLAGS, "--workers", "1", "--out", str(out)]
    code, lines = train_in_subprocess(no_tagger(empty), argv, {"NLTK_DATA": str(empty)})
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 1 and not any("Traceback" in line for line in lines), lines[-20:]
    assert len(errors) == 1 and "python -m nltk.downloader averaged_perceptron_tagger_eng" in errors[0], lines[-20:]
    assert not (out / "ckpt.pt").exists()
    train.main([*FLAGS, "--workers", "0", "--out", str(out)])  # the tagger found again: the README's command runs
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_the_tagger_is_checked_before_any_dataloader_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(concepts, "_tagger", None)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk, "download", lambda *a, **k: False)
    started = []
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: started.append(1))
    for method in ("c2lip", "siglip"):  # every shapes scene is cut into phrases, whatever the loss
        with pytest.raises(SystemExit, match="^error: NLTK's POS tagger data .* python -m nltk.downloader"):
            train.main([*FLAGS, "--method", method, "--workers", "1", "--out", str(tmp_path / method)])
    assert not started


def test_an_error_in_a_worker_ends_the_run_with_one_line(tmp_path):
    broken = (
        "from sources.shapes import ShapesDataset\n"
        "def broken(self, i):\n    raise ValueError(f'scene {i} is broken')\n"
        "ShapesDataset.__getitem__ = broken"
    )
    code, lines = train_in_subprocess(broken, [*FLAGS, "--workers", "1", "--out", str(tmp_path)])
    assert code == 1 and not any("Traceback" in line for line in lines), lines[-20:]
    error = "error: DataLoader worker 0: ValueError: scene 0 is broken (--workers 0 shows the traceback)"
    assert [line for line in lines if line.startswith("error: ")] == [error], lines[-20:]


def test_an_error_in_the_main_process_while_workers_run_ends_the_process(tmp_path):
    # Python's exit sends SIGTERM to every worker and waits for them: workers that ignored it hung here forever
    failing = "import train\ndef failing(*a):\n    raise RuntimeError('a bug')\ntrain.loss_of = failing"
    code, lines = train_in_subprocess(failing, [*FLAGS, "--workers", "2", "--out", str(tmp_path)])
    assert code == 1 and "RuntimeError: a bug" in lines, lines[-20:]


def answer(pipe) -> None:
    ignore_signals(0)
    while True:
        pipe.send(pipe.recv())


def test_a_worker_ignores_sigterm_from_others_and_ends_on_its_parents():
    ours, theirs = multiprocessing.Pipe()
    worker = multiprocessing.get_context("fork").Process(target=answer, args=(theirs,), daemon=True)
    worker.start()
    ours.send("started")
    assert ours.recv() == "started"  # ignore_signals has run
    kill = f"import os, signal; os.kill({worker.pid}, signal.SIGTERM); os.kill({worker.pid}, signal.SIGINT)"
    subprocess.run([sys.executable, "-c", kill], check=True)  # a scheduler's SIGTERM, a Ctrl-C: another sender
    ours.send("still here")
    assert ours.recv() == "still here"
    worker.terminate()  # what multiprocessing does to each worker when the main process exits
    worker.join(LIMIT)
    if worker.is_alive():  # it ignored its parent: the exit of a failed run would wait for it forever
        worker.kill()
    assert worker.exitcode == 0


def test_a_folder_without_a_checkpoint_holds_no_run(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text("")  # what a first run that failed before its first step left
    train.main([*FLAGS, "--workers", "0", "--out", str(tmp_path)])  # no --overwrite needed
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]
    (tmp_path / "ckpt.pt").unlink()  # a run killed before its first checkpoint: a log, no step saved
    train.main([*FLAGS, "--workers", "0", "--out", str(tmp_path)])
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]  # replaced, not appended to
    assert "holds no checkpoint, so no run: its log.jsonl is replaced" in capsys.readouterr().out
    (tmp_path / "ckpt.pt").unlink()
    train.main([*FLAGS, "--workers", "0", "--out", str(tmp_path), "--resume"])  # nothing to resume: from step 0
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]
