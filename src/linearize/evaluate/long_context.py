"""Long-context evaluation (`linearize diagnose --what long`): does a conversion beat cutting attention to a window?

Rows (variants), all scored on the same items (:mod:`linearize.evaluate.long_tasks`, scores
:mod:`linearize.evaluate.long_score`):

* ``base``: the base model;
* ``window+sinks w=W s=S``: the base model with the layers a conversion would convert cut to the last W keys plus
  the first S (:mod:`linearize.models.window_sinks`); by default W is matched to the converted model's decode state
  per layer (:func:`linearize.models.memory.matching_window`), more windows with ``baseline_windows``;
* the converted model in each component mode (``hybrid``, ``swa_only``, ``la_only``).

Each row carries its decode memory per sequence at 32k tokens. Scores: bits per byte of the gold continuation and
greedy exact answers per task and length, per-position loss bands, bootstrap 95% intervals over items, and paired
differences (same items) for hybrid - swa_only and each converted mode - each baseline.

Why a scorer of our own rather than lm-eval: the comparison needs per-item scores shared between variants (for the
paired bootstrap), component modes and a baseline switched on one loaded model, vocabulary logits only at the gold
continuation after prompts of up to 32k tokens (lm-eval's log-softmax over every position of a 262k vocabulary
would not fit), and bits per byte of a continuation, which lm-eval's loglikelihood requests do not report per item.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from linearize.config import MEMORY_REREAD, HybridConfig
from linearize.errors import LinearizeError
from linearize.evaluate.lm_eval_model import load_model
from linearize.evaluate.long_score import bootstrap, paired, score_items
from linearize.evaluate.long_tasks import LONG_QA, READING, RETRIEVAL, TASKS, build_items
from linearize.evaluate.probes import long_document_batch, position_losses
from linearize.models.convert import components, hybrid_config_of, is_converted, text_config
from linearize.models.memory import decode_state_bytes, matching_window
from linearize.models.window_sinks import query_memory_baseline, target_layers, window_sinks
from linearize.records import fmt_pct, markdown_table, save_figure

__all__ = ["run_long", "long_markdown", "plot_retrieval", "plot_bpb", "summarize", "training_seq_len",
           "merge_long_records", "overview_markdown", "DEFAULT_TASKS", "MEMORY_CONTEXT"]

DEFAULT_TASKS = READING + RETRIEVAL + LONG_QA
MEMORY_CONTEXT = 32768
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_QA_LENGTHS = (4096, 8192, 16384, 32768)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def training_seq_len(model_dir) -> int | None:
    """The length of the training rows of a converted model directory (its resolved ``recipe.yaml``), if recorded."""
    path = Path(str(model_dir)) / "recipe.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        return int(yaml.safe_load(path.read_text())["data"]["seq_len"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _dtype_bytes(model) -> int:
    return next(model.parameters()).element_size()


def _position_bands(model, ids: torch.Tensor, window: int, train_len: int | None) -> dict[str, Any]:
    """Mean next-token loss per band of positions: inside the window, window..training length, beyond, in doublings."""
    loss = position_losses(model, ids).mean(0)
    n = loss.shape[0]
    edges = sorted({0, window, *([train_len] if train_len else []), *[2 ** k for k in range(10, 17)], n})
    edges = [e for e in edges if e <= n]
    return {f"{a}-{b}": float(loss[a:b].mean()) for a, b in zip(edges, edges[1:]) if b > a}


def summarize(items, scores: dict[str, list[dict[str, Any]]], *, reps: int = 1000, seed: int = 0,
              pairs: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """Per (task, length) cell and variant: bits per byte, greedy exact, EM/F1 (when generated), intervals;
    retrieval accuracy by length x depth; paired differences."""
    cells: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        cells.setdefault((it.task, it.length), []).append(i)
    table = []
    for (task, length), idx in cells.items():
        row: dict[str, Any] = {"task": task, "length": length, "n": len(idx), "variants": {}}
        for name, sc in scores.items():
            s = [sc[i] for i in idx]
            entry = {"bpb": bootstrap([x["bits"] for x in s], weights=[x["bytes"] for x in s], reps=reps, seed=seed),
                     "greedy_exact": bootstrap([x["greedy_exact"] for x in s], reps=reps, seed=seed)}
            for metric in ("exact_match", "f1"):
                if all(metric in x for x in s):
                    entry[metric] = bootstrap([x[metric] for x in s], reps=reps, seed=seed)
            row["variants"][name] = entry
        row["paired"] = {}
        for a, b in pairs:
            if a in scores and b in scores:
                sa, sb = [scores[a][i] for i in idx], [scores[b][i] for i in idx]
                row["paired"][f"{a} - {b}"] = {
                    "bpb": paired([x["bits"] for x in sa], [x["bits"] for x in sb], weights=[x["bytes"] for x in sa],
                                  reps=reps, seed=seed),
                    "greedy_exact": paired([x["greedy_exact"] for x in sa], [x["greedy_exact"] for x in sb],
                                           reps=reps, seed=seed)}
        table.append(row)
    heat: dict[str, dict[str, dict[str, float]]] = {}
    for name, sc in scores.items():
        grid: dict[tuple, list[float]] = {}
        for i, it in enumerate(items):
            if it.task in RETRIEVAL:
                grid.setdefault((it.length, it.depth), []).append(sc[i]["greedy_exact"])
        heat[name] = {f"{n}@{d}": sum(v) / len(v) for (n, d), v in sorted(grid.items())}
    return {"cells": table, "retrieval_grid": heat}


def run_long(model, tokenizer, *, base=None, modes=("hybrid", "swa_only", "la_only"), tasks=DEFAULT_TASKS,
             limit: int = 20, cell_limit: int | None = None, lengths=DEFAULT_LENGTHS, qa_lengths=DEFAULT_QA_LENGTHS, depths=DEFAULT_DEPTHS,
             sinks: int = 8, baseline_windows=("auto",), layers=None, window: int | None = None,
             generate: bool = False, max_new_tokens: int = 32, batch_tokens: int = 16384, position_docs: int = 2,
             position_len: int | None = None, train_len: int | None = None, reps: int = 1000, seed: int = 0,
             check: bool = True, data_dir=None, base_row: bool = True, memory_baselines=(), memory_reread: int = MEMORY_REREAD,
             memory_fill: bool = True, memory_prefill: str = "none",
             progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """The record body of `linearize diagnose --what long` (see the module doc).

    ``model``: a converted model (its base is loaded from ``base``, a spec, or skipped when None) or a base model
    (then only the base and the baselines, for a conversion of ``layers`` with window ``window``). ``baseline_windows``:
    'auto' (matched to the decode state), a dict of HybridConfig changes (matched to the state of the conversion with
    them: ``{"sparse_memory": 2048}`` counts a memory's keys too) and/or ints. ``base_row`` False: a base model's
    baselines without the base itself (more baselines for a record that has it). ``memory_baselines``: the base with
    a window of ``window`` (the conversion's) + sinks + a memory chosen by the prompt's queries, softmax alone
    (:func:`linearize.models.window_sinks.query_memory_baseline`); each entry the memory's keys, or 'auto' / a dict
    of HybridConfig changes as in ``baseline_windows`` (then the memory fills the keys of that matched cut beyond the
    window; ``memory_reread``: the prompt's last tokens they read again against it; ``memory_fill``: the keys leaving
    the window later take its free slots, HybridConfig.memory_fill; ``memory_prefill``: 'recall' reads the prompt
    before them with the online recall memory, HybridConfig.memory_prefill). ``train_len``: training row
    length, marked in the output.
    """
    say = progress or (lambda _m: None)
    converted = is_converted(model)
    hybrid = hybrid_config_of(model) if converted else HybridConfig(window=window or 64, layers=layers or "global")
    config = text_config(model)
    dbytes = _dtype_bytes(model)
    t0 = time.perf_counter()
    items = build_items(tokenizer, list(tasks), limit=limit, lengths=list(lengths), qa_lengths=list(qa_lengths),
                        depths=list(depths), seed=seed, data_dir=data_dir, cell_limit=cell_limit, progress=say)
    if not items:
        raise LinearizeError("no long-context items: check --long-tasks and --limit")
    say(f"[long] {len(items)} prompts, longest {max(len(i.context) for i in items)} tokens ({time.perf_counter() - t0:.0f} s)")
    pos_len = (position_len or max([*lengths, *qa_lengths])) if position_docs else 0
    pos_ids = long_document_batch(tokenizer, num_docs=position_docs, seq_len=pos_len, data_dir=data_dir) if position_docs else None

    def matched(w):  # 'auto' or a dict of changes: the window of a converted layer's state (with those changes)
        if w == "auto" or isinstance(w, dict):
            return matching_window(config, dataclasses.replace(hybrid, **(w if isinstance(w, dict) else {})),
                                   sinks=sinks, dtype_bytes=dbytes)
        return int(w)

    windows = []
    for w in map(matched, baseline_windows):
        if w not in windows:
            windows.append(w)
    memories = []
    for m in memory_baselines:
        m = matched(m) - hybrid.window if (m == "auto" or isinstance(m, dict)) else int(m)  # keys beyond the window
        if m < 1:
            raise LinearizeError(f"memory baseline {m}: the matched state holds no keys beyond the window {hybrid.window}")
        if m not in memories:
            memories.append(m)
    cut = target_layers(model, hybrid.layers) if not converted else None

    variants: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[dict[str, Any]]] = {}

    def run_variant(name, m, ctx, memory, note):
        t1 = time.perf_counter()
        say(f"[long] {name}: scoring {len(items)} prompts")
        with ctx:
            scores[name] = score_items(m, tokenizer, items, generate=generate, max_new_tokens=max_new_tokens,
                                       batch_tokens=batch_tokens, progress=say)
            bands = _position_bands(m, pos_ids, hybrid.window, train_len) if pos_ids is not None else None
        variants[name] = {"decode_bytes_32k": memory, "note": note, "position_loss": bands,
                          "seconds": time.perf_counter() - t1}
        say(f"[long] {name}: {variants[name]['seconds']:.0f} s")

    def base_rows(bmodel):
        bconf = text_config(bmodel)
        if base_row:
            run_variant("base", bmodel, nullcontext(), decode_state_bytes(bconf, MEMORY_CONTEXT, dtype_bytes=dbytes), "")
        for w in windows:
            mem = decode_state_bytes(bconf, MEMORY_CONTEXT, dtype_bytes=dbytes, window_sinks=(w, sinks), layers=hybrid.layers)
            run_variant(f"window+sinks w={w} s={sinks}", bmodel, window_sinks(bmodel, w, sinks, layers=hybrid.layers),
                        mem, f"softmax over the last {w} + first {sinks} keys on layers {target_layers(bmodel, hybrid.layers)}")
        for m in memories:  # the same keys and values as a cut of window + m
            w = hybrid.window
            mem = decode_state_bytes(bconf, MEMORY_CONTEXT, dtype_bytes=dbytes, window_sinks=(w + m, sinks),
                                     layers=hybrid.layers)
            snap = query_memory_baseline(bmodel, w, sinks, m, layers=hybrid.layers, reread=memory_reread,
                                         fill=memory_fill, prefill=memory_prefill)
            recall = memory_prefill == "recall"
            run_variant(f"window+sinks+memory w={w} s={sinks} m={m}" + (f" r={memory_reread}" if memory_reread > 1 else "")
                        + (" fill" if memory_fill else "") + (" prefill" if recall else ""),
                        snap, nullcontext(), mem,
                        f"softmax over the last {w} + first {sinks} keys and {m} chosen by the prompt's last queries "
                        f"(SnapKV-style, no training; the last {memory_reread} prompt tokens read them"
                        f"{'; later keys fill its free slots' if memory_fill else ''}"
                        f"{'; the prompt before them read with the online recall memory' if recall else ''}) on layers "
                        f"{target_layers(bmodel, hybrid.layers)}")
            del snap

    if not converted:
        base_rows(model)
    else:
        if base is not None:
            say(f"[long] loading the base model {base}")
            bmodel, _, _ = load_model(base, device=str(model.device), dtype=model.dtype, check=check)
            base_rows(bmodel)
            del bmodel
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        mem = decode_state_bytes(config, MEMORY_CONTEXT, dtype_bytes=dbytes, hybrid=hybrid)
        for mode in modes:
            run_variant(mode, model, components(model, mode), mem, f"converted, {mode}")

    names = list(variants)
    baselines = [n for n in names if n.startswith("window+sinks")]
    pairs = [("hybrid", "swa_only")] + [(m, b) for m in modes for b in baselines]
    if not converted:
        pairs = [(b, "base") for b in baselines] if base_row else []
    body = summarize(items, scores, reps=reps, seed=seed, pairs=pairs)
    return {"variants": variants, **body, "pairs": [f"{a} - {b}" for a, b in pairs],
            "settings": {"tasks": list(tasks), "limit": limit, "cell_limit": cell_limit, "lengths": list(lengths), "qa_lengths": list(qa_lengths),
                         "depths": list(depths), "sinks": sinks, "baseline_windows": windows, "memory_baselines": memories,
                         "memory_reread": memory_reread, "memory_fill": memory_fill, "memory_prefill": memory_prefill,
                         "cut_layers": cut,
                         "hybrid": hybrid.to_dict(), "train_len": train_len, "generate": generate,
                         "memory_context": MEMORY_CONTEXT, "dtype_bytes": dbytes, "position_len": pos_len,
                         "position_docs": position_docs},
            "items": [{"qid": it.qid, "task": it.task, "length": it.length, "depth": it.depth,
                       "prompt_tokens": len(it.context), **{n: scores[n][i] for n in names}}
                      for i, it in enumerate(items)]}


def _trained_parent(label: str, records: dict[str, dict[str, Any]], variants: dict, parents: dict) -> str | None:
    """The record of the same trained weights that `label` changes at load (``parents`` names it, or a study variant
    names its run, `meta.trained_run`; otherwise the record of the same model path evaluated in its modes --
    swa_only among them -- with other hybrid settings), or None."""
    rec = records[label]
    meta = rec.get("meta", {})
    if parents.get(label) in records and parents[label] != label:
        return parents[label]
    if meta.get("trained_run") in records and meta["trained_run"] != label:
        return meta["trained_run"]
    if f"{label} swa_only" in variants:  # evaluated in its modes itself: a run, not a change at load
        return None
    for other, orec in records.items():
        if (other != label and f"{other} swa_only" in variants and meta.get("model") is not None
                and orec.get("meta", {}).get("model") == meta.get("model")
                and orec.get("settings", {}).get("hybrid") != rec.get("settings", {}).get("hybrid")):
            return other
    return None


def merge_long_records(records: dict[str, dict[str, Any]], *, reps: int = 1000, seed: int = 0,
                       parents: dict[str, str] | None = None, extra_pairs=()) -> dict[str, Any]:
    """One record from several ``--what long`` records of the same items (same tokenizer, seed and settings): the
    base and its window+sinks rows once (from the records that have them), each converted model's modes as
    ``<label> <mode>``. Intervals and paired differences are computed again over the joined items, so several
    conversions evaluated in separate runs (or on separate machines) are compared exactly as in one run. Records
    that scored more items than the others (more lengths) join over the items every record has; how many each
    left out is in ``meta["items_left_out"]``. A record of a training-free change at load (a study variant, or the
    same model path with other hybrid settings and no modes of its own) is paired with its weights' hybrid and
    swa_only rows (``parents``: label -> the label of its trained weights, where the records do not say it).
    ``extra_pairs``: more (row, row) pairs by merged row name, e.g. ("a hybrid", "b hybrid")."""
    if not records:
        raise LinearizeError("no long-context records to merge")
    # records of fewer lengths (a shorter evaluation of a larger model, say) join over the items all of them scored
    common = set.intersection(*({it["qid"] for it in rec["items"]} for rec in records.values()))
    if not common:
        raise LinearizeError(f"{' + '.join(records)}: no item in common (other tasks, limits or seed)")
    dropped = {label: len(rec["items"]) - len(common) for label, rec in records.items() if len(rec["items"]) > len(common)}
    # joined by qid in the first record's order: a record of other tasks scores its items in another order
    qids = [it["qid"] for it in next(iter(records.values()))["items"] if it["qid"] in common]
    by_qid = {label: {it["qid"]: it for it in rec["items"]} for label, rec in records.items()}
    records = {label: {**rec, "items": [by_qid[label][q] for q in qids]} for label, rec in records.items()}
    first = next(iter(records.values()))
    variants: dict[str, dict[str, Any]] = {}
    columns: dict[str, list[dict[str, Any]]] = {}
    converted_labels = []
    for label, rec in records.items():
        hybrid_modes = [n for n in rec["variants"] if n in ("hybrid", "swa_only", "la_only", "sinks_only", "none")]
        for name, info in rec["variants"].items():
            new = f"{label} {name}" if name in hybrid_modes else name
            if new in variants:
                continue  # the base and its baselines: the same model and items in every record
            variants[new] = {**info, "source": label}
            columns[new] = [it[name] for it in rec["items"]]
        if "hybrid" in hybrid_modes:
            converted_labels.append(label)
    baselines = [n for n in variants if n.startswith("window+sinks")]
    pairs = []
    for label in converted_labels:
        if f"{label} swa_only" in variants:  # a change at load evaluated in hybrid alone has no LA-off row
            pairs.append((f"{label} hybrid", f"{label} swa_only"))
        pairs += [(f"{label} hybrid", b) for b in baselines]
        if "base" in variants:
            pairs.append((f"{label} hybrid", "base"))
    for label in converted_labels:  # a training-free change at load against the same weights without it
        parent = _trained_parent(label, records, variants, parents or {})
        if parent is not None:
            pairs += [(f"{label} hybrid", f"{parent} {mode}") for mode in ("hybrid", "swa_only")
                      if f"{parent} {mode}" in variants]
    if not converted_labels:
        pairs = [(b, "base") for b in baselines if "base" in variants]
    for a, b in extra_pairs:
        missing = [n for n in (a, b) if n not in variants]
        if missing:
            raise LinearizeError(f"pair {a!r} - {b!r}: no row {missing[0]!r} among {sorted(variants)}")
        if (a, b) not in pairs:
            pairs.append((a, b))
    from types import SimpleNamespace

    items = [SimpleNamespace(task=it["task"], length=it["length"], depth=it["depth"]) for it in first["items"]]
    body = summarize(items, {n: [c for c in col] for n, col in columns.items()}, reps=reps, seed=seed, pairs=pairs)
    return {"meta": {**first.get("meta", {}), "model": " + ".join(records), "merged_from": {
                label: {k: rec.get("meta", {}).get(k) for k in ("model", "commit", "dirty", "command", "gpu", "device")}
                for label, rec in records.items()}, "items_left_out": dropped},
            "variants": variants, **body, "pairs": [f"{a} - {b}" for a, b in pairs],
            "settings": {**first["settings"], "train_len": max((r["settings"].get("train_len") or 0) for r in records.values()) or None},
            "items": [{**{k: it[k] for k in ("qid", "task", "length", "depth", "prompt_tokens")},
                       **{n: columns[n][i] for n in columns}} for i, it in enumerate(first["items"])]}


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def overview_markdown(record: dict[str, Any]) -> str:
    """The study-level table: one row per variant; reading comprehension bpb relative to the base, retrieval
    accuracy by prompt length, long-QA bpb by length, decode memory per sequence at 32k."""
    cells = record["cells"]
    names = list(record["variants"])

    def mean_over(rows, name, metric):
        vals = [r["variants"][name][metric]["mean"] for r in rows if r["variants"][name].get(metric, {}).get("mean") is not None]
        return sum(vals) / len(vals) if vals else None

    reading = [c for c in cells if c["task"] in READING]
    retrieval_lengths = sorted({c["length"] for c in cells if c["task"] in RETRIEVAL})
    qa_lengths = sorted({c["length"] for c in cells if c["task"] in LONG_QA})
    base_reading = mean_over(reading, "base", "bpb") if "base" in names and reading else None
    header = ["variant", "decode MiB/seq @32k"]
    if reading:
        header += ["reading bpb (squad/coqa/drop)", "vs base"]
    header += [f"retrieval @{_tokens(L)} %" for L in retrieval_lengths] + [f"long QA bpb @{_tokens(L)}" for L in qa_lengths]
    rows = []
    for n in names:
        row = [n, f"{record['variants'][n]['decode_bytes_32k'] / 2**20:.1f}"]
        if reading:
            r = mean_over(reading, n, "bpb")
            row += [f"{r:.3f}" if r is not None else "–",
                    f"{100 * (r / base_reading - 1):+.1f}%" if r is not None and base_reading else "–"]
        for L in retrieval_lengths:
            acc = mean_over([c for c in cells if c["task"] in RETRIEVAL and c["length"] == L], n, "greedy_exact")
            row.append(fmt_pct(acc, 0) if acc is not None else "–")
        for L in qa_lengths:
            b = mean_over([c for c in cells if c["task"] in LONG_QA and c["length"] == L], n, "bpb")
            row.append(f"{b:.3f}" if b is not None else "–")
        rows.append(row)
    return markdown_table(header, rows) + "\n"


# ----------------------------------------------------------------------------- report


def _cell(stat: dict[str, Any] | None, pct: bool = False, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    f = (lambda x: fmt_pct(x, 0)) if pct else (lambda x: f"{x:.{digits}f}")
    ci = stat.get("ci95")
    return f(stat["mean"]) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def _diff(stat: dict[str, Any] | None, pct: bool = False) -> str:
    if not stat or stat.get("diff") is None:
        return "–"
    f = (lambda x: f"{100 * x:+.0f}") if pct else (lambda x: f"{x:+.3f}")
    ci = stat.get("ci95")
    return f(stat["diff"]) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def _cell_name(row: dict[str, Any], train_len: int | None) -> str:
    if row["length"] is None:
        return row["task"]
    mark = " †" if train_len and row["length"] > train_len else ""
    return f"{row['task']} @{row['length']}{mark}"


def long_markdown(record: dict[str, Any]) -> str:
    meta, st = record.get("meta", {}), record["settings"]
    names = list(record["variants"])
    train_len = st.get("train_len")
    merged = meta.get("merged_from") or {}
    if merged:  # a merged record: each source keeps its own commit and device
        sources = "; ".join(f"{label}: {str(m.get('commit'))[:10]}{' (dirty)' if m.get('dirty') else ''} on "
                            f"{m.get('gpu') or m.get('device')}" for label, m in merged.items())
        provenance = [f"merged from (commit on device): {sources} · seed {meta.get('seed')} · {st['limit']} "
                      f"questions per task/cell", ""]
    else:
        provenance = [f"commit {str(meta.get('commit'))[:10]}{' (dirty)' if meta.get('dirty') else ''} · device "
                      f"{meta.get('gpu') or meta.get('device')} · seed {meta.get('seed')} · {st['limit']} questions "
                      f"per task/cell", f"`{meta.get('command')}`", ""]
    lines = [f"# long context: {meta.get('model')}", "", *provenance]
    rows = [[n, f"{v['decode_bytes_32k'] / 2**20:.2f}", v.get("note", ""), f"{v['seconds']:.0f}"]
            for n, v in record["variants"].items()]
    lines += ["## Rows", "", markdown_table(["variant", f"decode MiB/seq @{st['memory_context']}", "what", "s"], rows), ""]
    if train_len:
        lines += [f"† prompt longer than the training rows ({train_len} tokens).", ""]
    for metric, title, pct in (("bpb", "Bits per byte of the gold continuation (lower is better), 95% CI", False),
                               ("greedy_exact", "Greedy decoding writes the gold answer (%), 95% CI", True),
                               ("exact_match", "Generated answer: exact match (%)", True),
                               ("f1", "Generated answer: token F1 (%)", True)):
        table = [[_cell_name(r, train_len)] + [_cell(r["variants"][n].get(metric), pct) for n in names]
                 for r in record["cells"] if any(metric in r["variants"][n] for n in names)]
        if table:
            lines += [f"## {title}", "", markdown_table(["task"] + names, table), ""]
    pairs = record.get("pairs", [])
    if pairs:
        table = [[_cell_name(r, train_len)] + [f"{_diff(r['paired'].get(p, {}).get('bpb'))} / "
                                               f"{_diff(r['paired'].get(p, {}).get('greedy_exact'), True)}" for p in pairs]
                 for r in record["cells"]]
        lines += ["## Paired differences on the same items: bpb / greedy exact (points), mean [95% CI]", "",
                  "Negative bpb = the first variant reads the prompt better.", "",
                  markdown_table(["task"] + pairs, table), ""]
    grid = record.get("retrieval_grid", {})
    if any(grid.values()):
        cols = sorted({k for g in grid.values() for k in g}, key=lambda k: (int(k.split("@")[0]), float(k.split("@")[1])))
        lengths = sorted({int(k.split("@")[0]) for k in cols})
        table = []
        for n, g in grid.items():
            by_len = [[v for k, v in g.items() if int(k.split("@")[0]) == L] for L in lengths]
            table.append([n] + [fmt_pct(sum(v) / len(v), 0) if v else "–" for v in by_len])
        lines += ["## Retrieval accuracy by length (%, mean over depths and retrieval tasks)", "",
                  markdown_table(["variant"] + [f"{L}{' †' if train_len and L > train_len else ''}" for L in lengths], table),
                  "", "Heatmap: long_retrieval.png; bpb bars: long_bpb.png", ""]
    bands = {n: v["position_loss"] for n, v in record["variants"].items() if v.get("position_loss")}
    if bands:
        keys = list(next(iter(bands.values())))
        lines += [f"## Per-position loss (nats), bands of positions (window {st['hybrid']['window']}"
                  + (f", training rows {train_len}" if train_len else "") + ")", "",
                  markdown_table(["variant"] + keys, [[n] + [f"{b.get(k, math.nan):.3f}" for k in keys] for n, b in bands.items()]), ""]
    return "\n".join(lines) + "\n"


def plot_retrieval(record: dict[str, Any], path) -> Path | None:
    """Accuracy by length x depth, one panel per variant (retrieval tasks pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = {n: g for n, g in record.get("retrieval_grid", {}).items() if g}
    if not grid:
        return None
    keys = next(iter(grid.values())).keys()
    lengths = sorted({int(k.split("@")[0]) for k in keys})
    depths = sorted({float(k.split("@")[1]) for k in keys})
    fig, axes = plt.subplots(1, len(grid), figsize=(2.2 * len(grid) + 1, 2.6), squeeze=False, layout="constrained")
    for ax, (name, g) in zip(axes[0], grid.items()):
        arr = np.array([[g.get(f"{L}@{d}", np.nan) for L in lengths] for d in depths])
        im = ax.imshow(arr, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" if L >= 1024 else str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("prompt tokens", fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    return save_figure(fig, path)


def plot_bpb(record: dict[str, Any], path) -> Path:
    """Bits per byte per task cell, one bar per variant, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = record["cells"]
    names = list(record["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cells) * max(1, len(names)) / 2), 3.6))
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        means = [c["variants"][n]["bpb"]["mean"] or np.nan for c in cells]
        lo = [m - (c["variants"][n]["bpb"]["ci95"] or [m, m])[0] for m, c in zip(means, cells)]
        hi = [(c["variants"][n]["bpb"]["ci95"] or [m, m])[1] - m for m, c in zip(means, cells)]
        ax.bar(np.arange(len(cells)) + j * width, means, width, yerr=[lo, hi], label=n, capsize=2)
    ax.set_xticks(np.arange(len(cells)) + 0.4 - width / 2,
                  [_cell_name(c, record["settings"].get("train_len")) for c in cells], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("bits per byte of the gold answer")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_merged_long(records: dict[str, dict[str, Any]], out, *, parents: dict[str, str] | None = None,
                      extra_pairs=()) -> str:
    """Merge ``records`` (label -> ``--what long`` record, see :func:`merge_long_records`) and write ``out/long.json``,
    ``long.md`` (the overview table first) and the figures; returns the Markdown."""
    from linearize.records import write_record

    out = Path(out)
    merged = merge_long_records(records, parents=parents, extra_pairs=extra_pairs)
    md = "## Overview\n\n" + overview_markdown(merged) + "\n" + long_markdown(merged)
    write_record(out, "long", merged, md)
    plot_bpb(merged, out / "long_bpb.png")
    plot_retrieval(merged, out / "long_retrieval.png")
    return md
