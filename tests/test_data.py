import numpy as np
import pytest
import torch
from PIL import Image

from baselines.losses import phrase_ids
from concepts import extract_concepts
from data import CLIP_MEAN, CLIP_STD, Collate, WordTokenizer, eval_transform, image_to_tensor, train_transform
from sources.shapes import COLOURS, SHAPES, ShapesDataset, ShapesWorld, StepBatches


def test_tokenizer_roundtrip_padding_and_truncation():
    tok = WordTokenizer.build(["A red circle.", "a blue star, a red star"], context_length=6)
    assert tok.vocab[:4] == ["<pad>", "<unk>", "<start>", "<end>"]
    assert tok.decode(tok.encode("A RED circle")) == "a red circle"
    assert tok.encode("a purple circle")[2] == 1  # unknown word
    batch = tok(["a red circle", "a star"])
    assert batch.shape == (2, 5)  # padded to the longest sequence, not to the context length
    assert batch[1].tolist()[-1] == 0 and batch[1].tolist()[3] == 3
    long = tok.encode("a red circle a red circle a red circle")
    assert len(long) == 6 and long[-1] == 3  # truncated, the end token kept
    again = WordTokenizer.from_state_dict(tok.state_dict())
    assert again.vocab == tok.vocab and again(["a red circle"]).equal(tok(["a red circle"]))


def test_scenes_are_deterministic_and_split_apart():
    world = ShapesWorld()
    assert world.scene(0, "train", 5) == world.scene(0, "train", 5)
    assert world.scene(0, "train", 5) != world.scene(0, "test", 5)
    assert world.scene(0, "train", 5) != world.scene(1, "train", 5)
    a, b = world.render(world.scene(0, "train", 7)), world.render(world.scene(0, "train", 7))
    assert a.tobytes() == b.tobytes() and a.size == (64, 64)


def test_scene_contents_match_the_caption_and_the_pixels():
    world = ShapesWorld()
    for i in range(50):
        scene = world.scene(3, "train", i)
        caption = world.caption(scene)
        assert 2 <= len(scene.objects) <= 4
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        for phrase in world.phrases(scene):
            assert phrase in caption
        # every named colour is drawn: some pixel is close to it
        pixels = image_to_tensor(world.render(scene)).flatten(1).T  # (H*W, 3) in [-1, 1]
        for o in scene.objects:
            target = torch.tensor(COLOURS[o.colour]) / 127.5 - 1
            assert (pixels - target).abs().max(dim=1).values.min() < 0.1, (caption, o)


def test_world_uses_its_whole_vocabulary():
    world = ShapesWorld()
    words = " ".join(world.caption(world.scene(0, "train", i)) for i in range(500))
    for w in list(COLOURS) + SHAPES + ["large", "tiny"]:
        assert w in words


def test_collate_owner_and_phrase_ids():
    tok = WordTokenizer.build(["a red circle and a blue star"], context_length=16)
    samples = [
        {
            "image": torch.zeros(3, 8, 8),
            "caption": "a red circle and a blue star",
            "phrases": ["a red circle", "a blue star"],
        },
        {"image": torch.ones(3, 8, 8), "caption": "a zebra", "phrases": []},
        {"image": torch.ones(3, 8, 8), "caption": "the red circle", "phrases": ["The red circle"]},
    ]
    batch = Collate(tok, [phrase_ids])(samples)
    assert set(batch) == {"images", "captions", "phrases", "owner", "phrase_ids"}  # the layout, and the extra
    assert set(Collate(tok)(samples)) == {"images", "captions", "phrases", "owner"}
    assert batch["images"].shape == (3, 3, 8, 8)
    assert batch["owner"].tolist() == [0, 0, 1, 2]
    ids = batch["phrase_ids"].tolist()
    assert ids[0] == ids[3] and len(set(ids)) == 3  # "a red circle" == "The red circle"
    assert batch["phrases"].shape == (4, 5)  # phrases padded among themselves
    assert batch["captions"].shape[1] == 9


def test_dataset_concepts_and_step_batches():
    world = ShapesWorld()
    ds = ShapesDataset(world, seed=0, split="train", length=100)
    item = ds[3]
    assert item["image"].shape == (3, 64, 64)
    assert item["phrases"] == extract_concepts(item["caption"])
    assert list(StepBatches(4, 2, 4)) == [[8, 9, 10, 11], [12, 13, 14, 15]]
    # two ranks split the global batch of 2 x 2 scenes; together they see what one process of batch 4 sees
    assert list(StepBatches(2, 2, 4, rank=0, world_size=2)) == [[8, 9], [12, 13]]
    assert list(StepBatches(2, 2, 4, rank=1, world_size=2)) == [[10, 11], [14, 15]]


def test_normalisations():
    img = ShapesWorld().render(ShapesWorld().scene(0, "train", 1))
    x = image_to_tensor(img)  # the default: what every model trained here expects
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(x, pixels / 127.5 - 1)
    clip = image_to_tensor(img, "clip")
    torch.testing.assert_close(
        clip * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None], pixels / 255
    )


def test_clip_preprocessing_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.image_transform(224, is_train=False)  # resize 224 bicubic, centre crop, CLIP mean/std
    rng = np.random.default_rng(0)
    for width, height in [(300, 200), (180, 260), (224, 224)]:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours = eval_transform(224, "clip")(img)
        assert ours.shape == (3, 224, 224)
        torch.testing.assert_close(ours, reference(img), atol=1e-6, rtol=0)


def test_training_crops_keep_most_of_the_image():
    """CLIP's light augmentation: a crop of 90-100% of the area, aspect 3:4 to 4:3 (torch's default scale would
    cut down to 8%, and a caption would often describe what the crop left out)."""
    import torchvision.transforms as T

    crop = next(t for t in train_transform(32).transforms if isinstance(t, T.RandomResizedCrop))
    assert crop.scale == (0.9, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3)) and crop.size == (32, 32)
