"""benchmarks/fused_tuning.py --smoke: the sweep runs end to end (without CUDA on the CPU under TRITON_INTERPRET=1,
set by test_triton's module code) and writes its JSON and Markdown with every launch checked against the unfused step."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import torch

import test_triton  # noqa: F401  -- sets TRITON_INTERPRET=1 without CUDA, before triton is imported

import linearize.attention.triton.decode as fused

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
if not CUDA and type(fused.fused_decode_kernel).__name__ != "InterpretedFunction":
    fused = importlib.reload(fused)  # imported earlier without the interpreter: rebuild the kernel interpreted


def tuning_module():
    spec = importlib.util.spec_from_file_location("fused_tuning", ROOT / "benchmarks" / "fused_tuning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_sweep_writes_every_launch_checked_against_the_unfused_step(tmp_path):
    before = dict(fused.TUNING)
    assert tuning_module().main(["--smoke", "--out-dir", str(tmp_path), "--name", "sweep", "--commit", "abc1234"]) == 0
    assert fused.TUNING == before  # the sweep puts the settings back
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["commit"] == "abc1234" and result["command"].startswith("python benchmarks/fused_tuning.py --smoke")
    kinds = [r["kind"] for r in result["rows"]]
    # contract 'loop' with min_tile_d 8 and 10**6: a d-tiled launch and a whole-d one; 'dot' (tiles >= 16): one
    # launch for both; then the fastest without the window, without the S loop
    assert kinds == ["unfused", "fused", "fused", "fused", "ablation", "ablation"]
    launches = [r["launch"] for r in result["rows"][1:4]]
    assert sorted((x["DOT"], x["ND"]) for x in launches) == [(False, 1), (False, 2), (True, 1)]
    tol = 2e-2 if CUDA else 1e-5  # bf16 on the GPU, fp32 interpreted
    for r in result["rows"]:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == r["batch"] / (r["ms_per_step"] * 1e-3)
        if r["kind"] == "ablation":
            assert r["launch"] == min(result["rows"][1:4], key=lambda x: x["ms_per_step"])["launch"]
        if r["kind"] == "fused":
            assert r["max_rel_err"] < tol
            assert r["speedup_vs_unfused"] == result["rows"][0]["ms_per_step"] / r["ms_per_step"]
    md = (tmp_path / "sweep.md").read_text()
    assert md.startswith("Commit `abc1234`") and md.count("| tiny | 2 | fused") == 3
