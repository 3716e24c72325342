"""A recipe's inference section: computation-only settings set on the trained model before it is saved, so the saved
model runs with them; the run's validation stays the trained model's without them; resume rebuilds the same model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import linearize
from linearize.train import run_recipe
from linearize.train.recipes import RecipeError, load_recipe
from lz_train_helpers import VOCAB, random_data, tiny_gemma3, tiny_llama, tiny_recipe

# a dynamic mix gate (trained in stage 2), so mix_shift has a gate to move
SETS = tiny_recipe(**{"hybrid.combine": "mix", "hybrid.mix_gate": "dynamic", "stage2.train_mixing": "true"})
# memory_block 8 < the 32-token rows, so the sparse memory takes part in the forward
INFERENCE = {"sparse_memory": 4, "memory_block": 8, "mix_shift": 1.0}
INFERENCE_SETS = [f"inference.hybrid.{k}={v}" for k, v in INFERENCE.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny conversion twice: without inference settings, and with them."""
    root = tmp_path_factory.mktemp("inference")
    plain = run_recipe(tiny_llama(), "ssd", root / "plain", overrides=SETS, data=random_data())
    with_settings = run_recipe(tiny_llama(), "ssd", root / "inference", overrides=[*SETS, *INFERENCE_SETS],
                               data=random_data())
    return root, plain, with_settings


def _inputs():
    return torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def test_saved_model_runs_with_the_settings(runs):
    from transformers import AutoModelForCausalLM

    root, _, _ = runs
    saved = linearize.load(root / "inference")
    assert {k: getattr(linearize.hybrid_config_of(saved), k) for k in INFERENCE} == INFERENCE
    plain_weights, saved_weights = load_file(str(root / "plain" / "model.safetensors")), \
        load_file(str(root / "inference" / "model.safetensors"))
    assert plain_weights.keys() == saved_weights.keys()
    assert all(torch.equal(plain_weights[k], saved_weights[k]) for k in plain_weights)  # same training
    by_hand = linearize.load(root / "plain")
    untouched = by_hand(_inputs()).logits
    linearize.set_hybrid(by_hand, **INFERENCE)
    logits = saved(_inputs()).logits
    assert torch.equal(logits, by_hand(_inputs()).logits)
    assert (logits - untouched).abs().max() > 1e-3  # the settings change what the model computes
    auto = AutoModelForCausalLM.from_pretrained(root / "inference").eval()  # the plain HF path too
    assert torch.equal(auto(_inputs()).logits, logits)


def test_validation_is_the_trained_models_and_the_summary_records_the_settings(runs):
    root, plain, with_settings = runs
    assert with_settings["inference_hybrid"] == INFERENCE and plain["inference_hybrid"] == {}
    assert json.loads((root / "inference" / "summary.json").read_text())["inference_hybrid"] == INFERENCE
    from linearize.commands.convert import format_summary

    assert "the saved model runs with sparse_memory=4, memory_block=8, mix_shift=1.0" in format_summary(with_settings)
    assert "runs with" not in format_summary(plain)
    assert with_settings["val"] == plain["val"]
    assert [v["val"] for v in with_settings["stages"].values()] == [v["val"] for v in plain["stages"].values()]

    def record(name):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_s" not in k}
                for line in (root / name / "train_log.jsonl").read_text().splitlines()]

    assert [r.get("val") for r in record("inference")] == [r.get("val") for r in record("plain")]
    assert [r.get("loss") for r in record("inference")] == [r.get("loss") for r in record("plain")]


def test_resume_of_a_finished_run_rebuilds_the_same_model(runs, tmp_path):
    root, _, with_settings = runs
    out = tmp_path / "run"
    shutil.copytree(root / "inference", out)
    before_config = json.loads((out / "config.json").read_text())
    before = load_file(str(out / "model.safetensors"))
    for name in ("model.safetensors", "config.json", "summary.json"):  # rebuilt from the checkpoints, not kept
        (out / name).unlink()
    summary = run_recipe(tiny_llama(), None, out, data=random_data(), resume=True)
    assert summary["inference_hybrid"] == INFERENCE and summary["val"] == with_settings["val"]
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "config.json").read_text())["linearize"] == before_config["linearize"]


