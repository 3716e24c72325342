"""Long-context evaluation: the window+sinks baseline, prompt construction and placement, scoring, statistics,
and `linearize diagnose --what long` end to end on tiny models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import linearize
from linearize.errors import LinearizeError
from linearize.evaluate.long_score import bootstrap, exact_match, normalize_answer, paired, score_items, token_f1
from linearize.evaluate.long_tasks import (Haystack, Item, long_qa_item, place_needles, reading_items,
                                           retrieval_item)
from linearize.models.memory import decode_state_bytes, matching_window
from linearize.models.window_sinks import target_layers, window_sinks, window_sinks_mask
from tiny_models import assert_decode_bytes_are_the_cache, tiny_model

TEXTS = ["Alpha beta gamma. Delta epsilon zeta eta. Theta iota kappa lambda mu. Nu xi omicron pi rho sigma. " * 40,
         "The quick brown fox jumps. Over the lazy dog it goes. A river runs through the valley. " * 40]


# ----------------------------------------------------------------------------- baseline


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_baseline_unbounded_window_is_the_base_exactly_small_window_differs(impl):
    """A prompt of 64 tokens, longer than the local layers' own window of 16: the local layers keep their window,
    so w >= T reproduces the base bit for bit; w = 8 changes the logits."""
    model = tiny_model("gemma3", sliding_window=16, attn_implementation=impl)
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with window_sinks(model, 64, 8, layers="all") as cut:
            same = model(ids).logits
        with window_sinks(model, 8, 2, layers="all", chunk=16):
            cut_logits = model(ids).logits
        again = model(ids).logits  # restored on exit
    assert cut == [2]  # 'all' still leaves the two local layers alone
    assert torch.equal(same, ref) and torch.equal(again, ref)
    assert (cut_logits - ref).abs().max() > 1e-3


def test_baseline_without_sinks_is_the_converted_swa_only_and_decodes_with_a_cache():
    model = tiny_model("gemma3", sliding_window=16)
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    conv = linearize.convert(copy.deepcopy(model), linearize.HybridConfig(window=8, layers="global"))
    with torch.no_grad():
        with linearize.components(conv, "swa_only"):
            swa = conv(ids).logits
        with window_sinks(model, 8, 0, chunk=16):
            base_cut = model(ids).logits
        with window_sinks(model, 8, 2, chunk=16):
            full = model(ids).logits
            out = model(ids[:, :50], use_cache=True)
            step = model(ids[:, 50:], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(swa, base_cut, atol=1e-5)
    assert torch.allclose(step, full[:, 50:], atol=1e-5)


def test_window_sinks_mask_by_hand():
    m = window_sinks_mask(torch.arange(6), torch.arange(6), window=2, sinks=1)
    assert m.int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]]


def test_baseline_refuses_converted_models_and_llama_cuts_every_layer():
    llama = tiny_model("llama")
    assert target_layers(llama, "global") == [0, 1]
    with pytest.raises(linearize.LinearizeError if hasattr(linearize, "LinearizeError") else Exception):
        with window_sinks(linearize.convert(copy.deepcopy(llama)), 8, 2):
            pass


def test_decode_memory_by_hand():
    """Gemma tiny: head_dim 16, 1 KV head, layers [local, local, global], local window 512."""
    c = tiny_model("gemma3").config
    kv = 2 * 16 * 2  # bytes per key+value, bf16
    assert decode_state_bytes(c, 1000) == kv * (512 + 512 + 1000)
    assert decode_state_bytes(c, 1000, window_sinks=(64, 8)) == kv * (512 + 512 + 72)
    h = linearize.HybridConfig(window=64, layers="global")  # hedgehog full: m = 32 features
    layer = (32 * 16 + 32) * 4 + 63 * (2 * 16 + 32) * 2 + 63 + 8 * 2 * 16 * 2 + 8
    # the two local layers stay softmax, on rings of their window (512 keys and a flag per slot) whatever the context
    rings = 2 * (kv * 512 + 512)
    assert decode_state_bytes(c, 1000, hybrid=h) == rings + layer == decode_state_bytes(c, 100, hybrid=h)
    w = matching_window(c, h, sinks=8)
    assert (w + 8) * kv <= layer < (w + 9) * kv


@pytest.mark.parametrize("extra", [{}, {"softmax_sinks": 4}, {"sparse_memory": 6, "memory_block": 8, "softmax_sinks": 2}])
def test_decode_memory_is_what_the_cache_holds(extra):
    """The formula against the bytes a real cache holds after a prompt, for every layer converted (fp32 model)."""

    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=8, **extra))
    cache = assert_decode_bytes_are_the_cache(model)


# ----------------------------------------------------------------------------- prompts


def test_needle_placed_at_depth_on_token_ids_and_deterministic(tokenizer):
    hay = Haystack(tokenizer, texts=TEXTS)
    for depth in (0.0, 0.3, 1.0):
        a = retrieval_item(tokenizer, "niah_single", 400, depth, 0, seed=3, haystack=hay)
        b = retrieval_item(tokenizer, "niah_single", 400, depth, 0, seed=3, haystack=Haystack(tokenizer, texts=TEXTS))
        assert a.context == b.context and a.target == b.target  # deterministic by seed
        assert len(a.context) == 400
        start, n = a.meta["needle_starts"][0], a.meta["needle_lengths"][0]
        value = a.answers[0]
        needle = tokenizer(f" One of the special magic numbers for", add_special_tokens=False)["input_ids"]
        assert a.context[start:start + len(needle)] == needle
        assert value in tokenizer.decode(a.context[start:start + n])
        offset = start - a.meta["prefix_tokens"]
        assert abs(offset - depth * a.meta["haystack_tokens"]) <= 20  # nearest sentence boundary (sentences < 20 tokens)
    other = retrieval_item(tokenizer, "niah_single", 400, 0.3, 0, seed=4, haystack=hay)
    assert other.context != a.context


def test_place_needles_by_hand():
    ids, starts = place_needles([1, 2, 3, 4, 5, 6], [0, 2, 4, 6], [[9], [8, 8]], [0.6, 1.0])
    assert ids == [1, 2, 3, 4, 9, 5, 6, 8, 8] and starts == [4, 7]
    ids, starts = place_needles([1, 2, 3, 4], [0, 2, 4], [[9]], [0.0])
    assert ids == [9, 1, 2, 3, 4] and starts == [0]


def test_multikey_and_multivalue_prompts(tokenizer):
    hay = Haystack(tokenizer, texts=TEXTS)
    mk = retrieval_item(tokenizer, "niah_multikey", 500, 0.5, 1, seed=0, haystack=hay)
    text = tokenizer.decode(mk.context)
    assert text.count("special magic numbers for") == 4 and len(mk.answers[0]) == 7
    mv = retrieval_item(tokenizer, "niah_multivalue", 500, 0.5, 1, seed=0, haystack=hay)
    values = mv.answers[0].split(", ")
    assert len(values) == 4 and mv.target_text == " " + mv.answers[0]
    text = tokenizer.decode(mv.context)
    assert sorted(values, key=text.index) == values  # listed in the order they appear
    pk = retrieval_item(tokenizer, "passkey", 300, 1.0, 0, seed=0, haystack=hay)
    assert tokenizer.decode(pk.context).rstrip().endswith("The pass key is") and len(pk.answers[0]) == 5


def test_reading_and_long_qa_prompts(tokenizer):
    from linearize.evaluate.long_tasks import _qa_rows

    sq = reading_items(tokenizer, "squad", None, 2)
    assert sq[0].target_text == " 23 years" and sq[0].answers[0] == "23 years"
    assert tokenizer.decode(sq[0].context).endswith("Answer:")
    rows = _qa_rows(None, "squad")[:20]
    assert rows[0]["question"].startswith("Harvard - Yale Regatta") and rows[0]["passage"].startswith("Older than The Game")
    item = long_qa_item(tokenizer, "squad", rows, 0, 3000, 0.5, seed=0)
    assert len(item.context) == 3000
    start, n = item.meta["needle_starts"][0], item.meta["needle_lengths"][0]
    assert tokenizer.decode(item.context[start:start + n]).startswith("Passage: Older than The Game")
    assert tokenizer.decode(item.context).endswith(f"Question: {rows[0]['question']}\nAnswer:")


# ----------------------------------------------------------------------------- scoring


def test_answer_matching_by_hand():
    assert normalize_answer("The  Bahamas!") == "bahamas"
    assert exact_match("the Bahamas.", ["Bahamas", "Bahamian"]) == 1.0
    assert exact_match("in the Bahamas", ["Bahamas"]) == 0.0
    assert token_f1("in the Bahamas", ["Bahamas"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("23", ["23 years", "twenty"]) == pytest.approx(2 / 3)


def test_bits_per_byte_and_greedy_exact_against_a_direct_forward(tokenizer):
    from lz_eval_helpers import tiny_llama

    model = tiny_llama(tokenizer, layers=1)
    items = [Item("t", str(i), tokenizer("Question: what is it?\nAnswer:")["input_ids"] + [5] * i,
                  tokenizer(" a green sky", add_special_tokens=False)["input_ids"], " a green sky", ["a green sky"])
             for i in range(3)]
    scores = score_items(model, tokenizer, items, batch_tokens=40)  # several padded batches
    for it, s in zip(items, scores):
        ids = torch.tensor([it.context + it.target])
        with torch.no_grad():
            lp = model(ids).logits[0].float().log_softmax(-1)
        pos = range(len(it.context) - 1, len(it.context) + len(it.target) - 1)
        bits = -sum(float(lp[p, t]) for p, t in zip(pos, it.target)) / math.log(2)
        assert s["bits"] == pytest.approx(bits, rel=1e-4) and s["bytes"] == 12
        assert s["greedy_exact"] == float(all(int(lp[p].argmax()) == t for p, t in zip(pos, it.target)))


def test_greedy_answer_stops_at_a_blank_line_and_is_scored(tokenizer):
    from lz_eval_helpers import tiny_llama

    from linearize.evaluate.long_score import greedy_answer

    model = tiny_llama(tokenizer, layers=1)
    context = tokenizer("Question: what is it?\nAnswer:")["input_ids"]
    with torch.no_grad():
        ids, expect = list(context), []
        for _ in range(4):  # greedy by hand, without a cache
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            expect.append(token)
    text = tokenizer.decode(expect, skip_special_tokens=True).lstrip("\n").split("\n\n")[0].strip()
    assert greedy_answer(model, tokenizer, context, max_new_tokens=4) == text
    item = Item("squad", "q", context, [5], " x", [text or "-"])
    (s,) = score_items(model, tokenizer, [item], generate=True, max_new_tokens=4)
    assert s["prediction"] == text and s["exact_match"] == float(bool(text)) and "f1" in s


def test_bootstrap_and_paired_by_hand():
    b = bootstrap([1.0, 2.0, 3.0], weights=[1.0, 1.0, 2.0], reps=200)
    assert b["mean"] == pytest.approx(1.5) and b["ci95"][0] <= 1.5 <= b["ci95"][1]
    p = paired([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], reps=200)
    assert p["diff"] == pytest.approx(1.0) and 0.0 <= p["ci95"][0] <= p["ci95"][1] <= 2.0
    same = paired([0.3, 0.7], [0.3, 0.7], reps=50)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]


# ----------------------------------------------------------------------------- end to end


def test_diagnose_long_end_to_end(tmp_path, tokenizer, capsys):
    """A converted tiny Gemma (window 8 on its global layer, local window 16) against its base and the baseline."""
    import yaml

    from linearize.cli import main

    base = tiny_model("gemma3", vocab_size=len(tokenizer), sliding_window=16, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base_dir, conv_dir = tmp_path / "base", tmp_path / "conv"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    conv = linearize.convert(copy.deepcopy(base), linearize.HybridConfig(window=8, layers="global"))
    conv.save_pretrained(conv_dir)
    tokenizer.save_pretrained(conv_dir)
    (conv_dir / "recipe.yaml").write_text(yaml.safe_dump({"data": {"seq_len": 400}}))
    out = tmp_path / "out"
    rc = main(["diagnose", str(conv_dir), "--what", "long", "--limit", "2", "--base", str(base_dir), "--no-check",
               "--device", "cpu", "--dtype", "float32", "--long-tasks", "squad,niah_single,qa_drop",
               "--lengths", "384,512", "--qa-lengths", "768", "--depths", "0,1", "--baseline-windows", "auto,8",
               "--position-len", "256", "--position-docs", "1", "--bootstrap", "50", "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "long.json").read_text())
    names = list(record["variants"])
    w = record["settings"]["baseline_windows"][0]
    assert names == ["base", f"window+sinks w={w} s=8", "window+sinks w=8 s=8", "hybrid", "swa_only", "la_only"]
    mem = {n: v["decode_bytes_32k"] for n, v in record["variants"].items()}
    assert mem["base"] > mem["hybrid"] >= mem[f"window+sinks w={w} s=8"] > mem["window+sinks w=8 s=8"]
    assert record["meta"]["commit"] and record["meta"]["command"].startswith("linearize")
    cells = {(c["task"], c["length"]): c for c in record["cells"]}
    assert set(cells) == {("squad", None), ("niah_single", 384), ("niah_single", 512), ("qa_drop", 768)}
    assert cells[("squad", None)]["n"] == 2 and cells[("niah_single", 384)]["n"] == 4
    assert "hybrid - swa_only" in cells[("squad", None)]["paired"]
    md = (out / "long.md").read_text()
    assert "niah_single @512 †" in md and "niah_single @384 |" in md  # longer than the 400-token training rows
    assert (out / "long_bpb.png").stat().st_size > 0 and (out / "long_retrieval.png").stat().st_size > 0
    # the same items for every variant: paired by construction
    assert len(record["items"]) == len({i["qid"] for i in record["items"]}) == 14

    # the same conversion scored alone (no base) and merged with the base-only record of the same items
    rc = main(["diagnose", str(base_dir), "--what", "long", "--limit", "2", "--no-check", "--device", "cpu",
               "--dtype", "float32", "--long-tasks", "squad,niah_single,qa_drop", "--lengths", "384,512",
               "--qa-lengths", "768", "--depths", "0,1", "--baseline-windows", "8", "--window", "8",
               "--position-docs", "0", "--bootstrap", "50", "--out", str(tmp_path / "base_only")])
    assert rc == 0
    rc = main(["diagnose", str(conv_dir), "--what", "long", "--limit", "2", "--no-base", "--no-check", "--device", "cpu",
               "--dtype", "float32", "--long-tasks", "squad,niah_single,qa_drop", "--lengths", "384,512",
               "--qa-lengths", "768", "--depths", "0,1", "--position-docs", "0", "--bootstrap", "50",
               "--out", str(tmp_path / "conv_only")])
    assert rc == 0
    # one more cut in its own record, matched to the conversion with a 16-key memory: the base is not scored again
    short = ["--what", "long", "--limit", "2", "--no-check", "--device", "cpu", "--dtype", "float32", "--long-tasks",
             "squad,niah_single,qa_drop", "--lengths", "384,512", "--qa-lengths", "768", "--depths", "0,1",
             "--window", "8", "--position-docs", "0", "--bootstrap", "50"]
    rc = main(["diagnose", str(base_dir), *short, "--baselines-only", "--baseline-windows", "auto+sparse_memory=16",
               "--memory-baselines", "16,auto+sparse_memory=16", "--out", str(tmp_path / "more")])
    assert rc == 0
    more = json.loads((tmp_path / "more" / "long.json").read_text())
    (w_more,) = more["settings"]["baseline_windows"]
    snap = "window+sinks+memory w=8 s=8 m=16 r=32 fill"  # the query-memory (SnapKV-style) baseline: 8 + 8 + 16 keys,
    # the prompt's last 32 tokens re-read (--memory-reread's default, HybridConfig.memory_reread's), later keys taking
    # its free slots (--memory-fill's default, HybridConfig.memory_fill's)
    # ... and one whose memory fills the keys of the cut matched to that conversion beyond its window
    assert list(more["variants"]) == [f"window+sinks w={w_more} s=8", snap, f"window+sinks+memory w=8 s=8 m={w_more - 8} r=32 fill"]
    assert w_more > w and more["settings"]["memory_baselines"] == [16, w_more - 8] and more["settings"]["memory_fill"]
    assert more["variants"][snap]["decode_bytes_32k"] == decode_state_bytes(
        linearize.models.convert.text_config(base), 32768, window_sinks=(24, 8), layers="global", dtype_bytes=4)
    # bad input: one line, before a model loads or anything is written
    for bad in (["--baseline-windows", "auto+no_such_field=1"], ["--baseline-windows", "-3"], ["--memory-baselines", "x"]):
        assert main(["diagnose", str(base_dir), *short, *bad, "--out", str(tmp_path / "bad")]) == 2
    assert main(["diagnose", str(conv_dir), *short, "--no-base", "--baselines-only", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["report", str(tmp_path / "base_only"), str(tmp_path / "more"), str(tmp_path / "conv_only"),
                 "--long-out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "long.json").read_text())
    assert list(merged["variants"]) == ["base", "window+sinks w=8 s=8", f"window+sinks w={w_more} s=8", snap,
                                        f"window+sinks+memory w=8 s=8 m={w_more - 8} r=32 fill", "conv_only hybrid",
                                        "conv_only swa_only", "conv_only la_only"]
    assert f"conv_only hybrid - {snap}" in merged["pairs"]
    assert f"conv_only hybrid - window+sinks w={w_more} s=8" in merged["pairs"]
    for got, want in zip(merged["items"], record["items"]):  # one run or two: the same per-item scores
        assert got["conv_only hybrid"] == want["hybrid"] and got["window+sinks w=8 s=8"] == want["window+sinks w=8 s=8"]
    one = {c["task"] + str(c["length"]): c["paired"]["hybrid - window+sinks w=8 s=8"]["bpb"]["diff"] for c in record["cells"]}
    two = {c["task"] + str(c["length"]): c["paired"]["conv_only hybrid - window+sinks w=8 s=8"]["bpb"]["diff"] for c in merged["cells"]}
    assert two == pytest.approx(one)
    assert "| conv_only hybrid |" in (tmp_path / "merged" / "long.md").read_text()


@pytest.mark.parametrize("family,reread", [("llama", 1), ("gemma3", 1), ("llama", 6)])
def test_a_memory_chosen_at_prefill_is_scored_through_the_cache(family, reread):
    """memory_select='query' (no memory in a full forward): items are scored through a cached prefill of the prompt
    and the gold continuation after it, batched with left padding -- each item's scores equal its own prefill and
    steps; with no memory that path equals the full forward's."""
    from types import SimpleNamespace

    from transformers import DynamicCache

    from linearize.compat import cache_kwargs
    from linearize.evaluate.long_score import _prefilled, _teacher_forced

    # Gemma: its local layers stay the base's, on a window of 8 that the prompts outgrow (HF's sliding cache, padded)
    layers, extra = ("global", {"sliding_window": 8}) if family == "gemma3" else ("all", {})
    hybrid = linearize.HybridConfig(window=4, sparse_memory=3, memory_select="query", memory_observe=4, softmax_sinks=1,
                                    layers=layers, memory_reread=reread)
    model = linearize.convert(tiny_model(family, **extra), hybrid)
    g = torch.Generator().manual_seed(0)
    items = [Item("t", str(i), torch.randint(1, 128, (n,), generator=g).tolist(),
                  torch.randint(1, 128, (m,), generator=g).tolist(), "x" * m, ["x"]) for i, (n, m) in
             enumerate([(21, 3), (13, 1), (17, 4)])]
    scores = score_items(model, SimpleNamespace(pad_token_id=0), items, batch_tokens=80)  # one left-padded batch
    for it, s in zip(items, scores):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = [model(torch.tensor([it.context]), **cache_kwargs(cache), use_cache=True).logits[0, -1:]]
            logits += [model(torch.tensor([[x]]), **cache_kwargs(cache), use_cache=True).logits[0] for x in it.target[:-1]]
        lp = torch.cat(logits).float().log_softmax(-1)
        bits = -sum(float(lp[i, x]) for i, x in enumerate(it.target)) / math.log(2)
        assert s["bits"] == pytest.approx(bits, rel=1e-4)
        assert s["greedy_exact"] == float(all(int(lp[i].argmax()) == x for i, x in enumerate(it.target)))
    linearize.set_hybrid(model, sparse_memory=0, memory_select="recall")
    plain = _teacher_forced(model, items, [0, 1, 2], 0)
    for a, b in zip(_prefilled(model, items, [0, 1, 2], 0), plain):
        assert a["bits"] == pytest.approx(b["bits"], rel=1e-4) and a["greedy_exact"] == b["greedy_exact"]
    assert any(abs(a["bits"] - b["bits"]) > 1e-3 for a, b in zip(scores, plain))  # the memory was read


