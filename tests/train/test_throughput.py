"""Conversion throughput (`linearize bench --conversion`) on tiny random models on the CPU."""

import json
import math

import pytest

from linearize.cli import main
from linearize.bench.throughput import measure
from lz_train_helpers import tiny_gemma3, tiny_llama

TINY = dict(steps=2, warmup=1, seq_len=32, batch_size=2, preset="cpu", show_progress=False)
WINDOW = ["hybrid.window=8", "hybrid.chunk_size=8"]  # below the 32-token rows, so the linear branch has keys


def check_timing(row: dict, steps: int = 2) -> None:
    assert "error" not in row, row
    assert row["steps"] == steps == len(row["step_seconds"])
    assert row["tokens"] == steps * row["tokens_per_step"] == steps * row["batch_size"] * row["grad_accum"] * row["seq_len"]
    assert math.isclose(row["seconds"], sum(row["step_seconds"]))
    assert row["tokens_per_s"] > 0 and math.isclose(row["tokens_per_s"], row["tokens"] / row["seconds"])
    assert row["median_step_s"] > 0 and row["peak_mib"] > 0


@pytest.mark.parametrize("tiny", [tiny_llama, tiny_gemma3])
def test_every_stage_of_every_recipe_is_measured_once(tiny):
    res = measure(tiny(), ("lolcats", "ssd", "hedgecats", "la-only"), overrides=WINDOW, **TINY)
    rows = {(r["stage"], r["what"], tuple(r["recipes"])) for r in res["rows"]}
    assert rows == {
        ("eval", "base", ("lolcats", "ssd", "hedgecats", "la-only")),
        ("eval", "hybrid", ("lolcats",)), ("eval", "la_only", ("lolcats",)),
        ("stage1", "transfer: hybrid_output", ("lolcats",)), ("stage2", "LoRA", ("lolcats",)),
        # ssd, hedgecats and la-only share the hybrid config and the weights transfer (la-only trains 1 epoch, not 2)
        ("eval", "hybrid", ("ssd", "hedgecats", "la-only")), ("eval", "la_only", ("ssd", "hedgecats", "la-only")),
        ("stage1", "transfer: weights", ("ssd", "hedgecats", "la-only")),
        ("stage2", "LoRA + SSD", ("ssd",)), ("stage2", "LoRA", ("hedgecats",)),
        # the base's own LoRA step: the recipes with a stage 2 fine-tune with the same LoRA, rows and length
        ("anchor", "base LoRA", ("lolcats", "ssd", "hedgecats")),
    }
    assert set(res["convert_seconds"]) == {"lolcats", "ssd", "hedgecats"}  # nothing left to measure for la-only
    for row in res["rows"]:
        check_timing(row)
        if row["stage"] != "eval":
            assert row["trainable_params"] > 0 and row["max_param_change"] > 0, row  # the timed steps really trained
            anchor = next(r for r in res["rows"] if r["stage"] == "anchor")
            assert math.isclose(row["cost_vs_base_lora"], anchor["tokens_per_s"] / row["tokens_per_s"])
    anchor = next(r for r in res["rows"] if r["stage"] == "anchor")
    lora = next(r for r in res["rows"] if r["what"] == "LoRA" and r["recipes"] == ["lolcats"])
    # the base LoRA trains only LoRA weights on the same rows: fewer trainable parameters than lolcats' stage 2 has
    # (which adds none of its own) only if the targets differ; here they are the same
    assert anchor["trainable_params"] == lora["trainable_params"] and anchor["seq_len"] == lora["seq_len"]
    assert anchor["batch_size"] * anchor["grad_accum"] == lora["batch_size"] * lora["grad_accum"]
    assert next(r for r in res["rows"] if r["what"] == "LoRA + SSD")["swa_dropped"] in (0.0, 0.5, 1.0)


def test_a_self_distillation_stage_2_is_timed_against_the_base_lora_step():
    # stage 2 as KL from the base with no adapters (the long-context runs): the anchor is still the base's own
    # next-token LoRA step, and the row says what the stage trains
    kl = ["stage2.objective=kl", "stage2.lora.enabled=false", "stage2.train_feature_maps=true", "stage2.train_mixing=true"]
    res = measure(tiny_llama(), ("lolcats",), overrides=WINDOW + kl, **TINY)
    rows = {r["stage"]: r for r in res["rows"] if r["stage"] != "eval"}
    assert rows["stage2"]["what"] == "feature maps + gate, kl" and rows["anchor"]["what"] == "base LoRA"
    for row in rows.values():
        check_timing(row)
        assert row["trainable_params"] > 0 and row["max_param_change"] > 0, row
    assert rows["anchor"]["trainable_params"] != rows["stage2"]["trainable_params"]  # LoRA there, feature maps here
    assert math.isclose(rows["stage2"]["cost_vs_base_lora"], rows["anchor"]["tokens_per_s"] / rows["stage2"]["tokens_per_s"])


