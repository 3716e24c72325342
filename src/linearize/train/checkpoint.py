"""A stage's checkpoints: what they hold and how they are written and read.

A stage writes three files to its checkpoint directory (``checkpoints/stage1/`` of a run):

- ``checkpoint.pt`` every ``checkpoint_every`` steps: the trainable parameters, the optimizer and scheduler
  states, the RNG states and the step (which fixes the data position), so ``--resume`` continues exactly;
- ``best.pt``: the parameters at the best validation (early stopping);
- ``final.pt``: the parameters when the stage ended, so a resumed run skips a finished stage.

Tensors are whole whatever the distributed strategy and the number of processes (FSDP2 shards are gathered on
save and split again on load); the main process writes, atomically (a killed write leaves the previous file).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linearize.errors import LinearizeError
from linearize.models.rundir import FINAL_CHECKPOINT
from linearize.train.distributed import as_held, whole

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
FINAL = FINAL_CHECKPOINT


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def param_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole copies of the parameters (on CPU); a collective under FSDP2."""
    return {n: whole(p.detach()).cpu().clone() for n, p in params.items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with whole tensors; a collective under FSDP2."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in state["state"].items()}
    return state


def load_params(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], stage: str) -> None:
    """`state`'s whole tensors into `params` (this process's shard of each where FSDP2 shards it)."""
    missing = set(params) - set(state)
    if missing:
        raise LinearizeError(f"{stage}: checkpoint lacks parameters {sorted(missing)[:3]} ...")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(as_held(state[n], p))


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, params: list[torch.Tensor]) -> None:
    """A state from :func:`optimizer_state` into `optimizer`, whose parameters are `params` in order."""
    state = {**state, "state": {i: {k: as_held(v, params[i]) for k, v in s.items()}
                                for i, s in state["state"].items()}}
    optimizer.load_state_dict(state)


class Checkpoints:
    """A stage's checkpoint directory: the main process writes a file, every process waits for it."""

    def __init__(self, directory: str | Path, accelerator):
        self.dir = Path(directory)
        self.acc = accelerator

    def path(self, name: str) -> Path:
        return self.dir / name

    def write(self, name: str, state: dict) -> None:
        if self.acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_save(state, self.path(name))
        self.acc.wait_for_everyone()

    def read(self, name: str) -> dict | None:
        """The file's state, or None when there is none."""
        path = self.path(name)
        return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
