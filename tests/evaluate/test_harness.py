"""evaluate() and context_lengths() on a tiny random Llama with a small real BPE tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from linearize.evaluate import harness
from linearize.evaluate.harness import (
    HEADLINE_METRICS,
    TASKS,
    DataNotFoundError,
    context_lengths,
    default_data_dir,
    evaluate,
    headline_metric,
)

try:
    DATA = default_data_dir()
except FileNotFoundError:  # pragma: no cover - data-less checkout
    pytest.skip("benchmark data directory not found", allow_module_level=True)

MAX_POS = 256  # smaller than a 5-shot MMLU prompt: exercises HFLM's left truncation


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def report(model, tokenizer):
    return evaluate(
        model, tokenizer, ["piqa", "arc_easy", "mmlu_abstract_algebra"], limit=4, batch_size=4, data_dir=DATA, device="cpu"
    )


def test_evaluate_report(report):
    assert set(report) == {"piqa", "arc_easy", "mmlu_abstract_algebra", "average"}
    expected_metrics = {"piqa": {"acc", "acc_norm"}, "arc_easy": {"acc", "acc_norm"}, "mmlu_abstract_algebra": {"acc"}}
    for name, metrics in expected_metrics.items():
        entry = report[name]
        assert entry["task"] == "lz_" + name
        assert entry["n"] == 4
        assert entry["num_fewshot"] == (5 if name.startswith("mmlu") else 0)
        assert entry["headline_metric"] == headline_metric(name)
        for metric in metrics:
            value = entry[metric]
            lo, hi = entry[f"{metric}_ci95"]
            assert 0.0 <= lo <= value <= hi <= 1.0, (name, metric, lo, value, hi)
            assert value * 4 == round(value * 4)  # a mean of 4 right/wrong answers
            assert entry[f"{metric}_stderr"] >= 0
        assert {k for k in entry if k in ("acc", "acc_norm")} == metrics

    avg = report["average"]
    assert avg["metrics"] == {"piqa": "acc", "arc_easy": "acc", "mmlu_abstract_algebra": "acc"}
    headline = [report[n][m] for n, m in avg["metrics"].items()]
    assert math.isclose(avg["value"], sum(headline) / len(headline))
    lo, hi = avg["ci95"]
    assert 0.0 <= lo <= avg["value"] <= hi <= 1.0


def test_group_pools_its_subjects(model, tokenizer):
    """An MMLU category group reports the mean over all its subjects' questions."""
    again = evaluate(model, tokenizer, ["mmlu_abstract_algebra", "mmlu_stem"], limit=1, batch_size=8, data_dir=DATA)
    stem = again["mmlu_stem"]
    assert stem["task"] == "lz_mmlu_stem"
    assert stem["num_fewshot"] == 5
    assert len(stem["subtasks"]) == 19 and stem["n"] == 19
    assert all(sub["n"] == 1 for sub in stem["subtasks"].values())
    assert math.isclose(stem["acc"], np.mean([sub["acc"] for sub in stem["subtasks"].values()]))
    assert again["mmlu_abstract_algebra"]["acc"] == stem["subtasks"]["abstract_algebra"]["acc"]
    assert again["average"]["metrics"] == {"mmlu_abstract_algebra": "acc", "mmlu_stem": "acc"}


def test_repeated_evaluations_reuse_the_built_tasks(model, tokenizer, report, monkeypatch):
    """A second evaluate() with the same tasks reads no data file again and gives the same report."""
    from lm_eval.tasks import TaskManager

    builds = []
    real = TaskManager._load_spec
    monkeypatch.setattr(TaskManager, "_load_spec", lambda self, spec: builds.append(spec) or real(self, spec))
    args = (model, tokenizer, ["piqa", "arc_easy", "mmlu_abstract_algebra"])
    kwargs = dict(limit=4, batch_size=4, data_dir=DATA, device="cpu")
    first = evaluate(*args, **kwargs)
    built = len(builds)
    again = evaluate(*args, **kwargs)
    assert len(builds) == built, "tasks rebuilt"
    assert first == again == report


