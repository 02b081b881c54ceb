"""Exercises for a course: change one idea of the paper's code, predict, then measure (docs/exercises.md).

catalogue.py   the exercises in order: each a patch here (NN-name.patch), what it is about, and for a blank
               the tests that fail until the student writes the function back
measure.py     python -m exercises.measure NAME: the patch applied to a copy of the code, trained and evaluated
               over seeds beside the unchanged code; --table prints docs/exercises.md's tables
"""
