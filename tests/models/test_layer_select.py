"""hybrid.layers='measured:K' (linearize.models.layer_select): each layer's loss increase when cut alone to window
+ sinks, the ranking and choice, the conversion run that resolves it, and `linearize select-layers`."""

from __future__ import annotations

import copy
import json
import lzma
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize.cli import main
from linearize.config import HybridConfig, measured_keep
from linearize.errors import LinearizeError
from linearize.models import layer_select
from linearize.models.convert import hybrid_modules
from linearize.models.window_sinks import window_sinks
from linearize.train import run_recipe
from tiny_models import bpe_tokenizer, tiny_model

WINDOW, SINKS = 8, 2
TEXT = ("A river runs through the valley and the mill turns by its water. The miller counts the sacks of grain "
        "and sends them to the town across the old stone bridge. ")


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory whose longdocs/ holds five short 'long documents', different from each other."""
    d = tmp_path_factory.mktemp("data")
    (d / "longdocs").mkdir()
    words = TEXT.split()
    rows = [{"id": f"doc-{i}", "text": " ".join(words[i:] + words[:i]) * 3} for i in range(5)]
    (d / "longdocs" / "longdocs.jsonl.xz").write_bytes(lzma.compress("\n".join(map(json.dumps, rows)).encode()))
    return d


def _model(family: str = "llama", layers: int = 3, **kw):
    extra = {} if family == "gemma3" else {"num_hidden_layers": layers}
    return tiny_model(family, vocab_size=300, **extra, **kw)


def _rows(n: int = 3, t: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _loss(model, rows) -> float:
    with torch.no_grad():
        logits = model(rows).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()


# ----------------------------------------------------------------------------- the measurement


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_each_layers_loss_is_the_cut_by_hand_and_the_converted_swa_only_layer(family):
    """Per layer: the full model's logits with that layer cut by window_sinks, and (independently, through the
    hybrid layer's own backend) that layer converted and run 'swa_only' with the same window and sinks."""
    # Gemma: local layers with a window of their own (never candidates) and final-logit softcapping
    model = _model(family, **({"sliding_window": 16, "final_logit_softcapping": 3.0} if family == "gemma3" else {}))
    rows = _rows()
    got = layer_select.measure_layers(model, rows, window=WINDOW, sinks=SINKS, batch_size=2, loss_chunk=25, chunk=16)
    base = _loss(model, rows)
    assert got["base_loss"] == pytest.approx(base, abs=1e-5)
    assert [e["layer"] for e in got["layers"]] == got["candidates"] == ([2] if family == "gemma3" else [0, 1, 2])
    for entry in got["layers"]:
        i = entry["layer"]
        with window_sinks(model, WINDOW, SINKS, layers=[i]):
            by_hand = _loss(model, rows)
        conv = linearize.convert(copy.deepcopy(model), HybridConfig(window=WINDOW, softmax_sinks=SINKS, layers=[i]))
        with linearize.components(conv, "swa_only"):
            converted = _loss(conv, rows)
        assert entry["loss"] == pytest.approx(by_hand, abs=1e-5)
        assert entry["loss"] == pytest.approx(converted, abs=1e-5)
        assert entry["delta"] == pytest.approx(by_hand - base, abs=1e-5)
    assert abs(got["layers"][0]["delta"]) > 1e-4  # the cut changes something: the comparison is not vacuous


def test_ranking_is_by_loss_increase_ties_by_index_and_the_choice_is_its_complement():
    measured = {"ranking": None, "layers": [{"layer": i, "delta": d} for i, d in enumerate([0.1, 0.5, 0.1, -0.2, 0.3])]}
    measured["ranking"] = [e["layer"] for e in sorted(measured["layers"], key=lambda e: (-e["delta"], e["layer"]))]
    assert measured["ranking"] == [1, 4, 0, 2, 3]
    assert layer_select.choose_layers(measured, 2) == ([1, 4], [0, 2, 3])
    assert layer_select.choose_layers(measured, 0) == ([], [0, 1, 2, 3, 4])
    with pytest.raises(LinearizeError, match="out of range"):
        layer_select.choose_layers(measured, 5)
    # and the measurement ranks the same way
    got = layer_select.measure_layers(_model(layers=4), _rows(2, 32), window=WINDOW, sinks=SINKS)
    deltas = {e["layer"]: e["delta"] for e in got["layers"]}
    assert sorted(got["ranking"]) == [0, 1, 2, 3]
    assert all(deltas[a] >= deltas[b] for a, b in zip(got["ranking"], got["ranking"][1:]))


