"""A tiny `ssd` conversion that can be killed (SIGKILL) at a chosen point: the n-th call of a linearize function.

``python fault_run.py OUT N`` runs it into OUT and kills itself at call N; the test imports the same
definitions to run the reference, count the calls and resume. Counting calls of the package's own functions
makes the kill points reproducible and spreads them over everything a run does: checks, loading, steps,
checkpoints, evaluation, saving and publishing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "train")]

import linearize  # noqa: E402
from lz_train_helpers import random_data, tiny_llama, tiny_recipe, word_tokenizer  # noqa: E402

SRC = str(Path(linearize.__file__).resolve().parent)
SETS = tiny_recipe(**{"stage1.max_steps": 3, "stage1.checkpoint_every": 1, "stage2.max_steps": 3,
                      "stage2.checkpoint_every": 2, "eval.modes": "[hybrid]",
                      "stage2.early_stopping.metric": "hybrid"})


def run(out, *, resume: bool = False):
    from linearize.train import run_recipe

    return run_recipe(tiny_llama(), None if resume else "ssd", out, overrides=None if resume else SETS,
                      data=random_data(), tokenizer=word_tokenizer(), resume=resume)


class CallCounter:
    """sys.settrace hook counting calls of linearize functions; at call `kill_at` the process SIGKILLs itself.
    (It traces no lines: returning None leaves every frame untraced, so the run slows down only a little.)"""

    def __init__(self, kill_at: int | None = None):
        self.count, self.kill_at, self.marks = 0, kill_at, {}

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(SRC):
            self.count += 1
            if self.kill_at is not None and self.count >= self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.marks.setdefault(frame.f_code.co_name, self.count)
        return None


if __name__ == "__main__":
    counter = CallCounter(int(sys.argv[2]))
    sys.settrace(counter)
    run(Path(sys.argv[1]))
    sys.settrace(None)
