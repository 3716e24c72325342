"""Conversion recipes: readable YAML files in ``linearize/train/recipes/`` merged over :data:`DEFAULTS`.

A recipe is a nested mapping. Every key must exist in :data:`DEFAULTS` (unknown keys are an error, with
the known ones listed), except below ``hybrid`` where the keys are :class:`linearize.HybridConfig` fields.
Resolution order (later wins):

1. :data:`DEFAULTS` (the paper / LoLCATs sizes: seq_len 1024, LR 1e-2 stage 1, 1e-4 stage 2, ...);
2. the recipe file (a name such as ``ssd`` or a path to a ``.yaml`` file);
3. a size preset (``preset: cpu`` in the recipe, or ``--preset cpu``): :data:`PRESETS`;
4. ``--set a.b.c=value`` overrides; the value is parsed as YAML (``4``, ``1e-3``, ``false``,
   ``[q_proj, v_proj]``, ``null``).

The resolved recipe is written to the run's output directory (``recipe.yaml``), so a run can be
reproduced with ``--recipe <out>/recipe.yaml``.
"""

from __future__ import annotations

import copy
import math
import re
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from linearize.config import COMPONENT_MODES, HybridConfig
from linearize.errors import LinearizeError
from linearize.train.transfer import OBJECTIVES

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
RECIPE_DIR = Path(__file__).with_name("recipes")

GRANULARITIES = ("step", "layer", "sample")
LR_SCHEDULES = ("constant", "cosine", "linear")
DISTRIBUTED = ("allreduce", "ddp", "fsdp")

_LOOP = {
    "lr": 1e-2,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "lr_schedule": "constant",  # constant | cosine | linear (decay to 0 after warmup)
    "warmup_steps": 0,
    "grad_clip": 1.0,
    "batch_size": 1,  # rows per micro-batch, over all processes
    "grad_accum": 8,  # micro-batches per optimizer step (LoLCATs: batch 1 x accumulation 8)
    "epochs": 2,
    "max_steps": None,  # optimizer steps; caps `epochs` when set
    "checkpoint_every": 100,  # optimizer steps between resumable checkpoints
    "log_every": 1,
    # learning rate of the mixing parameters (gamma, the learned or input-dependent gate) when the stage trains them;
    # None: `lr`. Stage 2's LoRA rate (1e-4) moves a per-head gate logit by at most ~0.012 in 122 steps
    "mixing_lr": None,
}

DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "description": "",
    "reproduces": "",
    "seed": 0,
    "preset": None,
    "resolved": False,  # true in a resolved recipe written to a run directory: the preset is already applied
    "hybrid": {f.name: f.default for f in dataclasses.fields(HybridConfig)},
    "data": {
        "sources": ["alpaca_demo", "dolly", "sharegpt"],
        "seq_len": 1024,
        "train_tokens": 10_000_000,  # packed training budget (both stages read the same rows)
        "val_tokens": 65_536,
        "val_fraction": 0.05,
    },
    "stage1": {
        "enabled": True,
        "objective": "weights",  # a name in transfer.OBJECTIVES: weights | output | hybrid_output
        "loss_scale": 1.0,  # LoLCATs multiplies its output MSE by 1000
        "train_feature_maps": True,
        "train_mixing": False,  # gamma (shared_norm) or the learned/dynamic gate (mix)
        "query_block": 256,  # query rows per block of the `weights` objective (no T x T tensor)
        **_LOOP,
    },
    "stage2": {
        "enabled": True,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train_feature_maps": False,
        "train_mixing": False,
        "loss_chunk": 1024,  # tokens per lm_head chunk (the vocabulary logits of a whole batch never exist)
        "ssd": {
            "enabled": False,
            # (fraction of training, p(drop SWA)); p is piecewise constant from each point on
            "schedule": [[0.0, 0.9], [0.3333333333333333, 0.75], [0.6666666666666666, 0.5]],
            "per_epoch": None,  # e.g. [0.9, 0.75, 0.5]: p per epoch (last value repeats); overrides `schedule`
            "granularity": "step",  # step | layer | sample
        },
        "early_stopping": {
            "enabled": False,
            "eval_every": 100,  # optimizer steps between validations (0: only at the end)
            "patience": 3,  # validations without improvement before stopping
            "min_delta": 0.0,
            "metric": "hybrid",  # component mode whose validation loss decides
        },
        **_LOOP,
        "lr": 1e-4,
    },
    "eval": {
        "modes": ["hybrid", "swa_only", "la_only"],
        "max_val_rows": None,  # cap on validation rows (None: all)
        "batch_size": 4,
    },
    "output": {
        "merge_lora": True,  # the saved model has LoRA merged; the adapter is saved separately too
        "save_adapter": True,
        "dtype": None,  # dtype of the saved model (None: as trained)
    },
    "runtime": {
        "mixed_precision": "no",  # accelerate: no | bf16 | fp16
        "cpu": False,  # force CPU even when a GPU is present
        "show_progress": True,
        "dtype": "float32",  # dtype the base model is loaded in
        # how several processes (accelerate launch / torchrun) share each step; one process ignores it.
        # allreduce: whole model per process, gradients averaged after the backward passes;
        # ddp: torch DistributedDataParallel, gradient buckets averaged while the backward pass runs;
        # fsdp: FSDP2, parameters / gradients / optimizer states sharded per decoder layer during training
        "distributed": "allreduce",
    },
}

