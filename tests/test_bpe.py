"""CLIP's byte-level BPE tokenizer (released_tokenizers.py): its pieces by hand, and ids identical to open_clip's
(a test-only dependency whose package ships the vocabulary file) on a few hundred varied strings."""

import gzip
import importlib.util
import os
import random
import subprocess
import sys

import pytest

from data import WordTokenizer
from released.tokenizers import BPETokenizer, clean_text, find_bpe_vocab, pretokenize, tokenizer_from_state_dict

# ----------------------------------------------------------------------------- without open_clip


def test_pretokenize_follows_clips_pattern():
    # contractions split off, letters run on, digits one at a time, other symbols run on, spaces dropped
    assert pretokenize("it's 2024, ok?! they'll") == ["it", "'s", "2", "0", "2", "4", ",", "ok", "?!", "they", "'ll"]
    assert pretokenize("'sun") == ["'s", "un"]  # CLIP's pattern tries contractions first, quirks included
    assert pretokenize("café ½ 😀!") == ["café", "½", "😀!"]  # ½ is a number (No); emoji and "!" are symbols


def test_clean_text_does_what_ftfy_and_html_do():
    assert (
        clean_text("  “Curly”\u00a0QUOTES  it’s ﬁne\tＦＵＬＬ　ｗｉｄｔｈ ") == '"curly" quotes it\'s fine full width'
    )
    assert clean_text("Caf&eacute; &amp;amp; e\u0301") == "café & é"  # entities, nested ones, NFC
    assert clean_text("<b>&amp;amp;</b>") == "<b>&</b>"  # HTML-looking text: only CLIP's own two unescapes


def test_bpe_merges_in_learned_order_with_a_tiny_vocabulary():
    # "l o" is learned before "o w</w>", so "low" becomes "lo" + "w</w>", then "lo w</w>" joins them
    tok = BPETokenizer(["l o", "o w</w>", "lo w</w>", "e r</w>"], context_length=8)
    assert tok.bpe("low") == ["low</w>"]
    assert tok.bpe("lower") == ["lo", "w", "er</w>"]
    assert tok.bpe("ow") == ["ow</w>"]
    assert len(tok) == 512 + 4 + 2 and tok.start_id == 516 and tok.end_id == 517
    ids = tok.encode("Low lower")
    assert ids[0] == tok.start_id and ids[-1] == tok.end_id and tok.decode(ids) == "low lower"
    # truncation keeps the end token in the last position of the context
    long = tok.encode("a b c d e f g h i j")
    assert len(long) == 8 and long[-1] == tok.end_id and tok.decode(long) == "a b c d e f"
    batch = tok(["low", "a b c"])
    assert batch.shape == (2, 5) and batch[0].tolist()[3:] == [0, 0]  # padded to the longest, with 0


def test_state_dict_records_the_kind_and_round_trips():
    bpe = BPETokenizer(["l o", "lo w</w>"], context_length=16)
    word = WordTokenizer.build(["a red circle"], context_length=16)
    for tok in (bpe, word):
        again = tokenizer_from_state_dict(tok.state_dict())
        assert type(again) is type(tok) and again(["a low red circle"]).equal(tok(["a low red circle"]))
    assert bpe.state_dict()["kind"] == "clip_bpe" and word.state_dict()["kind"] == "word"
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_state_dict({"kind": "wordpiece"})


def test_missing_vocabulary_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--bpe"):
        find_bpe_vocab(str(tmp_path / "nope.txt.gz"))


# ----------------------------------------------------------------------------- against open_clip


@pytest.fixture(scope="module")
def tokenizers():
    """(ours, open_clip's) reading the same vocabulary file, found inside the open_clip package."""
    open_clip = pytest.importorskip("open_clip")
    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
    return BPETokenizer.from_file(path), open_clip.tokenizer.SimpleTokenizer(path)


