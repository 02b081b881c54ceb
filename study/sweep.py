"""The study of docs/study.md ("When does concept-centric learning help?"): every row of its table, over
several seeds, in one command.

  python -m study.sweep                               # the table: trains what is missing, reuses the rest
  python -m study.sweep --seeds 3 4 5 --root runs/sweep_b   # the same study on other seeds
  python -m study.sweep --rows siglip c2lip --seeds 0 # part of it
  python -m study.sweep --world dense --root runs/sweep_dense --rows pretrained siglip negclip c2lip  # study.md, H1
  python -m study.sweep --list                        # the rows, their flags and what each one tests
  python -m study.sweep --study mechanism             # docs/mechanism.md: the threshold regime, scene labels

Studies (study/studies.py): `hypotheses` (the default) and `mechanism`; each sets the protocol's flags, its rows,
its columns and its defaults (--root, the step counts, --batch-size).

Protocol, the paper's in miniature ("The paper's training recipe" in docs/paper.md: fine-tune a pretrained SigLIP model,
baseline and C2LIP for the same steps): for each seed, pretrain one SigLIP model on the shapes world (the
study's pretraining flags), then fine-tune a copy of it per row for the same number of steps (its
fine-tuning flags plus the row's). Every model is scored on the same held-out benchmark (evaluation/shapes_benchmark.py,
drawn by --bench-seed, which no training run uses). Training scenes never hold a colour-shape pair of
shapes.HOLDOUT_COMBOS, so the heldout-* columns are the compositional-generalisation split.

Each run is a subprocess `python train.py ...` writing ROOT/<row>/seed<k>/ (ROOT/pretrain/seed<k>/ for the
pretraining): ckpt.pt, log.jsonl, loss.png, train.txt (its console) and run.json (its flags, wall time
and status), then eval.json (its benchmark scores). A finished run is reused, an interrupted one (a
signal stops the sweep) resumed, a run whose folder was made with other flags is refused (delete the
folder to redo it), and a failed one (non-zero exit or a non-finite loss) is reported as failed while the
sweep goes on. The table shows the mean ± sample standard deviation over seeds; ROOT/results.json holds
every run's scores, wall time and status.

Departure: the paper fine-tunes at lr 1e-5 for 5 epochs of CC3M; here fine-tuning is 100 steps at 1e-4 (both
studies). In the hypotheses study the logit scale and bias learn at their own rate
(--logit-lr) in every run: at the shared rate they barely move from t = 10, b = -10 in a few hundred steps
(the README's first comparison), which leaves the sigmoid losses far from fitting. The mechanism study
instead restarts t at 100 for fine-tuning (train.py --init-scale; study/studies.py says why).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from evaluation.metrics import cos, embed_texts
from evaluation.shapes_benchmark import BENCH_SEED, ShapesBenchmark, evaluate_shapes
from released.disk import write_json
from run.checkpoint import load_model, read_log
from sources.shapes import WORLDS, ShapesWorld
from study.studies import STUDIES, Study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train.py is

ROWS = STUDIES["hypotheses"].rows  # the default study's rows (study/studies.py holds every study)
DIAG_TAIL = 5  # run/diagnostics.py's per-batch measurements are averaged over the last this many log records


def folder(root: str, row: str, seed: int) -> str:
    return os.path.join(root, row.replace(" ", "_").replace(",", ""), f"seed{seed}")


def run_training(out: str, flags: list[str], seed: int, init: str | None = None) -> dict:
    """Run (or reuse, or resume) `python train.py FLAGS --seed SEED [--init INIT] --out OUT`; return its
    run.json record. A run is known by its flags and seed: OUT and INIT (the pretrained model of the same
    seed, in the same root) only say where it lies."""
    argv = [*flags, "--seed", str(seed)]
    where = (["--init", init] if init else []) + ["--out", out, "--resume"]
    record_path = os.path.join(out, "run.json")
    record = {"argv": argv, "status": "new", "seconds": 0.0}
    if os.path.exists(record_path):
        with open(record_path) as f:
            old = json.load(f)
        if old["argv"] != argv:
            sys.exit(
                f"error: {out} was trained with `train.py {' '.join(old['argv'])}`, not `train.py {' '.join(argv)}`; "
                f"delete the folder to redo it, or pass another --root"
            )
        if old["status"] in ("done", "failed"):
            return old
        record = old  # interrupted: resume it
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out, "train.txt"), "a") as console:
        code = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), *argv, *where],
            stdout=console,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        ).returncode
    record["seconds"] += time.time() - t0
    if code < 0 or code in (130, 143):  # stopped by a signal (train.py saves, then exits 128 + signal): resume
        write_json(record_path, record, indent=1)
        sys.exit(f"train.py was stopped by a signal in {out}; run the same command again to resume")
    record["status"] = "done" if code == 0 and finite_loss(out) else "failed"
    if code != 0:
        record["error"] = f"train.py exited with {code}; see {os.path.join(out, 'train.txt')}"
    elif record["status"] == "failed":
        record["error"] = "the loss became non-finite (diverged)"
    write_json(record_path, record, indent=1)
    return record


def last_record(out: str) -> dict:
    """The last line of OUT/log.jsonl: the run's final losses, t and b."""
    return read_log(os.path.join(out, "log.jsonl"))[-1]