def test_resume_of_a_finished_run_keeps_its_gate_report_unmeasured(runs, tmp_path, monkeypatch):
    """A restored pack written out again (nothing trained, nothing changed) takes the gate report its summary holds
    instead of a forward over the validation rows; one that trains again measures it."""
    import linearize.models.convert as convert

    root, _, with_settings = runs
    out = tmp_path / "run"
    shutil.copytree(root / "inference", out)
    for name in ("model.safetensors", "config.json"):
        (out / name).unlink()
    assert with_settings["mixing"]["gate"] == "dynamic"
    measured = []
    real = convert.mixing_report
    monkeypatch.setattr(convert, "mixing_report", lambda *a, **k: measured.append(1) or real(*a, **k))
    summary = run_recipe(tiny_llama(), None, out, data=random_data(), resume=True)
    assert measured == [] and summary["mixing"] == with_settings["mixing"]
    assert json.loads((out / "summary.json").read_text())["mixing"] == with_settings["mixing"]
    fresh = run_recipe(tiny_llama(), "ssd", tmp_path / "fresh", overrides=SETS, data=random_data())
    assert measured == [1] and fresh["mixing"]["gate"] == "dynamic"


def test_a_run_without_stage2_saves_the_settings_too(tmp_path):
    out = tmp_path / "run"
    summary = run_recipe(tiny_llama(), "la-only", out, overrides=[*tiny_recipe(), "inference.hybrid.window=16"],
                         data=random_data())
    assert summary["inference_hybrid"] == {"window": 16}
    saved = linearize.load(out)
    assert linearize.hybrid_config_of(saved).window == 16
    stored = load_recipe(str(out / "recipe.yaml"))  # trained at window 8, saved at 16
    assert stored["hybrid"]["window"] == 8 and stored["inference"]["hybrid"] == {"window": 16}


def test_the_long_context_recipe_runs_and_saves_its_settings(tmp_path):
    """The shipped recipe end to end at tiny sizes (its memory at this scale): the global layer only, saved with the
    query-chosen sparse memory, its re-read and the gate shift, and the saved model generates with them."""
    out = tmp_path / "run"
    sizes = ["inference.hybrid.sparse_memory=4", "inference.hybrid.memory_reread=3"]
    summary = run_recipe(tiny_gemma3(), "long-context", out, overrides=[*tiny_recipe(), *sizes], data=random_data())
    assert summary["inference_hybrid"] == {"sparse_memory": 4, "memory_select": "query", "mix_shift": 1.0,
                                           "memory_fill": False, "memory_reread": 3}
    saved = linearize.load(out)
    config = linearize.hybrid_config_of(saved)
    assert (config.sparse_memory, config.memory_select, config.memory_reread, config.mix_shift) == (4, "query", 3, 1.0)
    assert not config.memory_fill  # as the recipe's measured variant ran
    assert (config.softmax_sinks, config.mix_gate, config.layers) == (8, "dynamic", [2])  # tiny_gemma3's global layer
    prompt = torch.randint(0, saved.config.vocab_size, (1, 3 * (config.window + config.softmax_sinks)))
    new = saved.generate(prompt, max_new_tokens=3, do_sample=False)[0, prompt.shape[1]:]
    assert new.shape == (3,)


@pytest.mark.parametrize("bad", ["inference.hybrid.combine=shared_norm", "inference.hybrid.windw=3",
                                 "inference.hybrid.mix_gate=learned", "inference.hybrid.sparse_memory=-1",
                                 "output.merge_lora=false"])
def test_bad_settings_fail_in_one_line_before_out_is_touched(bad, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as info:
        run_recipe(tiny_llama(), "ssd", out, overrides=[*SETS, *INFERENCE_SETS, bad], data=random_data())
    assert "\n" not in str(info.value) and "inference.hybrid" in str(info.value)
    assert not out.exists()
