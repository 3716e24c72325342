"""Zero/few-shot benchmarks through lm-eval, fully offline, on local JSONL data.

The tasks are lm-eval's own (prompts, choices, targets, preprocessing, metrics): see
:mod:`linearize.evaluate.tasks`, which generates ``lz_*`` task configs pointing at the
local files. :func:`evaluate` runs them with ``lm_eval.simple_evaluate`` on an in-memory
model and adds bootstrap 95% intervals computed from the logged per-question scores.

Benchmark names (``tasks=``): ``piqa``, ``arc_easy``, ``arc_challenge``, ``hellaswag``,
``winogrande`` (0-shot) and ``mmlu`` (5-shot, 57 subjects); ``mmlu_<subject>`` (e.g.
``mmlu_anatomy``) and ``mmlu_<category>`` (``stem``, ``other``, ``social_sciences``,
``humanities``) select part of MMLU.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from linearize.data_dir import DATA_ENV, default_data_dir
from linearize.errors import LinearizeError
from linearize.evaluate.tasks import (
    BENCHMARKS,
    MMLU_CATEGORIES,
    DataNotFoundError,
    check_data,
    mmlu_subjects,
    task_manager,
    task_name,
)

__all__ = [
    "TASKS",
    "HEADLINE_METRICS",
    "DATA_ENV",
    "DataNotFoundError",
    "default_data_dir",
    "headline_metric",
    "evaluate",
    "context_lengths",
]

log = logging.getLogger(__name__)

#: The standard benchmarks, in reporting order (the entries of `tasks.BENCHMARKS`).
TASKS = tuple(BENCHMARKS)

#: The metric conventionally reported per benchmark (`Benchmark.headline_metric`).
HEADLINE_METRICS: dict[str, str] = {n: b.headline_metric for n, b in BENCHMARKS.items()}


def headline_metric(name: str) -> str:
    """The conventional metric of benchmark ``name`` (``mmlu_<anything>`` -> ``acc``)."""
    short = name[3:] if name.startswith("lz_") else name
    if short in HEADLINE_METRICS:
        return HEADLINE_METRICS[short]
    if short.startswith("mmlu_"):
        return HEADLINE_METRICS["mmlu"]
    raise LinearizeError(f"no headline metric for {name!r}; known: {sorted(HEADLINE_METRICS)}")


def _short_name(name: str) -> str:
    return task_name(name)[3:]


def _members(name: str) -> set[str]:
    """``name`` and every benchmark name it contains (MMLU groups contain subjects)."""
    subjects = mmlu_subjects()
    if name == "mmlu":
        return {name} | {f"mmlu_{c}" for c in MMLU_CATEGORIES} | {f"mmlu_{s}" for s in subjects}
    category = name[len("mmlu_") :] if name.startswith("mmlu_") else None
    if category in MMLU_CATEGORIES:
        return {name} | {f"mmlu_{s}" for s, c in subjects.items() if c == category}
    return {name}


# ----------------------------------------------------------------------------- bootstrap


def _bootstrap_means(scores: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """``iters`` bootstrap replicates of ``scores.mean()``.

    Resampling n scores with replacement only matters through how often each distinct
    value is drawn, so the replicates are drawn exactly as multinomial counts over the
    distinct values (fast for 0/1 accuracies, exact for any scores).
    """
    n = len(scores)
    values, counts = np.unique(scores, return_counts=True)
    draws = rng.multinomial(n, counts / n, size=iters)
    return draws @ values / n


def _ci95(means: np.ndarray) -> list[float]:
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------- evaluate


def _leaf_limits(names: list[str], limit: int | float | None, leaf_tasks: dict[str, Any]) -> dict[str, int] | None:
    """Questions to take from each leaf task for a per-*benchmark* ``limit``.

    An integer ``limit`` counts questions per benchmark: an MMLU group spreads it evenly over its
    subjects (at least one each, the first questions of each subject), so ``limit=50`` means about 50
    MMLU questions, not 50 per subject (2,850). A fraction applies to every leaf task alike.
    ``None`` when there is no limit. ``leaf_tasks``: lm-eval's loaded leaf tasks by name.
    """
    if limit is None:
        return None
    counts: dict[str, int] = {}
    for name in names:
        leaves = [f"lz_{m}" for m in sorted(_members(name)) if f"lz_{m}" in leaf_tasks]
        for leaf in leaves:
            size = len(leaf_tasks[leaf].eval_docs)
            share = math.ceil(size * limit) if limit < 1 else math.ceil(limit / len(leaves))
            counts[leaf] = min(size, share)
    return counts



def _leaf_tasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    if name not in group_subtasks:
        return [name]
    out: list[str] = []
    for child in group_subtasks[name]:
        out.extend(_leaf_tasks(child, group_subtasks))
    return out


def _metric_names(task_results: dict[str, Any]) -> list[str]:
    names = []
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            names.append(metric)
    return names


def evaluate(
    model,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = TASKS,
    *,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    data_dir: str | Path | None = None,
    device: str | None = None,
    seed: int = 1234,
    bootstrap: int = 1000,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``model`` on benchmarks with lm-eval (offline, local data).

    Args:
        model: a ``transformers`` causal LM (anything ``lm_eval``'s ``HFLM`` accepts as
            ``pretrained=``: it needs ``.config``, ``.device`` and ``forward(ids).logits``).
        tokenizer: its tokenizer (a ``PreTrainedTokenizerBase``).
        tasks: benchmark names, see :data:`TASKS` (also ``mmlu_<subject>``, ``mmlu_<category>``;
            one may be part of another, e.g. ``["mmlu", "mmlu_anatomy"]``: it is run once).
        limit: the first ``limit`` questions per benchmark (MMLU: spread over its subjects, see
            :func:`_leaf_limits`), or a fraction of each when < 1. ``None``: all.
        batch_size: HFLM batch size (an int, or ``"auto"``).
        data_dir: benchmark data directory; default :func:`default_data_dir`.
        device: if given, the model is moved there first (HFLM uses ``model.device``).
        seed: python/numpy/torch/few-shot seeds for lm-eval, and the bootstrap's seed.
        bootstrap: bootstrap replicates for the 95% intervals (0: no intervals).
        max_length: context length HFLM truncates to (from the left); default: HFLM's
            rule (``config.n_positions`` / ``max_position_embeddings`` / ``n_ctx``, then
            ``tokenizer.model_max_length``, then 2048).
        cache_dir: where the generated task configs go (see ``tasks.build_task_dir``).

    Returns:
        ``{benchmark: {metric: value, f"{metric}_ci95": [lo, hi], f"{metric}_stderr": x,
        "n": questions, "num_fewshot": k, "headline_metric": m, "task": lm-eval name}``
        for each benchmark, MMLU-like groups also ``"subtasks": {subject: {...}}``, plus
        ``"average": {"value", "ci95", "metrics": {benchmark: metric}}``, the unweighted
        mean over the benchmarks of their headline metric (:data:`HEADLINE_METRICS`);
        its interval resamples every benchmark independently.
    """
    import lm_eval

    from linearize.evaluate.lm_eval_model import continuation_scorer

    names = list(dict.fromkeys(_short_name(t) for t in tasks))
    if not names:
        raise LinearizeError("evaluate() needs at least one task")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    check_data(names, data_dir)
    manager = task_manager(data_dir, cache_dir)

    if device is not None:
        model = model.to(device)
    lm = continuation_scorer()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    # lm-eval refuses a task requested both alone and inside a requested group: run the
    # outermost ones only; the contained ones are reported from the group's results.
    outermost = [n for n in names if not any(m != n and n in _members(m) for m in names)]
    counts = None if limit is None else _leaf_limits(outermost, limit, manager.load([task_name(n) for n in outermost])["tasks"])
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task_name(n) for n in outermost],
        task_manager=manager,
        samples=None if counts is None else {leaf: list(range(k)) for leaf, k in counts.items()},
        log_samples=True,
        bootstrap_iters=bootstrap,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # not rank 0
        return {}

    results, samples = out["results"], out["samples"]
    group_subtasks = out.get("group_subtasks", {})
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {}
    replicates: dict[str, np.ndarray] = {}
    for name in names:
        lz = task_name(name)
        leaves = _leaf_tasks(lz, group_subtasks)
        logged = [s for leaf in leaves for s in samples[leaf]]
        metrics = _metric_names(results[lz])
        entry: dict[str, Any] = {"task": lz, "headline_metric": headline_metric(name)}
        for metric in metrics:
            value = float(results[lz][f"{metric},none"])
            scores = np.asarray([float(s[metric]) for s in logged])
            if not math.isclose(value, scores.mean(), rel_tol=1e-9, abs_tol=1e-9):
                log.warning("%s %s: lm-eval reports %.6f, logged samples give %.6f", name, metric, value, scores.mean())
            entry[metric] = value
            if bootstrap > 0:
                means = _bootstrap_means(scores, bootstrap, rng)
                entry[f"{metric}_ci95"] = _ci95(means)
                if metric == entry["headline_metric"]:
                    replicates[name] = means
            stderr = results[lz].get(f"{metric}_stderr,none")
            if isinstance(stderr, (int, float)):
                entry[f"{metric}_stderr"] = float(stderr)
        entry["n"] = len(logged)
        entry["num_fewshot"] = int(out["n-shot"][leaves[0]])
        if leaves != [lz]:
            entry["subtasks"] = {
                leaf[len("lz_mmlu_") :] if leaf.startswith("lz_mmlu_") else leaf: {
                    **{m: float(results[leaf][f"{m},none"]) for m in _metric_names(results[leaf])},
                    "n": len(samples[leaf]),
                }
                for leaf in leaves
            }
        report[name] = entry

    chosen = {name: report[name]["headline_metric"] for name in names}
    average: dict[str, Any] = {
        "value": float(np.mean([report[n][m] for n, m in chosen.items()])),
        "metrics": chosen,
    }
    if bootstrap > 0 and len(replicates) == len(names):
        average["ci95"] = _ci95(np.mean([replicates[n] for n in names], axis=0))
    report["average"] = average
    return report


