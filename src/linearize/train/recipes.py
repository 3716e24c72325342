"""Conversion recipes: the typed schema (:class:`Recipe`), its YAML files in ``linearize/train/recipes/``, presets.

A recipe is a :class:`Recipe`: one dataclass per section (``data``, ``stage1``, ``stage2``, ``eval``, ``output``,
``runtime``, ``layer_selection``, ``inference``; ``hybrid`` is :class:`linearize.HybridConfig` itself). Each field's
help text (its ``metadata``) is its documentation, and each section checks its values in ``__post_init__``. A YAML
recipe file sets some fields; unknown keys are an error that lists the known ones. Resolution order (later wins):

1. the dataclasses' defaults (the paper / LoLCATs sizes: seq_len 1024, LR 1e-2 stage 1, 1e-4 stage 2, ...);
2. the recipe file (a name such as ``ssd`` or a path to a ``.yaml`` file);
3. a size preset (``preset: cpu`` in the recipe, or ``--preset cpu``): :data:`PRESETS`;
4. ``--set a.b.c=value`` overrides; the value is parsed as YAML (``4``, ``1e-3``, ``false``,
   ``[q_proj, v_proj]``, ``null``).

:func:`resolve_recipe` gives the typed recipe, :func:`load_recipe` its YAML form (a nested dict). The resolved
recipe is written to the run's output directory (``recipe.yaml``), so a run can be reproduced with
``--recipe <out>/recipe.yaml``; ``linearize convert --print-recipe`` shows it without running.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from linearize.config import COMPONENT_MODES, STRUCTURAL_FIELDS, HybridConfig, measured_keep
from linearize.errors import LinearizeError
from linearize.train.finetune import FINETUNE_OBJECTIVES
from linearize.train.transfer import OBJECTIVES

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
RECIPE_DIR = Path(__file__).with_name("recipes")

GRANULARITIES = ("step", "layer", "sample")
LR_SCHEDULES = ("constant", "cosine", "linear")
DISTRIBUTED = ("allreduce", "ddp", "fsdp")
MIXED_PRECISION = ("no", "bf16", "fp16")


class RecipeError(LinearizeError):
    """A recipe file or override that does not fit the recipe schema."""


def _field(default: Any, help: str) -> Any:
    """A recipe field: its default and its help text (the documentation). Lists get a fresh copy per recipe."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def expect_type(path: str, value: Any, kind: type) -> Any:
    """`value` as a `kind` (an integral float is accepted as an int, an int as a float), or a RecipeError naming
    the key."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is list:
        value = list(value) if isinstance(value, tuple) else value
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, kind)
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
                list: "a list, e.g. [a, b]", dict: "a mapping, e.g. {a: 1}"}.get(kind, f"a {kind.__name__}")
        raise RecipeError(f"{path} must be {what}, got {value!r}")
    return value


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """`value` checked against the type annotation `hint` (bool, int, float, str, list / tuple, dict, X | None,
    Literal); other annotations (Any, classes) are left to the owner's own checks."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0]) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{path}={value!r}; expected one of {args}")
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        value = expect_type(path, value, list)
        return tuple(value) if tuple in (origin, hint) else value
    if hint in (bool, int, float, str, dict) or origin is dict:
        return expect_type(path, value, origin or hint)
    return value


