"""The tar-shard reader (sources/shards.py, sources/stream.py) on CC3M-format fixtures, and train.py on them."""

import json
import os
import random
import tarfile

import pytest
import torch
from PIL import Image

import train
from data import Collate, WordTokenizer, eval_transform, image_to_tensor, train_transform
from fixtures import GOOD_CAPTIONS, IMG2DATASET, crash_after_first_checkpoint, image_bytes, write_cc3m, write_tar
from sources import concepts_file, stream
from sources.shards import caption_word_counts, expand_braces, expand_shards, shard_sizes
from sources.stream import WebDataset, shuffled

SKIPS = {"corrupt_image": 1, "empty_caption": 1, "missing_image": 1}


@pytest.fixture
def cc3m(tmp_path):
    return write_cc3m(str(tmp_path / "cc3m"))


def test_shard_specs_folder_glob_and_brace_range(cc3m):
    assert expand_braces("a{00..02}b{x,y}") == ["a00bx", "a00by", "a01bx", "a01by", "a02bx", "a02by"]
    both = [os.path.join(cc3m, "00000.tar"), os.path.join(cc3m, "00001.tar")]
    assert expand_shards(cc3m) == both
    assert expand_shards(os.path.join(cc3m, "*.tar")) == both
    assert expand_shards(os.path.join(cc3m, "{00000..00007}.tar")) == both  # gaps in a range are fine
    assert expand_shards(os.path.join(cc3m, "{00001..00001}.tar")) == both[1:]
    with pytest.raises(FileNotFoundError, match="img2dataset"):
        expand_shards(os.path.join(cc3m, "nothing"))


def test_reads_both_shard_styles_and_skips_bad_samples(cc3m):
    ds = WebDataset(expand_shards(cc3m), eval_transform(16), shuffle_buffer=0)
    samples = list(ds)
    assert sorted(s["caption"] for s in samples) == sorted(GOOD_CAPTIONS)  # .txt captions, png and jpg images
    assert all(s["image"].shape == (3, 16, 16) for s in samples)
    assert ds.skipped == SKIPS
    list(ds)
    assert ds.skipped == {k: 2 * n for k, n in SKIPS.items()}  # every pass counts them again
    dog = next(s for s in samples if "dog" in s["caption"])
    assert dog["phrases"] == ["a dog", "a red ball", "the grass"]  # no --concept-key: extracted (concepts.py)


def test_caption_and_concept_keys_from_json(cc3m):
    ds = WebDataset(expand_shards(cc3m), eval_transform(16), caption_key="shortLLA_captions", concept_key="nounphrases")
    samples = {s["caption"]: s["phrases"] for s in ds}
    expect = {llava: phrases for key, _, llava, phrases in IMG2DATASET if key not in ("000000002", "000000004")}
    assert samples == expect  # "An empty street." has a caption in .json; its empty .txt is not read
    # the re-hosted shard has no .json, so none of its 4 samples has the named caption
    assert ds.skipped == {"corrupt_image": 1, "missing_image": 1, "empty_caption": 4}


def test_precomputed_concepts_file_is_used(cc3m, tmp_path):
    path = tmp_path / "concepts.jsonl"
    path.write_text(
        json.dumps(
            {
                "shard": "00001.tar",
                "caption_key": None,
                "count": 1,
                "concepts": {"s0001_0003": ["a precomputed phrase"]},
                "digests": {"s0001_0003": concepts_file.caption_digest("a kitchen with white cabinets")},
            }
        )
        + "\n"
    )
    ds = WebDataset(expand_shards(cc3m), eval_transform(16), concepts_file=str(path))
    by_caption = {s["caption"]: s["phrases"] for s in ds}
    assert by_caption["a kitchen with white cabinets"] == ["a precomputed phrase"]
    assert by_caption["a man riding a horse on the beach"] == ["a man", "a horse", "the beach"]  # not in the file


