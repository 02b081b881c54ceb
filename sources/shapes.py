"""The shapes world: a synthetic image-text set that a laptop CPU trains on in minutes.

Paper map: the paper trains on CC3M, whose long captions can be matched as a bag of words (its first
cause of poor binding). This world keeps that property in miniature: 64 x 64 scenes of 2-4 objects
(8 colours, 7 shapes, 2 sizes) on a dark background, and captions that name every object with its colour,
and usually its size, in one of eight wordings ("there is a tiny red circle, a large blue star and a
green hexagon."). Swapping two colours leaves the bag of words unchanged: only binding tells the two
captions apart, which is what evaluation/shapes_benchmark.py measures. Concept phrases come from
concepts.py, exactly as for real captions; ShapesWorld.phrases gives the ground truth the tests compare
them with, and `truth` adds that truth to a batch (the training diagnostics, --concept-labels scene).

Every scene is a pure function of (seed, split, index): a dataset needs no storage, the held-out
benchmark (split "test") is fixed, and a resumed run sees exactly the batches it would have seen.

  python -m run.pictures --n 4 --out docs/shapes.png          # a contact sheet of training scenes

Dimension legend: B images, C=3 channels, S image side, K concept phrases, O object slots per image.
"""

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from concepts import article, extract_concepts
from data import WordTokenizer, image_to_tensor

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "pink": (250, 130, 190),
}
SHAPES = ["circle", "square", "triangle", "star", "diamond", "hexagon", "pentagon"]
SIZES = {"large": 0.42, "tiny": 0.22}  # radius as a fraction of a grid cell's side
# The size words were chosen with NLTK's tagger: it reads "small red star" as small/JJ red/VBD star/NN,
# which no noun-phrase grammar can recover, while "tiny" and "large" are always adjectives.

GRID = 3  # objects sit in distinct cells of a GRID x GRID layout, so they never overlap
MAX_OBJECTS = GRID * GRID  # rows of object_codes: every scene fits

# Colour-shape pairs that ShapesWorld(holdout=HOLDOUT_COMBOS) (train.py --holdout-combos) keeps out of every
# training scene: one per colour, no shape more than twice, so each colour and each shape is still seen in
# training, only never together. evaluation/shapes_benchmark.py scores binding on test scenes holding one (the
# generalisation split).
HOLDOUT_COMBOS = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "star"),
    ("purple", "diamond"),
    ("orange", "hexagon"),
    ("white", "pentagon"),
    ("pink", "circle"),
)

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

# The worlds train.py --world can train in, as ShapesWorld arguments. "dense" is the world of hypothesis 1
# in docs/study.md: more objects, and colours and shapes repeated within a scene ("a red circle, a
# red star and a blue circle"), where a bag of words cannot tell a caption from its attribute swap.
WORLDS = {"simple": {}, "dense": {"min_objects": 3, "max_objects": 5, "repeats": True}}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    cell: int  # 0 .. GRID*GRID - 1, row-major
    said_size: bool  # whether the caption names the size (most of the time, as people do)

    def phrase(self) -> str:
        words = ([self.size] if self.said_size else []) + [self.colour, self.shape]
        return " ".join([article(words[0])] + words)


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
    (seed, split, index), so datasets need no storage and a run can resume at any step. `holdout`:
    (colour, shape) pairs that no scene of the "train" split contains (e.g. HOLDOUT_COMBOS). `repeats`:
    a colour or a shape may occur on several objects of a scene (a colour-shape pair never twice), so
    knowing which words a caption holds no longer tells which colour goes with which shape (WORLDS)."""

    def __init__(
        self,
        image_size: int = 64,
        min_objects: int = 2,
        max_objects: int = 4,
        p_size: float = 0.8,
        holdout=(),
        repeats: bool = False,
    ):
        assert max_objects <= GRID * GRID and (repeats or max_objects <= min(len(COLOURS), len(SHAPES)))
        self.image_size, self.min_objects, self.max_objects, self.p_size = image_size, min_objects, max_objects, p_size
        self.holdout, self.repeats = frozenset(map(tuple, holdout)), repeats

    def scene(self, seed: int, split: str, index: int) -> Scene:
        rng = random.Random(f"shapes:{seed}:{split}:{index}")  # string seeds are hashed stably
        n = rng.randint(self.min_objects, self.max_objects)
        colours, shapes, cells = *self.draw_pairs(rng, n), rng.sample(range(GRID * GRID), n)
        # Redraw until no held-out pair is left; without a holdout nothing is redrawn, so every scene of
        # an existing seed stays exactly what it was.
        while split == "train" and self.holdout & set(zip(colours, shapes)):
            colours, shapes = self.draw_pairs(rng, n)
        objects = tuple(
            Obj(c, s, rng.choice(list(SIZES)), cell, rng.random() < self.p_size)
            for c, s, cell in zip(colours, shapes, cells)
        )
        jitter = tuple((rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in objects)
        return Scene(objects, rng.randrange(len(TEMPLATES)), rng.randint(0, 40), jitter)

    def draw_pairs(self, rng: random.Random, n: int) -> tuple[list[str], list[str]]:
        """The colours and the shapes of n objects: distinct each, or n distinct colour-shape pairs with repeats."""
        if not self.repeats:
            return rng.sample(list(COLOURS), n), rng.sample(SHAPES, n)
        pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
        return [c for c, _ in pairs], [s for _, s in pairs]

    @staticmethod
    def caption(scene: Scene, objects=None) -> str:
        """The caption of the scene, or of other objects in the same wording (negatives are built this way)."""
        objects = scene.objects if objects is None else objects
        return TEMPLATES[scene.template].format(
            objects=list_phrases([o.phrase() for o in objects]), n=NUMBERS.get(len(objects), str(len(objects)))
        )

    def words(self) -> set[str]:
        """Every word (data.WordTokenizer.split) that a training caption of this world can hold: the templates'
        words, the object words, and the numbers of objects a scene can have. A benchmark negative may hold no
        other word: the tokenizer would read it as <unk>, and a model could tell the negative by that alone."""
        counts = [NUMBERS.get(n, str(n)) for n in range(self.min_objects, self.max_objects + 1)]
        texts = [t.format(objects="", n="") for t in TEMPLATES] + [*COLOURS, *SHAPES, *SIZES, *counts]
        return {w for text in texts + ["a an and ,"] for w in WordTokenizer.split(text)}

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


def object_codes(scene: Scene) -> torch.Tensor:
    """The scene's ground truth as numbers: (MAX_OBJECTS, 3) int64, one row (colour, shape, size) of indices
    into COLOURS, SHAPES and SIZES per object, then rows of -1. A fixed number of rows, so that the
    images' codes stack into a batch and gather across ranks like any other tensor."""
    out = torch.full((MAX_OBJECTS, 3), -1, dtype=torch.long)  # (O, 3)
    for row, o in zip(out, scene.objects):
        row[:] = torch.tensor([list(COLOURS).index(o.colour), SHAPES.index(o.shape), list(SIZES).index(o.size)])
    return out


