"""Softmax sinks and sparse exact memory: reference (the spec) vs chunked vs recurrent, decode == forward, state size."""

import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize.attention import module as attention_module
from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.graph_decode import GraphDecoder
from linearize.attention.recurrent import advance_state, prefill_state
from linearize.attention.reference import hybrid_attention_reference
from linearize.compat import cache_kwargs
from test_implementations import B, D, HKV, decode, make_inputs, reference_and_chunked_grads, run
from spec_kwargs import with_spec
from tiny_models import tiny_model

# (settings, prompt length): sinks alone, memory alone (block == chunk), both (block not a multiple of the chunk)
SETTINGS = [
    (dict(softmax_sinks=2), 7),
    (dict(sparse_memory=3, memory_block=4), 0),
    (dict(softmax_sinks=2, sparse_memory=3, memory_block=5), 13),
]
CASES = [("hybrid", rule, placement, s, p, w) for rule in ("shared_norm", "mix") for placement in ("complementary", "overlap")
         for s, p in SETTINGS for w in (1, 4)]
CASES += [(mode, "shared_norm", "complementary", s, p, w) for mode in ("swa_only", "la_only", "sinks_only", "none")
          for s, p in SETTINGS for w in (1, 4)]


@pytest.mark.parametrize("mode,rule,placement,settings,prompt,window", CASES)
def test_reference_chunked_and_recurrent_agree(mode, rule, placement, settings, prompt, window):
    """Left padding, GQA, T not a multiple of the chunk or block; decoding crosses several memory boundaries."""
    t = 31
    q, k, v, fq, fk, valid, weight = make_inputs(t)
    qf, kf = fq(q), fk(k)
    kw = dict(scale=D**-0.5, weight=weight, rule=rule, placement=placement, mode=mode)
    with torch.no_grad():
        ref = hybrid_attention_reference(q, k, v, qf, kf, **with_spec(window=window, valid=valid, **kw, **settings))
        chunked = hybrid_attention_chunked(q, k, v, qf, kf,
                                           **with_spec(window=window, valid=valid, chunk_size=4, **kw, **settings))
        state = prefill_state(k[:, :, :prompt], v[:, :, :prompt], kf[:, :, :prompt], valid[:, :prompt],
                              **with_spec(window=window, num_sinks=8, **settings))
        out = decode(state, q, k, v, qf, kf, valid, prompt, **kw)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref[:, :, prompt:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ref).all()


def test_the_options_change_the_output_only_where_documented():
    """Sinks change 'hybrid' and 'swa_only', memory only 'hybrid'; la_only and sinks_only never change."""
    q, k, v, fq, fk, valid, weight = make_inputs(29)
    for mode in ("hybrid", "swa_only", "la_only", "sinks_only"):
        base = run(hybrid_attention_chunked, q, k, v, fq, fk, valid, weight, window=4, mode=mode, chunk_size=8)
        for settings, changes in ((dict(softmax_sinks=2), ("hybrid", "swa_only")), (dict(sparse_memory=2, memory_block=8), ("hybrid",))):
            out = run(hybrid_attention_chunked, q, k, v, fq, fk, valid, weight, window=4, mode=mode, chunk_size=8, **settings)
            assert torch.equal(out, base) != (mode in changes), (mode, settings)


@pytest.mark.parametrize("rule,placement,mode", [("shared_norm", "complementary", "hybrid"), ("mix", "complementary", "hybrid"),
                                                 ("mix", "overlap", "hybrid"), ("shared_norm", "complementary", "swa_only")])
def test_softmax_sinks_gradients_match_reference(rule, placement, mode):
    q, k, v, fq, fk, valid, weight = make_inputs(21)
    grads = reference_and_chunked_grads(q, k, v, fq, fk, valid, weight, window=6, rule=rule, placement=placement,
                                        mode=mode, softmax_sinks=3)  # swa_only: no weight or feature gradients
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_memory_passes_gradients_to_the_attended_keys():
    q, k, v, fq, fk, valid, weight = make_inputs(24)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = run(hybrid_attention_chunked, q, k, v, fq, fk, valid, weight, window=4, chunk_size=4, sparse_memory=2, memory_block=4)
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v, fk.weight))


def test_padding_never_enters_the_sums():
    """Huge padded keys/values change no valid query's output (they are never sinks, memory or linear state)."""
    q, k, v, fq, fk, valid, weight = make_inputs(23)
    kw = dict(window=3, chunk_size=4, softmax_sinks=2, sparse_memory=2, memory_block=4)
    for mode in ("hybrid", "swa_only", "la_only"):
        base = run(hybrid_attention_chunked, q, k, v, fq, fk, valid, weight, mode=mode, **kw)
        k2, v2 = k.clone(), v.clone()
        k2[1, :, :5] = 1e3 * torch.randn_like(k2[1, :, :5])
        v2[1, :, :5] = 1e3
        other = run(hybrid_attention_chunked, q, k2, v2, fq, fk, valid, weight, mode=mode, **kw)
        torch.testing.assert_close(other[:, :, 5:], base[:, :, 5:])


