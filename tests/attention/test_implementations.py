"""Reference (the spec) vs chunked vs recurrent: outputs and gradients on fresh random inputs."""

import itertools

import pytest
import torch
from autograd_memory import largest_saved

from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.recurrent import advance_state, decode_output, prefill_state
from linearize.attention.reference import hybrid_attention_reference
from linearize.feature_maps import FEATURE_MAPS, FeatureMap
from spec_kwargs import with_spec

B, HQ, HKV, D = 2, 4, 2, 8


def make_inputs(t, feature_map="hedgehog", size="full", dtype=torch.float32, padded=True):
    q = torch.randn(B, HQ, t, D, dtype=dtype)
    k = torch.randn(B, HKV, t, D, dtype=dtype)
    v = torch.randn(B, HKV, t, D, dtype=dtype)
    if feature_map == "none":  # keep the identity map's normaliser away from zero
        q, k = q.abs() + 0.5, k.abs() + 0.5
    fq = FeatureMap(HQ, D, feature_map, size).to(dtype)
    fk = FeatureMap(HKV, D, feature_map, size).to(dtype)
    valid = torch.ones(B, t, dtype=torch.bool)
    if padded:
        valid[1, :5] = False  # left padding in the second row
    weight = torch.rand(HQ, dtype=dtype) * 0.8 + 0.1
    return q, k, v, fq, fk, valid, weight


def run(fn, q, k, v, fq, fk, valid, weight, **kw):
    return fn(q, k, v, fq(q), fk(k), **with_spec(valid=valid, weight=weight, scale=D**-0.5, **kw))


def reference_and_chunked_grads(q, k, v, fq, fk, valid, weight, **kw):
    """[reference grads, chunked grads (chunk 8)] of q, k, v, weight and both feature maps' weights under one fixed
    readout of the output; a gradient the path does not produce stays None."""
    tensors = [q, k, v, weight]
    grads = []
    for fn, extra in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 8})):
        for x in tensors:
            x.requires_grad_(True)
            x.grad = None
        fq.zero_grad(), fk.zero_grad()
        out = run(fn, q, k, v, fq, fk, valid, weight, **kw, **extra)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad for x in tensors + [fq.weight, fk.weight]])  # fresh tensors each pass: no copies needed
    return grads


def decode(state, q, k, v, qf, kf, valid, start, **kw):
    """Outputs of tokens start.. stepped one by one, as HybridAttention decodes (the window sits in the state)."""
    kw = {**kw, "window": state.buf_k.shape[2] + 1}
    outs = []
    for i in range(start, q.shape[2]):
        s = slice(i, i + 1)
        outs.append(decode_output(state, q[:, :, s], k[:, :, s], v[:, :, s], qf[:, :, s], kf[:, :, s],
                                  **with_spec(valid=valid[:, s], **kw)))
        advance_state(state, k[:, :, s], v[:, :, s], kf[:, :, s], valid[:, s])
    return torch.cat(outs, 2)


CASES = list(itertools.product(["shared_norm", "mix"], ["complementary", "overlap"], [1, 5, 16]))


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "la_only", "sinks_only", "none"])
@pytest.mark.parametrize("rule,placement,window", CASES)
def test_chunked_matches_reference_outputs(mode, rule, placement, window):
    t = 29  # not a multiple of the chunk size
    q, k, v, fq, fk, valid, weight = make_inputs(t)
    kw = dict(window=window, rule=rule, placement=placement, mode=mode)
    ref = run(hybrid_attention_reference, q, k, v, fq, fk, valid, weight, **kw)
    out = run(hybrid_attention_chunked, q, k, v, fq, fk, valid, weight, chunk_size=8, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("rule,placement", [("shared_norm", "complementary"), ("mix", "overlap"), ("mix", "complementary")])
@pytest.mark.parametrize("size", ["full", "half"])
def test_chunked_matches_reference_gradients(feature_map, rule, placement, size):
    t = 21
    q, k, v, fq, fk, valid, weight = make_inputs(t, feature_map, size)
    grads = reference_and_chunked_grads(q, k, v, fq, fk, valid, weight, window=6, rule=rule, placement=placement,
                                        mode="hybrid")
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "la_only", "sinks_only", "none"])
@pytest.mark.parametrize("rule,placement,window", CASES)
@pytest.mark.parametrize("prompt", [0, 3, 11])
def test_recurrent_matches_reference(mode, rule, placement, window, prompt):
    """Padding rows, GQA, and 3 * window steps after the prompt: the ring wraps around several times."""
    t = prompt + 3 * window + 2
    q, k, v, fq, fk, valid, weight = make_inputs(t)
    qf, kf = fq(q), fk(k)
    kw = dict(scale=D**-0.5, window=window, weight=weight, rule=rule, placement=placement, mode=mode)
    ref = hybrid_attention_reference(q, k, v, qf, kf, **with_spec(valid=valid, **kw))
    state = prefill_state(k[:, :, :prompt], v[:, :, :prompt], kf[:, :, :prompt], valid[:, :prompt],
                          **with_spec(window=window, num_sinks=8))
    out = decode(state, q, k, v, qf, kf, valid, prompt, **kw)
    torch.testing.assert_close(out, ref[:, :, prompt:], atol=1e-5, rtol=1e-5)
    assert state.seen == t


