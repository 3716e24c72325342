"""The short causal convolution on the linear branch's q/k (HybridConfig.qk_conv, LAWCAT): the convolution against a
plain loop, identity start, decode == forward, padding, save/load, stage-1 training, LA off, memory, bad values."""

import pytest
import torch
from tiny_models import assert_beam_scores_equal_forward, assert_decode_equals_forward, left_padded_batch, tiny_model
from transformers import DynamicCache

import linearize
from linearize.attention.cache import cache_nbytes
from linearize.attention.common import causal_conv
from linearize.compat import cache_kwargs
from linearize.models.memory import decode_state_bytes

#: linear states with the settings each needs (the unnormalised delta rule combines with 'mix' only)
STATES = {"sum": {}, "gated": {"decay_init": 0.8}, "delta": {"decay_init": 0.8, "combine": "mix"}}


def converted(kind="sum", qk_conv=3, family="llama", perturb=True, **settings):
    """A tiny model converted with the q/k convolution; the conversion's parameters moved off their init."""
    hybrid = linearize.HybridConfig(**{"window": 6, "linear_state": kind, "qk_conv": qk_conv, **STATES[kind], **settings})
    model = linearize.convert(tiny_model(family), hybrid)
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(part in name for part in ("qk_conv", "decay_proj", "beta_proj", "feature_map")):
                    p.add_(0.2 * torch.randn_like(p))
    return model


def loop_conv(x, weight, valid):
    """The definition, one output at a time: out[t] = w[K-1] x[t] + sum_{j<K-1} w[j] x[t-K+1+j], past padding = 0."""
    t = x.shape[2]
    taps = weight.shape[-1]
    out = torch.zeros_like(x)
    for i in range(t):
        for j in range(taps):
            s = i - taps + 1 + j
            if s < 0:
                continue
            term = weight[None, :, :, j] * x[:, :, s]
            if s != i:  # past taps read padding as zero
                term = term * valid[:, None, s, None]
            out[:, :, i] += term
    return out


@pytest.mark.parametrize("heads", [4, 2])
def test_causal_conv_matches_a_plain_loop_with_gradients(heads):
    torch.manual_seed(0)
    x = torch.randn(2, heads, 9, 5, requires_grad=True)
    w = torch.randn(heads, 5, 4, requires_grad=True)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :3] = False
    got, history = causal_conv(x, w, valid)
    want = loop_conv(x, w, valid.float())
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    gx, gw = torch.autograd.grad(got, (x, w), grad)
    wx, ww = torch.autograd.grad(want, (x, w), grad)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw, ww)
    torch.testing.assert_close(history, x[:, :, -3:].detach())
    # in two calls through the history: the same outputs
    first, h1 = causal_conv(x[:, :, :5], w, valid[:, :5])
    second, _ = causal_conv(x[:, :, 5:], w, valid[:, 5:], h1)
    torch.testing.assert_close(torch.cat([first, second], 2), got)


