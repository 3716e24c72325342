"""A tiny conversion gives the numbers the code gave before the training side was restructured (issue 18: typed
recipes, the driver, the Trainer split, transformers' schedules): the same per-step losses, validations and trained
weights. The golden numbers were produced by commit 6339abe (the code before the restructuring) on CPU, fp32; on
that machine the new code reproduces them bit for bit. The tolerances only allow another CPU's float rounding."""

import json

import pytest
import torch
from safetensors.torch import load_file

from linearize.train import run_recipe
from lz_train_helpers import random_data, tiny_llama, tiny_recipe

SETS = tiny_recipe(**{"stage1.max_steps": 6, "stage2.max_steps": 6, "stage1.lr_schedule": "cosine",
                      "stage2.lr_schedule": "linear", "stage2.ssd.granularity": "layer",
                      "stage2.early_stopping.enabled": "true"})

GOLDEN_LOSSES = [
    ("stage1", 1, 0.0001508832210674882), ("stage1", 2, 0.00014763417129870504), ("stage1", 3, 0.0001530200825072825),
    ("stage1", 4, 0.0001388613018207252), ("stage1", 5, 0.0001284303143620491), ("stage1", 6, 0.00013292462972458452),
    ("stage2", 1, 4.853976249694824), ("stage2", 2, 4.8255791664123535), ("stage2", 3, 4.820439338684082),
    ("stage2", 4, 4.830836772918701), ("stage2", 5, 4.874888896942139), ("stage2", 6, 4.84610652923584),
]
GOLDEN_VALIDATIONS = [  # (stage, step, hybrid, swa_only, la_only); each stage ends with its final validation
    ("stage1", 6, 4.827945586173765, 4.832389831542969, 4.828022372338079),
    ("stage2", 2, 4.826435704385081, 4.831208259828629, 4.826547191989038),
    ("stage2", 4, 4.825404997794859, 4.830361889254663, 4.825534943611391),
    ("stage2", 6, 4.824989811066659, 4.830025703676285, 4.825127632387223),
    ("stage2", 6, 4.824989811066659, 4.830025703676285, 4.825127632387223),
]
GOLDEN_WEIGHT_SUMS = {  # sums of the trained tensors of the saved model (LoRA merged)
    "model.layers.0.self_attn.feature_map_k.weight": 33.72585839219391,
    "model.layers.0.self_attn.feature_map_q.weight": 64.48677621984825,
    "model.layers.0.self_attn.k_proj.weight": -1.0004936550976709,
    "model.layers.0.self_attn.o_proj.weight": -0.6992718295150553,
    "model.layers.0.self_attn.q_proj.weight": 0.31207543023629114,
    "model.layers.0.self_attn.v_proj.weight": 0.8884222498554664,
    "model.layers.1.self_attn.feature_map_k.weight": 27.72101737864432,
    "model.layers.1.self_attn.feature_map_q.weight": 62.32641808904009,
    "model.layers.1.self_attn.k_proj.weight": -1.0025214573288395,
    "model.layers.1.self_attn.o_proj.weight": -0.05683288556065236,
    "model.layers.1.self_attn.q_proj.weight": -2.759324295762781,
    "model.layers.1.self_attn.v_proj.weight": -0.648690681802691,
}


def test_a_tiny_conversion_reproduces_the_numbers_of_the_code_before_the_restructuring(tmp_path):
    summary = run_recipe(tiny_llama(), "ssd", tmp_path / "run", overrides=SETS, data=random_data())
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["stage"], r["step"], r["loss"]) for r in records if "loss" in r]
    assert [x[:2] for x in losses] == [x[:2] for x in GOLDEN_LOSSES]
    # stage 1's losses (~1e-4) are mean squares of the difference of two nearly equal fp32 outputs: a CPU with other
    # vector units rounds them ~5e-9 apart (1e-5 relative after the cancellation); stage 2's cross-entropies as before
    assert [x[2] for x in losses[:6]] == pytest.approx([x[2] for x in GOLDEN_LOSSES[:6]], rel=1e-5, abs=2e-8)
    assert [x[2] for x in losses[6:]] == pytest.approx([x[2] for x in GOLDEN_LOSSES[6:]], rel=1e-5)
    validations = [(r["stage"], r["step"], r["val"]["hybrid"], r["val"]["swa_only"], r["val"]["la_only"])
                   for r in records if r.get("event") == "eval" and r["stage"] != "base"]
    assert [x[:2] for x in validations] == [x[:2] for x in GOLDEN_VALIDATIONS]
    assert [x[2:] for x in validations] == [pytest.approx(x[2:], rel=1e-6) for x in GOLDEN_VALIDATIONS]
    assert summary["val"] == pytest.approx(dict(zip(("hybrid", "swa_only", "la_only"), GOLDEN_VALIDATIONS[-1][2:])),
                                           rel=1e-6)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    sums = {k: float(weights[k].double().sum()) for k in GOLDEN_WEIGHT_SUMS}
    assert sums == pytest.approx(GOLDEN_WEIGHT_SUMS, rel=1e-6, abs=1e-7)
    assert torch.isfinite(torch.cat([w.flatten() for w in weights.values()])).all()
