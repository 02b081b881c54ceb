"""Two training steps of each change patch of exercises/, in one process: run from the root of a copy of the tree.

  python tests/exercise_runner.py OUT NAME...

For each NAME, apply exercises/NAME.patch with git, import the patched code afresh (every module of the copy is
dropped from sys.modules; torch stays loaded, which is what makes this fast), train 2 steps of 8 scenes into
OUT/NAME, and take the patch back out. Where the catalogue names train.py flags that do the same, train the
unchanged code with them too, into OUT/NAME-flags. Prints a line per patch, "NAME ok LOSS FLAGS_LOSS" (the last
loss logged, "-" without flags); any error ends the process.
"""

import json
import math
import os
import shlex
import subprocess
import sys

ROOT = os.getcwd()
STEPS = ["--steps", "2", "--batch-size", "8", "--log-every", "1", "--workers", "0"]


def fresh_train():
    """train.py as the files on disk now say, with every module of this tree imported again."""
    for name, module in list(sys.modules.items()):
        if os.path.abspath(getattr(module, "__file__", None) or "/").startswith(ROOT + os.sep):
            del sys.modules[name]
    import train

    return train


def last_loss(out: str, flags: list[str]) -> float:
    fresh_train().main([*STEPS, "--out", out, *flags])
    with open(os.path.join(out, "log.jsonl")) as f:
        loss = json.loads(f.read().splitlines()[-1])["loss"]
    assert math.isfinite(loss), (out, loss)
    return loss


def main(out: str, names: list[str]) -> None:
    sys.path.insert(0, ROOT)
    from exercises.catalogue import BY_NAME

    for name in names:
        patch = os.path.join(ROOT, "exercises", f"{name}.patch")
        subprocess.run(["git", "apply", patch], cwd=ROOT, check=True)
        try:
            loss = last_loss(os.path.join(out, name), [])
        finally:
            subprocess.run(["git", "apply", "-R", patch], cwd=ROOT, check=True)
        flags = shlex.split(BY_NAME[name].flags)
        flags_loss = last_loss(os.path.join(out, f"{name}-flags"), flags) if flags else "-"
        print(name, "ok", loss, flags_loss, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
