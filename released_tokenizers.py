"""Tokenizers of released models, written from scratch: CLIP's byte-level BPE.

Models trained here from scratch use the word tokenizer of data.py; a model started from released weights
must tokenize exactly as its authors did, or every text embedding is off. Each tokenizer has the interface
of data.WordTokenizer (encode, __call__ -> (B, T) right-padded with 0, state_dict), and a checkpoint
records which one it was trained with (state_dict()["kind"], read back by tokenizer_from_state_dict), so
eval.py always tokenizes as training did.

Paper map: none directly. The paper fine-tunes SigLIP, whose tokenizer is a SentencePiece model; this
repository starts from OpenAI's CLIP (pretrained.py), so the BPE below is the one implemented.

Dimension legend: B texts, T tokens (the longest in the batch, at most the context length).
"""

import gzip
import html
import importlib.util
import math
import os
import unicodedata

import torch

from data import WordTokenizer, pad_batch

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


def tokenizer_from_state_dict(state: dict):
    """The tokenizer a checkpoint was trained with, whichever kind it is."""
    if state.get("kind") == "word":
        return WordTokenizer.from_state_dict(state)
    if state.get("kind") == "clip_bpe":
        return BPETokenizer.from_state_dict(state)
    raise ValueError(f"unknown tokenizer kind {state.get('kind')!r} in the checkpoint")
