"""Component diagnostics: the paper's Table 1 for one converted model (arXiv 2510.05901, §3.2).

The benchmarks are run with every component mode of the converted layers switched on alone
(``hybrid`` = SWA + LA, ``swa_only``, ``la_only``, ``sinks_only``, ``none``) and, when the base model is
known, on the base model too. The table gives each benchmark's headline metric, the average,

* **recovery** ``score / base`` (the paper's "Rec. Perf."), and
* **recovery above the floor** ``(score − none) / (base − none)``: how much of the gap between a
  model with no attention at all and the base model a mode closes. Small models sit near chance on
  several benchmarks, where plain recovery flatters every mode; this one does not (it is 0 for
  ``none`` by construction and undefined, shown as "–", when base ≈ none).

It also reports, per benchmark, the distribution of prompt lengths in tokens against the window:
the share of questions whose whole prompt fits in the sliding window, i.e. that ``swa_only`` sees
completely (for such questions a complementary LA branch has no keys at all in ``hybrid`` mode).

``limit`` is the number of questions per benchmark (for MMLU spread over its 57 subjects, see
:func:`linearize.evaluate.harness.evaluate`).

A base model (short name or HF directory) is converted with an *untrained* feature map first
(``window`` default 64): the table then shows what the bare hybrid layer does before any training.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from linearize.config import COMPONENT_MODES, MODES, HybridConfig
from linearize.evaluate.harness import TASKS, context_lengths, default_data_dir, evaluate, headline_metric
from linearize.evaluate.lm_eval_model import load_model
from linearize.models.convert import components, convert, hybrid_config_of, is_converted, text_config
from linearize.records import fmt_pct, markdown_table, write_json_with_provenance

__all__ = ["diagnose", "recovery", "diagnose_markdown", "PAPER_LABELS"]

#: Row names of the paper's Table 1: the base model's, then each mode's entry's.
PAPER_LABELS = {"base": "Base model", **{name: mode.paper_label for name, mode in MODES.items()}}


def _load_partial(path, settings: str) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    return data["runs"] if data.get("settings") == settings else {}


def recovery(score: float | None, base: float | None, none: float | None) -> dict[str, float | None]:
    """``{"recovery": score/base, "above_floor": (score-none)/(base-none)}`` (None where undefined)."""
    rec = score / base if score is not None and base else None
    floor = None
    if score is not None and base is not None and none is not None and abs(base - none) > 1e-9:
        floor = (score - none) / (base - none)
    return {"recovery": rec, "above_floor": floor}


def _length_stats(tokenizer, task, data_dir, limit, windows: dict[str, int]) -> dict[str, Any]:
    stats = context_lengths(tokenizer, task, data_dir, limit)
    arr = np.asarray(stats["lengths"])
    stats["fits"] = {name: float((arr <= w).mean()) for name, w in windows.items() if w}
    stats["windows"] = windows
    stats["histogram"] = _histogram(arr, [w for w in windows.values() if w])
    return stats


def _histogram(lengths: np.ndarray, marks: list[int]) -> dict[str, int]:
    edges = sorted({0, 32, 64, 128, 256, 512, 1024, 2048, 4096, *marks})
    out = {}
    for lo, hi in zip(edges, edges[1:] + [None]):
        sel = (lengths > lo) & (lengths <= hi) if hi is not None else lengths > lo
        if sel.any():
            out[f"{lo + 1}-{hi}" if hi is not None else f">{lo}"] = int(sel.sum())
    return out


def diagnose(
    model,
    tokenizer=None,
    *,
    tasks=TASKS,
    limit: int | float | None = None,
    modes=COMPONENT_MODES,
    base=None,
    window: int | None = None,
    batch_size: int | str = 8,
    data_dir=None,
    device: str | None = None,
    seed: int = 1234,
    bootstrap: int = 1000,
    max_length: int | None = None,
    check: bool = True,
    dtype=None,
    partial: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmarks per component mode, recoveries and context lengths: ``{"info", "runs", "table", "lengths", "seconds"}``.

    Args:
        model: a converted model directory, a base model name/directory (converted here with an
            untrained feature map of window ``window``), or a loaded model (then pass ``tokenizer``;
            a loaded base model is converted in place after its base run).
        base: the base model to compare with (name/dir or a ``(model, tokenizer)`` pair, or its
            harness report from an earlier run with the same tasks and limit); default: the one
            recorded in the converted directory's ``summary.json``, or ``model`` itself when it is a
            base model. ``False``: no base run.
        dtype: the torch dtype models given by name are loaded in (default float32).
        partial: a JSON file that keeps each finished run (base, modes) as soon as it ends; a call with
            the same benchmark settings skips what it holds, so an interrupted diagnosis resumes.
        Others as in :func:`linearize.evaluate.harness.evaluate`.
    """
    say = progress or (lambda _msg: None)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    tasks = [t[3:] if t.startswith("lz_") else t for t in tasks]
    kwargs = dict(limit=limit, batch_size=batch_size, data_dir=data_dir, seed=seed, bootstrap=bootstrap,
                  max_length=max_length)
    runs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    settings = json.dumps({"tasks": tasks, "limit": limit, "seed": seed, "bootstrap": bootstrap, "max_length": max_length})
    done = _load_partial(partial, settings)

    def timed(label, fn):
        if label in done:
            runs[label], seconds[label] = done[label]["report"], done[label]["seconds"]
            say(f"[diagnose] {label}: average {100 * runs[label]['average']['value']:.2f} (from {partial})")
            return
        t = time.perf_counter()
        say(f"[diagnose] {label} ...")
        runs[label] = fn()
        seconds[label] = time.perf_counter() - t
        avg = runs[label]["average"]["value"]
        say(f"[diagnose] {label}: average {100 * avg:.2f} ({seconds[label]:.0f} s)")
        if partial is not None:
            done[label] = {"report": runs[label], "seconds": seconds[label]}
            write_json_with_provenance(partial, {"settings": settings, "runs": done}, str(model.device))

    import torch

    dtype = dtype or torch.float32
    model, tokenizer, info = load_model(model, tokenizer=tokenizer, device=device, check=check, seed=seed, dtype=dtype)
    seconds["load"] = time.perf_counter() - t0
    if not is_converted(model):
        if base is not False:
            timed("base", lambda: evaluate(model, tokenizer, tasks, **kwargs))
        torch.manual_seed(seed)
        convert(model, HybridConfig() if window is None else HybridConfig(window=window))
        model.eval()
        info.update(kind="converted_untrained", hybrid=hybrid_config_of(model).to_dict(),
                    base=info.get("base") or info.get("model"))
    elif base is not False and (base is not None or info.get("base")):
        spec = base if base is not None else info["base"]
        if isinstance(spec, dict):  # a report computed before
            runs["base"], seconds["base"] = spec, 0.0
        elif "base" in done:
            timed("base", None)
        else:
            if isinstance(spec, tuple):
                bmodel, btok = spec
                info["base"] = getattr(bmodel.config, "_name_or_path", "given")
            else:
                bmodel, btok, _ = load_model(spec, device=str(model.device), check=check, dtype=dtype)
                info["base"] = str(spec)
            timed("base", lambda: evaluate(bmodel, btok, tasks, **kwargs))
            del bmodel
            gc.collect()
    for mode in modes:
        with components(model, mode):
            timed(mode, lambda: evaluate(model, tokenizer, tasks, **kwargs))

    hybrid = hybrid_config_of(model)
    windows = {"window": hybrid.window}
    base_window = getattr(text_config(model), "sliding_window", None)
    if base_window:
        windows["base_sliding_window"] = int(base_window)
    t = time.perf_counter()
    lengths = {task: _length_stats(tokenizer, task, data_dir, limit, windows) for task in tasks}
    seconds["context_lengths"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return {"info": info, "runs": runs, "table": table(runs, tasks), "lengths": lengths, "seconds": seconds,
            "window": hybrid.window, "device": str(model.device)}


def table(runs: dict[str, Any], tasks) -> dict[str, Any]:
    """Per row (run): each task's headline score, the average and both recoveries (overall and per task)."""
    out: dict[str, Any] = {}
    base, none = runs.get("base"), runs.get("none")
    for label, rep in runs.items():
        row: dict[str, Any] = {"scores": {}, "recovery": {}, "above_floor": {}}
        for task in tasks + ["average"]:
            score = _headline(rep, task)
            row["scores"][task] = score
            r = recovery(score, _headline(base, task), _headline(none, task))
            row["recovery"][task] = r["recovery"]
            row["above_floor"][task] = r["above_floor"]
        out[label] = row
    return out


def _headline(rep, task):
    if rep is None or task not in rep:
        return None
    if task == "average":
        return rep["average"]["value"]
    return rep[task][rep[task].get("headline_metric") or headline_metric(task)]


def diagnose_markdown(record: dict[str, Any]) -> str:
    """The Table-1-style table and the context-length table of a diagnose record."""
    meta = record.get("meta", {})
    tasks = [t for t in record["lengths"]] or [t for t in next(iter(record["runs"].values())) if t != "average"]
    runs, rows_t = record["runs"], record["table"]
    first = next(iter(runs.values()))
    header = ["Active attention"] + [f"{t} ({first[t]['headline_metric']})" for t in tasks] + ["AVG", "Rec. %", "Rec. above floor %"]
    rows = []
    for label, row in rows_t.items():
        rows.append([PAPER_LABELS.get(label, label) + f" (`{label}`)"]
                    + [fmt_pct(row["scores"][t]) for t in tasks]
                    + [fmt_pct(row["scores"]["average"]), fmt_pct(row["recovery"]["average"]),
                       fmt_pct(row["above_floor"]["average"])])
    w = record.get("window")
    windows = next(iter(record["lengths"].values()))["windows"] if record["lengths"] else {}
    lh = ["benchmark", "shots", "n", "min", "median", "p90", "max"] + [f"fits {k} ({v})" for k, v in windows.items()]
    lrows = []
    for t, s in record["lengths"].items():
        lrows.append([t, s["num_fewshot"], s["n"], s["min"], f"{s['median']:.0f}", f"{s['p90']:.0f}", s["max"]]
                     + [fmt_pct(s["fits"].get(k), 1) + "%" for k in windows])
    n = {t: first[t].get("n") for t in tasks}
    info = record.get("info", {})
    lines = [
        f"# diagnose: {meta.get('model')}",
        "",
        f"{info.get('kind')} · window {w} · base {info.get('base')} · recipe {info.get('recipe')} · "
        f"questions per benchmark {n} · commit {str(meta.get('commit'))[:10]}{' (dirty)' if meta.get('dirty') else ''} · "
        f"device {meta.get('gpu') or meta.get('device')} · seed {meta.get('seed')} · {record['seconds']['total']:.0f} s",
        f"`{meta.get('command')}`",
        "",
        "Scores in % (headline metric per benchmark). Rec. = AVG / base AVG; "
        "Rec. above floor = (AVG − none) / (base − none).",
        "",
        markdown_table(header, rows),
        "",
        "## Prompt lengths (tokens) against the window",
        "",
        "A question *fits* when its longest prompt (context + answer, few-shot examples included) has at most "
        "that many tokens: SWA alone then sees all of it.",
        "",
        markdown_table(lh, lrows),
        "",
        "95% intervals (bootstrap over questions) of each score are in diagnose.json.",
    ]
    return "\n".join(lines) + "\n"