def test_state_keeps_its_shapes_and_storage_while_decoding():
    """What a captured CUDA graph relies on: every step writes into the same tensors, whose shapes never change."""
    t, window = 40, 6
    q, k, v, fq, fk, valid, weight = make_inputs(t)
    qf, kf = fq(q), fk(k)
    state = prefill_state(k[:, :, :2], v[:, :, :2], kf[:, :, :2], valid[:, :2], **with_spec(window=window, num_sinks=8))
    layout = [(x.data_ptr(), x.shape) for x in state.tensors() + [state.slot]]
    assert state.buf_k.shape[2] == window - 1 and state.buf_valid.sum(1).tolist() == [2, 0]  # row 1 starts with padding
    decode(state, q, k, v, qf, kf, valid, 2, scale=D**-0.5, weight=weight)
    assert [(x.data_ptr(), x.shape) for x in state.tensors() + [state.slot]] == layout
    assert int(state.slot) == t % (window - 1)


def test_padding_never_enters_the_sums():
    """Changing padded keys/values (even to huge values) leaves every valid query's output unchanged."""
    t = 23
    q, k, v, fq, fk, valid, weight = make_inputs(t)
    for mode in ("hybrid", "la_only", "swa_only", "sinks_only"):
        kw = dict(window=4, mode=mode, chunk_size=8)
        base = run(hybrid_attention_chunked, q, k, v, fq, fk, valid, weight, **kw)
        k2, v2 = k.clone(), v.clone()
        k2[1, :, :5] = 1e3 * torch.randn_like(k2[1, :, :5])
        v2[1, :, :5] = 1e3
        other = run(hybrid_attention_chunked, q, k2, v2, fq, fk, valid, weight, **kw)
        torch.testing.assert_close(other[:, :, 5:], base[:, :, 5:])
        torch.testing.assert_close(other[0], base[0])


def test_swa_only_with_full_window_is_softmax_attention():
    t = 17
    q, k, v, fq, fk, _, weight = make_inputs(t, padded=False)
    out = run(hybrid_attention_chunked, q, k, v, fq, fk, None, weight, window=t, mode="swa_only", chunk_size=8)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=D**-0.5)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


def test_chunked_memory_is_linear_in_length():
    """No (T x T) tensor: the largest intermediate grows linearly with T (checked with a saved-tensor hook)."""
    sizes = {}
    for t in (256, 512):
        q, k, v, fq, fk, valid, weight = make_inputs(t, padded=False)
        q.requires_grad_(True)
        _, sizes[t] = largest_saved(lambda: run(hybrid_attention_chunked, q, k, v, fq, fk, valid, weight, window=16,
                                                chunk_size=32))
    assert sizes[512] <= 2.2 * sizes[256]


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("rule,placement", [("shared_norm", "complementary"), ("mix", "overlap")])
def test_every_feature_map_agrees_across_the_three_implementations(feature_map, rule, placement):
    """Outputs of reference, chunked and recurrent decoding for each feature map (GQA, padding, T % chunk != 0)."""
    t, window = 19, 5
    q, k, v, fq, fk, valid, weight = make_inputs(t, feature_map)
    qf, kf = fq(q), fk(k)
    kw = dict(scale=D**-0.5, window=window, weight=weight, rule=rule, placement=placement, mode="hybrid")
    ref = hybrid_attention_reference(q, k, v, qf, kf, **with_spec(valid=valid, **kw))
    chunked = hybrid_attention_chunked(q, k, v, qf, kf, **with_spec(valid=valid, chunk_size=8, **kw))
    state = prefill_state(k[:, :, :4], v[:, :, :4], kf[:, :, :4], valid[:, :4], **with_spec(window=window, num_sinks=8))
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode(state, q, k, v, qf, kf, valid, 4, **kw), ref[:, :, 4:], atol=1e-5, rtol=1e-5)
