"""One page of an evaluation: what the models learned and where they fail (eval.py --report PATH).

Not part of the paper. eval.py prints accuracies; this page shows what is behind them, in one HTML file
that opens from disk (pictures inline, no script, no network):
  1. the comparison    eval.py's table with the counts behind each number, and a bar chart per benchmark
                       (a bar per checkpoint, chance marked)
  2. the training      the loss terms of every run, from the log.jsonl beside its checkpoint, on one chart
                       (loss.png's colours, a dash pattern per run), with its command line and its steps
  3. the failures      per category of pairs (the shapes benchmark's, SugarCrepe's files), the first FAILURES
                       examples the first checkpoint got wrong, in benchmark order: the image, the true
                       caption, the negative that scored at least as high, both scores; and whether every
                       other checkpoint got the same example right
  4. where each phrase looks   for the first ATTENTION of those per category, the pooling weights over the
                       patches of every concept phrase of both captions (run/pictures.py, the picture
                       eval.py --show draws), a row per checkpoint
The scores shown are the ones eval.py counted (evaluation/metrics.py PairScores, kept by the scorers);
the checkpoints are loaded again, one at a time, for the attention and their command lines.

Dimension legend: M examples of a category, K phrases, g x g patches.
"""

import math
import os
import re
import sys
from html import escape

import torchvision.transforms as T

from concepts import ConceptError, extract_concepts, phrases_or_caption
from data import eval_transform, load_image
from evaluation.benchmarks import preprocessing
from evaluation.metrics import PairScores
from released.disk import atomic_write
from released.weights import weight_options
from run.checkpoint import load_model, read_log
from run.figures import DASHES, SERIES, bar_chart, data_uri, fit, line_chart, rgb
from run.pictures import LOSS_TERMS, attention_maps, attention_picture
from sources.shapes import COLOURS, SHAPES

FAILURES = 4  # wrong examples shown per category
ATTENTION = 1  # of those, the ones whose attention is drawn
THUMB = 128  # pixels: the longer side of an example's picture
NO_PAIRS = "No category of pairs was scored: failures are shown for --bench shapes and sugarcrepe."
REAL = ("sugarcrepe", "sugarcrepe++", "zeroshot", "retrieval")
STYLE = """body{font-family:sans-serif;max-width:1280px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}small{color:#666}
.right{color:#2a7d2a}.wrong{color:#b22}pre{white-space:pre-wrap;background:#f7f7f7;padding:4px}
figure{margin:1em 0}figcaption{font-size:90%;color:#444}
.pair{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}"""


def write_report(path: str, args, results: dict, records: dict, data: dict, device) -> str:
    """The page, written atomically to `path`: results {ckpt: {metric: {accuracy, count}}} as eval.py printed
    them, records {ckpt: {metric: PairScores}} as its scorers kept them, data the real benchmarks read."""
    first = args.ckpt[0]
    shown = {m: wrong_indices(r)[:FAILURES] for m, r in records.get(first, {}).items()}
    drawn = [(m, i) for m, indices in shown.items() for i in indices[:ATTENTION]]
    phrases = {(m, i): phrase_labels(records[first][m], i) for m, i in drawn}  # [(phrase, label)] of K phrases
    mine = records.get(first, {})
    runs = [load_run(p, args, device, mine, records.get(p, {}), phrases) for p in dict.fromkeys(args.ckpt)]
    body = [
        header(args),
        comparison(results, records, data),
        training(runs),
        failures(records, shown, list(dict.fromkeys(args.ckpt))),
        attention(records[first] if drawn else {}, drawn, phrases, runs),
    ]
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>eval.py report</title><style>{STYLE}</style>"
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        with atomic_write(path) as f:
            f.write(page + "</head><body>" + "\n".join(body) + "</body></html>\n")
    except OSError as err:  # after the evaluation: its table is printed, and --json written, already
        why = f"{folder} is a file, not a folder" if os.path.isfile(folder) else err.strerror or str(err)
        sys.exit(f"error: --report {path}: cannot write the page ({why})")
    return path


def wrong_indices(record: PairScores) -> list[int]:
    """The examples the rule counts wrong (the negative scored at least as high, or a score is not finite)."""
    return (~record.correct).nonzero().flatten().tolist()


def key(record: PairScores, i: int) -> tuple:
    """What makes two checkpoints' examples the same one: the image and both captions."""
    return record.images[i], record.true[i], record.negative[i]


