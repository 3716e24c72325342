"""Our offline ``lz_*`` task configs reproduce lm-eval's built-in tasks exactly.

For each benchmark the built-in task is built from lm-eval's own YAML
(``lm_eval/tasks/<task>/...``) with its dataset download patched out (fed the same local
rows under the HF split names instead), then prompts, choices, gold index, few-shot
context and the loglikelihood request arguments are compared doc by doc with our task,
which reads the local JSONL through ``dataset_path: json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from unittest import mock

import datasets
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from linearize.evaluate.harness import default_data_dir
from linearize.evaluate.tasks import (
    MMLU_CATEGORIES,
    SIMPLE_TASKS,
    build_task_dir,
    lm_eval_tasks_dir,
    mmlu_subjects,
    task_manager,
    task_name,
)
from linearize.errors import LinearizeError

try:
    DATA = default_data_dir()
except FileNotFoundError:  # pragma: no cover - data-less checkout
    pytest.skip("benchmark data directory not found", allow_module_level=True)

# benchmark -> (lm-eval YAML, local file our task scores, HF split names it is fed as)
BUILTIN = {
    "piqa": ("piqa/piqa.yaml", "piqa/validation.jsonl", ("train", "validation")),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy/test.jsonl", ("train", "validation", "test")),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge/test.jsonl", ("train", "validation", "test")),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/validation.jsonl", ("train", "validation")),
    "winogrande": ("winogrande/default.yaml", "winogrande/validation.jsonl", ("train", "validation")),
}
MMLU_CHECKED = ("abstract_algebra", "high_school_us_history", "professional_law", "world_religions")
N_SAMPLE = 40


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _sample_indices(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted(set(range(5)) | set(rng.sample(range(n), min(n, N_SAMPLE))))


def _builtin_task(yaml_rel: str, splits: dict[str, list[dict]], **overrides) -> ConfigurableTask:
    """lm-eval's own task from its YAML, with ``download`` replaced by in-memory rows."""
    cfg = load_yaml(lm_eval_tasks_dir() / yaml_rel, resolve_func=True)
    for key in ("tag", "group", "task_list"):  # as lm-eval's TaskFactory does
        cfg.pop(key, None)
    cfg.update(overrides)

    def fake_download(self, dataset_kwargs=None, **kwargs):
        self.dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})

    with mock.patch.object(ConfigurableTask, "download", fake_download):
        task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(seed=1234)
    return task


def _request_args(task: ConfigurableTask, doc: dict, ctx) -> list[tuple]:
    insts = task.construct_requests(doc=doc, ctx=ctx, metadata=(task.config.task, 0, 1))
    return [inst.args for inst in (insts if isinstance(insts, list) else [insts])]


def _assert_same_doc(ours: ConfigurableTask, ref: ConfigurableTask, doc_o: dict, doc_r: dict, shots: int):
    assert ours.doc_to_text(doc_o) == ref.doc_to_text(doc_r)
    assert ours.doc_to_choice(doc_o) == ref.doc_to_choice(doc_r)
    assert ours.doc_to_target(doc_o) == ref.doc_to_target(doc_r)
    ctx_o = ours.fewshot_context(doc_o, shots)
    ctx_r = ref.fewshot_context(doc_r, shots)
    assert ctx_o == ctx_r
    assert _request_args(ours, doc_o, ctx_o) == _request_args(ref, doc_r, ctx_r)