def test_select_layers_is_deterministic_json_and_records_its_rows(tokenizer, data_dir):
    model = _model()

    def run(seed):
        return layer_select.select_layers(model, tokenizer, 1, window=WINDOW, sinks=SINKS, num_rows=2, seq_len=32,
                                          seed=seed, data_dir=data_dir)

    a, b, other = run(0), run(0), run(3)
    for r in (a, b):
        r.pop("seconds")
    assert json.loads(json.dumps(a)) == a == b
    assert other["rows"]["documents"] != a["rows"]["documents"]  # the seed draws the documents
    assert a["rows"]["count"] == 2 and a["rows"]["seq_len"] == 32 and len(a["rows"]["sha256"]) == 64
    assert a["kept"] == a["ranking"][:1] and a["convert"] == sorted(a["ranking"][1:]) and a["spec"] == "measured:1"
    rows, _ = layer_select.long_document_rows(tokenizer, num_rows=2, seq_len=32, seed=0, data_dir=data_dir)
    with window_sinks(model, WINDOW, SINKS, layers=a["convert"]):
        assert a["converted_cut_loss"] == pytest.approx(_loss(model, rows), abs=1e-5)
    with window_sinks(model, WINDOW, SINKS, layers="all"):
        assert a["all_cut_loss"] == pytest.approx(_loss(model, rows), abs=1e-5)
    assert rows[:, 0].eq(tokenizer.bos_token_id).all()
    md = layer_select.selection_markdown(a)
    assert f"--set hybrid.layers={layer_select.layers_setting(a['convert'])}" in md and md.count("| convert |") == 2


# ----------------------------------------------------------------------------- the setting and its errors


def test_the_measured_setting_parses_and_refuses_malformed_values():
    assert measured_keep("measured:3") == 3 and measured_keep("global") is None and measured_keep([1, 2]) is None
    assert HybridConfig(layers="measured:0").layers == "measured:0"
    for bad in ("measured", "measured:", "measured:x", "measured:-1", "measuredx:2", "globall"):
        with pytest.raises(ValueError, match="HybridConfig.layers"):
            HybridConfig(layers=bad)
    with pytest.raises(LinearizeError, match="chosen by measurement"):
        linearize.convert(_model(), HybridConfig(layers="measured:1"))


def test_keep_out_of_range_or_no_full_attention_layer_is_a_clear_error(tokenizer):
    with pytest.raises(LinearizeError, match=r"K out of range; this model has 3 full-attention layers \[0, 1, 2\], "
                                             r"so K .* must be 0 to 2"):
        layer_select.check_keep(_model(), 3)
    with pytest.raises(LinearizeError, match="must be 0 to 0"):
        layer_select.check_keep(_model("gemma3"), 1)  # one global layer: it can only be converted
    with pytest.raises(LinearizeError, match="no full-attention layer"):
        layer_select.select_layers(_model("mistral"), tokenizer, 0, window=WINDOW, sinks=SINKS, texts=[TEXT * 4])
    with pytest.raises(LinearizeError, match="must exceed window 8 \\+ sinks 2"):
        layer_select.select_layers(_model(), tokenizer, 1, window=WINDOW, sinks=SINKS, seq_len=10, texts=[TEXT * 4])
    with pytest.raises(LinearizeError, match="only 0 of 1 long documents have 4096 tokens"):
        layer_select.select_layers(_model(), tokenizer, 1, window=WINDOW, sinks=SINKS, seq_len=4096, texts=[TEXT])


# ----------------------------------------------------------------------------- the conversion run


def _sets(**extra) -> list[str]:
    sets = {"hybrid.window": WINDOW, "hybrid.softmax_sinks": SINKS, "hybrid.chunk_size": 8, "hybrid.layers": "measured:1",
            "layer_selection.rows": 2, "layer_selection.seq_len": 32, "stage1.batch_size": 2, "stage1.grad_accum": 1,
            "stage1.epochs": 1, "stage1.max_steps": 2, "stage1.checkpoint_every": 1, "stage1.query_block": 8,
            "eval.batch_size": 2, "eval.max_val_rows": 2, "runtime.cpu": True, "runtime.show_progress": False}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def _data():
    """What run_recipe takes as ready data: train and val rows, a manifest."""
    return SimpleNamespace(train=_rows(8, 24, seed=1), val=_rows(2, 24, seed=2), manifest={})


