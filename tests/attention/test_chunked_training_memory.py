"""The chunked path under autograd: the softmax sums' (C x (C + w - 1)) weights per chunk are recomputed in the
backward pass, not kept; outputs and gradients are those of the plain computation, bit for bit."""

import pytest
import torch
from autograd_memory import largest_saved

import linearize.attention.chunked as chunked
from spec_kwargs import with_spec
from test_implementations import B, HQ, make_inputs

T, WINDOW, CHUNK = 64, 16, 8
SPAN = CHUNK + WINDOW - 1

CASES = [
    dict(mode="hybrid", rule="mix"),
    dict(mode="hybrid", rule="shared_norm", softmax_sinks=3),
    dict(mode="swa_only", rule="mix", softmax_sinks=3),
    dict(mode="hybrid", rule="mix", softmax_sinks=2, sparse_memory=4, memory_block=8),
    dict(mode="hybrid", rule="mix", linear_state="delta"),
]


def _grads_and_biggest_saved(case, seed=0):
    """Output, gradients of q, k, v, the mixing weight and the feature maps, and the largest saved tensor (numel)."""
    torch.manual_seed(seed)
    q, k, v, fq, fk, valid, weight = make_inputs(T)
    gates = {}
    if case.get("linear_state") == "delta":
        gates = {"log_decay": -torch.rand(B, k.shape[1], T) * 0.1, "beta": torch.rand(B, k.shape[1], T)}
    tensors = [q, k, v, weight, *gates.values()]
    for x in tensors:
        x.requires_grad_(True)
    out, biggest = largest_saved(lambda: chunked.hybrid_attention_chunked(q, k, v, fq(q), fk(k), **gates, **with_spec(
        valid=valid, weight=weight, scale=0.3, window=WINDOW, chunk_size=CHUNK, **case)))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [x.grad for x in tensors] + [fq.weight.grad, fk.weight.grad]
    return out.detach(), grads, biggest


def _plain(fn, *args, **kwargs):
    return fn(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_recomputed_softmax_sums_give_the_same_outputs_and_gradients(case, monkeypatch):
    out, grads, biggest = _grads_and_biggest_saved(case)
    monkeypatch.setattr(chunked, "_recomputed", _plain)
    plain_out, plain_grads, plain_biggest = _grads_and_biggest_saved(case)
    assert torch.equal(out, plain_out)
    for got, want in zip(grads, plain_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got, want)
    weights = B * HQ * T * SPAN  # one (B, Hkv, G, N, C, C + w - 1) tensor of softmax weights
    assert plain_biggest >= weights  # kept by the plain computation ...
    assert biggest < weights  # ... and not any more


def test_nothing_is_recomputed_without_gradients(monkeypatch):
    """Inference (no_grad) and inputs that need no gradient run the sums once, as before."""
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called without gradients")

    monkeypatch.setattr(chunked, "checkpoint", refuse)
    q, k, v, fq, fk, valid, weight = make_inputs(T)
    kw = with_spec(valid=valid, weight=weight, scale=0.3, window=WINDOW, chunk_size=CHUNK, softmax_sinks=2)
    with torch.no_grad():
        expected = chunked.hybrid_attention_chunked(q, k, v, fq(q), fk(k), **kw)
    qf, kf = fq(q), fk(k)  # the feature maps train, q, k, v do not (stage 1): the softmax branch keeps nothing
    out = chunked.hybrid_attention_chunked(q, k, v, qf, kf, **kw)
    assert out.requires_grad and torch.equal(out.detach(), expected)
