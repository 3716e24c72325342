"""Sparse exact memory with the decaying states ('gated', 'delta'): the reference's loop (the definition) against the
chunked walk and recurrent decoding, outputs and gradients in fp32; m = 0 with one-token blocks is the plain state;
padding; whole tiny models (decode == forward, left padding, save/load, decode bytes)."""

import pytest
import torch
from kinds import B, D, HKV, HQ, random_inputs
from spec_kwargs import with_spec
from tiny_models import (assert_decode_bytes_are_the_cache, assert_beam_scores_equal_forward, assert_decode_equals_forward, converted_off_init,
                         left_padded_batch)
from transformers import DynamicCache

import linearize
from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.linear import linear_state
from linearize.attention.memory import memory_walk
from linearize.attention.recurrent import decode_step, prefill_state
from linearize.attention.reference import decayed_memory_walk, hybrid_attention_reference
from linearize.compat import cache_kwargs

KINDS = ["gated", "delta"]


def layer_inputs(t, seed=0):
    """q, k (softmax branch), features, v, gates, and a left-padded second row (no decay at padding)."""
    qf, kf, v, ld, beta, _ = random_inputs(t, seed=seed, holes=False)
    g = torch.Generator().manual_seed(seed + 100)
    q, k = torch.randn(B, HQ, t, D, generator=g), torch.randn(B, HKV, t, D, generator=g)
    valid = torch.ones(B, t, dtype=torch.bool)
    valid[1, :5] = False
    return q, k, v, qf, kf, ld * valid[:, None], beta, valid


def decode(q, k, v, qf, kf, ld, beta, valid, prompt, spec_kw, weight):
    """Prefill `prompt` tokens, then step token by token in 'hybrid' mode, as HybridAttention decodes."""
    gates = lambda sl: dict(log_decay=ld[:, :, sl], beta=beta[:, :, sl])  # noqa: E731
    p = slice(0, prompt)
    lag = 0 if spec_kw.get("placement") == "overlap" else spec_kw["window"]
    state = prefill_state(k[:, :, p], v[:, :, p], kf[:, :, p], valid[:, p], lags={lag},
                          **with_spec(num_sinks=8, **spec_kw), **gates(p))
    outs = []
    for i in range(prompt, q.shape[2]):
        s = slice(i, i + 1)
        out = decode_step(state, q[:, :, s], k[:, :, s], v[:, :, s], qf[:, :, s], kf[:, :, s], modes=["hybrid"],
                          valid=valid[:, s], weight=weight, **gates(s), **with_spec(**spec_kw))
        outs.append(out["hybrid"])
    return torch.cat(outs, 2), state


SETTINGS = [(dict(sparse_memory=3, memory_block=4), 0), (dict(sparse_memory=3, memory_block=4), 8),
            (dict(softmax_sinks=2, sparse_memory=2, memory_block=5), 13)]
CASES = [(kind, rule, s, p, w) for kind in KINDS for rule in ("mix", "shared_norm") for s, p in SETTINGS
         for w in (1, 4) if not (kind == "delta" and rule == "shared_norm")]
CASES += [(kind, "mix", {**s, "placement": "overlap"}, p, 4) for kind in KINDS for s, p in SETTINGS[1:]]


