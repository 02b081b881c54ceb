"""SigLIP's tokenizer from scratch (sentencepiece_unigram.py, released_tokenizers.SigLIPTokenizer): the .model reader,
the normaliser and the Viterbi segmentation give the `sentencepiece` package's ids on hundreds of varied strings, for
a unigram model trained here (nothing is downloaded); the cleaning is open_clip's canonicalize; end token, padding and
truncation are open_clip's pipeline for ViT-B-16-SigLIP. sentencepiece and open_clip are test-only dependencies."""

import os
import random
import subprocess
import sys

import pytest
import torch

from fixtures import spm_model_bytes
from released.sentencepiece import CONTROL, NORMAL, UNKNOWN, UnigramModel, read_model
from released.tokenizers import SigLIPTokenizer, canonicalize, find_spm_model, tokenizer_from_state_dict
from test_bpe import HAND, varied_strings

sentencepiece = pytest.importorskip("sentencepiece")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def spm():
    """(the model file's bytes, sentencepiece's processor of it)."""
    data = spm_model_bytes()
    return data, sentencepiece.SentencePieceProcessor(model_proto=data)


def strings() -> list[str]:
    """test_bpe's hand-written and random strings (punctuation, digits, accents, scripts, emoji, HTML, empty,
    very long), upper-cased too, whitespace oddities, and made-up words like those of the training text."""
    rng = random.Random(1)
    made_up = ["".join(rng.choices("abcdefghiklmnorstu", k=rng.randint(1, 12))) for _ in range(60)]
    odd = ["  a  b  ", "\u3000x\u3000y", "a\u00a0\u00a0b", "ﬀ" * 3, "¨a", "x\u200by", "\t\n", "ǂǂ ǂ", "QQ qq Q"]
    upper = [s.upper() for s in HAND if "&" not in s]  # all-caps HTML entities: a known departure from ftfy
    return HAND + varied_strings() + upper + made_up + odd + ["word " * 300]


def test_reader_reads_pieces_scores_and_types(spm):
    data, sp = spm
    spec = read_model(data)
    assert len(spec["pieces"]) == sp.get_piece_size() == 600
    assert spec["pieces"] == [sp.id_to_piece(i) for i in range(600)]
    assert spec["scores"] == [sp.get_score(i) for i in range(600)]  # float32 both, read exactly
    assert spec["types"][:3] == [CONTROL, CONTROL, UNKNOWN] and set(spec["types"][3:]) == {NORMAL}
    assert spec["pieces"][:3] == ["<pad>", "</s>", "<unk>"] and spec["eos_piece"] == "</s>"
    assert spec["add_dummy_prefix"] and spec["remove_extra_whitespaces"] and len(spec["charsmap"]) > 1000  # nmt_nfkc


def test_ids_match_sentencepiece_on_hundreds_of_strings(spm):
    data, sp = spm
    ours = UnigramModel(read_model(data))
    texts = strings()
    texts += [canonicalize(t) for t in texts]  # the strings SigLIP's pipeline actually passes on
    mismatches = [(t, ours.encode(t)[:12], sp.encode(t)[:12]) for t in texts if ours.encode(t) != sp.encode(t)]
    unknown = sum(ours.unk_id in ours.encode(t) for t in texts)
    print(f"compared {len(texts)} strings ({unknown} with unknown characters): {len(mismatches)} differ")
    assert len(texts) >= 800 and unknown > 100 and not mismatches, mismatches[:5]
    assert sp.encode("") == ours.encode("") == [] and ours.encode(" \t ") == []


@pytest.mark.parametrize(
    "options",
    [
        {"add_dummy_prefix": False},
        {"remove_extra_whitespaces": False},
        {"normalization_rule_name": "identity"},  # no character map at all
        {"normalization_rule_name": "nfkc_cf"},  # NFKC and case folding
        {"treat_whitespace_as_suffix": True},
    ],
)
def test_normaliser_settings_match_sentencepiece(options):
    data = spm_model_bytes(**options)
    sp, ours = sentencepiece.SentencePieceProcessor(model_proto=data), UnigramModel(read_model(data))
    texts = strings()[::3]
    assert [ours.encode(t) for t in texts] == [sp.encode(t) for t in texts]


