"""Conversion throughput (`linearize bench --conversion`): what each stage of the recipes costs on one device.

The recipes are resolved as `linearize convert` resolves them (recipe <- size preset <- sizes <- ``--set``), then,
in one process:

  load     the base model's load time (`load_base`; a GGUF file is dequantized once and cached) and, per recipe,
           the conversion time (`convert`)
  eval     a no-grad forward computing the validation loss (decoder + chunked LM head, `finetune.lm_loss_sum`) at
           the training batch and length, in the training precision: the base model, and each converted model
           under `hybrid` and `la_only` -- what evaluating a conversion costs
  stage1   attention transfer (`weights`, `output` or `hybrid_output`, as the recipe sets it)
  stage2   LoRA fine-tuning, with Scheduled Sliding-window Dropout where the recipe enables it
  anchor   the base model's own LoRA fine-tuning step with the recipe's stage-2 LoRA settings, rows and length
           (no conversion, no SSD): what fine-tuning the base would cost. Every training row gets
           `cost_vs_base_lora` = (base LoRA tokens/s) / (its tokens/s), the cost of a token relative to that anchor
           (stage 2 goal: <= 1.25)

A training row times the library's own optimizer step (`Trainer.train_step`: forward, backward, clipping, AdamW,
set up by `stage1_parts` / `stage2_parts` as `run_recipe` does) over `steps` steps after `warmup` untimed ones;
an eval row times `steps` forwards after `warmup`. The device is synchronised around each timed call; tokens/s is
the timed tokens over the timed seconds. Rows that compute the same thing (same hybrid config and the same
cost-relevant stage settings, e.g. stage 1 of ssd and hedgecats) are measured once and list every recipe they stand
for. Peak memory is reset per row: torch.cuda.max_memory_allocated on GPU (the base model waits on the CPU
meanwhile, as only one model is on the GPU in a real run), the peak RSS (VmHWM) on CPU. Data: random token ids --
throughput does not depend on the content.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from linearize.attention.linear import fla_route
from linearize.bench.decode import decode_shape
from linearize.bench.kernels import environment as gpu_environment
from linearize.config import HybridConfig
from linearize.errors import DoesNotFitError, LinearizeError, TrainingDivergedError
from linearize.models.convert import components, convert
from linearize.models.loading import load_base
from linearize.records import benchmark_header, git_commit
from linearize.train import loop, stage1_parts, stage2_parts
from linearize.train.finetune import lm_loss_sum
from linearize.train.recipes import load_recipe

#: `--model shape:<name>`: random weights of a decode benchmark shape (bench.decode.decode_shape), nothing loaded
RANDOM_SHAPE = "shape:"
DATA = "random token ids, uniform over the vocabulary (throughput does not depend on the content)"
# stage settings that do not change what an optimizer step computes: stages differing only in these are measured once
_NO_COST = ("enabled", "epochs", "max_steps", "checkpoint_every", "log_every", "early_stopping", "lr", "betas",
            "weight_decay", "lr_schedule", "warmup_steps", "loss_scale")
# stage-2 settings that exist only for a converted model: the base LoRA anchor ignores them
_NOT_FOR_THE_BASE = ("ssd", "train_feature_maps", "train_mixing")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps, device: torch.device) -> list[float]:
    """Seconds of each fn(i) for i in `steps`, the device synchronised around each call (CUDA runs asynchronously)."""
    seconds = []
    for i in steps:
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" restarts the peak RSS (VmHWM) from the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), None)


def _random_rows(vocab: int, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


def _timing(seconds: list[float], tokens_per_step: int) -> dict:
    total = sum(seconds)
    return {"steps": len(seconds), "tokens_per_step": tokens_per_step, "tokens": tokens_per_step * len(seconds),
            "seconds": total, "tokens_per_s": tokens_per_step * len(seconds) / total,
            "median_step_s": statistics.median(seconds), "step_seconds": seconds}


def _cost_key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def plan(recipes: dict[str, dict]) -> list[dict]:
    """The rows to measure in order: {stage, what, recipes, key}; a row standing for several recipes appears once."""
    rows, seen = [], {}

    def add(stage: str, what: str, recipe: str, key: str) -> None:
        if key in seen:
            seen[key]["recipes"].append(recipe)
            return
        seen[key] = {"stage": stage, "what": what, "recipes": [recipe], "key": key}
        rows.append(seen[key])

    for name, r in recipes.items():
        hybrid = r["hybrid"]
        forward = (r["data"]["seq_len"], r["stage1"]["batch_size"], r["stage2"]["loss_chunk"])
        add("eval", "base", name, _cost_key("base", forward))
        for mode in ("hybrid", "la_only"):
            add("eval", mode, name, _cost_key(mode, hybrid, forward))
        for stage in ("stage1", "stage2"):
            s = r[stage]
            if not s["enabled"]:
                continue
            what = f"transfer: {s['objective']}" if stage == "stage1" else stage2_label(s)
            cost = {k: v for k, v in s.items() if k not in _NO_COST}
            add(stage, what, name, _cost_key(stage, hybrid, r["data"]["seq_len"], cost))
        if r["stage2"]["enabled"]:
            cost = {k: v for k, v in r["stage2"].items() if k not in _NO_COST + _NOT_FOR_THE_BASE}
            add("anchor", "base LoRA", name, _cost_key("base_lora", r["data"]["seq_len"], cost))
    return rows


def stage2_label(s2: dict) -> str:
    """What a stage 2 trains, as its row names it: 'LoRA' (+ ' + SSD'), or the feature maps / gate alone where it adds
    no adapters, and its loss where it is not the next-token loss ('LoRA + SSD', 'feature maps + gate + SSD, kl')."""
    parts = (["LoRA"] if s2["lora"]["enabled"] else []) + [
        name for name, on in (("feature maps", s2["train_feature_maps"]), ("gate", s2["train_mixing"]))
        if on and not s2["lora"]["enabled"]]
    what = " + ".join(parts + (["SSD"] if s2["ssd"]["enabled"] else []))
    return what if s2["objective"] == "lm" else f"{what}, {s2['objective']}"


def base_lora_stage(s2: dict) -> dict:
    """A recipe's stage 2 as the base model's own LoRA fine-tuning runs it (what a user would run instead): the same
    rows and LoRA settings, the adapters on also where the conversion trains none (a self-distillation stage 2), and
    the next-token loss (a distillation loss has no teacher but the base itself); nothing of the conversion."""
    return {**s2, "ssd": {**s2["ssd"], "enabled": False}, "train_feature_maps": False, "train_mixing": False,
            "lora": {**s2["lora"], "enabled": True}, "objective": "lm"}


def anchor_ratios(rows: list[dict]) -> None:
    """In place: `cost_vs_base_lora` on every measured training row, against the anchor of its first recipe."""
    anchors = [row for row in rows if row["stage"] == "anchor" and "tokens_per_s" in row]
    for row in rows:
        if row["stage"] not in ("stage1", "stage2", "anchor") or "tokens_per_s" not in row:
            continue
        anchor = next((a for a in anchors if row["recipes"][0] in a["recipes"]), None)
        if anchor is not None:
            row["cost_vs_base_lora"] = anchor["tokens_per_s"] / row["tokens_per_s"]


def _eval_row(model, mode: str, batch: torch.Tensor, chunk: int, acc, steps: int, warmup: int) -> dict:
    model.eval()

    def forward(_):
        with torch.no_grad(), acc.autocast():
            lm_loss_sum(model, batch, chunk=chunk)

    with components(model, mode) if mode != "base" else nullcontext():
        _timed(forward, range(warmup), acc.device)
        seconds = _timed(forward, range(steps), acc.device)
    return {"batch_size": batch.shape[0], "grad_accum": 1, "seq_len": batch.shape[1], **_timing(seconds, batch.numel())}


def _train_row(model, name: str, stage: dict, params: dict, loss_fn, *, seq_len: int, seed: int, acc, steps: int,
               warmup: int) -> dict:
    spec = loop.LoopSpec.from_recipe(name, {**stage, "epochs": 1, "max_steps": None}, seed)
    vocab = model.get_input_embeddings().num_embeddings
    data = _random_rows(vocab, (warmup + steps) * spec.rows_per_step, seq_len, seed)
    # only train_step runs: no checkpoint, log, validation or progress bar is ever written
    trainer = loop.Trainer(model=model, params=params, data=data, loss_fn=loss_fn, spec=spec, ckpt_dir=os.devnull,
                           accelerator=acc, log=loop.JsonlLog(None), show_progress=False)
    _timed(trainer.train_step, range(warmup), acc.device)
    before = {n: p.detach().clone() for n, p in params.items()}
    infos = []
    seconds = _timed(lambda i: infos.append(trainer.train_step(i)[1]), range(warmup, warmup + steps), acc.device)
    row = {"batch_size": spec.batch_size, "grad_accum": spec.grad_accum, "seq_len": seq_len,
           **_timing(seconds, spec.rows_per_step * seq_len),
           "trainable_params": sum(p.numel() for p in params.values()),
           # > 0 shows the timed steps really updated the weights
           "max_param_change": max(float((p.detach() - before[n]).abs().max()) for n, p in params.items())}
    if "swa_dropped" in infos[0]:
        row["swa_dropped"] = statistics.mean(i["swa_dropped"] for i in infos)
    return row


def measure(model, recipes=("lolcats", "ssd", "hedgecats"), *, preset: str | None = None, overrides=(),
            steps: int | None = None, warmup: int | None = None, seq_len: int | None = None,
            batch_size: int | None = None, show_progress: bool = True) -> dict:
    """Measure the rows of :func:`plan`; returns {model, preset, device, load_seconds, convert_seconds, rows, ...}.

    `model`: a short name / HF directory / .gguf path (loaded with `load_base`, timed) or a causal LM object.
    `preset` defaults to gpu-small on a GPU and cpu otherwise; `seq_len` / `batch_size` override the preset's
    ``data.seq_len`` and both stages' ``batch_size``; `overrides` are ``--set`` strings applied to every recipe.
    `steps` / `warmup` default to 10 / 2 on a GPU and 3 / 1 on a CPU (where a Gemma 3 270M stage-2 step takes
    seconds: its 262k-entry LM head dominates).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm


    preset = preset or ("gpu-small" if torch.cuda.is_available() else "cpu")
    sizes = [f"data.seq_len={seq_len}"] * bool(seq_len)
    sizes += [f"stage1.batch_size={batch_size}", f"stage2.batch_size={batch_size}"] * bool(batch_size)
    resolved = {name: load_recipe(name, [*sizes, *overrides], preset) for name in recipes}
    runtimes = {_cost_key({k: r["runtime"][k] for k in ("cpu", "mixed_precision", "dtype")}) for r in resolved.values()}
    if len(runtimes) > 1:
        raise LinearizeError(f"the recipes ask for different runtimes {sorted(runtimes)}; one device and precision per run")
    rt = next(iter(resolved.values()))["runtime"]
    acc = Accelerator(cpu=bool(rt["cpu"]), mixed_precision=rt["mixed_precision"])
    gpu = acc.device.type == "cuda"
    steps = (10 if gpu else 3) if steps is None else steps
    warmup = (2 if gpu else 1) if warmup is None else warmup
    if steps < 1 or warmup < 0:
        raise LinearizeError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    rows = plan(resolved)
    res = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__, "preset": preset,
           "torch_device": str(acc.device), "mixed_precision": rt["mixed_precision"], "dtype": rt["dtype"], "data": DATA,
           "steps": steps, "warmup": warmup, "recipes": resolved, "convert_seconds": {}, "rows": rows}
    bar = tqdm(total=len(rows), unit="stage", disable=not show_progress, dynamic_ncols=True)

    def measured(row: dict, fn, *args, **kwargs) -> None:
        bar.set_description(f"{row['recipes'][0]} {row['stage']} {row['what']}")
        _reset_peak(acc.device)
        try:
            row.update(fn(*args, **kwargs))
        except (torch.OutOfMemoryError, DoesNotFitError, TrainingDivergedError) as exc:  # recorded; the other rows run
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["peak_mib"] = _peak_mib(acc.device)
        bar.update(1)

    t0 = time.perf_counter()
    if isinstance(model, str) and model.startswith(RANDOM_SHAPE):  # throughput does not depend on the weights
        cfg, cls = decode_shape(model.removeprefix(RANDOM_SHAPE))
        torch.manual_seed(int(next(iter(resolved.values()))["seed"]))
        base = cls(cfg).to(device=acc.device, dtype=getattr(torch, rt["dtype"]))
    elif isinstance(model, (str, Path)):
        base, _ = load_base(str(model), dtype=getattr(torch, rt["dtype"]), device=acc.device, check=False)
    else:
        base = model.to(acc.device)
    _sync(acc.device)
    res["load_seconds"] = time.perf_counter() - t0
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = base.get_input_embeddings().num_embeddings

    def eval_batch(r: dict) -> torch.Tensor:
        return _random_rows(vocab, r["stage1"]["batch_size"], r["data"]["seq_len"], r["seed"]).to(acc.device)

    for row in (row for row in rows if row["what"] == "base"):
        r = resolved[row["recipes"][0]]
        measured(row, _eval_row, base, "base", eval_batch(r), int(r["stage2"]["loss_chunk"]), acc, steps, warmup)
    for row in (row for row in rows if row["stage"] == "anchor"):
        r = resolved[row["recipes"][0]]
        seed = int(r["seed"])
        loop.seed_everything(seed + 3)
        tuned = copy.deepcopy(base)  # LoRA goes into a copy: the base stays clean for the conversions
        s2 = base_lora_stage(r["stage2"])
        _, params, _, loss_fn = stage2_parts(tuned, s2, seed)
        measured(row, _train_row, tuned, "stage2", s2, params, loss_fn, seq_len=int(r["data"]["seq_len"]), seed=seed,
                 acc=acc, steps=steps, warmup=warmup)
        del tuned, params, loss_fn
        if gpu:
            torch.cuda.empty_cache()
    base.to("cpu")  # copied to the device per recipe: one model there at a time, as in a real run
    for name, r in resolved.items():
        mine = [row for row in rows if row["recipes"][0] == name and row["what"] != "base" and row["stage"] != "anchor"]
        if not mine:
            continue
        seed, seq = int(r["seed"]), int(r["data"]["seq_len"])
        loop.seed_everything(seed + 1)
        converted = copy.deepcopy(base).to(acc.device)
        _sync(acc.device)
        t0 = time.perf_counter()
        convert(converted, HybridConfig.from_dict(dict(r["hybrid"])))
        converted.to(acc.device)
        _sync(acc.device)
        res["convert_seconds"][name] = time.perf_counter() - t0
        timing = {"seq_len": seq, "seed": seed, "acc": acc, "steps": steps, "warmup": warmup}
        for row in mine:
            if row["stage"] == "eval":
                measured(row, _eval_row, converted, row["what"], eval_batch(r), int(r["stage2"]["loss_chunk"]), acc,
                         steps, warmup)
            elif row["stage"] == "stage1":
                loop.seed_everything(seed + 2)
                params, xfer, loss_fn = stage1_parts(converted, r["stage1"])
                with xfer:
                    measured(row, _train_row, converted, "stage1", r["stage1"], params, loss_fn, **timing)
                for p in params.values():
                    p.requires_grad_(False)
            else:
                loop.seed_everything(seed + 3)
                _, params, _, loss_fn = stage2_parts(converted, r["stage2"], seed)
                measured(row, _train_row, converted, "stage2", r["stage2"], params, loss_fn, **timing)
        del converted
        if gpu:
            torch.cuda.empty_cache()
    bar.close()
    for row in rows:
        del row["key"]
    anchor_ratios(rows)
    if fla_route.DECISIONS:  # which kernels trained the linear states where fla refused its backward
        res["fla_backward"] = dict(fla_route.DECISIONS)
    return res