def finite_loss(out: str) -> bool:
    return math.isfinite(last_record(out)["loss"])


def score_run(out: str, bench: ShapesBenchmark, bench_seed: int, pooled_tau: float | None = None) -> dict:
    """The shapes benchmark's scores of OUT/ckpt.pt (evaluation/shapes_benchmark.py, plain scoring; with
    pooled_tau, also scored through the pooling at that tau, named pooled/...) and the diagnostics below,
    cached in OUT/eval.json."""
    path, key, results = os.path.join(out, "eval.json"), {"bench_seed": bench_seed, "n": len(bench.scenes)}, {}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        results = cached["results"] if cached["bench"] == key else {}
    if "swap-text-cos" in results and (pooled_tau is None or "pooled/swap-att" in results):
        return results
    model, tokenizer, _ = load_model(os.path.join(out, "ckpt.pt"), torch.device("cpu"))
    if "swap-att" not in results:
        results = {k: v["accuracy"] for k, v in evaluate_shapes(model, tokenizer, bench, torch.device("cpu")).items()}
    if pooled_tau is not None and "pooled/swap-att" not in results:
        scores = evaluate_shapes(model, tokenizer, bench, torch.device("cpu"), score="pooled", tau=pooled_tau)
        results |= {k: v["accuracy"] for k, v in scores.items()}
    results |= diagnostics(model, tokenizer, bench, out)
    write_json(path, {"bench": key, "results": results}, indent=1)
    return results


@torch.no_grad()
def diagnostics(model, tokenizer, bench: ShapesBenchmark, out: str) -> dict:
    """What docs/study.md's explanation rests on: the mean cosine between a caption's embedding and its
    swap-att negative's (near 1: the text encoder does not tell the two bindings apart), and the end of
    training from log.jsonl: each unweighted loss term, and the logit scale t and bias b (of the concept
    losses too, when they have their own); and run/diagnostics.py's threshold fractions and label counts, each
    measured on one batch, so averaged over the last DIAG_TAIL log records."""
    pos, neg = ([p[k] for p in bench.pairs["swap-att"]] for k in (1, 2))
    swap_cos = (
        cos(embed_texts(model, tokenizer, pos, 256, "cpu"), embed_texts(model, tokenizer, neg, 256, "cpu"))
        .mean()
        .item()
    )
    log = read_log(os.path.join(out, "log.jsonl"))
    last = log[-1]
    tail = log[-DIAG_TAIL:]
    keys = [k for k in ("above/caption", "above/phrase", "pos/phrase", "fn/phrase") if all(k in r for r in tail)]
    measured = {k: statistics.fmean(r[k] for r in tail) for k in keys}
    names = {
        "L_sig": "L_sig",
        "L_npc": "L_npc",
        "L_xac": "L_xac",
        "scale": "t",
        "bias": "b",
        "concept_scale": "concept t",
        "concept_bias": "concept b",
    }
    return {"swap-text-cos": swap_cos} | {names[k]: v for k, v in last.items() if k in names} | measured


