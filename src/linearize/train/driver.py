"""The conversion run, end to end: :func:`run_recipe` checks its inputs, then runs the steps in order over a typed
:class:`~linearize.train.recipes.Recipe` -- :func:`prepare` (model, data, the base model's validation),
:func:`convert_model`, :func:`transfer` (stage 1), :func:`finetune` (stage 2), :func:`save`. Each step is a function
of a :class:`Run` (what the steps share), so a caller can run them one by one.

Output directory of a run::

    config.json, model.safetensors, tokenizer files   the converted model, LoRA merged (linearize.load(out))
    adapter/                                          the LoRA adapter alone (peft format; none without LoRA)
    recipe.yaml                                       the resolved recipe
    layer_selection.json                              hybrid.layers='measured:K' only: each layer's measured loss
                                                      increase and the layers kept / converted
    data_manifest.json                                which data, how many tokens
    train_log.jsonl                                   one record per step and per validation
    loss.png                                          training / validation loss curves
    summary.json                                      validation losses per mode and stage, tokens/s, wall time,
                                                      where the mixing weights ended (gamma or g per layer and head),
                                                      the inference settings the saved model carries (inference_hybrid),
                                                      where fla refused its backward which kernels trained the linear
                                                      states (fla_backward, linearize.attention.linear.fla_route)
    checkpoints/stage1/, checkpoints/stage2/          resumable checkpoints (see linearize.train.checkpoint)
    .linearize-run, .linearize-complete               run marker (written first) and completion marker (written
                                                      last, once the model files are in place): linearize.models.rundir
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linearize.attention.linear import fla_route
from linearize.config import measured_keep
from linearize.errors import LinearizeError
from linearize.models import rundir
from linearize.models.rundir import model_id
from linearize.records import git_commit
from linearize.train import loop
from linearize.train.recipes import (
    Recipe, Stage1Config, Stage2Config, dump_recipe, load_recipe, resolve_recipe,
)

#: What ``--resume`` may change (per stage): learning rates, their schedule and step counts, and how memory is
#: saved (gradient checkpointing: the same gradients; splitting micro-batches on out of memory). Anything else
#: (model, data, hybrid layer, batch shapes, LoRA, seeds) would make the resumed run a different run.
RESUMABLE = ("lr", "mixing_lr", "lr_schedule", "warmup_steps", "max_steps", "epochs", "checkpoint_every", "log_every",
             "grad_clip", "gradient_checkpointing", "split_on_oom")


@dataclass
class Run:
    """What the steps of a run share: the recipe, where it writes, the processes, the log; then the model and the
    data (set by :func:`prepare`), the validation losses per stage and the summary being written."""

    recipe: Recipe
    out: Path
    acc: Any  # accelerate.Accelerator
    log: loop.JsonlLog
    resume: bool = False
    counter: loop.StepCounter = field(default_factory=loop.StepCounter)
    summary: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # git commit, device: in the summary and the data manifest
    stages: dict = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    peft_model: Any = None
    train_rows: torch.Tensor | None = None
    val_rows: torch.Tensor | None = None
    data_dir: str | None = None  # where the long documents of a measured layer selection are read
    # this process changed the run's parameters or recipe (a fresh run, a stage trained here, a resume that changed
    # the recipe): what the earlier summary measured of the final model no longer holds
    changed_here: bool = True

    @property
    def show_progress(self) -> bool:
        return self.recipe.runtime.show_progress

    def evaluate(self) -> dict[str, float]:
        """Validation loss of every mode in ``eval.modes`` on the validation rows."""
        from linearize.train.finetune import validation_losses

        ecfg = self.recipe.eval
        return validation_losses(self.model, self.val_rows, modes=ecfg.modes, batch_size=ecfg.batch_size,
                                 chunk=self.recipe.stage2.loss_chunk, max_rows=ecfg.max_val_rows, accelerator=self.acc)


def run_recipe(model: Any, recipe: str | dict | Recipe | None = None, out_dir: str | Path = "runs/convert", *,
               overrides: list[str] | None = None, preset: str | None = None, resume: bool = False,
               overwrite: bool = False, data_dir: str | None = None, cache_dir: str | None = None, tokenizer=None,
               data=None, accelerator=None, show_progress: bool | None = None,
               interrupt_after: int | None = None) -> dict:
    """Run a conversion recipe end to end and return the summary (also written to ``summary.json``).

    - `model`: a short name / HF directory / .gguf path (loaded with `linearize.load_base`), or a causal
      LM object (then pass `tokenizer`, or `data`).
    - `recipe`: a recipe name (``available_recipes()``), a YAML path, a dict or a Recipe (default ``ssd``);
      `overrides` are ``"a.b.c=value"`` strings; `preset` a size preset (``cpu``).
    - `data`: a ``PackedData``-like object with ``train``/``val`` LongTensors (rows x seq_len) and a
      ``manifest`` dict; by default built from ``recipe.data`` with `linearize.train.data.build_packed_data`.
    - `resume`: continue an interrupted run in `out_dir` from its checkpoints with its stored recipe. The model,
      the recipe (when given) and the preset must be the run's; `overrides` may change only the keys in
      :data:`RESUMABLE` (the change is logged). `overwrite`: replace the run in `out_dir` (only a run).
    - `interrupt_after`: test hook, stop (raise RunInterrupted) after that many optimizer steps.

    Everything that can be checked without loading (model name and files, recipe, data sources, the output
    directory) is checked before `out_dir` is touched. The model files appear atomically (see
    linearize.models.rundir). ``summary["warnings"]`` lists validation losses that show a diverged run.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    resolved, changes = checked_recipe(model, recipe, out, overrides, preset, resume, data_dir, data is None)
    if show_progress is not None:
        resolved.runtime.show_progress = show_progress
    run = start(resolved, out, model_id(model), accelerator, resume=resume, overwrite=overwrite, changes=changes,
                interrupt_after=interrupt_after)
    prepare(run, model, tokenizer=tokenizer, data=data, data_dir=data_dir, cache_dir=cache_dir)
    convert_model(run)
    if resolved.stage1.enabled:
        transfer(run)
    if resolved.stage2.enabled:
        finetune(run)
    return save(run, wall_start=t_start)


