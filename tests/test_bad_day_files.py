"""Small files that used to cost large memory or time, or to end in a traceback (issue 29, items 6 to 9, 12 and
19): each is now refused in one line before the work it asks for. A block index of 10^8 makes no names for the
blocks below it; a TorchScript module tree shared by two parents, or a view that repeats its storage's bytes, is
refused while the file is read; a checkpoint's config that its tensors cannot fill is refused before any module
is built; a SentencePiece model that is truncated, damaged or holds a piece longer than SentencePiece makes is
refused when it is read, not at the first text it meets. eval.py --ckpt, train.py --init and --resume say each
in one line. Every file is made here, in the real formats (pickles written opcode by opcode where torch would
never write them)."""

import struct
import tracemalloc

import pytest
import torch
from test_failures import run
from test_weight_files import never, one_line_exit, rewrite_zip

import eval as evaluate
from fixtures import spm_model_bytes, write_checkpoint
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from released.convert import TOP_NAMES, TOWERS, convert_openai_state_dict
from released.files import read_state_dict, read_torchscript_state_dict
from released.sentencepiece import read_model
from released.tokenizers import SigLIPTokenizer, tokenizer_from_state_dict

# ----------------------------------------------------------------------------- files in OpenAI's naming


def openai_state(layers: int = 1) -> dict:
    """A CLIP state dict in OpenAI/open_clip naming: our small model's tensors under their names."""
    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=64, layers=layers, heads=1),
        text=TextConfig(vocab_size=10, context_length=8, width=64, layers=layers, heads=1),
        embed_dim=16,
        init_logit_bias=None,
    )
    ours = CLIP(cfg).state_dict()
    theirs = {t: ours[o] for t, o in TOP_NAMES.items() if o in ours}
    for tower, (prefix, names) in TOWERS.items():
        for i in range(layers):
            theirs |= {f"{tower}.{i}.{a}": ours[f"{prefix}.{i}.{b}"] for a, b in names.items()}
    return theirs


def test_a_block_index_far_past_the_blocks_held_makes_no_names_for_the_blocks_below_it():
    state = openai_state()
    convert_openai_state_dict(state)  # the state itself converts
    state["transformer.resblocks.100000.ln_1.weight"] = torch.ones(64)
    tracemalloc.start()
    with pytest.raises(ValueError) as err:
        convert_openai_state_dict(state)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(err.value)  # used to list 1.2 million missing names, over several lines
    assert "\n" not in message and len(message) < 400, message[:400]
    assert "transformer.resblocks has 2 blocks numbered up to 100000, not block(s) 1, 2, 3" in message
    assert peak < 1 << 20, peak  # no name was made for blocks 1 to 99,999
    state["transformer.resblocks.100000000.ln_1.weight"] = state.pop("transformer.resblocks.100000.ln_1.weight")
    with pytest.raises(ValueError, match="numbered up to 100000000, not block"):
        convert_openai_state_dict(state)


