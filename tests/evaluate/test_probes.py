"""Long-context probes: passkey found with full attention and lost by a window-only model; per-position loss."""

from __future__ import annotations

import copy

import pytest
import torch

import linearize
from linearize.evaluate.probes import (passkey_probe, passkey_prompt, plot_position_loss, position_loss_probe,
                                       position_losses, probe_variants, merge_probe_results, probes_markdown)
from linearize.models.convert import components
from lz_eval_helpers import bag_model, tiny_llama, word_tokenizer

W = 8


@pytest.fixture(scope="module")
def bag():
    tok = word_tokenizer()
    base = bag_model()
    conv = linearize.convert(copy.deepcopy(base), linearize.HybridConfig(window=W, init_noise=0.0))
    return tok, base, conv


def test_prompt_puts_key_beyond_window(bag):
    import random

    tok = bag[0]
    for ctx in (64, 128):
        p = passkey_prompt(tok, ctx, "7", window=W, rng=random.Random(ctx))
        assert abs(len(p["ids"]) - ctx) <= 1
        assert p["distance"] >= W  # the key sentence ends more than a window before the end
        assert tok.convert_ids_to_tokens(p["ids"][p["key_pos"]:p["key_pos"] + 5]) == ["The", "pass", "key", "is", "7"]


def test_passkey_full_attention_finds_key_window_does_not(bag):
    """The bag-of-tokens model's logit for a digit is the attention weight on that digit's positions.

    Full softmax attention (the base model) sees the key twice and no other digit: found every time.
    With a window of 8 and the key further back, SWA alone sees no digit: all candidates tie, never found.
    The converted model's LA (uniform here) covers all keys, so la_only and hybrid find it again.
    """
    tok, base, conv = bag
    kw = dict(contexts=(64, 160), trials=3, window=W, digits=1, num_distractors=9, seed=0)
    assert passkey_probe(base, tok, **kw)["accuracy"] == {"64": 1.0, "160": 1.0}
    with components(conv, "swa_only"):
        res = passkey_probe(conv, tok, **kw)
    assert res["accuracy"] == {"64": 0.0, "160": 0.0}
    assert all(t["rank"] == 10 for c in res["per_context"].values() for t in c["trials"])  # all tied
    for mode in ("la_only", "hybrid"):
        with components(conv, mode):
            assert passkey_probe(conv, tok, **kw)["accuracy"] == {"64": 1.0, "160": 1.0}
    # a window that covers the whole prompt is full softmax attention again
    wide = linearize.convert(copy.deepcopy(base), linearize.HybridConfig(window=256, init_noise=0.0))
    with components(wide, "swa_only"):
        assert passkey_probe(wide, tok, **kw)["accuracy"] == {"64": 1.0, "160": 1.0}


def test_multi_token_keys_run_with_cache(tokenizer):
    """5-digit keys over a BPE tokenizer: candidates continue from copies of the prompt's cache."""
    base = tiny_llama(tokenizer, layers=1)
    conv = linearize.convert(copy.deepcopy(base), linearize.HybridConfig(window=16))
    for model in (base, conv):
        res = passkey_probe(model, tokenizer, contexts=(96,), trials=1, window=16, num_distractors=2)
        trial = res["per_context"]["96"]["trials"][0]
        assert 1 <= trial["rank"] <= 3 and len(trial["key"]) == 5 and trial["distance"] >= 16


def test_position_loss_swa_matches_base_inside_window(tokenizer):
    base = tiny_llama(tokenizer, layers=2)
    conv = linearize.convert(copy.deepcopy(base), linearize.HybridConfig(window=16))
    ids = torch.randint(3, len(tokenizer), (2, 80), generator=torch.Generator().manual_seed(0))
    ref = position_losses(base, ids, logit_chunk=32)
    full = base(ids).logits[:, :-1].float()
    direct = torch.nn.functional.cross_entropy(full.transpose(1, 2), ids[:, 1:], reduction="none")
    assert torch.allclose(ref, direct, atol=1e-4)
    with components(conv, "swa_only"):
        swa = position_losses(conv, ids, logit_chunk=32)
    assert ref.shape == swa.shape == (2, 79)
    assert torch.allclose(swa[:, :16], ref[:, :16], atol=1e-4)  # the window still covers every key
    assert not torch.allclose(swa[:, 16:], ref[:, 16:], atol=1e-4)

    part_base = probe_variants(base, tokenizer, {"base": None}, ids=ids, window=16, bin=16, progress=None)
    part_conv = probe_variants(conv, tokenizer, {"hybrid": "hybrid", "swa_only": "swa_only"}, ids=ids, window=16,
                               bin=16, progress=None)
    rec = merge_probe_results([part_base, part_conv])
    curves = rec["position_loss"]["curves"]
    assert list(curves) == ["base", "hybrid", "swa_only"]
    assert len(curves["base"]["binned"]) == 5
    assert curves["swa_only"]["mean_in_window"] == pytest.approx(curves["base"]["mean_in_window"], abs=1e-4)
    md = probes_markdown({"meta": {"model": "tiny"}, **rec})
    assert "positions ≥ window" in md


def test_plot_position_loss(tmp_path):
    res = position_loss_probe({"a": lambda x: torch.rand(2, 99), "b": lambda x: torch.rand(2, 99)},
                              torch.zeros(2, 100, dtype=torch.long), window=32, bin=10)
    assert res["curves"]["a"]["bin"] == 10 and len(res["curves"]["a"]["binned"]) == 10
    assert plot_position_loss(res, tmp_path / "p.png").stat().st_size > 1000