def checked_recipe(model: Any, recipe, out: Path, overrides, preset, resume: bool, data_dir,
                   check_sources: bool) -> tuple[Recipe, dict]:
    """The run's recipe (for `resume`, the stored one with `overrides`) and what a resume changed, after every check
    that needs no loading: the model's name and files, the recipe, the data sources."""
    changes: dict = {}
    if resume:
        resolved, changes = _resume_recipe(out, recipe, overrides, preset, model_id(model))
    else:
        resolved = resolve_recipe(recipe or "ssd", overrides, preset)
    if isinstance(model, (str, Path)):
        from linearize.models.loading import checked_source

        checked_source(model)  # a typo or a missing file fails before --out is touched
    if check_sources:
        from linearize.train.data import check_sources as check

        check(list(resolved.data.sources), data_dir)
    if measured_keep(resolved.hybrid.layers) is not None:
        from linearize.documents import long_documents_path

        long_documents_path(data_dir)  # what the measurement reads: missing, it fails before --out is touched
    return resolved, changes


def start(recipe: Recipe, out: Path, model: str, accelerator=None, *, resume: bool = False, overwrite: bool = False,
          changes: dict | None = None, interrupt_after: int | None = None) -> Run:
    """The run's processes and output directory: --out checked (and emptied for --overwrite), the run marker and
    the resolved recipe written (a resume logs what it changed)."""
    from accelerate import Accelerator

    rt = recipe.runtime
    acc = accelerator or Accelerator(cpu=rt.cpu, mixed_precision=rt.mixed_precision)
    log = loop.JsonlLog(out / "train_log.jsonl", enabled=acc.is_main_process)
    if acc.is_main_process:
        _check_out_dir(out, resume, overwrite)
        if not resume:
            log.path.unlink(missing_ok=True)
            rundir.write_run_marker(out, model, recipe.name)
            dump_recipe(recipe, out / "recipe.yaml")
        elif changes:
            dump_recipe(recipe, out / "recipe.yaml")  # a later --resume continues from the changed recipe
            log.write({"stage": "resume", "event": "recipe_changed", "changes": changes})
    acc.wait_for_everyone()
    provenance = {**git_commit(), "device": str(acc.device)}
    summary = {"recipe": recipe.name, "preset": recipe.preset, "seed": recipe.seed, **provenance,
               "processes": acc.num_processes, "distributed": rt.distributed}
    return Run(recipe=recipe, out=out, acc=acc, log=log, resume=resume, counter=loop.StepCounter(interrupt_after),
               summary=summary, provenance=provenance, changed_here=not resume or bool(changes))


