"""Conversion training: attention transfer (stage 1), LoRA fine-tuning with SSD (stage 2), recipes.

Entry point: :func:`run_recipe` (used by ``linearize convert`` and ``linearize demo``). Heavy imports
happen inside the functions, so ``import linearize.train.data`` stays cheap.

Output directory of a run::

    config.json, model.safetensors, tokenizer files   the converted model, LoRA merged (linearize.load(out))
    adapter/                                          the LoRA adapter alone (peft format)
    recipe.yaml                                       the resolved recipe
    data_manifest.json                                which data, how many tokens
    train_log.jsonl                                   one record per step and per validation
    loss.png                                          training / validation loss curves
    summary.json                                      validation losses per mode and stage, tokens/s, wall time,
                                                      where the mixing weights ended (gamma or g per layer and head)
    checkpoints/stage1/, checkpoints/stage2/          resumable checkpoints (see linearize.train.loop)
    .linearize-run, .linearize-complete               run marker (written first) and completion marker (written
                                                      last, once the model files are in place): linearize.models.rundir
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["run_recipe", "load_recipe", "available_recipes"]


def load_recipe(*args, **kwargs):
    from linearize.train.recipes import load_recipe as _load

    return _load(*args, **kwargs)


def available_recipes() -> list[str]:
    from linearize.train.recipes import available_recipes as _available

    return _available()


#: What ``--resume`` may change (per stage): learning rates, their schedule and step counts. Anything else
#: (model, data, hybrid layer, batch shapes, LoRA, seeds) would make the resumed run a different run.
RESUMABLE = ("lr", "mixing_lr", "lr_schedule", "warmup_steps", "max_steps", "epochs", "checkpoint_every", "log_every",
             "grad_clip")


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    from linearize.errors import LinearizeError
    from linearize.models.rundir import RUN_MARKER, is_run_dir

    if out.exists() and not out.is_dir():
        raise LinearizeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise LinearizeError(f"output directory {out} is not empty; pass --overwrite to replace it "
                                 f"or --resume to continue the run it holds")
        resolved = out.resolve()
        if resolved in (Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve()):
            raise LinearizeError(f"refusing to --overwrite {out}: choose a dedicated output directory")
        if not is_run_dir(out):  # only ever delete what this tool wrote
            raise LinearizeError(f"refusing to --overwrite {out}: it does not hold a linearize run (no {RUN_MARKER}); "
                                 f"choose a new or empty directory")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _model_id(model: Any) -> str:
    """How a run records its model: the short name, the resolved path, or the class of a model object."""
    if not isinstance(model, (str, Path)):
        return type(model).__name__
    from linearize.models.loading import SHORT_NAMES

    return str(model) if str(model) in SHORT_NAMES else str(Path(model).expanduser().resolve())


def _strip_volatile(recipe: dict) -> dict:
    r = json.loads(json.dumps(recipe))
    r.get("runtime", {}).pop("show_progress", None)
    r.pop("resolved", None)
    return r


def _flatten(d: dict, where: str = "") -> dict:
    out = {}
    for k, v in d.items():
        path = f"{where}.{k}" if where else k
        out.update(_flatten(v, path) if isinstance(v, dict) and k != "hybrid" else {path: v})
    return out


def _resume_recipe(out: Path, recipe, overrides, preset, model_id: str) -> tuple[dict, dict]:
    """The recipe a resumed run continues with (the stored one, with `overrides` applied) and what changed,
    {key: [old, new]}. Refuses a different model, recipe or preset, a change outside RESUMABLE, and a
    directory with no run in it."""
    from linearize.errors import LinearizeError
    from linearize.models.rundir import read_run_marker
    from linearize.train.recipes import load_recipe as _load_recipe

    stored = out / "recipe.yaml"
    if not stored.is_file():
        raise LinearizeError(f"--resume: {out} holds no run to resume (no recipe.yaml); start the run without --resume")
    previous = _load_recipe(str(stored))
    marker = read_run_marker(out) or {}
    if marker.get("model") not in (None, model_id):
        raise LinearizeError(f"--resume: {out} holds a run of model {marker['model']}, not {model_id}; resume it with "
                             f"--model {marker['model']} or start the new run in another directory")
    if recipe is not None:
        name = recipe.get("name", "custom") if isinstance(recipe, dict) else _load_recipe(recipe)["name"]
        if name != previous["name"]:
            raise LinearizeError(f"--resume: {out} holds a run of recipe {previous['name']}, not {name}; resume it "
                                 f"with --recipe {previous['name']} (or none) or start the new run in another directory")
    if preset and preset != previous.get("preset"):
        raise LinearizeError(f"--resume: {out} holds a run with preset {previous.get('preset')}, not {preset}")
    resolved = _load_recipe(str(stored), overrides)
    old, new = _flatten(_strip_volatile(previous)), _flatten(_strip_volatile(resolved))
    changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    fixed = [k for k in changes if not (k.split(".")[0] in ("stage1", "stage2") and k.split(".", 1)[1] in RESUMABLE)]
    if fixed:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in fixed)
        raise LinearizeError(f"--resume may change only learning rates, schedules and step counts "
                             f"({', '.join(RESUMABLE)}), not {listed}; start a new run for that")
    return resolved, changes


def _rows_digest(train, val) -> str:
    """sha256 of the packed token rows: a resumed run must train on exactly the rows of the run it continues."""
    import hashlib

    digest = hashlib.sha256()
    for rows in (train, val):
        digest.update(str(tuple(rows.shape)).encode())
        digest.update(rows.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _divergence_warnings(val: dict, vocab_size: int) -> list[str]:
    """Modes whose validation loss is worse than guessing uniformly over the vocabulary (ln V) by a nat: a run
    that diverged without ever producing a NaN (e.g. a learning rate far too high)."""
    import math

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
        ax.set_title({"stage1": "stage 1: attention transfer", "stage2": "stage 2: LoRA fine-tuning"}[stage])
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


def stage1_parts(model: Any, s1: dict) -> tuple[dict, Any, Any]:
    """Stage 1 of a resolved recipe on a converted model: its trainable parameters (everything else frozen), the
    AttentionTransfer whose hooks the steps need (``with transfer:``) and the training loop's loss function."""
    from linearize.train import transfer

    params = transfer.trainable_transfer_params(model, s1["train_feature_maps"], s1["train_mixing"])
    xfer = transfer.AttentionTransfer(model, s1["objective"], s1["loss_scale"], int(s1["query_block"]))
    return params, xfer, transfer.transfer_loss_fn(xfer)


