"""eval.py --report: one self-contained HTML page, read back with html.parser. Every picture is inline and
decodes, each section holds what the results say it should, and each failure shown is wrong by its own
scores, which are the model's. In a real browser when chromium is installed."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate
from fixtures import write_checkpoint, write_sugarcrepe
from run.checkpoint import load_model
from run.figures import SERIES
from run.report import ATTENTION, FAILURES

SHAPES_PAIRS = ["swap-att", "swap-obj", "replace-att", "replace-obj", "add-obj", "add-att", "phrase-att"]
SHAPES_PAIRS += ["heldout-swap-att", "heldout-replace-att"]
TERMS = ["L_sig", "L_npc", "L_xac"]
SUGARCREPE = ["add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"]


class Page(HTMLParser):
    """Every element as [tag, attributes, its own text (not its children's)], in document order."""

    VOID = {"br", "img", "meta"}  # elements with no end tag

    def __init__(self, html: str):
        super().__init__()
        self.elements, self.open = [], []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), ""])
        if tag not in self.VOID:
            self.open.append(self.elements[-1])

    def handle_startendtag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), ""])

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.open:
            self.open[-1][2] += data

    def find(self, tag, cls=None):
        return [e for e in self.elements if e[0] == tag and (cls is None or cls in e[1].get("class", "").split())]


COMMAND = "python train.py --steps 3 --out run"
NO_COMMAND = "; command line not recorded in the checkpoint"


