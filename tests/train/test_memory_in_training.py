"""A conversion trained with the sparse exact memory in the loop (scripts/gpu_long_qwen.sh's delta-all-memtrain: the
online 'recall' memory, since a teacher-forced row has no prompt end for the query-chosen one): the recipe runs end
to end with it, saves it in the model's config, and the memory changes what the trained layers compute."""

import pytest
import torch

from linearize import load, set_hybrid
from linearize.models.convert import hybrid_config_of
from linearize.train import run_recipe
from lz_train_helpers import random_data, tiny_llama, tiny_recipe

# the Qwen script's conversion at tiny size: delta state, window + sinks, dynamic gate, hybrid_output in stage 1,
# SSD drawn per layer, each layer recomputed in the backward pass; the memory keeps 4 exact keys in blocks of 8
MEMTRAIN = tiny_recipe(**{"hybrid.linear_state": "delta", "hybrid.softmax_sinks": 2, "hybrid.combine": "mix",
                          "hybrid.mix_gate": "dynamic", "hybrid.sparse_memory": 4, "hybrid.memory_block": 8,
                          "stage1.objective": "hybrid_output", "stage2.ssd.granularity": "layer",
                          "stage1.gradient_checkpointing": "true", "stage2.gradient_checkpointing": "true",
                          "stage1.max_steps": 2, "stage2.max_steps": 2})


@pytest.mark.parametrize("qk_conv", [0, 3])  # 3: a short q/k convolution beside the memory, at tiny size
def test_a_run_trains_with_the_memory_and_keeps_it(tmp_path, qk_conv):
    out = tmp_path / "run"
    summary = run_recipe(tiny_llama(), "ssd", out, overrides=MEMTRAIN + [f"hybrid.qk_conv={qk_conv}"],
                         data=random_data(seq_len=48))
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["val"].values())
    model = load(out)
    cfg = hybrid_config_of(model)
    assert (cfg.sparse_memory, cfg.memory_select, cfg.linear_state, cfg.qk_conv) == (4, "recall", "delta", qk_conv)
    rows = random_data(rows=2, seq_len=48, seed=5).train
    with torch.no_grad():
        with_memory = model(input_ids=rows).logits
        set_hybrid(model, sparse_memory=0)
        without = model(input_ids=rows).logits
    # the first window's positions see the same keys either way; past it the memory's exact keys change the output
    torch.testing.assert_close(with_memory[:, :8], without[:, :8])
    assert (with_memory[:, 24:] - without[:, 24:]).abs().amax() > 1e-4