def test_memory_keeps_a_key_the_linear_state_cannot_recall():
    """Every value is c except one planted token's: the state recalls c for any key, so only the planted key has a
    large error; it is selected, kept to the end, and a query matching its key reads its value exactly."""
    t, window, planted = 48, 4, 17
    torch.manual_seed(1)
    k = torch.randn(1, 1, t, D)
    kf = torch.rand(1, 1, t, D) + 0.1
    c = torch.randn(D)
    v = c.expand(1, 1, t, D).clone()
    v[0, 0, planted] = c + 5 * torch.eye(D)[0]
    q = torch.zeros(1, 1, t, D)
    q[0, 0, -1] = 8 * k[0, 0, planted]  # the last query looks for the planted key
    qf = torch.rand(1, 1, t, D)
    settings = dict(sparse_memory=2, memory_block=4)
    state = prefill_state(k, v, kf, torch.ones(1, t, dtype=torch.bool),
                          **with_spec(window=window, num_sinks=0, **settings))
    kept = state.memory.v[0, 0][state.memory.valid[0, 0]]
    assert any(torch.equal(row, v[0, 0, planted]) for row in kept)
    kw = dict(scale=D**-0.5, window=window, weight=1.0, rule="mix", chunk_size=8)  # g = 1: the softmax branch alone
    out = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(**kw, **settings))[0, 0, -1]
    without = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(**kw))[0, 0, -1]
    assert (out - c)[0] > 4.5 and (without - c).abs().max() < 1e-5


def test_state_size_is_constant_and_counts_memory():
    """nbytes() is the same after 100, 400 and 1000 tokens and includes memory, pending block, sink features."""
    t = 1000
    k, v, kf = torch.randn(B, HKV, t, D), torch.randn(B, HKV, t, D), torch.rand(B, HKV, t, 2 * D)
    valid = torch.ones(B, t, dtype=torch.bool)
    settings = dict(softmax_sinks=2, sparse_memory=5, memory_block=8)
    plain = prefill_state(k[:, :, :10], v[:, :, :10], kf[:, :, :10], valid[:, :10],
                          **with_spec(window=6, num_sinks=8)).nbytes()
    state = prefill_state(k[:, :, :10], v[:, :, :10], kf[:, :, :10], valid[:, :10],
                          **with_spec(window=6, num_sinks=8, **settings))
    sizes = {}
    for i in range(10, t):
        advance_state(state, k[:, :, i:i + 1], v[:, :, i:i + 1], kf[:, :, i:i + 1], valid[:, i:i + 1])
        if i + 1 in (100, 400, 1000):
            sizes[i + 1] = state.nbytes()
    per_key = (2 * D + 2 * D) * 4  # k, v and 2D key features in fp32
    extra = B * HKV * ((5 + 8) * per_key + 5) + B * 8 + B * HKV * 8 * 2 * D * 4 + B * 8  # memory, pending, sink_kf, count
    assert sizes[100] == sizes[400] == sizes[1000] == plain + extra
    assert state.memory.valid.all()
    swapped = state.index_select(torch.tensor([1, 0]))  # beam search reorders rows of every part of the state
    assert swapped.nbytes() == state.nbytes() and torch.equal(swapped.memory.k[0], state.memory.k[1])
    assert torch.equal(swapped.sink_kf[0], state.sink_kf[1]) and swapped.softmax_sinks == 2


SETTINGS_MODEL = dict(window=4, sparse_memory=3, memory_block=4, softmax_sinks=2)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_decoding_equals_full_forward_argmax(family):
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(**SETTINGS_MODEL))
    prompt = torch.randint(1, 128, (1, 13))
    out = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    with torch.no_grad():
        logits = model(out).logits
    assert torch.equal(logits[0, 12:-1].argmax(-1), out[0, 13:])


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "la_only"])
def test_cached_decoding_of_a_padded_batch_matches_full_forward(mode):
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(combine="mix", **SETTINGS_MODEL))
    ids = torch.randint(1, 128, (2, 26))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), linearize.components(model, mode):
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :9], attention_mask=mask[:, :9], position_ids=pos[:, :9], **cache_kwargs(cache), use_cache=True).logits]
        steps += [model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1], **cache_kwargs(cache),
                        use_cache=True).logits for i in range(9, 26)]
    cached = torch.cat(steps, 1)
    torch.testing.assert_close(cached[0], full[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached[1, 5:], full[1, 5:], atol=1e-4, rtol=1e-4)


def test_save_load_round_trips_the_options(tmp_path):
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(**SETTINGS_MODEL))
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    assert linearize.hybrid_config_of(loaded).to_dict() == linearize.hybrid_config_of(model).to_dict()
    assert linearize.hybrid_config_of(loaded).sparse_memory == 3
    ids = torch.randint(1, 128, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_triton_is_refused_and_auto_falls_back(monkeypatch):
    with pytest.raises(ValueError, match="Triton"):
        linearize.HybridConfig(backend="triton", softmax_sinks=4)
    with pytest.raises(ValueError, match="memory_block"):
        linearize.HybridConfig(sparse_memory=4, memory_block=0)
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(**SETTINGS_MODEL))
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        # as if on a GPU with Triton: the options must still take the PyTorch paths (prefill and decoding)
        monkeypatch.setattr(attention_module, "_triton_available", lambda x: True)
        assert torch.equal(model(ids).logits, expected)
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], **cache_kwargs(cache), use_cache=True)
        step = model(ids[:, -1:], **cache_kwargs(cache), use_cache=True).logits
    torch.testing.assert_close(step[:, -1], expected[:, -1], atol=1e-5, rtol=1e-5)
    # the online memory is captured (tests/attention/test_graph_decode.py); here only the CPU stops it, and the
    # refused decoder leaves the states on their eager boundary step
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model, cache, positions=12)
    assert not any(layer.state.boundary_every_step for layer in cache.layers)
