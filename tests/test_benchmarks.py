"""eval.py's real benchmarks end to end on fixtures in the official formats, checked against a naive
one-example-at-a-time computation, and their error messages."""

import json
import os

import pytest
import torch

import eval as evaluate
from data import eval_transform, load_image
from evaluation.benchmarks import ZEROSHOT_TEMPLATES
from evaluation.shapes_benchmark import ShapesBenchmark, evaluate_shapes
from fixtures import (
    SUGARCREPE_FILES,
    SUGARCREPE_PP_FILES,
    write_checkpoint,
    write_imagefolder,
    write_karpathy,
    write_sugarcrepe,
    write_sugarcrepe_pp,
)
from run.checkpoint import load_model
from sources.shapes import ShapesWorld


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    d = {
        "sc": write_sugarcrepe(str(root / "sugar-crepe")),
        "scpp": write_sugarcrepe_pp(str(root / "scpp")),
        "zs": write_imagefolder(str(root / "imagenet_val")),
        "ann": write_karpathy(str(root / "coco")),
        "coco": str(root / "coco"),
        "a": write_checkpoint(str(root / "a" / "ckpt.pt"), image_size=16),
        "b": write_checkpoint(str(root / "b" / "ckpt.pt"), image_size=24, seed=1),  # another image size
        "classnames": str(root / "classnames.txt"),
        "templates": str(root / "templates.txt"),
        "root": root,
    }
    open(d["classnames"], "w").write("cat\ndog\nred car\n")
    open(d["templates"], "w").write("a photo of a {}.\na picture of the {}.\n")
    return d


FAST = ["--workers", "0", "--batch-size", "4"]
CPU = torch.device("cpu")


def run_all(bench, out):
    return evaluate.main(
        [
            "--ckpt",
            bench["a"],
            bench["b"],
            "--bench",
            "sugarcrepe",
            "sugarcrepe++",
            "zeroshot",
            "retrieval",
            "shapes",
            "--data-dir",
            f"sugarcrepe={bench['sc']}",
            f"sugarcrepe++={bench['scpp']}",
            f"zeroshot={bench['zs']}",
            f"retrieval={bench['coco']}",
            "--images",
            os.path.join(bench["sc"], "val2017"),
            "--ann",
            bench["ann"],
            "--classnames",
            bench["classnames"],
            "--templates",
            bench["templates"],
            "--n",
            "5",
            "--json",
            str(out),
            *FAST,
        ]
    )


def real_bench_argv(bench, ckpt, templates=True):
    """eval.py's flags for the four real benchmarks of the fixture, for one checkpoint."""
    folders = {"sugarcrepe": "sc", "sugarcrepe++": "scpp", "zeroshot": "zs", "retrieval": "coco"}
    dirs = [f"{name}={bench[key]}" for name, key in folders.items()]
    argv = ["--ckpt", ckpt, "--bench", "sugarcrepe", "sugarcrepe++", "zeroshot", "retrieval", "--data-dir", *dirs]
    argv += ["--images", os.path.join(bench["sc"], "val2017"), "--ann", bench["ann"]]
    argv += ["--classnames", bench["classnames"]]
    return argv + (["--templates", bench["templates"]] if templates else []) + FAST


def real_benchmarks_alone(bench, ckpt):
    """The four real benchmarks of one checkpoint, in a call of its own."""
    return evaluate.main(real_bench_argv(bench, ckpt))[ckpt]


