"""Text tokenizer, image preprocessing, the embedded synthetic world "shapes", image-text tar shards
(CC3M), and the batch collate.

Paper map: the paper trains on CC3M with short LLM captions and cuts each caption into concept phrases
(Section 3.1, concepts.py). This file reads both kinds of training data:
  - a procedurally rendered world a laptop can train on, whose captions are long enough to be matched as
    a bag of words (every object is named with its colour, and usually its size, in varied wording);
  - CC3M, or any image-text set in webdataset tar shards, streamed with the standard library's tarfile
    (WebDataset), with the caption and concept fields of the authors' re-captioned shards;
and defines the batch layout every loss reads:

  images (B, C, H, W), captions (B, T), concepts (K, Tc), owner (K,), phrase_ids (K,)
  and, for the NegCLIP-style baseline, negatives (B, Tn) and has_negative (B,) (Collate(negatives=True))

where owner[k] = o(k) of paper.md, the index of the image whose caption phrase k came from.

Tokenizers: models trained here from scratch use a lower-cased word-level tokenizer built from the
training captions (the shapes world has a few dozen words, so this keeps the model tiny). Models started
from OpenAI's CLIP weights use CLIP's byte-level BPE tokenizer (BPETokenizer, written from scratch below).
Both have one interface, and a checkpoint records which one it was trained with (state_dict()["kind"],
read back by tokenizer_from_state_dict), so eval.py always tokenizes as training did.

Images: the pixel normalisation a model expects is named in its config (VisionConfig.normalise) and
looked up in NORMALISE; eval_transform is CLIP's evaluation preprocessing.

Real data: image-text tar shards (CC3M and any webdataset) are streamed by WebDataset, written with the
standard library's tarfile (no `webdataset` package): about a hundred lines.

Departures: the paper fine-tunes SigLIP, whose tokenizer is a SentencePiece model; this codebase starts
from OpenAI's CLIP (see model.py), so its BPE is the one implemented here. From scratch, a word-level
vocabulary (a few dozen words for the shapes world, the most frequent words for CC3M) keeps models small.

Dimension legend: B images, C=3 channels, H=W image side, T caption tokens, K concept phrases in the
batch (all images together), Tc phrase tokens (phrases are padded among themselves, never to T), Tn
hard-negative tokens.
"""

import functools
import glob
import gzip
import hashlib
import html
import importlib.util
import io
import json
import math
import multiprocessing
import os
import posixpath
import random
import re
import tarfile
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw
from tqdm import tqdm

from concepts import concepts_index, extract_concepts, hard_negative, normalise_phrase, shard_concepts, slot_words

# ----------------------------------------------------------------------------- tokenizers


