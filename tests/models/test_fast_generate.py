"""generate() of a converted model: the captured decode step where it applies, the eager step (and why) elsewhere."""

import functools
import logging

import pytest
import torch
from transformers import GenerationMixin

import linearize
from linearize.attention.graph_decode import GraphDecoder
from linearize.attention.ring import RingWindowLayer
from linearize.compat import cache_kwargs, output_cache
from linearize.models import generation
from tiny_models import tiny_model

CUDA = torch.cuda.is_available()


def eager_generate(model, *args, **kwargs):
    """HF's own generate loop on the model's eager forward (the converted class's override bypassed)."""
    return GenerationMixin.generate(model, *args, **kwargs)


def left_padded_batch(device="cpu", pad=4):
    ids = torch.randint(1, 128, (2, 11), device=device)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def test_cpu_generate_runs_the_eager_step_says_why_and_equals_hf_generate(caplog):
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    prompt = torch.randint(1, 128, (1, 9))
    with caplog.at_level(logging.INFO, logger=generation.__name__):
        out = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert model.decode_path.path == "eager" and "needs CUDA" in model.decode_path.reason
    assert any("eager decode step" in r.getMessage() for r in caplog.records)
    assert torch.equal(out, eager_generate(model, prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False))


def test_the_environment_can_keep_every_call_eager(monkeypatch):
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    monkeypatch.setenv(generation.EAGER_ENV, "1")
    assert generation.eager_reason(model, None, {}) == f"{generation.EAGER_ENV} is set"  # before any other reason
    monkeypatch.setenv(generation.EAGER_ENV, "0")
    assert "needs CUDA" in generation.eager_reason(model, None, {})


def test_eager_reasons_name_what_a_captured_step_cannot_do(monkeypatch):
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    assert "beam search" in generation.eager_reason(model, None, {"num_beams": 3})
    assert "use_cache" in generation.eager_reason(model, None, {"use_cache": False})
    assert "assisted" in generation.eager_reason(model, None, {"prompt_lookup_num_tokens": 3})
    assert "needs CUDA" in generation.eager_reason(model, None, {})
    partial = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4), layers=[0])
    assert "unconverted full-attention layers [1]" in generation.eager_reason(partial, None, {})
    # unconverted sliding-window layers decode on rings: only the CPU stops this one
    local = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=4), layers="global")
    assert "needs CUDA" in generation.eager_reason(local, None, {})
    local.config._attn_implementation = "flex_attention"
    assert "flex_attention" in generation.eager_reason(local, None, {})
    # an online ('recall') memory is captured on kind 'sum' (only the CPU stops this one; its GPU replay equals the
    # eager loop: test_captured_generate_with_an_online_memory_equals_eager_generate), never on the other kinds
    memory = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4, sparse_memory=4, memory_block=8))
    assert "needs CUDA" in generation.eager_reason(memory, None, {})
    gated = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4, sparse_memory=4, memory_block=8,
                                                                         linear_state="gated"))
    assert "sparse memory" in generation.eager_reason(gated, None, {})
    spread = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    spread.lm_head.weight = torch.nn.Parameter(torch.empty(128, 64, device="meta"))
    assert "several devices" in generation.eager_reason(spread, None, {})
    # beam search through generate itself: the eager path, and the result is HF's own
    prompt = torch.randint(1, 128, (1, 6))
    out = model.generate(prompt, max_new_tokens=5, num_beams=2, do_sample=False)
    assert model.decode_path.path == "eager" and "beam search" in model.decode_path.reason
    assert torch.equal(out, eager_generate(model, prompt, max_new_tokens=5, num_beams=2, do_sample=False))


class StandInDecoder:
    """GraphDecoder's interface on the CPU: eager steps through the model (so through the wrapped forward, like the
    real decoder's warm-up and capture), logits in one buffer that every step overwrites, 'replays' after warm-up."""

    built = []

    def __init__(self, model, cache, positions, warmup_steps=2, valid=None):
        self.model, self.cache, self.warmup_left = model, cache, warmup_steps
        self.positions = positions.clone()
        self.logits = None
        self.captured = False
        StandInDecoder.built.append(self)

    def step(self, ids, positions=None):
        if positions is not None:
            self.positions.copy_(positions)
        logits = self.model(input_ids=ids, position_ids=self.positions, **cache_kwargs(self.cache), use_cache=True).logits
        self.positions.add_(1)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return logits
        self.captured = True
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        return self.logits


@pytest.mark.parametrize("sampling", [dict(do_sample=False),
                                      dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)])
def test_the_decoder_takes_every_decode_step_of_hf_generate(monkeypatch, sampling):
    """The plumbing on CPU: generate's loop (positions of a left-padded batch, logits processors, sampling, eos,
    a decoder that overwrites its logits buffer) with the decoder swapped in equals HF's eager loop token for token."""
    monkeypatch.setattr(generation, "DECODER_CLASS", StandInDecoder)
    monkeypatch.setattr(generation, "eager_reason", lambda *a, **k: None)  # as if on CUDA
    StandInDecoder.built.clear()
    model = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=4))
    ids, mask = left_padded_batch()
    torch.manual_seed(1)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, **sampling)
    torch.manual_seed(1)
    want = eager_generate(model, ids, attention_mask=mask, max_new_tokens=24, **sampling)
    assert torch.equal(got, want)
    assert len(StandInDecoder.built) == 1
    path = model.decode_path
    assert path.path == "captured" and path.steps == got.shape[1] - ids.shape[1] - 1 and path.replayed == path.steps - 2
    assert "forward" not in vars(model)  # the wrapper is gone after the call


def ring_model(device="cpu"):
    """Gemma-3-style, its global layer converted, its two local layers (window 8) left to rings."""
    base = tiny_model("gemma3", sliding_window=8)
    return linearize.convert(base, linearize.HybridConfig(window=4), layers="global").to(device)


