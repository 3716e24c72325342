"""benchmarks/profile_conversion.py on a tiny random model on the CPU: one timed step of the stage is profiled."""

import importlib.util
from pathlib import Path

from linearize.bench import throughput
from linearize.train import loop
from lz_train_helpers import tiny_llama

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_conversion.py"


def test_one_timed_step_of_the_stage_is_profiled(monkeypatch):
    spec = importlib.util.spec_from_file_location("profile_conversion", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    store = {}
    monkeypatch.setattr(throughput, "_train_row", script.profiled_train_row("stage1", store))
    step = loop.Trainer.train_step
    res = throughput.measure(tiny_llama(), ("lolcats",), overrides=["hybrid.window=8", "hybrid.chunk_size=8",
                             "stage2.enabled=false"], steps=2, warmup=1, seq_len=32, batch_size=2, preset="cpu",
                             show_progress=False)
    assert loop.Trainer.train_step is step  # put back
    assert [r["stage"] for r in res["rows"]] == ["eval", "eval", "eval", "stage1"]
    table = script.tables(store["prof"], store["wall_s"])
    ops = {r["name"]: r for r in table["host_ops"]}
    assert "Optimizer.step#AdamW.step" in ops and ops["Optimizer.step#AdamW.step"]["calls"] == 1  # one step profiled
    assert table["wall_ms"] > 0 and table["kernels"] == [] and table["kernel_launches"] == 0  # no GPU here
    row = next(r for r in res["rows"] if r["stage"] == "stage1")
    md = script.render(dict(device="cpu", commit="abc", command="x", stage="stage1", row=row, profile=table))
    assert md.startswith("Device **cpu**, commit `abc`") and "### Host operators by self CPU time (one step)" in md


def test_stage_two_profiles_the_converted_model_not_the_base_lora_anchor(monkeypatch):
    """The anchor (the base's own LoRA step) is timed under the name 'stage2' before the conversion's stage 2: the
    profile must be of the converted model's step."""
    from linearize.attention.module import HybridAttention

    spec = importlib.util.spec_from_file_location("profile_conversion", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    store = {}
    monkeypatch.setattr(throughput, "_train_row", script.profiled_train_row("stage2", store))
    res = throughput.measure(tiny_llama(), ("lolcats",), overrides=["hybrid.window=8", "hybrid.chunk_size=8"], steps=1,
                             warmup=1, seq_len=32, batch_size=2, preset="cpu", show_progress=False)
    stages = [r["stage"] for r in res["rows"]]
    assert "anchor" in stages and "stage2" in stages
    assert any(isinstance(m, HybridAttention) for m in store["model"].modules())