def test_a_measured_run_converts_the_complement_and_loads_without_measuring(tokenizer, data_dir, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "run"
    summary = run_recipe(_model(), "la-only", out, overrides=_sets(), data=_data(), tokenizer=tokenizer,
                         data_dir=str(data_dir))
    record = json.loads((out / "layer_selection.json").read_text())
    assert record["kind"] == "layer_selection" and record["keep"] == 1 and record["window"] == WINDOW
    assert len(record["kept"]) == 1 and sorted(record["kept"] + record["convert"]) == [0, 1, 2]
    assert summary["layer_selection"] == {"spec": "measured:1", "kept": record["kept"], "convert": record["convert"]}
    assert "measured:1" in (out / "recipe.yaml").read_text()

    def measuring(*args, **kwargs):
        raise AssertionError("loading a converted model measured again")

    monkeypatch.setattr(layer_select, "select_layers", measuring)
    loaded = linearize.load(out)
    assert sorted(m.layer_idx for m in hybrid_modules(loaded)) == record["convert"]
    assert loaded.config.linearize["layers"] == record["convert"]


def test_a_measured_run_resumes_with_its_recorded_choice(tokenizer, data_dir, tmp_path, monkeypatch):
    from linearize.train import loop

    out = tmp_path / "run"
    with pytest.raises(loop.RunInterrupted):
        run_recipe(_model(), "la-only", out, overrides=_sets(), data=_data(), tokenizer=tokenizer,
                   data_dir=str(data_dir), interrupt_after=1)
    record = json.loads((out / "layer_selection.json").read_text())
    monkeypatch.setattr(layer_select, "select_layers", lambda *a, **k: pytest.fail("a resumed run measured again"))
    summary = run_recipe(_model(), None, out, data=_data(), tokenizer=tokenizer, data_dir=str(data_dir), resume=True)
    assert summary["layer_selection"]["convert"] == record["convert"]


def test_a_measured_run_refuses_bad_settings(tokenizer, data_dir, tmp_path):
    with pytest.raises(LinearizeError, match="K out of range"):
        run_recipe(_model(), "la-only", tmp_path / "a", overrides=_sets(**{"hybrid.layers": "measured:3"}),
                   data=_data(), tokenizer=tokenizer, data_dir=str(data_dir))
    assert not (tmp_path / "a" / "data_manifest.json").exists()  # refused as soon as the model is loaded
    with pytest.raises(LinearizeError, match="Long documents file not found"):
        run_recipe(_model(), "la-only", tmp_path / "b", overrides=_sets(), data=_data(), tokenizer=tokenizer,
                   data_dir=str(tmp_path))
    assert not (tmp_path / "b").exists()
    with pytest.raises(LinearizeError, match="layer_selection.seq_len=10 must exceed"):
        run_recipe(_model(), "la-only", tmp_path / "c", overrides=_sets(**{"layer_selection.seq_len": 10}),
                   data=_data(), tokenizer=tokenizer, data_dir=str(data_dir))
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("base") / "tiny"
    _model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["select-layers", str(model_dir), "--window", str(WINDOW), "--sinks", str(SINKS), "--rows", "2",
            "--seq-len", "32", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out), *extra]


def test_select_layers_command_writes_record_table_plot(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "sel"
    assert main(_args(model_dir, data_dir, out, "--keep", "1")) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "layer_selection.json").read_text())
    assert f"--set hybrid.layers={layer_select.layers_setting(record['convert'])}" in printed
    assert record["meta"]["command"] and record["rows"]["documents"]
    assert "| rank | layer |" in (out / "layer_selection.md").read_text()
    assert (out / "layer_selection.png").read_bytes()[:4] == b"\x89PNG"
    # without --keep: the ranking only, the same measurement
    assert main(_args(model_dir, data_dir, tmp_path / "rank")) == 0
    ranked = json.loads((tmp_path / "rank" / "layer_selection.json").read_text())
    assert ranked["keep"] is None and "convert" not in ranked and "--set" not in capsys.readouterr().out
    assert ranked["layers"] == record["layers"] and ranked["ranking"] == record["ranking"]


@pytest.mark.parametrize("extra, message", [
    (["--keep", "3"], "K out of range"),
    (["--keep", "-1"], "--keep must be >= 0"),
    (["--seq-len", "10"], "must exceed --window 8 + --sinks 2"),
    (["--window", "0"], "need --window >= 1"),
])
def test_select_layers_command_bad_input_is_one_line_before_writing(model_dir, data_dir, tmp_path, capsys, extra,
                                                                    message):
    out = tmp_path / "sel"
    assert main(_args(model_dir, data_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("linearize select-layers: error:")]  # besides load progress
    assert message in line and "Traceback" not in err
    assert not out.exists()


def test_select_layers_command_without_long_documents(model_dir, tmp_path, capsys):
    assert main(_args(model_dir, tmp_path, tmp_path / "sel")) == 2
    assert "Long documents file not found" in capsys.readouterr().err


def test_long_document_rows_in_file_order_pass_over_short_documents(tokenizer, data_dir):
    rows, ids = layer_select.long_document_rows(tokenizer, num_rows=2, seq_len=32, seed=None, data_dir=data_dir)
    assert ids == ["doc-0", "doc-1"] and rows.shape == (2, 32)
    expected = tokenizer(" ".join(TEXT.split()) * 3, add_special_tokens=False)["input_ids"][:31]
    assert rows[0].tolist() == [tokenizer.bos_token_id] + expected
    rows, ids = layer_select.long_document_rows(tokenizer, num_rows=1, seq_len=32, seed=None,
                                                texts={"short": "A river.", "long": TEXT})
    assert ids == ["long"]
