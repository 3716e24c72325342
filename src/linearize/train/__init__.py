"""Conversion training: attention transfer (stage 1), LoRA fine-tuning with SSD (stage 2), recipes.

The run itself is :mod:`linearize.train.driver` (:func:`run_recipe`, used by ``linearize convert`` and
``linearize demo``); the recipes' schema is :mod:`linearize.train.recipes`; the training loop is
:mod:`linearize.train.loop`. This package only re-exports, on first use, so ``import linearize.train.data``
stays cheap.
"""

from __future__ import annotations

import importlib

#: name -> the module that defines it
_EXPORTS = {
    "run_recipe": "linearize.train.driver",
    "stage1_parts": "linearize.train.driver",
    "stage2_parts": "linearize.train.driver",
    "plot_log": "linearize.train.driver",
    "RESUMABLE": "linearize.train.driver",
    "load_recipe": "linearize.train.recipes",
    "resolve_recipe": "linearize.train.recipes",
    "available_recipes": "linearize.train.recipes",
    "Recipe": "linearize.train.recipes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'linearize.train' has no attribute {name!r}")