def environment(commit: str | None, argv, device: torch.device) -> dict:
    """Device, versions, commit and command: the layer benchmark's record on a GPU (it reads the GPU's properties),
    the same keys on a CPU."""
    if device.type == "cuda":
        return gpu_environment(commit, argv)
    import transformers

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    return {"device": f"{name} ({os.cpu_count()} cores)", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "command": "linearize bench " + " ".join(argv), "git_commit": commit or git_commit()["commit"] or "unknown"}


def render_markdown(res: dict) -> str:
    env = res["environment"]
    memory = "peak GPU MiB" if res["torch_device"].startswith("cuda") else "peak RSS MiB"
    convert = ", ".join(f"{k} {v:.2f} s" for k, v in res["convert_seconds"].items())
    lines = [(f"Conversion throughput of `{res['model']}` on **{env['device']}**, torch {env['torch']}, transformers "
              f"{env.get('transformers')}, commit `{env['git_commit'][:12]}`; command `{env['command']}`."), "",
             (f"Preset `{res['preset']}`, {res['dtype']} weights, mixed precision `{res['mixed_precision']}`; "
              f"{res['steps']} timed steps after {res['warmup']} warm-up steps per row; data: {res['data']}. "
              f"Load {res['load_seconds']:.2f} s; convert: {convert or '—'}."), "",
             ("`anchor` = the base model's own LoRA step (the recipe's stage-2 LoRA, rows and length; no conversion); "
              "× base LoRA = its tokens/s over the row's (the cost of a token; stage 2 goal <= 1.25)."), "",
             *([("Where flash-linear-attention refuses its gated backward (its issue 640), the linear states trained on: "
                 + "; ".join(f"{k}: {v}" for k, v in res["fla_backward"].items()) + "."), ""]
               if res.get("fla_backward") else []),
             f"| stage | what | recipes | rows/step × length | tokens/s | × base LoRA | s/step (median) | {memory} |",
             "|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        head = f"| {row['stage']} | {row['what']} | {', '.join(row['recipes'])} |"
        if "error" in row:
            lines.append(f"{head} | {row['error'][:60]} | | | |")
            continue
        peak = "—" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        ratio = f"{row['cost_vs_base_lora']:.2f}" if "cost_vs_base_lora" in row else "—"
        lines.append(f"{head} {row['batch_size'] * row['grad_accum']} × {row['seq_len']} | {row['tokens_per_s']:.0f} | "
                     f"{ratio} | {row['median_step_s']:.4f} | {peak} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, argv) -> dict:
    """`linearize bench --conversion`: measure, then write <out-dir>/<name>.json and .md and print the table."""
    res = measure(args.model, [r for r in args.recipes.split(",") if r], preset=args.preset, overrides=args.overrides,
                  steps=args.steps, warmup=args.warmup, seq_len=args.seq_len, batch_size=args.batch_size,
                  show_progress=not args.no_progress)
    res = {**benchmark_header(environment(args.commit, argv, torch.device(res["torch_device"]))), **res}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    md = render_markdown(res)
    (out_dir / f"{args.name}.md").write_text(md)
    print(md, flush=True)
    print(f"wrote {path}", flush=True)
    return res
