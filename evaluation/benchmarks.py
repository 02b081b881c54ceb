"""The paper's real benchmarks: readers of the official files, and their scores.

Paper map (docs/paper.md, "What the paper reports"): the paper evaluates on SugarCrepe, SugarCrepe++, ImageNet
zero-shot and COCO / Flickr30k retrieval. The file formats are those of the official releases:
  sugarcrepe    7 JSON objects keyed by a string index (keys need not be contiguous), each value
                {filename, caption, negative_caption}, COCO val2017 images. Correct iff
                cos(image, caption) > cos(image, negative); accuracy per file, the add / replace / swap
                averages and the mean (unweighted over files)
  sugarcrepe++  5 JSON lists of {id, filename, caption, caption2, negative_caption}. ITT: both positives
                beat the negative on the image; TOT: the positives are closer to each other than either
                is to the negative (text encoder only)
  zeroshot      an ImageFolder (ImageNet val in its 1,000 wnid folders, with class names in a file) or
                torchvision's CIFAR-10/100; prompt-template ensemble, top-1 and top-5
  retrieval     the Karpathy test split, a JSON list of {image, caption: [...]}: image->text (a hit if any
                of the image's captions is in the top K) and text->image R@1, R@5, R@10
A file that is missing or not in the format stops with a message naming what was expected and where to
get it, as does one naming an image outside the image folder (absolute, or climbing out with '..'); a
benchmark is never scored on part of its images. With eval.py --download, `fetch_benchmark` gets
the official files into released/download.py's cache first (CIFAR through torchvision's own download; ImageNet,
which needs a licence, never).

Dimension legend: M benchmark examples, B images, X texts, C classes, P prompt templates, D joint width.
"""

import json
import os
import re
import sys

import torch
import torchvision
from tqdm import tqdm

from data import eval_transform, load_image
from evaluation.metrics import (
    PairScores,
    cos,
    embed_texts,
    fraction,
    group_means,
    itt_correct,
    pairwise_correct,
    retrieval_recall,
    topk_accuracy,
    tot_correct,
    zeroshot_classifier,
)
from model import CLIP
from released import download
from released.disk import DuplicateKey, unique_keys

SUGARCREPE = {
    "add": ["add_att", "add_obj"],
    "replace": ["replace_att", "replace_obj", "replace_rel"],
    "swap": ["swap_att", "swap_obj"],
}
SUGARCREPE_PP = {"replace": ["replace_att", "replace_obj", "replace_rel"], "swap": ["swap_att", "swap_obj"]}
# Zero-shot prompts when --templates is not given (a short ensemble in the spirit of CLIP's; CLIP used 18
# templates for CIFAR and 80 for ImageNet: pass those with --templates to compare with published numbers).
ZEROSHOT_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a bad photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
]

COCO_VAL2017 = "the COCO val2017 images (images.cocodataset.org/zips/val2017.zip) in IMAGES, default DIR/val2017"
LAYOUT = {
    "sugarcrepe": "Expected DIR/{add_att,add_obj,replace_att,replace_obj,replace_rel,swap_att,swap_obj}.json, the "
    f"data/ folder of github.com/RAIVNLab/sugar-crepe, and {COCO_VAL2017}.",
    "sugarcrepe++": "Expected DIR/{replace_att,replace_obj,replace_rel,swap_att,swap_obj}.json, the data/ folder of "
    f"github.com/Sri-Harsha/scpp (also huggingface.co/datasets/Aman-J/SugarCrepe_pp), and {COCO_VAL2017}.",
    "zeroshot": "Expected an ImageFolder, DIR/<class folder>/<images>, classes in sorted folder order, e.g. ImageNet's "
    "validation set (image-net.org) sorted into its 1,000 WordNet-id folders (the usual valprep.sh), with "
    "--classnames FILE giving one class name per line in that order; or --zeroshot-set cifar10 / cifar100 "
    "with torchvision's CIFAR files in DIR.",
    "retrieval": 'Expected --ann FILE, a JSON list of {"image": "<path under DIR>", "caption": ["...", ...]}: the '
    "Karpathy test split as released with BLIP (github.com/salesforce/BLIP: coco_karpathy_test.json, "
    "flickr30k_test.json), and the images under DIR: COCO's val2014/ (images.cocodataset.org/zips/"
    "val2014.zip) or Flickr30k's flickr30k-images/ (request form at shannon.cs.illinois.edu/DenotationGraph).",
}


