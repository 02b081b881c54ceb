"""The batch every loss reads, the word tokenizer, and image preprocessing.

Paper map (docs/paper.md, "Notation"): a batch holds B images with their captions y_i, and the concept
phrases p_k of every caption (concepts.py), each owned by the image o(k) whose caption it came from:

  images (B, C, S, S)    the pixels, normalised as the model's config says (NORMALISE)
  captions (B, T)        token ids, right-padded
  phrases (K, Tc)        every caption's phrases, one after another, each a short sequence of its own
  owner (K,)             owner[k] = o(k), the image whose caption phrase k was cut from

Phrases are tokenized as their own sequences (never inside the caption) and padded among themselves. A
caption with no phrase is its own single phrase (the paper's rule), so every image owns at least one.
Where the samples come from is the concern of sources/ (the shapes world, tar shards of CC3M); what the
baselines and diagnostics add to a batch (hard negatives, the shapes world's truth) comes from `extras`.

Tokenizers: models trained here from scratch use the lower-cased word-level tokenizer below, built from
the training captions (the shapes world has a few dozen words, so the model stays tiny). Released weights
bring their own tokenizer (released/tokenizers.py); all share one interface.

Departure: the paper's tokenizer is SigLIP's SentencePiece model; from scratch, a word vocabulary (a few
dozen words for the shapes world, the most frequent words for CC3M) keeps models small.

Dimension legend: B images, C=3 channels, S image side, T caption tokens, K concept phrases in the batch
(all images together), Tc phrase tokens.
"""

import functools
import io
import re
import warnings
from collections import Counter

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from concepts import phrases_or_caption

# ----------------------------------------------------------------------------- collate


class Collate:
    """Samples {"image", "caption", "phrases"} -> the batch the losses read. A class, not a closure, so that
    DataLoader workers can pickle it. `extras`: functions (samples, phrases, tokenizer) -> {name: tensor}
    that add what a baseline or a diagnostic reads (baselines/negatives.py, baselines/losses.py,
    sources/shapes.py), called here so that they too run in the DataLoader workers."""

    def __init__(self, tokenizer, extras=()):
        self.tokenizer, self.extras = tokenizer, tuple(extras)

    def __call__(self, samples: list[dict]) -> dict:
        phrases, owner = [], []
        for i, s in enumerate(samples):
            own = phrases_or_caption(s["phrases"], s["caption"])
            phrases += own
            owner += [i] * len(own)
        batch = {
            "images": torch.stack([s["image"] for s in samples]),  # (B, C, S, S)
            "captions": self.tokenizer([s["caption"] for s in samples]),  # (B, T)
            "phrases": self.tokenizer(phrases),  # (K, Tc)
            "owner": torch.tensor(owner),  # (K,)
        }
        for extra in self.extras:
            batch |= extra(samples, phrases, self.tokenizer)
        return batch


# ----------------------------------------------------------------------------- the word tokenizer


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
        return cls.from_counts(
            Counter(w for text in texts for w in cls.split(text)), context_length, min_freq, max_size
        )

    @classmethod
    def from_counts(
        cls, counts: Counter, context_length: int, min_freq: int = 1, max_size: int | None = None
    ) -> "WordTokenizer":
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


# ----------------------------------------------------------------------------- images

# Pixel normalisations, defined here and nowhere else: (x / 255 - mean) / std per channel. A model's config
# names the one its weights expect (VisionConfig.normalise), so eval.py feeds every checkpoint the pixels
# it was trained on: "symmetric" maps [0, 255] onto [-1, 1] (models trained here, and SigLIP's constants),
# "clip" is OpenAI's CLIP, measured on its training images.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISE = {"symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "clip": (CLIP_MEAN, CLIP_STD)}


def image_to_tensor(img: Image.Image, normalise: str = "symmetric") -> torch.Tensor:
    """PIL RGB -> (C, height, width) float, normalised with the named mean and std ("symmetric": in [-1, 1])."""
    mean, std = NORMALISE[normalise]
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255  # (C, height, width) in [0, 1]
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def eval_transform(size: int, normalise: str = "symmetric", resize: str = "crop") -> T.Compose:
    """PIL RGB -> (C, size, size), bicubic and antialiased. resize="crop": shorter side resized to size, then
    the centre square, as CLIP evaluates (with normalise="clip", OpenAI's preprocessing exactly); "squash":
    the whole image resized to size x size, open_clip's preprocessing for SigLIP's weights."""
    if resize not in ("crop", "squash"):
        raise ValueError(f"unknown resize {resize!r}; expected 'crop' or 'squash'")
    to_tensor = functools.partial(image_to_tensor, normalise=normalise)
    if resize == "squash":
        return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), to_tensor])
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), to_tensor])


def train_transform(size: int, normalise: str = "symmetric") -> T.Compose:
    """PIL -> (C, size, size): CLIP-style augmentation, a random crop of 90-100% of the area (aspect 3:4 to
    4:3) resized to size x size. CLIP trains with little augmentation: the captions are the supervision."""
    crop = T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, functools.partial(image_to_tensor, normalise=normalise)])


# Pixels an image may declare: 128 times the largest input a released model reads (SigLIP's 512 x 512), 33.5
# million, so a 24-megapixel camera photo passes and no image decodes to more than 96 MiB of RGB. PIL's own
# check (Image.MAX_IMAGE_PIXELS) only warns below 179 million: a PNG of 169 million black pixels is 164 KB.
MAX_PIXELS = 128 * 512 * 512


class TooManyPixels(OSError):
    """An image whose header declares more than MAX_PIXELS pixels: refused before any pixel is decoded."""


def load_image(source: str | bytes) -> Image.Image:
    """A path or an encoded image's bytes -> PIL RGB, decoded now: a truncated or corrupt image raises OSError
    here (naming the file, for a path), one of more than MAX_PIXELS pixels TooManyPixels (its size is read
    from the header, before decoding)."""
    name = "" if isinstance(source, bytes) else f"{source}: "
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the stricter bound
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with img:
            width, height = img.size
            if width * height <= MAX_PIXELS:
                return img.convert("RGB")
    except Image.DecompressionBombError as err:  # over twice PIL's own bound: PIL refuses it as it opens
        raise TooManyPixels(f"{name}{err}") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's ways of saying "corrupt"
        raise OSError(f"{name}cannot decode the image ({err})") from None
    raise TooManyPixels(f"{name}{width} x {height} pixels, over the {MAX_PIXELS:,} read here (data.MAX_PIXELS)")
