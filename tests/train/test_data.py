"""Tests for linearize.documents and linearize.train.data (CPU, offline, a few seconds).

The tokenizer is a tiny byte-level BPE trained here on local WikiText, not a hub download.
"""

from __future__ import annotations

import io
import itertools
import json
import time

import pytest
import torch

from linearize import documents as Docs
from linearize.data_dir import default_data_dir
from linearize.errors import LinearizeError
from linearize.train import data as D


def _data_dir_or_skip():
    try:
        return default_data_dir()
    except LinearizeError as e:  # pragma: no cover - only where shared data is absent
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def data_dir():
    return _data_dir_or_skip()


@pytest.fixture(scope="module")
def tok(data_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (data_dir / "wikitext2" / "valid.txt").read_text(encoding="utf-8")[:60_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert t.bos_token_id == 2 and t.eos_token_id == 1
    return t


def build(tok, sources, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("show_progress", False)
    return D.build_packed_data(tok, sources, **kw)


# ------------------------------------------------------------------------------------------------


def test_templates():
    assert Docs.format_alpaca("Do X.", "", "Done.") == "### Instruction:\nDo X.\n\n### Response:\nDone."
    assert Docs.format_alpaca("Do X.", "with Y", "Done.") == (
        "### Instruction:\nDo X.\n\n### Input:\nwith Y\n\n### Response:\nDone."
    )
    one = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    assert Docs.format_conversation(one) == "### Instruction:\nHi?\n\n### Response:\nHello."
    multi = one + [{"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]
    assert Docs.format_conversation(multi) == (
        "### User:\nHi?\n\n### Assistant:\nHello.\n\n### User:\nMore\n\n### Assistant:\nSure"
    )


@pytest.mark.parametrize("name", sorted(Docs.SOURCES))
def test_named_sources_yield_documents(name, data_dir):
    docs = list(Docs.iter_documents(name, data_dir, limit=3))
    assert len(docs) == 3
    for d in docs:
        assert isinstance(d, str) and d.strip() and d.id and d.group
    if Docs.SOURCES[name].kind == "instruction":
        assert all("### Response:" in d or "### Assistant:" in d for d in docs)


def test_aliases_and_weights():
    src, w = Docs.resolve_source("alpaca_en_demo:2.5")
    assert src.name == "alpaca_demo" and w == 2.5
    assert Docs.resolve_source("TinyShakespeare")[0].name == "shakespeare"


def test_unknown_source_lists_known():
    with pytest.raises(LinearizeError) as e:
        Docs.resolve_source("no_such_corpus")
    for name in ("sharegpt", "alpaca_demo", "dolly", "c4", "wiki", "wikitext2", "shakespeare"):
        assert name in str(e.value)


def test_missing_data_dir(tmp_path, monkeypatch, tok):
    missing = tmp_path / "nope"
    with pytest.raises(LinearizeError, match="nope"):
        D.build_packed_data(tok, ["c4"], data_dir=missing, cache_dir=tmp_path, show_progress=False)
    with pytest.raises(LinearizeError, match="nope"):
        list(Docs.iter_documents("wiki", missing))
    monkeypatch.setenv("LINEARIZE_DATA", str(missing))
    with pytest.raises(LinearizeError, match="LINEARIZE_DATA"):
        default_data_dir()
    monkeypatch.delenv("LINEARIZE_DATA")
    import linearize.data_dir

    monkeypatch.setattr(linearize.data_dir, "candidates", lambda: [("a", tmp_path / "x"), ("b", tmp_path / "y")])
    with pytest.raises(LinearizeError) as e:
        default_data_dir()
    assert str(tmp_path / "x") in str(e.value) and str(tmp_path / "y") in str(e.value)
    # a data dir without the source's file
    (tmp_path / "empty").mkdir()
    with pytest.raises(LinearizeError, match="sharegpt_en.jsonl.xz"):
        D.build_packed_data(tok, ["sharegpt"], data_dir=tmp_path / "empty", cache_dir=tmp_path, show_progress=False)


def test_default_data_dir_env(monkeypatch, data_dir):
    monkeypatch.setenv("LINEARIZE_DATA", str(data_dir))
    assert default_data_dir() == data_dir.resolve()


def test_packing_shapes_budget_and_eos(tok, tmp_path):
    seq_len = 128
    budget = 30_000
    out = build(tok, ["sharegpt"], tmp_path, seq_len=seq_len, max_train_tokens=budget, val_tokens=1_000)
    assert out.train.dtype == torch.long and out.val.dtype == torch.long
    assert out.train.shape == (budget // seq_len, seq_len)  # exactly seq_len columns, budget respected
    assert out.train.numel() <= budget
    assert out.val.shape == (-(-1_000 // seq_len), seq_len)
    assert (out.train[:, 0] == tok.bos_token_id).all() and (out.val[:, 0] == tok.bos_token_id).all()
    assert (out.train[:, 1:] != tok.bos_token_id).all()  # BOS only at the row starts
    m = out.manifest
    assert m["train"]["documents"] >= 3
    # one EOS after every document but possibly the last, which may be cut off
    assert (out.train == tok.eos_token_id).sum() >= m["train"]["documents"] - 1
    json.dumps(m)  # serialisable
    assert m["train"]["tokens"] == out.train.numel() and m["val"]["rows"] == out.val.shape[0]
    assert sum(m["train"]["tokens_per_source"].values()) == out.train.numel() - out.train.shape[0]
    assert m["seq_len"] == seq_len and m["seed"] == 0 and m["cache_key"]
    # it stopped reading early: a small share of the 16,196 conversations
    assert m["sources"][0]["documents_read"] + m["sources"][0]["documents_skipped"] < 2_000


def test_exact_packing_of_text_source(tok, tmp_path, data_dir):
    """Rows are exactly [BOS] + the EOS-joined token stream of the train documents, cut in order."""
    seq_len = 64
    out = build(tok, ["c4"], tmp_path, seq_len=seq_len, max_train_tokens=6_400, val_tokens=640)
    train_ids = {doc_id for _, doc_id in out.documents["train"]}
    docs = [d for d in Docs.iter_documents("c4", data_dir) if d.id in train_ids]
    stream = []
    for d in docs:
        stream += tok(str(d), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = out.train.shape[0]
    assert n == 100
    expected = torch.tensor(stream[: n * (seq_len - 1)]).view(n, seq_len - 1)
    expected = torch.cat([torch.full((n, 1), tok.bos_token_id), expected], dim=1)
    assert sorted(map(tuple, out.train.tolist())) == sorted(map(tuple, expected.tolist()))
    assert (out.train == tok.eos_token_id).sum() >= len(docs) - 1


def test_sharegpt_split_by_prefix_and_deterministic(tok, tmp_path):
    kw = dict(seq_len=256, max_train_tokens=20_000, val_tokens=20_000, use_cache=False)
    a = build(tok, ["sharegpt"], tmp_path, **kw)
    prefix = lambda i: Docs._sharegpt_group(i)  # noqa: E731
    train_p = {prefix(i) for _, i in a.documents["train"]}
    val_p = {prefix(i) for _, i in a.documents["val"]}
    assert val_p and train_p and not (train_p & val_p)
    # same seed -> same split and tensors; another seed -> another split
    b = build(tok, ["sharegpt"], tmp_path, **kw)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    c = build(tok, ["sharegpt"], tmp_path, seed=1, **kw)
    assert {i for _, i in c.documents["val"]} != {i for _, i in a.documents["val"]}


def test_train_val_disjoint_documents(tok, tmp_path):
    out = build(tok, ["wiki", "shakespeare"], tmp_path, seq_len=128, max_train_tokens=30_000, val_tokens=5_000)
    tr = {tuple(x) for x in out.documents["train"]}
    va = {tuple(x) for x in out.documents["val"]}
    assert tr and va and not (tr & va)


def test_cache_hit_and_miss(tok, tmp_path, monkeypatch):
    kw = dict(seq_len=128, max_train_tokens=4_000, val_tokens=500)
    first = build(tok, ["dolly", "c4"], tmp_path, **kw)
    assert first.manifest["cache_hit"] is False
    key_dir = tmp_path / "cache" / first.manifest["cache_key"]
    assert (key_dir / "packed.pt").is_file()

    def boom(*a, **k):
        raise AssertionError("tokenised again despite a cache hit")

    monkeypatch.setattr(D, "_tokenise_batch", boom)
    second = build(tok, ["dolly", "c4"], tmp_path, **kw)
    assert second.manifest["cache_hit"] is True
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert second.train.dtype == torch.long
    assert second.documents == first.documents
    monkeypatch.undo()
    third = build(tok, ["dolly", "c4"], tmp_path, **{**kw, "seq_len": 64})
    assert third.manifest["cache_hit"] is False
    assert third.manifest["cache_key"] != first.manifest["cache_key"]
    assert third.train.shape[1] == 64


def test_env_cache_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "envcache"))
    out = D.build_packed_data(tok, ["wiki"], seq_len=64, max_train_tokens=640, val_tokens=64, show_progress=False)
    assert (tmp_path / "envcache" / out.manifest["cache_key"] / "packed.pt").is_file()


def test_mixing_is_token_balanced(tok, tmp_path):
    kw = dict(seq_len=128, max_train_tokens=40_000, val_tokens=0, use_cache=False)
    eq = build(tok, ["c4", "dolly"], tmp_path, **kw).manifest["train"]["tokens_per_source"]
    assert 0.6 < eq["c4"] / eq["dolly"] < 1.6
    w = build(tok, ["c4:3", "dolly"], tmp_path, **kw).manifest
    tps = w["train"]["tokens_per_source"]
    assert 2.0 < tps["c4"] / tps["dolly"] < 4.5
    assert w["weights"] == {"c4": 3.0, "dolly": 1.0} and "token-balanced" in w["mixing"]


def test_user_jsonl_and_txt(tok, tmp_path):
    rows = [
        {"text": "Plain text document number one. " * 20},
        {"instruction": "Add two and two.", "input": "", "output": "Four."},
        {"id": "abc_0", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        {"id": "abc_1", "messages": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]},
    ] * 10
    jl = tmp_path / "mine.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(f"Paragraph {i}: " + "lorem ipsum dolor " * 15 for i in range(30)) + "\n")
    docs = list(Docs.iter_documents(str(jl)))
    assert len(docs) == 40
    assert docs[1] == "### Instruction:\nAdd two and two.\n\n### Response:\nFour."
    assert docs[2].group == "abc" and docs[3].group == "abc"
    tdocs = list(Docs.iter_documents(str(txt)))
    assert len(tdocs) == 30 and tdocs[0].startswith("Paragraph 0:")
    out = build(tok, [str(jl), str(txt)], tmp_path, seq_len=64, val_tokens=64)
    assert out.train.shape[1] == 64 and out.train.shape[0] > 0 and out.val.shape[0] >= 1
    assert {s["name"] for s in out.manifest["sources"]} == {str(jl.resolve()), str(txt.resolve())}
    assert out.manifest["data_dir"] is None  # only user files: no data dir needed
    # a txt without blank lines is one document per line
    lines = tmp_path / "lines.txt"
    lines.write_text("first doc\nsecond doc\nthird doc\n")
    assert list(Docs.iter_documents(str(lines))) == ["first doc", "second doc", "third doc"]
    with pytest.raises(LinearizeError, match="not found"):
        Docs.resolve_source(str(tmp_path / "absent.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(LinearizeError, match="text"):
        list(Docs.iter_documents(str(bad)))


def test_json_array_streaming_across_chunks():
    items = [{"instruction": f"i{k}" * (k % 7 + 1), "output": "o" * k} for k in range(50)] + [1.25, 7]
    f = io.StringIO(json.dumps(items, indent=2))
    assert list(Docs._iter_json_array(f, "mem", chunk_chars=17)) == items
    with pytest.raises(LinearizeError, match="truncated|valid"):
        list(Docs._iter_json_array(io.StringIO(json.dumps(items)[:-30]), "mem", chunk_chars=17))


def test_val_fallback_for_tiny_source(tok, tmp_path):
    txt = tmp_path / "tiny.txt"
    txt.write_text("\n\n".join(f"Doc {i} " + "words and more words " * 20 for i in range(6)))
    # a tiny val_fraction puts no document in val by hash: the last train group is moved there
    out = build(tok, [str(txt)], tmp_path, seq_len=32, val_tokens=32, val_fraction=1e-9)
    assert out.val.shape[0] == 1 and out.manifest["val_groups_moved_from_train"] >= 1
    assert not ({tuple(x) for x in out.documents["train"]} & {tuple(x) for x in out.documents["val"]})


def test_bad_arguments(tok, tmp_path):
    with pytest.raises(LinearizeError, match="max_train_tokens"):
        build(tok, ["c4"], tmp_path, seq_len=128, max_train_tokens=100)
    with pytest.raises(LinearizeError, match="Unknown data source"):
        build(tok, ["c4", "nonsense"], tmp_path)
    with pytest.raises(LinearizeError, match="fewer than one sequence"):
        txt = tmp_path / "t.txt"
        txt.write_text("a b c\n")
        build(tok, [str(txt)], tmp_path, seq_len=512, val_tokens=0)


def test_small_budget_is_fast(tok, tmp_path):
    t0 = time.perf_counter()
    out = build(tok, ["sharegpt"], tmp_path, seq_len=512, max_train_tokens=50_000, use_cache=False)
    assert time.perf_counter() - t0 < 10
    assert out.train.shape == (50_000 // 512, 512)


def test_iter_long_documents(data_dir):
    it = Docs.iter_long_documents(data_dir)
    doc_id, text = next(it)
    it.close()
    assert doc_id.startswith("pg-") and len(text) > 60_000


def test_longdocs_source_trains_on_the_documents_evaluation_leaves(data_dir):
    """The training source `longdocs` yields whole long documents but the first LONGDOCS_HELD_OUT in file order,
    which the evaluations' rows (per-position loss, reading) come from -- and those rows stop there."""
    held_out = [doc_id for doc_id, _ in itertools.islice(Docs.iter_long_documents(data_dir), Docs.LONGDOCS_HELD_OUT)]
    docs = list(Docs.iter_documents("longdocs", data_dir, limit=3))
    assert len(docs) == 3 and all(len(d) > 60_000 for d in docs)
    assert not {d.id for d in docs} & set(held_out) and docs[0].id not in held_out
    first_trained = next(itertools.islice(Docs.iter_long_documents(data_dir), Docs.LONGDOCS_HELD_OUT, None))[0]
    assert docs[0].id == first_trained and docs[0].source == "longdocs"


def test_evaluation_rows_in_file_order_stay_in_the_held_out_documents(tok, data_dir, monkeypatch):
    from linearize.models import layer_select

    monkeypatch.setattr(layer_select, "LONGDOCS_HELD_OUT", 3)
    rows, ids = layer_select.long_document_rows(tok, num_rows=3, seq_len=64, seed=None, data_dir=data_dir)
    assert rows.shape == (3, 64) and len(ids) == 3
    with pytest.raises(LinearizeError, match="only 3 of the first 3 long documents .held out of the training source"):
        layer_select.long_document_rows(tok, num_rows=4, seq_len=64, seed=None, data_dir=data_dir)
    assert layer_select.long_document_rows(tok, num_rows=4, seq_len=64, seed=0, data_dir=data_dir)[0].shape == (4, 64)


def test_long_documents_pack_into_rows_of_one_text(tok, tmp_path):
    """Mixed into the packed data, a long document fills whole rows: most rows of the `longdocs` source hold no
    document boundary (the end-of-text token) at all."""
    out = build(tok, ["longdocs"], tmp_path, seq_len=1024, max_train_tokens=24 * 1024)
    assert out.train.shape == (24, 1024)
    boundaries = (out.train == tok.eos_token_id).any(dim=1)
    assert boundaries.float().mean() < 0.2
    assert out.manifest["sources"][0]["name"] == "longdocs" and out.manifest["sources"][0]["documents_read"] <= 3
