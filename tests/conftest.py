"""Run the tests from any folder: put the repository root on the import path, and find NLTK's tagger
data in ../shared/nltk_data when that folder exists (machines without internet); the benchmark files that
several test files score (`bench`)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_NLTK = os.path.join(os.path.dirname(ROOT), "shared", "nltk_data")
if os.path.isdir(SHARED_NLTK) and "NLTK_DATA" not in os.environ:
    os.environ["NLTK_DATA"] = SHARED_NLTK
    import nltk

    nltk.data.path.insert(0, SHARED_NLTK)


@pytest.fixture
def bench(tmp_path):
    """A checkpoint of ours, SugarCrepe's files and a Karpathy split, in the real formats (tests/fixtures.py)."""
    from fixtures import write_checkpoint, write_karpathy, write_sugarcrepe

    ckpt = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    return {"sc": write_sugarcrepe(str(tmp_path / "sc")), "ann": write_karpathy(str(tmp_path / "coco")), "ckpt": ckpt}