def test_readers_split_shards_or_samples_without_overlap(cc3m, monkeypatch):
    shards = expand_shards(cc3m)
    for readers in (2, 3):  # 2 readers: a shard each; 3 readers > 2 shards: every third sample
        seen = []
        for reader in range(readers):
            monkeypatch.setattr(stream, "reader_index", lambda *_, r=reader, n=readers: (r, n))
            seen += [s["caption"] for s in WebDataset(shards, eval_transform(8), shuffle_buffer=0)]
        assert sorted(seen) == sorted(GOOD_CAPTIONS), readers


def test_dataloader_workers_cover_every_sample_once_and_report_skips(cc3m):
    tok = WordTokenizer.build(GOOD_CAPTIONS, context_length=24)
    ds = WebDataset(expand_shards(cc3m), train_transform(16), seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=Collate(tok))
    captions = []
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 16, 16)
        captions += [tok.decode(row.tolist()) for row in batch["captions"]]
    assert sorted(captions) == sorted(tok.decode(tok.encode(c)) for c in GOOD_CAPTIONS)
    assert ds.skipped == SKIPS  # counted in the worker processes, read here


def test_epochs_reshuffle_reproducibly(cc3m):
    ds = WebDataset(expand_shards(cc3m), eval_transform(8), shuffle_buffer=4, seed=0)
    first = [s["caption"] for s in ds]
    again = [s["caption"] for s in ds]
    ds.epoch = 1
    second = [s["caption"] for s in ds]
    assert first == again and sorted(first) == sorted(second) and first != second


def test_shuffle_buffer_is_a_permutation():
    out = list(shuffled(range(100), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(shuffled(range(100), 10, random.Random(0)))
    assert list(shuffled(range(5), 0, random.Random(0))) == list(range(5))


def test_corrupt_shard_is_counted_not_fatal(tmp_path, cc3m):
    bad = tmp_path / "bad" / "00002.tar"
    bad.parent.mkdir()
    good = os.path.join(cc3m, "00001.tar")
    with tarfile.open(good) as tar:
        cut = tar.getmembers()[4].offset_data + 10  # inside the third sample's image
    bad.write_bytes(open(good, "rb").read()[:cut])  # a download cut short: the samples before the cut are kept
    ds = WebDataset([str(bad)], eval_transform(8), shuffle_buffer=0)
    assert len(list(ds)) == 2 and ds.skipped == {"corrupt_shard": 1}


def test_sample_counts_from_stats_sizes_json_or_counted_and_cached(cc3m, tmp_path, monkeypatch):
    shards = expand_shards(cc3m)
    assert shard_sizes(shards, cc3m) == [5, 4]  # 00000_stats.json says 5 successes; 00001 counted
    assert json.load(open(os.path.join(cc3m, "c2lip-sizes.json")))[shards[1]][1] == 4
    monkeypatch.setattr("sources.shards.shard_groups", lambda *a, **k: pytest.fail("counted twice"))
    assert shard_sizes(shards, cc3m) == [5, 4]
    with open(os.path.join(cc3m, "sizes.json"), "w") as f:
        json.dump({"00001.tar": 40}, f)
    assert shard_sizes(shards, cc3m) == [5, 40]


def test_vocabulary_streamed_once_and_cached(cc3m, monkeypatch):
    shards = expand_shards(cc3m)
    counts = caption_word_counts(shards, None, cc3m)
    assert counts["a"] == sum(WordTokenizer.split(c).count("a") for c in GOOD_CAPTIONS + ["a cat sleeping on a sofa"])
    monkeypatch.setattr("sources.shards.shard_captions", lambda *a, **k: pytest.fail("read twice"))
    assert caption_word_counts(shards, None, cc3m) == counts
    tok = WordTokenizer.from_counts(counts, context_length=16, max_size=8)
    assert len(tok) == 8 and tok.vocab[4] == "a" and tok.encode("a zebra")[2] == 1  # rare words: <unk>


def test_transforms_and_the_one_normalisation():
    img = Image.new("RGB", (64, 32), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 8, 32))  # a black band on the left, cut away by the centre crop
    x = eval_transform(16)(img)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.ones_like(x))
    assert image_to_tensor(Image.new("RGB", (2, 2), (0, 0, 0))).eq(-1).all()
    assert train_transform(16)(img).shape == (3, 16, 16)
    torch.testing.assert_close(
        image_to_tensor(Image.new("RGB", (1, 1), (51, 102, 204))).flatten(), torch.tensor([51, 102, 204]) / 127.5 - 1
    )


