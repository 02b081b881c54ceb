"""Tiny copies of the real data formats, written by the tests themselves:
CC3M tar shards (img2dataset style and the re-hosted style), SugarCrepe, SugarCrepe++, an ImageFolder,
a Karpathy retrieval split, and a small checkpoint in train.py's format."""

import io
import json
import os
import tarfile

import torch
from PIL import Image

from data import WordTokenizer
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from run.checkpoint import save_checkpoint

COLOURS = [(200, 30, 30), (30, 160, 60), (40, 70, 220), (230, 210, 40), (240, 240, 240), (20, 20, 20)]


def image_bytes(i: int, size=(40, 30), fmt: str = "JPEG") -> bytes:
    """A small non-square picture: two colour blocks, different for each i."""
    img = Image.new("RGB", size, COLOURS[i % len(COLOURS)])
    img.paste(COLOURS[(i + 2) % len(COLOURS)], (0, 0, size[0] // 2, size[1] // 2))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def save_image(path: str, i: int, size=(40, 30)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(image_bytes(i, size))


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# Shard 00000 (img2dataset): 9-digit keys, .jpg + .txt + .json (with the authors' extra fields), and
# _stats.json and .parquet beside it. Sample 2's JPEG is truncated, sample 3's caption is empty, sample 4
# has no image member.
IMG2DATASET = [
    (
        "000000000",
        "a dog chasing a red ball on the grass",
        "A brown dog runs after a red ball.",
        ["a brown dog", "a red ball"],
    ),
    (
        "000000001",
        "two people sitting at a wooden table",
        "Two women sit at a wooden table.",
        ["two women", "a wooden table"],
    ),
    ("000000002", "a cat sleeping on a sofa", "A grey cat on a sofa.", ["a grey cat", "a sofa"]),
    ("000000003", "   ", "An empty street.", ["an empty street"]),
    ("000000004", "a red car parked by the road", "A red car by the road.", ["a red car", "the road"]),
    (
        "000000005",
        "a plate of food with rice and broccoli",
        "A plate of rice and broccoli.",
        ["a plate", "rice", "broccoli"],
    ),
]
# Shard 00001 (the re-hosted copy): .txt only, no .json; one image is a PNG.
REHOSTED = [
    ("s0001_0000", "a man riding a horse on the beach", "jpg"),
    ("s0001_0001", "a small child eating a slice of pizza", "png"),
    ("s0001_0002", "a giraffe standing next to a tall tree", "jpg"),
    ("s0001_0003", "a kitchen with white cabinets", "jpg"),
]
GOOD_CAPTIONS = [c for k, c, _, _ in IMG2DATASET if k in ("000000000", "000000001", "000000005")] + [
    c for _, c, _ in REHOSTED
]


def write_cc3m(root: str) -> str:
    """root/00000.tar (+ _stats.json, .parquet) and root/00001.tar; 7 usable samples of 10; returns root."""
    os.makedirs(root, exist_ok=True)
    members = []
    for i, (key, caption, llava, phrases) in enumerate(IMG2DATASET):
        if key != "000000004":
            jpg = image_bytes(i)
            members.append((f"{key}.jpg", jpg[: len(jpg) // 3] if key == "000000002" else jpg))
        members.append((f"{key}.txt", caption.encode()))
        meta = {
            "url": f"http://example.com/{key}.jpg",
            "caption": caption,
            "key": key,
            "status": "success",
            "width": 40,
            "height": 30,
            "shortLLA_captions": llava,
            "nounphrases": phrases,
        }
        members.append((f"{key}.json", json.dumps(meta).encode()))
    write_tar(os.path.join(root, "00000.tar"), members)
    with open(os.path.join(root, "00000_stats.json"), "w") as f:
        json.dump({"count": 6, "successes": 5, "failed_to_download": 1, "failed_to_resize": 0}, f)
    with open(os.path.join(root, "00000.parquet"), "wb") as f:
        f.write(b"PAR1")  # never read
    members = []
    for i, (key, caption, ext) in enumerate(REHOSTED):
        members.append((f"{key}.{ext}", image_bytes(10 + i, (24, 36), "PNG" if ext == "png" else "JPEG")))
        members.append((f"{key}.txt", caption.encode()))
    write_tar(os.path.join(root, "00001.tar"), members)
    return root


# ----------------------------------------------------------------------------- benchmarks

COCO_IMAGES = ["000000000139.jpg", "000000000285.jpg", "000000000632.jpg"]
SUGARCREPE_FILES = ["add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"]
SUGARCREPE_PP_FILES = ["replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"]


def write_sugarcrepe(root: str) -> str:
    """root/<7 files>.json (objects keyed by non-contiguous string indices) and root/val2017/*.jpg.
    File number f holds f + 1 examples (so the counts are 1, 2, ..., 7)."""
    for i, name in enumerate(COCO_IMAGES):
        save_image(os.path.join(root, "val2017", name), i)
    for f, name in enumerate(SUGARCREPE_FILES):
        data = {
            str(3 * j + 1): {
                "filename": COCO_IMAGES[j % 3],
                "caption": f"a red dog next to a blue car {j}",
                "negative_caption": f"a blue dog next to a red car {j}",
            }
            for j in range(f + 1)
        }
        with open(os.path.join(root, name + ".json"), "w") as fh:
            json.dump(data, fh)
    return root


def write_sugarcrepe_pp(root: str) -> str:
    """root/<5 files>.json, JSON lists of {id, filename, caption, caption2, negative_caption}; 2 records each.
    The images are SugarCrepe's (pass --images)."""
    os.makedirs(root, exist_ok=True)
    for name in SUGARCREPE_PP_FILES:
        data = [
            {
                "id": j,
                "filename": COCO_IMAGES[j],
                "caption": "a man holding a green umbrella",
                "caption2": "a green umbrella is held by a man",
                "negative_caption": "a man holding a pink umbrella",
            }
            for j in range(2)
        ]
        with open(os.path.join(root, name + ".json"), "w") as fh:
            json.dump(data, fh)
    return root


def write_imagefolder(root: str, classes=("cat", "dog", "red_car"), per_class: int = 2) -> str:
    for c, name in enumerate(classes):
        for j in range(per_class):
            save_image(os.path.join(root, name, f"img{j}.JPEG"), 3 * c + j)
    return root


def write_karpathy(root: str) -> str:
    """root/val2014/COCO_val2014_*.jpg and root/karpathy_test.json: 3 images, 2 captions each; returns the JSON path."""
    records = []
    for i in range(3):
        path = f"val2014/COCO_val2014_00000000{i + 1:04d}.jpg"
        save_image(os.path.join(root, path), i)
        records.append({"image": path, "caption": [f"a photo of thing {i}", f"another view of thing {i}"]})
    ann = os.path.join(root, "karpathy_test.json")
    with open(ann, "w") as f:
        json.dump(records, f)
    return ann


# every word of the benchmark fixtures, so that an untrained model's scores are not ties of <unk>s
BENCH_WORDS = (
    "a red blue dog next to car 0 1 2 3 4 5 6 man holding green pink umbrella is held by photo of cat thing "
    "another view picture the"
)


def write_checkpoint(path: str, image_size: int = 16, seed: int = 0) -> str:
    """An untrained small model saved as train.py saves one (config, tokenizer, model)."""
    torch.manual_seed(seed)
    tokenizer = WordTokenizer.build(GOOD_CAPTIONS + [BENCH_WORDS], context_length=24)
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=image_size, patch_size=8, width=32, layers=1, heads=2),
        text=TextConfig(vocab_size=len(tokenizer), context_length=24, width=32, layers=1, heads=2),
        embed_dim=16,
    )
    from dataclasses import asdict

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(
        path,
        model=CLIP(cfg).state_dict(),
        optimizer={},
        step=0,
        config=asdict(cfg),
        args={},
        tokenizer=tokenizer.state_dict(),
        seed=seed,
    )
    return path


# ----------------------------------------------------------------------------- a SentencePiece model

SYLLABLES = "ba be bi bo bu ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu ra re ri ro ru sa se".split()
SYLLABLES += "si so su ta te ti to tu an en in on un ar er or st th ch sh".split()
REAL_WORDS = (
    "a an the red blue green yellow white black dog cat man woman child riding horse beach table wooden sitting next "
    "to of on in with and giraffe tall tree kitchen pizza circle square star triangle photo picture café naïve über "
    "zürich straße façade 東京 中文 русский ελληνικά 2024 3.14 100% it's"
).split()


def spm_model_bytes(vocab_size: int = 600, **options) -> bytes:
    """A SentencePiece unigram model trained here on 500 made-up sentences, with T5's special ids (<pad> 0,
    </s> 1, <unk> 2, no <s>) and the default nmt_nfkc normalisation unless `options` say otherwise.
    sentencepiece is a test-only dependency, imported here."""
    import random

    import sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(800)] + list(REAL_WORDS)
    sentences = [" ".join(rng.choices(words, k=rng.randint(4, 16))) + rng.choice(".!?, ") for _ in range(500)]
    out = io.BytesIO()
    settings = dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2) | options
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size, **settings
    )
    return out.getvalue()