@pytest.mark.parametrize("kind", list(STATES))
def test_identity_start_equals_no_convolution_exactly(kind):
    ids = torch.randint(1, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        plain = converted(kind, qk_conv=0, perturb=False)
        conv = converted(kind, qk_conv=4, perturb=False)
        assert [p.shape for n, p in conv.named_parameters() if "qk_conv" in n][:2] == [(4, 16, 4), (2, 16, 4)]
        for mode in ("hybrid", "la_only"):
            with linearize.components(plain, mode), linearize.components(conv, mode):
                assert torch.equal(plain(ids).logits, conv(ids).logits)
                assert torch.equal(plain(ids, attention_mask=mask).logits, conv(ids, attention_mask=mask).logits)


def decode_vs_forward(model, mode, ids, prompt=8):
    return assert_decode_equals_forward(model, mode, ids, prompt)


@pytest.mark.parametrize("kind", list(STATES))
@pytest.mark.parametrize("mode", ["hybrid", "la_only"])
def test_decoding_matches_the_full_forward(kind, mode):
    """Per-step logits after a prompt of 8 (the ring wraps; and of 2, shorter than the K - 1 = 3 past inputs), and
    greedy tokens."""
    model = converted(kind, qk_conv=4)
    ids = torch.randint(1, 128, (2, 16))
    decode_vs_forward(model, mode, ids)
    decode_vs_forward(model, mode, ids[:1, :7], prompt=2)
    prompt = ids[:1, :8]
    with linearize.components(model, mode), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        greedy = prompt
        for _ in range(6):  # no cache: each token from a full forward
            greedy = torch.cat([greedy, model(greedy).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, greedy)


@pytest.mark.parametrize("settings", [{"placement": "overlap"}, {"softmax_sinks": 2}, {"sparse_memory": 3, "memory_block": 4}])
def test_decoding_matches_the_full_forward_with_other_options(settings):
    """The 'sum' state with overlap placement, softmax sinks, sparse memory (its scores read the convolved features)."""
    decode_vs_forward(converted("sum", qk_conv=3, **settings), "hybrid", torch.randint(1, 128, (2, 20)))


@pytest.mark.parametrize("kind, qk_conv", [("sum", 1), ("gated", 16)])
def test_the_smallest_and_largest_kernels_decode_like_the_forward(kind, qk_conv):
    """K = 1 keeps no past inputs; K = 16 reaches past the 8-token prompt."""
    decode_vs_forward(converted(kind, qk_conv=qk_conv), "la_only", torch.randint(1, 128, (2, 20)))


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_other_families_decode_like_the_forward(family):
    """Gemma 3 (q/k norms, one KV head, local layers) and Qwen 2 (q/k biases)."""
    decode_vs_forward(converted("gated", qk_conv=3, family=family), "hybrid", torch.randint(1, 128, (2, 18)))


def test_beam_search_scores_equal_the_full_forward():
    """Beams reorder the state, the convolution's past inputs included (index_select)."""
    assert_beam_scores_equal_forward(converted("gated", qk_conv=4, window=4), new_tokens=8)


@pytest.mark.parametrize("kind", list(STATES))
def test_decoding_a_chunk_of_tokens_after_the_prompt(kind):
    """A cached call with several new tokens reads and rolls the history like single steps."""
    model = converted(kind, qk_conv=3)
    ids = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :6], **cache_kwargs(cache), use_cache=True).logits
        rest = model(ids[:, 6:], **cache_kwargs(cache), use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(STATES))
@pytest.mark.parametrize("mode", ["hybrid", "la_only"])
def test_left_padded_row_equals_the_row_alone(kind, mode):
    model = converted(kind, qk_conv=4)
    row = torch.randint(1, 128, (1, 12))
    batch, mask = left_padded_batch(row)
    batch[0, :5] = 7  # the pad id 0 embeds to zeros (padding_idx): make padding nonzero, so a leak would show
    with torch.no_grad(), linearize.components(model, mode):
        padded = model(batch, attention_mask=mask).logits[0, 5:]
        alone = model(row).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    with linearize.components(model, mode):
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
        single = model.generate(row, max_new_tokens=8, do_sample=False)
    assert torch.equal(together[0, 17:], single[0, 12:])


def test_la_off_ignores_the_convolution():
    """swa_only never reads the linear branch: the trained convolution changes nothing there."""
    ids = torch.randint(1, 128, (2, 16))
    plain, conv = converted(qk_conv=0), converted(qk_conv=5)
    with torch.no_grad(), linearize.components(plain, "swa_only"), linearize.components(conv, "swa_only"):
        assert torch.equal(plain(ids).logits, conv(ids).logits)
    decode_vs_forward(conv, "swa_only", ids)


def test_save_load_keeps_the_trained_convolution(tmp_path):
    model = converted("gated", qk_conv=3)
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    names = [k for k in a if "qk_conv" in k]
    assert len(names) == 4 and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[names[0]], converted("gated", qk_conv=3, perturb=False).state_dict()[names[0]])
    assert linearize.hybrid_config_of(loaded).qk_conv == 3
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("kind, objective", [("sum", "weights"), ("gated", "output"), ("delta", "hybrid_output")])
def test_stage1_trains_the_convolution(kind, objective):
    from linearize.train.transfer import AttentionTransfer, trainable_transfer_params

    model = converted(kind, qk_conv=3, perturb=False)
    params = trainable_transfer_params(model, train_feature_maps=True)
    conv = {n: p for n, p in params.items() if "qk_conv" in n}
    assert len(conv) == 4
    before = {n: p.detach().clone() for n, p in conv.items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    with AttentionTransfer(model, objective) as xfer:
        xfer.loss(torch.randint(1, 128, (2, 20))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.values())
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in conv.items())


