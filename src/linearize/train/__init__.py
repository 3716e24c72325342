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


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    from linearize.errors import LinearizeError

    if out.exists() and not out.is_dir():
        raise LinearizeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            resolved = out.resolve()
            if resolved in (Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve()):
                raise LinearizeError(f"refusing to --overwrite {out}: choose a dedicated output directory")
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif not resume:
            raise LinearizeError(f"output directory {out} is not empty; pass --overwrite to replace it "
                                 f"or --resume to continue the run it holds")
    out.mkdir(parents=True, exist_ok=True)


def _strip_volatile(recipe: dict) -> dict:
    r = json.loads(json.dumps(recipe))
    r.get("runtime", {}).pop("show_progress", None)
    r.pop("resolved", None)
    return r


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


def run_recipe(model: Any, recipe: str | dict = "ssd", out_dir: str | Path = "runs/convert", *,
               overrides: list[str] | None = None, preset: str | None = None, resume: bool = False,
               overwrite: bool = False, data_dir: str | None = None, cache_dir: str | None = None, tokenizer=None,
               data=None, accelerator=None, show_progress: bool | None = None,
               interrupt_after: int | None = None) -> dict:
    """Run a conversion recipe end to end and return the summary (also written to ``summary.json``).

    - `model`: a short name / HF directory / .gguf path (loaded with `linearize.load_base`), or a causal
      LM object (then pass `tokenizer`, or `data`).
    - `recipe`: a recipe name (``available_recipes()``), a YAML path or a dict; `overrides` are
      ``"a.b.c=value"`` strings; `preset` a size preset (``cpu``).
    - `data`: a ``PackedData``-like object with ``train``/``val`` LongTensors (rows x seq_len) and a
      ``manifest`` dict; by default built from ``recipe.data`` with `linearize.train.data.build_packed_data`.
    - `resume`: continue an interrupted run in `out_dir` from its checkpoints (the stored recipe is used).
    - `interrupt_after`: test hook, stop (raise RunInterrupted) after that many optimizer steps.
    """
    import torch
    from accelerate import Accelerator

    from linearize.config import HybridConfig
    from linearize.errors import LinearizeError
    from linearize.evaluate.report import git_commit
    from linearize.models.convert import convert, hybrid_modules, mixing_report
    from linearize.train import finetune, loop, ssd as ssd_mod
    from linearize.train.recipes import dump_recipe, load_recipe as _load_recipe

    t_start = time.perf_counter()
    out = Path(out_dir)
    resolved = _load_recipe(recipe, overrides, preset)
    stored = out / "recipe.yaml"
    if resume and stored.is_file():
        previous = _load_recipe(str(stored))
        if (overrides or preset) and _strip_volatile(previous) != _strip_volatile(resolved):
            raise LinearizeError(f"--resume: the recipe differs from the one stored in {stored}; resume with the same "
                                 f"recipe and --set values (or none), or start again with --overwrite")
        resolved = previous
    if show_progress is not None:
        resolved["runtime"]["show_progress"] = show_progress
    show = bool(resolved["runtime"]["show_progress"])
    rt = resolved["runtime"]
    acc = accelerator or Accelerator(cpu=bool(rt["cpu"]), mixed_precision=rt["mixed_precision"])
    if acc.is_main_process:
        _check_out_dir(out, resume, overwrite)
    acc.wait_for_everyone()
    seed = int(resolved["seed"])
    counter = loop.StepCounter(interrupt_after)
    log = loop.JsonlLog(out / "train_log.jsonl", enabled=acc.is_main_process)
    if not resume and acc.is_main_process and log.path.exists():
        log.path.unlink()
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
    dcfg = resolved["data"]
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
                    train_tokens=int(train_rows.numel()), val_tokens=int(val_rows.numel()))
    if acc.is_main_process:
        dump_recipe(resolved, out / "recipe.yaml")
        (out / "data_manifest.json").write_text(json.dumps({**manifest, **provenance}, indent=2, default=str))
    ecfg = resolved["eval"]
    s1, s2 = resolved["stage1"], resolved["stage2"]

    def evaluate(modes=None):
        return finetune.validation_losses(model, val_rows, modes=modes or ecfg["modes"], batch_size=int(ecfg["batch_size"]),
                                          chunk=int(s2["loss_chunk"]), max_rows=ecfg["max_val_rows"], accelerator=acc)

    t0 = time.perf_counter()
    summary["val_base"] = evaluate()
    summary["eval_seconds_base"] = time.perf_counter() - t0
    if acc.is_main_process:
        log.write({"stage": "base", "step": 0, "event": "eval", "val": summary["val_base"]})

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

    # -- save --------------------------------------------------------------------------------------
    ocfg = resolved["output"]
    final_val = stages["stage2"]["val"] if "stage2" in stages else stages["stage1"]["val"] if "stage1" in stages else evaluate()
    if acc.is_main_process:
        if peft_model is not None:
            if ocfg["save_adapter"]:
                peft_model.save_pretrained(str(out / "adapter"))
            if ocfg["merge_lora"]:
                model = peft_model.merge_and_unload()
        to_save = model
        if ocfg["dtype"]:
            to_save = model.to(getattr(torch, ocfg["dtype"]))
        if peft_model is None or ocfg["merge_lora"]:
            to_save.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        plot_log(log.path, out / "loss.png")
    acc.wait_for_everyone()
    summary.update(stages=stages, val=final_val, wall_seconds=time.perf_counter() - t_start,
                   tokens_per_s={k: v["tokens_per_s"] for k, v in stages.items()}, out_dir=str(out))
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
