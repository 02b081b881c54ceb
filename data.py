"""Text tokenizer, the embedded synthetic world "shapes", and the batch collate.

Paper map: the paper trains on CC3M with short LLM captions and cuts each caption into concept phrases
(Section 3.1, concepts.py). This file provides what a laptop can train on instead: a procedurally
rendered world whose captions are long enough to be matched as a bag of words (every object is named
with its colour, and usually its size, in varied wording), plus the batch layout every loss reads:

  images (B, C, H, W), captions (B, T), concepts (K, Tc), owner (K,), phrase_ids (K,)

where owner[k] = o(k) of paper.md, the index of the image whose caption phrase k came from.

Departures: the paper uses CLIP's byte-level BPE tokenizer; the shapes world has a vocabulary of a few
dozen words, so a lower-cased word-level tokenizer built from the training captions is enough and keeps
the model tiny.

Dimension legend: B images, C=3 channels, H=W image side, T caption tokens, K concept phrases in the
batch (all images together), Tc phrase tokens (phrases are padded among themselves, never to T).
"""

import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from concepts import extract_concepts, normalise_phrase

# ----------------------------------------------------------------------------- tokenizer


class WordTokenizer:
    """Lower-cased words and punctuation marks, each an id; <start> ... <end> then <pad> up to the batch max."""

    PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"  # ids 0, 1, 2, 3: pad must be 0 (model.py)

    def __init__(self, words: list[str], context_length: int):
        self.vocab = [self.PAD, self.UNK, self.START, self.END] + [w for w in words if not w.startswith("<")]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def build(cls, texts, context_length: int, min_freq: int = 1) -> "WordTokenizer":
        """A vocabulary of every word seen at least min_freq times, most frequent first."""
        counts = Counter(w for text in texts for w in cls.split(text))
        return cls([w for w, n in counts.most_common() if n >= min_freq], context_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """[<start>, words..., <end>], truncated so that the end token always fits in the context."""
        ids = [self.ids.get(w, 1) for w in self.split(text)][: self.context_length - 2]
        return [2] + ids + [3]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if i > 3)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> (len(texts), longest) int64, right-padded with 0."""
        encoded = [self.encode(t) for t in texts]
        out = torch.zeros(len(encoded), max(map(len, encoded)), dtype=torch.long)  # (B, T)
        for row, ids in zip(out, encoded):
            row[: len(ids)] = torch.tensor(ids)
        return out

    def state_dict(self) -> dict:
        return {"kind": "word", "vocab": self.vocab, "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "WordTokenizer":
        return cls(state["vocab"], state["context_length"])


# ----------------------------------------------------------------------------- the shapes world

COLOURS = {
    "red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 20), "white": (245, 245, 245), "pink": (250, 130, 190),
}  # fmt: skip
SHAPES = ["circle", "square", "triangle", "star", "diamond", "hexagon", "pentagon"]
SIZES = {"large": 0.42, "tiny": 0.22}  # radius as a fraction of a grid cell's side
# The size words were chosen with NLTK's tagger: it reads "small red star" as small/JJ red/VBD star/NN,
# which no noun-phrase grammar can recover, while "tiny" and "large" are always adjectives.

GRID = 3  # objects sit in distinct cells of a GRID x GRID layout, so they never overlap

# Wordings of a whole scene. {objects} is the list "A, B and C"; {n} the number of objects in words.
TEMPLATES = [
    "{objects}",
    "{objects}.",
    "there is {objects}.",
    "a picture of {objects}.",
    "an image showing {objects} on a dark background.",
    "{n} shapes: {objects}.",
    "in this picture we see {objects}.",
    "{objects} on a black background.",
]
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    cell: int  # 0 .. GRID*GRID - 1, row-major
    said_size: bool  # whether the caption names the size (most of the time, as people do)

    def phrase(self) -> str:
        words = ([self.size] if self.said_size else []) + [self.colour, self.shape]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article] + words)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in the order the caption names them
    template: int
    background: int  # grey level of the dark background
    jitter: tuple[tuple[float, float], ...]  # each object's offset inside its cell, in [-1, 1]


def list_phrases(phrases: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


class ShapesWorld:
    """Scenes of 2-4 objects with distinct colours and shapes; every scene is a pure function of
    (seed, split, index), so datasets need no storage and a run can resume at any step."""

    def __init__(self, image_size: int = 64, min_objects: int = 2, max_objects: int = 4, p_size: float = 0.8):
        assert max_objects <= min(len(COLOURS), len(SHAPES), GRID * GRID)
        self.image_size, self.min_objects, self.max_objects, self.p_size = image_size, min_objects, max_objects, p_size

    def scene(self, seed: int, split: str, index: int) -> Scene:
        rng = random.Random(f"shapes:{seed}:{split}:{index}")  # string seeds are hashed stably
        n = rng.randint(self.min_objects, self.max_objects)
        colours, shapes, cells = rng.sample(list(COLOURS), n), rng.sample(SHAPES, n), rng.sample(range(GRID * GRID), n)
        objects = tuple(
            Obj(c, s, rng.choice(list(SIZES)), cell, rng.random() < self.p_size)
            for c, s, cell in zip(colours, shapes, cells)
        )
        jitter = tuple((rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in objects)
        return Scene(objects, rng.randrange(len(TEMPLATES)), rng.randint(0, 40), jitter)

    @staticmethod
    def caption(scene: Scene, objects=None) -> str:
        """The caption of the scene, or of other objects in the same wording (negatives are built this way)."""
        objects = scene.objects if objects is None else objects
        return TEMPLATES[scene.template].format(
            objects=list_phrases([o.phrase() for o in objects]), n=NUMBERS.get(len(objects), str(len(objects)))
        )

    @staticmethod
    def phrases(scene: Scene) -> list[str]:
        """Ground-truth concept phrases, one per object, as the caption words them."""
        return [o.phrase() for o in scene.objects]

    def render(self, scene: Scene) -> Image.Image:
        """Draw at twice the size, then downsample: cheap anti-aliasing."""
        side = 2 * self.image_size
        img = Image.new("RGB", (side, side), (scene.background,) * 3)
        draw = ImageDraw.Draw(img)
        cell = side / GRID
        for obj, (jx, jy) in zip(scene.objects, scene.jitter):
            r = SIZES[obj.size] * cell
            slack = cell / 2 - r - 1
            cx = (obj.cell % GRID + 0.5) * cell + jx * slack
            cy = (obj.cell // GRID + 0.5) * cell + jy * slack
            draw_shape(draw, obj.shape, cx, cy, r, COLOURS[obj.colour])
        return img.resize((self.image_size, self.image_size), Image.BILINEAR)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    def polygon(n: int, start_deg: float, radii=(1.0,)):
        pts = []
        for i in range(n * len(radii)):
            a = math.radians(start_deg + 360 * i / (n * len(radii)))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=colour)

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif shape == "triangle":
        polygon(3, -90)
    elif shape == "star":
        polygon(5, -90, radii=(1.0, 0.45))
    elif shape == "diamond":
        polygon(4, -90, radii=(1.0, 0.6))
    elif shape == "hexagon":
        polygon(6, 0)
    elif shape == "pentagon":
        polygon(5, -90)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (C, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    """Item i of a split: {'image': (C, H, W), 'caption': str, 'concepts': list[str]}.

    Concept phrases come from concepts.py (NLTK), exactly as they would for real captions; the
    ground-truth phrases are ShapesWorld.phrases, which the tests compare them against.
    """

    def __init__(self, world: ShapesWorld, seed: int, split: str, length: int):
        self.world, self.seed, self.split, self.length = world, seed, split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        scene = self.world.scene(self.seed, self.split, index)
        caption = self.world.caption(scene)
        return {"image": image_to_tensor(self.world.render(scene)), "caption": caption, "concepts": extract_concepts(caption)}


class StepBatches(torch.utils.data.Sampler):
    """Batch `step` of rank r holds scenes G*step + B*r ... G*step + B*r + B - 1, with G = B * world_size
    the global batch: fresh scenes every step, disjoint across ranks, and resuming at step s replays
    exactly the batches an uninterrupted run would have seen."""

    def __init__(self, batch_size: int, start_step: int, steps: int, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start_step, self.steps, self.rank, self.world_size = batch_size, start_step, steps, rank, world_size

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self):
        B = self.batch_size
        for step in range(self.start_step, self.steps):
            first = step * B * self.world_size + self.rank * B
            yield list(range(first, first + B))


# ----------------------------------------------------------------------------- collate


def phrase_id(phrase: str) -> int:
    """A stable signed 64-bit id of the normalised phrase."""
    digest = hashlib.blake2b(normalise_phrase(phrase).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class Collate:
    """Samples -> the batch the losses read. A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        phrases, owner = [], []
        for i, s in enumerate(samples):
            concepts = s["concepts"] or [s["caption"]]  # a caption with no phrase is its own phrase
            phrases += concepts
            owner += [i] * len(concepts)
        # phrase_ids, for the `--concept-labels phrase` rule: equal ids for equal normalised phrases, in
        # every process (a 64-bit digest, not Python's per-process hash()), so ranks can compare them
        phrase_ids = [phrase_id(p) for p in phrases]
        return {
            "images": torch.stack([s["image"] for s in samples]),  # (B, C, H, W)
            "captions": self.tokenizer([s["caption"] for s in samples]),  # (B, T)
            "concepts": self.tokenizer(phrases),  # (K, Tc)
            "owner": torch.tensor(owner),  # (K,)
            "phrase_ids": torch.tensor(phrase_ids),  # (K,)
        }


def main():
    """python data.py --out shapes.png: a contact sheet of training scenes with their captions and phrases."""
    import argparse
    import textwrap

    from PIL import ImageFont

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--n", type=int, default=6, help="scenes to draw")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to draw from")
    p.add_argument("--out", default="shapes.png", help="output PNG")
    args = p.parse_args()
    world, zoom, width = ShapesWorld(), 3, 560
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (width, args.n * (64 * zoom + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(args.n):
        scene = world.scene(args.seed, args.split, i)
        top = i * (64 * zoom + 8) + 4
        sheet.paste(world.render(scene).resize((64 * zoom, 64 * zoom), Image.NEAREST), (4, top))
        lines = textwrap.wrap(world.caption(scene), 52) + ["", "concepts:"] + [f"  {c}" for c in extract_concepts(world.caption(scene))]
        for k, line in enumerate(lines):
            draw.text((64 * zoom + 14, top + 4 + 14 * k), line, fill="black", font=font)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
