import json
import os
import subprocess
import sys

import nltk
import pytest

import concepts
from concepts import extract_concepts, extract_concepts_batch, normalise_phrase
from sources import concepts_file, precompute
from sources.shapes import WORLDS, ShapesWorld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECOMPUTE = [sys.executable, "-m", "sources.precompute"]  # a script in a folder runs as a module


@pytest.mark.parametrize("world", ["simple", "dense"])
def test_recovers_every_object_phrase_of_the_shapes_world(world):
    world = ShapesWorld(**WORLDS[world])
    misses = []
    for i in range(1000):
        scene = world.scene(11, "train", i)
        caption = world.caption(scene)
        if extract_concepts(caption) != world.phrases(scene):
            misses.append((caption, extract_concepts(caption)))
    assert not misses, misses[:5]


COCO_STYLE = [
    ("A man riding a brown horse on the beach.", ["a man", "a brown horse", "the beach"]),
    ("Two young women sitting at a wooden table with laptops.", ["two young women", "a wooden table", "laptops"]),
    ("A giraffe standing next to a tall tree in a grassy field.", ["a giraffe", "a tall tree", "a grassy field"]),
    ("a red double decker bus driving down a city street", ["a red double decker bus", "a city street"]),
    ("A plate of food with broccoli and rice.", ["a plate", "food", "broccoli", "rice"]),
    ("A black cat lying on the right side of a red couch.", ["a black cat", "a red couch"]),
    ("close up of a dog's face", ["a dog's face"]),
    ("A woman holding an umbrella in the rain, stock photo", ["a woman", "an umbrella", "the rain"]),
    ("A small child eating a slice of pizza in front of a window.", ["a small child", "a slice", "pizza", "a window"]),
    ("Three sheep in the background of a green pasture.", ["three sheep", "a green pasture"]),
    (
        "A kitchen with white cabinets and a stainless steel refrigerator.",
        ["a kitchen", "white cabinets", "a stainless steel refrigerator"],
    ),
    ("An image of a skateboarder doing a trick on a ramp.", ["a skateboarder", "a trick", "a ramp"]),
    ("A dog and a dog on the grass.", ["a dog", "the grass"]),
]


# Known tagger slips, left out above: "A cat sleeping ..." tags sleeping/NN and yields "a cat sleeping".
@pytest.mark.parametrize("caption,expected", COCO_STYLE)
def test_real_captions(caption, expected):
    assert extract_concepts(caption) == expected


def test_fallback_to_whole_caption_and_batch_form():
    assert extract_concepts("on the left") == ["on the left"]
    assert extract_concepts_batch(["a red car", "in the background"]) == [["a red car"], ["in the background"]]


def test_normalise_phrase():
    assert normalise_phrase("The  Tiny red circle") == "tiny red circle"
    assert normalise_phrase("an orange star") == normalise_phrase("orange star")


def test_missing_tagger_names_the_install_command(monkeypatch):
    monkeypatch.setattr(concepts, "_tagger", None)
    monkeypatch.setattr(nltk.data, "path", ["/nonexistent"])
    monkeypatch.setattr(nltk, "download", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match="python -m nltk.downloader averaged_perceptron_tagger_eng"):
        concepts.tagger()


def test_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, concepts.__file__, "a small red circle left of a blue star"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "a small red circle | a blue star" in out.stdout


# ----------------------------------------------------------------------------- precompute for tar shards


def read_records(path):
    return {r["shard"]: r for r in map(json.loads, open(path))}


def test_precompute_every_shard(tmp_path):
    from fixtures import write_cc3m

    shards = write_cc3m(str(tmp_path / "cc3m"))
    out = tmp_path / "concepts.jsonl"
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "2"])  # a process pool
    records = read_records(out)
    assert set(records) == {"00000.tar", "00001.tar"}
    # every sample with an image member and a caption (the corrupt JPEG is not decoded here)
    assert set(records["00000.tar"]["concepts"]) == {"000000000", "000000001", "000000002", "000000005"}
    assert records["00001.tar"]["concepts"]["s0001_0002"] == ["a giraffe", "a tall tree"]
    assert records["00001.tar"]["count"] == 4 and records["00001.tar"]["caption_key"] is None
    index = concepts_file.concepts_index(str(out))
    first = records["00000.tar"]
    assert list(first["digests"]) == ["000000000", "000000001", "000000002", "000000005"]  # every caption read
    assert first["digests"]["000000000"] == concepts_file.caption_digest("a dog chasing a red ball on the grass")
    table = {key: (phrases, first["digests"][key]) for key, phrases in first["concepts"].items()}
    assert concepts_file.shard_concepts(str(out), index["00000.tar"][0]) == table


def test_precompute_resumes_after_an_interruption(tmp_path, monkeypatch):
    from fixtures import write_cc3m

    shards = write_cc3m(str(tmp_path / "cc3m"))
    out = tmp_path / "concepts.jsonl"
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0"])
    first, second = open(out).read().splitlines(keepends=True)
    out.write_text(first + second[:25])  # killed while writing the second shard's line
    assert list(concepts_file.concepts_index(str(out))) == [json.loads(first)["shard"]]
    done = []
    real_job = precompute._shard_job
    monkeypatch.setattr(precompute, "_shard_job", lambda job: done.append(job[0]) or real_job(job))
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0"])
    assert done == [os.path.join(shards, json.loads(second)["shard"])]  # only the unfinished shard again
    assert open(out).read() == first + second  # the torn line is gone, the file is whole
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0"])
    assert len(done) == 1  # nothing left to do


def test_precompute_with_a_caption_key_and_cli_errors(tmp_path):
    from fixtures import write_cc3m

    shards = write_cc3m(str(tmp_path / "cc3m"))
    out = tmp_path / "c.jsonl"
    precompute.main(["--data-dir", shards, "--out", str(out), "--workers", "0", "--caption-key", "shortLLA_captions"])
    records = read_records(out)
    assert records["00000.tar"]["concepts"]["000000000"] == ["a brown dog", "a red ball"]
    assert records["00001.tar"]["concepts"] == {}  # no .json in the re-hosted shard: no such caption
    for argv in (["--data-dir", shards], ["--out", str(out)], []):
        bad = subprocess.run([*PRECOMPUTE, *argv], capture_output=True, text=True, cwd=ROOT)
        assert bad.returncode == 2 and "--data-dir" in bad.stderr
    missing = subprocess.run(
        [*PRECOMPUTE, "--data-dir", str(tmp_path / "none"), "--out", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert missing.returncode == 2 and "img2dataset" in missing.stderr


def test_one_character_items_go_and_every_leading_article_is_ignored():
    """A phrase of one character without its article ("a b": the letter b) is dropped (the authors drop a phrase
    string of one character, articles included); phrases compare without every leading article, not only the
    first; a capitalised word gets its article too."""
    assert extract_concepts("a cat with a b") == ["a cat"]
    assert extract_concepts("a photo of x") == ["a photo of x"]  # nothing left: the caption is its own phrase
    assert normalise_phrase("The one big red circle") == normalise_phrase("big red circle") == "big red circle"
    assert [concepts.article(w) for w in ("Orange", "orange", "Red")] == ["an", "an", "a"]
