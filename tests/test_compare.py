"""The README's first comparison is what its commands print: study/compare.py writes the table from eval.py's
--json, and the README's table has the columns and the metric names that it writes."""

import json
import os

import eval as evaluate
from fixtures import write_checkpoint
from study.compare import COMMANDS, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_table() -> list[str]:
    """The table of the README's section "The first comparison", a line each."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## The first comparison", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_the_table_is_written_from_evals_json(tmp_path):
    a, b = (write_checkpoint(str(tmp_path / name / "ckpt.pt"), seed=i) for i, name in enumerate(["siglip", "c2lip"]))
    evaluate.main(["--ckpt", a, b, "--n", "20", "--json", str(tmp_path / "compare.json")])
    scores = json.loads((tmp_path / "compare.json").read_text())
    record = {"torch": "2.0", "python": "3.11.7", "cpus": 2, "load": 1.5, "seconds": dict.fromkeys(COMMANDS, 90.4)}
    lines = table(scores, record).splitlines()
    siglip, c2lip = scores["results"][a], scores["results"][b]
    names = [m for m in siglip if not m.startswith("heldout-")]  # runs without --holdout-combos
    assert [line.split(" | ")[0][2:] for line in lines[2 : 2 + len(names)]] == names
    row = lines[2 + names.index("t2i-R@5")].split(" | ")
    t2i = siglip["t2i-R@5"]["accuracy"], c2lip["t2i-R@5"]["accuracy"]
    assert row[1:] == ["20", f"{t2i[0]:.3f}", f"{t2i[1]:.3f}", f"{t2i[1] - t2i[0]:+.3f} |"]
    assert lines[-1].startswith("torch 2.0, Python 3.11.7, 2 CPU cores, load average 1.5 at the start.")
    assert f"`{COMMANDS[0]}` 90 s" in lines[-1]
    readme = readme_table()
    assert readme[:2] == lines[:2]  # the same header
    assert [line.split(" | ")[0] for line in readme[2:]] == [line.split(" | ")[0] for line in lines[2 : 2 + len(names)]]


def test_the_readme_runs_the_commands_that_the_script_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## The first comparison", 1)[1].split("\n## ", 1)[0]
    assert all(command in section for command in COMMANDS) and "python -m study.compare" in section