# ----------------------------------------------------------------------------- lengths


def context_lengths(
    tokenizer,
    task: str,
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Distribution of full-prompt lengths (tokens) of benchmark ``task``.

    A question's length is the longest ``context + continuation`` over its
    loglikelihood requests, exactly as lm-eval builds them (few-shot examples and
    description line included for MMLU; per-option contexts for winogrande) and
    tokenised as HFLM does (the tokenizer's default special tokens, e.g. BOS). Compare
    with an attention window to see which questions fit in it.

    Returns ``{"task", "n", "num_fewshot", "min", "median", "p90", "max", "mean",
    "lengths"}`` (``lengths``: one per question, in task order; for MMLU groups the
    subjects are concatenated, ``limit`` counted per benchmark as in :func:`evaluate`).
    """
    name = _short_name(task)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    check_data([name], data_dir)
    loaded = task_manager(data_dir, cache_dir).load([task_name(name)])
    counts = _leaf_limits([name], limit, loaded["tasks"])
    lengths: list[int] = []
    num_fewshot = 0
    for leaf_name, leaf in loaded["tasks"].items():
        if leaf.get_config("num_fewshot") is None:
            leaf.set_config(key="num_fewshot", value=0)
        num_fewshot = int(leaf.get_config("num_fewshot"))
        leaf.set_fewshot_seed(seed=1234)
        leaf.build_all_requests(limit=None if counts is None else counts[leaf_name])
        by_doc: dict[int, list[str]] = {}
        for inst in leaf.instances:
            context, continuation = inst.args[0], inst.args[1]
            by_doc.setdefault(inst.doc_id, []).append(context + continuation)
        order = sorted(by_doc)
        flat = [text for d in order for text in by_doc[d]]
        ids = tokenizer(flat)["input_ids"]
        i = 0
        for d in order:
            k = len(by_doc[d])
            lengths.append(max(len(x) for x in ids[i : i + k]))
            i += k
    if not lengths:
        raise LinearizeError(f"{task}: no questions (limit={limit!r})")
    arr = np.asarray(lengths)
    return {
        "task": name,
        "n": len(lengths),
        "num_fewshot": num_fewshot,
        "min": int(arr.min()),
        "median": float(statistics.median(lengths)),
        "p90": float(np.percentile(arr, 90)),
        "max": int(arr.max()),
        "mean": float(arr.mean()),
        "lengths": lengths,
    }
