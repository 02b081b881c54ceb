"""Run the tests from any folder: put the repository root on the import path; the benchmark files that
several test files score (`bench`). NLTK's tagger is found on NLTK's own search path (set NLTK_DATA on a
machine without internet)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def bench(tmp_path):
    """A checkpoint of ours, SugarCrepe's files and a Karpathy split, in the real formats (tests/fixtures.py)."""
    from fixtures import write_checkpoint, write_karpathy, write_sugarcrepe

    ckpt = write_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    return {"sc": write_sugarcrepe(str(tmp_path / "sc")), "ann": write_karpathy(str(tmp_path / "coco")), "ckpt": ckpt}