class ImageFiles(torch.utils.data.Dataset):
    """Item i: transform(image file i), decoded in the DataLoader's workers; a corrupt file raises OSError."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index]))


def fail(message: str):
    """Stop with a message the user can act on (no traceback)."""
    sys.exit(f"error: {message}")


def preprocessing(model: CLIP) -> tuple[int, str, str]:
    """(image size, pixel normalisation, resize) of a model's evaluation images: what its weights expect."""
    return model.cfg.vision.image_size, model.cfg.vision.normalise, model.cfg.vision.resize


@torch.no_grad()  # a graph would keep every batch's activations: SugarCrepe's 1,560 images grew a B/16 to 23 GB
def embed_image_dataset(model: CLIP, dataset, args, device, desc: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Items image (C, H, W) or (image, label), decoded in DataLoader workers -> (B, D) embeddings, labels or None."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    embs, labels = [], []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch"):
            if isinstance(batch, (list, tuple)):
                batch, label = batch
                labels.append(label)
            embs.append(model.encode_image(batch.to(device))[0].float().cpu())
    except OSError as err:  # a worker's error arrives with its traceback in the message: its last line says it
        fail(f"{desc}: {str(err).strip().splitlines()[-1]}; a benchmark is scored on all of its images or not at all")
    return torch.cat(embs), (torch.cat(labels) if labels else None)  # (B, D), (B,)


@torch.no_grad()
def embed_examples(model: CLIP, tokenizer, files: dict[str, list[tuple]], args, device, name: str) -> dict:
    """files {file: [(image path, text, text, ...)]} -> {file: (images (M, D), [texts (M, D), ...])}, in the
    order of the tuples; every distinct image and text is embedded once (SugarCrepe's 7,511 examples
    share 1,560 images)."""
    paths = list(dict.fromkeys(ex[0] for exs in files.values() for ex in exs))
    texts = list(dict.fromkeys(t for exs in files.values() for ex in exs for t in ex[1:]))
    images = ImageFiles(paths, eval_transform(*preprocessing(model)))  # the model's own image size and pixels
    image_emb = embed_image_dataset(model, images, args, device, f"{name} images")[0]  # (images, D)
    text_emb = embed_texts(model, tokenizer, texts, args.batch_size, device, f"{name} texts")  # (texts, D)
    row, col = {p: i for i, p in enumerate(paths)}, {t: i for i, t in enumerate(texts)}
    return {
        f: (
            image_emb[[row[ex[0]] for ex in exs]],
            [text_emb[[col[ex[k]] for ex in exs]] for k in range(1, len(exs[0]))],
        )
        for f, exs in files.items()
    }


# ----------------------------------------------------------------------------- the real benchmarks: files


