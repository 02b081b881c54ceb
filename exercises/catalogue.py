"""The exercises of docs/exercises.md, in the order a course takes them: each a patch beside this file.

A "change" patch edits the paper's code so that one idea is missing or different; `python -m exercises.measure
NAME` trains and evaluates the changed code beside the unchanged one. A "blank" patch empties a core function
and leaves a docstring saying what to write; `tests` then fail, each with a message that names what is wrong,
until the function is right again. tests/test_exercises.py keeps every patch applying to today's tree.
"""

from dataclasses import dataclass

CHECKS = "tests/test_exercise_checks.py::"


@dataclass(frozen=True)
class Exercise:
    name: str  # the patch is exercises/<name>.patch
    kind: str  # "change" (train and measure) or "blank" (write the function back)
    idea: str  # what of docs/paper.md it is about
    flags: str = ""  # change: train.py's flags that do the same to the unchanged code, where some do
    exact: bool = True  # whether those flags train exactly what the patch does (tests/test_exercises.py checks it)
    tests: tuple[str, ...] = ()  # blank: the tests that fail until the student's code is right


def change(name: str, idea: str, flags: str = "", exact: bool = True) -> Exercise:
    return Exercise(name, "change", idea, flags, exact)


def blank(name: str, idea: str, *tests: str) -> Exercise:
    return Exercise(name, "blank", idea, tests=tuple(t if "/" in t else CHECKS + t for t in tests))


EXERCISES = [
    blank(
        "01-chunker.blank",
        "concept phrases p_k: the noun-phrase chunker",
        "test_chunker_finds_every_noun_phrase",
        "tests/test_concepts.py::test_recovers_every_object_phrase_of_the_shapes_world",
    ),
    change("02-caption-as-phrase", "concept phrases p_k: what short phrases add over the caption"),
    blank("03-owner-labels.blank", "L_npc: the owner labels z_ik", "test_owner_labels"),
    change("04-no-npc", "L_npc: the concept loss on the global image", "--npc-weight 0"),
    # The flag's rule ignores a leading article ("the red circle" is "a red circle") where the patch compares tokens:
    # the same labels in the shapes world, whose phrases always start with the article of their first word.
    change("05-duplicate-positives", "L_npc: an identical phrase of another image", "--concept-labels phrase"),
    blank("06-pooling.blank", "a_ijk, v_ik: the cross-modal pooling", "test_pooling_weights", "test_cross_modal_pool"),
    change("07-no-xac", "L_xac: the concept loss on the pooled image", "--xac-weight 0"),
    change("08-mean-pool", "a_ijk: the attention against a plain mean over the patches"),
    change("09-sharp-xac", "L_xac at weight 1 with a sharp pooling (tau 0.1)", "--xac-weight 1 --tau 0.1"),
    change("10-infonce", "L_sig: the sigmoid loss against InfoNCE's softmax"),
    blank("11-patch-embedding.blank", "u_ij: the patches a phrase attends over", "test_patch_embedding"),
    change("12-patch-size", "u_ij: 16 patches of 16 pixels instead of 64 of 8"),
    change("13-frozen-text", "y_i, c_k: the text tower frozen at its random start"),
]
BY_NAME = {e.name: e for e in EXERCISES}