def crash_after_first_checkpoint(monkeypatch, argv: list[str]) -> None:
    """train.main(argv), dying (as a kill would) right after it writes its first checkpoint."""
    import pytest

    import train

    real_save = train.save_checkpoint

    def save_then_die(path, **state):
        real_save(path, **state)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)


def step_args(method: str = "c2lip", *flags: str):
    """train.py's flags for one step of `method` (its defaults, then `flags`), as train.step reads them."""
    import train  # here, not at the top: the fixtures also serve tests that never train

    return train.get_parser().parse_args(["--method", method, *flags])


def step_objective(args) -> tuple:
    """(embed, loss_of) of train.py's step for these flags: the paper's pair or what replaces it
    (baselines/objectives.py), the loss of every rank's embeddings under torch.distributed."""
    import train
    from baselines.objectives import objective
    from run.devices import rank_and_world
    from run.scale import gathered

    embed, loss_of = objective(args, train.embed, train.loss_of)
    return (embed, gathered(loss_of)) if rank_and_world()[1] > 1 else (embed, loss_of)


def batch_loss(net, batch: dict, args) -> tuple:
    """(L, {term: value}) of one batch, as train.py's step computes it (`net` may be wrapped in DDP)."""
    embed, loss_of = step_objective(args)
    model = getattr(net, "module", net)
    return loss_of(model, embed(net, batch, args), args)