def read_json_file(path: str, bench: str):
    if not os.path.isfile(path):
        fail(f"--bench {bench}: no file {path}.\n{LAYOUT[bench]}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=unique_keys)
    except DuplicateKey as err:
        fail(
            f"--bench {bench}: {path} holds the key {err.args[0]!r} twice in one object: one of them would be "
            "dropped unseen. Fix the file, or fetch the official one again"
        )
    except ValueError as err:  # empty, truncated, not JSON, not UTF-8
        fail(f"--bench {bench}: {path} is not valid JSON ({err}){download.refetch_hint(path)}.\n{LAYOUT[bench]}")
    except RecursionError:  # json's reader recurses once per level: '[' * 100_000 exhausts the stack limit
        fail(f"--bench {bench}: {path} nests its values too deep to be a {bench} file{download.refetch_hint(path)}")


def image_path(folder: str, name: str, bench: str, where: str) -> str:
    """folder/name, or a one-line error if the name is absolute or climbs out of the folder with '..': a
    benchmark's files name images inside its image folder, and a file elsewhere must not be read and scored."""
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
        fail(f"--bench {bench}: {where} names the image {name!r}, which is not inside {folder}")
    return os.path.join(folder, name)


def check_images(paths: list[str], bench: str) -> None:
    """Every image a benchmark names must exist: a score on part of a benchmark is not its score."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        fail(
            f"--bench {bench}: {len(missing)} of {len(set(paths))} images are missing, e.g. {missing[0]}.\n"
            + LAYOUT[bench]
        )


def load_sugarcrepe(data_dir: str, images: str, bench: str = "sugarcrepe") -> dict[str, list[tuple]]:
    """SugarCrepe's files -> {file: [(image path, caption, negative)]}; SugarCrepe++'s (bench='sugarcrepe++')
    -> {file: [(image path, caption, caption2, negative)]}. SugarCrepe: a JSON object keyed by a string index
    (keys need not be contiguous); SugarCrepe++: a JSON list of records."""
    if bench == "sugarcrepe":
        groups, fields = SUGARCREPE, ["caption", "negative_caption"]
    else:
        groups, fields = SUGARCREPE_PP, ["caption", "caption2", "negative_caption"]
    files = {}
    for name in [n for names in groups.values() for n in names]:
        path = os.path.join(data_dir, name + ".json")
        data = read_json_file(path, bench)
        if not isinstance(data, dict if bench == "sugarcrepe" else list) or not data:
            fail(
                f"--bench {bench}: {path} is not in the official format{download.refetch_hint(path)}.\n{LAYOUT[bench]}"
            )
        records = data.items() if bench == "sugarcrepe" else enumerate(data)
        files[name] = []
        for key, r in records:
            texts = [r.get(k) for k in ["filename", *fields]] if isinstance(r, dict) else [None]
            if not all(isinstance(t, str) and t.strip() for t in texts):  # a record is scored whole, or not at all
                needs = ", ".join(["filename", *fields])
                fail(f"--bench {bench}: record {key!r} of {path} needs non-empty {needs}.\n{LAYOUT[bench]}")
            files[name].append((image_path(images, texts[0], bench, f"record {key!r} of {path}"), *texts[1:]))
    check_images([ex[0] for exs in files.values() for ex in exs], bench)
    return files


def load_zeroshot(data_dir: str, args) -> tuple[torch.utils.data.Dataset, list[str], list[str]]:
    """-> (dataset of (PIL image, label), class names, templates)."""
    if args.zeroshot_set == "imagefolder":
        try:
            dataset = torchvision.datasets.ImageFolder(data_dir, loader=load_image)
        except (FileNotFoundError, RuntimeError) as err:
            fail(f"--bench zeroshot: {err}\n{LAYOUT['zeroshot']}")
        names = [c.replace("_", " ") for c in dataset.classes]
        if not args.classnames and all(re.fullmatch(r"n\d{8}", c) for c in dataset.classes):
            fail(
                f"--bench zeroshot: the class folders of {data_dir} are WordNet ids (ImageNet): pass --classnames "
                "FILE, one name per line in sorted folder order (see docs/real-data.md)."
            )
    else:
        cifar = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[args.zeroshot_set]
        fetch = f"torchvision.datasets.{cifar.__name__}('{data_dir}', train=False, download=True)"
        try:  # the test split; downloaded by torchvision (and checked by its MD5) with eval.py --download only
            dataset = cifar(data_dir, train=False, download=getattr(args, "download", False))
        except RuntimeError:
            fail(
                f"--bench zeroshot: torchvision's {cifar.__name__} files are not in {data_dir}. Pass --download, "
                f'or fetch them once with\n  python -c "import torchvision; {fetch}"'
            )
        except OSError as err:  # offline: urllib's error, raised through torchvision
            fail(
                f"--bench zeroshot --download: torchvision could not download {cifar.__name__} into {data_dir} "
                f"({err}); offline? run {fetch} where there is internet and copy the files to {data_dir}"
            )
        names = [c.replace("_", " ") for c in dataset.classes]  # built in: 'maple_tree' -> 'maple tree'
    if args.classnames:
        with open(args.classnames) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != len(dataset.classes):
            fail(
                f"--classnames: {len(names)} names in {args.classnames} "
                f"for {len(dataset.classes)} classes in {data_dir}"
            )
    templates = ZEROSHOT_TEMPLATES
    if args.templates:
        with open(args.templates) as f:
            templates = [line.strip() for line in f if line.strip()]
        if not templates or not all("{}" in t for t in templates):
            fail(f"--templates: {args.templates} must hold templates, one per line, each with {{}} for the class name")
    return dataset, names, templates


def fetch_benchmark(bench: str, args) -> tuple[str, str | None, str | None]:
    """eval.py --download for a benchmark given no --data-dir: its official files fetched once into the cache
    (download.FILES, checked) -> (data folder, images folder or None, annotation file or None)."""
    try:
        if bench in ("sugarcrepe", "sugarcrepe++"):
            groups = SUGARCREPE if bench == "sugarcrepe" else SUGARCREPE_PP
            paths = [download.fetch(f"{bench}/{n}.json", args.cache_dir) for ns in groups.values() for n in ns]
            images = args.images or os.path.join(download.fetch_zip("coco/val2017.zip", args.cache_dir), "val2017")
            return os.path.dirname(paths[0]), images, None
        if bench == "zeroshot":  # CIFAR only (eval.py refuses --download for an ImageFolder): torchvision fetches it
            return os.path.join(download.cache_dir(args.cache_dir), "cifar"), None, None
        ann = args.ann or download.fetch("coco/coco_karpathy_test.json", args.cache_dir)
        return download.fetch_zip("coco/val2014.zip", args.cache_dir), None, ann  # image paths are val2014/...
    except download.DownloadError as err:
        fail(f"--bench {bench} --download: {err}")


def load_retrieval(data_dir: str, ann: str) -> tuple[list[str], list[str], torch.Tensor]:
    """Karpathy-split JSON -> (image paths (B), captions (X), text_image (X,): the image of each caption)."""
    ann = ann if os.path.isfile(ann) else os.path.join(data_dir, ann)
    records = read_json_file(ann, "retrieval")
    if (
        not isinstance(records, list)
        or not records
        or not all(isinstance(r, dict) and "image" in r and "caption" in r for r in records)
    ):
        fail(
            f"--bench retrieval: {ann} is not in the expected format{download.refetch_hint(ann)}.\n"
            + LAYOUT["retrieval"]
        )
    paths, texts, text_image = [], [], []
    for i, r in enumerate(records):
        if not isinstance(r["image"], str) or not r["image"].strip():
            fail(f"--bench retrieval: record {i} of {ann} needs an image path under DIR, not {r['image']!r}")
        captions = [r["caption"]] if isinstance(r["caption"], str) else r["caption"]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
            fail(f"--bench retrieval: record {i} of {ann} ({r['image']}) needs a non-empty list of captions")
        paths.append(image_path(data_dir, r["image"], "retrieval", f"record {i} of {ann}"))
        texts += captions
        text_image += [i] * len(captions)
    check_images(paths, "retrieval")
    return paths, texts, torch.tensor(text_image)


# ----------------------------------------------------------------------------- the real benchmarks: scores
# Each scorer takes `records` (eval.py --report); SugarCrepe's pairs fill it, the others have nothing to add.


def evaluate_sugarcrepe(model: CLIP, tokenizer, files: dict, args, device, records: dict | None = None) -> dict:
    """Accuracy per file, per group and their mean. `records`, when given, receives each file's examples with
    their scores ({metric: PairScores}, for eval.py --report)."""
    per_file = {}
    for name, (image, (pos, neg)) in embed_examples(model, tokenizer, files, args, device, "sugarcrepe").items():
        pos_score, neg_score = cos(image, pos), cos(image, neg)  # (M,), (M,)
        per_file[name] = fraction(pairwise_correct(pos_score, neg_score))
        if records is not None:
            paths, true, negative = (list(t) for t in zip(*files[name]))
            records[f"sugarcrepe/{name}"] = PairScores(paths, true, negative, pos_score, neg_score)
    return {f"sugarcrepe/{k}": v for k, v in (per_file | group_means(per_file, SUGARCREPE)).items()}


def evaluate_sugarcrepe_pp(model: CLIP, tokenizer, files: dict, args, device, records: dict | None = None) -> dict:
    itt, tot = {}, {}
    for name, (image, (p1, p2, neg)) in embed_examples(model, tokenizer, files, args, device, "sugarcrepe++").items():
        itt[name] = fraction(itt_correct(cos(image, p1), cos(image, p2), cos(image, neg)))
        tot[name] = fraction(tot_correct(cos(p1, p2), cos(p1, neg), cos(p2, neg)))
    results = {}
    for task, per_file in (("ITT", itt), ("TOT", tot)):
        results |= {f"sugarcrepe++/{task}/{k}": v for k, v in (per_file | group_means(per_file, SUGARCREPE_PP)).items()}
    return results


def evaluate_zeroshot(model: CLIP, tokenizer, data: tuple, args, device, records: dict | None = None) -> dict:
    dataset, names, templates = data
    dataset.transform = eval_transform(*preprocessing(model))
    image_emb, labels = embed_image_dataset(model, dataset, args, device, "zeroshot images")  # (B, D), (B,)
    prompts = embed_texts(
        model, tokenizer, [t.format(n) for n in names for t in templates], args.batch_size, device, "zeroshot prompts"
    )
    classifier = zeroshot_classifier(prompts.view(len(names), len(templates), -1))  # (C, D)
    accuracy = topk_accuracy(image_emb @ classifier.T, labels, (1, 5))  # logits (B, C)
    return {f"zeroshot/top{k}": {"accuracy": v, "count": len(labels)} for k, v in accuracy.items()}


def evaluate_retrieval(model: CLIP, tokenizer, data: tuple, args, device, records: dict | None = None) -> dict:
    paths, texts, text_image = data
    images = ImageFiles(paths, eval_transform(*preprocessing(model)))
    image_emb = embed_image_dataset(model, images, args, device, "retrieval images")[0]  # (B, D)
    text_emb = embed_texts(model, tokenizer, texts, args.batch_size, device, "retrieval texts")  # (X, D)
    recall = retrieval_recall(image_emb @ text_emb.T, text_image)  # sim (B, X)
    return {
        f"retrieval/{k}": {"accuracy": v, "count": len(paths) if k.startswith("i2t") else len(texts)}
        for k, v in recall.items()
    }