# ruff: noqa: E501 (the HAND and PIECES tables hold many strings per line, kept as written)
HAND = [
    "A photo of a cat.",
    "Hello, World!",
    "wow!$5 deal",
    "It's a dog's life, isn't it? They'll've gone; I'm sure you'd agree",
    "'single' and ''double'' quotes",
    '"quoted" text',
    "café naïve Ångström façade",
    "cafe\u0301 with a decomposed accent",
    "Straße Œuvre Æsir ðæt þing",
    "ÀÉÎÕÜ ÇÑ",
    "日本語のテキスト",
    "中文字符和标点。",
    "한국어 텍스트",
    "Русский текст",
    "Ελληνικά",
    "עברית",
    "العربية ١٢٣",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "😀🐶 emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "♥ ★ ✓ → ← © ® ™ € £ ¥ ° ± × ÷ ½ ¼ ² ³ µ",
    "&amp; &lt;b&gt; &#39;quoted&#39; &quot;hi&quot; &nbsp;x &eacute;t&eacute; &#x263A; &copy; 2024",
    "&amp;amp; double-escaped &amp;lt;tag&amp;gt;",
    "<b>bold</b> &amp; <i>it</i>",
    "a < b &amp;&amp; c > d",
    "R&D and AT&T",
    "“curly” ‘quotes’ „low“ ‚single‘ it’s",
    "ﬁne ﬂoor eﬀort oﬃce baﬄe ﬆop",
    "ＦＵＬＬ　ｗｉｄｔｈ　１２３！",
    "ｶﾀｶﾅ ﾊﾝｶｸ",
    "12345 3.14 1,000,000 -42 +7 1e10 0x1F 50% $9.99 #1 @user",
    "2024-01-31T12:34:56Z",
    "http://example.com/path?q=1&x=2#frag",
    "user@example.com",
    "C:\\Program Files\\x",
    "snake_case and kebab-case and CamelCase",
    "UPPER lower MiXeD",
    "a\tb\nc  d\r\ne",
    "  leading and trailing  ",
    "non\u00a0breaking\u2009thin\u3000ideographic",
    "zero\u200bwidth\u200djoiner",
    "soft\u00adhyphen",
    "bom\ufeffmark",
    "ctrl\x01\x02chars\x7f",
    "c1\x85controls\x93quoted\x94",
    "...!!!???",
    "!?!?",
    "a!b!c",
    "hi!!!!!!!!",
    "(parenthetical) [brackets] {braces} <angles>",
    "--- *** ___ ~~~ ^^^",
    "emdash—endash–hyphen-",
    "ellipsis… bullet •",
    "",
    " ",
    "a",
    "!",
    "x" * 300,
    "word " * 100,
    "Ĳssel ŉ ǆ",
    "ſ long s",
    "İstanbul ǅ",
    "ﬀ" * 40,
    "A man riding a brown horse on the beach, while two young women sit at a wooden table with laptops next to a "
    "tall giraffe standing in a grassy field under a cloudy sky in the late afternoon light, shot on film. " * 2,
]
PIECES = [
    "the",
    "dog",
    "Cat",
    "PHOTO",
    "isn't",
    "we're",
    "you've",
    "I'm",
    "'d",
    "café",
    "naïve",
    "Zürich",
    "smørrebrød",
    "über",
    "東京",
    "서울",
    "Москва",
    "αβγ",
    "١٢٣",
    "123",
    "4.5",
    "7,000",
    "1st",
    "x2",
    "!",
    "?",
    "!?",
    ".",
    ",",
    ";",
    ":",
    "...",
    "—",
    "-",
    "(",
    ")",
    "[",
    "]",
    '"',
    "'",
    "“",
    "”",
    "‘",
    "’",
    "&amp;",
    "&lt;",
    "&gt;",
    "&quot;",
    "&#39;",
    "&eacute;",
    "&#233;",
    "&#xE9;",
    "&nbsp;",
    "&hellip;",
    "😀",
    "🐶",
    "👍🏽",
    "❤️",
    "🇯🇵",
    "👩‍💻",
    "★",
    "©",
    "™",
    "°C",
    "½",
    "²",
    "µm",
    "ﬁ",
    "Ｆ",
    "＠",
    "ﾀ",
    "$",
    "€",
    "%",
    "#",
    "@",
    "_",
    "/",
    "\\",
    "|",
    "~",
    "^",
    "*",
    "+",
    "=",
    "<",
    ">",
    "{",
    "}",
    "\t",
    "\n",
    "e\u0301",
    "a\u0308",
    "ß",
]


def varied_strings(n: int = 350, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pieces = rng.choices(PIECES, k=rng.randint(1, 14))
        out.append("".join(p + rng.choice(["", " ", " ", "  "]) for p in pieces))
    return out


def reference_ids(ref, text: str, length: int) -> tuple[list[int], list[int]]:
    """open_clip's row of 77 ids split into our length and the rest (which must be all padding)."""
    row = ref([text])[0].tolist()
    return row[:length], row[length:]


def test_ids_match_open_clip_on_hundreds_of_strings(tokenizers):
    ours, ref = tokenizers
    strings = HAND + varied_strings()
    mismatches = []
    for text in strings:
        ids = ours.encode(text)
        head, tail = reference_ids(ref, text, len(ids))
        if ids != head or any(tail):
            mismatches.append((text, ids[:12], head[:12]))
    print(f"compared {len(strings)} strings, {sum(map(len, strings))} characters: {len(mismatches)} differ")
    assert len(strings) >= 400 and not mismatches, mismatches[:5]


def test_long_text_is_cut_with_the_end_token_at_position_76(tokenizers):
    ours, ref = tokenizers
    text = "a red circle and a blue star, " * 40
    ids = ours.encode(text)
    assert len(ids) == 77 and ids[76] == 49407 and ids[0] == 49406
    assert ids == ref([text])[0].tolist()
    batch = ours([text, "short"])
    assert batch.shape == (2, 77) and batch[1, 3:].eq(0).all()
    assert len(ours) == 49408 and (ours.start_id, ours.end_id) == (49406, 49407)


def test_known_departures_from_ftfy_really_differ(tokenizers):
    """What released_tokenizers.py says it does not imitate: mojibake repair, ANSI escapes, all-caps entities, and
    CLIP's special-token strings typed into a caption. None of them occurs in the strings compared above."""
    ours, ref = tokenizers
    for text in ["cafÃ© mojibake", "\x1b[31mred\x1b[0m", "P&EACUTE;REZ", "a <end_of_text> b"]:
        ids = ours.encode(text)
        assert ids != ref([text])[0].tolist()[: len(ids)], text


def test_runs_without_open_clip_or_ftfy(tokenizers, tmp_path):
    """Nothing at run time may need the test-only packages: block them and tokenize from a copied file.
    (`regex` cannot be blocked this way: NLTK, a run-time dependency, imports it itself;
    tests/test_layout.py checks that our files never do.)"""
    path = tmp_path / "bpe.txt.gz"
    src = os.path.join(
        importlib.util.find_spec("open_clip").submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz"
    )
    with gzip.open(src) as f, gzip.open(path, "wb") as g:
        g.write(f.read())
    code = (
        "import sys\n"
        "for name in ('open_clip', 'ftfy'): sys.modules[name] = None\n"
        "from released import tokenizers\n"
        f"print(tokenizers.BPETokenizer.from_file({str(path)!r}).encode('Hello, World!'))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([49406] + tokenizers[1].encode("Hello, World!") + [49407])