def stage2_parts(model: Any, s2: dict, seed: int) -> tuple[Any, dict, Any, Any]:
    """Stage 2 of a resolved recipe: LoRA added to `model` in place; the peft model, the trainable parameters, the
    SSD schedule (None when the recipe disables it) and the training loop's loss function."""
    from linearize.train import finetune, ssd as ssd_mod

    peft_model, params = finetune.add_lora(model, s2["lora"], train_feature_maps=s2["train_feature_maps"],
                                           train_mixing=s2["train_mixing"])
    ssd = ssd_mod.SSDSchedule.from_recipe(s2["ssd"], seed) if s2["ssd"]["enabled"] else None
    return peft_model, params, ssd, finetune.finetune_loss_fn(model, chunk=int(s2["loss_chunk"]), ssd=ssd)


def run_recipe(model: Any, recipe: str | dict | None = None, out_dir: str | Path = "runs/convert", *,
               overrides: list[str] | None = None, preset: str | None = None, resume: bool = False,
               overwrite: bool = False, data_dir: str | None = None, cache_dir: str | None = None, tokenizer=None,
               data=None, accelerator=None, show_progress: bool | None = None,
               interrupt_after: int | None = None) -> dict:
    """Run a conversion recipe end to end and return the summary (also written to ``summary.json``).

    - `model`: a short name / HF directory / .gguf path (loaded with `linearize.load_base`), or a causal
      LM object (then pass `tokenizer`, or `data`).
    - `recipe`: a recipe name (``available_recipes()``), a YAML path or a dict (default ``ssd``); `overrides` are
      ``"a.b.c=value"`` strings; `preset` a size preset (``cpu``).
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
    import torch
    from accelerate import Accelerator

    from linearize.config import HybridConfig
    from linearize.errors import LinearizeError
    from linearize.records import git_commit
    from linearize.models import rundir
    from linearize.models.convert import convert, hybrid_modules, mixing_report
    from linearize.train import finetune, loop, ssd as ssd_mod
    from linearize.train.recipes import dump_recipe, load_recipe as _load_recipe

    t_start = time.perf_counter()
    out = Path(out_dir)
    model_id = _model_id(model)

    # -- validate every input before touching --out ------------------------------------------------
    changes: dict = {}
    if resume:
        resolved, changes = _resume_recipe(out, recipe, overrides, preset, model_id)
    else:
        resolved = _load_recipe(recipe or "ssd", overrides, preset)
    if isinstance(model, (str, Path)):
        from linearize.models.loading import checked_source

        checked_source(model)  # a typo or a missing file fails before --out is touched
    dcfg = resolved["data"]
    if data is None:
        from linearize.train.data import check_sources

        check_sources(list(dcfg["sources"]), data_dir)
    if show_progress is not None:
        resolved["runtime"]["show_progress"] = show_progress
    show = bool(resolved["runtime"]["show_progress"])
    rt = resolved["runtime"]
    acc = accelerator or Accelerator(cpu=bool(rt["cpu"]), mixed_precision=rt["mixed_precision"])
    log = loop.JsonlLog(out / "train_log.jsonl", enabled=acc.is_main_process)
    if acc.is_main_process:
        _check_out_dir(out, resume, overwrite)
        if not resume:
            log.path.unlink(missing_ok=True)
            rundir.write_run_marker(out, model_id, resolved["name"])
            dump_recipe(resolved, out / "recipe.yaml")
        elif changes:
            dump_recipe(resolved, out / "recipe.yaml")  # a later --resume continues from the changed recipe
            log.write({"stage": "resume", "event": "recipe_changed", "changes": changes})
    acc.wait_for_everyone()
    seed = int(resolved["seed"])
    counter = loop.StepCounter(interrupt_after)
    provenance = {**git_commit(), "device": str(acc.device)}
    summary: dict[str, Any] = {"recipe": resolved["name"], "preset": resolved.get("preset"), "seed": seed, **provenance,
                               "processes": acc.num_processes, "distributed": rt["distributed"]}

    # -- model and data ----------------------------------------------------------------------------
    loop.seed_everything(seed)
    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        from linearize.models.loading import load_base

        summary["model"] = str(model)
        model, tokenizer = load_base(str(model), dtype=getattr(torch, rt["dtype"]), device=acc.device)
    else:
        summary["model"] = type(model).__name__
        model = model.to(acc.device)
    summary["load_seconds"] = time.perf_counter() - t0
    if data is None:
        if tokenizer is None:
            raise LinearizeError("run_recipe needs a tokenizer (or ready `data`) to build the training data")
        from linearize.train.data import build_packed_data

        with acc.main_process_first():
            data = build_packed_data(tokenizer, list(dcfg["sources"]), seq_len=int(dcfg["seq_len"]),
                                     max_train_tokens=dcfg["train_tokens"], val_tokens=int(dcfg["val_tokens"]),
                                     val_fraction=float(dcfg["val_fraction"]), data_dir=data_dir, cache_dir=cache_dir,
                                     seed=seed, show_progress=show and acc.is_main_process)
    train_rows, val_rows = data.train, data.val
    manifest = dict(getattr(data, "manifest", {}) or {})
    manifest.update(train_rows=int(train_rows.shape[0]), val_rows=int(val_rows.shape[0]), seq_len=int(train_rows.shape[1]),
                    train_tokens=int(train_rows.numel()), val_tokens=int(val_rows.numel()),
                    rows_sha256=_rows_digest(train_rows, val_rows))
    manifest_path = out / "data_manifest.json"
    if resume and manifest_path.is_file():
        before = json.loads(manifest_path.read_text()).get("rows_sha256")
        if before not in (None, manifest["rows_sha256"]):
            raise LinearizeError(f"--resume: the training data differ from those of the run in {out} (the packed rows' "
                                 f"sha256 was {before[:12]}, is now {manifest['rows_sha256'][:12]}); resume with the "
                                 f"same data directory, or start a new run")
    if acc.is_main_process:
        rundir.write_text_atomic(manifest_path, json.dumps({**manifest, **provenance}, indent=2, default=str))
    ecfg = resolved["eval"]
    s1, s2 = resolved["stage1"], resolved["stage2"]

    def evaluate(modes=None):
        return finetune.validation_losses(model, val_rows, modes=modes or ecfg["modes"], batch_size=int(ecfg["batch_size"]),
                                          chunk=int(s2["loss_chunk"]), max_rows=ecfg["max_val_rows"], accelerator=acc)

    t0 = time.perf_counter()
    logged = [r for r in log.records() if r.get("stage") == "base" and r.get("event") == "eval"] if resume else []
    if logged:  # a resumed run: the base model's validation is already in the log
        summary["val_base"] = logged[-1]["val"]
    else:
        summary["val_base"] = evaluate()
        if acc.is_main_process:
            log.write({"stage": "base", "step": 0, "event": "eval", "val": summary["val_base"]})
    summary["eval_seconds_base"] = time.perf_counter() - t0

    # -- convert -----------------------------------------------------------------------------------
    loop.seed_everything(seed + 1)
    for p in model.parameters():
        p.requires_grad_(False)
    convert(model, HybridConfig.from_dict(dict(resolved["hybrid"])))
    model.to(acc.device)

    # -- stage 1 -----------------------------------------------------------------------------------
    stages = {}
    if s1["enabled"]:
        loop.seed_everything(seed + 2)
        params, xfer, loss_fn = stage1_parts(model, s1)
        spec = loop.LoopSpec.from_recipe("stage1", s1, seed, distributed=rt["distributed"])
        with xfer:
            trainer = loop.Trainer(model=model, params=params, data=train_rows, loss_fn=loss_fn,
                                   spec=spec, ckpt_dir=out / "checkpoints" / "stage1", accelerator=acc, log=log,
                                   show_progress=show, counter=counter)
            result = trainer.run(resume=resume)
        for p in params.values():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        stages["stage1"] = {**result.to_dict(), "objective": s1["objective"], "val": evaluate()}
        stages["stage1"]["eval_seconds"] = time.perf_counter() - t0
        if acc.is_main_process:
            log.write({"stage": "stage1", "step": result.steps, "event": "eval", "val": stages["stage1"]["val"], "final": True})

    # -- stage 2 -----------------------------------------------------------------------------------
    peft_model = None
    if s2["enabled"]:
        loop.seed_everything(seed + 3)
        peft_model, params, ssd, loss_fn = stage2_parts(model, s2, seed)
        es = s2["early_stopping"]
        spec = loop.LoopSpec.from_recipe("stage2", s2, seed, eval_every=int(es["eval_every"]), early_stopping=es,
                                         distributed=rt["distributed"])
        trainer = loop.Trainer(model=model, params=params, data=train_rows, loss_fn=loss_fn, spec=spec,
                               ckpt_dir=out / "checkpoints" / "stage2", accelerator=acc, log=log,
                               eval_fn=lambda step: evaluate(), show_progress=show, counter=counter)
        result = trainer.run(resume=resume)
        for p in params.values():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        stages["stage2"] = {**result.to_dict(), "ssd": s2["ssd"] if ssd else None, "val": evaluate()}
        stages["stage2"]["eval_seconds"] = time.perf_counter() - t0
        if acc.is_main_process:
            log.write({"stage": "stage2", "step": result.steps, "event": "eval", "val": stages["stage2"]["val"], "final": True})
    ssd_mod.clear_drops(hybrid_modules(model))
    summary["mixing"] = mixing_report(model, val_rows[: int(ecfg["batch_size"])])

    # -- save: staged, moved into place, then the completion marker (linearize.models.rundir) ---------
    ocfg = resolved["output"]
    final_val = stages["stage2"]["val"] if "stage2" in stages else stages["stage1"]["val"] if "stage1" in stages else evaluate()
    warnings = _divergence_warnings(final_val, model.get_output_embeddings().weight.shape[0])
    staging = rundir.begin_publish(out) if acc.is_main_process else None
    if acc.is_main_process:
        if peft_model is not None:
            if ocfg["save_adapter"]:
                peft_model.save_pretrained(str(staging / "adapter"))
            if ocfg["merge_lora"]:
                model = peft_model.merge_and_unload()
        to_save = model
        if ocfg["dtype"]:
            to_save = model.to(getattr(torch, ocfg["dtype"]))
        if peft_model is None or ocfg["merge_lora"]:
            to_save.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        plot_log(log.path, staging / "loss.png")
    acc.wait_for_everyone()
    summary.update(stages=stages, val=final_val, wall_seconds=time.perf_counter() - t_start,
                   tokens_per_s={k: v["tokens_per_s"] for k, v in stages.items()}, out_dir=str(out),
                   warnings=warnings)
    if acc.is_main_process:
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        rundir.publish(out, staging)
    acc.wait_for_everyone()
    return summary