def prepare(run: Run, model: Any, *, tokenizer=None, data=None, data_dir: str | None = None,
            cache_dir: str | None = None) -> None:
    """The base model on the run's device, the packed training and validation rows (their manifest written; a
    resumed run must have the same rows), and the base model's validation loss."""
    recipe, acc = run.recipe, run.acc
    seed = recipe.seed
    loop.seed_everything(seed)
    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        from linearize.models.loading import load_base

        run.summary["model"] = str(model)
        model, tokenizer = load_base(str(model), dtype=getattr(torch, recipe.runtime.dtype), device=acc.device)
    else:
        run.summary["model"] = type(model).__name__
        model = model.to(acc.device)
    run.model, run.tokenizer, run.data_dir = model, tokenizer, data_dir
    run.summary["load_seconds"] = time.perf_counter() - t0
    keep = measured_keep(recipe.hybrid.layers)
    if keep is not None:  # a K this model cannot keep fails now, not after the data are packed
        from linearize.models.layer_select import check_keep

        check_keep(model, keep)
    if data is None:
        if tokenizer is None:
            raise LinearizeError("run_recipe needs a tokenizer (or ready `data`) to build the training data")
        from linearize.train.data import build_packed_data

        dcfg = recipe.data
        with acc.main_process_first():
            data = build_packed_data(tokenizer, list(dcfg.sources), seq_len=dcfg.seq_len,
                                     max_train_tokens=dcfg.train_tokens, val_tokens=dcfg.val_tokens,
                                     val_fraction=dcfg.val_fraction, data_dir=data_dir, cache_dir=cache_dir,
                                     seed=seed, show_progress=run.show_progress and acc.is_main_process)
    run.train_rows, run.val_rows = data.train, data.val
    _write_manifest(run, dict(getattr(data, "manifest", {}) or {}))

    t0 = time.perf_counter()
    logged = [r for r in run.log.records() if r.get("stage") == "base" and r.get("event") == "eval"] if run.resume else []
    if logged:  # a resumed run: the base model's validation is already in the log
        run.summary["val_base"] = logged[-1]["val"]
    else:
        run.summary["val_base"] = run.evaluate()
        if acc.is_main_process:
            run.log.write({"stage": "base", "step": 0, "event": "eval", "val": run.summary["val_base"]})
    run.summary["eval_seconds_base"] = time.perf_counter() - t0


def _write_manifest(run: Run, manifest: dict) -> None:
    train, val = run.train_rows, run.val_rows
    manifest.update(train_rows=int(train.shape[0]), val_rows=int(val.shape[0]), seq_len=int(train.shape[1]),
                    train_tokens=int(train.numel()), val_tokens=int(val.numel()), rows_sha256=_rows_digest(train, val))
    path = run.out / "data_manifest.json"
    if run.resume and path.is_file():
        before = json.loads(path.read_text()).get("rows_sha256")
        if before not in (None, manifest["rows_sha256"]):
            raise LinearizeError(f"--resume: the training data differ from those of the run in {run.out} (the packed "
                                 f"rows' sha256 was {before[:12]}, is now {manifest['rows_sha256'][:12]}); resume with "
                                 f"the same data directory, or start a new run")
    if run.acc.is_main_process:
        rundir.write_text_atomic(path, json.dumps({**manifest, **run.provenance}, indent=2, default=str))


