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


# sparse memory chosen online ('recall') on kind 'sum': memory_block 4 and window 4, so a prompt of 9 and 16 new
# tokens cross four block boundaries inside the decoder's steps; the padded row's boundaries are the other row's
MEMORY = dict(window=4, sparse_memory=3, memory_block=4)


def padded_prompt(device="cpu"):
    prompt = torch.randint(1, 128, (2, 9), device=device)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    return prompt, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def memory_model(family, softmax_sinks, device="cpu"):
    config = linearize.HybridConfig(combine="mix", softmax_sinks=softmax_sinks, **MEMORY)
    return linearize.convert(tiny_model(family), config).to(device)


def assert_states_equal(got_cache, want_cache, atol):
    for got, want in zip(got_cache.layers, want_cache.layers):
        assert got.state.seen == want.state.seen
        for a, b in zip(got.state.tensors(), want.state.tensors(), strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def decode_both(model, prompt, tokens, *, capture):
    """Steps the decoder (capture-safe memory step) and the model's eager step side by side after the prompt
    `padded_prompt` gave: yields (decoder logits, eager logits, decoder cache, eager cache) per token."""
    prompt, mask, positions = prompt
    eager = prefilled(model, prompt, attention_mask=mask, position_ids=positions)
    graphed = prefilled(model, prompt, attention_mask=mask, position_ids=positions)
    decoder = GraphDecoder(model, graphed, positions=positions[:, -1:] + 1, capture=capture)
    assert all(layer.state.boundary_every_step for layer in graphed.layers)
    assert not any(layer.state.boundary_every_step for layer in eager.layers)
    for i in range(tokens.shape[1]):
        with torch.no_grad():
            want = model(tokens[:, i:i + 1], **cache_kwargs(eager), use_cache=True,
                         position_ids=positions[:, -1:] + 1 + i).logits
        yield decoder.step(tokens[:, i:i + 1]), want, graphed, eager


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("softmax_sinks", [0, 2])
def test_capture_safe_memory_step_equals_the_eager_step(family, softmax_sinks):
    """GraphDecoder(capture=False) runs what a capture replays: the memory's boundary step on every token, committed
    by masked copies where the device counter ends a block; logits and every state tensor equal the eager step's."""
    torch.manual_seed(0)
    model = memory_model(family, softmax_sinks)
    for got, want, graphed, eager in decode_both(model, padded_prompt(), torch.randint(1, 128, (2, 16)), capture=False):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert_states_equal(graphed, eager, atol=1e-6)
    state = graphed.layers[0].state
    assert state.seen == 25 and int(state.memory_slot) == 25 % 4
    assert state.memory.valid.any()  # the memory holds keys: the boundaries ran


def test_capture_safe_memory_decoding_equals_the_full_forward():
    torch.manual_seed(1)
    model = memory_model("llama", 2)
    prompt, mask, positions = padded_prompt()
    tokens = torch.randint(1, 128, (2, 16))
    logits = [got.clone() for got, *_ in decode_both(model, (prompt, mask, positions), tokens, capture=False)]
    ids = torch.cat([prompt, tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    with torch.no_grad():
        full = model(ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    # the step fed token i predicts position 9 + i + 1; the full forward's logits at position 9 + i
    torch.testing.assert_close(torch.cat(logits, 1), full[:, 9:], atol=1e-4, rtol=1e-4)


def test_a_memory_on_other_linear_states_is_refused():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(linear_state="gated", **MEMORY))
    cache = prefilled(model, torch.randint(1, 128, (1, 9)))
    with pytest.raises(ValueError, match="other than 'sum'"):
        GraphDecoder(model, cache, positions=9, capture=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_captured_memory_replay_equals_eager_stepping(family):
    torch.manual_seed(0)
    model = memory_model(family, 2, device="cuda")
    steps = decode_both(model, padded_prompt("cuda"), torch.randint(1, 128, (2, 20), device="cuda"), capture=True)
    for got, want, graphed, eager in steps:  # 20 tokens: 2 warm-up steps, then > 4 blocks of replays
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_states_equal(graphed, eager, atol=1e-5)
    assert graphed.layers[0].state.memory.valid.any()


def test_compiled_outside_attention_compiles_norms_and_mlps_for_the_duration(monkeypatch):
    """The norms, MLPs and feature maps (every layer's instances sharing one compiled function per class) run compiled inside,
    their own forward after; the logits are the uncompiled model's. A tracing-only backend on the CPU: what a CUDA
    step compiles with inductor, traced whole (fullgraph)."""
    from linearize.attention import graph_decode

    monkeypatch.setattr(graph_decode, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=4)).eval()
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        with graph_decode.compiled_outside_attention(model) as classes:
            wrapped = [m for m in model.modules() if "forward" in m.__dict__]
            got = model(ids).logits
    assert classes == ["FeatureMap", "Gemma3MLP", "Gemma3RMSNorm"]
    assert len(wrapped) == sum(type(m).__name__ in classes for m in model.modules()) > 2 * model.config.num_hidden_layers
    assert not any("forward" in m.__dict__ for m in model.modules())  # each module's own forward again
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_models_of_other_dtypes_and_shapes_compile_in_one_process(monkeypatch):
    """Dynamo keeps one function's compiled graphs per code object, shared by every model of the class in the
    process: fp32, bf16 and fp16 conversions, each stepped at two batch sizes and its prompt's length, compile inside
    the context (past dynamo's default limit of 8 graphs, a hard error under fullgraph before the context raised it)
    and give the uncompiled logits."""
    from linearize.attention import graph_decode

    monkeypatch.setattr(graph_decode, "COMPILE_BACKEND", "aot_eager")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=4)).to(dtype).eval()
        for batch, length in ((2, 7), (2, 1), (1, 1), (3, 5)):
            ids = torch.randint(1, 128, (batch, length))
            with torch.no_grad():
                want = model(ids).logits
                with graph_decode.compiled_outside_attention(model):
                    got = model(ids).logits
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_a_fused_step_decodes_as_the_unfused_one(monkeypatch):
    """GraphDecoder(fuse=True) (capture=False: every step inside the compiled context) steps the cache as the eager
    model does, token by token."""
    from linearize.attention import graph_decode

    monkeypatch.setattr(graph_decode, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = linearize.convert(tiny_model("qwen2"), linearize.HybridConfig(window=4, combine="mix")).eval()
    prompt, tokens = torch.randint(1, 128, (2, 9)), torch.randint(1, 128, (2, 6))
    eager, fused = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphDecoder(model, fused, positions=9, capture=False, fuse=True)
    for i in range(tokens.shape[1]):
        with torch.no_grad():
            want = model(tokens[:, i:i + 1], **cache_kwargs(eager), use_cache=True,
                         position_ids=torch.full((2, 1), 9 + i)).logits
        torch.testing.assert_close(decoder.step(tokens[:, i:i + 1]), want, atol=1e-5, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_fused_graph_replay_equals_eager_stepping(family):
    """The captured step with the norms and MLPs compiled by inductor (fuse=True) replays what eager stepping gives;
    the modules run their own forward after the capture."""
    torch.manual_seed(0)
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=6)).cuda().eval()
    prompt, tokens = torch.randint(1, 128, (2, 9), device="cuda"), torch.randint(1, 128, (2, 12), device="cuda")
    eager, graphed = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphDecoder(model, graphed, positions=9, fuse=True)
    for i in range(tokens.shape[1]):
        with torch.no_grad():
            want = model(tokens[:, i:i + 1], **cache_kwargs(eager), use_cache=True,
                         position_ids=torch.full((2, 1), 9 + i, device="cuda")).logits
        torch.testing.assert_close(decoder.step(tokens[:, i:i + 1]), want, atol=2e-4, rtol=2e-4)
    assert decoder.captured and not any("forward" in m.__dict__ for m in model.modules())