#: Size presets: overrides applied after the recipe file, before ``--set``.
PRESETS: dict[str, dict[str, Any]] = {
    # Gemma 3 270M on a 2-core CPU: the whole `ssd` recipe in about 4 minutes. 256-token rows,
    # 64 transfer steps (16k tokens) and 24 LoRA steps (6k tokens) of batch 1, 4 validation rows.
    "cpu": {
        "data": {"sources": ["alpaca_demo", "dolly"], "seq_len": 256, "train_tokens": 32_768, "val_tokens": 1_024},
        "stage1": {"batch_size": 1, "grad_accum": 1, "epochs": 1, "max_steps": 64, "checkpoint_every": 16,
                   "query_block": 256},
        "stage2": {"batch_size": 1, "grad_accum": 1, "epochs": 1, "max_steps": 24, "checkpoint_every": 8,
                   "loss_chunk": 256, "early_stopping": {"eval_every": 12, "patience": 2}},
        "eval": {"max_val_rows": 4, "batch_size": 4},
        "runtime": {"cpu": True},
    },
    # a first look on one GPU: LoLCATs shapes, a tenth of the tokens
    "gpu-small": {
        "data": {"train_tokens": 1_000_000},
        # one micro-batch of 8 rows per step (same effective batch): a 270M model is launch-bound at batch 1
        "stage1": {"epochs": 1, "batch_size": 8, "grad_accum": 1},
        "stage2": {"epochs": 1, "batch_size": 8, "grad_accum": 1, "early_stopping": {"eval_every": 25}},
        "runtime": {"mixed_precision": "bf16"},
    },
}


class RecipeError(LinearizeError):
    """A recipe file or override that does not fit the recipe schema."""


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = RECIPE_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise RecipeError(f"unknown recipe {str(name_or_path)!r}: not a YAML file and not one of {available_recipes()}")


