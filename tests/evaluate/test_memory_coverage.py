"""memory_coverage: what a query-chosen memory keeps of a long-QA prompt's gold passage, recorded while the items are
scored as the long-context evaluation scores them."""

from __future__ import annotations

import pytest
import torch
from lz_eval_helpers import tiny_llama

import linearize
from linearize.attention.memory import observing_selection
from linearize.errors import LinearizeError
from linearize.evaluate.long_score import score_items
from linearize.evaluate.long_tasks import Item, long_qa_item
from linearize.evaluate.memory_coverage import coverage_markdown, memory_coverage, span_coverage
from linearize.models.window_sinks import query_memory_baseline


def test_span_coverage_by_hand():
    chosen = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)  # 2 KV heads, 6 positions
    candidate = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)  # the last two in the window
    kept, exact = span_coverage(chosen, candidate, 1, 4)  # positions 1..4
    assert kept == pytest.approx((2 / 4 + 1 / 4) / 2) and exact == pytest.approx((3 / 4 + 2 / 4) / 2)


LENGTH = 1500  # tokens of each prompt: the test tokenizer spends many on a passage


@pytest.fixture(scope="module")
def items(tokenizer):
    from linearize.evaluate.long_tasks import _qa_rows

    rows = _qa_rows(None, "squad")[:6]
    return [long_qa_item(tokenizer, "squad", rows, i, LENGTH, depth, seed=0) for i, depth in ((0, 0.0), (1, 1.0))]


def test_coverage_records_each_layers_choice_and_leaves_the_scores_alone(tokenizer, items):
    """Per item: the scores `score_items` gives without recording, one coverage per cut layer; a memory larger than
    the prompt keeps every candidate, so the whole passage is read exactly; a small one keeps less."""
    base = tiny_llama(tokenizer, layers=2, max_pos=2048)
    small = query_memory_baseline(base, 16, 2, 8, layers="all", reread=4)
    rows = memory_coverage(small, tokenizer, items)
    plain = score_items(small, tokenizer, items, batch_tokens=2000)
    for row, want, item in zip(rows, plain, items):
        assert row["bits"] == pytest.approx(want["bits"], rel=1e-5) and row["greedy_exact"] == want["greedy_exact"]
        assert len(row["kept"]) == len(row["exact"]) == 2  # both layers cut
        assert all(0 <= k <= e <= 1 for k, e in zip(row["kept"], row["exact"]))
        assert row["span"] == [item.meta["needle_starts"][0], item.meta["needle_lengths"][0]]
    assert rows[0]["kept_mean"] < 0.5  # 8 keys of a passage of far more tokens
    everything = query_memory_baseline(base, 16, 2, LENGTH, layers="all", reread=4)
    for row in memory_coverage(everything, tokenizer, items):
        assert row["exact"] == [1.0, 1.0] and row["answer_exact"] in (None, [1.0, 1.0])
    assert any(row["answer_span"] is not None and len(row["answer_exact"]) == 2 for row in rows)
    record = {"meta": {"model": "tiny"}, "rules": {"sum": rows, "max": rows}}
    md = coverage_markdown(record)
    assert "| sum bpb | sum kept |" in md and f"| {rows[0]['id']} | {LENGTH} | 0.0 |" in md


def test_gold_first_keeps_the_passage_where_it_fits(tokenizer, items):
    """The oracle choice: a memory as large as the passage holds all of it in every layer (the rule alone keeps less),
    and the scores are those of that memory, not of the rule's."""
    base = tiny_llama(tokenizer, layers=2, max_pos=2048)
    spans = [it.meta["needle_lengths"][0] for it in items]
    model = query_memory_baseline(base, 16, 2, max(spans), layers="all", reread=4)
    rule = memory_coverage(model, tokenizer, items)
    oracle = memory_coverage(model, tokenizer, items, gold_first=True)
    for row in oracle:
        assert row["kept"] == [1.0, 1.0] and row["exact"] == [1.0, 1.0]
    assert min(r["kept_mean"] for r in rule) < 1.0
    assert any(a["bits"] != pytest.approx(b["bits"], rel=1e-6) for a, b in zip(rule, oracle))
    md = coverage_markdown({"meta": {}, "settings": {"gold_first": True}, "rules": {"sum": oracle}})
    assert "Oracle choice" in md


def test_max_over_heads_changes_what_is_kept(tokenizer, items):
    base = tiny_llama(tokenizer, layers=1, seed=3, max_pos=2048)
    chosen = {}
    for rule in ("sum", "max"):
        model = query_memory_baseline(base, 16, 2, 8, layers="all", reread=4)
        linearize.set_hybrid(model, memory_heads=rule)
        seen = []
        with observing_selection(lambda c, cand, spec: seen.append((c.clone(), spec.memory_heads))):
            score_items(model, tokenizer, items[:1], batch_tokens=2000)
        assert [s for _, s in seen] == [rule]
        chosen[rule] = seen[0][0]
    assert chosen["sum"].sum() == chosen["max"].sum() and not torch.equal(chosen["sum"], chosen["max"])