@pytest.mark.parametrize("kind", list(STATES))
def test_decode_memory_is_what_the_cache_holds(kind):
    model = converted(kind, qk_conv=4, window=8)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 50)), **cache_kwargs(cache), use_cache=True)
    hybrid = linearize.hybrid_config_of(model)
    held = cache_nbytes(cache)
    assert decode_state_bytes(model.config, 50, dtype_bytes=4, hybrid=hybrid) == held
    plain = linearize.HybridConfig(**{**hybrid.to_dict(), "qk_conv": 0})
    # two layers, 4 query + 2 KV heads of 16 channels, K - 1 = 3 past inputs, fp32
    assert held - decode_state_bytes(model.config, 50, dtype_bytes=4, hybrid=plain) == 2 * (4 + 2) * 3 * 16 * 4


def test_the_cache_must_be_prefilled_with_the_convolution():
    model = converted(qk_conv=3)
    ids = torch.randint(1, 128, (1, 8))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        for layer in cache.layers:
            layer.state.conv_q = layer.state.conv_k = None
        with pytest.raises(ValueError, match="start with an empty cache"):
            model(ids[:, :1], **cache_kwargs(cache), use_cache=True)


@pytest.mark.parametrize("value", [-1, 17])
def test_bad_kernel_sizes_are_refused(value):
    with pytest.raises(ValueError, match="qk_conv"):
        linearize.HybridConfig(qk_conv=value)


def test_the_kernel_size_cannot_change_after_conversion():
    with pytest.raises(ValueError, match="qk_conv"):
        linearize.set_hybrid(converted(qk_conv=3), qk_conv=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(STATES))
def test_cuda_backends_match_the_torch_path(kind):
    """backend 'auto' on CUDA (Triton kernels for 'sum', flash-linear-attention for the others, bf16 inside) against
    the fp32 PyTorch path, forward and cached decoding; the convolution's gradients are finite and nonzero."""
    model = converted(kind, qk_conv=4, window=16).cuda()
    reference = converted(kind, qk_conv=4, window=16, backend="torch").cuda()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(1, 128, (2, 300), device="cuda")
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
        cache = DynamicCache(config=model.config)
        model(ids[:, :290], **cache_kwargs(cache), use_cache=True)
        steps = torch.cat([model(ids[:, i:i + 1], **cache_kwargs(cache), use_cache=True).logits for i in range(290, 300)], 1)
    assert (got - want).square().mean().sqrt() <= 0.05 * want.square().mean().sqrt()
    assert (steps - want[:, 290:]).square().mean().sqrt() <= 0.05 * want.square().mean().sqrt()
    model.train()
    model(ids).logits.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "qk_conv" in n]
    assert len(grads) == 4 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_rolls_the_convolution_history():
    from linearize.attention.graph_decode import GraphDecoder

    model = converted("sum", qk_conv=4, family="qwen2").cuda()
    prompt = torch.randint(1, 128, (2, 9), device="cuda")
    tokens = torch.randint(1, 128, (2, 12), device="cuda")
    caches = []
    for _ in range(2):
        caches.append(DynamicCache(config=model.config))
        with torch.no_grad():
            model(prompt, **cache_kwargs(caches[-1]), use_cache=True)
    eager, graphed = caches
    decoder = GraphDecoder(model, graphed, positions=9)
    for i in range(tokens.shape[1]):
        with torch.no_grad():
            expected = model(tokens[:, i:i + 1], **cache_kwargs(eager), use_cache=True,
                             position_ids=torch.full((2, 1), 9 + i, device="cuda")).logits
        torch.testing.assert_close(decoder.step(tokens[:, i:i + 1]), expected, atol=1e-4, rtol=1e-4)
    assert decoder.captured
