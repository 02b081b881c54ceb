"""SentencePiece's unigram tokenizer, written from scratch: the .model file, its normalisation, its Viterbi.

SigLIP's text tower reads the ids of a SentencePiece unigram model (T5's English vocabulary, 32,000 pieces);
released/tokenizers.SigLIPTokenizer adds open_clip's cleaning, end token and padding around this file. What
is reproduced here is `sentencepiece.SentencePieceProcessor(model_file=...).encode(text)`, id for id
(tests/test_sentencepiece.py compares the two on hundreds of strings with a model trained in the test):

  1. read_model: the .model file is a protobuf message (ModelProto) of pieces, each a string with a score
     (its log probability under the unigram model) and a type, plus the normaliser's settings and rules.
     A dozen lines read protobuf's wire format; no protobuf package.
  2. Normalizer: the rules are a precompiled character map, a double-array trie (the Darts-clone format)
     over UTF-8 bytes whose longest match at each position is rewritten (NFKC and a few more in T5's
     model); spaces are trimmed and collapsed, one is put in front ("world" and "hello world" then share
     the piece "▁world"), and every space is written "▁" (U+2581), the word-boundary symbol of the pieces.
  3. UnigramModel.encode: the segmentation of the normalised text into pieces whose scores sum highest,
     found by Viterbi over every piece that matches at every position, summed in float32 as SentencePiece
     does (ties and near-ties then break the same way). A character no piece covers becomes an unknown
     piece scored (lowest piece score - 10), and a run of unknowns is one <unk> id, as SentencePiece
     reports it.

Not supported, each refused when the file asks for it rather than tokenized differently (T5's vocabulary
uses none of them): byte fallback (BYTE pieces), user-defined pieces, BPE/word/char models, sampling.

Checked when a model is read, so that a damaged or crafted file fails there, in one line, and never costs more
than its size: integers of at most 10 bytes (protobuf's own limit), every length inside its message (a
truncated file is caught at the first one that runs past the end), both settings messages present (written
after the pieces: a file cut between two fields lacks them), pieces of at most 512 characters (the longest
SentencePiece's trainer makes; a longer one costs that much per character of every text), a character map
whose every rule points at a replacement inside it; a rule never ends inside a character.

Dimension legend: none (lists of ids).
"""

import struct

# SentencePiece's piece types (ModelProto.SentencePiece.Type) and model types (TrainerSpec.ModelType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1
UNK_PENALTY = 10.0  # an unknown character scores this much below the least likely piece
MAX_VARINT = 10  # bytes: protobuf's longest integer
MAX_PIECE = 512  # characters: SentencePiece's trainer refuses a longer max_sentencepiece_length
SPACE = "▁"
_F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """x rounded to float32, the precision SentencePiece keeps scores and path sums in."""
    return _F32.unpack(_F32.pack(x))[0]


# ----------------------------------------------------------------------------- the .model file


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """Protobuf's base-128 integer at buf[i:] -> (value, index after it). At most 10 bytes, as protobuf reads
    it (a 64-bit value): a longer run of continuation bytes is damage, not a number to build bit by bit."""
    value = 0
    for k, byte in enumerate(buf[i : i + MAX_VARINT]):
        value |= (byte & 0x7F) << 7 * k
        if byte < 0x80:
            return value, i + k + 1
    raise ValueError(f"the integer at byte {i} runs past {MAX_VARINT} bytes or the end of its message: a damaged file")