def _record(names, items, seed=0):
    """A `--what long` record of `items` (qid, task, length) with random per-item scores for `names`."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for qid, task, length in items:
        scores = {n: {"bits": float(torch.rand(1, generator=g)) * 10, "bytes": 10,
                      "greedy_exact": float(torch.rand(1, generator=g) > 0.5)} for n in names}
        rows.append({"qid": qid, "task": task, "length": length, "depth": None if length is None else 0.5,
                     "prompt_tokens": length or 900, **scores})
    return {"meta": {"commit": "abc1234"}, "settings": {"train_len": 4096, "limit": 4, "memory_context": 32768},
            "variants": {n: {"decode_bytes_32k": 2**20, "note": n, "seconds": 1.0} for n in names}, "items": rows}


def test_records_of_more_lengths_merge_over_the_items_every_record_has():
    from linearize.evaluate.long_context import merge_long_records

    short = [(f"s{i}", "squad", None) for i in range(4)] + [(f"p{i}-{n}", "passkey", n) for i in range(3) for n in (4096, 8192)]
    longer = short + [(f"p{i}-32768", "passkey", 32768) for i in range(3)]
    base = _record(["base", "window+sinks w=512 s=8"], longer, seed=1)
    conv = _record(["hybrid", "swa_only"], short, seed=2)
    merged = merge_long_records({"base": base, "conv": conv}, reps=20)
    assert [it["qid"] for it in merged["items"]] == [q for q, _, _ in short]  # the base's order, its 32k items out
    assert merged["meta"]["items_left_out"] == {"base": 3}
    from linearize.evaluate.long_context import long_markdown

    base["meta"]["commit"], conv["meta"]["commit"] = "aaaa111", "bbbb222"
    header = long_markdown(merge_long_records({"base": base, "conv": conv}, reps=20)).splitlines()[2]
    assert "base: aaaa111" in header and "conv: bbbb222" in header  # each source's commit, not the first's alone
    for got, b, c in zip(merged["items"], base["items"], conv["items"]):
        assert got["base"] == b["base"] and got["conv hybrid"] == c["hybrid"]  # each item's own scores
    assert {c["length"] for c in merged["cells"]} == {None, 4096, 8192}
    with pytest.raises(LinearizeError, match="no item in common"):
        merge_long_records({"base": base, "other": _record(["hybrid"], [("x", "squad", None)])}, reps=20)


def test_records_that_score_their_items_in_another_order_are_joined_item_by_item():
    from linearize.evaluate.long_context import merge_long_records

    items = [(f"s{i}", "squad", None) for i in range(3)] + [(f"p{i}-{n}", "passkey", n) for i in range(3) for n in (4096, 8192)]
    base = _record(["base"], items, seed=1)
    conv = _record(["hybrid", "swa_only"], items[3:] + [("d0", "drop", None)] + items[:3][::-1], seed=2)  # other tasks first
    merged = merge_long_records({"base": base, "conv": conv}, reps=20)
    assert [it["qid"] for it in merged["items"]] == [q for q, _, _ in items]  # the first record's order
    assert merged["meta"]["items_left_out"] == {"conv": 1}
    own = {it["qid"]: it for it in conv["items"]}
    for got in merged["items"]:
        assert got["conv hybrid"] == own[got["qid"]]["hybrid"] and got["conv swa_only"] == own[got["qid"]]["swa_only"]


def test_a_change_at_load_is_paired_with_the_same_weights_without_it():
    from linearize.evaluate.long_context import merge_long_records

    items = [(f"s{i}", "squad", None) for i in range(6)]
    run = _record(["hybrid", "swa_only"], items, seed=1)
    run["meta"].update(model="/runs/a", trained_run=None)
    run["settings"]["hybrid"] = {"mix_shift": 0.0}
    shifted = _record(["hybrid"], items, seed=2)  # `diagnose RUN --hybrid mix_shift=1 --long-modes hybrid`
    shifted["meta"].update(model="/runs/a")
    shifted["settings"]["hybrid"] = {"mix_shift": 1.0}
    study_variant = _record(["hybrid"], items, seed=3)  # a study variant names its run; its weights' path differs
    study_variant["meta"].update(model="/elsewhere/retrained", trained_run="run")
    other = _record(["hybrid", "swa_only"], items, seed=4)
    other["meta"].update(model="/runs/b")
    merged = merge_long_records({"run": run, "shift": shifted, "variant": study_variant, "other": other}, reps=20)
    assert {"shift hybrid - run hybrid", "shift hybrid - run swa_only", "variant hybrid - run hybrid",
            "variant hybrid - run swa_only"} <= set(merged["pairs"])
    assert not any(p.startswith(("run hybrid - shift", "other hybrid - run", "run hybrid - other")) for p in merged["pairs"])
    assert "shift hybrid - shift swa_only" not in merged["pairs"] and "run hybrid - run swa_only" in merged["pairs"]
    (cell,) = merged["cells"]
    got = cell["paired"]["shift hybrid - run hybrid"]["bpb"]["diff"]
    bpb = lambda rec, name: sum(i[name]["bits"] for i in rec["items"]) / sum(i[name]["bytes"] for i in rec["items"])  # noqa: E731
    assert got == pytest.approx(bpb(shifted, "hybrid") - bpb(run, "hybrid"))


def test_the_merge_takes_parents_and_more_pairs_it_is_told(tmp_path):
    """A record whose meta names neither its run nor the run's model path (evaluated elsewhere, by `diagnose`) is
    paired with its weights when ``parents`` says which; ``extra_pairs`` (and `report --pair`) add row-to-row
    differences, e.g. the same memory with the linear readout on and off; an unknown row is a one-line error."""
    from linearize.cli import main
    from linearize.evaluate.long_context import merge_long_records

    items = [(f"s{i}", "squad", None) for i in range(6)]
    run = _record(["hybrid", "swa_only"], items, seed=1)
    run["meta"].update(model="/runs/a")
    on, off = _record(["hybrid"], items, seed=2), _record(["hybrid"], items, seed=3)
    on["meta"].update(model="/tmp/x/retrained")
    off["meta"].update(model="/tmp/x/retrained")
    records = {"run": run, "mem": on, "mem-off": off}
    plain = merge_long_records(records, reps=20)
    assert "mem hybrid - run hybrid" not in plain["pairs"]
    merged = merge_long_records(records, reps=20, parents={"mem": "run", "mem-off": "run"},
                                extra_pairs=[("mem-off hybrid", "mem hybrid")])
    assert {"mem hybrid - run hybrid", "mem hybrid - run swa_only", "mem-off hybrid - run hybrid",
            "mem-off hybrid - mem hybrid"} <= set(merged["pairs"])
    (cell,) = merged["cells"]
    bpb = lambda rec: sum(i["hybrid"]["bits"] for i in rec["items"]) / sum(i["hybrid"]["bytes"] for i in rec["items"])  # noqa: E731
    assert cell["paired"]["mem-off hybrid - mem hybrid"]["bpb"]["diff"] == pytest.approx(bpb(off) - bpb(on))
    with pytest.raises(LinearizeError, match="no row 'nope hybrid'"):
        merge_long_records(records, reps=20, extra_pairs=[("nope hybrid", "mem hybrid")])
    for label, rec in records.items():
        (tmp_path / label).mkdir()
        (tmp_path / label / "long.json").write_text(json.dumps(rec))
    dirs = [str(tmp_path / label) for label in records]
    assert main(["report", *dirs, "--long-out", str(tmp_path / "merged"), "--pair", "mem-off hybrid:mem hybrid"]) == 0
    assert "mem-off hybrid - mem hybrid" in json.loads((tmp_path / "merged" / "long.json").read_text())["pairs"]
    assert main(["report", *dirs, "--long-out", str(tmp_path / "bad"), "--pair", "mem-off hybrid"]) == 2
    assert not (tmp_path / "bad").exists()


def test_the_memory_fill_flag_follows_the_config_default():
    """`diagnose --memory-fill` is on unless --no-memory-fill, as HybridConfig.memory_fill (the baselines before
    session 17 ran without it)."""
    from linearize.cli import build_parser

    parse = lambda *extra: build_parser().parse_args(["diagnose", "m", "--what", "long", *extra])  # noqa: E731
    assert parse().memory_fill is linearize.HybridConfig().memory_fill is True
    assert parse("--no-memory-fill").memory_fill is False and parse("--memory-fill").memory_fill is True
    assert parse().memory_prefill == linearize.HybridConfig().memory_prefill == "none"
    assert parse("--memory-prefill", "recall").memory_prefill == "recall"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_query_memory_baseline_is_the_cut_plus_a_memory(family):
    """The training-free query-memory baseline (window + sinks + keys chosen by the prompt's last queries, softmax
    alone, its prefill streaming like the cut's): its full forward is the window+sinks cut's, logit for logit (the
    linear branch weighs exactly 0); through a cached prefill with a window that holds everything it scores every
    item as the base does; with a small window its memory changes the scores; the base stays unconverted."""
    from types import SimpleNamespace

    from linearize.models.window_sinks import query_memory_baseline

    extra = {"sliding_window": 8} if family == "gemma3" else {}
    layers = "global" if family == "gemma3" else "all"
    base = tiny_model(family, **extra).eval()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    snap = query_memory_baseline(base, 6, 2, 4, layers=layers, reread=1)  # the last token only
    assert not linearize.is_converted(base) and linearize.is_converted(snap)
    with torch.no_grad(), window_sinks(base, 6, 2, layers=layers):
        cut = base(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(snap(ids, use_cache=False).logits, cut, atol=1e-4, rtol=1e-4)
        prefill = snap(ids).logits  # a cached forward is a prefill: its last token reads the memory it chose
    torch.testing.assert_close(prefill[:, :-1], cut[:, :-1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(prefill[:, -1], cut[:, -1], atol=1e-3)
    with torch.no_grad():  # the prompt's last 5 tokens read the memory again (memory_reread): they alone change
        reread = query_memory_baseline(base, 6, 2, 4, layers=layers, reread=5)(ids).logits
    torch.testing.assert_close(reread[:, :-5], cut[:, :-5], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reread[:, -5:-1], cut[:, -5:-1], atol=1e-3)
    g = torch.Generator().manual_seed(0)
    items = [Item("t", str(i), torch.randint(1, 128, (n,), generator=g).tolist(),
                  torch.randint(1, 128, (m,), generator=g).tolist(), "x" * m, ["x"]) for i, (n, m) in
             enumerate([(31, 3), (17, 2), (25, 4)])]
    tok = SimpleNamespace(pad_token_id=0)
    want = score_items(base, tok, items, batch_tokens=120)
    wide = score_items(query_memory_baseline(base, 64, 1, 4, layers=layers), tok, items, batch_tokens=120)
    for a, b in zip(wide, want):
        assert a["bits"] == pytest.approx(b["bits"], rel=1e-4, abs=1e-4)
    with window_sinks(base, 6, 2, layers=layers):
        plain_cut = score_items(base, tok, items, batch_tokens=120)
    with_memory = score_items(snap, tok, items, batch_tokens=120)
    assert any(abs(a["bits"] - b["bits"]) > 1e-3 for a, b in zip(with_memory, plain_cut))
    # memory_fill: the keys that leave the window while the prompt is read again and the answer is scored take the
    # free slots, so items no longer than window + sinks + memory are scored as the base scores them
    filled = score_items(query_memory_baseline(base, 6, 2, 32, layers=layers, fill=True), tok, items, batch_tokens=120)
    for a, b in zip(filled, want):
        assert a["bits"] == pytest.approx(b["bits"], rel=1e-4, abs=1e-4)
    unfilled = score_items(query_memory_baseline(base, 6, 2, 32, layers=layers, fill=False), tok, items, batch_tokens=120)
    assert any(abs(a["bits"] - b["bits"]) > 1e-3 for a, b in zip(unfilled, want))
    # memory_prefill 'recall': the prompt before its re-read tokens reads the online recall memory, so with fill an
    # item within window + sinks + memory is scored as the base scores it even when only its last token is re-read
    recall = query_memory_baseline(base, 6, 2, 32, layers=layers, reread=1, prefill="recall")
    assert all(m.hybrid.memory_prefill == "recall" for m in linearize.models.convert.hybrid_modules(recall))
    for a, b in zip(score_items(recall, tok, items, batch_tokens=120), want):
        assert a["bits"] == pytest.approx(b["bits"], rel=1e-4, abs=1e-4)
    if family == "llama":  # (the tiny Gemma's one cut layer is its last: what its prompt tokens read reaches no answer)
        streamed = score_items(query_memory_baseline(base, 6, 2, 32, layers=layers, reread=1), tok, items, batch_tokens=120)
        assert any(abs(a["bits"] - b["bits"]) > 1e-3 for a, b in zip(streamed, want))
    with pytest.raises(LinearizeError, match="memory >= 1"):
        query_memory_baseline(base, 4, 1, 0, layers=layers)
    with pytest.raises(LinearizeError, match="base model"):
        query_memory_baseline(snap, 4, 1, 8, layers=layers)


def test_the_query_memory_baseline_is_a_model_to_keep(tmp_path):
    """The training-free query-memory model (the README's no-training option: on Qwen2.5-Coder-1.5B the best
    constant-memory reader measured) saves and loads like a conversion: the same settings (the linear branch
    weighed 0 by a fixed gate, the re-read default) and the same generated tokens."""
    from linearize.models.window_sinks import query_memory_baseline

    model = query_memory_baseline(tiny_model("llama").eval(), 6, 2, 4, layers="all")
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    hybrid = linearize.hybrid_config_of(loaded)
    assert hybrid.to_dict() == linearize.hybrid_config_of(model).to_dict()
    assert (hybrid.combine, hybrid.mix_gate, hybrid.mix_value, hybrid.memory_select, hybrid.memory_reread) == \
        ("mix", "fixed", 1.0, "query", linearize.config.MEMORY_REREAD)
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       loaded.generate(ids, max_new_tokens=8, do_sample=False))