def pad_batch(encoded: list[list[int]]) -> torch.Tensor:
    """Token id lists -> (len(encoded), longest) int64, right-padded with 0 (model.py reads the padding)."""
    out = torch.zeros(len(encoded), max(map(len, encoded)), dtype=torch.long)  # (B, T)
    for row, ids in zip(out, encoded):
        row[: len(ids)] = torch.tensor(ids)
    return out


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
    def build(cls, texts, context_length: int, min_freq: int = 1, max_size: int | None = None) -> "WordTokenizer":
        """A vocabulary of every word seen at least min_freq times, most frequent first."""
        return cls.from_counts(Counter(w for text in texts for w in cls.split(text)), context_length, min_freq, max_size)

    @classmethod
    def from_counts(cls, counts: Counter, context_length: int, min_freq: int = 1, max_size: int | None = None) -> "WordTokenizer":
        """The same from word counts (streamed captions, see caption_word_counts). max_size counts the four
        special tokens; rarer words read as <unk>, which keeps the embedding table of a web-scale vocabulary small."""
        words = [w for w, n in counts.most_common() if n >= min_freq and not w.startswith("<")]
        return cls(words if max_size is None else words[: max(0, max_size - 4)], context_length)

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
        return pad_batch([self.encode(t) for t in texts])

    def state_dict(self) -> dict:
        return {"kind": "word", "vocab": self.vocab, "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "WordTokenizer":
        return cls(state["vocab"], state["context_length"])


# CLIP's byte-level BPE. A caption is cleaned, cut into pre-tokens (words, single digits, runs of other
# symbols), each pre-token's UTF-8 bytes are spelled with 256 printable stand-in characters, and learned
# merges of adjacent symbols are applied in the order they were learned. The vocabulary is the 256 bytes,
# the 256 bytes ending a word ("</w>"), the first 48,894 merges of the file, then start and end:
# 49,408 ids; start 49406, end 49407; padding 0 (which is also the id of a lone "!", see model.py).
#
# Where this departs from CLIP's code, which runs ftfy.fix_text and the `regex` module (neither is a
# run-time dependency here; tests/test_bpe.py compares ids with open_clip's tokenizer on ~400 strings):
#   - ftfy is replaced by the fixes of it that plain text needs, in its order: HTML entities decoded
#     unless the text contains "<", a table (control characters removed, C1 controls read as
#     Windows-1252, Latin ligatures split, full-width forms narrowed, curly quotes straightened), then NFC.
#     Not done: repairing mojibake ("cafÃ©" stays as it is, ftfy makes it "café"), ANSI terminal escapes,
#     all-caps entities ("&EACUTE;"), lone surrogates. html.unescape also decodes entities without a ";".
#   - \p{L} and \p{N} are read from unicodedata (this Python's Unicode version, which can lag the
#     regex module's for characters added recently).
#   - The literal strings "<start_of_text>" and "<end_of_text>" in a caption are text here; open_clip
#     turns them into the special ids (and would then pool at the first one).
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
BPE_VOCAB_SIZE = 49408
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _byte_symbols() -> dict[int, str]:
    """byte -> a printable character standing for it, in vocabulary order: the printable Latin-1 bytes
    stand for themselves, the other 68 (space, controls, ...) for chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}


BYTE_SYMBOLS = _byte_symbols()
SYMBOL_BYTES = {c: b for b, c in BYTE_SYMBOLS.items()}


def _ftfy_table() -> dict[int, str | None]:
    """The character fixes of ftfy.fix_text that CLIP's cleaning relies on, as one str.translate table."""
    quotes = {0x2BC: "'", **{c: "'" for c in range(0x2018, 0x201C)}, **{c: '"' for c in range(0x201C, 0x2020)}}
    controls = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), *range(0xFFF9, 0xFFFD), 0xFEFF]
    table: dict[int, str | None] = {c: None for c in controls}
    for c in range(0x80, 0xA0):  # C1 controls are almost always Windows-1252 bytes decoded as Latin-1
        if c not in (0x81, 0x8D, 0x8F, 0x90, 0x9D):  # the five bytes Windows-1252 leaves undefined
            table[c] = bytes([c]).decode("cp1252").translate(quotes)  # ftfy straightens them next
    for c in "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ":  # Latin ligatures; "ŉ" becomes "'n" once its quote is straightened
        table[ord(c)] = unicodedata.normalize("NFKC", c).translate(quotes)
    table[ord("ﬅ")] = "ſt"  # ftfy keeps the long s that NFKC would drop
    table[0x3000] = " "  # ideographic space
    for c in range(0xFF01, 0xFFF0):  # full-width ASCII and half-width katakana/hangul to their usual forms
        if (plain := unicodedata.normalize("NFKC", chr(c))) != chr(c):
            table[c] = plain
    return table | quotes


FTFY_TABLE = _ftfy_table()


def clean_text(text: str) -> str:
    """CLIP's text cleaning (ftfy, HTML entities twice, whitespace collapsed, lower case), without ftfy."""
    if "<" not in text:  # ftfy decodes entities unless the text looks like HTML, until nothing changes
        while (decoded := html.unescape(text)) != text:
            text = decoded
    text = unicodedata.normalize("NFC", text.translate(FTFY_TABLE))
    text = html.unescape(html.unescape(text))  # CLIP's own step, after ftfy
    return " ".join(text.split()).lower()


def _kind(c: str) -> str:
    """'L' letter, 'N' number, ' ' space, or '.' anything else (punctuation, symbols, emoji, marks)."""
    category = unicodedata.category(c)[0]
    return category if category in "LN" else " " if c.isspace() else "."