def find(record: PairScores | None, k: tuple) -> int | None:
    if record is None:
        return None
    return next((i for i in range(len(record.true)) if key(record, i) == k), None)


def phrase_labels(record: PairScores, i: int) -> list[tuple[str, str]]:
    """Every concept phrase of the true caption and of the negative, once each: (phrase, label)."""
    true, negative = concepts_of(record.true[i]), concepts_of(record.negative[i])
    return [
        (p, ("both: " if p in true and p in negative else "true: " if p in true else "negative: ") + p)
        for p in dict.fromkeys(true + negative)
    ]


def concepts_of(caption: str) -> list[str]:
    try:
        return phrases_or_caption(extract_concepts(caption), caption)
    except ConceptError:  # one caption the tagger fails on: the caption stands for its phrases
        return [caption]


def model_view(model, record: PairScores, i: int):
    """(the picture, the pixels the model scored) of example i: a shapes scene as the benchmark rendered it,
    or an image file through the model's own evaluation transform (its crop, before the pixels)."""
    if record.source is not None:
        bench, scene = record.source, record.images[i]
        return bench.world.render(bench.scenes[scene]), bench.images[scene]
    transform, image = eval_transform(*preprocessing(model)), load_image(record.images[i])
    return T.Compose(transform.transforms[:-1])(image), transform(image)


def load_run(path: str, args, device, first: dict, own: dict, phrases: dict) -> dict:
    """One checkpoint, loaded again: its command line, step and flags, and the attention maps of the examples
    to be drawn (those it scored itself), (K, g, g) each. The model is let go before the next is loaded."""
    model, tokenizer, ckpt = load_model(path, device, **weight_options(args))
    flags = ckpt.get("args") or {}
    tau = args.tau if args.tau is not None else float(flags.get("tau", 1.0))  # as eval.py scores --score pooled
    run = {"path": path, "step": ckpt.get("step"), "command": ckpt.get("command"), "flags": flags, "tau": tau}
    run["log"] = os.path.join(os.path.dirname(path), "log.jsonl") if "step" in ckpt else None
    run["maps"], run["pictures"] = {}, {}
    for (metric, i), labels in phrases.items():
        j = find(own.get(metric), key(first[metric], i))
        if j is not None:
            picture, pixels = model_view(model, own[metric], j)
            run["maps"][metric, i] = attention_maps(model, tokenizer, pixels, [p for p, _ in labels], tau, device)
            run["pictures"][metric, i] = picture
    return run


# ----------------------------------------------------------------------------- the sections


def header(args) -> str:
    mark = "<li><span style='color:{}'>&#9632;</span> {}</li>"  # each checkpoint's colour in the bar charts
    ckpts = "".join(mark.format(SERIES[k % len(SERIES)], escape(p)) for k, p in enumerate(args.ckpt))
    what = f"--bench {' '.join(args.bench)}"
    if "shapes" in args.bench:
        what += f" (shapes: {args.n} held-out scenes of seed {args.bench_seed}, scores {', '.join(args.score)})"
    return (
        f"<h1>eval.py report</h1><p>{escape(what)}. Checkpoints, in --ckpt order:</p><ul>{ckpts}</ul>"
        "<p>Sections: <a href='#comparison'>the comparison</a>, <a href='#training'>how each run trained</a>, "
        "<a href='#failures'>where the first checkpoint fails</a>, <a href='#attention'>where each phrase looks"
        "</a>. Hover over a bar or a line for its value.</p>"
    )


def bench_of(metric: str) -> str:
    head = metric.split("/")[0]
    return head if head in REAL else "shapes (pooled)" if head == "pooled" else "shapes"


def chance(metric: str, row: dict, data: dict) -> float:
    """The accuracy of random scores: 1/2 for a pair, 1/3 for SugarCrepe++'s triples, k/C for top-k of C
    classes, and for retrieval the chance that k of the candidates, drawn at random, hold a right one."""
    name, prefix = metric.split("/")[-1], metric[: len(metric) - len(metric.split("/")[-1])]
    if metric.startswith("sugarcrepe++/"):
        return 1 / 3
    if m := re.fullmatch(r"(?:zeroshot-)?top(\d+)", name):
        classes = len(data["zeroshot"][1]) if prefix == "zeroshot/" else len(COLOURS) * len(SHAPES)
        return min(1.0, int(m[1]) / classes)
    if m := re.fullmatch(r"(i2t|t2i)-R@(\d+)", name):
        k, images, texts = int(m[2]), row[f"{prefix}i2t-R@{m[2]}"]["count"], row[f"{prefix}t2i-R@{m[2]}"]["count"]
        if m[1] == "t2i":
            return min(1.0, k / images)
        own = round(texts / images)  # captions per image: a miss draws all k from the others
        return 1 - math.prod((texts - own - j) / (texts - j) for j in range(min(k, texts - own)))
    return 0.5