def convert_model(run: Run) -> None:
    """The model's attention layers replaced by hybrid layers (linearize.models.convert), every parameter frozen.
    ``hybrid.layers='measured:K'`` is resolved first (:func:`select_measured_layers`)."""
    from linearize.models.convert import convert

    hybrid = copy.deepcopy(run.recipe.hybrid)  # the model keeps its own; the recipe stays as resolved
    if measured_keep(hybrid.layers) is not None:
        hybrid.layers = select_measured_layers(run)
    loop.seed_everything(run.recipe.seed + 1)
    for p in run.model.parameters():
        p.requires_grad_(False)
    convert(run.model, hybrid)  # the converted config stores the list: loading never measures again
    run.model.to(run.acc.device)


def select_measured_layers(run: Run) -> list[int]:
    """The layers ``hybrid.layers='measured:K'`` converts, measured on the base model (linearize.models.layer_select)
    and recorded in ``layer_selection.json``; a resumed run reads them back from there."""
    from linearize.models import layer_select

    recipe = run.recipe
    keep = measured_keep(recipe.hybrid.layers)
    path = run.out / f"{layer_select.RECORD_KIND}.json"
    if run.resume and path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("keep") != keep:
            raise LinearizeError(f"--resume: {path} kept {stored.get('keep')} layers, the recipe says "
                                 f"{recipe.hybrid.layers!r}")
        run.summary["layer_selection"] = {k: stored[k] for k in ("spec", "kept", "convert")}
        return list(stored["convert"])
    if run.tokenizer is None:
        raise LinearizeError(f"hybrid.layers={recipe.hybrid.layers!r} needs the model's tokenizer to read the long "
                             f"documents; pass `tokenizer`")
    sel = recipe.layer_selection
    window, sinks = sel.cut(recipe.hybrid)
    record = layer_select.select_layers(run.model, run.tokenizer, keep, window=window, sinks=sinks, num_rows=sel.rows,
                                        seq_len=sel.seq_len, seed=recipe.seed, data_dir=run.data_dir,
                                        batch_size=sel.batch_size, loss_chunk=recipe.stage2.loss_chunk)
    if run.acc.is_main_process:
        rundir.write_text_atomic(path, json.dumps({"kind": layer_select.RECORD_KIND, **record, **run.provenance},
                                                  indent=2))
        run.log.write({"stage": "layer_selection", "event": "measured", "kept": record["kept"],
                       "convert": record["convert"], "seconds": record["seconds"]})
    run.summary["layer_selection"] = {k: record[k] for k in ("spec", "kept", "convert")}
    return record["convert"]


def stage1_parts(model: Any, s1: Stage1Config | dict) -> tuple[dict, Any, Any]:
    """Stage 1 of a recipe on a converted model: its trainable parameters (everything else frozen), the
    AttentionTransfer whose hooks the steps need (``with transfer:``) and the training loop's loss function."""
    from linearize.train import transfer as transfer_mod

    s1 = Stage1Config.of(s1)
    params = transfer_mod.trainable_transfer_params(model, s1.train_feature_maps, s1.train_mixing)
    xfer = transfer_mod.AttentionTransfer(model, s1.objective, s1.loss_scale, s1.query_block,
                                          recompute=s1.gradient_checkpointing)
    return params, xfer, transfer_mod.transfer_loss_fn(xfer)


def stage2_parts(model: Any, s2: Stage2Config | dict, seed: int) -> tuple[Any, dict, Any, Any]:
    """Stage 2 of a recipe: LoRA added to `model` in place (unless stage2.lora.enabled is false); the peft model (or
    None), the trainable parameters, the SSD schedule (None when the recipe disables it) and the training loop's loss
    function (the recipe's objective)."""
    from linearize.train import finetune as finetune_mod, ssd as ssd_mod

    s2 = Stage2Config.of(s2)
    peft_model, params = finetune_mod.add_lora(model, s2.lora.to_dict(), train_feature_maps=s2.train_feature_maps,
                                               train_mixing=s2.train_mixing)
    ssd = ssd_mod.SSDSchedule.from_recipe(s2.ssd.to_dict(), seed) if s2.ssd.enabled else None
    loss_fn = finetune_mod.finetune_loss_fn(model, chunk=s2.loss_chunk, ssd=ssd, objective=s2.objective,
                                            peft_model=peft_model)
    return peft_model, params, ssd, loss_fn


