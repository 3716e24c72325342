"""GraphDecoder: replaying one captured CUDA graph per token equals eager cached decoding; what it cannot capture,
it refuses."""

import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize.attention.graph_decode import GraphDecoder
from linearize.compat import cache_kwargs
from tiny_models import tiny_model

CUDA = torch.cuda.is_available()


def prefilled(model, prompt, **kw):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, **cache_kwargs(cache), use_cache=True, **kw)
    return cache


def test_refuses_an_empty_cache_and_unconverted_layers():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    with pytest.raises(ValueError, match="prefill"):
        GraphDecoder(model, DynamicCache(config=model.config), positions=0)
    partial = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4), layers=[0])
    with pytest.raises(ValueError, match="growing KV cache"):
        GraphDecoder(partial, prefilled(partial, torch.randint(1, 128, (1, 6))), positions=6)


def test_refuses_mixed_batches_bad_positions_and_cpu_tensors():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    cache = prefilled(model, torch.randint(1, 128, (2, 6)))
    with pytest.raises(ValueError, match=r"\(2, 1\) tensor"):
        GraphDecoder(model, cache, positions=torch.tensor([6, 6, 6]))
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model, cache, positions=6)
    cache.layers[0].state = cache.layers[0].state.index_select(torch.tensor([0]))
    with pytest.raises(ValueError, match="batch sizes"):
        GraphDecoder(model, cache, positions=6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
@pytest.mark.parametrize("combine,placement", [("shared_norm", "complementary"), ("mix", "overlap")])
def test_graph_replay_equals_eager_stepping(family, combine, placement):
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=6, combine=combine, placement=placement)).cuda()
    prompt = torch.randint(1, 128, (2, 9), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # a left-padded row: its positions start later
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens = torch.randint(1, 128, (2, 20), device="cuda")
    # per-head modes in layer 0: several outputs read the state before the token is appended once
    with linearize.components(model, {0: {1: "la_only", 2: "swa_only"}}):
        eager = prefilled(model, prompt, attention_mask=mask, position_ids=positions)
        graphed = prefilled(model, prompt, attention_mask=mask, position_ids=positions)
        decoder = GraphDecoder(model, graphed, positions=positions[:, -1:] + 1)
        for i in range(tokens.shape[1]):  # > 3 windows: the ring wraps around inside the replays
            with torch.no_grad():
                expected = model(tokens[:, i:i + 1], **cache_kwargs(eager), use_cache=True,
                                 position_ids=positions[:, -1:] + 1 + i).logits
            got = decoder.step(tokens[:, i:i + 1])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert decoder.captured
        assert graphed.get_seq_length() == eager.get_seq_length() == 9 + 20


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_changed_modes_after_capture_are_refused():
    model = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=4)).cuda()
    decoder = GraphDecoder(model, prefilled(model, torch.randint(1, 128, (1, 5), device="cuda")), positions=5)
    ids = torch.ones(1, 1, dtype=torch.long, device="cuda")
    while not decoder.captured:
        decoder.step(ids)
    with linearize.components(model, "la_only"), pytest.raises(ValueError, match="changed"):
        decoder.step(ids)
