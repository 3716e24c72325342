"""Real pretrained models: converted with swa_only and a window covering the passage, logits are the base's."""

from pathlib import Path

import pytest
import torch

import linearize
from linearize.data_dir import default_data_dir


def wikitext_passage(tokenizer, n_tokens=200):
    text = (Path(default_data_dir()) / "wikitext2" / "valid.txt").read_text()[:5000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_swa_only_full_window_reproduces_real_model(name):
    model, tokenizer = linearize.load_base(name)
    ids = wikitext_passage(tokenizer)
    with torch.no_grad():
        base = model(ids).logits
        linearize.convert(model, linearize.HybridConfig(window=256))
        with linearize.components(model, "swa_only"):
            converted = model(ids).logits
        hybrid = model(ids).logits
    diff = (converted - base).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e} (logit scale {base.abs().max().item():.1f})")
    assert diff < 2e-4
    # window 256 >= 200 tokens: no key is older than the window, so the hybrid equals softmax too
    assert (hybrid - base).abs().max().item() < 2e-4
    assert torch.equal(converted.argmax(-1), base.argmax(-1))