def cell(result: dict, record: PairScores | None, mean: bool) -> str:
    accuracy, count = result["accuracy"], result["count"]
    if not count:
        return "<td class='num'>n/a<br><small>0 examples</small></td>"
    right = int(record.correct.sum()) if record is not None else round(accuracy * count)
    detail = f"mean of files, {count}" if mean else f"{right} of {count}"
    return f"<td class='num'>{accuracy:.3f}<br><small>{detail}</small></td>"


def comparison(results: dict, records: dict, data: dict) -> str:
    """eval.py's table, a table and a bar chart per benchmark, each number with its counts."""
    names, first = list(results), next(iter(results.values()))
    out = [
        "<h2 id='comparison'>1. The comparison</h2><p>Accuracy (the fraction counted right; ties count "
        "against the model), with the examples behind it. The dashed mark is chance: random scores.</p>"
    ]
    for bench in dict.fromkeys(bench_of(m) for m in first):
        metrics = [m for m in first if bench_of(m) == bench]
        head = "".join(f"<th>{escape(n)}</th>" for n in names)
        rows = []
        for m in metrics:
            mean = bench.startswith("sugarcrepe") and m.split("/")[-1] in ("add", "replace", "swap", "mean")
            cells = "".join(cell(results[n][m], records.get(n, {}).get(m), mean) for n in names)
            rows.append(f"<tr><td>{escape(m)}</td><td class='num'>{first[m]['count']}</td>{cells}</tr>")
        values = [[results[n][m]["accuracy"] for n in names] for m in metrics]
        chances = [chance(m, first, data) for m in metrics]
        chart = bar_chart([m.split("/", 1)[-1] for m in metrics], names, values, chances)  # less the benchmark
        out.append(f"<h3>{escape(bench)}</h3><div class='pair'><table class='comparison'><tr><th>metric</th><th>n</th>")
        out.append(f"{head}</tr>" + "".join(rows) + f"</table>{chart}</div>")
    return "\n".join(out)


def training(runs: list[dict]) -> str:
    """The loss terms of every run on one chart, and each run's command line, step and last logged values."""
    lines, notes = [], []
    for k, run in enumerate(runs):
        log = read_log(run["log"]) if run["log"] and os.path.isfile(run["log"]) else []
        for term, colour in LOSS_TERMS.items():
            points = [(r["step"], r[term]) for r in log if isinstance(r.get(term), (int, float))]
            if points:
                name = f"{term}, {run['path']}"
                lines.append({"name": name, "colour": rgb(colour), "dash": DASHES[k % len(DASHES)], "points": points})
        notes.append(run_note(run, log))
    chart = line_chart(lines, "step", "loss (each term unweighted, as logged)") if lines else "<p>No run has a log.</p>"
    intro = (
        "<h2 id='training'>2. How each run trained</h2><p>Each loss term in its colour (as in loss.png; the terms "
        "are those on train.py's progress bar), a dash pattern per run.</p>"
    )
    return intro + chart + "<ul class='runs'>" + "".join(notes) + "</ul>"


def run_note(run: dict, log: list[dict]) -> str:
    """A run's step, its last logged values, its command line and (folded) every flag it was trained with."""
    step = run["step"] if run["step"] is not None else "n/a (released weights)"
    last = ", ".join(f"{t} {log[-1][t]:.3f}" for t in LOSS_TERMS if log and t in log[-1])
    said = f"{len(log)} log records, the last at step {log[-1]['step']}: {last}" if log else "no log.jsonl beside it"
    command = (
        f"<pre>{escape(run['command'])}</pre>" if run["command"] else "; command line not recorded in the checkpoint"
    )
    flags = escape(", ".join(f"{a}={v}" for a, v in run["flags"].items()))
    folded = f"<details><summary>its flags</summary><small>{flags}</small></details>" if flags else ""
    return f"<li class='run'><b>{escape(run['path'])}</b>: step {step}; {said}{command}{folded}</li>"