FAST = ["--batch-size", "2", "--workers", "0", "--log-every", "1"]


def test_train_on_cc3m_shards_end_to_end(cc3m, tmp_path):
    ckpt = train.main(["--data", "cc3m", "--data-dir", cc3m, "--steps", "5", "--out", str(tmp_path / "run"), *FAST])
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 5 and "dog" in state["tokenizer"]["vocab"]
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # 7 usable samples in batches of 2: 4 steps per pass, so step 5 is in the second epoch
    assert records[-1]["epoch"] == 1 and set(records[-1]["skipped"]) == set(SKIPS)
    assert {"L_sig", "L_npc", "L_xac"} <= set(records[-1])


def test_train_epochs_sets_the_steps_and_reads_json_fields(cc3m, tmp_path):
    out = tmp_path / "run"
    args = [
        "--data",
        "cc3m",
        "--data-dir",
        os.path.join(cc3m, "{00000..00001}.tar"),
        "--epochs",
        "1",
        "--caption-key",
        "shortLLA_captions",
        "--concept-key",
        "nounphrases",
        "--out",
        str(out),
        *FAST,
    ]
    state = torch.load(train.main(args), weights_only=False)
    assert state["step"] == 5  # ceil(9 samples (5 by _stats.json + 4 counted) / batch 2)
    assert "brown" in state["tokenizer"]["vocab"] and "giraffe" not in state["tokenizer"]["vocab"]


def test_train_errors_name_the_layout(tmp_path, capsys):
    for argv, needle in [
        (["--data", "cc3m"], "--data-dir"),
        (["--data", "cc3m", "--data-dir", str(tmp_path / "none")], "img2dataset"),
        (["--epochs", "1"], "--epochs"),
        (
            ["--data", "cc3m", "--data-dir", write_cc3m(str(tmp_path / "c")), "--concepts", "nope.jsonl"],
            "python -m sources.precompute",
        ),
    ]:
        with pytest.raises(SystemExit) as err:
            train.get_args(argv)
        assert err.value.code == 2 and needle in capsys.readouterr().err, argv


def test_a_pass_with_no_usable_sample_stops_with_a_message(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    write_tar(str(folder / "00000.tar"), [("000000000.txt", b"a caption without an image")])
    with pytest.raises(RuntimeError, match="no usable sample"):
        train.main(["--data", "cc3m", "--data-dir", str(folder), "--steps", "2", "--out", str(tmp_path / "run"), *FAST])


def test_resume_on_shards_is_exact_at_an_epoch_boundary(tmp_path, monkeypatch):
    """Two clean shards of 4 samples, batches of 2: 4 steps per epoch. A run that dies right after its step-4
    checkpoint (the end of epoch 0) and is resumed ends with the weights of a run that never stopped."""
    folder = tmp_path / "clean"
    folder.mkdir()
    for s in range(2):
        members = []
        for i in range(4):
            members += [(f"{s}{i:08d}.jpg", image_bytes(4 * s + i)), (f"{s}{i:08d}.txt", GOOD_CAPTIONS[i].encode())]
        write_tar(str(folder / f"{s:05d}.tar"), members)
    common = ["--data", "cc3m", "--data-dir", str(folder), "--steps", "8", "--ckpt-every", "4", "--precision", "fp32"]
    straight = torch.load(train.main([*common, "--out", str(tmp_path / "a"), *FAST]), weights_only=True)
    crash_after_first_checkpoint(monkeypatch, [*common, "--out", str(tmp_path / "b"), *FAST])
    resumed = torch.load(train.main([*common, "--out", str(tmp_path / "b"), "--resume", *FAST]), weights_only=True)
    assert resumed["step"] == 8 and straight["step"] == 8
    for k, v in straight["model"].items():
        torch.testing.assert_close(v, resumed["model"][k], atol=1e-6, rtol=1e-5)
