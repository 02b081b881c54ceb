"""The README's first comparison in one command: its three commands run as written, then its table written from
what eval.py measured, with the torch version and each command's wall time, so the README shows what the
commands print.

  python -m study.compare               # trains runs/siglip and runs/c2lip, evaluates both, prints the table
  python -m study.compare --overwrite   # the same over runs of an earlier time (train.py --overwrite)
  python -m study.compare --table       # only the table, from runs/compare.json and runs/compare-run.json

The commands (COMMANDS) run from the repository root, each a subprocess whose output is shown as it comes.
eval.py writes the scores to runs/compare.json; this writes runs/compare-run.json (the torch and Python
versions, the CPU and each command's wall time) and runs/compare.md (the table and its line of versions and
times, the README's section "The first comparison"). Metrics are named as eval.py prints them; the heldout-*
categories are left out: they score the colour-shape pairs that `train.py --holdout-combos` keeps out of
training, and these runs saw every pair.
"""

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

from released.disk import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train.py is
COMMANDS = [
    "python train.py --method siglip",
    "python train.py",
    "python eval.py --ckpt runs/siglip/ckpt.pt runs/c2lip/ckpt.pt --json runs/compare.json",
]
SCORES, RECORD, TABLE = "runs/compare.json", "runs/compare-run.json", "runs/compare.md"
LABELS = ["SigLIP loss", "C2LIP (paper's weights: 1.0 L_npc, 0.01 L_xac, tau 1)"]  # eval.py's columns, in order


def run_commands(overwrite: bool) -> dict:
    """Run COMMANDS (train.py with --overwrite if asked); the record of runs/compare-run.json."""
    record = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the machine
        "seconds": {},
    }
    for command in COMMANDS:
        argv = shlex.split(command) + ["--overwrite"] * (overwrite and "train.py" in command)
        start = time.time()
        code = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT).returncode
        if code:
            again = " (python -m study.compare --overwrite replaces the runs)" if "train.py" in command else ""
            sys.exit(f"error: `{shlex.join(argv)}` failed with exit code {code}{again}")
        record["seconds"][command] = round(time.time() - start, 1)
    return record


def table(scores: dict, record: dict | None) -> str:
    """eval.py's --json (two checkpoints: SigLIP's, then C2LIP's) and runs/compare-run.json -> the README's
    table in markdown: every metric but heldout-*, with its count, both scores and their difference; then a
    line with the versions and wall times, if `record` is given."""
    results = list(scores["results"].values())
    if len(results) != len(LABELS):
        raise ValueError(f"{len(results)} checkpoints in the scores, not {len(LABELS)}")
    siglip, c2lip = results
    lines = [f"| metric | n | {' | '.join(LABELS)} | C2LIP - SigLIP |", "|---|---|---|---|---|"]
    for metric, value in siglip.items():
        if metric.startswith("heldout-"):
            continue
        a, b = value["accuracy"], c2lip[metric]["accuracy"]
        lines.append(f"| {metric} | {value['count']} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    if record:
        load = f", load average {record['load']:.1f}" if record.get("load") is not None else ""
        machine = f"{record['cpus']} CPU cores{load}"
        times = ", ".join(f"`{command}` {seconds:.0f} s" for command, seconds in record["seconds"].items())
        versions = f"torch {record['torch']}, Python {record['python']}"
        lines += ["", f"{versions}, {machine} at the start. Wall time: {times}."]
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overwrite", action="store_true", help="train afresh over runs/siglip and runs/c2lip")
    p.add_argument("--table", action="store_true", help=f"run nothing: the table from {SCORES} and {RECORD}")
    args = p.parse_args(argv)
    if not args.table:
        write_json(os.path.join(ROOT, RECORD), run_commands(args.overwrite), indent=1)
    scores = read_json(os.path.join(ROOT, SCORES))
    if scores is None:
        sys.exit(f"error: {SCORES} is missing or unreadable: run python -m study.compare without --table")
    try:
        text = table(scores, read_json(os.path.join(ROOT, RECORD)))
    except (KeyError, TypeError, ValueError) as err:
        sys.exit(f"error: {SCORES} is not eval.py's --json of two checkpoints ({type(err).__name__}: {err})")
    with open(os.path.join(ROOT, TABLE), "w") as f:
        f.write(text + "\n")
    print(f"{text}\n\nwrote {TABLE}")
    return text


if __name__ == "__main__":
    main()