@pytest.mark.parametrize("kind,rule,settings,prompt,window", CASES)
def test_reference_chunked_and_recurrent_agree(kind, rule, settings, prompt, window):
    """GQA, left padding, T not a multiple of the chunk or block; prompts ending before, on and after a boundary;
    decoding crosses several boundaries; under 'overlap' the memory's state only scores."""
    t = 31
    q, k, v, qf, kf, ld, beta, valid = layer_inputs(t)
    kw = dict(scale=D**-0.5, weight=torch.rand(HQ) * 0.8 + 0.1, rule=rule, mode="hybrid", valid=valid, log_decay=ld,
              beta=beta, linear_state=kind, window=window, **settings)
    with torch.no_grad():
        ref = hybrid_attention_reference(q, k, v, qf, kf, **with_spec(**kw))
        chunked = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(chunk_size=4, **kw))
        spec_kw = dict(scale=D**-0.5, rule=rule, linear_state=kind, window=window, **settings)
        out, state = decode(q, k, v, qf, kf, ld, beta, valid, prompt, spec_kw, kw["weight"])
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref[:, :, prompt:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ref).all() and state.memory.valid.any()
    plain = hybrid_attention_reference(q, k, v, qf, kf, **with_spec(**{**kw, "sparse_memory": 0}))
    assert not torch.allclose(plain, ref)  # the memory changes the output


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_the_reference(kind):
    """Through the kept keys (softmax), the evicted keys' decay-weighted entry and the delta rule's writes: q, k, v,
    both features, log_decay and beta."""
    t = 22
    q, k, v, qf, kf, ld, beta, valid = layer_inputs(t, seed=3)
    kw = dict(scale=D**-0.5, weight=0.4, rule="mix", mode="hybrid", valid=valid, linear_state=kind, window=3,
              softmax_sinks=1, sparse_memory=2, memory_block=4)
    grads = []
    for fn, extra in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 8})):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, qf, kf, ld, beta)]
        out = fn(*xs[:5], **with_spec(log_decay=xs[5], beta=xs[6], **kw, **extra))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad for x in xs])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert grads[0][5].abs().sum() > 0 and (kind == "gated" or grads[0][6].abs().sum() > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_no_slots_and_one_token_blocks_is_the_plain_state(kind):
    """m = 0, C = 1: every key enters at its own entry step (w after it) with weight 1, as in the plain lag-w state;
    the definition (reference loop) and the chunked walk both give the kind's naive sums."""
    t, window = 17, 3
    qf, kf, v, ld, beta, enter = random_inputs(t, seed=5)
    kind_ = linear_state(kind)
    want = kind_.naive(qf, kf, v, log_decay=ld, beta=beta, enter=enter, lag=window)
    _, got = decayed_memory_walk(qf, kf, v, enter, kind=kind_, window=window, block=1, slots=0, log_decay=ld, beta=beta)
    walk = memory_walk(kf, v, kf, enter, kind=kind_, window=window, block=1, slots=0, blocks=t, log_decay=ld, beta=beta)
    reads = [kind_.read(state, qf[:, :, j:j + 1]) for j, (state, _) in enumerate(walk)]
    walked = tuple(torch.cat(x, 2) for x in zip(*reads))
    for sums in (got, walked):
        torch.testing.assert_close(sums[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sums[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_enters_the_sums(kind):
    """Huge padded keys/values change no valid query's output (never sinks, memory or state)."""
    q, k, v, qf, kf, ld, beta, valid = layer_inputs(23, seed=7)
    kw = dict(scale=D**-0.5, weight=0.5, rule="mix", valid=valid, log_decay=ld, beta=beta, linear_state=kind, window=3,
              chunk_size=4, softmax_sinks=2, sparse_memory=2, memory_block=4)
    base = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(**kw))
    k2, v2, kf2 = k.clone(), v.clone(), kf.clone()
    k2[1, :, :5], v2[1, :, :5], kf2[1, :, :5] = 1e3 * torch.randn_like(k2[1, :, :5]), 1e3, 1e3
    other = hybrid_attention_chunked(q, k2, v2, qf, kf2, **with_spec(**kw))
    torch.testing.assert_close(other[:, :, 5:], base[:, :, 5:])
    torch.testing.assert_close(other[0], base[0])


@pytest.mark.parametrize("kind", KINDS)
def test_memory_keeps_a_key_the_state_cannot_recall(kind):
    """Every key has the same features and every value is c but one planted token's: the state recalls c, so only the
    planted key has a large error; it is kept to the end, and a query matching its key reads its value exactly."""
    t, window, planted, d = 48, 4, 17, 8
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, t, d, generator=g)
    kf = (torch.rand(1, 1, 1, d, generator=g) + 0.1).expand(1, 1, t, d).contiguous()
    c = torch.randn(d, generator=g)
    v = c.expand(1, 1, t, d).clone()
    v[0, 0, planted] = c + 5 * torch.eye(d)[0]
    q = torch.zeros(1, 1, t, d)
    q[0, 0, -1] = 8 * k[0, 0, planted]  # the last query looks for the planted key
    qf = torch.rand(1, 1, t, d, generator=g)
    ld, beta = torch.full((1, 1, t), -0.01), torch.full((1, 1, t), 0.9)
    settings = dict(sparse_memory=2, memory_block=4, linear_state=kind, window=window)
    state = prefill_state(k, v, kf, torch.ones(1, t, dtype=torch.bool), lags={window}, log_decay=ld, beta=beta,
                          **with_spec(num_sinks=0, **settings))
    kept = state.memory.v[0, 0][state.memory.valid[0, 0]]
    assert any(torch.equal(row, v[0, 0, planted]) for row in kept)
    kw = dict(scale=d**-0.5, weight=1.0, rule="mix", chunk_size=8, log_decay=ld, beta=beta)  # g = 1: softmax alone
    out = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(**kw, **settings))[0, 0, -1]
    without = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(**kw, **{**settings, "sparse_memory": 0}))[0, 0, -1]
    assert (out - c)[0] > 4.5 and (without - c).abs().max() < 1e-5


