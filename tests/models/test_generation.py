"""Constant-memory generation: cached decoding equals the full forward; padding never leaks."""

import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize.attention.cache import HybridCacheLayer, cache_nbytes
from linearize.compat import CACHE_KWARG, CACHE_KWARGS, cache_kwargs
from tiny_models import FAMILIES, assert_left_padding_invisible, tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("combine,placement", [("shared_norm", "complementary"), ("mix", "overlap")])
def test_greedy_256_tokens_equal_full_forward_argmax(family, combine, placement):
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=8, combine=combine, placement=placement))
    prompt = torch.randint(1, 128, (1, 13))
    out = model.generate(prompt, max_new_tokens=256, min_new_tokens=256, do_sample=False)
    assert out.shape[1] == 13 + 256
    with torch.no_grad():
        logits = model(out).logits
    assert torch.equal(logits[0, 12:-1].argmax(-1), out[0, 13:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("combine", ["shared_norm", "mix"])
@pytest.mark.parametrize("mode", ["hybrid", "la_only", "sinks_only", "swa_only", "none", {0: {1: "la_only", 3: "sinks_only"}}])
def test_cached_decoding_matches_full_forward_in_every_mode(family, combine, mode):
    """20 steps after a 10-token prompt with window 6: the state's ring wraps around; per-head modes share one state."""
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=6, combine=combine))
    ids = torch.randint(1, 128, (2, 30))
    with torch.no_grad(), linearize.components(model, mode):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :10], **cache_kwargs(cache), use_cache=True).logits
        steps = [model(ids[:, i:i + 1], **cache_kwargs(cache), use_cache=True).logits for i in range(10, 30)]
    torch.testing.assert_close(torch.cat([first] + steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_left_padded_batch_matches_each_sequence_alone(family):
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=4))
    a = torch.randint(1, 128, (1, 14))
    b = torch.randint(1, 128, (1, 6))
    batch = torch.zeros(2, 14, dtype=torch.long)
    batch[0], batch[1, 8:] = a[0], b[0]
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=24, do_sample=False)
    alone_a = model.generate(a, max_new_tokens=24, do_sample=False)
    alone_b = model.generate(b, max_new_tokens=24, do_sample=False)
    assert torch.equal(together[0, 14:], alone_a[0, 14:])
    assert torch.equal(together[1, 14:], alone_b[0, 6:])
    # full forward too, padding filled with junk tokens
    junk = batch.clone()
    junk[1, :8] = torch.randint(1, 128, (8,))
    with torch.no_grad():
        padded = model(junk, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        single = model(b).logits
    torch.testing.assert_close(padded[1, 8:], single[0], atol=1e-5, rtol=1e-5)


def test_cache_size_is_constant_from_100_to_2000_tokens():
    model = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=16))
    cache = DynamicCache(config=model.config)
    sizes = {}
    with torch.no_grad():
        token = model(torch.randint(1, 128, (1, 8)), **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
        for n in range(8, 2000):
            token = model(token, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
            if n + 1 in (100, 500, 2000):
                sizes[n + 1] = cache_nbytes(cache)
    assert all(isinstance(layer, HybridCacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 2000
    assert sizes[100] == sizes[500] == sizes[2000] > 0


def test_base_model_cache_grows_for_comparison():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 100)), **cache_kwargs(cache), use_cache=True)
        small = cache_nbytes(cache)
        model(torch.randint(1, 128, (1, 100)), **cache_kwargs(cache), use_cache=True)
    assert cache_nbytes(cache) == 2 * small


@pytest.mark.parametrize("keyword", sorted(set(CACHE_KWARGS) - {"past_key_value"}))
def test_a_cache_passed_under_either_name_is_used(keyword):
    """Decoding the last token with the cache of the others must equal the full forward; a layer that ignored the
    cache would attend to that token alone (what transformers 5.24's new keyword did to the old layer)."""
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    ids = torch.randint(1, 128, (1, 12))
    layer = model.model.layers[0].self_attn
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], **cache_kwargs(cache), use_cache=True)
        assert cache.get_seq_length() == 11
        # the layer itself, called as either transformers release calls it
        h = torch.randn(1, 1, 64)
        pos = model.model.rotary_emb(h, torch.tensor([[11]]))
        before = cache.layers[0].state.seen
        layer(h, position_embeddings=pos, attention_mask=None, **{keyword: cache})
        assert cache.layers[0].state.seen == before + 1
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :-1], **cache_kwargs(cache), use_cache=True)
        step = model(ids[:, -1:], **cache_kwargs(cache), use_cache=True).logits[:, -1]
        alone = model(ids[:, -1:]).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, full, atol=1e-3)


def test_caches_the_layer_cannot_use_are_refused():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    layer = model.model.layers[0].self_attn
    h = torch.randn(1, 3, 64)
    pos = model.model.rotary_emb(h, torch.arange(3)[None])
    with pytest.raises(TypeError, match="legacy tuple"):
        layer(h, position_embeddings=pos, **{CACHE_KWARG: ((torch.zeros(1), torch.zeros(1)),)})
    with pytest.raises(TypeError, match="does not read"):
        layer(h, position_embeddings=pos, layer_cache=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="two different caches"):
        layer(h, position_embeddings=pos, cache=DynamicCache(config=model.config),
              past_key_values=DynamicCache(config=model.config))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_scores_equal_the_full_forward(family):
    """Beams reorder the hybrid states (reorder_cache): each returned beam's score is its full-forward log-prob."""
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=4))
    prompt = torch.randint(1, 128, (1, 9))
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=3,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits.float(), -1)[:, 8:-1]
    full = logp.gather(-1, out.sequences[:, 9:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, full, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_static_cache_request_decodes_like_the_dynamic_cache(family):
    """A StaticCache's layers are swapped for constant-size hybrid states, as DynamicCache's are."""
    from transformers import StaticCache

    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=4))
    prompt = torch.randint(1, 128, (1, 9))
    dynamic = model.generate(prompt, max_new_tokens=12, do_sample=False)
    static = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
    cache = StaticCache(config=model.config, max_cache_len=64)
    given = model.generate(prompt, max_new_tokens=12, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(static, dynamic) and torch.equal(given, dynamic)
    assert all(isinstance(layer, HybridCacheLayer) for layer in cache.layers)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("mode", ["hybrid", "la_only", "swa_only", "sinks_only"])
def test_left_padding_without_position_ids_equals_the_row_alone(family, mode):
    """Positions come from the attention mask when none are given: the linear branch's feature maps see the same
    rotations as for the row alone (before, la_only logits of a left-padded row differed)."""
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=4))
    with torch.no_grad():  # trained-looking feature maps, far from the identity
        for m in linearize.models.convert.hybrid_modules(model):
            m.feature_map_q.weight.normal_(0, 0.5)
            m.feature_map_k.weight.normal_(0, 0.5)
    row = torch.randint(1, 128, (1, 12))
    assert_left_padding_invisible(model, mode, row)