def _check_fields(obj: Any, where: str) -> None:
    """Every field of the dataclass `obj` has the type its annotation says (coerced in place where that is exact)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                raise RecipeError(f"{where}.{f.name} must be a {hints[f.name].__name__}, got {value!r}")
            continue
        setattr(obj, f.name, _coerce(f"{where}.{f.name}".lstrip("."), value, hints[f.name]))


def _one_of(path: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise RecipeError(f"{path}={value!r}; expected one of {tuple(allowed)}")


class Section:
    """A recipe section: a dataclass whose fields are checked (types, then the section's own rules) when it is made.
    ``where`` is the section's key path in a recipe, used by error messages."""

    where: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_fields(self, self.path())
        self.check()

    def path(self) -> str:
        """Where this section sits in a recipe (the prefix of its keys in error messages)."""
        return self.where

    def check(self) -> None:
        """The section's own rules (value ranges, allowed names); types are already checked."""

    def to_dict(self) -> dict:
        """The YAML form: nested sections as mappings, fields in :meth:`yaml_order`."""
        return {f.name: _plain(getattr(self, f.name)) for f in self.yaml_order()}

    def yaml_order(self) -> list[dataclasses.Field]:
        """The fields in the order the YAML form lists them."""
        return list(dataclasses.fields(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Section":
        """The section from its YAML form: nested sections built from their mappings, unknown keys refused."""
        data = dict(data)
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecipeError(f"unknown recipe key {_join(cls.where, unknown[0])!r}; known keys here: {sorted(known)}")
        for name in known:
            sub = hints[name]
            if name in data and dataclasses.is_dataclass(sub):
                if not isinstance(data[name], dict):
                    raise RecipeError(f"{_join(cls.where, name)} is a section, not a value (got {data[name]!r})")
                data[name] = _hybrid_config(data[name]) if sub is HybridConfig else sub.from_dict(data[name])
        return cls(**data)

    @classmethod
    def of(cls, value: "Section | dict") -> "Section":
        """`value` as this section: itself, or built from its YAML form (callers may hold either)."""
        return value if isinstance(value, cls) else cls.from_dict(value)


def _plain(value: Any) -> Any:
    """A field's value in the YAML form (copies: the form never shares lists with the recipe)."""
    if isinstance(value, Section):
        return value.to_dict()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _hybrid_config(data: dict) -> HybridConfig:
    """The ``hybrid`` section: HybridConfig's own fields (whatever they are), typed as annotated, then its checks."""
    known = {f.name for f in dataclasses.fields(HybridConfig)}
    unknown = set(data) - known
    if unknown:
        raise RecipeError(f"unknown HybridConfig fields {sorted(unknown)} in 'hybrid'; known: {sorted(known)}")
    hints = typing.get_type_hints(HybridConfig)
    typed = {k: _coerce(f"hybrid.{k}", v, hints[k]) for k, v in data.items()}
    try:
        return HybridConfig(**typed)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"hybrid: {exc}") from exc


@dataclass
class DataConfig(Section):
    where: ClassVar[str] = "data"
    sources: list[str] = _field(["alpaca_demo", "dolly", "sharegpt"],
                                "Text sources: named data sets (linearize.documents) or files; both stages read them.")
    seq_len: int = _field(1024, "Tokens per packed training row.")
    train_tokens: int | None = _field(10_000_000, "Packed training budget in tokens (both stages read the same rows); "
                                                  "null: all the sources hold.")
    val_tokens: int = _field(65_536, "Validation tokens (held-out documents).")
    val_fraction: float = _field(0.05, "Share of each source's documents set aside for validation.")

    def check(self) -> None:
        if not self.sources or not all(isinstance(s, str) and s.strip() for s in self.sources):
            raise RecipeError(f"data.sources={self.sources!r}: expected a non-empty list of source names or files")
        if self.seq_len < 2:
            raise RecipeError("data.seq_len must be >= 2")


@dataclass
class LoopConfig(Section):
    """The training-loop settings both stages have (the optimizer, its schedule, batches, steps, checkpoints)."""

    lr: float = _field(1e-2, "AdamW learning rate.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    betas: list[float] = _field([0.9, 0.999], "AdamW betas.")
    lr_schedule: str = _field("constant", "Learning-rate schedule (transformers.get_scheduler): constant, cosine or "
                                          "linear (decay to 0 after the warmup).")
    warmup_steps: int = _field(0, "Optimizer steps of linear warmup from 0 to lr.")
    grad_clip: float | None = _field(1.0, "Clip the gradient norm to this; null or 0: no clipping.")
    batch_size: int = _field(1, "Rows per micro-batch, over all processes.")
    grad_accum: int = _field(8, "Micro-batches per optimizer step (LoLCATs: batch 1 x accumulation 8).")
    epochs: int = _field(2, "Passes over the training rows.")
    max_steps: int | None = _field(None, "Optimizer steps; caps `epochs` when set.")
    split_on_oom: bool = _field(True, "When a training step runs out of GPU memory, split its micro-batches (halve "
                                      "batch_size, double grad_accum: the same rows and effective batch per step) and "
                                      "run the step again, down to 1 row; one process only. false: stop with the "
                                      "error.")
    checkpoint_every: int = _field(100, "Optimizer steps between resumable checkpoints.")
    log_every: int = _field(1, "Optimizer steps between training-log records.")
    # Stage 2's LoRA rate (1e-4) moves a per-head gate logit by at most ~0.012 in 122 steps
    mixing_lr: float | None = _field(None, "Learning rate of the mixing parameters (gamma, the learned or "
                                           "input-dependent gate) when the stage trains them; null: `lr`.")

    @property
    def name(self) -> str:
        """The stage's name: its section's key in a recipe."""
        return self.where

    def path(self) -> str:
        return self.name

    def yaml_order(self) -> list[dataclasses.Field]:
        """A stage's own fields (enabled, objective, ...) first, then the loop settings."""
        loop = [f.name for f in dataclasses.fields(LoopConfig)]
        fields = list(dataclasses.fields(self))
        return [f for f in fields if f.name not in loop] + sorted((f for f in fields if f.name in loop),
                                                                  key=lambda f: loop.index(f.name))

    def check(self) -> None:
        where = self.name
        _one_of(f"{where}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for key in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{where}.{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if self.max_steps is not None and self.max_steps < 0:
            raise RecipeError(f"{where}.max_steps must be null or an integer >= 0")
        if self.warmup_steps < 0 or self.epochs < 0:
            raise RecipeError(f"{where}.warmup_steps and {where}.epochs must be >= 0")
        for key in ("lr", "mixing_lr"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise RecipeError(f"{where}.{key} must be > 0, got {getattr(self, key)!r}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise RecipeError(f"{where}.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = [float(b) for b in self.betas]

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def steps_per_epoch(self, n_rows: int) -> int:
        return n_rows // self.rows_per_step

    def total_steps(self, n_rows: int) -> int:
        per_epoch = self.steps_per_epoch(n_rows)
        if per_epoch == 0:
            raise LinearizeError(
                f"{self.name}: {n_rows} training rows are fewer than one optimizer step "
                f"(batch_size {self.batch_size} x grad_accum {self.grad_accum}); add data or shrink the batch")
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps is not None else total


@dataclass
class Stage1Config(LoopConfig):
    where: ClassVar[str] = "stage1"
    enabled: bool = _field(True, "Run stage 1 (attention transfer).")
    objective: str = _field("weights", "Transfer loss, a name in linearize.train.transfer.OBJECTIVES: weights, "
                                       "output or hybrid_output.")
    loss_scale: float = _field(1.0, "Factor on the transfer loss (LoLCATs multiplies its output MSE by 1000).")
    train_feature_maps: bool = _field(True, "Train the feature maps.")
    train_mixing: bool = _field(False, "Train gamma (shared_norm) or the learned / dynamic gate (mix).")
    query_block: int = _field(256, "Query rows per block of the `weights` objective (no T x T tensor).")
    gradient_checkpointing: bool = _field(False, "Keep only each converted layer's inputs for the backward pass and "
                                                 "compute its transfer loss again there (activation checkpointing): "
                                                 "the same loss and gradients, the student's intermediates of one "
                                                 "layer at a time.")

    def check(self) -> None:
        super().check()
        _one_of("stage1.objective", self.objective, OBJECTIVES)
        if self.query_block < 1:
            raise RecipeError("stage1.query_block must be >= 1")


@dataclass
class LoraConfig(Section):
    where: ClassVar[str] = "stage2.lora"
    enabled: bool = _field(True, "Add LoRA adapters. false: stage 2 trains only what train_feature_maps / "
                                 "train_mixing name, so the base model's weights (and with them the softmax branch: "
                                 "window, sinks, memory) stay exactly the base's.")
    r: int = _field(8, "LoRA rank.")
    alpha: float = _field(16, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = _field(0.0, "LoRA dropout.")
    target_modules: list[str] = _field(["q_proj", "k_proj", "v_proj", "o_proj"], "Modules that get LoRA adapters.")

    def check(self) -> None:
        if self.enabled and (self.r < 1 or not self.target_modules):
            raise RecipeError("stage2.lora.r must be >= 1 and stage2.lora.target_modules a non-empty list")


@dataclass
class SSDConfig(Section):
    where: ClassVar[str] = "stage2.ssd"
    enabled: bool = _field(False, "Scheduled Sliding-window Dropout: drop the SWA branch (run la_only) with "
                                  "probability p during stage 2 (linearize.train.ssd).")
    schedule: list = _field([[0.0, 0.9], [1 / 3, 0.75], [2 / 3, 0.5]],
                            "(fraction of training, p(drop SWA)) points; p is piecewise constant from each point on.")
    per_epoch: list | None = _field(None, "p per epoch, e.g. [0.9, 0.75, 0.5] (the last value repeats); "
                                          "overrides `schedule`.")
    granularity: str = _field("step", "One draw per optimizer step (step), per layer and step (layer) or per row "
                                      "(sample).")

    def check(self) -> None:
        _one_of("stage2.ssd.granularity", self.granularity, GRANULARITIES)
        from linearize.train.ssd import check_schedule

        try:
            check_schedule(self.schedule, self.per_epoch)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"stage2.ssd: {exc}") from exc


@dataclass
class EarlyStoppingConfig(Section):
    where: ClassVar[str] = "stage2.early_stopping"
    enabled: bool = _field(False, "Stop when the validation loss stops improving and keep the best weights; "
                                  "disabled, validation still runs every eval_every steps (report only).")
    eval_every: int = _field(100, "Optimizer steps between validations (0: only at the end).")
    patience: int = _field(3, "Validations without improvement before stopping.")
    min_delta: float = _field(0.0, "Smallest decrease of the loss that counts as an improvement.")
    metric: str = _field("hybrid", "Component mode whose validation loss decides (one of eval.modes).")

    def check(self) -> None:
        if self.eval_every < 0 or self.patience < 1:
            raise RecipeError("stage2.early_stopping.eval_every must be >= 0 and patience >= 1")


@dataclass
class Stage2Config(LoopConfig):
    where: ClassVar[str] = "stage2"
    lr: float = _field(1e-4, "AdamW learning rate.")
    enabled: bool = _field(True, "Run stage 2 (LoRA fine-tuning of the converted model).")
    objective: str = _field("lm", "Loss, a name in linearize.train.finetune.FINETUNE_OBJECTIVES: lm (next-token "
                                  "cross-entropy of the data) or kl (KL divergence from the base model's next-token "
                                  "distribution, the base being the same forward with every converted layer's "
                                  "attention computed as the base layer's own softmax attention and LoRA switched "
                                  "off; about a third more compute per step).")
    lora: LoraConfig = _field(LoraConfig(), "The LoRA adapters (peft).")
    train_feature_maps: bool = _field(False, "Train the feature maps too.")
    train_mixing: bool = _field(False, "Train gamma (shared_norm) or the learned / dynamic gate (mix) too.")
    loss_chunk: int = _field(1024, "Tokens per LM-head chunk (the vocabulary logits of a whole batch never exist).")
    gradient_checkpointing: bool = _field(False, "Keep only each decoder layer's input for the backward pass and run "
                                                 "the layer again there (activation checkpointing): the same loss and "
                                                 "gradients, a fraction of the activation memory (4k-token rows of a "
                                                 "1.5B model), about a third more compute.")
    ssd: SSDConfig = _field(SSDConfig(), "Scheduled Sliding-window Dropout.")
    early_stopping: EarlyStoppingConfig = _field(EarlyStoppingConfig(), "Validation during stage 2, early stopping.")

    def check(self) -> None:
        super().check()
        _one_of("stage2.objective", self.objective, FINETUNE_OBJECTIVES)
        if self.enabled and not (self.lora.enabled or self.train_feature_maps or self.train_mixing):
            raise RecipeError("stage2 trains nothing: stage2.lora.enabled, stage2.train_feature_maps and "
                              "stage2.train_mixing are all false (set stage2.enabled=false to skip it)")
        if self.loss_chunk < 1:
            raise RecipeError("stage2.loss_chunk must be >= 1")


@dataclass
class EvalConfig(Section):
    where: ClassVar[str] = "eval"
    modes: list[str] = _field(["hybrid", "swa_only", "la_only"], "Component modes whose validation loss is reported.")
    max_val_rows: int | None = _field(None, "Cap on validation rows (null: all).")
    batch_size: int = _field(4, "Validation rows per forward pass.")

    def check(self) -> None:
        if not self.modes or any(m not in COMPONENT_MODES for m in self.modes):
            raise RecipeError(f"eval.modes={self.modes!r}: expected a non-empty list of {COMPONENT_MODES}")
        if self.batch_size < 1:
            raise RecipeError("eval.batch_size must be >= 1")


@dataclass
class OutputConfig(Section):
    where: ClassVar[str] = "output"
    merge_lora: bool = _field(True, "The saved model has LoRA merged (the adapter is saved separately too).")
    save_adapter: bool = _field(True, "Save the LoRA adapter alone (peft format) under adapter/.")
    dtype: str | None = _field(None, "dtype of the saved model, e.g. bfloat16 (null: as trained).")


@dataclass
class RuntimeConfig(Section):
    where: ClassVar[str] = "runtime"
    mixed_precision: str = _field("no", "accelerate's mixed precision: no, bf16 or fp16.")
    cpu: bool = _field(False, "Force the CPU even when a GPU is present.")
    show_progress: bool = _field(True, "Progress bars.")
    dtype: str = _field("float32", "dtype the base model is loaded in.")
    distributed: str = _field("allreduce", "How several processes (accelerate launch / torchrun) share each step; one "
                                           "process ignores it. allreduce: whole model per process, gradients averaged "
                                           "after the backward passes; ddp: torch DistributedDataParallel, gradient "
                                           "buckets averaged while the backward pass runs; fsdp: FSDP2, parameters, "
                                           "gradients and optimizer states sharded per decoder layer.")

    def check(self) -> None:
        _one_of("runtime.distributed", self.distributed, DISTRIBUTED)
        _one_of("runtime.mixed_precision", self.mixed_precision, MIXED_PRECISION)


def _hybrid_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(HybridConfig)]


@dataclass
class InferenceConfig(Section):
    """Computation-only settings the saved model runs with (set on it after training, before it is saved)."""

    where: ClassVar[str] = "inference"
    hybrid: dict = _field({}, "Computation-only HybridConfig fields (those linearize.set_hybrid accepts, e.g. "
                              "{sparse_memory: 256, mix_shift: 1.0}) applied with set_hybrid to the converted model "
                              "once training has ended and before it is saved: its config.json carries them, so "
                              "linearize.load(out), from_pretrained and `linearize eval` run with them by default "
                              "(eval's --hybrid still overrides them). Inference settings: training and every "
                              "validation loss of the run (train_log.jsonl, summary.json 'val' and 'stages') are those "
                              "of the trained model WITHOUT them; summary.json records them as 'inference_hybrid'. "
                              "Structural fields (linearize.config.STRUCTURAL_FIELDS: feature maps, combine rule, "
                              "gate, linear state, layers) are refused: they belong in `hybrid`. To switch off one a "
                              "recipe sets, set it to its HybridConfig default (sparse_memory: 0, mix_shift: 0.0). "
                              "{} (the default): the saved model is the trained one.")

    def check(self) -> None:
        known = _hybrid_field_names()
        unknown = sorted(set(self.hybrid) - set(known))
        if unknown:
            raise RecipeError(f"unknown HybridConfig fields {unknown} in 'inference.hybrid'; known: {sorted(known)}")
        structural = sorted(set(self.hybrid) & set(STRUCTURAL_FIELDS))
        if structural:
            raise RecipeError(f"inference.hybrid cannot set {structural}: they decide the converted layers' parameters "
                              f"(set them in `hybrid`); only computation-only fields can change after training")
        hints = typing.get_type_hints(HybridConfig)
        self.hybrid = {k: _coerce(f"inference.hybrid.{k}", v, hints[k]) for k, v in self.hybrid.items()}


@dataclass
class LayerSelectionConfig(Section):
    """How ``hybrid.layers='measured:K'`` measures (linearize.models.layer_select); read only then."""

    where: ClassVar[str] = "layer_selection"
    rows: int = _field(4, "Long-document rows the loss is measured on (longdocs/ of the data directory).")
    seq_len: int = _field(2048, "Tokens per row; must exceed window + sinks.")
    window: int | None = _field(None, "Window of the cut each layer is measured with; null: hybrid.window.")
    sinks: int | None = _field(None, "Sinks of the cut; null: hybrid.softmax_sinks.")
    batch_size: int = _field(4, "Rows per forward pass.")

    def check(self) -> None:
        if self.rows < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise RecipeError("layer_selection.rows and batch_size must be >= 1 and seq_len >= 2")
        if (self.window is not None and self.window < 1) or (self.sinks is not None and self.sinks < 0):
            raise RecipeError("layer_selection.window must be null or >= 1, sinks null or >= 0")

    def cut(self, hybrid: HybridConfig) -> tuple[int, int]:
        """(window, sinks) of the measurement for a conversion with `hybrid`."""
        return (self.window or hybrid.window, hybrid.softmax_sinks if self.sinks is None else self.sinks)


@dataclass
class Recipe(Section):
    """A whole conversion recipe: the hybrid layer, the data, the two training stages, validation, output, runtime."""

    name: str = _field("custom", "The recipe's name (its file name for a shipped recipe).")
    description: str = _field("", "One line saying what the recipe does.")
    reproduces: str = _field("", "The paper result it reproduces.")
    seed: int = _field(0, "Seed of everything random: data order, initialisation, SSD draws.")
    preset: str | None = _field(None, "Size preset applied over the recipe file (PRESETS), e.g. cpu.")
    resolved: bool = _field(False, "True in a resolved recipe written to a run directory: its preset is already "
                                   "applied.")
    hybrid: HybridConfig = _field(HybridConfig(), "The hybrid attention layer (linearize.HybridConfig).")
    data: DataConfig = _field(DataConfig(), "The training and validation text.")
    stage1: Stage1Config = _field(Stage1Config(), "Stage 1: attention transfer.")
    stage2: Stage2Config = _field(Stage2Config(), "Stage 2: LoRA fine-tuning, optionally with SSD.")
    eval: EvalConfig = _field(EvalConfig(), "Validation by component mode.")
    output: OutputConfig = _field(OutputConfig(), "What the run directory holds.")
    runtime: RuntimeConfig = _field(RuntimeConfig(), "Device, precision, processes.")
    layer_selection: LayerSelectionConfig = _field(LayerSelectionConfig(), "The measurement behind "
                                                   "hybrid.layers='measured:K'.")
    inference: InferenceConfig = _field(InferenceConfig(), "Settings the saved model runs with, not trained with.")

    def check(self) -> None:
        es = self.stage2.early_stopping
        if es.metric not in self.eval.modes:
            raise RecipeError(f"stage2.early_stopping.metric={es.metric!r} must be one of eval.modes {self.eval.modes}")
        s1 = self.stage1
        if s1.enabled and not s1.train_feature_maps and not s1.train_mixing:
            raise RecipeError("stage1 trains nothing: set stage1.train_feature_maps or stage1.train_mixing, "
                              "or stage1.enabled=false")
        if s1.enabled and s1.gradient_checkpointing and self.runtime.distributed == "fsdp":
            # FSDP2 gathers a layer's weights around its forward only; stage 1's recomputed losses run outside it
            raise RecipeError("stage1.gradient_checkpointing does not work with runtime.distributed=fsdp (the "
                              "recomputed transfer loss would read the layer's sharded weights); use allreduce or ddp")
        if self.inference.hybrid:
            try:  # the values in the context of the trained layer (e.g. mix_shift needs a learned or dynamic gate)
                saved = HybridConfig(**{**self.hybrid.to_dict(), **self.inference.hybrid})
            except ValueError as exc:
                raise RecipeError(f"inference.hybrid: {exc}") from exc
            if saved != self.hybrid and self.stage2.enabled and not self.output.merge_lora:
                raise RecipeError("inference.hybrid sets the saved model's config, but output.merge_lora=false saves "
                                  "only the LoRA adapter; merge it, or apply them with linearize.set_hybrid after "
                                  "loading")
        window, sinks = self.layer_selection.cut(self.hybrid)
        if measured_keep(self.hybrid.layers) is not None and self.layer_selection.seq_len <= window + sinks:
            raise RecipeError(f"layer_selection.seq_len={self.layer_selection.seq_len} must exceed the measured cut's "
                              f"window {window} + sinks {sinks}")

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(key path, default, help) of every field, nested sections flattened; ``hybrid.*`` from HybridConfig."""
        rows = []

        def walk(section_cls, where: str) -> None:
            hints = typing.get_type_hints(section_cls)
            defaults = section_cls()
            for f in dataclasses.fields(section_cls):
                path = _join(where, f.name)
                if dataclasses.is_dataclass(hints[f.name]):
                    walk(hints[f.name], path)
                else:
                    rows.append((path, getattr(defaults, f.name), f.metadata.get("help", "")))

        walk(cls, "")
        return rows


def _defaults() -> dict:
    """The default of every key, in the YAML form (what the merge of a recipe file checks its keys against)."""
    return Recipe().to_dict()


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


def _merge(base: dict, update: dict, where: str, schema: dict) -> dict:
    """`update` merged into `base` (copies), every key checked against `schema` (the defaults' YAML form)."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = _join(where, key)
        if key not in schema:
            raise RecipeError(f"unknown recipe key {path!r}; known keys here: {sorted(schema)}")
        sub = schema[key]
        # `hybrid` (the recipe's, and inference's) is a mapping of HybridConfig fields, merged key by key
        keys = _hybrid_field_names() if key == "hybrid" else list(sub) if isinstance(sub, dict) else None
        if keys is not None and not isinstance(value, dict):
            raise RecipeError(f"{path} is a section, not a value (got {value!r}); set one of its keys, e.g. "
                              f"--set {path}.{keys[0]}=...; keys: {sorted(keys)}")
        if keys is None and isinstance(value, dict):
            raise RecipeError(f"{path} is a value, not a section (got keys {sorted(value)})")
        if key == "hybrid":
            bad = set(value) - set(keys)
            if bad:
                raise RecipeError(f"unknown HybridConfig fields {sorted(bad)} in {path!r}; known: {sorted(keys)}")
            out[key] = {**(out.get(key) or {}), **copy.deepcopy(value)}
        elif keys is not None:
            out[key] = _merge(out.get(key) or {}, value, path, sub)
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


def resolve_recipe(name_or_path: str | Path | dict | Recipe = "ssd", overrides: list[str] | None = None,
                   preset: str | None = None) -> Recipe:
    """The resolved, checked recipe: defaults <- recipe file <- preset <- the file's `presets` entry for that preset
    <- overrides."""
    if isinstance(name_or_path, Recipe):
        raw = name_or_path.to_dict()
    elif isinstance(name_or_path, dict):
        raw = copy.deepcopy(name_or_path)
    else:
        path = recipe_path(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    # a recipe file's own adjustments to a size preset (`presets: {gpu-small: {data: {train_tokens: ...}}}`), applied
    # over the preset when it is chosen: the sizes a recipe was measured at survive the preset's generic ones
    adjust = raw.pop("presets", None) or {}
    if not isinstance(adjust, dict) or set(adjust) - set(PRESETS) or not all(isinstance(v, dict) for v in adjust.values()):
        raise RecipeError(f"presets: a mapping of preset names ({sorted(PRESETS)}) to recipe keys, got {adjust!r}")
    defaults = _defaults()
    recipe = _merge(defaults, raw, "", defaults)
    for name, keys in adjust.items():  # checked now, whichever preset is chosen
        _merge(recipe, keys, f"presets.{name}", defaults)
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
        recipe = _merge(recipe, PRESETS[preset], "", defaults)
        recipe = _merge(recipe, adjust.get(preset, {}), "", defaults)
        recipe["preset"] = preset
    for parts, value in parsed:
        recipe = _merge(recipe, _nest(parts, value), "", defaults)
    return Recipe.from_dict(recipe)


def load_recipe(name_or_path: str | Path | dict | Recipe = "ssd", overrides: list[str] | None = None,
                preset: str | None = None) -> dict:
    """The resolved recipe in its YAML form (a nested dict, as ``recipe.yaml`` holds it): see :func:`resolve_recipe`."""
    return resolve_recipe(name_or_path, overrides, preset).to_dict()


def recipe_yaml(recipe: Recipe | dict) -> str:
    """The resolved recipe as ``recipe.yaml`` holds it: a header comment, then the YAML (marked resolved)."""
    data = {**(recipe.to_dict() if isinstance(recipe, Recipe) else recipe), "resolved": True}
    header = f"# resolved linearize recipe '{data.get('name')}'" + (f" (preset {data['preset']})" if data.get("preset") else "")
    return header + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def dump_recipe(recipe: Recipe | dict, path: str | Path) -> None:
    from linearize.models.rundir import write_text_atomic

    write_text_atomic(Path(path), recipe_yaml(recipe))
