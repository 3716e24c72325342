"""The linear-state registry (attention.linear) and the settings that depend on the kind."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from kinds import random_inputs
from spec_kwargs import with_spec
from tiny_models import tiny_model

import linearize
from linearize.attention.linear import LINEAR_STATES, linear_state
from linearize.attention.module import hybrid_param_kind
from linearize.config import LINEAR_STATE_KINDS, NORMALISED_STATES, HybridConfig


def test_registry_agrees_with_the_config_names():
    assert tuple(LINEAR_STATES) == LINEAR_STATE_KINDS
    assert {k.name for k in LINEAR_STATES.values() if k.normalised} == set(NORMALISED_STATES)
    for kind in LINEAR_STATES.values():
        assert kind.help and callable(kind.naive) and callable(kind.chunked) and callable(kind.step)


@pytest.mark.parametrize("name", LINEAR_STATE_KINDS)
def test_state_bytes_are_the_init_state_bytes(name):
    kind = linear_state(name)
    state = kind.init_state(3, 2, 6, 5, dtype=torch.float32, device="cpu")
    assert kind.state_bytes(2, 6, 5) * 3 == sum(t.numel() * t.element_size() for t in state.tensors())
    picked = state.index_select(torch.tensor([2, 0]))
    assert all(t.shape[0] == 2 for t in picked.tensors())


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="linear_state"):
        HybridConfig(linear_state="lstm")
    with pytest.raises(ValueError, match="unknown linear state"):
        linear_state("lstm")


def test_sum_only_settings_are_refused_for_other_kinds():
    HybridConfig(linear_state="gated", sparse_memory=4, placement="overlap")  # the sparse memory serves every kind
    with pytest.raises(ValueError, match="Triton"):
        HybridConfig(linear_state="gated", backend="triton")
    HybridConfig(linear_state="gated", softmax_sinks=2, combine="mix")  # these work with every kind
    with pytest.raises(ValueError, match="combine='mix'"):
        HybridConfig(linear_state="delta", combine="shared_norm")
    HybridConfig(linear_state="delta", combine="mix")


def test_gated_layer_parameters_start_at_decay_init_and_train_with_the_feature_maps():
    model = linearize.convert(tiny_model("llama"), HybridConfig(window=4, linear_state="gated", decay_init=0.99))
    names = [n for n, _ in model.named_parameters() if "decay_proj" in n]
    assert len(names) == 2 * model.config.num_hidden_layers  # weight and bias per layer
    assert all(hybrid_param_kind(n) == "linear_state" for n in names)
    layer = model.model.layers[0].self_attn
    x = torch.randn(2, 7, model.config.hidden_size)
    ld = layer.state_inputs(x, None)["log_decay"]
    assert ld.shape == (2, model.config.num_key_value_heads, 7)
    torch.testing.assert_close(ld.exp(), torch.full_like(ld, 0.99))
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False
    assert (layer.state_inputs(x, valid)["log_decay"][1, :, :3] == 0).all()  # padding decays nothing


@pytest.mark.parametrize("kind", ["gated", "delta"])
@pytest.mark.parametrize("mode", ["hybrid", "la_only", "swa_only"])
@pytest.mark.parametrize("settings", [dict(placement="complementary"), dict(placement="overlap"),
                                      dict(placement="complementary", softmax_sinks=2)])
def test_hybrid_chunked_equals_reference_outputs_and_gradients(kind, mode, settings):
    """The whole hybrid layer with each gated state: chunked backend vs the quadratic spec, GQA, left padding."""
    from linearize.attention.chunked import hybrid_attention_chunked
    from linearize.attention.reference import hybrid_attention_reference

    t, d = 23, 8
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 4, t, d, generator=g), torch.randn(2, 2, t, d, generator=g), torch.randn(2, 2, t, d, generator=g)
    qf, kf, _, ld, beta, _ = random_inputs(t, seed=9)
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :4] = False
    ld = ld * valid[:, None]
    kw = dict(scale=d**-0.5, window=5, weight=torch.rand(4, generator=g), rule="mix", mode=mode, valid=valid,
              linear_state=kind, **settings)
    results = []
    for fn, extra in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 8})):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, qf, kf, ld, beta)]
        out = fn(*xs[:5], **with_spec(log_decay=xs[5], beta=xs[6] if kind == "delta" else None, **kw, **extra))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out] + [x.grad for x in xs])
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if mode != "swa_only":
        assert results[0][6].abs().sum() > 0  # the decay reaches the output
        if kind == "delta":
            assert results[0][7].abs().sum() > 0  # and beta


class _CountOps(TorchDispatchMode):
    """Counts the aten calls that allocate or compute (views are free): what a GPU launches."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,per_chunk", [("delta", 5), ("gated", 3)])
def test_the_chunk_loop_costs_a_few_calls_a_chunk(name, per_chunk):
    """A 28-layer model's training step on a GPU is bound by the launches of the chunked sums' loop over chunks
    (it carries the state; everything else runs for all chunks at once): forward and backward grow by at most
    `per_chunk` x 3 aten calls per extra chunk (before the loop carried only the state: 43 for delta, 69 for
    gated)."""
    kind = linear_state(name)

    def calls(t):
        g = torch.Generator().manual_seed(0)
        qf, kf = torch.rand(1, 2, t, 4, generator=g).requires_grad_(), torch.rand(1, 1, t, 4, generator=g).requires_grad_()
        v = torch.randn(1, 1, t, 3, generator=g).requires_grad_()
        kw = {"log_decay": -torch.rand(1, 1, t, generator=g)}
        if name == "delta":
            kw["beta"] = torch.rand(1, 1, t, generator=g)
        with _CountOps() as forward:
            num, den = kind.chunked(qf, kf, v, chunk=4, **kw)
        with _CountOps() as backward:
            (num.sum() + den.sum()).backward()
        return forward.calls + backward.calls

    grown = calls(4 * 40) - calls(4 * 20)  # 20 more chunks
    assert grown <= 20 * per_chunk * 3, f"{name}: {grown / 20:.1f} aten calls per extra chunk"