def write_run(folder) -> str:
    """A small checkpoint as train.py leaves one (its command line inside), and a log.jsonl of three records
    in train.py's format beside it."""
    path = write_checkpoint(str(folder / "ckpt.pt"), image_size=16)
    state = torch.load(path, weights_only=True)
    torch.save(state | {"command": COMMAND, "step": 3}, path)
    terms = [{"L_sig": 5.0 - s, "L_npc": 5.2 - 0.5 * s, "L_xac": 5.4 - 0.1 * s} for s in range(3)]
    records = [{"step": s + 1, "loss": sum(t.values()), **t, "scale": 10.0, "bias": -10.0} for s, t in enumerate(terms)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A run with a log and a command line, a copy of its checkpoint under another path, and another model
    without a log (and another image size: its own shapes benchmark), scored on the shapes benchmark and
    SugarCrepe's fixture, with and without --report."""
    root = tmp_path_factory.mktemp("report")
    trained = write_run(root / "run")
    os.makedirs(root / "copy")
    shutil.copy(trained, root / "copy" / "ckpt.pt")  # the same model: the same verdicts on every example
    other = write_checkpoint(str(root / "other" / "ckpt.pt"), image_size=24, seed=1)
    argv = ["--ckpt", trained, str(root / "copy" / "ckpt.pt"), other, "--bench", "shapes", "sugarcrepe"]
    argv += ["--data-dir", write_sugarcrepe(str(root / "sc")), "--n", "12", "--batch-size", "8", "--workers", "0"]
    plain = evaluate.main(argv)
    results = evaluate.main([*argv, "--report", str(root / "out" / "page.html")])  # out/: made for it
    html = open(root / "out" / "page.html", encoding="utf-8").read()
    return {"plain": plain, "results": results, "html": html, "parsed": Page(html), "root": root, "ckpts": argv[1:4]}


def test_the_report_changes_no_number(page):
    assert page["results"] == page["plain"]


def test_the_page_is_self_contained_and_every_picture_decodes(page):
    html, parsed = page["html"], page["parsed"]
    assert not parsed.find("script") and not parsed.find("link") and not parsed.find("iframe")
    assert not re.search(r"(src|href)=['\"](?!data:|#)", html)  # nothing fetched: inline data or an anchor
    images = parsed.find("img")
    assert images
    for _, attrs, _ in images:
        kind, payload = re.fullmatch(r"data:image/(png|jpeg);base64,(.+)", attrs["src"]).groups()
        picture = Image.open(io.BytesIO(base64.b64decode(payload)))
        picture.load()  # decodes the whole image
        assert picture.format.lower() == kind and min(picture.size) > 8
    assert [e[1]["id"] for e in parsed.find("h2")] == ["comparison", "training", "failures", "attention"]


def test_the_comparison_holds_each_number_with_its_count(page):
    parsed, results, ckpts = page["parsed"], page["results"], page["ckpts"]
    metrics = list(results[ckpts[0]])
    rows = [e for e in parsed.elements if e[0] == "td" and e[2] in metrics]
    assert [e[2] for e in rows] == metrics  # the table eval.py prints, row for row
    counts = [e[2] for e in parsed.find("small") if re.fullmatch(r"\d+ of \d+|mean of files, \d+|0 examples", e[2])]
    expected = []
    for m in metrics:
        for c in ckpts:
            n, right = results[c][m]["count"], round(results[c][m]["accuracy"] * results[c][m]["count"] or 0)
            mean = m.split("/")[-1] in ("add", "replace", "swap", "mean")
            expected.append("0 examples" if not n else f"mean of files, {n}" if mean else f"{right} of {n}")
    assert counts == expected
    # a bar chart per benchmark: a bar per checkpoint and metric (none for a category without examples),
    # and chance marked in each group
    bars = [e[2] for e in parsed.find("title") if re.fullmatch(r".+: \d\.\d{3}", e[2])]
    assert len(bars) == sum(results[c][m]["count"] > 0 for c in ckpts for m in metrics)
    assert len(parsed.find("line", "chance")) == len(metrics)
    assert len(parsed.find("svg")) == 2 + 1  # shapes and sugarcrepe; the loss curves


def test_the_training_section_shows_each_run(page):
    parsed, ckpts = page["parsed"], page["ckpts"]
    # the run logs L_sig, L_npc and L_xac; its copy sits beside no log, nor does the other model
    curves = parsed.find("polyline", "curve")
    assert [e[2] for e in parsed.find("title") if e[2].startswith("L_")] == [f"{t}, {ckpts[0]}" for t in TERMS]
    assert all(len(e[1]["points"].split()) == 3 for e in curves)  # a point per record
    assert [e[2] for e in parsed.find("pre")] == [COMMAND, COMMAND]  # the copy holds the run's command line
    assert [e[2] for e in parsed.elements if e[0] == "b" and e[2] in ckpts] == ckpts
    notes = [e[2] for e in parsed.find("li", "run")]
    assert notes[0] == ": step 3; 3 log records, the last at step 3: L_sig 3.000, L_npc 4.200, L_xac 5.200"
    assert notes[1:] == [": step 3; no log.jsonl beside it", ": step 0; no log.jsonl beside it" + NO_COMMAND]


def failure_rows(parsed: Page) -> dict[str, list[list]]:
    """{category: [the cells of each failure row]}, from each failure table's heading."""
    rows, category, cells = {}, None, None
    for tag, attrs, inside in parsed.elements:
        if tag == "h3" and attrs.get("id", "").startswith("fail-"):
            category = attrs["id"][5:]
            rows[category] = []
        elif tag == "tr" and attrs.get("class") == "failure":
            cells = []
            rows[category].append(cells)
        elif tag in ("td", "small", "span") and cells is not None and tag != "tr":
            cells.append((tag, attrs.get("class", ""), inside))
        elif tag in ("h3", "h2"):
            cells = None
    return rows


def test_each_failure_is_wrong_by_its_scores_and_the_others_are_judged_on_it(page):
    results, ckpts = page["results"], page["ckpts"]
    rows = failure_rows(page["parsed"])
    scored = [c for c in SHAPES_PAIRS if results[ckpts[0]][c]["count"]]  # a tiny benchmark may lack held-out pairs
    assert list(rows) == scored + [f"sugarcrepe/{n}" for n in SUGARCREPE]
    for category, shown in rows.items():
        r = results[ckpts[0]][category]
        assert len(shown) == min(FAILURES, r["count"] - round(r["accuracy"] * r["count"])), category
        for cells in shown:
            pos = float(next(c[2] for c in cells if "pos" in c[1]))
            neg = float(next(c[2] for c in cells if "neg" in c[1]))
            assert pos <= neg, (category, pos, neg)  # a tie is wrong
            verdicts = [c[2] for c in cells if c[1] in ("right", "wrong")]
            assert verdicts[0] == "wrong"  # the copy: the same model, the same verdict
            assert any(c[0] == "small" and c[2].startswith(f"{pos:.4f} vs {neg:.4f}") for c in cells)


def test_the_scores_shown_are_the_model_s(page):
    """Each SugarCrepe failure shown, scored again one example at a time: the image its file names, the two
    captions of its row."""
    model, tokenizer, _ = load_model(page["ckpts"][0], torch.device("cpu"))
    from data import eval_transform, load_image

    checked = 0
    for cells in [c for cat, rows in failure_rows(page["parsed"]).items() if cat.startswith("sugar") for c in rows]:
        name = next(c[2] for c in cells if c[1] == "image")
        texts = [c[2] for c in cells if c[0] == "td" and c[1] == "" and c[2]]
        pos, neg = (float(next(c[2] for c in cells if k in c[1])) for k in ("pos", "neg"))
        image = eval_transform(model.cfg.vision.image_size)(load_image(str(page["root"] / "sc" / "val2017" / name)))
        with torch.no_grad():
            x = model.encode_image(image[None])[0][0]
            y = model.encode_text(tokenizer(texts[:2]))
        assert [round(float(x @ y[0]), 4), round(float(x @ y[1]), 4)] == pytest.approx([pos, neg], abs=1e-4)
        checked += 1
    assert checked


def test_where_each_phrase_looks_for_the_first_failures(page):
    parsed, rows = page["parsed"], failure_rows(page["parsed"])
    figures = parsed.find("figure", "attention")
    assert len(figures) == sum(min(ATTENTION, len(shown)) for shown in rows.values())
    sheets = [e for e in parsed.elements if e[0] == "img" and "attention" in e[1]["alt"]]
    for _, attrs, _ in sheets:
        sheet = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        assert sheet.height > 3 * 160  # a row per checkpoint: all three scored every example


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_a_real_browser_draws_the_page(page, tmp_path):
    shot = tmp_path / "page.png"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += ["--window-size=1200,2400", f"--screenshot={shot}", (page["root"] / "out" / "page.html").as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2400, 1200, 3)
    assert (pixels.min(-1) < 200).mean() > 0.03  # not blank: text, tables, bars
    first = np.array([int(SERIES[0][k : k + 2], 16) for k in (1, 3, 5)])
    assert (np.abs(pixels - first).sum(-1) < 10).sum() > 500  # the first checkpoint's bars are drawn


def test_a_report_that_cannot_be_written_is_one_line(page):
    blocked = page["root"] / "file"
    blocked.write_text("")
    page_path = blocked / "page.html"
    argv = ["--ckpt", page["ckpts"][2], "--n", "5", "--workers", "0", "--report", str(page_path)]
    with pytest.raises(SystemExit) as err:
        evaluate.main(argv)
    assert err.value.code == f"error: --report {page_path}: cannot write the page ({blocked} is a file, not a folder)"