def _finish_stage(run: Run, name: str, result, params: dict, **extra) -> None:
    """After a stage: its parameters frozen, the model validated, the stage's record kept and logged. A resumed run
    whose stage had finished takes the validation its log holds (the same parameters give the same losses), so its
    log reads as the uninterrupted run's and the resume spends no time on it."""
    for p in params.values():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    logged = [r for r in run.log.records() if r.get("stage") == name and r.get("event") == "eval" and r.get("final")] \
        if run.resume else []
    run.changed_here |= not logged
    run.stages[name] = {**result.to_dict(), **extra, "val": logged[-1]["val"] if logged else run.evaluate()}
    run.stages[name]["eval_seconds"] = time.perf_counter() - t0
    if run.acc.is_main_process and not logged:
        run.log.write({"stage": name, "step": result.steps, "event": "eval", "val": run.stages[name]["val"],
                       "final": True})


def transfer(run: Run) -> None:
    """Stage 1: attention transfer (the feature maps, and the mixing weights if the recipe says so)."""
    recipe = run.recipe
    s1 = recipe.stage1
    loop.seed_everything(recipe.seed + 2)
    params, xfer, loss_fn = stage1_parts(run.model, s1)
    spec = loop.LoopSpec.from_recipe("stage1", s1, recipe.seed, distributed=recipe.runtime.distributed)
    with xfer:
        trainer = loop.Trainer(model=run.model, params=params, data=run.train_rows, loss_fn=loss_fn, spec=spec,
                               ckpt_dir=run.out / "checkpoints" / "stage1", accelerator=run.acc, log=run.log,
                               show_progress=run.show_progress, counter=run.counter)
        result = trainer.run(resume=run.resume)
    _finish_stage(run, "stage1", result, params, objective=s1.objective)


def finetune(run: Run) -> None:
    """Stage 2: fine-tuning (LoRA unless the recipe disables it; the lm or kl objective; SSD when the recipe enables
    it), validated every ``eval_every`` steps."""
    recipe = run.recipe
    s2 = recipe.stage2
    loop.seed_everything(recipe.seed + 3)
    run.peft_model, params, ssd, loss_fn = stage2_parts(run.model, s2, recipe.seed)
    es = s2.early_stopping
    spec = loop.LoopSpec.from_recipe("stage2", s2, recipe.seed, eval_every=es.eval_every, early_stopping=es,
                                     distributed=recipe.runtime.distributed)
    from linearize.train.finetune import layer_checkpointing

    with layer_checkpointing(run.model) if s2.gradient_checkpointing else contextlib.nullcontext():
        trainer = loop.Trainer(model=run.model, params=params, data=run.train_rows, loss_fn=loss_fn, spec=spec,
                               ckpt_dir=run.out / "checkpoints" / "stage2", accelerator=run.acc, log=run.log,
                               eval_fn=lambda step: run.evaluate(), show_progress=run.show_progress, counter=run.counter)
        result = trainer.run(resume=run.resume)
    _finish_stage(run, "stage2", result, params, ssd=s2.ssd.to_dict() if ssd else None)


def apply_inference_settings(run: Run) -> None:
    """The recipe's ``inference.hybrid`` set on the trained model (linearize.set_hybrid), so the saved config carries
    them; recorded in the summary as ``inference_hybrid``. Called after the last validation: the run's losses are
    the trained model's without them."""
    from linearize.models.convert import set_hybrid

    settings = dict(run.recipe.inference.hybrid)
    if settings:
        set_hybrid(run.model, **settings)
    run.summary["inference_hybrid"] = settings