MODEL_SETTINGS = dict(window=4, sparse_memory=3, memory_block=4, softmax_sinks=2, combine="mix")


def converted(kind, family="llama", **settings):
    """A tiny model with `kind` and sparse memory, its state parameters moved off their init (strong decay)."""
    return converted_off_init(family, linearize.HybridConfig(linear_state=kind, decay_init=0.8,
                                                             **{**MODEL_SETTINGS, **settings}))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family,mode,settings", [("llama", "hybrid", {}), ("gemma3", "hybrid", {}),
                                                  ("llama", "la_only", {}), ("llama", {0: {1: "la_only", 3: "swa_only"}}, {}),
                                                  ("llama", "hybrid", {"qk_conv": 3, "memory_block": 3}),
                                                  ("llama", "hybrid", {"placement": "overlap"}),
                                                  ("llama", "la_only", {"placement": "overlap"})])
def test_decoding_equals_the_full_forward(kind, family, mode, settings):
    """A 10-token prompt, then 22 steps: several boundaries, the ring wraps; per-head modes mix memory and not; the
    q/k convolution feeds the scores."""
    model = converted(kind, family, **settings)
    if settings.get("qk_conv"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "qk_conv" in name:
                    p.add_(0.2 * torch.randn_like(p))
    assert_decode_equals_forward(model, mode, torch.randint(1, 128, (2, 32)))


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_scores_equal_the_full_forward(kind):
    """Beams reorder the memory (its ages and betas included) with the rest of the state."""
    assert_beam_scores_equal_forward(converted(kind), prompt_len=9, new_tokens=12)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_by_whole_blocks_is_invisible(kind):
    """Boundaries count padding (memory_block), so a row left-padded by one block is the row alone, prefill and
    decoding; and cached decoding of the padded batch equals its full forward."""
    model = converted(kind)
    row = torch.randint(1, 128, (1, 14))
    batch, mask = left_padded_batch(row, pad=4, other=18)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits[0, 4:]
        alone = model(row).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    together = model.generate(batch, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    single = model.generate(row, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(together[0, 18:], single[0, 14:])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(batch, attention_mask=mask, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        steps = [model(batch[:, :9], attention_mask=mask[:, :9], position_ids=pos[:, :9], **cache_kwargs(cache),
                       use_cache=True).logits]
        steps += [model(batch[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1],
                        **cache_kwargs(cache), use_cache=True).logits for i in range(9, 18)]
    cached = torch.cat(steps, 1)
    torch.testing.assert_close(cached[0, 4:], full[0, 4:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached[1], full[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", [{}, {"softmax_sinks": 0}, {"window": 1, "memory_block": 3}, {"placement": "overlap"}])
def test_decode_bytes_are_what_the_cache_holds(kind, settings):
    model = converted(kind, **settings)
    cache = assert_decode_bytes_are_the_cache(model)
    state = cache.layers[0].state
    assert state.memory is not None and state.memory.age is not None and (state.memory.beta is not None) == (kind == "delta")


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    model = converted(kind)
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    assert linearize.hybrid_config_of(loaded).to_dict() == linearize.hybrid_config_of(model).to_dict()
    ids = torch.randint(1, 128, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       loaded.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_auto_backend_runs_the_memory_in_pytorch(kind):
    """On CUDA (fla installed or not) 'auto' takes the PyTorch memory walk for 'hybrid' (the fla kernels cannot take
    the memory): the same logits as backend 'torch', and cached decoding equals the full forward, over 300 tokens with
    the default 64-token blocks."""
    settings = dict(window=16, memory_block=64, sparse_memory=8)
    model = converted(kind, **settings).cuda()
    torch_model = converted(kind, backend="torch", **settings).cuda()
    torch_model.load_state_dict(model.state_dict())
    ids = torch.randint(1, 128, (2, 300), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, torch_model(ids).logits, atol=1e-4, rtol=1e-4)
    # fp32 on cuBLAS: 70 sequential delta-rule updates of the state reorder its sums (max 3e-4 on the logits, H200)
    assert_decode_equals_forward(model, "hybrid", ids[:, :200], prompt=130, atol=1e-3 if kind == "delta" else 1e-4)
