"""Evaluate checkpoints side by side on the paper's three axes: compositionality, zero-shot, retrieval.

  python eval.py                                                     # evaluates runs/c2lip/ckpt.pt
  python eval.py --ckpt runs/siglip/ckpt.pt runs/c2lip/ckpt.pt --json results.json
  python eval.py --ckpt ViT-B-16.pt runs/finetuned/ckpt.pt   # OpenAI's CLIP as released, beside a fine-tune
  python eval.py --ckpt A.pt B.pt --bench sugarcrepe --data-dir sugar-crepe/data --images coco/val2017
  python eval.py --ckpt openai/ViT-B-16 A.pt --bench sugarcrepe sugarcrepe++ --download   # nothing by hand
  python eval.py --bench sugarcrepe++ --data-dir scpp/data --images coco/val2017
  python eval.py --bench zeroshot --data-dir imagenet/val --classnames imagenet_classes.txt
  python eval.py --bench zeroshot --zeroshot-set cifar10 --data-dir ~/data/cifar   # torchvision's files
  python eval.py --bench retrieval --data-dir coco --ann coco/coco_karpathy_test.json
  python eval.py --bench sugarcrepe zeroshot --data-dir sugarcrepe=sc/data zeroshot=imagenet/val ...
  python eval.py --show 3 --concepts "a red circle" "a tiny blue star" --ckpt A.pt B.pt --out attention.png

Paper map (docs/paper.md, "What the paper reports"). `--bench shapes` (the default) is the shapes benchmark
(evaluation/shapes_benchmark.py): SugarCrepe's categories generated exactly on held-out scenes, retrieval and
zero-shot; the real benchmarks (SugarCrepe, SugarCrepe++, zero-shot, retrieval) are read and scored on their
official files (evaluation/benchmarks.py); every metric is a pure function of scores (evaluation/metrics.py) in
which ties count against the model. A checkpoint is one of ours, OpenAI's CLIP release or an open_clip state dict
(released/weights.py), each evaluated with the tokenizer, image size and pixel normalisation it was trained with.
`--show` draws, instead, where each phrase looks in an image: its pooling weights over the patches
(run/pictures.py). `--download` fetches the official benchmark files into a cache folder first, and a released model
can be named instead of a file (`openai/ViT-B-16`): released/download.py. Evaluation records no autograd graph
(torch.inference_mode).

Departure: the paper reports the real benchmarks only; `--bench shapes` is the same protocol on a world
where each category is generated exactly, with counts.
"""

import argparse
import os

import torch
from tqdm import tqdm

from data import image_to_tensor
from evaluation import benchmarks
from evaluation.flags import add_benchmark_flags, check_benchmark_args
from evaluation.shapes_benchmark import ShapesBenchmark, checkpoint_world, evaluate_shapes
from released.disk import write_json
from released.weights import WEIGHT_NAMES, add_weight_flags, weight_options
from run.checkpoint import load_model
from run.devices import add_device_flag, pick_device
from run.flags import HelpFormatter
from run.pictures import attention_maps, attention_picture, show_image
from run.report import write_report
from sources.shapes import WORLDS, ShapesWorld


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ckpt = f"checkpoints to compare, a column each: our checkpoints, CLIP weights files, {WEIGHT_NAMES}"
    p.add_argument("--ckpt", nargs="+", default=["runs/c2lip/ckpt.pt"], metavar="PATH_OR_NAME", help=ckpt)
    add_benchmark_flags(p)  # evaluation/flags.py: --bench, each benchmark's files, --n, --score, ...
    add_device_flag(p)
    p.add_argument("--json", default=None, help="also write the results, with counts, to this JSON file")
    p.add_argument(
        "--report",
        default=None,
        metavar="PATH",
        help="also write one HTML page (run/report.py): the table as charts, the runs' loss curves, the "
        "first checkpoint's failures with their images, and where each phrase looks",
    )
    add_weight_flags(p)
    show = p.add_argument_group("--show: where each phrase looks, instead of benchmarks").add_argument
    image = "a shapes test scene index of --bench-seed, or an image file: the pooling weights over the patches"
    show("--show", default=None, metavar="IMAGE_OR_INDEX", help=image + " for each of --concepts, a row per --ckpt")
    show("--concepts", nargs="+", default=None, metavar="PHRASE", help="the phrases to draw")
    show("--out", default="attention.png", help="the PNG to write")
    args = p.parse_args(argv)
    if (args.show is None) != (args.concepts is None):
        p.error("--show and --concepts go together: --show IMAGE_OR_INDEX --concepts PHRASE [PHRASE ...]")
    return check_benchmark_args(p, args)


