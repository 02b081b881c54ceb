"""eval.py's benchmark flags: which benchmarks, where each one's files are, and how the shapes benchmark is
scored; every wrong value is an argparse error naming its flag, before any model is read.

  add_benchmark_flags   --bench, --n, --bench-seed, --data-dir, --download, each benchmark's own files, --score, --tau
  check_benchmark_args  the checks, and args.dirs: {bench: its folder, or None for one --download fetches}

Not part of the paper.
"""

import argparse

from evaluation import benchmarks
from evaluation.shapes_benchmark import BENCH_SEED

BENCHES = ["shapes", "sugarcrepe", "sugarcrepe++", "zeroshot", "retrieval"]


def add_benchmark_flags(p: argparse.ArgumentParser) -> None:
    bench = p.add_argument_group("benchmarks").add_argument
    bench("--bench", nargs="+", default=["shapes"], choices=BENCHES, help="benchmarks to run, in one table")
    bench("--n", type=int, default=1000, help="held-out scenes in the shapes benchmark")
    bench("--bench-seed", type=int, default=BENCH_SEED, help="seed that draws the shapes benchmark")
    folders = "the real benchmarks' data: one DIR for all, or BENCH=DIR each; sugarcrepe(++): the JSON files, "
    folders += "zeroshot: the ImageFolder (or CIFAR) root, retrieval: the images' root"
    bench("--data-dir", nargs="+", default=[], metavar="[BENCH=]DIR", help=folders)
    fetch = "fetch the benchmarks' official files into --cache-dir first (once; checked), for each benchmark given "
    fetch += "no --data-dir: sugarcrepe(++) their JSON files and COCO val2017 (1 GB), retrieval the Karpathy COCO "
    fetch += "test split and COCO val2014 (6 GB), zeroshot CIFAR through torchvision (ImageNet needs a licence)"
    bench("--download", action="store_true", help=fetch)
    bench("--images", default=None, help="sugarcrepe, sugarcrepe++: the COCO val2017 folder (default DIR/val2017)")
    sets = ["imagefolder", "cifar10", "cifar100"]
    where = "zeroshot: an ImageFolder (ImageNet val ...), or torchvision's CIFAR-10/100 test files in DIR"
    bench("--zeroshot-set", default="imagefolder", choices=sets, help=where)
    bench("--classnames", default=None, help="zeroshot: class names, one per line, in sorted class-folder order")
    bench("--templates", default=None, help="zeroshot: prompt templates, one per line, {} for the class name")
    bench("--ann", default=None, help="retrieval: Karpathy-split JSON list of {image, caption: [...]}")
    bench("--batch-size", type=int, default=256, help="images or texts per forward pass")
    bench("--workers", type=int, default=4, help="DataLoader processes that decode benchmark images")
    score = "shapes: plain (the paper's global-embedding cosine) and/or pooled (each image pooled by the text it is "
    score += "scored against, a diagnostic; its metrics are named pooled/...)"
    bench("--score", nargs="+", default=["plain"], choices=["plain", "pooled"], help=score)
    tau = "pooling temperature of --score pooled and --show (default: the checkpoint's training --tau, else 1)"
    bench("--tau", type=float, default=None, help=tau)


def check_benchmark_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """args, checked (p.error on the first problem), with args.bench deduplicated and args.dirs set."""
    if args.tau is not None and args.tau <= 0:
        p.error("--tau must be positive")
    if "pooled" in args.score and set(args.bench) != {"shapes"}:
        p.error("--score pooled applies to --bench shapes only")
    if args.n < 5:
        p.error("--n must be at least 5 (R@5 needs five captions)")
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be at least 1 and --workers at least 0")
    if "retrieval" in args.bench and not args.ann and not args.download:
        p.error(f"--bench retrieval needs --ann FILE.\n{benchmarks.LAYOUT['retrieval']}")
    args.bench = list(dict.fromkeys(args.bench))
    args.dirs = bench_dirs(args.data_dir, args.bench, p, args.download)
    if args.download and "zeroshot" in args.bench and args.zeroshot_set == "imagefolder":
        p.error(
            "--download cannot fetch ImageNet (its images need a licence from image-net.org): give --data-dir, "
            f"or --zeroshot-set cifar10 / cifar100.\n{benchmarks.LAYOUT['zeroshot']}"
        )
    return args


def bench_dirs(values: list[str], benches: list[str], parser, download: bool = False) -> dict[str, str | None]:
    """--data-dir values, 'DIR' (every benchmark) or 'BENCH=DIR' -> {bench: DIR} for the real benchmarks asked for;
    None for a benchmark with no folder that --download fetches."""
    named = dict(v.split("=", 1) for v in values if v.split("=", 1)[0] in BENCHES)
    plain = [v for v in values if v.split("=", 1)[0] not in BENCHES]
    if len(plain) > 1:
        parser.error("--data-dir takes one plain DIR; name the others BENCH=DIR")
    dirs = {b: named.get(b, plain[0] if plain else None) for b in benches if b != "shapes"}
    for bench, folder in dirs.items():
        if folder is None and not download:
            parser.error(
                f"--bench {bench} needs --data-dir DIR (or {bench}=DIR), or --download.\n{benchmarks.LAYOUT[bench]}"
            )
    return dirs