def test_a_missing_key_is_named_in_one_line():
    state = openai_state()
    del state["visual.transformer.resblocks.0.attn.in_proj_weight"]
    state["extra.thing"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        convert_openai_state_dict(state)
    message = str(err.value)
    assert "\n" not in message, message
    assert "missing keys (1): 'visual.transformer.resblocks.0.attn.in_proj_weight'" in message
    assert "keys with no place in our model (1): 'extra.thing'" in message


def test_tensors_that_share_bytes_are_not_made_real_once_per_name():
    state = openai_state()
    shared = torch.zeros(64)  # one storage for every LayerNorm's weight and bias: .float() would copy it each time
    state |= {k: shared for k in state if ".ln_" in k and k.endswith(("weight", "bias"))}
    with pytest.raises(ValueError, match="its tensors share bytes"):
        convert_openai_state_dict(state)


# ----------------------------------------------------------------------------- TorchScript pickles, crafted


class OneNumber(torch.nn.Module):
    """An archive with one storage of one element, data/0, for crafted pickles to point at."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("w", torch.zeros(1, dtype=dtype))

    def forward(self, x):
        return x


def text(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()  # BINUNICODE


def tensor(storage: str, size: tuple, stride: tuple) -> bytes:
    """torch._utils._rebuild_tensor_v2 over data/0 (one element), as TorchScript pickles a tensor."""
    ints = lambda xs: b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"
    pid = b"(" + text("storage") + f"ctorch\n{storage}\n".encode() + text("0") + text("cpu") + b"K\x01tQ"
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00" + ints(size) + ints(stride) + b"\x89tR"


def module(items: bytes) -> bytes:
    """A __torch__ object whose state is a dict of `items` (NEWOBJ, then BUILD)."""
    return b"c__torch__\nM\n)\x81}(" + items + b"ub"


def crafted_archive(tmp_path, pickle: bytes, dtype=torch.float32) -> str:
    base, path = str(tmp_path / "base.pt"), str(tmp_path / "crafted.pt")
    torch.jit.script(OneNumber(dtype)).save(base)
    rewrite_zip(base, path, replace={"data.pkl": b"\x80\x02" + pickle + b"."})
    return path


def shared_tree(levels: int) -> bytes:
    """Module k holds module k - 1 twice (a and b, one object through the pickle's memo): 2^levels paths to the
    one tensor at the bottom, in about 30 bytes a level."""
    out = module(text("w") + tensor("FloatStorage", (1,), (1,))) + b"q\x00"
    for k in range(1, levels + 1):
        below = b"h" + bytes([k - 1])
        out += b"0" + module(text("a") + below + text("b") + below) + b"q" + bytes([k])
    return out


def test_a_module_reached_twice_is_refused_not_walked_once_per_path(tmp_path):
    path = crafted_archive(tmp_path, shared_tree(12))
    with pytest.raises(ValueError, match="reaches the module a.a.a.a.a.a.a.a.a.a.a.b by a second path"):
        read_torchscript_state_dict(path)  # used to name 4096 tensors, all one
    path = crafted_archive(tmp_path, shared_tree(40))  # 2^40 names: never finished
    assert len(open(path, "rb").read()) < 4096
    with pytest.raises(ValueError, match="by a second path: not a tree of modules"):
        read_state_dict(path)


def test_a_view_that_repeats_its_storage_is_refused(tmp_path, monkeypatch):
    """A 1000 x 1000 fp16 tensor over 2 bytes (zero strides): converting it (.float()) made 4 MB real, and any
    shape could be asked for; in a TorchScript archive and in a torch.save zip."""
    path = crafted_archive(tmp_path, module(text("w") + tensor("HalfStorage", (1000, 1000), (0, 0))), torch.half)
    with pytest.raises(ValueError, match="views 1,000,000 elements of a storage of 1: its bytes repeated"):
        read_torchscript_state_dict(path)
    state = openai_state()
    state["token_embedding.weight"] = torch.zeros(1, dtype=torch.half).expand(1000, 64)  # torch.save keeps the view
    torch.save(state, tmp_path / "state.pt")
    monkeypatch.setattr(torch.Tensor, "float", never("making a tensor real"))
    with pytest.raises(ValueError, match=r"a \(1000, 64\) tensor views 64,000 elements of a storage of 1"):
        read_state_dict(str(tmp_path / "state.pt"))


def test_resume_refuses_optimizer_state_that_repeats_its_bytes(tmp_path):
    """--resume read a checkpoint without looking at its views: an Adam moment of zero strides failed the first
    step with a traceback (an in-place update of a tensor whose elements share one memory location)."""
    run(["--steps", "1"], tmp_path)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    moment = state["optimizer"]["state"][0]["exp_avg"]
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(1).expand(moment.shape)
    torch.save(state, tmp_path / "ckpt.pt")
    message = one_line_exit(lambda: run(["--steps", "2", "--resume"], tmp_path))
    assert message.startswith(f"error: --resume: {tmp_path}/ckpt.pt: a ") and "its bytes repeated" in message


# ----------------------------------------------------------------------------- a config its tensors cannot fill


def spoiled_checkpoint(tmp_path, spoil) -> str:
    path = write_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    state = torch.load(path, weights_only=True)
    spoil(state)
    torch.save(state, path)
    return path


def ten_million_blocks(state):
    state["config"]["text"]["layers"] = 10**7


def a_wider_projection(state):
    state["model"]["text.proj"] = torch.zeros(32, 24)  # the config says (32, 16)


def a_broken_character_map(state):
    spec = read_model(spm_model_bytes())
    state["tokenizer"] = SigLIPTokenizer(spec, context_length=24).state_dict()
    size = struct.unpack_from("<I", spec["charsmap"])[0]
    trie, replacements = spec["charsmap"][: 4 + size], spec["charsmap"][4 + size :]
    state["tokenizer"]["model"]["charsmap"] = trie + replacements.replace(b"\0", b"x")  # no replacement ends


def no_heads(state):
    state["config"]["vision"]["heads"] = 0


CONFIG_CASES = [  # (spoil, what the line says)
    (ten_million_blocks, "its config (10000001 blocks, widths 32 and 32) needs at least "),
    (no_heads, "its config's vision.heads is 0, not a count"),
    (a_wider_projection, "its model's tensors do not fit its config: text.proj is (32, 24), the config makes (32, 16)"),
    (a_broken_character_map, "sentencepiece tokenizer is malformed (ValueError: rule"),
]


def patch_model_builds(monkeypatch, replacement) -> None:
    """Every CLIP(cfg) that eval.py (run/checkpoint.py load_model) and --init (run/start.py, through
    baselines/objectives.py model_class) build is `replacement`, but for the config check's own build on the
    meta device, which costs no memory."""
    from baselines import objectives
    from run import checkpoint

    def build(*args, **kwargs):
        if torch.get_default_device().type == "meta":
            return CLIP(*args, **kwargs)
        return replacement(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "CLIP", build)
    monkeypatch.setattr(objectives, "CLIP", build)


@pytest.mark.parametrize("spoil,needle", CONFIG_CASES)
def test_a_checkpoint_its_config_does_not_fit_stops_eval_init_and_resume_in_one_line(
    tmp_path, monkeypatch, spoil, needle
):
    """Refused before any module is built: the 1.9 KB file asking for 10^7 blocks used to build them until the
    allocator gave up; a tensor of another shape, a multi-line load_state_dict error (eval) or a traceback
    (--init, --resume); a character map that ends nowhere, an error at the first caption that met it."""
    path = spoiled_checkpoint(tmp_path, spoil)
    patch_model_builds(monkeypatch, never("building the model"))
    assert needle in one_line_exit(lambda: evaluate.main(["--ckpt", path, "--n", "5"]))
    message = one_line_exit(lambda: run(["--init", path, "--steps", "1"], tmp_path / "new"))
    assert message.startswith(f"error: --init {path}: ") and needle in message
    message = one_line_exit(lambda: run(["--resume", "--steps", "1"], tmp_path / "run"))
    assert message.startswith(f"error: --resume: {path}: ") and needle in message


def test_the_parameter_bound_holds_for_every_preset():
    from model import PRESETS
    from run.checkpoint import config_fits, least_parameters

    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            held = sum(p.numel() for p in CLIP(cfg).parameters())
        assert least_parameters(cfg) <= held, name
    config_fits(PRESETS["tiny"], CLIP(PRESETS["tiny"]).state_dict())  # a model's own tensors fit its config


# ----------------------------------------------------------------------------- the CLI, for released weights


def crafted_files(tmp_path) -> dict:
    """name -> (a file, what eval.py and train.py --init say of it). The first used to end in several lines; the
    others cost memory or time without bound before, and are only reached once the first passes."""
    files = {}
    state = openai_state()
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "missing.pt")
    files["a missing key"] = (tmp_path / "missing.pt", "missing keys (1): 'ln_final.bias'")
    state = openai_state()
    state["transformer.resblocks.100000000.ln_1.weight"] = torch.ones(64)
    torch.save(state, tmp_path / "index.pt")
    files["a block index of 10^8"] = (tmp_path / "index.pt", "numbered up to 100000000, not block(s) 1, 2, 3")
    (tmp_path / "tree").mkdir()
    files["a shared module tree"] = (crafted_archive(tmp_path / "tree", shared_tree(40)), "by a second path")
    (tmp_path / "view").mkdir()
    view = module(text("w") + tensor("HalfStorage", (1000, 1000), (0, 0)))
    files["a zero-stride view"] = (crafted_archive(tmp_path / "view", view, torch.half), "its bytes repeated")
    return files


def test_crafted_weight_files_stop_eval_and_init_in_one_line(tmp_path):
    for name, (path, needle) in crafted_files(tmp_path).items():
        message = one_line_exit(lambda p=path: evaluate.main(["--ckpt", str(p), "--n", "5"]))
        assert needle in message, (name, message)
        message = one_line_exit(lambda p=path: run(["--init", str(p), "--steps", "1"], tmp_path / "new"))
        assert message.startswith(f"error: --init {path}: ") and needle in message, (name, message)


def test_running_out_of_memory_while_building_is_one_line(tmp_path, monkeypatch):
    """What no check foresaw (MemoryError, SystemError from deep inside torch) still ends in one line."""
    path = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    for error in (MemoryError, SystemError):

        def fail(*args, error=error):
            raise error("out of memory")

        patch_model_builds(monkeypatch, fail)
        message = one_line_exit(lambda: evaluate.main(["--ckpt", path, "--n", "5"]))
        assert error.__name__ in message
        message = one_line_exit(lambda: run(["--init", path, "--steps", "1"], tmp_path / "new"))
        assert message.startswith(f"error: --init {path}: {error.__name__}")


def test_non_finite_weights_name_the_checkpoint_before_them(tmp_path):
    run(["--steps", "2", "--ckpt-every", "1"], tmp_path)  # ckpt.pt: step 2, ckpt-prev.pt: step 1
    path = tmp_path / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["text.proj"] = torch.full_like(state["model"]["text.proj"], float("nan"))
    torch.save(state, path)
    message = one_line_exit(lambda: evaluate.main(["--ckpt", str(path), "--n", "5"]))
    assert "NaN or inf" in message and f"{tmp_path}/ckpt-prev.pt, the checkpoint before it" in message


# ----------------------------------------------------------------------------- SentencePiece models


@pytest.fixture(scope="module")
def spm():
    return spm_model_bytes()


def top_fields(data: bytes) -> list[int]:
    """Where each top-level field of a .model file ends: every one is length-delimited (pieces, settings)."""

    def varint(i):
        value, shift = 0, 0
        while True:
            value, shift, i = value | (data[i] & 0x7F) << shift, shift + 7, i + 1
            if data[i - 1] < 0x80:
                return value, i

    ends, i = [], 0
    while i < len(data):
        _, i = varint(i)
        length, i = varint(i)
        i += length
        ends.append(i)
    return ends


def test_a_truncated_model_is_refused_wherever_it_is_cut(spm):
    """97 evenly spaced cuts and every boundary between two pieces or settings: each is refused, or (none here)
    reads the same model. A cut between two fields used to load fewer pieces under default settings; a cut inside
    the character map, a map whose replacements ended nowhere."""
    full = read_model(spm)
    ends = top_fields(spm)
    assert len(ends) == 602 and ends[-1] == len(spm)  # 600 pieces, the trainer's and the normaliser's settings
    cuts = sorted({len(spm) * k // 98 for k in range(1, 98)} | set(ends[:-1]))
    silent, raw = [], []
    for cut in cuts:
        try:
            spec = read_model(spm[:cut])
            SigLIPTokenizer(spec)
        except ValueError:
            continue
        except Exception as err:  # not a refusal: an error the loaders' one-line handlers may not expect
            raw.append((cut, type(err).__name__))
            continue
        if spec != full:
            silent.append(cut)
    assert not silent and not raw, f"of {len(cuts)} cuts, {len(silent)} load silently, {len(raw)} raise {raw[:3]}"


def test_an_over_long_varint_is_refused(spm):
    """Protobuf's integers are at most 10 bytes: 1 MB of 0xFF used to be read as one 7-million-bit number
    (48 s). A first key padded to 11 bytes, which reads as the same number, is refused."""
    padded = bytes([spm[0] | 0x80]) + b"\x80" * 9 + b"\x00" + spm[1:]
    with pytest.raises(ValueError, match="runs past 10 bytes"):
        read_model(padded)
    with pytest.raises(ValueError, match="runs past 10 bytes"):
        read_model(b"\xff" * (1 << 20))


def test_a_model_without_its_settings_is_refused(spm):
    pieces_only = spm[: top_fields(spm)[-3]]
    with pytest.raises(ValueError, match="no trainer or normaliser settings"):
        read_model(pieces_only)


def varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def test_a_piece_longer_than_sentencepiece_makes_is_refused_when_read(spm, tmp_path):
    """A 6,000-character piece made every character of a text a 6,000-step search (34 s for a 6,000-character
    caption); SentencePiece's trainer makes none over 512 characters, so no real model is refused."""
    piece = ("▁" + "a" * 6000).encode()
    entry = b"\x0a" + varint(len(piece)) + piece + b"\x15" + struct.pack("<f", -1.0)  # piece, score
    crafted = tmp_path / "sentencepiece.model"
    crafted.write_bytes(spm + b"\x0a" + varint(len(entry)) + entry)  # one more piece, the last id
    assert len(read_model(crafted.read_bytes())["pieces"]) == 601
    with pytest.raises(ValueError, match="a piece of 6,001 characters; SentencePiece makes none over 512"):
        SigLIPTokenizer.from_file(str(crafted))


def test_a_broken_character_map_is_refused_when_read_not_when_encoding(spm):
    spec = read_model(spm)
    charsmap = spec["charsmap"]
    size = struct.unpack_from("<I", charsmap)[0]
    ends_nowhere = charsmap[: 4 + size] + charsmap[4 + size :].replace(b"\0", b"x")
    units = list(struct.unpack_from(f"<{size // 4}I", charsmap, 4))
    leaf = next(i for i, u in enumerate(units) if not u >> 31 and u >> 8 & 1)
    units[leaf] = units[leaf] & 0x1FF | 1 << 30  # its rule's value now lies far past the trie's end
    points_out = charsmap[:4] + struct.pack(f"<{len(units)}I", *units) + charsmap[4 + size :]
    for broken in (ends_nowhere, points_out):
        state = SigLIPTokenizer(read_model(spm), 16).state_dict()
        state["model"] = spec | {"charsmap": broken}
        with pytest.raises(ValueError, match="sentencepiece tokenizer is malformed"):
            tokenizer_from_state_dict(state)