def thumbnail(record: PairScores, i: int) -> str:
    """The example's picture, small, and its name: a scene index for eval.py --show, or the image's file."""
    if record.source is not None:
        picture = record.source.world.render(record.source.scenes[record.images[i]])
    else:
        picture = load_image(record.images[i])
    image = f"<img src='{data_uri(fit(picture, THUMB), 'smaller')}' alt='example {i}'>"
    return f"{image}<br><small class='image'>{thumbnail_name(record, i)}</small>"


def thumbnail_name(record: PairScores, i: int) -> str:
    return f"scene {record.images[i]}" if record.source is not None else escape(os.path.basename(record.images[i]))


def verdict(record: PairScores | None, k: tuple) -> str:
    j = find(record, k)
    if j is None:
        return "<td><small>not in its benchmark</small></td>"
    word = "<span class='right'>right</span>" if record.correct[j] else "<span class='wrong'>wrong</span>"
    scores = f"{record.pos[j]:.4f} vs {record.neg[j]:.4f}, margin {record.pos[j] - record.neg[j]:+.2g}"
    return f"<td class='other'>{word}<br><small>{scores}</small></td>"


def failures(records: dict, shown: dict, paths: list[str]) -> str:
    first, others = paths[0], paths[1:]
    out = [
        f"<h2 id='failures'>3. Where it fails</h2><p>Per category, the first {FAILURES} examples that "
        f"{escape(first)} got wrong, in the benchmark's order: its score of the true caption and of the negative "
        "(cosines; the negative scored at least as high). The other checkpoints' verdicts on the same example "
        "follow.</p>"
    ]
    if not shown:
        out.append(f"<p>{NO_PAIRS}</p>")
    for metric, indices in shown.items():
        record = records[first][metric]
        wrong = len(wrong_indices(record))
        out.append(
            f"<h3 id='fail-{escape(metric)}'>{escape(metric)}</h3><p>{wrong} of {len(record.true)} wrong; "
            f"<span class='shown'>{len(indices)}</span> shown.</p>"
        )
        if not indices:
            continue
        head = "".join(f"<th>{escape(p)}</th>" for p in others)
        rows = []
        for i in indices:
            k = key(record, i)
            cells = "".join(verdict(records.get(p, {}).get(metric), k) for p in others)
            rows.append(
                f"<tr class='failure'><td>{thumbnail(record, i)}</td><td>{escape(record.true[i])}</td>"
                f"<td class='num pos'>{record.pos[i]:.4f}</td><td>{escape(record.negative[i])}</td>"
                f"<td class='num neg'>{record.neg[i]:.4f}</td><td class='num'>{record.pos[i] - record.neg[i]:+.2g}</td>"
                f"{cells}</tr>"
            )
        out.append(
            f"<table><tr><th>image</th><th>true caption</th><th>its score</th><th>negative preferred</th>"
            f"<th>its score</th><th>margin</th>{head}</tr>" + "".join(rows) + "</table>"
        )
    return "\n".join(out)


def attention(first: dict, drawn: list, phrases: dict, runs: list[dict]) -> str:
    out = [
        f"<h2 id='attention'>4. Where each phrase looks</h2><p>For the first {ATTENTION} failure(s) of each "
        "category: every concept phrase of the true caption and of the negative, its pooling weights over the "
        "image's patches (the attention L_xac pools with; eval.py --show draws the same), a row per checkpoint. "
        "Each map is scaled to its own peak; 'peak 3x flat' means three times the weight of a uniform pooling.</p>"
    ]
    if not drawn:
        out.append(f"<p>No failure to draw. {NO_PAIRS if not first else ''}</p>")
    for metric, i in drawn:
        record, labels = first[metric], phrases[metric, i]
        have = [run for run in runs if (metric, i) in run["maps"]]
        rows = [run["maps"][metric, i] for run in have]  # (K, g, g) each
        titles = [f"{run['path']}  (tau {run['tau']:g})" for run in have]
        sheet = attention_picture(have[0]["pictures"][metric, i], rows, [label for _, label in labels], titles)
        missing = [run["path"] for run in runs if run not in have]
        absent = f" Not in the benchmark of: {escape(', '.join(missing))}." if missing else ""
        out.append(
            f"<figure class='attention'><img src='{data_uri(sheet, 'smaller', 90)}' alt='attention, {escape(metric)}'>"
            f"<figcaption><b>{escape(metric)}</b>, {thumbnail_name(record, i)}: true &ldquo;{escape(record.true[i])}"
            f"&rdquo;, negative &ldquo;{escape(record.negative[i])}&rdquo;.{absent}</figcaption></figure>"
        )
    return "\n".join(out)
