"""Sparse memory chosen by the prompt's last queries (memory_select='query'): the prefill + decode path against the
plain-loop reference (every kind, rule, placement, mode), padding, a planted key, the full forward without memory,
whole tiny models (the layer's prefill, generate, decode bytes, save/load) and the config's checks."""

import os

import pytest
import torch
from spec_kwargs import with_spec
from tiny_models import assert_decode_bytes_are_the_cache, converted_off_init, left_padded_batch
from transformers import DynamicCache

import linearize
from linearize.attention.cache import cache_nbytes
from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.common import first_valid
from linearize.attention.recurrent import decode_step, prefill_selecting, prefill_state
from linearize.attention.reference import (
    hybrid_attention_reference,
    query_memory_reference,
)
from linearize.compat import cache_kwargs
from linearize.models.memory import decode_state_bytes

B, HQ, HKV, D, M = 2, 4, 2, 8, 6


def layer_inputs(t, seed=0, pad=5):
    """q, k, v, positive features, gates (no decay at padding) and a second row left-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, HQ, t, D, generator=g), torch.randn(B, HKV, t, D, generator=g), torch.randn(B, HKV, t, D, generator=g)
    qf, kf = torch.rand(B, HQ, t, M, generator=g) + 0.1, torch.rand(B, HKV, t, M, generator=g) + 0.1
    valid = torch.ones(B, t, dtype=torch.bool)
    valid[1, :pad] = False
    log_decay = -torch.rand(B, HKV, t, generator=g) * 0.3 * valid[:, None]
    beta = torch.rand(B, HKV, t, generator=g) * 0.8 + 0.1
    return q, k, v, qf, kf, valid, log_decay, beta


def gates_of(kind, log_decay, beta):
    """The gates the layer passes for `kind` (state_inputs): none, log_decay, or both."""
    return {"sum": {}, "gated": {"log_decay": log_decay}, "delta": {"log_decay": log_decay, "beta": beta}}[kind]


def prefill_and_decode(q, k, v, qf, kf, valid, gates, prompt, *, modes, weight, lags, **spec_kw):
    """prefill_selecting over the first `prompt` tokens, then one decode_step per later token: {mode: outputs of
    tokens prompt - 1 ..} and the state."""
    cut = lambda sl: {n: x[:, :, sl] for n, x in gates.items()}  # noqa: E731
    p = slice(0, prompt)
    state, first = prefill_selecting(q[:, :, p], k[:, :, p], v[:, :, p], qf[:, :, p], kf[:, :, p], valid[:, p],
                                     modes=modes, weight=weight, lags=lags, **cut(p), **with_spec(**spec_kw))
    outs = {mode: [first[mode]] for mode in modes}
    for i in range(prompt, q.shape[2]):
        s = slice(i, i + 1)
        step = decode_step(state, q[:, :, s], k[:, :, s], v[:, :, s], qf[:, :, s], kf[:, :, s], modes=modes,
                           weight=weight, valid=valid[:, s], **cut(s), **with_spec(**spec_kw))
        for mode in modes:
            outs[mode].append(step[mode])
    return {mode: torch.cat(x, 2) for mode, x in outs.items()}, state


CASES = [(kind, rule, placement, window, prompt, extra)
         for kind in ("sum", "gated", "delta") for rule in ("shared_norm", "mix") for placement in ("complementary", "overlap")
         if not (kind == "delta" and rule == "shared_norm")
         for window, prompt, extra in ((4, 21, dict(softmax_sinks=2, memory_pool=3, memory_observe=5)),
                                       (1, 14, dict(memory_pool=1, memory_observe=40)),
                                       # a KV head's query heads combined by their largest score, not their sum
                                       (4, 21, dict(softmax_sinks=2, memory_pool=3, memory_observe=5, memory_heads="max")),
                                       (1, 2, dict(memory_pool=5)),  # fewer prompt keys than slots
                                       # the prompt's last 6 tokens read again against the memory (the question)
                                       (4, 21, dict(softmax_sinks=2, memory_pool=3, memory_observe=5, memory_reread=6)),
                                       (1, 3, dict(memory_reread=8)),  # more than the prompt: all of it
                                       # the kept keys stay in the linear state too
                                       (4, 21, dict(softmax_sinks=2, memory_pool=3, memory_reread=6, memory_in_state=True)),
                                       # free slots taken by the keys that leave the window later, until full
                                       (4, 12, dict(softmax_sinks=2, memory_reread=4, sparse_memory=8, memory_fill=True)),
                                       (1, 2, dict(memory_pool=5, memory_fill=True)),  # no ring: keys leave at once
                                       (4, 12, dict(softmax_sinks=2, memory_reread=4, sparse_memory=8, memory_fill=True,
                                                    memory_in_state=True)))]


@pytest.mark.parametrize("kind,rule,placement,window,prompt,extra", CASES)
def test_prefill_and_decoding_equal_the_plain_loop_reference(kind, rule, placement, window, prompt, extra):
    """GQA, a left-padded row, sinks, pooling; the memory full (more candidates than slots) or not; decoding runs past
    the prompt so keys leave the window after the selection; every mode the cache serves from one prefill."""
    t = 30
    q, k, v, qf, kf, valid, log_decay, beta = layer_inputs(t)
    gates = gates_of(kind, log_decay, beta)
    weight = torch.rand(HQ) * 0.8 + 0.1
    spec_kw = dict(scale=D**-0.5, window=window, rule=rule, placement=placement, linear_state=kind,
                   memory_select="query", **{"memory_reread": 1, "sparse_memory": 3, **extra})  # 1 unless the case re-reads
    modes = ["hybrid", "la_only", "swa_only"]
    lags = {mode: 0 if mode == "la_only" or placement == "overlap" else window for mode in modes}
    with torch.no_grad():
        got, state = prefill_and_decode(q, k, v, qf, kf, valid, gates, prompt, modes=modes, weight=weight,
                                        lags=set(lags.values()) if kind != "sum" else set(), **spec_kw)
        for mode in modes:
            want, chosen = query_memory_reference(q, k, v, qf, kf, prompt=prompt, mode=mode, weight=weight, valid=valid,
                                                  **gates, **with_spec(**spec_kw))
            torch.testing.assert_close(got[mode], want, atol=1e-5, rtol=1e-5)
    reread = min(extra.get("memory_reread", 1), prompt)  # outside the window of the first re-read token
    assert got["hybrid"].shape[2] == t - prompt + reread
    slots = spec_kw["sparse_memory"]
    outside = valid & ~first_valid(valid, spec_kw.get("softmax_sinks", 0))
    candidates = outside[:, :max(prompt - reread - window + 1, 0)].sum(1)
    if with_spec(**spec_kw)["spec"].memory_fill:  # and then every key that left the window since, while slots were free
        candidates = outside[:, :max(t - window + 1, 0)].sum(1)
    assert torch.equal(chosen.sum(-1), candidates.clamp(max=slots)[:, None].expand(B, HKV))
    kept = state.memory
    for row in range(B):
        for h in range(HKV):
            left = chosen[row, h] & (torch.arange(t) <= t - window)  # (memory_fill: the keys still in the window not yet)
            assert torch.equal(kept.k[row, h][kept.valid[row, h]], k[row, h][left])  # in time order
    plain, _ = query_memory_reference(q, k, v, qf, kf, prompt=prompt, weight=weight, valid=valid, **gates,
                                      **with_spec(**{**spec_kw, "sparse_memory": 0}))
    assert not torch.allclose(plain, got["hybrid"]) or not chosen.any()  # the memory is read


def test_left_padding_is_never_scored_or_kept():
    """A row left-padded (by a number of tokens that is no block or window multiple) keeps the same keys and decodes
    the same outputs as the row alone; huge padded keys change nothing."""
    t, pad, prompt = 26, 5, 19
    q, k, v, qf, kf, valid, *_ = layer_inputs(t + pad, seed=4, pad=pad)
    k[1, :, :pad] = 1e3 * torch.randn_like(k[1, :, :pad])  # padding the queries would attend most, if it could
    v[1, :, :pad] = 1e3
    spec_kw = dict(scale=D**-0.5, window=3, rule="mix", sparse_memory=4, memory_select="query", memory_observe=6,
                   softmax_sinks=1, memory_reread=1)  # a padded batch re-read: the generate test below
    with torch.no_grad():
        padded, state = prefill_and_decode(q, k, v, qf, kf, valid, {}, prompt + pad, modes=["hybrid"], weight=0.4,
                                           lags=set(), **spec_kw)
        alone, alone_state = prefill_and_decode(*(x[1:, :, pad:] for x in (q, k, v, qf, kf)), valid[1:, pad:], {},
                                                prompt, modes=["hybrid"], weight=0.4, lags=set(), **spec_kw)
    torch.testing.assert_close(padded["hybrid"][1:], alone["hybrid"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.memory.k[1:], alone_state.memory.k)
    assert torch.equal(state.memory.valid[1:], alone_state.memory.valid) and state.memory.valid.all()


def test_a_key_the_last_queries_look_for_is_kept_and_read_exactly():
    """A planted key far outside the window that the prompt's last queries point at is kept (with its neighbours,
    through the pooling); a later query that matches it reads its value exactly from the softmax branch, which the
    window cannot give. Its value is as ordinary as the others' (every value random), so the 'recall' rule has no
    reason to prefer it and lets it go."""
    t, window, planted, prompt = 60, 4, 11, 48
    g = torch.Generator().manual_seed(2)
    k = torch.randn(1, 1, t, D, generator=g)
    v = torch.randn(1, 1, t, D, generator=g)
    q = torch.randn(1, 1, t, D, generator=g) * 0.1
    q[0, 0, prompt - 3:prompt] = 6 * k[0, 0, planted]  # the question: the last prompt queries look for the planted key
    q[0, 0, -1] = 12 * k[0, 0, planted]
    qf, kf = torch.rand(1, 1, t, D, generator=g), torch.rand(1, 1, t, D, generator=g)
    spec_kw = dict(scale=D**-0.5, window=window, rule="mix", sparse_memory=3, memory_select="query", memory_observe=3,
                   memory_pool=3)
    with torch.no_grad():
        out, state = prefill_and_decode(q, k, v, qf, kf, torch.ones(1, t, dtype=torch.bool), {}, prompt,
                                        modes=["hybrid"], weight=1.0, lags=set(), **spec_kw)  # g = 1: softmax alone
    kept = state.memory.k[0, 0][state.memory.valid[0, 0]]
    assert torch.equal(kept, k[0, 0, planted - 1:planted + 2])  # the key and its two neighbours
    assert (out["hybrid"][0, 0, -1] - v[0, 0, planted]).abs().max() < 0.05
    recall = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(weight=1.0, **{**spec_kw, "memory_select": "recall",
                                                                                  "memory_block": 4}))
    assert (recall[0, 0, -1] - v[0, 0, planted]).abs().max() > 1  # the online rule let it go


@pytest.mark.parametrize("fn", [hybrid_attention_reference, hybrid_attention_chunked])
def test_the_full_forward_runs_without_the_memory(fn):
    q, k, v, qf, kf, valid, *_ = layer_inputs(25, seed=6)
    kw = dict(scale=D**-0.5, window=3, weight=0.3, valid=valid, softmax_sinks=2, chunk_size=4)
    with torch.no_grad():
        plain = fn(q, k, v, qf, kf, **with_spec(**kw))
        query = fn(q, k, v, qf, kf, **with_spec(**kw, sparse_memory=4, memory_select="query"))
        recall = fn(q, k, v, qf, kf, **with_spec(**kw, sparse_memory=4, memory_block=4))
        # memory_prefill 'recall': the full forward reads the online recall memory instead
        prefilled = fn(q, k, v, qf, kf, **with_spec(**kw, sparse_memory=4, memory_block=4, memory_select="query",
                                                    memory_prefill="recall"))
    assert torch.equal(query, plain) and not torch.allclose(recall, plain)
    assert torch.equal(prefilled, recall)


def test_prefill_state_refuses_a_query_memory_without_its_selection():
    k, v, kf = torch.randn(1, 1, 9, D), torch.randn(1, 1, 9, D), torch.rand(1, 1, 9, M)
    spec = dict(window=3, sparse_memory=2, memory_select="query")
    with pytest.raises(ValueError, match="prefill_selecting"):
        prefill_state(k, v, kf, torch.ones(1, 9, dtype=torch.bool), **with_spec(**spec))
    inside = torch.zeros(1, 1, 9, dtype=torch.bool)
    inside[..., 8] = True  # in the window: not a candidate
    with pytest.raises(ValueError, match="outside the window"):
        prefill_state(k, v, kf, torch.ones(1, 9, dtype=torch.bool), selected=inside, **with_spec(**spec))


# -- whole tiny models ---------------------------------------------------------------------------------------------

# memory_reread 1 unless a test sets it (HybridConfig's default, 32, re-reads these short prompts whole)
SETTINGS = dict(window=4, sparse_memory=3, memory_select="query", memory_observe=4, memory_pool=3, softmax_sinks=1,
                combine="mix", memory_reread=1)


def converted(kind="sum", family="llama", **settings):
    return converted_off_init(family, linearize.HybridConfig(linear_state=kind, decay_init=0.8,
                                                             **{**SETTINGS, **settings}))


@pytest.mark.parametrize("kind,settings", [("sum", {}), ("gated", {}), ("delta", {}), ("gated", {"qk_conv": 3}),
                                            ("sum", {"mix_gate": "dynamic"}), ("sum", {"memory_reread": 5}),
                                            ("delta", {"memory_reread": 5, "qk_conv": 3}),
                                            ("delta", {"memory_reread": 5, "memory_in_state": True})])
def test_the_layer_prefills_and_decodes_as_the_reference(kind, settings):
    """A converted layer called with a cache: the prompt's outputs but the last (the last memory_reread) are the full
    forward's (no memory), the re-read prompt tokens and every decoded one are the reference's (memory chosen at the
    prefill); with the q/k convolution and a per-token gate too."""
    model = converted(kind, **settings)
    layer = model.model.layers[0].self_attn
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "qk_conv" in name or "gate." in name:
                p.add_(0.2 * torch.randn_like(p))
    t, prompt = 24, 15
    torch.manual_seed(3)
    hidden = torch.randn(1, t, 64)
    pe = model.model.rotary_emb(hidden, torch.arange(t)[None])
    with torch.no_grad():
        q, k, v = layer.project(hidden, pe)
        qf, kf, _ = layer.features(q, k, None)
        gates = layer.state_inputs(hidden, None)
        want, _ = query_memory_reference(q, k, v, qf, kf, spec=layer.spec, prompt=prompt,
                                         weight=layer.mixing_weight(hidden), **gates)
    full = layer_outputs(model, hidden, prompt, cached=False)
    got = layer_outputs(model, hidden, prompt)
    first = prompt - settings.get("memory_reread", 1)
    torch.testing.assert_close(got[:, :first], full[:, :first], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, first:], layer.o_proj(want.transpose(1, 2).reshape(1, t - first, -1)),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, full, atol=1e-4)  # the memory changes the decoded outputs


@pytest.mark.parametrize("family,reread", [("llama", 1), ("gemma3", 1), ("llama", 16)])
def test_generate_of_a_left_padded_batch_equals_each_row_alone(family, reread):
    """Left padding changes no row's tokens; with memory_reread 16 the shorter row (14 tokens) is read again whole,
    its padding included in the re-read steps."""
    model = converted("sum", family, memory_reread=reread)
    row = torch.randint(1, 128, (1, 14))
    batch, mask = left_padded_batch(row, pad=5, other=19)
    together = model.generate(batch, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    single = model.generate(row, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(together[0, 19:], single[0, 14:])
    assert model.decode_path.path == "eager"


@pytest.mark.parametrize("mode", ["la_only", "swa_only"])
def test_modes_without_the_memory_decode_as_the_full_forward(mode):
    from tiny_models import assert_decode_equals_forward

    assert_decode_equals_forward(converted("gated"), mode, torch.randint(1, 128, (2, 26)), prompt=12)


@pytest.mark.parametrize("kind", ["sum", "gated", "delta"])
@pytest.mark.parametrize("placement", ["complementary", "overlap"])
def test_decode_bytes_are_what_the_cache_holds(kind, placement):
    """The fixed memory holds its m slots and no pending block: the bytes are the cache's, below the 'recall' rule's
    by memory_block keys (and, for the decaying kinds, the ages and the scoring state)."""
    model = converted(kind, placement=placement)
    cache = assert_decode_bytes_are_the_cache(model, 40)
    state = cache.layers[0].state
    assert state.memory_fixed and state.memory.valid.all()
    assert state.index_select(torch.tensor([0, 0])).memory_fixed  # beam search keeps the rule
    recall = linearize.HybridConfig(**{**linearize.hybrid_config_of(model).to_dict(), "memory_select": "recall"})
    assert decode_state_bytes(model.config, 40, dtype_bytes=4, hybrid=recall) > cache_nbytes(cache)


@pytest.mark.parametrize("heads,kept", [("sum", 1), ("max", 0)])
def test_max_over_heads_keeps_the_key_one_head_alone_looks_for(heads, kept):
    """One KV head, four query heads: head 0 gives key 0 half its attention, the other three give key 1 0.4 each.
    Added, key 1 wins (1.24 against 0.69); by the largest any head gives, key 0 (0.53 against 0.40)."""
    from linearize.attention.memory import select_by_query
    from linearize.attention.spec import AttentionSpec

    t = 12  # key 0, key 1, nine keys of zeros, the observer (zeros too)
    k = torch.zeros(1, 1, t, 2)
    k[0, 0, 0, 0] = k[0, 0, 1, 1] = 1.0
    q = torch.zeros(1, 4, t, 2)
    q[0, 0, -1] = torch.tensor([2.5, 0.0])
    q[0, 1:, -1] = torch.tensor([0.0, 2.0])
    valid = torch.ones(1, t, dtype=torch.bool)
    candidate = torch.arange(t)[None] < 2
    spec = AttentionSpec(scale=1.0, window=1, sparse_memory=1, memory_select="query", memory_observe=1,
                         memory_pool=1, memory_heads=heads)
    chosen = select_by_query(q, k, valid, candidate, spec=spec)
    assert chosen[0, 0].nonzero().flatten().tolist() == [kept]


def test_preferred_keys_rank_first_within_the_budget():
    """`preferring_keys` (the diagnostics' oracle): the preferred candidates are kept before any other, the budget
    unchanged, a preferred key that is no candidate (the window, padding) never kept; outside it the rule is back."""
    from linearize.attention.memory import preferring_keys, query_scores, select_by_query
    from linearize.attention.spec import AttentionSpec

    q, k, _, _, _, valid, _, _ = layer_inputs(30, seed=5)
    candidate = valid & (torch.arange(30)[None] < 24)  # the last 6 in the window
    spec = AttentionSpec(scale=D ** -0.5, window=6, sparse_memory=4, memory_select="query", memory_observe=3,
                         memory_pool=1)
    plain = select_by_query(q, k, valid, candidate, spec=spec)
    prefer = torch.zeros(30, dtype=torch.bool)
    prefer[[2, 3, 26]] = True  # 26 is in the window: no candidate
    free = [int(i) for i in range(24) if i not in (2, 3)]
    with preferring_keys(prefer):
        chosen = select_by_query(q, k, valid, candidate, spec=spec)
        many = torch.zeros(20, dtype=torch.bool)  # more preferred keys than slots, shorter than the prompt
        many[:10] = True
        with preferring_keys(many):  # the innermost holds
            crowded = select_by_query(q, k, valid, candidate, spec=spec)
    assert (chosen.sum(-1) == 4).all() and (crowded.sum(-1) == 4).all()
    assert chosen[0, :, [2, 3]].all() and not chosen[..., 26].any()
    assert not chosen[1, :, :5].any()  # row 1's first 5 are padding: preferred or not, never kept
    scores = query_scores(q, k, valid, scale=spec.scale, observe=3)
    for h in range(HKV):  # the other two slots of row 0: the rule's best two among the rest
        best = sorted(free, key=lambda i: -scores[0, h, i].item())[:2]
        assert chosen[0, h].nonzero().flatten().tolist() == sorted([2, 3, *best])
    # 10 preferred in row 0, 5 in row 1 (after its padding): 4 of them kept, none of the rest
    assert crowded[:, :, 10:].sum() == 0 and (crowded[1, :, 5:10].sum(-1) == 4).all()
    assert torch.equal(select_by_query(q, k, valid, candidate, spec=spec), plain)


def test_save_load_round_trips_the_fields(tmp_path):
    model = converted("sum")
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    hybrid = linearize.hybrid_config_of(loaded)
    assert hybrid.to_dict() == linearize.hybrid_config_of(model).to_dict()
    assert (hybrid.memory_select, hybrid.memory_observe, hybrid.memory_pool) == ("query", 4, 3)
    ids = torch.randint(1, 128, (1, 20))
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       loaded.generate(ids, max_new_tokens=8, do_sample=False))


def test_config_checks_and_set_hybrid():
    with pytest.raises(ValueError, match="memory_select"):
        linearize.HybridConfig(memory_select="snap")
    with pytest.raises(ValueError, match="memory_pool"):
        linearize.HybridConfig(memory_pool=4)
    with pytest.raises(ValueError, match="memory_observe"):
        linearize.HybridConfig(memory_observe=0)
    with pytest.raises(ValueError, match="memory_heads must be one of"):
        linearize.HybridConfig(memory_heads="mean")
    with pytest.raises(ValueError, match="memory_reread"):
        linearize.HybridConfig(memory_reread=0)
    with pytest.raises(ValueError, match="sparse_memory is 0"):  # a rule with nothing to choose is a mistake, said
        linearize.HybridConfig(memory_select="query")
    with pytest.raises(ValueError, match="memory_in_state"):
        linearize.HybridConfig(sparse_memory=4, memory_in_state=True)  # the 'recall' rule decides what enters
    with pytest.raises(ValueError, match="memory_prefill"):
        linearize.HybridConfig(sparse_memory=4, memory_prefill="recall")  # the 'recall' memory is read by every token
    with pytest.raises(ValueError, match="memory_prefill"):
        linearize.HybridConfig(sparse_memory=4, memory_select="query", memory_prefill="full")
    model = converted("sum", memory_select="recall")
    linearize.set_hybrid(model, memory_select="query")  # a training-free change of a conversion
    assert model.model.layers[0].self_attn.spec.selects_at_prefill
    linearize.set_hybrid(model, memory_in_state=True)
    assert model.model.layers[0].self_attn.spec.memory_in_state
    linearize.set_hybrid(model, memory_prefill="recall")
    assert model.model.layers[0].self_attn.spec.full_forward().memory_select == "recall"


def layer_outputs(model, hidden, prompt, *, cached=True):
    """Layer 0's outputs for `hidden`: a cached prefill of the first `prompt` tokens, then one token at a time (or one
    full forward, cached=False)."""
    layer = model.model.layers[0].self_attn
    t = hidden.shape[1]
    pe = model.model.rotary_emb(hidden, torch.arange(t)[None])
    with torch.no_grad():
        if not cached:
            return layer(hidden, pe)[0]
        cache = DynamicCache(config=model.config)
        got = [layer(hidden[:, :prompt], tuple(x[:, :prompt] for x in pe), **cache_kwargs(cache))[0]]
        got += [layer(hidden[:, i:i + 1], tuple(x[:, i:i + 1] for x in pe), **cache_kwargs(cache))[0] for i in range(prompt, t)]
    return torch.cat(got, 1)


@pytest.mark.parametrize("kind", ["sum", "delta"])
def test_memory_prefill_recall_reads_the_prompt_with_the_recall_memory(kind):
    """memory_prefill='recall': the prompt's tokens before the re-read ones are the recall memory's full forward (as a
    conversion trained with that memory reads them); the re-read tokens and every decoded one are the query memory's,
    as without it (one layer: its outputs do not feed its own keys)."""
    import copy

    model = converted(kind, memory_reread=5, memory_block=4, memory_prefill="recall")
    with torch.no_grad():
        for name, p in model.model.layers[0].self_attn.named_parameters():
            if "gate." in name:
                p.add_(0.2 * torch.randn_like(p))
    t, prompt, reread = 24, 15, 5
    torch.manual_seed(4)
    hidden = torch.randn(1, t, 64)
    got = layer_outputs(model, hidden, prompt)
    recall = copy.deepcopy(model)
    linearize.set_hybrid(recall, memory_select="recall", memory_prefill="none")
    plain = copy.deepcopy(model)
    linearize.set_hybrid(plain, memory_prefill="none")
    first = prompt - reread
    torch.testing.assert_close(got[:, :first], layer_outputs(recall, hidden, prompt, cached=False)[:, :first],
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(layer_outputs(model, hidden, prompt, cached=False), layer_outputs(recall, hidden, prompt, cached=False))
    without = layer_outputs(plain, hidden, prompt)
    torch.testing.assert_close(got[:, first:], without[:, first:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, :first], without[:, :first], atol=1e-4)  # the recall memory changes the prompt's


def test_memory_prefill_exact_reads_the_prompt_with_the_base_attention():
    """memory_prefill='exact' (a diagnostic): in a prefill the tokens before the re-read ones attend by softmax to the
    whole prompt (written out here); the re-read and decoded tokens are as without it (the same state); a full forward
    is unchanged."""
    import copy

    model = converted("delta", memory_reread=5, memory_prefill="exact")
    plain = copy.deepcopy(model)
    linearize.set_hybrid(plain, memory_prefill="none")
    t, prompt, reread = 24, 15, 5
    torch.manual_seed(6)
    hidden = torch.randn(1, t, 64)
    got = layer_outputs(model, hidden, prompt)
    layer = model.model.layers[0].self_attn
    pe = model.model.rotary_emb(hidden, torch.arange(prompt)[None])
    with torch.no_grad():
        q, k, v = layer.project(hidden[:, :prompt], pe)
        g = q.shape[1] // k.shape[1]
        logits = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(g, 1)) * layer.scale
        logits = logits.masked_fill(torch.ones(prompt, prompt, dtype=torch.bool).triu(1), float("-inf"))
        exact = torch.einsum("bhts,bhsd->bhtd", logits.softmax(-1), v.repeat_interleave(g, 1))
        want = layer.o_proj(exact.transpose(1, 2).reshape(1, prompt, -1))
    first = prompt - reread
    torch.testing.assert_close(got[:, :first], want[:, :first], atol=1e-5, rtol=1e-5)
    without = layer_outputs(plain, hidden, prompt)
    torch.testing.assert_close(got[:, first:], without[:, first:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, :first], without[:, :first], atol=1e-4)  # a window of 4 reads less
    assert torch.equal(layer_outputs(model, hidden, prompt, cached=False), layer_outputs(plain, hidden, prompt, cached=False))


def test_the_training_free_memory_with_an_exact_prefill_reads_the_prompt_as_the_base():
    """Every layer cut to window + sinks + memory, the prompt prefilled with memory_prefill='exact': the logits of the
    prompt's tokens before the re-read ones are the base model's; the re-read ones read the memory."""
    from tiny_models import tiny_model

    from linearize.models.window_sinks import query_memory_baseline

    base = tiny_model("llama")
    model = query_memory_baseline(base, 4, 1, 3, layers="all", reread=5, prefill="exact")
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(ids, **cache_kwargs(DynamicCache(config=model.config)), use_cache=True).logits
        want = base(ids).logits
    torch.testing.assert_close(got[:, :25], want[:, :25], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, 25:], want[:, 25:], atol=1e-3)


def test_memory_prefill_reads_a_short_prompt_exactly():
    """A prompt no longer than window + sinks + memory: with memory_prefill='recall' and the linear branch on, every
    prompt token reads all of its past exactly (the linear state stays empty), as the same layer with a window
    covering the prompt."""
    import copy

    model = converted("delta", memory_reread=1, memory_block=4, sparse_memory=12, memory_prefill="recall")
    t = 14  # window 4 + 1 sink + 12 memory keys >= 14 - 1
    torch.manual_seed(5)
    hidden = torch.randn(1, t, 64)
    wide = copy.deepcopy(model)
    linearize.set_hybrid(wide, window=t, sparse_memory=0, memory_select="recall", memory_prefill="none")
    torch.testing.assert_close(layer_outputs(model, hidden, t)[:, :t - 1], layer_outputs(wide, hidden, t, cached=False)[:, :t - 1],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sum", "delta"])
def test_memory_fill_reads_a_short_prompt_and_its_continuation_exactly(kind):
    """memory_fill with memory_prefill='recall': a prompt and the tokens decoded after it, no longer than window +
    sinks + memory, are read exactly at every step -- the re-read and decoded tokens too, whose window-leaving keys
    take the query memory's free slots -- as by the layer with a window covering them all; without memory_fill those
    keys enter the linear state and the decoded outputs differ."""
    import copy

    model = converted(kind, memory_reread=3, memory_block=4, sparse_memory=12, memory_prefill="recall", memory_fill=True)
    t, prompt = 17, 12  # window 4 + 1 sink + 12 memory keys >= 17
    torch.manual_seed(6)
    hidden = torch.randn(1, t, 64)
    wide = copy.deepcopy(model)
    linearize.set_hybrid(wide, window=t, sparse_memory=0, memory_select="recall", memory_prefill="none", memory_fill=False)
    exact = layer_outputs(wide, hidden, prompt, cached=False)
    torch.testing.assert_close(layer_outputs(model, hidden, prompt), exact, atol=1e-5, rtol=1e-5)
    linearize.set_hybrid(model, memory_fill=False)
    assert not torch.allclose(layer_outputs(model, hidden, prompt)[:, prompt:], exact[:, prompt:], atol=1e-4)


def graph_decoded(model, prompt, mask, tokens, capture):
    """Logits of `tokens` stepped after a padded prompt: eagerly through the model, and through a GraphDecoder."""
    from linearize.attention.graph_decode import GraphDecoder

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = []
    for _ in range(2):
        caches.append(DynamicCache(config=model.config))
        with torch.no_grad():
            model(prompt, attention_mask=mask, position_ids=positions, **cache_kwargs(caches[-1]), use_cache=True)
    decoder = GraphDecoder(model, caches[1], positions=positions[:, -1:] + 1, capture=capture)
    eager, graphed = [], []
    for i in range(tokens.shape[1]):
        with torch.no_grad():
            eager.append(model(tokens[:, i:i + 1], **cache_kwargs(caches[0]), use_cache=True,
                               position_ids=positions[:, -1:] + 1 + i).logits)
        graphed.append(decoder.step(tokens[:, i:i + 1]).clone())
    return torch.cat(eager, 1), torch.cat(graphed, 1), decoder


def test_the_graph_decoder_takes_a_fixed_memory():
    """The memory chosen at prefill is fixed, so the graph decoder's step (here eager, on CPU: what a capture
    records) decodes it as the model's own cached step does, past several windows; so does 'recall'. (The graph
    decoder holds the 'sum' state only.)"""
    model = converted("sum")
    prompt, tokens = torch.randint(1, 128, (2, 15)), torch.randint(1, 128, (2, 12))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    eager, graphed, _ = graph_decoded(model, prompt, mask, tokens, capture=False)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
    linearize.set_hybrid(model, sparse_memory=16, memory_fill=True)  # free slots filled as keys leave: masked writes
    eager, graphed, _ = graph_decoded(model, prompt, mask, tokens, capture=False)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
    linearize.set_hybrid(model, sparse_memory=3, memory_fill=False, memory_select="recall")  # chosen online: its boundary step is captured too
    eager, graphed, _ = graph_decoded(model, prompt, mask, tokens, capture=False)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_graph_replay_of_a_fixed_memory_equals_eager_stepping(family):
    model = converted("sum", family).cuda()
    prompt, tokens = torch.randint(1, 128, (2, 15), device="cuda"), torch.randint(1, 128, (2, 20), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    eager, graphed, decoder = graph_decoded(model, prompt, mask, tokens, capture=True)
    assert decoder.captured
    torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
    linearize.set_hybrid(model, sparse_memory=24, memory_fill=True)  # the free slots' masked writes, replayed
    eager, graphed, decoder = graph_decoded(model, prompt, mask, tokens, capture=True)
    assert decoder.captured
    torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_bf16_auto_backend_matches_torch():
    """On CUDA in bf16, backend 'auto' runs the prompt's full forward on the Triton kernels (it has no memory) and the
    selection and decoding in PyTorch: layer 0 keeps the keys backend 'torch' keeps, the prefill and decoded logits
    agree to bf16 precision, and generate replays a captured step with the same tokens as the eager one."""
    settings = dict(window=16, sparse_memory=8, memory_observe=8, softmax_sinks=0)
    model = converted("sum", **settings).cuda().to(torch.bfloat16)
    torch_model = converted("sum", backend="torch", **settings).cuda().to(torch.bfloat16)
    torch_model.load_state_dict(model.state_dict())
    ids = torch.randint(1, 128, (2, 300), device="cuda")
    logits, states = [], []
    with torch.no_grad():
        for m in (model, torch_model):
            cache = DynamicCache(config=m.config)
            out = [m(ids[:, :260], **cache_kwargs(cache), use_cache=True).logits]
            out += [m(ids[:, i:i + 1], **cache_kwargs(cache), use_cache=True).logits for i in range(260, 300)]
            logits.append(torch.cat(out, 1).float())
            states.append(cache.layers[0].state)
    assert states[0].memory_fixed and torch.equal(states[0].memory.k, states[1].memory.k)
    assert (logits[0] - logits[1]).abs().max() < 0.1
    captured = model.generate(ids[:, :260], max_new_tokens=12, do_sample=False)
    assert model.decode_path.path == "captured", model.decode_path.describe()
    os.environ["LINEARIZE_EAGER_DECODE"] = "1"
    try:
        eager = model.generate(ids[:, :260], max_new_tokens=12, do_sample=False)
    finally:
        del os.environ["LINEARIZE_EAGER_DECODE"]
    assert model.decode_path.path == "eager" and torch.equal(captured, eager)


@pytest.mark.parametrize("kind", ["sum", "gated", "delta"])
def test_memory_in_state_keeps_the_linear_state_of_the_full_forward(kind):
    """With memory_in_state the linear state after the prefill is the one a prompt without any memory builds (every
    key outside the window enters, as in training); without it the kept keys are missing from it. The memory is the
    same either way."""
    t = 24
    q, k, v, qf, kf, valid, log_decay, beta = layer_inputs(t)
    gates = gates_of(kind, log_decay, beta)
    spec_kw = dict(scale=D**-0.5, window=4, rule="mix", linear_state=kind, sparse_memory=3, memory_select="query",
                   softmax_sinks=2, memory_reread=1)
    lags = set() if kind == "sum" else {4}
    n = t - 1  # the prompt's last token is decoded against the memory
    head, last = slice(0, n), slice(n, t)
    cut = lambda sl: {name: x[:, :, sl] for name, x in gates.items()}  # noqa: E731

    def linear(state):
        parts = state.linear.tensors() if kind == "sum" else [x for slot in state.linear for x in slot.tensors()]
        return torch.cat([x.flatten().float() for x in parts])

    with torch.no_grad():
        states = {flag: prefill_selecting(q, k, v, qf, kf, valid, modes=["hybrid"], weight=0.5, lags=lags, **gates,
                                          **with_spec(**spec_kw, memory_in_state=flag))[0] for flag in (False, True)}
        no_memory = with_spec(**{**spec_kw, "sparse_memory": 0, "memory_select": "recall"})
        plain = prefill_state(k[:, :, head], v[:, :, head], kf[:, :, head], valid[:, head], lags=lags, **cut(head),
                              **no_memory)
        decode_step(plain, q[:, :, last], k[:, :, last], v[:, :, last], qf[:, :, last], kf[:, :, last],
                    modes=["hybrid"], weight=0.5, valid=valid[:, last], **cut(last), **no_memory)
    kept, dropped = states[True], states[False]
    assert torch.equal(kept.memory.k, dropped.memory.k) and kept.memory.valid.any()
    torch.testing.assert_close(linear(kept), linear(plain), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(linear(dropped), linear(plain))  # the kept keys' writes are missing
