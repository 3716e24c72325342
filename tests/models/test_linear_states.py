"""Whole models with a non-'sum' linear state: cached decoding == full forward in every mode, padding, save/load,
decode memory, stage-1 training of the state's parameters."""

import pytest
import torch
from tiny_models import assert_decode_bytes_are_the_cache, assert_beam_scores_equal_forward, assert_decode_equals_forward, assert_left_padding_invisible, tiny_model
from transformers import DynamicCache

import linearize
from linearize.attention.linear import linear_state
from linearize.compat import cache_kwargs
from linearize.models.convert import hybrid_modules

KINDS = ["gated", "delta"]


def converted(family="llama", kind="gated", **settings):
    """A tiny model converted with `kind`, its state parameters moved off their init (data-dependent, strong decay)."""
    settings = {"window": 6, "combine": "mix", **settings}
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(linear_state=kind, decay_init=0.8, **settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "decay_proj" in name or "beta_proj" in name or "feature_map" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def decode_vs_forward(model, mode, ids, prompt=10):
    return assert_decode_equals_forward(model, mode, ids, prompt)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", [{}, {"placement": "overlap"}, {"softmax_sinks": 2}, {"window": 1}])
@pytest.mark.parametrize("mode", ["hybrid", "la_only", "swa_only", "sinks_only", "none", {0: {1: "la_only", 3: "sinks_only"}}])
def test_cached_decoding_matches_full_forward_in_every_mode(kind, settings, mode):
    """20 steps after a 10-token prompt: the ring wraps, keys leave the window and enter the lagged state."""
    decode_vs_forward(converted(kind=kind, **settings), mode, torch.randint(1, 128, (2, 30)))


@pytest.mark.parametrize("kind", KINDS)
def test_gemma_decodes_like_the_forward(kind):
    combine = "shared_norm" if linear_state(kind).normalised else "mix"
    decode_vs_forward(converted("gemma3", kind=kind, combine=combine), "hybrid", torch.randint(1, 128, (1, 24)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["hybrid", "la_only"])
def test_left_padded_row_equals_the_row_alone(kind, mode):
    model = converted(kind=kind)
    row = torch.randint(1, 128, (1, 12))
    batch, mask = assert_left_padding_invisible(model, mode, row)
    with linearize.components(model, mode):
        together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
        single = model.generate(row, max_new_tokens=12, do_sample=False)
    assert torch.equal(together[0, 17:], single[0, 12:])


@pytest.mark.parametrize("kind", KINDS)
def test_a_mode_the_cache_was_not_prefilled_for_is_refused(kind):
    model = converted(kind=kind)
    ids = torch.randint(1, 128, (1, 12))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        with linearize.components(model, "la_only"), pytest.raises(ValueError, match="empty cache"):
            model(ids[:, :1], **cache_kwargs(cache), use_cache=True)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_exact(tmp_path, kind):
    model = converted(kind=kind)
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and any("decay_proj" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert linearize.hybrid_config_of(loaded).linear_state == kind
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, auto(ids).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_ssd_drop_swa_is_la_only_per_row(kind):
    """SSD's per-row drop: dropped rows get the la_only output, the others the hybrid one."""
    model = converted(kind=kind)
    ids = torch.randint(1, 128, (2, 14))
    with torch.no_grad():
        with linearize.components(model, "la_only"):
            la = model(ids).logits
        hybrid = model(ids).logits
        for m in hybrid_modules(model):
            m.drop_swa = torch.tensor([True, False])
        mixed = model(ids).logits
    torch.testing.assert_close(mixed[0], la[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], hybrid[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", [{}, {"softmax_sinks": 3}, {"placement": "overlap"}])
def test_decode_memory_is_what_the_cache_holds(kind, settings):
    model = converted(kind=kind, window=8, **settings)
    cache = assert_decode_bytes_are_the_cache(model)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("objective", ["weights", "output", "hybrid_output"])
def test_stage1_trains_the_state_parameters(kind, objective):
    from linearize.train.transfer import AttentionTransfer, trainable_transfer_params

    model = converted(kind=kind)
    if objective == "weights" and not linear_state(kind).normalised:
        with pytest.raises(ValueError, match="use the 'output' or 'hybrid_output' objective"):
            AttentionTransfer(model, objective)
        return
    params = trainable_transfer_params(model, train_feature_maps=True)
    state_params = {n: p for n, p in params.items() if "decay_proj" in n or "beta_proj" in n}
    assert state_params
    before = {n: p.detach().clone() for n, p in state_params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    with AttentionTransfer(model, objective) as xfer:
        loss = xfer.loss(torch.randint(1, 128, (2, 20)))
        loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in state_params.values())
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in state_params.items())


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_decoding_refuses_non_sum_states(kind):
    """The captured step holds the 'sum' state only (its Triton kernels); other kinds decode eagerly."""
    from linearize.attention.graph_decode import GraphDecoder

    model = converted(kind=kind)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 12)), **cache_kwargs(cache), use_cache=True)
    with pytest.raises(ValueError, match="holds the 'sum' linear state only"):
        GraphDecoder(model, cache, 12)


def test_delta_beta_starts_at_delta_beta_init():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(linear_state="delta", combine="mix", delta_beta_init=0.3))
    gates = hybrid_modules(model)[0].state_inputs(torch.randn(2, 5, model.config.hidden_size), None)
    torch.testing.assert_close(gates["beta"], torch.full_like(gates["beta"], 0.3))
    assert set(gates) == {"log_decay", "beta"}


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_scores_equal_the_full_forward(kind):
    """Beams reorder the kind's state (index_select of its tensors and pending key)."""
    assert_beam_scores_equal_forward(converted(kind=kind, window=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_auto_backend_on_cuda_runs_fla_like_the_chunked_path(kind):
    """backend 'auto' on CUDA: the linear branch through flash-linear-attention (bf16 inside) against the fp32
    chunked path; gradients reach the state's parameters."""
    pytest.importorskip("fla")
    model = converted(kind=kind, window=16).cuda()
    ids = torch.randint(1, 128, (2, 300), device="cuda")
    torch_model = converted(kind=kind, window=16, backend="torch").cuda()
    torch_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        got, want = model(ids).logits, torch_model(ids).logits
    assert (got - want).square().mean().sqrt() <= 0.05 * want.square().mean().sqrt()
    model.train()
    model(ids).logits.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "decay_proj" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