def read_fields(buf: bytes) -> dict[int, list]:
    """One protobuf message -> {field number: [values in order]}: varints as int, 32-bit fields as float
    (every 32-bit field of these messages is a float), length-delimited ones as bytes (strings and nested
    messages, decoded by the caller, which knows the schema). A field must fit in the message: protobuf's
    format has no end marker, so a truncated file is caught by the first length that runs past its end."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 2, 5):
            length, i = (8, i) if wire == 1 else (4, i) if wire == 5 else _varint(buf, i)
            if length > len(buf) - i:
                raise ValueError(f"field {number} claims {length:,} bytes, {len(buf) - i:,} are left: a truncated file")
            value, i = buf[i : i + length], i + length
            value = _F32.unpack(value)[0] if wire == 5 else value
        else:
            raise ValueError(f"protobuf wire type {wire} (field {number}) is not used by SentencePiece models")
        fields.setdefault(number, []).append(value)
    return fields


def read_model(data: bytes) -> dict:
    """A .model file's bytes -> what encoding needs, as plain data (a checkpoint stores it, see
    SigLIPTokenizer.state_dict): pieces, scores, types, the normaliser's settings and character map.

    ModelProto: 1 pieces {1 piece, 2 score, 3 type = NORMAL}, 2 trainer_spec {3 model_type = UNIGRAM,
    24 treat_whitespace_as_suffix = false, 47 eos_piece = "</s>"}, 3 normalizer_spec {2 precompiled_charsmap,
    3 add_dummy_prefix = true, 4 remove_extra_whitespaces = true, 5 escape_whitespaces = true}."""
    model = read_fields(data)
    if 2 not in model or 3 not in model:  # written after the pieces: a file cut between two fields lacks them
        raise ValueError("no trainer or normaliser settings (every SentencePiece model has both): a truncated file")
    pieces = [read_fields(raw) for raw in model.get(1, [])]
    trainer = read_fields(model[2][-1])
    normalizer = read_fields(model[3][-1])
    if not all(1 in p and type(p.get(2, [0.0])[-1]) is float and type(p.get(3, [1])[-1]) is int for p in pieces):
        raise ValueError("a piece without its string, or with a score or type of another kind: a damaged file")

    def last(fields: dict, number: int, default):
        return fields[number][-1] if number in fields else default

    return {
        "pieces": [p[1][-1].decode("utf-8") for p in pieces],
        "scores": [last(p, 2, 0.0) for p in pieces],
        "types": [last(p, 3, NORMAL) for p in pieces],
        "model_type": last(trainer, 3, UNIGRAM),
        "eos_piece": last(trainer, 47, b"</s>").decode("utf-8"),
        "charsmap": last(normalizer, 2, b""),
        "add_dummy_prefix": bool(last(normalizer, 3, True)),
        "remove_extra_whitespaces": bool(last(normalizer, 4, True)),
        "escape_whitespaces": bool(last(normalizer, 5, True)),
        "treat_whitespace_as_suffix": bool(last(trainer, 24, False)),
    }


# ----------------------------------------------------------------------------- normalisation


# A Darts-clone double-array unit (32 bits): a leaf flag, a label (the byte that leads to it), an offset to
# its children; a leaf unit's value is the offset of a replacement in the map's string table.
def _has_leaf(unit: int) -> bool:
    return bool(unit >> 8 & 1)


def _label(unit: int) -> int:
    return unit & 0x800000FF


def _offset(unit: int) -> int:
    return (unit >> 10) << ((unit & 0x200) >> 6)


def read_charsmap(charsmap: bytes) -> tuple[tuple[int, ...], bytes]:
    """A precompiled character map, [trie size: uint32][trie: uint32 units][replacements, each ending in \\0],
    -> (units, replacements), checked now rather than at the first text that reaches a damaged part: every
    node with a rule (a leaf, see Normalizer.rule) points inside the trie at a UTF-8 replacement that ends."""
    size = struct.unpack_from("<I", charsmap)[0] if len(charsmap) >= 4 else -1
    if size < 0 or size % 4 or size > len(charsmap) - 4:
        raise ValueError(f"a character map of {len(charsmap):,} bytes whose trie claims {size:,}: a damaged file")
    units, strings = struct.unpack_from(f"<{size // 4}I", charsmap, 4), charsmap[4 + size :]
    for i, unit in enumerate(units):
        if unit >> 31 or not _has_leaf(unit):  # a leaf's value, or a node without a rule
            continue
        value = units[i ^ _offset(unit)] & 0x7FFFFFFF if i ^ _offset(unit) < len(units) else len(strings)
        end = strings.find(b"\0", value)
        if value >= len(strings) or end < 0 or not _is_utf8(strings[value:end]):
            raise ValueError(f"rule {i} of the character map points outside it: a damaged file")
    return units, strings


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Normalizer:
    """SentencePiece's normaliser: the character map's rewrites, spaces trimmed and collapsed, a space in
    front (add_dummy_prefix), spaces written as "▁"."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.units, self.strings = read_charsmap(spec["charsmap"]) if spec["charsmap"] else ((), b"")

    def rule(self, data: bytes, start: int) -> tuple[bytes, int]:
        """(replacement, bytes consumed) at data[start:]: the longest rule that matches, else one character
        as it is (a common-prefix search of the trie, one byte at a time)."""
        consumed, replacement = 0, b""
        if self.units:
            node = _offset(self.units[0])
            for i in range(start, len(data)):
                node ^= data[i]
                if node >= len(self.units) or _label(self.units[node]) != data[i]:
                    break
                unit = self.units[node]
                node ^= _offset(unit)
                if _has_leaf(unit) and (i + 1 == len(data) or data[i + 1] & 0xC0 != 0x80):  # whole characters
                    value = self.units[node] & 0x7FFFFFFF
                    consumed, replacement = i + 1 - start, self.strings[value : self.strings.index(b"\0", value)]
        if consumed:
            return replacement, consumed
        lead = data[start]  # one UTF-8 character: its length from its first byte
        length = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        return data[start : start + length], length

    def __call__(self, text: str) -> str:
        spec = self.spec
        data, i = text.encode("utf-8"), 0
        space = SPACE.encode("utf-8") if spec["escape_whitespaces"] else b" "
        trim = spec["remove_extra_whitespaces"]
        while trim and i < len(data) and (step := self.rule(data, i))[0] == b" ":  # leading spaces
            i += step[1]
        if i == len(data):
            return ""
        suffix = spec["treat_whitespace_as_suffix"]
        out = bytearray(space if spec["add_dummy_prefix"] and not suffix else b"")
        after_space = trim  # drop spaces that follow a space (and those at the start)
        while i < len(data):
            piece, consumed = self.rule(data, i)
            if after_space:
                piece = piece.lstrip(b" ")
            if piece:
                out += piece.replace(b" ", space)
                after_space = trim and piece.endswith(b" ")
            i += consumed
        while trim and out.endswith(space):  # trailing spaces
            del out[-len(space) :]
        if spec["add_dummy_prefix"] and suffix:
            out += space
        return out.decode("utf-8")


