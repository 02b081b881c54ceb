"""The pictures, drawn with PIL and numpy: train.py's loss curve and eval.py's attention heat maps, on
hand-made logs and a hand-built model whose phrases attend to known patches, and end to end."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as evaluate
from data import pad_batch
from fixtures import save_image, write_checkpoint
from run import pictures
from run.pictures import CELL, GAP, LABEL, TITLE


def pixels_of(img: np.ndarray, colour) -> np.ndarray:
    """(y, x) of every pixel of exactly this colour."""
    return np.argwhere((img == np.array(colour)).all(-1))


def test_loss_curve_draws_each_term_where_its_values_are(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "loss": 0.0, "L_sig": 10 - 0.5 * s, "L_npc": 12.0}) + "\n" for s in range(1, 11))
    )
    out = pictures.plot_losses(str(log), str(tmp_path / "loss.png"))
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (400, 640, 3)
    plot, legend = img[:, :540], img[:, 540:]  # the legend sits in the right 100 pixels
    caption, concept = pixels_of(plot, pictures.LOSS_TERMS["L_sig"]), pixels_of(plot, pictures.LOSS_TERMS["L_npc"])
    assert len(caption) > 100 and len(concept) > 100
    assert not len(pixels_of(img, pictures.LOSS_TERMS["L_xac"]))  # a term the log lacks is not drawn
    assert concept[:, 0].max() < caption[:, 0].min()  # 12 lies above every caption value
    left, right = caption[caption[:, 1] < caption[:, 1].min() + 5], caption[caption[:, 1] > caption[:, 1].max() - 5]
    assert left[:, 0].mean() < right[:, 0].mean() - 200  # the falling term falls across the plot
    assert len(pixels_of(legend, pictures.LOSS_TERMS["L_sig"])) and len(pixels_of(legend, pictures.LOSS_TERMS["L_npc"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert pictures.plot_losses(str(empty), str(tmp_path / "none.png")) is None


class PatchModel:
    """Stands in for CLIP: a 16 x 16 image has 2 x 2 patches; the top-left patch embeds as e0 and the
    other three as e1. A text embeds as e0 if its first token is 0 ('red' below), else as e1."""

    def encode_image(self, images):
        u = torch.zeros(len(images), 4, 4)  # (B, N, D)
        u[:, 0, 0] = 1
        u[:, 1:, 1] = 1
        return F.normalize(u.mean(1), dim=-1), u

    def encode_text(self, tokens):
        return torch.eye(4)[tokens[:, 0]]


def red_tokenizer(texts):
    return pad_batch([[0 if "red" in t else 1] for t in texts])


def brightness(sheet: np.ndarray, column: int, fx: float, fy: float) -> float:
    """Summed RGB at a fraction (fx, fy) of the heat map cell of phrase `column` (0: the image) in row 0."""
    left, top = GAP + column * (CELL + GAP), GAP + TITLE + LABEL
    return float(sheet[top + int(fy * CELL), left + int(fx * CELL)].sum())


def test_heat_maps_follow_the_patches_each_phrase_attends_to():
    phrases = ["a red circle", "a blue star"]
    maps = pictures.attention_maps(PatchModel(), red_tokenizer, torch.zeros(3, 16, 16), phrases, 0.1, "cpu")
    assert maps.shape == (2, 2, 2)
    assert maps[0, 0, 0] > 0.99 and maps[1, 0, 0] < 0.01  # red looks at the top-left patch, blue elsewhere
    grey = Image.new("RGB", (16, 16), (60, 60, 60))
    sheet = np.asarray(pictures.attention_picture(grey, [maps], phrases, ["hand-built"]))
    assert sheet.shape == (GAP + TITLE + LABEL + CELL + GAP, GAP + 3 * (CELL + GAP), 3)
    assert brightness(sheet, 1, 0.25, 0.25) > brightness(sheet, 1, 0.75, 0.75) + 300  # red: hot top left
    assert brightness(sheet, 2, 0.25, 0.25) + 300 < brightness(sheet, 2, 0.75, 0.75)  # blue: hot elsewhere
    assert brightness(sheet, 0, 0.25, 0.25) == brightness(sheet, 0, 0.75, 0.75)  # the image itself, unchanged


def test_show_draws_a_row_per_checkpoint_for_a_scene_or_a_file(tmp_path):
    a = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"), image_size=16)
    b = write_checkpoint(str(tmp_path / "b" / "ckpt.pt"), image_size=24, seed=1)  # 3 x 3 patches
    out = evaluate.main(
        [
            "--show",
            "3",
            "--concepts",
            "a red dog",
            "a blue car",
            "--ckpt",
            a,
            b,
            "--out",
            str(tmp_path / "scene.png"),
            "--device",
            "cpu",
        ]
    )
    assert Image.open(out).size == (GAP + 3 * (CELL + GAP), GAP + 2 * (TITLE + LABEL + CELL + GAP))
    save_image(str(tmp_path / "photo.jpg"), 1, (40, 30))
    out = evaluate.main(
        [
            "--show",
            str(tmp_path / "photo.jpg"),
            "--concepts",
            "a cat",
            "--ckpt",
            a,
            "--tau",
            "0.1",
            "--out",
            str(tmp_path / "photo.png"),
            "--device",
            "cpu",
        ]
    )
    assert Image.open(out).size == (GAP + 2 * (CELL + GAP), GAP + TITLE + LABEL + CELL + GAP)


def test_show_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--concepts", "a red dog"])
    assert err.value.code == 2 and "--show" in capsys.readouterr().err
    a = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"), image_size=16)
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--show", str(tmp_path / "missing.jpg"), "--concepts", "a cat", "--ckpt", a])
    assert re.search(r"--show .*missing\.jpg", str(err.value.code))