def _merge(base: dict, update: dict, where: str, schema: dict | None) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}.{key}" if where else key
        if schema is not None and key not in schema:
            raise RecipeError(f"unknown recipe key {path!r}; known keys here: {sorted(schema)}")
        sub = schema.get(key) if schema is not None else None
        if isinstance(sub, dict) and not isinstance(value, dict):
            raise RecipeError(f"{path} is a section, not a value (got {value!r}); set one of its keys, e.g. "
                              f"--set {path}.{next(iter(sub))}=...; keys: {sorted(sub)}")
        if schema is not None and not isinstance(sub, dict) and isinstance(value, dict):
            raise RecipeError(f"{path} is a value, not a section (got keys {sorted(value)})")
        if isinstance(sub, dict) and key != "hybrid":
            out[key] = _merge(out.get(key) or {}, value, path, sub)
        elif key == "hybrid" and isinstance(value, dict):
            known = set(DEFAULTS["hybrid"])
            bad = set(value) - known
            if bad:
                raise RecipeError(f"unknown HybridConfig fields {sorted(bad)} in 'hybrid'; known: {sorted(known)}")
            out[key] = {**(out.get(key) or {}), **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: cannot parse {raw!r} as YAML: {exc}") from exc
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value) if any(c in value for c in ".eE") else int(value)  # YAML 1.1 reads 1e-3 as a string
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set expects key.path=value, got {text!r}")
    return parts, value


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_recipe(name_or_path: str | Path | dict = "ssd", overrides: list[str] | None = None,
                preset: str | None = None) -> dict:
    """The resolved recipe: DEFAULTS <- recipe file <- preset <- overrides; validated."""
    if isinstance(name_or_path, dict):
        raw = copy.deepcopy(name_or_path)
    else:
        path = recipe_path(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    recipe = _merge(DEFAULTS, raw, "", DEFAULTS)
    parsed = [parse_override(o) for o in overrides or []]
    for parts, value in parsed:  # a preset can also be chosen with --set preset=cpu
        if parts == ["preset"]:
            recipe["preset"] = value
    preset = preset or recipe.get("preset")
    if preset and recipe.get("resolved") and preset == recipe.get("preset"):
        preset = None  # a resolved recipe already holds its preset's values (and overrides of them)
    if preset:
        if preset not in PRESETS:
            raise RecipeError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        recipe = _merge(recipe, PRESETS[preset], "", DEFAULTS)
        recipe["preset"] = preset
    for parts, value in parsed:
        recipe = _merge(recipe, _nest(parts, value), "", DEFAULTS)
    validate(recipe)
    return recipe


# Keys whose default is None (or takes several types): the type a value must have when it is set.
_NULLABLE = {"preset": str, "data.train_tokens": int, "stage1.max_steps": int, "stage2.max_steps": int,
             "stage1.mixing_lr": float, "stage2.mixing_lr": float, "stage2.ssd.per_epoch": list,
             "eval.max_val_rows": int, "output.dtype": str}
_ANY = {"hybrid.layers"}  # 'all', 'global' or a list of layer indices: HybridConfig checks it


def expect_type(path: str, value: Any, kind: type) -> Any:
    """`value` as a `kind` (an integral float is accepted as an int), or a RecipeError naming the key."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
                list: "a list, e.g. [a, b]"}[kind]
        raise RecipeError(f"{path} must be {what}, got {value!r}")
    return value


def _check_types(recipe: dict, defaults: dict, where: str = "") -> None:
    """Every leaf of `recipe` has the type of its default (values are coerced in place where that is exact)."""
    for key, default in defaults.items():
        path = f"{where}.{key}" if where else key
        value = recipe.get(key)
        if isinstance(default, dict):
            _check_types(value, default, path)
        elif path in _ANY:
            continue
        elif default is None or path in _NULLABLE:
            if value is not None:
                recipe[key] = expect_type(path, value, _NULLABLE[path])
        else:
            recipe[key] = expect_type(path, value, float if type(default) is float else type(default))


def validate(recipe: dict) -> None:
    _check_types(recipe, DEFAULTS)
    try:
        HybridConfig.from_dict(recipe["hybrid"])
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"hybrid: {exc}") from exc
    modes = recipe["eval"]["modes"]
    if not modes or any(m not in COMPONENT_MODES for m in modes):
        raise RecipeError(f"eval.modes={modes!r}: expected a non-empty list of {COMPONENT_MODES}")
    sources = recipe["data"]["sources"]
    if not sources or not all(isinstance(s, str) and s.strip() for s in sources):
        raise RecipeError(f"data.sources={sources!r}: expected a non-empty list of source names or files")
    s1, s2 = recipe["stage1"], recipe["stage2"]
    if s1["objective"] not in OBJECTIVES:
        raise RecipeError(f"stage1.objective={s1['objective']!r}; expected one of {tuple(OBJECTIVES)}")
    for name, stage in (("stage1", s1), ("stage2", s2)):
        if stage["lr_schedule"] not in LR_SCHEDULES:
            raise RecipeError(f"{name}.lr_schedule={stage['lr_schedule']!r}; expected one of {LR_SCHEDULES}")
        for key in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if not isinstance(stage[key], int) or stage[key] < 1:
                raise RecipeError(f"{name}.{key} must be an integer >= 1, got {stage[key]!r}")
        if stage["max_steps"] is not None and (not isinstance(stage["max_steps"], int) or stage["max_steps"] < 0):
            raise RecipeError(f"{name}.max_steps must be null or an integer >= 0")
        for key in ("lr", "mixing_lr"):
            if stage[key] is not None and stage[key] <= 0:
                raise RecipeError(f"{name}.{key} must be > 0, got {stage[key]!r}")
        betas = stage["betas"]
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise RecipeError(f"{name}.betas must be two numbers in [0, 1), got {betas!r}")
    if recipe["runtime"]["distributed"] not in DISTRIBUTED:
        raise RecipeError(f"runtime.distributed={recipe['runtime']['distributed']!r}; expected one of {DISTRIBUTED}")
    ssd = s2["ssd"]
    if ssd["granularity"] not in GRANULARITIES:
        raise RecipeError(f"stage2.ssd.granularity={ssd['granularity']!r}; expected one of {GRANULARITIES}")
    from linearize.train.ssd import check_schedule

    try:
        check_schedule(ssd["schedule"], ssd["per_epoch"])
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"stage2.ssd: {exc}") from exc
    if recipe["data"]["seq_len"] < 2:
        raise RecipeError("data.seq_len must be >= 2")
    es = s2["early_stopping"]
    if es["metric"] not in recipe["eval"]["modes"]:
        raise RecipeError(f"stage2.early_stopping.metric={es['metric']!r} must be one of eval.modes {recipe['eval']['modes']}")
    if not s1["train_feature_maps"] and not s1["train_mixing"] and s1["enabled"]:
        raise RecipeError("stage1 trains nothing: set stage1.train_feature_maps or stage1.train_mixing, or stage1.enabled=false")


def dump_recipe(recipe: dict, path: str | Path) -> None:
    recipe = {**recipe, "resolved": True}
    header = f"# resolved linearize recipe '{recipe.get('name')}'" + (f" (preset {recipe['preset']})" if recipe.get("preset") else "")
    from linearize.models.rundir import write_text_atomic

    write_text_atomic(Path(path), header + "\n" + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None))