def _recorded_mixing(run: Run):
    """The gate report in the summary of a finished run resumed with nothing changed (a restored pack whose model
    files are written again): the same parameters give the same report, and measuring it again is a forward over the
    validation rows (over 17 minutes on a 2-core CPU for Qwen2.5-1.5B). None: measure it."""
    path = run.out / "summary.json"
    if run.changed_here or not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return earlier.get("mixing") if isinstance(earlier, dict) else None


def save(run: Run, wall_start: float) -> dict:
    """The model (LoRA merged unless the recipe says otherwise) with the recipe's inference settings, the adapter,
    the tokenizer, the loss plot and the summary: staged, moved into place, then the completion marker
    (linearize.models.rundir). Returns the summary."""
    from linearize.models.convert import hybrid_modules, mixing_report
    from linearize.train.ssd import clear_drops

    acc, ocfg, stages, summary = run.acc, run.recipe.output, run.stages, run.summary
    model = run.model
    clear_drops(hybrid_modules(model))
    recorded = _recorded_mixing(run)
    summary["mixing"] = recorded if recorded is not None else mixing_report(model, run.val_rows[: run.recipe.eval.batch_size])
    final_val = stages["stage2"]["val"] if "stage2" in stages else stages["stage1"]["val"] if "stage1" in stages \
        else run.evaluate()
    warnings = _divergence_warnings(final_val, model.get_output_embeddings().weight.shape[0])
    apply_inference_settings(run)
    staging = rundir.begin_publish(run.out) if acc.is_main_process else None
    if acc.is_main_process:
        peft_model = run.peft_model
        if peft_model is not None:
            if ocfg.save_adapter:
                # the embeddings are never resized; peft's "auto" check would re-read the base's config through the
                # converted config class and print a model-type mismatch warning
                peft_model.save_pretrained(str(staging / "adapter"), save_embedding_layers=False)
            if ocfg.merge_lora:
                model = peft_model.merge_and_unload()
        to_save = model.to(getattr(torch, ocfg.dtype)) if ocfg.dtype else model
        if peft_model is None or ocfg.merge_lora:
            to_save.save_pretrained(str(staging))
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(str(staging))
        plot_log(run.log.path, staging / "loss.png")
    acc.wait_for_everyone()
    if fla_route.DECISIONS:  # where fla refused its backward: which kernels trained the linear states, and why
        summary["fla_backward"] = dict(fla_route.DECISIONS)
    summary.update(stages=stages, val=final_val, wall_seconds=time.perf_counter() - wall_start,
                   tokens_per_s={k: v["tokens_per_s"] for k, v in stages.items()}, out_dir=str(run.out),
                   warnings=warnings)
    if acc.is_main_process:
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        rundir.publish(run.out, staging)
    acc.wait_for_everyone()
    return summary


# -- checks of a run's inputs ----------------------------------------------------------------------------

def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise LinearizeError(f"output directory {out} is not empty; pass --overwrite to replace it "
                                 f"or --resume to continue the run it holds")
        resolved = out.resolve()
        if resolved in (Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve()):
            raise LinearizeError(f"refusing to --overwrite {out}: choose a dedicated output directory")
        if not rundir.is_run_dir(out):  # only ever delete what this tool wrote
            raise LinearizeError(f"refusing to --overwrite {out}: it does not hold a linearize run "
                                 f"(no {rundir.RUN_MARKER}); choose a new or empty directory")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _comparable(recipe: dict) -> dict:
    """The recipe's keys flattened (``stage1.lr``; ``hybrid`` whole), without those that do not change a run."""
    r = json.loads(json.dumps(recipe))
    r["runtime"].pop("show_progress", None)
    r.pop("resolved", None)

    def flatten(d: dict, where: str = "") -> dict:
        out = {}
        for k, v in d.items():
            path = f"{where}.{k}" if where else k
            out.update(flatten(v, path) if isinstance(v, dict) and k != "hybrid" else {path: v})
        return out

    return flatten(r)