def test_limit_counts_questions_per_benchmark():
    """An MMLU group spreads an integer limit over its subjects; a fraction applies to every task."""
    from types import SimpleNamespace

    subjects = harness.mmlu_subjects()
    leaves = {f"lz_mmlu_{s}": SimpleNamespace(eval_docs=[0] * (3 if s == "anatomy" else 200)) for s in subjects}
    leaves["lz_piqa"] = SimpleNamespace(eval_docs=[0] * 1838)
    counts = harness._leaf_limits(["piqa", "mmlu"], 120, leaves)
    assert counts["lz_piqa"] == 120
    assert counts["lz_mmlu_anatomy"] == 3 and counts["lz_mmlu_astronomy"] == 3  # ceil(120 / 57), capped by size
    assert len(counts) == 58
    stem = harness._leaf_limits(["mmlu_stem"], 40, leaves)
    assert len(stem) == 19 and set(stem.values()) == {3}  # ceil(40 / 19)
    assert harness._leaf_limits(["mmlu_anatomy"], 2, leaves) == {"lz_mmlu_anatomy": 2}
    frac = harness._leaf_limits(["piqa", "mmlu"], 0.1, leaves)
    assert frac["lz_piqa"] == 184 and frac["lz_mmlu_astronomy"] == 20 and frac["lz_mmlu_anatomy"] == 1
    assert harness._leaf_limits(["piqa"], None, leaves) is None


def test_headline_constants():
    assert TASKS == ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu")
    assert set(HEADLINE_METRICS) == set(TASKS)
    assert HEADLINE_METRICS["arc_challenge"] == HEADLINE_METRICS["hellaswag"] == "acc_norm"
    assert headline_metric("mmlu_anatomy") == "acc"


def test_bootstrap_matches_naive_resampling():
    rng = np.random.default_rng(0)
    scores = (rng.random(300) < 0.6).astype(float)
    fast = harness._bootstrap_means(scores, 4000, np.random.default_rng(1))
    naive = scores[np.random.default_rng(2).integers(0, len(scores), size=(4000, len(scores)))].mean(1)
    assert abs(fast.mean() - scores.mean()) < 0.005
    assert abs(fast.std() - naive.std()) < 0.003
    lo, hi = harness._ci95(fast)
    assert lo < scores.mean() < hi
    assert harness._ci95(harness._bootstrap_means(np.ones(7), 100, rng)) == [1.0, 1.0]


def test_context_lengths_piqa(tokenizer):
    stats = context_lengths(tokenizer, "piqa", DATA, limit=6)
    with open(DATA / "piqa" / "validation.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(6)]
    expected = [
        max(len(tokenizer(f"Question: {r['goal']}\nAnswer: {sol}").input_ids) for sol in (r["sol1"], r["sol2"]))
        for r in rows
    ]
    assert stats["lengths"] == expected
    assert stats["n"] == 6 and stats["num_fewshot"] == 0
    assert stats["min"] == min(expected) and stats["max"] == max(expected)
    assert stats["median"] == float(np.median(expected))
    assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["max"]


def test_context_lengths_mmlu_includes_fewshot(tokenizer):
    stats = context_lengths(tokenizer, "mmlu_abstract_algebra", DATA, limit=3)
    assert stats["n"] == 3 and stats["num_fewshot"] == 5
    with open(DATA / "mmlu" / "dev.jsonl", encoding="utf-8") as fh:
        dev = [r for r in map(json.loads, fh) if r["subject"] == "abstract_algebra"]
    with open(DATA / "mmlu" / "test.jsonl", encoding="utf-8") as fh:
        test = [json.loads(next(fh)) for _ in range(3)]

    def block(r, answer):
        text = r["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", r["choices"])) + "\nAnswer:"
        return text + (f" {'ABCD'[r['answer']]}" if answer else "")

    head = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    head += "\n\n".join(block(r, True) for r in dev) + "\n\n"
    expected = [max(len(tokenizer(head + block(r, False) + f" {l}").input_ids) for l in "ABCD") for r in test]
    assert stats["lengths"] == expected
    assert stats["min"] > MAX_POS  # so the evaluate() run above did truncate


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LINEARIZE_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("LINEARIZE_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError):
        default_data_dir()
    monkeypatch.delenv("LINEARIZE_DATA")
    assert (default_data_dir() / "piqa" / "validation.jsonl").is_file()


def test_missing_data_is_reported_before_running(model, tokenizer, tmp_path):
    with pytest.raises(DataNotFoundError, match="hellaswag"):
        evaluate(model, tokenizer, ["hellaswag"], limit=1, data_dir=tmp_path)
    with pytest.raises(DataNotFoundError):
        context_lengths(tokenizer, "mmlu", tmp_path)
