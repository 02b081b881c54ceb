"""Measure an exercise: its patch applied to a copy of the code, trained and evaluated beside the unchanged code.

  python -m exercises.measure 04-no-npc                  # seeds 0, 1, 2 of the change, and of the unchanged code
  python -m exercises.measure 04-no-npc --seeds 0        # one seed: about 2.5 minutes a run on 2 CPU cores
  python -m exercises.measure --table                    # every measured exercise's table (docs/exercises.md)

Each run is the README's `python train.py --seed S` then `python eval.py` (the shapes benchmark), in
runs/exercises/<name>/code, a copy of this tree with the patch applied, writing runs/exercises/<name>/seed<S>.
"unchanged" is the tree as it is. A seed already in the results is not run again; an interrupted run starts
afresh. The scores, the last logged loss terms and the wall times go to runs/exercises/results.json.

A table's row gives the three seeds' values and their mean, for the unchanged and the changed code; a difference
of means smaller than either side's spread (largest minus smallest seed) is marked "within noise"; the last column
counts the seeds whose changed run ended higher than the unchanged run of the same seed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from exercises.catalogue import BY_NAME
from released.disk import atomic_write, read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train.py is
HERE = os.path.join(ROOT, "exercises")
RUNS = os.path.join(ROOT, "runs", "exercises")
RESULTS = os.path.join(RUNS, "results.json")
METRICS = ["swap-att", "replace-att", "phrase-att", "i2t-R@1", "t2i-R@1", "zeroshot-top1"]
TERMS = ["L_sig", "L_npc", "L_xac"]  # the last logged values (step 200)
SKIP = shutil.ignore_patterns(".git", "runs", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", "*.pyc")


def applied_here() -> list[str]:
    """The exercises whose patch is applied to this tree (a student's work in progress): the copies would hold it."""
    applied = []
    for name in BY_NAME:
        check = ["git", "apply", "--check", "-R", os.path.join(HERE, f"{name}.patch")]
        if subprocess.run(check, cwd=ROOT, capture_output=True).returncode == 0:
            applied.append(name)
    return applied


def patched_copy(name: str, dest: str) -> str:
    """A copy of this tree in `dest` with exercises/<name>.patch applied ("unchanged": none); returns dest. The copy
    is a git repository of its own, so that `git apply` reads the patch's paths from its root."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT, dest, ignore=SKIP)
    subprocess.run(["git", "init", "-q", dest], check=True)
    if name != "unchanged":
        patch = os.path.join(HERE, f"{name}.patch")
        done = subprocess.run(["git", "apply", patch], cwd=dest, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: {name}.patch no longer applies to this tree: {done.stderr.strip()}")
    return dest


def run(command: list[str], cwd: str) -> float:
    """Run a command of the copy, its output shown as it comes; its wall time in seconds."""
    print("$", " ".join(command), flush=True)
    start = time.time()
    subprocess.run([sys.executable, *command], cwd=cwd, check=True)
    return time.time() - start


def measure(code: str, out: str, seed: int, train_flags=(), eval_flags=()) -> dict:
    """Train one seed of the code in `code` into `out` and evaluate it: the scores, the last loss terms, the wall
    times. The flags are added to train.py's and eval.py's defaults (the tests make the run short)."""
    ckpt, scores = os.path.join(out, "ckpt.pt"), os.path.join(out, "eval.json")
    train_s = run(["train.py", "--seed", str(seed), "--out", out, "--overwrite", *train_flags], code)
    eval_s = run(["eval.py", "--ckpt", ckpt, "--json", scores, *eval_flags], code)
    with open(os.path.join(out, "log.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    (column,) = read_json(scores)["results"].values()
    metrics = {m: column[m]["accuracy"] for m in METRICS}
    return {"metrics": metrics, "terms": {t: last[t] for t in TERMS if t in last}, "train_s": train_s, "eval_s": eval_s}


def spread(values: list[float]) -> float:
    return max(values) - min(values)


def table(name: str, results: dict) -> str:
    """The markdown table of one exercise: each metric and loss term, the unchanged and the changed code's seeds."""
    base, changed = results["unchanged"], results[name]
    seeds = sorted(set(base) & set(changed), key=int)
    head = f"| | unchanged, seeds {', '.join(seeds)} | mean | changed | mean | difference | seeds higher |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for key in [*METRICS, *TERMS]:
        group = "metrics" if key in METRICS else "terms"
        a = [base[s][group].get(key) for s in seeds]
        b = [changed[s][group].get(key) for s in seeds]
        if None in a or None in b:  # a loss term that one side does not compute
            cells = [" / ".join("-" if v is None else f"{v:.3f}" for v in side) for side in (a, b)]
            lines.append(f"| {key} | {cells[0]} | | {cells[1]} | | | |")
            continue
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        noise = len(seeds) > 1 and abs(mb - ma) < max(spread(a), spread(b))
        verdict = f"{mb - ma:+.3f}" + (" (within noise)" if noise else "")
        show = [" / ".join(f"{v:.3f}" for v in side) for side in (a, b)]
        higher = sum(y > x for x, y in zip(a, b))  # seed by seed: the same seed's changed run against its own
        lines.append(f"| {key} | {show[0]} | {ma:.3f} | {show[1]} | {mb:.3f} | {verdict} | {higher} of {len(seeds)} |")
    minutes = [changed[s]["train_s"] + changed[s]["eval_s"] for s in seeds]
    lines.append(
        f"\nEach changed run took {min(minutes) / 60:.1f} to {max(minutes) / 60:.1f} minutes (train and eval)."
    )
    return "\n".join(lines)


def measured(results: dict) -> list[str]:
    """The exercises with a table: measured, beside the unchanged code."""
    return [name for name in BY_NAME if name in results and "unchanged" in results]


def write_page(path: str, results: dict) -> None:
    """Put each measured exercise's table in the page, between its lines <!-- table NAME --> and <!-- end table -->."""
    with open(path) as f:
        page = f.read()
    for name in measured(results):
        mark, end = f"<!-- table {name} -->\n", "<!-- end table -->\n"
        if page.count(mark) != 1:
            sys.exit(f"error: --page {path} has no line <!-- table {name} --> (or more than one)")
        before, after = page.split(mark)
        if end not in after:
            sys.exit(f"error: --page {path}: the table of {name} has no <!-- end table --> line after it")
        page = before + mark + "\n" + table(name, results) + "\n\n" + end + after.split(end, 1)[1]
    with atomic_write(path) as f:
        f.write(page)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=["unchanged", *BY_NAME], help="the exercise (a change patch)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.py --seed of each run")
    p.add_argument("--table", action="store_true", help="print the tables of every measured exercise")
    p.add_argument("--page", help="write every measured table into this page, between its <!-- table NAME --> marks")
    p.add_argument("--results", default=RESULTS, help="the measurements, read and extended (docs/exercises.json: ours)")
    args = p.parse_args(argv)
    results = read_json(args.results) or {}
    if args.table:
        for name in measured(results):
            print(f"### {name}\n\n{table(name, results)}\n")
        return
    if args.page:
        write_page(args.page, results)
        return
    if args.name is None:
        p.error("name an exercise, or pass --table")
    if applied := applied_here():
        sys.exit(
            f"error: {', '.join(applied)} is applied to this tree; take it out (git apply -R exercises/NAME.patch)"
        )
    if args.name != "unchanged" and BY_NAME[args.name].kind != "change":
        p.error(f"name: {args.name} is a blank to fill in, not a change to measure (docs/exercises.md)")
    for name in dict.fromkeys(["unchanged", args.name]):  # the unchanged code first, then the change
        code = None
        for seed in args.seeds:
            if str(seed) in results.get(name, {}):
                continue
            code = code or patched_copy(name, os.path.join(RUNS, name, "code"))
            out = os.path.join(RUNS, name, f"seed{seed}")
            results.setdefault(name, {})[str(seed)] = measure(code, out, seed)
            write_json(args.results, results, indent=1)  # after every run: an interruption keeps what finished
    if args.name != "unchanged":
        print(table(args.name, results))


if __name__ == "__main__":
    main()