def pretokenize(text: str) -> list[str]:
    r"""CLIP's pattern 's|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+ as a scan: a contraction, a run of
    letters, a single digit, or a run of other symbols; spaces separate and are dropped."""
    words, i = [], 0
    while i < len(text):
        kind = _kind(text[i])
        if kind == " ":
            i += 1
            continue
        j = i + len(next((w for w in CONTRACTIONS if text.startswith(w, i)), ""))
        if j == i:  # not a contraction: letters and other symbols run on, digits come one at a time
            j = i + 1
            while kind != "N" and j < len(text) and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def find_bpe_vocab(path: str | None = None) -> str:
    """The path of CLIP's merges file: `path`, else the copy that ships inside an installed open_clip_torch
    (located without importing that package, which is never needed at run time)."""
    if path is None:
        spec = importlib.util.find_spec("open_clip")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if os.path.exists(os.path.join(folder, BPE_FILE)):
                return os.path.join(folder, BPE_FILE)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            f"CLIP's BPE vocabulary {path or BPE_FILE} was not found. It is needed to tokenize text for CLIP "
            f"weights: download it from {BPE_URL} and pass --bpe PATH (or pip install open_clip_torch, which ships a copy)."
        )
    return path


class BPETokenizer:
    """CLIP's tokenizer: [start, BPE ids of the cleaned text..., end], then 0 up to the batch max.
    Text is lower-cased; a long text is cut so that the end token sits at position context_length - 1."""

    START, END = "<start_of_text>", "<end_of_text>"

    def __init__(self, merges: list[str], context_length: int = 77):
        self.merges, self.context_length = merges, context_length
        pairs = [tuple(m.split()) for m in merges]
        symbols = list(BYTE_SYMBOLS.values())
        self.vocab = symbols + [s + "</w>" for s in symbols] + ["".join(p) for p in pairs] + [self.START, self.END]
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self.ranks = {pair: i for i, pair in enumerate(pairs)}
        self.start_id, self.end_id = self.ids[self.START], self.ids[self.END]
        self.cache: dict[str, list[str]] = {}

    @classmethod
    def from_file(cls, path: str | None = None, context_length: int = 77) -> "BPETokenizer":
        with gzip.open(find_bpe_vocab(path), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        return cls(lines[1 : BPE_VOCAB_SIZE - 512 - 2 + 1], context_length)  # line 0 is a version header

    def __len__(self) -> int:
        return len(self.vocab)

    def bpe(self, word: str) -> list[str]:
        """A pre-token spelled in byte symbols -> its pieces: merge the adjacent pair learned earliest,
        everywhere in the word at once, until no adjacent pair is a learned merge."""
        if word not in self.cache:
            parts = [*word[:-1], word[-1] + "</w>"]
            while len(parts) > 1:
                pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
                if pair not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(parts):
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self.cache[word] = parts
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        """[start, ids..., end], truncated so that the end token always fits in the context."""
        ids = [
            self.ids[piece]
            for word in pretokenize(clean_text(text))
            for piece in self.bpe("".join(BYTE_SYMBOLS[b] for b in word.encode("utf-8")))
        ]
        return [self.start_id] + ids[: self.context_length - 2] + [self.end_id]

    def decode(self, ids) -> str:
        pieces = [self.vocab[i] for i in ids if i not in (self.start_id, self.end_id)]
        data = b"".join(bytes(SYMBOL_BYTES[c] for c in p.removesuffix("</w>")) + b" " * p.endswith("</w>") for p in pieces)
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> (len(texts), longest) int64, right-padded with 0."""
        return pad_batch([self.encode(t) for t in texts])

    def state_dict(self) -> dict:
        # The merges themselves (about 0.6 MB), so a checkpoint needs no vocabulary file to be evaluated.
        return {"kind": "clip_bpe", "merges": self.merges, "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "BPETokenizer":
        return cls(state["merges"], state["context_length"])


def tokenizer_from_state_dict(state: dict):
    """The tokenizer a checkpoint was trained with, whichever kind it is."""
    if state.get("kind") == "word":
        return WordTokenizer.from_state_dict(state)
    if state.get("kind") == "clip_bpe":
        return BPETokenizer.from_state_dict(state)
    raise ValueError(f"unknown tokenizer kind {state.get('kind')!r} in the checkpoint")


# ----------------------------------------------------------------------------- images

# Pixel normalisations, defined here and nowhere else: (x / 255 - mean) / std per channel. A model's config
# names the one its weights expect (VisionConfig.normalise), so eval.py feeds every checkpoint the pixels
# it was trained on: "symmetric" maps [0, 255] onto [-1, 1] (models trained here, and SigLIP's constants),
# "clip" is OpenAI's CLIP, measured on its training images.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISE = {"symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "clip": (CLIP_MEAN, CLIP_STD)}


def image_to_tensor(img: Image.Image, normalise: str = "symmetric") -> torch.Tensor:
    """PIL RGB -> (C, H, W) float, normalised with the named mean and std ("symmetric": in [-1, 1])."""
    mean, std = NORMALISE[normalise]
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255  # (C, H, W) in [0, 1]
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def eval_transform(size: int, normalise: str = "symmetric") -> T.Compose:
    """PIL RGB -> (C, size, size): shorter side resized to size (bicubic, antialiased), then the centre
    square, as CLIP evaluates; with normalise="clip" it is OpenAI's preprocessing exactly."""
    resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([resize, T.CenterCrop(size), functools.partial(image_to_tensor, normalise=normalise)])


def train_transform(size: int, normalise: str = "symmetric") -> T.Compose:
    """PIL -> (C, size, size): CLIP-style augmentation, a random crop of 90-100% of the area (aspect 3:4 to
    4:3) resized to size x size. CLIP trains with little augmentation: the captions are the supervision."""
    crop = T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, functools.partial(image_to_tensor, normalise=normalise)])