def test_every_benchmark_in_one_call_two_checkpoints_side_by_side(bench, capsys):
    results = run_all(bench, bench["root"] / "r.json")
    table = capsys.readouterr().out
    assert f"| metric | n | {bench['a']} | {bench['b']} |" in table and "| sugarcrepe/swap | 13 |" in table
    saved = json.load(open(bench["root"] / "r.json"))
    assert saved["results"] == results and saved["bench"][0] == "sugarcrepe"
    for ckpt in (bench["a"], bench["b"]):
        r = results[ckpt]
        # SugarCrepe: file f holds f + 1 examples under non-contiguous keys
        assert [r[f"sugarcrepe/{n}"]["count"] for n in SUGARCREPE_FILES] == [1, 2, 3, 4, 5, 6, 7]
        assert (r["sugarcrepe/add"]["count"], r["sugarcrepe/replace"]["count"], r["sugarcrepe/swap"]["count"]) == (
            3,
            12,
            13,
        )
        files = [r[f"sugarcrepe/{n}"]["accuracy"] for n in SUGARCREPE_FILES]
        assert r["sugarcrepe/mean"]["accuracy"] == pytest.approx(sum(files) / 7)
        assert r["sugarcrepe/swap"]["accuracy"] == pytest.approx((files[5] + files[6]) / 2)
        for task in ("ITT", "TOT"):
            assert [r[f"sugarcrepe++/{task}/{n}"]["count"] for n in SUGARCREPE_PP_FILES] == [2] * 5
            assert r[f"sugarcrepe++/{task}/replace"]["count"] == 6 and r[f"sugarcrepe++/{task}/mean"]["count"] == 10
        assert r["zeroshot/top1"]["count"] == 6 and r["zeroshot/top5"]["count"] == 6
        assert r["retrieval/i2t-R@1"]["count"] == 3 and r["retrieval/t2i-R@1"]["count"] == 6
        assert r["swap-att"]["count"] == 5  # the shapes benchmark in the same table
        # Each column is its own checkpoint's alone: the real benchmarks as scored for it by itself, and the
        # shapes benchmark drawn at its own image size (a: 16 px, b: 24 px), nothing taken from the other.
        model, tokenizer, _ = load_model(ckpt, CPU)
        shapes = evaluate_shapes(model, tokenizer, ShapesBenchmark(ShapesWorld(model.cfg.vision.image_size), n=5), CPU)
        assert model.cfg.vision.image_size == (16 if ckpt == bench["a"] else 24)
        assert r == real_benchmarks_alone(bench, ckpt) | shapes


def encode(model, tokenizer, image_path=None, text=None):
    with torch.no_grad():
        if image_path:
            image = eval_transform(model.cfg.vision.image_size)(load_image(image_path))[None]
            return model.encode_image(image)[0][0]
        return model.encode_text(tokenizer([text]))[0]


def test_scores_match_a_naive_loop(bench):
    results = evaluate.main(real_bench_argv(bench, bench["b"], templates=False))[bench["b"]]
    model, tok, _ = load_model(bench["b"], torch.device("cpu"))
    images = os.path.join(bench["sc"], "val2017")
    for name in SUGARCREPE_FILES:
        examples = json.load(open(os.path.join(bench["sc"], name + ".json"))).values()
        correct = []
        for ex in examples:
            x = encode(model, tok, os.path.join(images, ex["filename"]))
            correct.append(
                float(x @ encode(model, tok, text=ex["caption"]) > x @ encode(model, tok, text=ex["negative_caption"]))
            )
        assert results[f"sugarcrepe/{name}"]["accuracy"] == pytest.approx(sum(correct) / len(correct)), name
    itt, tot = [], []
    for ex in json.load(open(os.path.join(bench["scpp"], "swap_obj.json"))):
        x = encode(model, tok, os.path.join(images, ex["filename"]))
        p1, p2, n = (encode(model, tok, text=ex[k]) for k in ("caption", "caption2", "negative_caption"))
        itt.append(float(x @ p1 > x @ n and x @ p2 > x @ n))
        tot.append(float(p1 @ p2 > p1 @ n and p1 @ p2 > p2 @ n))
    assert results["sugarcrepe++/ITT/swap_obj"]["accuracy"] == pytest.approx(sum(itt) / 2)
    assert results["sugarcrepe++/TOT/swap_obj"]["accuracy"] == pytest.approx(sum(tot) / 2)
    names, hits = ["cat", "dog", "red car"], []
    classes = []
    for c in names:
        prompts = torch.stack([encode(model, tok, text=t.format(c)) for t in ZEROSHOT_TEMPLATES])
        classes.append(torch.nn.functional.normalize(prompts.mean(0), dim=0))
    for label, folder in enumerate(["cat", "dog", "red_car"]):
        for f in sorted(os.listdir(os.path.join(bench["zs"], folder))):
            scores = torch.stack(classes) @ encode(model, tok, os.path.join(bench["zs"], folder, f))
            hits.append(float((scores >= scores[label]).sum() == 1))
    assert results["zeroshot/top1"]["accuracy"] == pytest.approx(sum(hits) / len(hits))
    # retrieval, one image and one caption at a time; a rank counts the wrong candidates scoring at least as
    # high as the right one (ties against the model). With 3 images only R@1 can miss: R@5 and R@10 are 1.
    records = json.load(open(bench["ann"]))
    images = [encode(model, tok, os.path.join(bench["coco"], r["image"])) for r in records]
    texts = [(i, encode(model, tok, text=c)) for i, r in enumerate(records) for c in r["caption"]]
    i2t_hits, t2i_hits = [], []
    for i, x in enumerate(images):
        best = max(float(x @ y) for owner, y in texts if owner == i)  # the image's best caption
        i2t_hits.append(float(sum(float(x @ y) >= best for owner, y in texts if owner != i) == 0))
    for owner, y in texts:
        right = float(images[owner] @ y)
        t2i_hits.append(float(sum(float(x @ y) >= right for i, x in enumerate(images) if i != owner) == 0))
    assert (len(i2t_hits), len(t2i_hits)) == (3, 6)
    assert results["retrieval/i2t-R@1"]["accuracy"] == pytest.approx(sum(i2t_hits) / 3)
    assert results["retrieval/t2i-R@1"]["accuracy"] == pytest.approx(sum(t2i_hits) / 6)


