"""The ring of an unconverted sliding-window layer: its slots, its mask, and decoding through it (GraphDecoder, eager
on the CPU, captured on CUDA) against Hugging Face's own forward, with left padding and past the window."""

import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize.attention.graph_decode import GraphDecoder
from linearize.attention.ring import RingWindowLayer, ring_attention_mask, ring_bytes, swap_in_rings, unconverted_layers
from linearize.compat import cache_kwargs
from tiny_models import tiny_model

CUDA = torch.cuda.is_available()


def test_ring_holds_the_last_window_minus_one_keys_at_their_slots_and_writes_one_token_per_step():
    window, seen = 5, 7
    keys = torch.randn(2, 1, 4, 3)  # the last 4 of 7 tokens (indices 3..6), as HF's sliding layer keeps window - 1
    valid = torch.ones(2, seen, dtype=torch.bool)
    valid[1, :4] = False  # row 1: indices 0..3 are padding
    ring = RingWindowLayer.from_recent(keys, keys + 1, window, seen, valid)
    for j, index in enumerate(range(3, 7)):
        torch.testing.assert_close(ring.keys[:, :, index % window], keys[:, :, j], rtol=0, atol=0)
    assert ring.valid.tolist() == [[True, True, False, True, True], [True, True, False, False, True]]
    assert int(ring.slot) == 7 % window and ring.get_seq_length() == 7
    # the next token attends to the valid slots and its own (slot 2), before it is written
    assert ring.next_valid()[1].tolist() == [True, True, True, False, True]
    for step in range(6):  # past a full turn of the ring
        k = torch.full((2, 1, 1, 3), float(100 + step))
        out_k, _ = ring.update(k, k, 0)
        assert out_k.shape == (2, 1, window, 3) and out_k is ring.keys
        assert (ring.keys[:, :, (seen + step) % window] == 100 + step).all()
    assert ring.seen == 13 and int(ring.slot) == 13 % window and ring.valid.all()
    assert ring.nbytes() == 2 * ring_bytes(1, 3, window, 4)
    with pytest.raises(ValueError, match="one token per step"):
        ring.update(torch.randn(2, 1, 2, 3), torch.randn(2, 1, 2, 3))
    with pytest.raises(ValueError, match="not in token order"):
        ring.get_mask_sizes(1)
    with pytest.raises(ValueError, match="last 4 keys"):
        RingWindowLayer.from_recent(keys[:, :, :2], keys[:, :, :2], window, seen)


def test_ring_mask_formats():
    ring = RingWindowLayer(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.tensor([[True, False, False]]), seen=1)
    sdpa = ring_attention_mask(ring, "sdpa", torch.float32)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 1, 3) and sdpa.flatten().tolist() == [True, True, False]
    eager = ring_attention_mask(ring, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and eager.flatten().tolist() == [0, 0, torch.finfo(torch.bfloat16).min]
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        ring_attention_mask(ring, "flash_attention_2", torch.float32)


def global_only(family="gemma3", impl="sdpa", window=8, **overrides):
    """A tiny model with sliding layers of window `window`, its full-attention layers converted (Gemma 3: [2];
    Mistral, every layer sliding: layer 0 converted)."""
    base = tiny_model(family, sliding_window=window, attn_implementation=impl, **overrides)
    return linearize.convert(base, linearize.HybridConfig(window=4), layers="global" if family == "gemma3" else [0])


def test_unconverted_layers_by_kind():
    assert unconverted_layers(global_only()) == ([0, 1], [])
    assert unconverted_layers(global_only("mistral")) == ([1], [])
    assert unconverted_layers(linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4), layers=[1])) == ([], [0])
    assert unconverted_layers(linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=4))) == ([], [])


def padded_prompt_and_tokens(device="cpu", prompt=9, pad=4, new=20):
    ids = torch.randint(1, 128, (2, prompt + new), device=device)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # row 1 left-padded: the ring's first window holds padding
    ids[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def prefill(model, ids, mask, positions):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache), use_cache=True)
    return cache


