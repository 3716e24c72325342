"""scripts/backend_snapshot.py: the bit-for-bit check of the attention paths across a refactor."""

import importlib.util
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location("backend_snapshot", Path(__file__).parents[1] / "scripts" / "backend_snapshot.py")
snapshot = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(snapshot)


def test_outputs_repeat_exactly_and_any_change_is_named(monkeypatch):
    monkeypatch.setattr(snapshot, "MODES", ["hybrid", "none"])  # two modes keep it short
    ids = torch.randint(1, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    first = snapshot._outputs("llama", {"softmax_sinks": 2}, "torch", ids, mask)
    assert {"hybrid/full", "hybrid/decode", "none/decode"} <= set(first) and any(k.startswith("grad/") for k in first)
    assert snapshot.differences(first, snapshot._outputs("llama", {"softmax_sinks": 2}, "torch", ids, mask)) == []
    changed = dict(first, **{"hybrid/full": first["hybrid/full"] + 1e-7})
    del changed["none/decode"]
    assert snapshot.differences(first, changed) == ["none/decode: only in one", "hybrid/full"]