def checkpoint_tau(args, ckpt: dict) -> float:
    """--tau, else the pooling temperature the checkpoint was trained with, else the paper's 1."""
    return args.tau if args.tau is not None else float((ckpt.get("args") or {}).get("tau", 1.0))


def show_attention(args, device) -> str:
    """--show: the attention picture of every --ckpt (a row each) for --concepts, written to --out."""
    rows, titles, image = [], [], None
    for path in args.ckpt:
        model, tokenizer, ckpt = load_model(path, device, **weight_options(args))
        tau, size = checkpoint_tau(args, ckpt), model.cfg.vision.image_size
        try:
            picture = show_image(args.show, size, args.bench_seed, checkpoint_world(ckpt))
        except OSError as err:  # not a file, or an image that cannot be decoded
            benchmarks.fail(str(err))
        image = picture if image is None else image  # the first model's copy is drawn; each model reads its own
        pixels = image_to_tensor(picture, model.cfg.vision.normalise)
        rows.append(attention_maps(model, tokenizer, pixels, args.concepts, tau, device))
        titles.append(f"{path}  (tau {tau:g})")
    attention_picture(image, rows, args.concepts, titles).save(args.out)
    print(f"wrote {args.out}")
    return args.out


def read_benchmarks(args) -> dict:
    """Every real benchmark's files (fetched first with --download), read and checked before any model runs."""
    data = {}
    for bench, folder in args.dirs.items():
        images, ann = args.images, args.ann
        if folder is None:  # --download and no --data-dir: the cache's copy, fetched now if it is not there
            folder, images, ann = benchmarks.fetch_benchmark(bench, args)
            args.dirs[bench] = folder  # recorded in --json
        if bench in ("sugarcrepe", "sugarcrepe++"):
            data[bench] = benchmarks.load_sugarcrepe(folder, images or os.path.join(folder, "val2017"), bench)
        elif bench == "zeroshot":
            data[bench] = benchmarks.load_zeroshot(folder, args)
        elif bench == "retrieval":
            data[bench] = benchmarks.load_retrieval(folder, ann)
    return data


SCORERS = {
    "sugarcrepe": benchmarks.evaluate_sugarcrepe,
    "sugarcrepe++": benchmarks.evaluate_sugarcrepe_pp,
    "zeroshot": benchmarks.evaluate_zeroshot,
    "retrieval": benchmarks.evaluate_retrieval,
}


def markdown_table(results: dict[str, dict]) -> str:
    names = list(results)
    metrics = list(next(iter(results.values())))
    lines = ["| metric | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for m in metrics:
        count = next(iter(results.values()))[m]["count"]
        lines.append(f"| {m} | {count} | " + " | ".join(f"{results[n][m]['accuracy']:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict | str:
    args = get_args(argv)
    # Evaluation never records an autograd graph, whichever helper forgets its no_grad: a graph keeps every
    # batch's activations alive (docs/failures.md).
    with torch.inference_mode():
        return run(args)


def run(args) -> dict | str:
    """The --show picture, or every --bench for every --ckpt: printed as one table, and written to --json."""
    device = pick_device(args.device)
    if args.show is not None:
        return show_attention(args, device)
    data = read_benchmarks(args)
    results, shapes, shapes_key = {}, None, None
    records = {path: {} for path in args.ckpt} if args.report else {}  # --report: every pair's scores
    for path in tqdm(args.ckpt, desc="checkpoints", disable=len(args.ckpt) == 1):
        model, tokenizer, ckpt = load_model(path, device, **weight_options(args))
        size, normalise = model.cfg.vision.image_size, model.cfg.vision.normalise
        results[path] = {}
        for bench in args.bench:
            if bench != "shapes":
                results[path] |= SCORERS[bench](model, tokenizer, data[bench], args, device, records.get(path))
                continue
            key = (size, normalise, checkpoint_world(ckpt))  # a benchmark fits the models of one key
            if key != shapes_key:
                world = ShapesWorld(size, **WORLDS[key[2]])
                shapes, shapes_key = ShapesBenchmark(world, args.n, args.bench_seed, normalise=normalise), key
            for score in dict.fromkeys(args.score):
                tau = checkpoint_tau(args, ckpt)
                kept = records.get(path)
                results[path] |= evaluate_shapes(model, tokenizer, shapes, device, args.batch_size, score, tau, kept)
    print(markdown_table(results))
    if args.json:
        record = {"bench": args.bench, "data": args.dirs, "n": args.n, "bench_seed": args.bench_seed}
        write_json(args.json, record | {"results": results}, indent=1)
        print(f"wrote {args.json}")
    if args.report:
        del model  # the page loads each checkpoint again, one at a time: not beside this one
        print(f"wrote {write_report(args.report, args, results, records, data, device)}")
    return results


if __name__ == "__main__":
    main()