def fails_with(argv, needle, capsys=None):
    with pytest.raises(SystemExit) as err:
        evaluate.main(argv + FAST)
    message = str(err.value.code) if capsys is None else capsys.readouterr().err
    assert needle in message, message


def test_missing_data_names_the_layout_and_the_source(bench, tmp_path, capsys):
    a = ["--ckpt", bench["a"]]
    fails_with([*a, "--bench", "sugarcrepe", "--data-dir", str(tmp_path)], "github.com/RAIVNLab/sugar-crepe")
    fails_with([*a, "--bench", "sugarcrepe", "--data-dir", bench["sc"], "--images", str(tmp_path)], "val2017.zip")
    fails_with(
        [*a, "--bench", "sugarcrepe++", "--data-dir", bench["sc"]], "Sri-Harsha/scpp"
    )  # SugarCrepe's files, not ++
    fails_with([*a, "--bench", "zeroshot", "--data-dir", str(tmp_path / "none")], "ImageFolder")
    fails_with([*a, "--bench", "zeroshot", "--zeroshot-set", "cifar10", "--data-dir", str(tmp_path)], "download=True")
    fails_with(
        [*a, "--bench", "retrieval", "--data-dir", bench["coco"], "--ann", str(tmp_path / "x.json")],
        "coco_karpathy_test.json",
    )
    fails_with(
        [*a, "--bench", "zeroshot", "--data-dir", bench["zs"], "--classnames", bench["templates"]], "--classnames"
    )
    fails_with([*a, "--bench", "retrieval", "--data-dir", bench["coco"]], "--ann", capsys)
    fails_with([*a, "--bench", "sugarcrepe"], "--data-dir", capsys)
    os.remove(os.path.join(bench["coco"], "val2014", "COCO_val2014_000000000002.jpg"))
    fails_with(
        [*a, "--bench", "retrieval", "--data-dir", bench["coco"], "--ann", bench["ann"]], "1 of 3 images are missing"
    )
    write_karpathy(bench["coco"])  # put it back for the other tests


def test_imagenet_wnid_folders_need_classnames(tmp_path):
    root = write_imagefolder(str(tmp_path / "val"), classes=("n01440764", "n01443537"), per_class=1)
    fails_with(["--ckpt", "unused.pt", "--bench", "zeroshot", "--data-dir", root], "--classnames FILE")