def _resume_recipe(out: Path, recipe, overrides, preset, model: str) -> tuple[Recipe, dict]:
    """The recipe a resumed run continues with (the stored one, with `overrides` applied) and what changed,
    {key: [old, new]}. Refuses a different model, recipe or preset, a change outside RESUMABLE, and a
    directory with no run in it."""
    stored = out / "recipe.yaml"
    if not stored.is_file():
        raise LinearizeError(f"--resume: {out} holds no run to resume (no recipe.yaml); start the run without --resume")
    previous = load_recipe(str(stored))
    marker = rundir.read_run_marker(out) or {}
    if marker.get("model") not in (None, model):
        raise LinearizeError(f"--resume: {out} holds a run of model {marker['model']}, not {model}; resume it with "
                             f"--model {marker['model']} or start the new run in another directory")
    if recipe is not None:
        name = (recipe.name if isinstance(recipe, Recipe) else recipe.get("name", "custom") if isinstance(recipe, dict)
                else load_recipe(recipe)["name"])
        if name != previous["name"]:
            raise LinearizeError(f"--resume: {out} holds a run of recipe {previous['name']}, not {name}; resume it "
                                 f"with --recipe {previous['name']} (or none) or start the new run in another directory")
    if preset and preset != previous.get("preset"):
        raise LinearizeError(f"--resume: {out} holds a run with preset {previous.get('preset')}, not {preset}")
    resolved = resolve_recipe(str(stored), overrides)
    old, new = _comparable(previous), _comparable(resolved.to_dict())
    changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    fixed = [k for k in changes if not (k.split(".")[0] in ("stage1", "stage2") and k.split(".", 1)[1] in RESUMABLE)]
    if fixed:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in fixed)
        raise LinearizeError(f"--resume may change only learning rates, schedules and step counts "
                             f"({', '.join(RESUMABLE)}), not {listed}; start a new run for that")
    return resolved, changes


def _rows_digest(train, val) -> str:
    """sha256 of the packed token rows: a resumed run must train on exactly the rows of the run it continues."""
    digest = hashlib.sha256()
    for rows in (train, val):
        digest.update(str(tuple(rows.shape)).encode())
        digest.update(rows.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _divergence_warnings(val: dict, vocab_size: int) -> list[str]:
    """Modes whose validation loss is worse than guessing uniformly over the vocabulary (ln V) by a nat: a run
    that diverged without ever producing a NaN (e.g. a learning rate far too high)."""
    from linearize.models.loading import worse_than_uniform

    return [f"validation loss of {mode} is {v:.2f} nats, worse than a uniform guess over {vocab_size} tokens "
            f"({math.log(vocab_size):.2f}): the run diverged; lower the learning rate and run again"
            for mode, v in val.items() if worse_than_uniform(v, vocab_size)]


def plot_log(log_path: Path, png_path: Path) -> None:
    """Training loss per stage (and validation losses per mode) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    stages = [s for s in ("stage1", "stage2") if any(r.get("stage") == s for r in records)]
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(6 * max(len(stages), 1), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        steps = [r for r in records if r.get("stage") == stage and "loss" in r]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train", lw=1, color="black")
        evals = [r for r in records if r.get("stage") == stage and r.get("event") == "eval"]
        # stage 1 trains a transfer loss; its validation is the LM loss, on a second axis
        vax = ax.twinx() if stage == "stage1" else ax
        for mode in sorted({m for r in evals for m in r["val"]}):
            pts = [(r["step"], r["val"][mode]) for r in evals if mode in r["val"]]
            vax.plot(*zip(*pts), marker="o", lw=1, label=f"val LM loss, {mode}")
        ax.set_title({"stage1": "stage 1: attention transfer", "stage2": "stage 2: fine-tuning"}[stage])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("transfer loss" if stage == "stage1" else "LM loss")
        if vax is not ax:
            vax.set_ylabel("validation LM loss")
        handles = ax.get_legend_handles_labels()
        if vax is not ax:
            extra = vax.get_legend_handles_labels()
            handles = (handles[0] + extra[0], handles[1] + extra[1])
        ax.legend(*handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