def load_image(source: str | bytes) -> Image.Image:
    """A path or an encoded image's bytes -> PIL RGB, decoded now: a truncated file raises OSError here."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """Item i: transform(image file i), for the DataLoaders of the benchmarks in eval.py."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index]))


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

# Colour-shape pairs that ShapesWorld(holdout=HOLDOUT_COMBOS) (train.py --holdout-combos) keeps out of every
# training scene: one per colour, no shape more than twice, so each colour and each shape is still seen in
# training, only never together. eval.py scores binding on test scenes holding one (the generalisation split).
HOLDOUT_COMBOS = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "star"),
                  ("purple", "diamond"), ("orange", "hexagon"), ("white", "pentagon"), ("pink", "circle"))  # fmt: skip

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
# in the README's study: more objects, and colours and shapes repeated within a scene ("a red circle, a
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
    (seed, split, index), so datasets need no storage and a run can resume at any step. `holdout`:
    (colour, shape) pairs that no scene of the "train" split contains (e.g. HOLDOUT_COMBOS). `repeats`:
    a colour or a shape may occur on several objects of a scene (a colour-shape pair never twice), so
    knowing which words a caption holds no longer tells which colour goes with which shape (WORLDS)."""

    def __init__(self, image_size: int = 64, min_objects: int = 2, max_objects: int = 4, p_size: float = 0.8, holdout=(),
                 repeats: bool = False):  # fmt: skip
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


class ShapesDataset(torch.utils.data.Dataset):
    """Item i of a split: {'image': (C, H, W), 'caption': str, 'concepts': list[str]}.

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
        return {"image": image, "caption": caption, "concepts": extract_concepts(caption)}


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
    """Samples -> the batch the losses read. A class, not a closure, so DataLoader workers can pickle it.

    negatives=True (--method negclip) adds one rule-made hard negative per caption (concepts.hard_negative),
    here so that the tagging runs in the DataLoader workers: "negatives" (B, Tn) and "has_negative" (B,),
    False where no rule applies (that row holds an empty text, never scored). Replacement words come from
    the batch's own captions; each caption's draws are seeded by its text, so a batch's negatives do not
    depend on which worker, or how many, made it (and a resumed run replays them)."""

    def __init__(self, tokenizer, negatives: bool = False):
        self.tokenizer, self.negatives = tokenizer, negatives

    def __call__(self, samples: list[dict]) -> dict:
        phrases, owner = [], []
        for i, s in enumerate(samples):
            concepts = s["concepts"] or [s["caption"]]  # a caption with no phrase is its own phrase
            phrases += concepts
            owner += [i] * len(concepts)
        # phrase_ids, for the `--concept-labels phrase` rule: equal ids for equal normalised phrases, in
        # every process (a 64-bit digest, not Python's per-process hash()), so ranks can compare them
        phrase_ids = [phrase_id(p) for p in phrases]
        batch = {
            "images": torch.stack([s["image"] for s in samples]),  # (B, C, H, W)
            "captions": self.tokenizer([s["caption"] for s in samples]),  # (B, T)
            "concepts": self.tokenizer(phrases),  # (K, Tc)
            "owner": torch.tensor(owner),  # (K,)
            "phrase_ids": torch.tensor(phrase_ids),  # (K,)
        }
        if self.negatives:
            captions = [s["caption"] for s in samples]
            pool = slot_words(captions)
            negatives = [hard_negative(c, random.Random(f"negative:{c}"), pool) for c in captions]
            batch["negatives"] = self.tokenizer([n or "" for n in negatives])  # (B, Tn)
            batch["has_negative"] = torch.tensor([n is not None for n in negatives])  # (B,)
        return batch