# ----------------------------------------------------------------------------- segmentation


class UnigramModel:
    """A SentencePiece unigram model: text -> piece ids, as SentencePieceProcessor.encode computes them."""

    def __init__(self, spec: dict):
        types = spec["types"]
        if spec["model_type"] != UNIGRAM:
            raise ValueError(f"a SentencePiece model of type {spec['model_type']}, not unigram (1)")
        if BYTE in types or USER_DEFINED in types:
            raise ValueError("byte-fallback and user-defined pieces are not supported (T5's vocabulary has none)")
        self.spec, self.normalize = spec, Normalizer(spec)
        self.unk_id = types.index(UNKNOWN)
        self.eos_id = spec["pieces"].index(spec["eos_piece"])
        # The pieces a text can be cut into: normal ones. Control pieces (<pad>, </s>) and the unknown
        # piece never match text, unused ones are skipped, as in SentencePiece.
        self.ids = {p: i for i, (p, t) in enumerate(zip(spec["pieces"], types)) if t == NORMAL}
        self.scores = spec["scores"]
        self.longest = max(map(len, self.ids), default=1)
        if self.longest > MAX_PIECE:  # each character of a text is matched against pieces up to this long
            raise ValueError(f"a piece of {self.longest:,} characters; SentencePiece makes none over {MAX_PIECE}")
        self.unk_score = f32(min(self.scores[i] for i in self.ids.values()) - UNK_PENALTY)

    def __len__(self) -> int:
        return len(self.spec["pieces"])

    def encode(self, text: str) -> list[int]:
        """text -> piece ids of its best segmentation (no end token)."""
        s = self.normalize(text)
        n = len(s)
        # best[e] = (score of the best segmentation of s[:e], start of its last piece, that piece's id)
        best: list[tuple[float, int, int] | None] = [(0.0, 0, -1)] + [None] * n
        for start in range(n):
            here, single = best[start][0], False
            for length in range(1, min(self.longest, n - start) + 1):  # every piece that starts here
                piece_id = self.ids.get(s[start : start + length])
                if piece_id is None:
                    continue
                single |= length == 1
                self._relax(best, start, start + length, piece_id, f32(here + self.scores[piece_id]))
            if not single:  # no piece covers this character: it is unknown
                self._relax(best, start, start + 1, self.unk_id, f32(here + self.unk_score))
        ids, end = [], n
        while end > 0:
            _, end, piece_id = best[end]
            ids.append(piece_id)
        ids.reverse()
        return [i for k, i in enumerate(ids) if not (i == self.unk_id and k and ids[k - 1] == self.unk_id)]

    @staticmethod
    def _relax(best: list, start: int, end: int, piece_id: int, score: float) -> None:
        """Keep the path through piece (start, end) if it beats the best path to `end` so far (strictly:
        on a tie the path found first, the one with the earlier last piece, stays, as in SentencePiece)."""
        if best[end] is None or score > best[end][0]:
            best[end] = (score, start, piece_id)