def mean_std(scores: list[dict]) -> dict:
    """[{metric: value}, ...] -> {"n": how many, "mean": {metric: m}, "std": {metric: s}}, s the sample
    standard deviation (nan for a single value)."""
    metrics = [m for m in scores[0] if all(m in s for s in scores)] if scores else []
    mean = {m: statistics.fmean(s[m] for s in scores) for m in metrics}
    std = {m: statistics.stdev([s[m] for s in scores]) if len(scores) > 1 else float("nan") for m in metrics}
    return {"n": len(scores), "mean": mean, "std": std}


def summarise(runs: dict[int, dict], base: dict[int, dict]) -> dict:
    """A row's runs {seed: run} -> mean_std of their scores ("mean", "std"), and "paired": mean_std of the
    differences to the baseline's run of the same seed. Every fine-tune of a seed starts from one
    pretrained model, so the paired difference leaves out the spread between pretrained models, which
    dominates the plain standard deviation."""
    done = {seed: run["metrics"] for seed, run in runs.items() if run["status"] == "done"}
    base = {seed: run["metrics"] for seed, run in base.items() if run["status"] == "done"}
    diffs = [{m: done[seed][m] - base[seed][m] for m in done[seed] if m in base[seed]} for seed in done if seed in base]
    return mean_std(list(done.values())) | {"paired": mean_std(diffs)}


