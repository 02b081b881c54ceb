"""Run the tests from any folder: put the repository root on the import path, and find NLTK's tagger
data in ../shared/nltk_data when that folder exists (machines without internet)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_NLTK = os.path.join(os.path.dirname(ROOT), "shared", "nltk_data")
if os.path.isdir(SHARED_NLTK) and "NLTK_DATA" not in os.environ:
    os.environ["NLTK_DATA"] = SHARED_NLTK
    import nltk

    nltk.data.path.insert(0, SHARED_NLTK)