def test_a_stage_that_does_not_fit_is_recorded_and_the_others_still_run(monkeypatch):
    """A stage whose one-row micro-batch does not fit the device (the trainer's DoesNotFitError, after splitting as
    far as it goes) is that row's error; the rows before and after it are measured and the results returned (a
    session-25 GPU run lost every row to one stage 2 that did not fit)."""
    from linearize.bench import throughput
    from linearize.errors import DoesNotFitError

    real = throughput._train_row

    def stage2_does_not_fit(model, name, *args, **kwargs):
        if name == "stage2" and any(p.requires_grad and "lora" not in n for n, p in model.named_parameters()):
            raise DoesNotFitError("stage2: a micro-batch of 1 row(s) of 32 tokens does not fit in GPU memory")
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(throughput, "_train_row", stage2_does_not_fit)
    kl = ["stage2.objective=kl", "stage2.lora.enabled=false", "stage2.train_feature_maps=true"]
    res = measure(tiny_llama(), ("lolcats",), overrides=WINDOW + kl, **TINY)
    rows = {r["stage"]: r for r in res["rows"] if r["stage"] != "eval"}
    assert rows["stage2"]["error"].startswith("DoesNotFitError: stage2: a micro-batch")
    for stage in ("stage1", "anchor"):
        check_timing(rows[stage])


def test_cli_writes_json_and_markdown(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<unk>")), unk_token="<unk>",
                            bos_token="<s>", eos_token="</s>").save_pretrained(model_dir)
    out = tmp_path / "results"
    args = ["bench", "--conversion", "--model", str(model_dir), "--recipes", "ssd", "--set", "stage1.objective=output",
            "--steps", "2", "--warmup", "1", "--seq-len", "32", "--batch-size", "2", "--preset", "cpu",
            "--out-dir", str(out), "--no-progress", *[a for kv in WINDOW for a in ("--set", kv)]]
    assert main(args) == 0
    res = json.loads((out / "conversion.json").read_text())
    env = res["environment"]
    assert env["torch"] and env["transformers"] and env["device"] and env["git_commit"]
    assert env["command"].startswith("linearize bench")
    assert (res["commit"], res["device"], res["command"]) == (env["git_commit"], env["device"], env["command"])
    assert res["model"] == str(model_dir) and res["load_seconds"] > 0 and res["convert_seconds"]["ssd"] > 0
    assert res["recipes"]["ssd"]["data"]["seq_len"] == 32 and res["recipes"]["ssd"]["stage1"]["objective"] == "output"
    assert [(r["stage"], r["what"]) for r in res["rows"]] == [
        ("eval", "base"), ("eval", "hybrid"), ("eval", "la_only"), ("stage1", "transfer: output"), ("stage2", "LoRA + SSD"),
        ("anchor", "base LoRA")]
    for row in res["rows"]:
        check_timing(row)
    md = (out / "conversion.md").read_text()
    assert "| stage1 | transfer: output | ssd | 2 × 32 |" in md and "peak RSS MiB" in md and "× base LoRA" in md
    stage2 = next(r for r in res["rows"] if r["stage"] == "stage2")
    assert f"| {stage2['cost_vs_base_lora']:.2f} |" in md


def test_a_random_weight_shape_needs_no_model_files(monkeypatch):
    from linearize.bench import throughput

    model = tiny_llama()
    asked = []

    def shape(name):
        asked.append(name)
        return model.config, type(model)

    monkeypatch.setattr(throughput, "decode_shape", shape)
    res = measure("shape:llama3-8b", ("lolcats",), overrides=WINDOW, **TINY)
    assert asked == ["llama3-8b"] and res["model"] == "shape:llama3-8b"
    stage2 = next(r for r in res["rows"] if r["stage"] == "stage2")
    check_timing(stage2)
    assert stage2["cost_vs_base_lora"] > 0


def test_the_kernels_that_trained_the_linear_states_are_recorded_where_fla_refused(monkeypatch):
    """Where fla refuses its gated backward, the route's decisions (which kernels trained each state, and why) go
    into the record and its table, so a throughput row says what it measured; elsewhere nothing is added."""
    from linearize.attention.linear import fla_route
    from linearize.bench.throughput import render_markdown

    monkeypatch.setattr(fla_route, "DECISIONS", {})
    res = measure(tiny_llama(), ("lolcats",), overrides=[*WINDOW, "stage2.enabled=false"], **TINY)
    assert "fla_backward" not in res
    monkeypatch.setitem(fla_route.DECISIONS, "delta m=128 d=128 cuda:0", "fla")
    res = measure(tiny_llama(), ("lolcats",), overrides=[*WINDOW, "stage2.enabled=false"], **TINY)
    assert res["fla_backward"] == {"delta m=128 d=128 cuda:0": "fla"}
    res["environment"] = dict(device="cpu", torch="2", transformers="5", git_commit="abc", command="x")
    assert "the linear states trained on: delta m=128 d=128 cuda:0: fla." in render_markdown(res)