def assert_steps_match(decoder, model, hf, full, ids, mask, positions, p):
    """Every step from token p on: the decoder's logits equal the full forward's and HF's own cached step's (`hf`)."""
    for i in range(p, ids.shape[1]):
        got = decoder.step(ids[:, i:i + 1]).clone()
        with torch.no_grad():
            want = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=positions[:, i:i + 1],
                         **cache_kwargs(hf), use_cache=True).logits
        torch.testing.assert_close(got, full[:, i:i + 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,impl", [("gemma3", "sdpa"), ("gemma3", "eager"), ("mistral", "sdpa")])
def test_ring_decoding_equals_the_full_forward_and_hf_cached_steps(family, impl):
    """GraphDecoder's step (eager here: the forward the captured graph replays), the sliding layers on rings of 8, a
    9-token left-padded prompt and 20 steps (2.5 turns of the ring): logits equal one forward over the whole padded
    batch and HF's own cached steps (its growing window cache)."""
    torch.manual_seed(0)
    model = global_only(family, impl)
    ids, mask, positions = padded_prompt_and_tokens()
    p = 9
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
    hf = prefill(model, ids[:, :p], mask[:, :p], positions[:, :p])
    ringed = prefill(model, ids[:, :p], mask[:, :p], positions[:, :p])
    decoder = GraphDecoder(model, ringed, positions=positions[:, p:p + 1], valid=mask[:, :p].bool(), capture=False)
    sliding = unconverted_layers(model)[0]
    assert [type(ringed.layers[i]) for i in sliding] == [RingWindowLayer] * len(sliding) and decoder.rings
    assert_steps_match(decoder, model, hf, full, ids, mask, positions, p)
    assert ringed.get_seq_length() == hf.get_seq_length() == ids.shape[1]
    assert not decoder.captured


def test_the_prompt_padding_reaches_the_ring():
    """Without the prompt's padding mask the ring attends to the pad tokens still in its window: other logits (the
    padded row only), so the equality above depends on it."""
    torch.manual_seed(0)
    model = global_only()
    ids, mask, positions = padded_prompt_and_tokens()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
    cache = prefill(model, ids[:, :9], mask[:, :9], positions[:, :9])
    blind = GraphDecoder(model, cache, positions=positions[:, 9:10], capture=False)  # valid=None: no padding
    got = blind.step(ids[:, 9:10])
    torch.testing.assert_close(got[0], full[0, 9:10], atol=1e-4, rtol=1e-4)
    assert (got[1] - full[1, 9:10]).abs().max() > 1e-3


def test_rings_are_refused_where_they_cannot_serve():
    model = global_only()
    ids, mask, positions = padded_prompt_and_tokens()
    cache = prefill(model, ids[:, :9], mask[:, :9], positions[:, :9])
    with pytest.raises(ValueError, match=r"\(2, 9\)"):
        GraphDecoder(model, cache, positions=positions[:, 9:10], valid=mask[:, :8].bool(), capture=False)
    with pytest.raises(ValueError, match="not a prefilled sliding-window layer"):
        swap_in_rings(cache, [2])  # the converted layer's hybrid state
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        GraphDecoder(model, cache, positions=positions[:, 9:10], capture=False)


def test_a_fully_converted_model_decodes_without_rings():
    model = linearize.convert(tiny_model("gemma3"), linearize.HybridConfig(window=4))
    ids, mask, positions = padded_prompt_and_tokens(new=3)
    cache = prefill(model, ids[:, :9], mask[:, :9], positions[:, :9])
    decoder = GraphDecoder(model, cache, positions=positions[:, 9:10], capture=False)
    assert decoder.rings == [] and decoder._model_inputs() == {}
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
    for i in range(9, 12):
        torch.testing.assert_close(decoder.step(ids[:, i:i + 1]), full[:, i:i + 1], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family,impl", [("gemma3", "sdpa"), ("gemma3", "eager"), ("mistral", "sdpa")])
def test_captured_ring_step_equals_the_full_forward(family, impl):
    """The captured step with rings: warm-up, capture, replays across 2.5 turns of the ring, against the full forward
    and HF's cached steps (fp32)."""
    torch.manual_seed(0)
    model = global_only(family, impl).cuda()
    ids, mask, positions = padded_prompt_and_tokens("cuda")
    p = 9
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
    hf = prefill(model, ids[:, :p], mask[:, :p], positions[:, :p])
    ringed = prefill(model, ids[:, :p], mask[:, :p], positions[:, :p])
    decoder = GraphDecoder(model, ringed, positions=positions[:, p:p + 1], valid=mask[:, :p].bool())
    assert_steps_match(decoder, model, hf, full, ids, mask, positions, p)
    assert decoder.captured
    assert all(r.seen == ids.shape[1] for r in decoder.rings) and ringed.get_seq_length() == ids.shape[1]
