"""Tokenizers of released models, written from scratch: CLIP's byte-level BPE and SigLIP's SentencePiece.

Models trained here from scratch use the word tokenizer of data.py; a model started from released weights
must tokenize exactly as its authors did, or every text embedding is off. Each tokenizer has the interface
of data.WordTokenizer (encode, __call__ -> (B, T) right-padded with 0, state_dict), and a checkpoint
records which one it was trained with (state_dict()["kind"], read back by tokenizer_from_state_dict), so
eval.py always tokenizes as training did.

Paper map: none directly. The paper fine-tunes SigLIP, whose tokenizer is SigLIPTokenizer below: open_clip's
"canonicalize" cleaning, then T5's SentencePiece unigram model (released/sentencepiece.py), the end token
and padding to the full 64-token context. OpenAI's CLIP weights (released/weights.py) use BPETokenizer.

Dimension legend: B texts, T tokens (the longest in the batch, at most the context length).
"""

import gzip
import html
import importlib.util
import math
import os
import string
import unicodedata

import torch

from data import WordTokenizer, pad_batch
from released.sentencepiece import UnigramModel, read_model

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
    controls = [
        *range(0x00, 0x09),
        0x0B,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x206A, 0x2070),
        *range(0xFFF9, 0xFFFD),
        0xFEFF,
    ]
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


def basic_clean(text: str) -> str:
    """open_clip's basic_clean (ftfy, then HTML entities twice, then strip), without ftfy."""
    if "<" not in text:  # ftfy decodes entities unless the text looks like HTML, until nothing changes
        while (decoded := html.unescape(text)) != text:
            text = decoded
    text = unicodedata.normalize("NFC", text.translate(FTFY_TABLE))
    return html.unescape(html.unescape(text)).strip()  # CLIP's own step, after ftfy


def clean_text(text: str) -> str:
    """CLIP's text cleaning: basic_clean, whitespace collapsed, lower case."""
    return " ".join(basic_clean(text).split()).lower()


PUNCTUATION = str.maketrans("", "", string.punctuation)  # ASCII only: "!" goes, "¡" and "…" stay


def canonicalize(text: str) -> str:
    """open_clip's "canonicalize" cleaning of SigLIP's text (big_vision's, for its prompts): basic_clean,
    then underscores read as spaces, ASCII punctuation removed, lower case, whitespace collapsed."""
    text = basic_clean(text).replace("_", " ").translate(PUNCTUATION).lower()
    return " ".join(text.split())


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
            f"weights: download it from {BPE_URL} and pass --bpe PATH "
            "(or pip install open_clip_torch, which ships a copy)."
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
        data = b"".join(
            bytes(SYMBOL_BYTES[c] for c in p.removesuffix("</w>")) + b" " * p.endswith("</w>") for p in pieces
        )
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


# SigLIP's tokenizer, as open_clip runs it for ViT-B-16-SigLIP (its config: hf_tokenizer_name
# "timm/ViT-B-16-SigLIP", context_length 64, tokenizer_kwargs clean "canonicalize"): the text cleaned by
# canonicalize, then the Hugging Face T5 tokenizer of T5's English SentencePiece model (cc_en.32000, the
# "c4-en" vocabulary of open_clip's SigLipTokenizer) with max_length 64, truncation and padding to
# max_length. T5's vocabulary has no start token; its end token </s> is id 1, and SigLIP pads with it too
# (big_vision's tokenize(eos="sticky", pad_value=1); open_clip sets pad_token_id = 1): [ids..., 1, 1, ...].
# A long text keeps its first 63 pieces, then </s>. Unknown characters are <unk> (id 2), one per run.
SPM_FILES = ("sentencepiece.model", "spiece.model")  # T5's name for the file; Hugging Face's for a copy
SPM_URL = "https://storage.googleapis.com/t5-data/vocabs/cc_en.32000/sentencepiece.model"


def find_spm_model(path: str | None = None, beside: str | None = None) -> str:
    """The SentencePiece model file: `path`, else one of SPM_FILES in the folder of `beside` (the weights)."""
    if path is None and beside is not None:
        folder = os.path.dirname(os.path.abspath(beside))
        path = next((os.path.join(folder, n) for n in SPM_FILES if os.path.exists(os.path.join(folder, n))), None)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            f"SigLIP's SentencePiece model {path or ' or '.join(SPM_FILES)} was not found. It is needed to "
            f"tokenize text for SigLIP weights: download it from {SPM_URL}, and pass --spm PATH or put it "
            "beside the weights (docs/pretrained.md)."
        )
    return path


class SigLIPTokenizer:
    """SigLIP's tokenizer: [SentencePiece ids of the canonicalized text..., </s>], padded with </s> to exactly
    context_length tokens. Always the full context: SigLIP's text transformer has no mask, every position
    attends to the padding, and the last position is the text's feature."""

    def __init__(self, spec: dict, context_length: int = 64):
        self.spec, self.context_length = spec, context_length  # spec: released/sentencepiece.read_model's
        self.model = UnigramModel(spec)
        self.end_id = self.pad_id = self.model.eos_id

    @classmethod
    def from_file(cls, path: str, context_length: int = 64) -> "SigLIPTokenizer":
        with open(path, "rb") as f:
            return cls(read_model(f.read()), context_length)

    def __len__(self) -> int:
        return len(self.model)

    def encode(self, text: str) -> list[int]:
        """[ids..., </s>], truncated so that the end token always fits in the context (no padding)."""
        return self.model.encode(canonicalize(text))[: self.context_length - 1] + [self.end_id]

    def decode(self, ids) -> str:
        pieces = [self.spec["pieces"][i] for i in ids if i != self.end_id]
        return "".join(pieces).replace("▁", " ").strip()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> (len(texts), context_length) int64, right-padded with </s>."""
        rows = [self.encode(t) for t in texts]
        return torch.tensor([row + [self.pad_id] * (self.context_length - len(row)) for row in rows])

    def state_dict(self) -> dict:
        # The pieces, scores, types and character map themselves (about 0.8 MB for T5's 32,000 pieces), so a
        # checkpoint needs no SentencePiece file to be evaluated.
        return {"kind": "sentencepiece", "model": self.spec, "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SigLIPTokenizer":
        return cls(state["model"], state["context_length"])


TOKENIZER_KINDS = {"word": WordTokenizer, "clip_bpe": BPETokenizer, "sentencepiece": SigLIPTokenizer}  # kind -> class


def tokenizer_from_state_dict(state: dict):
    """The tokenizer a checkpoint was trained with, whichever kind it is. ValueError in one line for a state
    of an unknown kind or a malformed one (a field missing or of the wrong type): it comes from a file."""
    if not isinstance(state, dict):
        raise ValueError(f"the checkpoint's tokenizer is a {type(state).__name__}, not a tokenizer's state (a dict)")
    kind = state.get("kind")
    if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer kind {kind!r} in the checkpoint (train.py writes {', '.join(TOKENIZER_KINDS)})"
        )
    try:
        tokenizer = TOKENIZER_KINDS[kind].from_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        detail = f"no field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise ValueError(f"the checkpoint's {kind} tokenizer is malformed ({detail})") from None
    if not isinstance(tokenizer.context_length, int) or tokenizer.context_length < 2:  # the end token must fit
        raise ValueError(f"the checkpoint's {kind} tokenizer has a context of {tokenizer.context_length!r} tokens")
    return tokenizer