# ----------------------------------------------------------------------------- image-text shards (CC3M and co.)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the first one present is the sample's image
SKIP_REASONS = ("missing_image", "empty_caption", "corrupt_image", "corrupt_shard")
SHARD_LAYOUT = """Expected webdataset tar shards: a folder of *.tar files, a glob ('DIR/*.tar') or a brace range
('DIR/{00000..00331}.tar'). Each shard holds samples as members named <key>.<ext>: <key>.jpg (or .jpeg, .png,
.webp) with <key>.txt (the caption) and optionally <key>.json (metadata, or the caption and concept fields that
--caption-key / --concept-key name); img2dataset also writes <shard>_stats.json beside each shard.
CC3M: download it with img2dataset (github.com/rom1504/img2dataset, its cc3m example, --output_format webdataset)
from Google's Conceptual Captions TSV (ai.google.com/research/ConceptualCaptions/download), or fetch a re-hosted
copy packed as cc3m-train-0000.tar ... cc3m-train-0575.tar (for example pixparse/cc3m-wds on the Hugging Face hub)."""


def expand_braces(spec: str) -> list[str]:
    """'a{00..02}b{x,y}' -> ['a00bx', 'a00by', 'a01bx', ...]: shell-style brace ranges (zero-padded like the
    first bound) and lists, as webdataset shard specs use them."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    items = [str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r else m.group(1).split(",")
    return [out for item in items for out in expand_braces(spec[: m.start()] + item + spec[m.end() :])]


def expand_shards(spec: str) -> list[str]:
    """A folder, a glob or a brace range -> the existing shard paths, sorted (a brace range may have gaps:
    img2dataset leaves out shards whose downloads all failed). FileNotFoundError naming the layout if none."""
    if os.path.isdir(spec):
        paths = glob.glob(os.path.join(spec, "*.tar"))
    else:
        paths = [p for s in expand_braces(spec) for p in (glob.glob(s) if glob.has_magic(s) else [s]) if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"no tar shards at {spec!r}.\n{SHARD_LAYOUT}")
    return sorted(set(paths))


def shard_groups(path: str, read=None):
    """Yield (key, {extension: bytes}) for each sample of a tar shard, in order. Members sharing a key (the
    member's path up to the first dot of its file name) are consecutive in a webdataset shard. Extensions
    outside `read` (None: all) appear with the value None: present but not read, so that passes over the
    captions only seek past the images."""
    with tarfile.open(path) as tar:
        key, group = None, {}
        for member in tar:
            folder, name = posixpath.split(member.name)
            stem, dot, ext = name.partition(".")
            if not member.isfile() or not dot:
                continue
            if posixpath.join(folder, stem) != key:
                if key is not None:
                    yield key, group
                key, group = posixpath.join(folder, stem), {}
            ext = ext.lower()
            group[ext] = tar.extractfile(member).read() if read is None or ext in read else None
        if key is not None:
            yield key, group


def sample_meta(group: dict) -> dict:
    """The sample's <key>.json as a dict ({} if absent or unreadable)."""
    try:
        meta = json.loads(group["json"]) if group.get("json") else {}
    except ValueError:  # also UnicodeDecodeError
        return {}
    return meta if isinstance(meta, dict) else {}


def sample_caption(group: dict, meta: dict, caption_key: str | None) -> str:
    """The named JSON field if caption_key is given, else <key>.txt (else the JSON's 'caption'); '' if none."""
    if caption_key:
        text = meta.get(caption_key)
    elif group.get("txt") is not None:
        text = group["txt"].decode("utf-8", errors="replace")
    else:
        text = meta.get("caption")
    return text.strip() if isinstance(text, str) else ""


def shard_captions(path: str, caption_key: str | None = None):
    """Yield (key, caption) of the samples of a shard that have an image and a caption; images are not read."""
    for key, group in shard_groups(path, read={"txt", "json"}):
        caption = sample_caption(group, sample_meta(group), caption_key)
        if caption and any(e in group for e in IMAGE_EXTS):
            yield key, caption


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj) -> None:
    """Atomically (temp file + rename), so that readers never see half a cache."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def cache_dir(shards: list[str], fallback: str) -> str:
    """Where counts and vocabularies are cached: beside the shards if that folder is writable (every run on
    the data reuses them), else `fallback` (the run's output folder)."""
    folder = os.path.dirname(os.path.abspath(shards[0]))
    if os.access(folder, os.W_OK):
        return folder
    os.makedirs(fallback, exist_ok=True)
    return fallback


def shard_sizes(shards: list[str], cache: str) -> list[int]:
    """Samples per shard, for the progress bar and the schedule: img2dataset's <shard>_stats.json
    ('successes'), else a sizes.json beside the shards ({"00000.tar": n, ...}), else counted once from the
    tar headers and cached in cache/c2lip-sizes.json. Counts include samples that will later be skipped."""
    cache_path = os.path.join(cache, "c2lip-sizes.json")
    cached, sizes_json, sizes, todo = read_json(cache_path) or {}, {}, {}, []
    for shard in shards:
        stats = read_json(os.path.splitext(shard)[0] + "_stats.json") or {}
        folder = os.path.dirname(shard)
        if folder not in sizes_json:
            sizes_json[folder] = read_json(os.path.join(folder, "sizes.json")) or {}
        entry = cached.get(os.path.abspath(shard))  # [file bytes, samples]: a rewritten shard is recounted
        if isinstance(stats.get("successes"), int):
            sizes[shard] = stats["successes"]
        elif os.path.basename(shard) in sizes_json[folder]:
            sizes[shard] = int(sizes_json[folder][os.path.basename(shard)])
        elif entry and entry[0] == os.path.getsize(shard):
            sizes[shard] = entry[1]
        else:
            todo.append(shard)
    for shard in tqdm(todo, desc="counting samples", unit="shard", disable=not todo):
        try:
            sizes[shard] = sum(any(e in g for e in IMAGE_EXTS) for _, g in shard_groups(shard, read=()))
        except (tarfile.TarError, OSError):
            sizes[shard] = 0  # unreadable: the reader will skip it and count it
        cached[os.path.abspath(shard)] = [os.path.getsize(shard), sizes[shard]]
    if todo:
        write_json(cache_path, cached)
    return [sizes[s] for s in shards]


def caption_word_counts(shards: list[str], caption_key: str | None, cache: str) -> Counter:
    """Word counts of every training caption (WordTokenizer.split), streamed over the shards once and cached
    in cache/c2lip-words-<hash of the shard list and caption key>.json."""
    digest = hashlib.sha1(json.dumps([sorted(map(os.path.abspath, shards)), caption_key]).encode()).hexdigest()[:12]
    path = os.path.join(cache, f"c2lip-words-{digest}.json")
    cached = read_json(path)
    if cached:
        return Counter(cached["counts"])
    counts = Counter()
    for shard in tqdm(shards, desc="vocabulary", unit="shard"):
        try:
            for _, caption in shard_captions(shard, caption_key):
                counts.update(WordTokenizer.split(caption))
        except (tarfile.TarError, OSError):
            pass  # the reader skips and counts unreadable shards
    write_json(path, {"caption_key": caption_key, "shards": len(shards), "counts": counts})
    return counts


def reader_index() -> tuple[int, int]:
    """(this reader, number of readers): every DataLoader worker of every distributed rank is a reader."""
    rank, ranks = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, ranks * workers


def shuffled(items, size: int, rng: random.Random):
    """A shuffle buffer: hold `size` items and emit a random one each time a new one arrives, then the rest.
    Streaming data cannot be permuted as a whole; shards are shuffled too, so samples mix across shards."""
    buffer = []
    for item in items:
        if len(buffer) < max(size, 1):
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class WebDataset(torch.utils.data.IterableDataset):
    """One pass over tar shards = one epoch of samples {'image': (C, H, W), 'caption', 'concepts'}, the dicts
    Collate reads.

    Readers (DataLoader workers x distributed ranks) take every n-th shard of a per-epoch shuffle of the
    shards, or, when there are fewer shards than readers, every n-th sample. Samples pass a shuffle buffer
    of raw bytes (decoding after the buffer keeps it small), then are decoded: caption from <key>.txt or
    the JSON field caption_key; concept phrases from the JSON field concept_key when the sample has it, else
    from a file written by `python concepts.py --data-dir ... --out FILE`, else extracted here (concepts.py).

    A missing image, an empty caption, a corrupt image or an unreadable shard is skipped and counted, never
    fatal. The counts live in shared memory that DataLoader workers inherit, so .skipped, read in the main
    process, holds every reader's counts (since this object was made: each pass counts its bad samples
    again). Set .epoch before each pass: it seeds the shuffles.
    """

    def __init__(self, shards: list[str], transform, caption_key: str | None = None, concept_key: str | None = None,
                 concepts_file: str | None = None, shuffle_buffer: int = 1000, seed: int = 0):  # fmt: skip
        self.shards, self.transform, self.caption_key, self.concept_key = shards, transform, caption_key, concept_key
        self.concepts_file, self.shuffle_buffer, self.seed, self.epoch = concepts_file, shuffle_buffer, seed, 0
        self.concepts_index = concepts_index(concepts_file) if concepts_file else {}
        self._skips = multiprocessing.Array("q", len(SKIP_REASONS))  # shared with the DataLoader workers

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: samples skipped so far} over all readers of this process's DataLoaders."""
        return {reason: n for reason, n in zip(SKIP_REASONS, self._skips[:]) if n}

    def _skip(self, reason: str) -> None:
        with self._skips.get_lock():
            self._skips[SKIP_REASONS.index(reason)] += 1

    def _groups(self, shards: list[str], stride: int, offset: int):
        """(key, raw group, precomputed phrases or None) of every stride-th sample of the shards."""
        index = 0
        for shard in shards:
            name = os.path.basename(shard)
            table = shard_concepts(self.concepts_file, self.concepts_index[name][0]) if name in self.concepts_index else {}
            try:
                for key, group in shard_groups(shard):
                    index += 1
                    if (index - 1) % stride == offset:
                        yield key, group, table.get(key)
            except (tarfile.TarError, OSError):  # a truncated or unreadable shard: keep what was read of it
                self._skip("corrupt_shard")

    def _sample(self, key: str, group: dict, phrases: list[str] | None) -> dict | None:
        image_ext = next((e for e in IMAGE_EXTS if e in group), None)
        if image_ext is None:
            return self._skip("missing_image")
        meta = sample_meta(group)
        caption = sample_caption(group, meta, self.caption_key)
        if not caption:
            return self._skip("empty_caption")
        try:
            image = self.transform(load_image(group[image_ext]))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's ways of saying "corrupt"
            return self._skip("corrupt_image")
        named = meta.get(self.concept_key) if self.concept_key else None
        if isinstance(named, list) and all(isinstance(p, str) for p in named):
            concepts = named  # the authors' shards: 'nounphrases' (an empty list: Collate uses the caption)
        else:
            concepts = phrases if phrases is not None else extract_concepts(caption)
        return {"image": image, "caption": caption, "concepts": list(concepts)}

    def __iter__(self):
        reader, readers = reader_index()
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)  # the same permutation in every reader
        if len(order) >= readers:
            groups = self._groups(order[reader::readers], 1, 0)
        else:
            groups = self._groups(order, readers, reader)
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{reader}")
        for key, group, phrases in shuffled(groups, self.shuffle_buffer, rng):
            sample = self._sample(key, group, phrases)
            if sample is not None:
                yield sample


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
