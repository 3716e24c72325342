"""diagnose(): the five component modes on a constructed case, recoveries, and the 'LA zeroed' control."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import linearize
from linearize.evaluate.diagnose import diagnose, diagnose_markdown, recovery

from lz_eval_helpers import DATA, bag_model, tiny_llama, word_tokenizer

G = 30  # goal words; the last 6 lie in a window of 8, the first ones among the 8 sinks, 6..23 in between


def _question(a_at, b_at):
    words = [f"f{i % 8}" for i in range(G)]
    for j in a_at:
        words[j] = "A"
    for j in b_at:
        words[j] = "B"
    # correct answer second: lm-eval's argmax takes the first of tied answers, so a tie scores wrong
    return {"goal": " ".join(words), "sol1": "B", "sol2": "A", "label": 1}


def _constructed_piqa(tmp_path):
    """Questions each component can or cannot answer (A = right answer, B = wrong one):

    * 3 x 'window': A once inside the window, B twice in the middle: SWA right; LA (all keys) sees B
      twice -> wrong; hybrid right (gamma*1 = 0.1 > 2 * 2/d = 0.0625); sinks and none see neither -> tie.
    * 1 x 'middle': A twice in the middle, B once among the sinks: LA and hybrid right, sinks wrong.
    * 1 x 'sink': A once among the sinks only: hybrid, LA and sinks right; SWA sees nothing.
    Expected accuracy: hybrid 5/5 > swa_only 3/5 > la_only 2/5 > sinks_only 1/5 > none 0/5
    (the base model, uniform softmax over all keys = LA's counts: 2/5).
    """
    rows = [_question([G - 2], [10, 14])] * 3 + [_question([10, 14], [0]), _question([0], [])]
    d = tmp_path / "data" / "piqa"
    d.mkdir(parents=True)
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"


def test_five_modes_in_expected_order(tmp_path):
    data = _constructed_piqa(tmp_path)
    tok = word_tokenizer()
    base = bag_model()
    model = linearize.convert(copy.deepcopy(base), linearize.HybridConfig(window=8, init_noise=0.0))
    rec = diagnose(model, tok, tasks=["piqa"], base=(base, tok), data_dir=data, bootstrap=50, batch_size=8,
                   device="cpu", progress=None)
    scores = {label: row["scores"]["piqa"] for label, row in rec["table"].items()}
    assert scores == pytest.approx({"base": 0.4, "hybrid": 1.0, "swa_only": 0.6, "la_only": 0.4,
                                    "sinks_only": 0.2, "none": 0.0})
    assert list(rec["runs"]) == ["base", "hybrid", "swa_only", "la_only", "sinks_only", "none"]
    row = rec["table"]["swa_only"]
    assert row["recovery"]["average"] == pytest.approx(0.6 / 0.4)
    assert row["above_floor"]["average"] == pytest.approx((0.6 - 0.0) / (0.4 - 0.0))
    assert rec["table"]["none"]["above_floor"]["average"] == 0.0
    # prompt lengths: all 5 questions are longer than the window of 8 tokens
    lengths = rec["lengths"]["piqa"]
    assert lengths["n"] == 5 and lengths["fits"]["window"] == 0.0 and rec["window"] == 8
    md = diagnose_markdown({"meta": {"model": "bag"}, **rec})
    for name in ("SWA + Linear", "SWA only", "Linear only", "Attn sinks only", "No attention", "Rec. above floor"):
        assert name in md


def test_recovery_arithmetic():
    assert recovery(0.5, 0.8, 0.25) == pytest.approx({"recovery": 0.625, "above_floor": (0.25) / (0.55)})
    assert recovery(0.5, 0.25, 0.25)["above_floor"] is None  # base == floor: undefined
    assert recovery(None, 0.8, 0.2) == {"recovery": None, "above_floor": None}


@pytest.mark.skipif(DATA is None, reason="benchmark data directory not found")
def test_la_only_with_empty_la_equals_none(tokenizer):
    """A ReLU feature map with W = 0 gives phi = 0: LA has no mass, so la_only outputs 0 exactly like none
    (and hybrid equals swa_only)."""
    model = tiny_llama(tokenizer, max_pos=256)
    linearize.convert(model, linearize.HybridConfig(window=4, feature_map="relu"))
    with torch.no_grad():
        for m in linearize.models.convert.hybrid_modules(model):
            m.feature_map_q.weight.zero_()
            m.feature_map_k.weight.zero_()
    rec = diagnose(model, tokenizer, tasks=["arc_easy"], limit=8, base=False, data_dir=DATA, bootstrap=20,
                   modes=("hybrid", "swa_only", "la_only", "none"), device="cpu", progress=None)
    assert "base" not in rec["runs"]
    for task in ("arc_easy",):
        for metric in ("acc", "acc_norm"):
            assert rec["runs"]["la_only"][task][metric] == rec["runs"]["none"][task][metric]
            assert rec["runs"]["hybrid"][task][metric] == rec["runs"]["swa_only"][task][metric]
    assert math.isnan(rec["table"]["la_only"]["recovery"]["average"] or math.nan)


@pytest.mark.skipif(DATA is None, reason="benchmark data directory not found")
def test_diagnose_cli_all_parts(tokenizer, tmp_path, capsys):
    """`linearize diagnose BASE_DIR`: base run, untrained conversion, five modes, probes and attribution."""
    from linearize.cli import main

    model_dir = tmp_path / "base"
    tiny_llama(tokenizer, max_pos=512).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["diagnose", str(model_dir), "--tasks", "piqa", "--limit", "3", "--no-check", "--window", "8",
               "--bootstrap", "10", "--device", "cpu", "--what", "benchmarks,probes,attribution", "--modes", "hybrid,none",
               "--attr-seqs", "1", "--attr-len", "64", "--docs", "1", "--doc-len", "96", "--contexts", "96",
               "--trials", "1", "--out", str(out)])
    assert rc == 0
    diag = json.loads((out / "diagnose.json").read_text())
    assert list(diag["runs"]) == ["base", "hybrid", "none"]
    assert diag["info"]["kind"] == "converted_untrained" and diag["window"] == 8
    assert diag["meta"]["command"].startswith("linearize") and "commit" in diag["meta"]
    probes = json.loads((out / "probes.json").read_text())
    assert list(probes["position_loss"]["curves"]) == ["base", "hybrid", "swa_only"]
    assert set(probes["passkey"]["accuracy"]) == {"base", "hybrid", "swa_only"}
    attr = json.loads((out / "attribution.json").read_text())
    assert attr["layers"] == [0, 1]
    for name in ("diagnose.md", "probes.md", "attribution.md", "attribution.png", "position_loss.png"):
        assert (out / name).is_file(), name
    assert "SWA + Linear" in capsys.readouterr().out


@pytest.mark.skipif(DATA is None, reason="benchmark data directory not found")
def test_diagnose_cli_converted_dir_scores_its_base(tokenizer, tmp_path):
    """`linearize diagnose RUN` on a converted directory: the base recorded in its summary.json is scored too (the
    recoveries need it), and the record says the model is a conversion of it."""
    from linearize.cli import main

    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    base = tiny_llama(tokenizer, max_pos=512)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    linearize.convert(base, linearize.HybridConfig(window=8)).save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({"model": str(base_dir), "recipe": "lolcats"}))
    out = tmp_path / "out"
    assert main(["diagnose", str(run_dir), "--tasks", "piqa", "--limit", "3", "--no-check", "--bootstrap", "10",
                 "--device", "cpu", "--modes", "hybrid", "--out", str(out)]) == 0
    diag = json.loads((out / "diagnose.json").read_text())
    assert list(diag["runs"]) == ["base", "hybrid"]
    assert diag["info"]["kind"] == "converted" and diag["info"]["base"] == str(base_dir)
    assert diag["info"]["recipe"] == "lolcats" and "recipe lolcats" in (out / "diagnose.md").read_text()
    assert diag["table"]["hybrid"]["recovery"]["average"] is not None
