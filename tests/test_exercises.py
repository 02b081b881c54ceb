"""The exercises stay true as the code changes: every patch of exercises/ applies to today's tree, every change
trains, and every blank makes its named tests fail, with a message that sends the student to its docstring.

One copy of the tree serves every test (exercises/measure.py `patched_copy`); a patch is applied to it and taken
back out. The change patches train 2 steps each in one process (tests/exercise_runner.py), so torch is imported
once. Whoever changes a root file that a patch touches updates the patch with it: this file fails until then.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import exercises.measure as measure_module
from exercises.catalogue import BY_NAME, EXERCISES
from exercises.measure import HERE, METRICS, ROOT, measure, patched_copy, table, write_page
from released.disk import read_json

CHANGES = [e for e in EXERCISES if e.kind == "change"]
BLANKS = [e for e in EXERCISES if e.kind == "blank"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    return patched_copy("unchanged", str(tmp_path_factory.mktemp("exercises") / "tree"))


def git_apply(tree: str, name: str, *flags: str) -> subprocess.CompletedProcess:
    patch = os.path.join(HERE, f"{name}.patch")
    return subprocess.run(["git", "apply", *flags, patch], cwd=tree, capture_output=True, text=True)


def test_the_catalogue_the_patches_and_the_page_agree():
    on_disk = {name[: -len(".patch")] for name in os.listdir(HERE) if name.endswith(".patch")}
    assert on_disk == set(BY_NAME)
    assert len(EXERCISES) >= 10 and len(BLANKS) >= 3
    assert [e.name for e in EXERCISES] == sorted(BY_NAME)  # numbered in the order a course takes them
    page = open(os.path.join(ROOT, "docs", "exercises.md")).read()
    for e in EXERCISES:
        assert e.kind in ("change", "blank") and (e.kind == "blank") == e.name.endswith(".blank") == bool(e.tests)
        assert f"exercises/{e.name}.patch" in page, e.name
        if e.kind == "change":
            assert f"python -m exercises.measure {e.name}" in page, e.name  # the command that made its table
        if e.flags:
            assert f"`{e.flags}`" in page or f"`python train.py {e.flags}`" in page, e.name


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.name)
def test_the_patch_applies_to_todays_tree(tree, exercise):
    done = git_apply(tree, exercise.name, "--check")
    assert done.returncode == 0, f"exercises/{exercise.name}.patch no longer applies: update it\n{done.stderr}"


def test_every_change_trains_two_steps_and_its_flags_train_the_same(tree, tmp_path):
    """Each change trains; where docs/exercises.md names flags that do the same to the unchanged code, the
    two give the same loss to the last bit (the student can check an edit of their own against them)."""
    names = [e.name for e in CHANGES]
    runner = [sys.executable, os.path.join("tests", "exercise_runner.py"), str(tmp_path), *names]
    done = subprocess.run(runner, cwd=tree, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split()[2:] for line in done.stdout.splitlines() if line.split()[1:2] == ["ok"]}
    assert list(rows) == names, done.stdout
    for e in CHANGES:
        patched, flagged = rows[e.name]
        if e.flags and e.exact:
            assert patched == flagged, f"{e.name}: the patch gave {patched}, train.py {e.flags} gave {flagged}"
        elif e.flags:
            assert patched != flagged, f"{e.name}: the flags {e.flags} train what the patch does: mark it exact"


@pytest.mark.parametrize("exercise", BLANKS, ids=lambda e: e.name)
def test_a_blank_fails_its_tests_until_the_student_writes_it(tree, exercise):
    assert git_apply(tree, exercise.name).returncode == 0
    try:
        pytest_run = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *exercise.tests]
        done = subprocess.run(pytest_run, cwd=tree, capture_output=True, text=True, timeout=600)
    finally:
        assert git_apply(tree, exercise.name, "-R").returncode == 0
    failed = {re.sub(r"\[.*", "", test) for test in re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)}
    assert failed == set(exercise.tests), done.stdout[-3000:]
    number = exercise.name[:2]
    assert f"exercise {number}: write" in done.stdout and "see its docstring" in done.stdout, done.stdout[-3000:]


# ----------------------------------------------------------------------------- exercises/measure.py


def fake_results(base: list[float], changed: list[float]) -> dict:
    def side(values):
        return {
            str(s): {"metrics": dict.fromkeys(METRICS, v), "terms": {"L_sig": v}, "train_s": 120.0, "eval_s": 30.0}
            for s, v in enumerate(values)
        }

    return {"unchanged": side(base), "04-no-npc": side(changed)}


def test_a_difference_smaller_than_the_seeds_spread_is_called_noise():
    far = table("04-no-npc", fake_results([0.60, 0.62, 0.61], [0.70, 0.71, 0.72]))
    assert "| swap-att | 0.600 / 0.620 / 0.610 | 0.610 | 0.700 / 0.710 / 0.720 | 0.710 | +0.100 | 3 of 3 |" in far
    near = table("04-no-npc", fake_results([0.60, 0.66, 0.61], [0.63, 0.64, 0.65]))
    assert "| +0.017 (within noise) | 2 of 3 |" in near  # 0.640 - 0.623 < the unchanged side's spread 0.06
    assert "| L_npc | - / - / - | | - / - / - | | | |" in near  # a term neither side logged
    assert "took 2.5 to 2.5 minutes" in near


def test_the_page_is_written_between_its_marks_and_a_missing_mark_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- table 04-no-npc -->\nold table\n<!-- end table -->\nafter\n")
    results = fake_results([0.6, 0.6, 0.6], [0.7, 0.7, 0.7])
    write_page(str(page), results)
    write_page(str(page), results)  # again: the same page
    text = page.read_text()
    assert text.startswith("intro\n<!-- table 04-no-npc -->\n\n| | unchanged") and text.endswith(
        "<!-- end table -->\nafter\n"
    )
    assert "old table" not in text and text.count("| swap-att |") == 1
    page.write_text("no marks\n")
    with pytest.raises(SystemExit, match="no line <!-- table 04-no-npc -->"):
        write_page(str(page), results)


def test_the_page_shows_the_measured_tables():
    """docs/exercises.md's tables are what `python -m exercises.measure --table --results docs/exercises.json`
    prints: every change measured, over 3 seeds, no figure typed by hand."""
    results = read_json(os.path.join(ROOT, "docs", "exercises.json"))
    page = open(os.path.join(ROOT, "docs", "exercises.md")).read()
    for e in CHANGES:
        assert sorted(results[e.name]) == ["0", "1", "2"], e.name
        assert table(e.name, results) in page, e.name


def test_measuring_refuses_a_tree_with_an_exercise_applied(tree, monkeypatch):
    monkeypatch.setattr(measure_module, "ROOT", tree)
    assert measure_module.applied_here() == []
    assert git_apply(tree, "04-no-npc").returncode == 0
    try:
        assert measure_module.applied_here() == ["04-no-npc"]
        with pytest.raises(SystemExit, match="04-no-npc is applied to this tree"):
            measure_module.main(["04-no-npc", "--results", os.path.join(tree, "none.json")])
    finally:
        assert git_apply(tree, "04-no-npc", "-R").returncode == 0


def test_the_copies_that_measuring_leaves_in_runs_are_never_collected_as_tests(tree):
    """python -m exercises.measure leaves copies of the tree, tests and all, in runs/exercises/: the README's test
    command must not run them (pyproject.toml's testpaths and norecursedirs)."""
    copy = os.path.join(tree, "runs", "exercises", "04-no-npc", "code", "tests")
    os.makedirs(copy)
    with open(os.path.join(copy, "test_never.py"), "w") as f:
        f.write("def test_never():\n    raise AssertionError\n")
    try:
        collect = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"]
        done = subprocess.run(collect, cwd=tree, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(os.path.join(tree, "runs"))
    assert done.returncode == 0 and "tests/test_exercises.py::" in done.stdout, done.stdout[-2000:]
    assert "test_never" not in done.stdout


def test_a_blank_is_not_measured_and_the_error_says_why(capsys, tmp_path):
    with pytest.raises(SystemExit):
        measure_module.main(["03-owner-labels.blank", "--results", str(tmp_path / "r.json")])
    assert "03-owner-labels.blank is a blank to fill in, not a change to measure" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        measure_module.main(["--results", str(tmp_path / "r.json")])
    assert "name an exercise, or pass --table" in capsys.readouterr().err


def test_one_measured_seed_end_to_end(tree, tmp_path):
    """measure() as main() calls it, on a short run: train.py, eval.py, the log's last terms and the scores."""
    code = patched_copy("04-no-npc", str(tmp_path / "code"))
    row = measure(code, str(tmp_path / "seed3"), 3, ["--steps", "2", "--batch-size", "8"], ["--n", "20"])
    assert set(row["metrics"]) == set(METRICS) and all(0 <= v <= 1 for v in row["metrics"].values())
    assert set(row["terms"]) == {"L_sig", "L_xac"}  # the patch took L_npc out of the loss
    log = open(tmp_path / "seed3" / "log.jsonl").read().splitlines()
    assert json.loads(log[-1])["step"] == 2 and row["train_s"] > 0 and row["eval_s"] > 0
