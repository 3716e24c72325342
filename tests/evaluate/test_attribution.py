"""Attribution: shares are proper splits (sum to 1), exact on a 'mix' layer, loss deltas, plot."""

from __future__ import annotations

import pytest
import torch

import linearize
from linearize.evaluate.attribution import attribution, attribution_markdown, plot_attribution
from linearize.models.convert import hybrid_modules
from lz_eval_helpers import tiny_llama

T, W = 48, 8


class _Tok:  # attribution() with explicit ids needs no tokenizer
    pass


def _ids(vocab, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, T), generator=g)


@pytest.fixture(scope="module")
def vocab():
    return 96


def _model(vocab, **hybrid):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return linearize.convert(LlamaForCausalLM(cfg).eval(), linearize.HybridConfig(window=W, chunk_size=16, **hybrid))


def test_shared_norm_shares_sum_to_one(vocab, tmp_path):
    model = _model(vocab)
    res = attribution(model, _Tok(), _ids(vocab), batch_size=2, progress=None)
    assert res["layers"] == [0, 1] and res["heads"] == 4
    for key in ("la_mass_share", "swa_mass_share", "la_output_share", "swa_output_share"):
        assert len(res[key]) == 2 and all(len(row) == 4 for row in res[key])
    for la, swa in ((res["la_mass_share"], res["swa_mass_share"]), (res["la_output_share"], res["swa_output_share"])):
        t = torch.tensor(la) + torch.tensor(swa)
        assert torch.allclose(t, torch.ones_like(t), atol=1e-5)
        assert all(0.0 <= x <= 1.0 for row in la for x in row)
    # complementary LA has no keys for the first W positions: its share is below (T - W) / T
    assert max(x for row in res["la_mass_share"] for x in row) < (T - W) / T
    loss = res["loss"]
    assert len(loss["no_la"]) == len(loss["no_swa"]) == 2
    assert loss["no_la_increase"][0] == pytest.approx(loss["no_la"][0] - loss["hybrid"])
    png = plot_attribution(res, tmp_path / "attr.png", title="tiny")
    assert png.stat().st_size > 1000
    md = attribution_markdown({"meta": {"model": "tiny"}, **res})
    assert "LA mass" in md and "| 1 |" in md


def test_mix_shares_are_exact(vocab):
    """mix with fixed g: the LA mass share is 1 - g wherever LA has keys (t >= W), else 0."""
    g = 0.3
    model = _model(vocab, combine="mix", mix_value=g)
    res = attribution(model, _Tok(), _ids(vocab), loss=False, progress=None)
    expected = (1 - g) * (T - W) / T
    for row in res["la_mass_share"]:
        assert row == pytest.approx([expected] * 4, abs=1e-6)
    assert "loss" not in res


def test_empty_la_gives_zero_share_and_no_loss_change(vocab):
    model = _model(vocab, feature_map="relu")
    with torch.no_grad():
        for m in hybrid_modules(model):
            m.feature_map_q.weight.zero_()
            m.feature_map_k.weight.zero_()
    res = attribution(model, _Tok(), _ids(vocab), progress=None)
    assert all(x == 0.0 for row in res["la_mass_share"] for x in row)
    assert all(x == 0.0 for row in res["la_output_share"] for x in row)
    assert res["loss"]["no_la_increase"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert res["summary"]["la_mass_share"] == 0.0


def test_heldout_text_from_data_dir(tokenizer):
    from lz_eval_helpers import DATA

    if not (DATA / "wikitext2" / "test.txt").is_file():
        pytest.skip("no wikitext2 test file")
    model = linearize.convert(tiny_llama(tokenizer, layers=1), linearize.HybridConfig(window=8))
    res = attribution(model, tokenizer, num_seqs=1, seq_len=64, data_dir=DATA, progress=None)
    assert res["data"] == {"source": "wikitext2_test", "num_seqs": 1, "seq_len": 64}
    assert res["layers"] == [0]