def phrase_code(phrase: str) -> tuple[int, int, int]:
    """What a phrase of this world says, as the indices of its colour, shape and size words, -1 for a word it
    does not hold: "a large red circle" -> (0, 0, 0), "a red circle" -> (0, 0, -1)."""
    words = phrase.lower().split()

    def index(vocabulary) -> int:
        return next((vocabulary.index(w) for w in words if w in vocabulary), -1)

    return index(list(COLOURS)), index(SHAPES), index(list(SIZES))


def scene_truth(phrase_codes: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: image i holds an object that phrase k describes (its colour and shape, and its size when
    the phrase says one). phrase_codes (K, 3) and objects (B, O, 3) hold (colour, shape, size) indices, -1 for
    a word the phrase does not say or an empty object slot; a phrase without a colour or a shape word
    describes no object here."""
    obj, code = objects[:, :, None, :], phrase_codes[None, None, :, :]  # (B, O, 1, 3), (1, 1, K, 3)
    same = obj == code  # (B, O, K, 3)
    fits = same[..., 0] & same[..., 1] & (same[..., 2] | (code[..., 2] < 0))  # (B, O, K): size only if said
    return fits.any(dim=1) & (phrase_codes[:, 0] >= 0) & (phrase_codes[:, 1] >= 0)  # (B, K)


def truth(samples: list[dict], phrases: list[str], tokenizer) -> dict:
    """Collate extra (data.Collate) of the shapes world: "objects" (B, O, 3) and "phrase_codes" (K, 3)."""
    # a caption without phrases is its own phrase (data.Collate), which names no single object
    codes = [c for s in samples for c in (s["phrase_codes"] if s["phrases"] else [(-1, -1, -1)])]
    return {
        "objects": torch.stack([s["objects"] for s in samples]),  # (B, O, 3)
        "phrase_codes": torch.tensor(codes, dtype=torch.long).view(-1, 3),  # (K, 3)
    }


class ShapesDataset(torch.utils.data.Dataset):
    """Item i of a split: {'image': (C, S, S), 'caption': str, 'phrases': list[str]}, and the ground truth
    that `truth` reads: 'objects' (object_codes, (O, 3)) and 'phrase_codes' (phrase_code of each phrase).

    Concept phrases come from concepts.py (NLTK), exactly as they would for real captions; the
    ground-truth phrases are ShapesWorld.phrases, which the tests compare them against.
    """

    def __init__(self, world: ShapesWorld, seed: int, split: str, length: int, normalise: str = "symmetric"):
        self.world, self.seed, self.split, self.length, self.normalise = world, seed, split, length, normalise

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        scene = self.world.scene(self.seed, self.split, index)
        caption = self.world.caption(scene)
        image = image_to_tensor(self.world.render(scene), self.normalise)
        phrases = extract_concepts(caption)
        return {
            "image": image,
            "caption": caption,
            "phrases": phrases,
            "objects": object_codes(scene),
            "phrase_codes": [phrase_code(p) for p in phrases],
        }


class StepBatches(torch.utils.data.Sampler):
    """Batch `step` of rank r holds scenes G*step + B*r ... G*step + B*r + B - 1, with G = B * world_size
    the global batch: fresh scenes every step, disjoint across ranks, and resuming at step s replays
    exactly the batches an uninterrupted run would have seen."""

    def __init__(self, batch_size: int, start_step: int, steps: int, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start_step, self.steps, self.rank, self.world_size = (
            batch_size,
            start_step,
            steps,
            rank,
            world_size,
        )

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self):
        B = self.batch_size
        for step in range(self.start_step, self.steps):
            first = step * B * self.world_size + self.rank * B
            yield list(range(first, first + B))