def test_viterbi_by_hand():
    """The best-scoring segmentation, not the greedy longest match: "▁abc" is cut "▁ab"+"c" (-1 - 1 = -2) only
    if that beats "▁a"+"bc" (-1.5 - 0.25 = -1.75); an uncovered character is <unk>, a run of them one <unk>."""
    pieces = ["<pad>", "</s>", "<unk>", "▁ab", "▁a", "bc", "c", "▁", "a", "b"]
    scores = [0.0, 0.0, 0.0, -1.0, -1.5, -0.25, -1.0, -3.0, -4.0, -4.0]
    types = [CONTROL, CONTROL, UNKNOWN] + [NORMAL] * 7
    spec = {"pieces": pieces, "scores": scores, "types": types, "model_type": 1, "eos_piece": "</s>", "charsmap": b""}
    spec |= {"add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True}
    model = UnigramModel(spec | {"treat_whitespace_as_suffix": False})
    assert model.encode("abc") == [4, 5]  # ▁a bc
    assert model.encode("  abc   ab ") == [4, 5, 3]  # spaces trimmed and collapsed
    assert model.encode("abxyc a") == [3, 2, 6, 4]  # ▁ab <unk> c ▁a: "xy" is one unknown run
    assert model.unk_score == -14.0  # the lowest piece score, -4, less 10


def test_canonicalize_is_open_clips():
    open_clip = pytest.importorskip("open_clip")
    texts = strings()
    assert [canonicalize(t) for t in texts] == [open_clip.tokenizer._clean_canonicalize(t) for t in texts]
    assert canonicalize("  A_Photo of a DOG!!  (¡sí!) ") == "a photo of a dog ¡sí"  # ASCII punctuation only


def test_siglip_tokenizer_is_open_clips_pipeline(spm, tmp_path):
    """open_clip's HFTokenizer for ViT-B-16-SigLIP (max_length 64, truncation, padding="max_length" with </s>),
    its T5 tokenizer standing in as sentencepiece's ids + </s>: the same rows, always 64 long."""
    data, sp = spm
    (tmp_path / "spiece.model").write_bytes(data)
    tok = SigLIPTokenizer.from_file(find_spm_model(beside=str(tmp_path / "weights.safetensors")))
    texts = strings()
    reference = [(sp.encode(canonicalize(t))[:63] + [1] + [1] * 64)[:64] for t in texts]
    assert tok(texts).tolist() == reference and tok(texts).shape == (len(texts), 64)
    assert tok([""]).tolist() == [[1] * 64]  # an empty text is the end token and its padding
    long = tok.encode("word " * 300)
    assert len(long) == 64 and long[-1] == 1 and 1 not in long[:-1]  # 63 pieces, then </s>
    assert tok.decode(tok.encode("A red dog, on the beach!")) == "a red dog on the beach"
    assert len(tok) == 600 and (tok.end_id, tok.pad_id, tok.model.unk_id) == (1, 1, 2)


def test_state_dict_carries_the_model(spm, tmp_path):
    """A checkpoint needs no .model file: the pieces, scores, types and character map travel in it, and survive
    torch.load(weights_only=True)."""
    tok = SigLIPTokenizer(read_model(spm[0]), context_length=16)
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "ckpt.pt")
    again = tokenizer_from_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"])
    assert type(again) is SigLIPTokenizer and again.context_length == 16
    assert again(HAND).equal(tok(HAND)) and tok(HAND).shape == (len(HAND), 16)


def test_missing_model_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--spm") as err:
        find_spm_model(beside=str(tmp_path / "open_clip_model.safetensors"))
    assert "cc_en.32000/sentencepiece.model" in str(err.value)


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="not unigram"):
        UnigramModel(read_model(spm_model_bytes(model_type="bpe", vocab_size=300)))
    with pytest.raises(ValueError, match="byte-fallback"):
        UnigramModel(read_model(spm_model_bytes(byte_fallback=True)))


def test_runs_without_sentencepiece_protobuf_or_open_clip(spm, tmp_path):
    path = tmp_path / "sentencepiece.model"
    path.write_bytes(spm[0])
    code = (
        "import sys\n"
        "for name in ('sentencepiece', 'google', 'google.protobuf', 'open_clip', 'ftfy', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "from released.tokenizers import SigLIPTokenizer\n"
        f"print(SigLIPTokenizer.from_file({str(path)!r}).encode('Hello, World! café 😀'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(spm[1].encode(canonicalize("Hello, World! café 😀")) + [1])