def test_items_without_a_span_or_a_model_without_a_query_memory_are_refused(tokenizer, items):
    base = tiny_llama(tokenizer, layers=1, max_pos=2048)
    with pytest.raises(LinearizeError, match="needs memory_select 'query'"):
        memory_coverage(linearize.convert(base, linearize.HybridConfig(window=16, layers="all")), tokenizer, items[:1])
    plain = Item("t", "q", items[0].context, items[0].target, items[0].target_text, items[0].answers)
    with pytest.raises(LinearizeError, match="no gold span"):
        memory_coverage(query_memory_baseline(tiny_llama(tokenizer, layers=1, max_pos=2048), 16, 2, 8, layers="all"), tokenizer,
                        [plain])


def coverage_script():
    """scripts/memory_coverage.py as a module (scripts/ is no package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("memory_coverage_script",
                                                  Path(__file__).resolve().parents[2] / "scripts" / "memory_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_script_writes_both_rules_for_the_diagnose_items(tokenizer, tmp_path):
    """scripts/memory_coverage.py on a saved tiny model: the record holds every item under each rule, with the
    provenance block, and the items are `diagnose --what long`'s (same builder, seed and cell limit)."""
    import json

    from linearize.evaluate.long_tasks import build_items

    tiny_llama(tokenizer, layers=1, max_pos=2048).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    mod = coverage_script()
    args = [str(tmp_path / "m"), str(tmp_path / "out"), "--lengths", str(LENGTH), "--depths", "0,1", "--cell-limit",
            "1", "--device", "cpu", "--dtype", "float32", "--window", "16", "--memory", "8", "--reread", "4"]
    assert mod.main(args) == 0
    record = json.loads((tmp_path / "out" / "coverage.json").read_text())
    want = build_items(tokenizer, ["qa_squad"], limit=1, lengths=[], qa_lengths=[LENGTH], depths=[0.0, 1.0], seed=1234,
                       data_dir=None, cell_limit=1)
    assert set(record["rules"]) == {"sum", "max"}
    assert [r["id"] for r in record["rules"]["max"]] == [it.qid for it in want]
    assert record["meta"]["commit"] and "memory_coverage.py" in record["meta"]["command"]
    assert (tmp_path / "out" / "coverage.md").read_text().startswith("# What the query memory keeps")
    with pytest.raises(SystemExit):
        mod.main(args)  # the output directory is not empty: refused before anything runs
    one = [*args[:1], str(tmp_path / "one"), *args[2:], "--only", want[1].qid, "--heads", "max", "--layers", "0",
           "--gold-first"]  # a layer list as `diagnose --layers` takes it; the oracle choice
    assert mod.main(one) == 0
    record = json.loads((tmp_path / "one" / "coverage.json").read_text())
    assert list(record["rules"]) == ["max"] and [r["id"] for r in record["rules"]["max"]] == [want[1].qid]
    assert record["settings"]["gold_first"] and record["settings"]["layers"] == [0]
    row = record["rules"]["max"][0]  # the 8 slots all in the passage
    assert row["kept"] == [pytest.approx(min(8, row["span"][1]) / row["span"][1])]


def test_the_script_reads_a_converted_run_with_its_own_window_and_the_asked_memory(tokenizer, tmp_path):
    import json

    model = linearize.convert(tiny_llama(tokenizer, layers=2, max_pos=2048),
                              linearize.HybridConfig(window=16, combine="mix", linear_state="delta"))
    model.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")
    mod = coverage_script()
    args = [str(tmp_path / "run"), str(tmp_path / "out"), "--lengths", str(LENGTH), "--depths", "0", "--cell-limit",
            "1", "--device", "cpu", "--dtype", "float32", "--memory", "8", "--reread", "4", "--heads", "sum",
            "--pyramid", "3"]
    assert mod.main(args) == 0
    row = json.loads((tmp_path / "out" / "coverage.json").read_text())["rules"]["sum"][0]
    assert len(row["kept"]) == 2 and 0 < row["kept_mean"] < 1  # 12 and 4 keys of a long passage
    with pytest.raises(SystemExit):  # its window is its own
        mod.main([*args[:1], str(tmp_path / "other"), *args[2:], "--window", "64"])
    assert not (tmp_path / "other").exists()


def test_the_answer_is_found_in_the_passage_as_tokens(tokenizer, items):
    from linearize.evaluate.memory_coverage import answer_span

    item = items[0]
    start, length = item.meta["needle_starts"][0], item.meta["needle_lengths"][0]
    found = answer_span(tokenizer, item, start, length)
    assert found is not None and start <= found[0] and found[0] + found[1] <= start + length
    assert item.answers[0] in tokenizer.decode(item.context[found[0]:found[0] + found[1]])
    nowhere = Item(item.task, item.qid, item.context, item.target, item.target_text, ["zzqx qqzz"], meta=item.meta)
    assert answer_span(tokenizer, nowhere, start, length) is None