def markdown(stats: dict[str, dict], columns: list[str], signed: bool = False) -> str:
    """One line per row: how many runs it averages (of how many were made), and mean ± std of each column
    ("-" where it has none)."""
    lines = ["| row | runs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    fmt = "{:+.3f} ± {:.3f}" if signed else "{:.3f} ± {:.3f}"
    for name, row in stats.items():
        cells = [fmt.format(row["mean"][c], row["std"][c]) if c in row["mean"] else "-" for c in columns]
        runs = f"{row['n']}/{len(row['runs'])}" if "runs" in row else row["n"]  # finished of all, where known
        lines.append(f"| {name} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve(outs: list[str], key: str = "L_sig", parts: int = 4) -> list[float]:
    """The mean of `key` over each of `parts` consecutive stretches of the runs' logs, averaged over the runs.
    Every training scene is fresh, so the caption loss of the log is a held-out measure: where it stops
    falling, more steps would not help the run (the study's budget check)."""
    logs = [[r[key] for r in read_log(os.path.join(out, "log.jsonl"))] for out in outs]
    parts = min(parts, *map(len, logs))  # a log of fewer records has fewer stretches
    means = [
        [statistics.fmean(log[j * len(log) // parts : (j + 1) * len(log) // parts]) for j in range(parts)]
        for log in logs
    ]
    return [statistics.fmean(m[j] for m in means) for j in range(parts)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="hypotheses", choices=list(STUDIES), help="which study (study/studies.py)")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="rows to run, by name (default: all; see --list)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds, one run per row each")
    p.add_argument("--root", help="folder of every run, and of results.json (default: the study's)")
    p.add_argument("--n", type=int, default=1000, help="held-out scenes in the benchmark")
    p.add_argument("--bench-seed", type=int, default=BENCH_SEED, help="seed that draws the benchmark")
    p.add_argument("--pretrain-steps", type=int, help="steps of the SigLIP pretraining, one per seed (study: 400)")
    p.add_argument("--finetune-steps", type=int, help="steps of every row's fine-tuning (study's default)")
    p.add_argument("--batch-size", type=int, help="images per step, in every run (study's default)")
    p.add_argument(
        "--pretrain-seed",
        type=int,
        help="fine-tune every seed from this seed's pretrained model (default: the study's)",
    )
    p.add_argument(
        "--world", default="simple", choices=list(WORLDS), help="the shapes world of every run and of the benchmark"
    )
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    args = p.parse_args(argv)
    study: Study = STUDIES[args.study]
    for name in ("rows", "root", "pretrain_steps", "finetune_steps", "batch_size", "pretrain_seed"):  # the study's
        if getattr(args, name) is None:
            setattr(args, name, list(study.rows) if name == "rows" else getattr(study, name))
    args.root = os.path.abspath(args.root)  # train.py runs in the repository's root, wherever this is called from
    for name in ("pretrain_steps", "finetune_steps", "batch_size", "n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    common = ["--batch-size", str(args.batch_size)] + (["--world", args.world] if args.world != "simple" else [])
    pretrain = [*study.pretrain, "--steps", str(args.pretrain_steps), *common]
    finetune = [*study.finetune, "--steps", str(args.finetune_steps), *common]
    ROWS, BASELINE = study.rows, study.baseline  # noqa: N806 (the names the rest of main reads)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; the rows of --study {args.study} are {list(ROWS)}")
    if args.list:
        print(
            f"pretraining: train.py {' '.join(pretrain)}\n"
            f"fine-tuning: train.py {' '.join(finetune)} --init PRETRAINED + the row's flags\n"
            f"pretrained model of seed: {'each its own' if args.pretrain_seed is None else args.pretrain_seed}"
        )
        for name, (flags, what) in ROWS.items():
            print(f"  {name:24s} {' '.join(flags) if flags is not None else '(none)':48s} {what}")
        return {}

    t0 = time.time()
    bench = ShapesBenchmark(ShapesWorld(**WORLDS[args.world]), args.n, args.bench_seed)
    rows = {name: {"flags": ROWS[name][0], "tests": ROWS[name][1], "runs": {}} for name in args.rows}
    jobs = [(name, seed) for name in args.rows for seed in args.seeds]  # row by row: a partial sweep has whole rows
    for k, (name, seed) in enumerate(jobs):
        start_seed = seed if args.pretrain_seed is None else args.pretrain_seed
        pretrained = folder(args.root, "pretrain", start_seed)
        base = run_training(pretrained, pretrain, start_seed)
        if name == "pretrained" or base["status"] != "done":
            out, run = pretrained, base
        else:
            out = folder(args.root, name, seed)
            run = run_training(out, [*finetune, *ROWS[name][0]], seed, init=os.path.join(pretrained, "ckpt.pt"))
        metrics = score_run(out, bench, args.bench_seed, study.pooled_tau) if run["status"] == "done" else None
        run = dict(run, metrics=metrics, out=out)
        rows[name]["runs"][seed] = run
        shown = f"swap-att {run['metrics']['swap-att']:.3f}" if run["metrics"] else run.get("error", "")
        print(
            f"[{k + 1}/{len(jobs)}] {name}, seed {seed}: {run['status']}, {run['seconds']:.0f} s train; {shown}",
            flush=True,
        )
    base = rows.get(BASELINE, {"runs": {}})["runs"]
    for row in rows.values():
        row |= summarise(row["runs"], base)

    paired = {name: row["paired"] for name, row in rows.items() if name != BASELINE and row["paired"]["n"]}
    parts = [
        "Scores, mean ± std over seeds:",
        markdown(rows, study.columns),
        f"Difference to {BASELINE} of the same seed (same pretrained start), mean ± std:",
        markdown(paired, study.columns, signed=True),
        "Diagnostics (diagnostics() in study/sweep.py), mean ± std:",
        markdown(rows, study.diagnostics),
    ]
    done = [run["out"] for run in rows.get(BASELINE, {"runs": {}})["runs"].values() if run["status"] == "done"]
    if done:  # the budget check: has the baseline stopped improving?
        losses = " -> ".join(f"{v:.3f}" for v in curve(done))
        parts.append(
            f"{BASELINE}'s caption loss on fresh scenes, by quarter of its fine-tune (mean of {len(done)}): {losses}"
        )
    table = "\n\n".join(parts)
    print(table)
    wall = time.time() - t0
    print(f"{len(jobs)} runs in {wall / 60:.1f} min (runs reused from earlier calls take no time)")
    result = {
        "study": args.study,
        "world": args.world,
        "pretrain": pretrain,
        "finetune": finetune,
        "seeds": args.seeds,
        "bench_seed": args.bench_seed,
        "n": args.n,
        "rows": rows,
        "markdown": table,
        "wall_seconds": wall,
    }
    path = os.path.join(args.root, "results.json")
    write_json(path, result, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