def _assert_same_scoring(ours: ConfigurableTask, ref: ConfigurableTask):
    assert ours.OUTPUT_TYPE == ref.OUTPUT_TYPE == "multiple_choice"
    assert list(ours._metric_fn_list) == list(ref._metric_fn_list)
    assert ours._aggregation_list == ref._aggregation_list
    assert ours._higher_is_better == ref._higher_is_better
    for key in ("target_delimiter", "fewshot_delimiter", "description", "doc_to_text", "doc_to_choice", "doc_to_target"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key


@pytest.fixture(scope="module")
def ours():
    names = [task_name(t) for t in SIMPLE_TASKS] + [task_name(f"mmlu_{s}") for s in MMLU_CHECKED]
    return task_manager(DATA).load(names)["tasks"]


@pytest.mark.parametrize("bench", list(BUILTIN))
def test_zero_shot_task_matches_lm_eval(bench, ours):
    yaml_rel, local, hf_splits = BUILTIN[bench]
    rows = _read_jsonl(DATA / local)
    idx = _sample_indices(len(rows), seed=len(bench))
    picked = [rows[i] for i in idx]
    ref = _builtin_task(yaml_rel, {s: picked for s in hf_splits})
    mine = ours[task_name(bench)]

    assert len(mine.eval_docs) == len(rows)
    assert mine.get_config("num_fewshot") in (None, 0)
    _assert_same_scoring(mine, ref)
    ref_docs = ref.eval_docs
    for j, i in enumerate(idx):
        _assert_same_doc(mine, ref, mine.eval_docs[i], ref_docs[j], shots=0)


def test_gold_index_is_the_labelled_answer(ours):
    """Spot-check the gold index against the raw fields, independently of lm-eval."""
    piqa = ours["lz_piqa"].eval_docs[0]
    assert ours["lz_piqa"].doc_to_target(piqa) == piqa["label"]
    for bench in ("arc_easy", "arc_challenge"):
        task = ours[task_name(bench)]
        for doc in list(task.eval_docs)[:50]:
            # The rebuilt test splits carry the 0-based gold index as "gold".
            assert task.doc_to_target(doc) == doc["gold"]
    hs = ours["lz_hellaswag"].eval_docs[0]
    assert ours["lz_hellaswag"].doc_to_target(hs) == int(hs["label"])
    wg = ours["lz_winogrande"].eval_docs[0]
    assert ours["lz_winogrande"].doc_to_text(wg) == int(wg["answer"]) - 1


@pytest.mark.parametrize("subject", MMLU_CHECKED)
def test_mmlu_subject_matches_lm_eval(subject, ours):
    test_rows = [r for r in _read_jsonl(DATA / "mmlu/test.jsonl") if r["subject"] == subject]
    dev_rows = [r for r in _read_jsonl(DATA / "mmlu/dev.jsonl") if r["subject"] == subject]
    assert len(dev_rows) == 5
    idx = _sample_indices(len(test_rows), seed=len(subject))
    picked = [test_rows[i] for i in idx]
    ref = _builtin_task(f"mmlu/default/mmlu_{subject}.yaml", {"test": picked, "dev": dev_rows}, num_fewshot=5)
    mine = ours[task_name(f"mmlu_{subject}")]

    assert len(mine.eval_docs) == len(test_rows)
    assert mine.get_config("num_fewshot") == 5
    assert mine.get_config("fewshot_split") == "dev"
    _assert_same_scoring(mine, ref)
    for j, i in enumerate(idx):
        _assert_same_doc(mine, ref, mine.eval_docs[i], ref.eval_docs[j], shots=5)

    # The 5-shot context, written out by hand in lm-eval's MMLU format.
    def block(row, with_answer):
        lines = [row["question"].strip()] + [f"{l}. {c}" for l, c in zip("ABCD", row["choices"])]
        return "\n".join(lines) + "\nAnswer:" + (f" {'ABCD'[row['answer']]}" if with_answer else "")

    doc = mine.eval_docs[0]
    expected = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        + "\n\n".join(block(r, True) for r in dev_rows)
        + "\n\n"
        + block(test_rows[0], False)
    )
    assert mine.fewshot_context(doc, 5) == expected
    assert _request_args(mine, doc, expected) == [(expected, f" {l}") for l in "ABCD"]


def test_generated_configs_only_swap_the_data_source():
    """Every generated YAML equals lm-eval's own config except for the data-source keys."""
    gen = build_task_dir(DATA)
    allowed = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
               "validation_split", "test_split", "num_fewshot"}
    pairs = [(gen / tpl, lm_eval_tasks_dir() / BUILTIN[b][0]) for b, tpl in SIMPLE_TASKS.items()]
    pairs += [(gen / "mmlu" / f"lz_mmlu_{s}.yaml", lm_eval_tasks_dir() / f"mmlu/default/mmlu_{s}.yaml")
              for s in mmlu_subjects()]
    for mine_path, ref_path in pairs:
        mine = load_yaml(mine_path, resolve_func=False)
        ref = load_yaml(ref_path, resolve_func=False)
        for key in set(mine) | set(ref):
            if key not in allowed:
                assert mine.get(key) == ref.get(key), (mine_path.name, key)
        assert mine["dataset_path"] == "json"
        for path in mine["dataset_kwargs"]["data_files"].values():
            assert Path(path).is_absolute() and Path(path).is_file(), path
    for category in MMLU_CATEGORIES:
        mine = load_yaml(gen / "mmlu" / f"lz_mmlu_{category}.yaml")
        ref = load_yaml(lm_eval_tasks_dir() / f"mmlu/default/_mmlu_{category}.yaml")
        assert mine["aggregate_metric_list"] == ref["aggregate_metric_list"]
        assert mine["task"] == [f"lz_mmlu_{category}_tasks"]


def test_mmlu_split_files_partition_the_data():
    gen = build_task_dir(DATA)
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    for split, total in (("test", 14042), ("dev", 285)):
        # split on "\n" only: some questions hold U+2028 etc., which str.splitlines() splits on
        lines = (DATA / f"mmlu/{split}.jsonl").read_bytes().decode("utf-8").rstrip("\n").split("\n")
        parts = [(gen / "mmlu_data" / s / f"{split}.jsonl").read_bytes().decode("utf-8").rstrip("\n").split("\n")
                 for s in subjects]
        assert sum(map(len, parts)) == len(lines) == total
        assert sorted(l for p in parts for l in p) == sorted(lines)
        assert all(len(p) == 5 for p in parts) if split == "dev" else all(parts)


def test_build_task_dir_is_cached_and_path_safe(tmp_path):
    data = tmp_path / 'data dir "quoted" #x'
    data.mkdir()
    (data / "piqa").symlink_to(DATA / "piqa")
    cache = tmp_path / "cache"
    first = build_task_dir(data, cache)
    assert build_task_dir(data, cache) == first
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp folders left behind
    assert not (first / "mmlu_data").exists()  # no MMLU data there, nothing split
    task = task_manager(data, cache).load(["lz_piqa"])["tasks"]["lz_piqa"]
    assert len(task.eval_docs) == 1838


def test_task_names():
    assert task_name("piqa") == "lz_piqa"
    assert task_name("lz_piqa") == "lz_piqa"
    assert task_name("mmlu") == "lz_mmlu"
    assert task_name("mmlu_anatomy") == "lz_mmlu_anatomy"
    assert task_name("mmlu_stem") == "lz_mmlu_stem"
    with pytest.raises(LinearizeError):
        task_name("mmlu_astrology")
    with pytest.raises(LinearizeError):
        task_name("lambada")