def generate_both(model, ids, mask, new_tokens):
    """(ours, HF's eager loop): greedy, every step's logits returned."""
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              return_dict_in_generate=True, output_logits=True)
    return model.generate(ids, **kw), eager_generate(model, ids, **kw)


def test_generate_decodes_unconverted_sliding_layers_on_rings(monkeypatch):
    """generate's decoder path with rings on the CPU: GraphDecoder running its step eagerly (the forward the captured
    graph replays), a left-padded batch (pads in the rings' first window), 24 new tokens (3 turns of the ring): the tokens of HF's own loop, and every
    step's logits."""
    monkeypatch.setattr(generation, "DECODER_CLASS", functools.partial(GraphDecoder, capture=False))
    monkeypatch.setattr(generation, "eager_reason", lambda *a, **k: None)  # as if on CUDA
    torch.manual_seed(0)
    model = ring_model()
    ids, mask = left_padded_batch(pad=6)  # the rings' first window (the prompt's last 7 tokens) holds 2 pads
    got, want = generate_both(model, ids, mask, 24)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    path = model.decode_path
    assert path.path == "captured" and path.steps == 23 and path.rings == 2 and path.ring_window == 8
    assert [type(layer) for layer in output_cache(got).layers[:2]] == [RingWindowLayer] * 2  # the local layers
    assert "2 unconverted sliding-window layers on rings of 8 keys" in path.describe()


def test_generate_without_a_padding_mask_still_fills_the_rings(monkeypatch):
    monkeypatch.setattr(generation, "DECODER_CLASS", functools.partial(GraphDecoder, capture=False))
    monkeypatch.setattr(generation, "eager_reason", lambda *a, **k: None)
    model = ring_model()
    prompt = torch.randint(1, 128, (1, 5))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), eager_generate(model, prompt, **kw))
    assert model.decode_path.rings == 2


def test_a_decoder_that_refuses_leaves_the_eager_step_with_its_reason(monkeypatch):
    monkeypatch.setattr(generation, "eager_reason", lambda *a, **k: None)
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    prompt = torch.randint(1, 128, (1, 6))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)  # GraphDecoder refuses CPU tensors
    assert model.decode_path.path == "eager" and "CUDA" in model.decode_path.reason
    assert torch.equal(out, eager_generate(model, prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_captured_generate_equals_eager_generate_token_for_token(family):
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=6)).cuda()
    ids, mask = left_padded_batch("cuda")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert model.decode_path.path == "captured" and model.decode_path.replayed == 64 - 1 - 2
    want = eager_generate(model, ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert got.shape == (2, 11 + 64)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_captured_generate_with_an_online_memory_equals_eager_generate(family, monkeypatch):
    """Sparse memory chosen online ('recall', kind 'sum') with softmax sinks: 64 new tokens cross 16 block boundaries
    inside the replays; greedy tokens and every step's logits equal HF's eager loop."""
    hybrid = linearize.HybridConfig(window=6, sparse_memory=4, memory_block=4, softmax_sinks=2, combine="mix")
    model = linearize.convert(tiny_model(family), hybrid).cuda()
    ids, mask = left_padded_batch("cuda")
    got, want = generate_both(model, ids, mask, 64)
    assert model.decode_path.path == "captured" and model.decode_path.replayed == 64 - 1 - 2
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_captured_generate_samples_like_eager_generate():
    model = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=6)).cuda()
    ids, mask = left_padded_batch("cuda")
    sampling = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.95, max_new_tokens=32)
    torch.manual_seed(3)
    got = model.generate(ids, attention_mask=mask, **sampling)
    assert model.decode_path.path == "captured"
    torch.manual_seed(3)
    assert torch.equal(got, eager_generate(model, ids, attention_mask=mask, **sampling))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_captured_generate_with_rings_equals_eager_generate():
    """The captured step with the local layers on rings (window 8, 64 new tokens: 8 turns): HF's eager loop token for
    token, every step's logits close."""
    torch.manual_seed(0)
    model = ring_model("cuda")
    ids, mask = left_padded_batch("cuda", pad=6)
    got, want = generate_both(model, ids, mask, 64)
    path = model.decode_path
    assert path.path == "captured" and path.replayed == 64 - 1 - 2 and path.rings == 2, path.describe()
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.manual_seed(3)  # sampling draws the same tokens
    sampling = dict(attention_mask=mask, do_sample=True, temperature=0.8, top_k=30, max_new_tokens=32)
    sampled = model.generate(ids, **sampling)
    assert model.decode_path.path == "captured"
    torch.manual_seed(3)
    assert torch.equal(sampled, eager_generate(model, ids, **sampling))


def test_the_compiled_step_is_taken_on_request_and_decodes_the_same_tokens(monkeypatch):
    """LINEARIZE_COMPILED_STEP=1: the decoder compiles the norms and MLPs into its step (a tracing-only backend on
    the CPU), greedy tokens as HF's eager loop, and the path says so; the modules run uncompiled afterwards."""
    from linearize.attention import graph_decode

    monkeypatch.setattr(graph_decode, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(generation, "DECODER_CLASS", functools.partial(GraphDecoder, capture=False))
    monkeypatch.setattr(generation, "eager_reason", lambda *a, **k: None)
    monkeypatch.setenv(generation.COMPILED_ENV, "1")
    torch.manual_seed(0)
    model = ring_model()
    prompt = torch.randint(1, 128, (1, 6))
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), eager_generate(model, prompt, **kw))
    assert model.decode_path.compiled and "norms and MLPs compiled" in model.decode_path.describe()
    assert not any("forward" in m.__dict__ for m in model.modules())
