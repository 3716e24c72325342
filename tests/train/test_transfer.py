"""Stage 1: the three transfer objectives and the teacher."""

import pytest
import torch

from linearize import HybridConfig, convert
from linearize.attention.common import softmax_attention
from linearize.attention.reference import hybrid_attention_reference
from linearize.train import loop, transfer
from lz_train_helpers import random_data, tiny_gemma3, tiny_llama
from spec_kwargs import with_spec


def exact_features(q, k, scale, window=None):
    """Feature maps with which LA reproduces softmax exactly: kf_s = onehot(s), qf_t[s] = exp(scale q_t.k_s)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    kx = k.repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("bhtd,bhsd->bhts", q, kx) * scale
    qf = torch.exp(logits - logits.amax(-1, keepdim=True))
    if window is not None:
        pos = torch.arange(t)
        qf = qf * ((pos[:, None] - pos[None, :]) < window)
    kf = torch.eye(t).expand(b, hkv, t, t).clone()
    return qf, kf


def qkv(b=2, hq=4, hkv=2, t=24, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g),
            torch.randn(b, hkv, t, d, generator=g))


@pytest.mark.parametrize("window", [None, 5])
def test_weights_loss_zero_when_la_equals_softmax(window):
    q, k, v = qkv()
    qf, kf = exact_features(q, k, 0.35, window)
    kl = transfer.attention_weights_kl(q, k, qf, kf, scale=0.35, window=window, block=7)
    assert abs(float(kl)) < 1e-5
    # and clearly positive for a student that differs
    kl_bad = transfer.attention_weights_kl(q, k, torch.rand_like(qf), kf, scale=0.35, window=window, block=7)
    assert float(kl_bad) > 1e-2


def test_weights_loss_blocks_match_one_block_and_guard_log0():
    q, k, v = qkv()
    qf = torch.relu(torch.randn(2, 4, 24, 6))  # zeros -> log(0) guarded
    kf = torch.relu(torch.randn(2, 2, 24, 6))
    qf.requires_grad_(True)
    one = transfer.attention_weights_kl(q, k, qf, kf, scale=0.3, block=24)
    blocks = transfer.attention_weights_kl(q, k, qf, kf, scale=0.3, block=5)
    assert torch.isfinite(one) and torch.allclose(one, blocks, rtol=1e-5)
    blocks.backward()
    assert torch.isfinite(qf.grad).all()


@pytest.mark.parametrize("features", ["underflow", "negative"])
def test_weights_loss_never_below_zero(features):
    """LA weights that all underflow (a spiky exp map) or are negative (the 'none' map) read as uniform over the past
    keys: the KL is KL(p || uniform) >= 0, never the -H(p) that clamping b and its sum separately gave."""
    q, k, v = qkv()
    qf, kf = torch.rand(2, 4, 24, 6), torch.rand(2, 2, 24, 6)
    qf, kf = (1e-9 * qf, 1e-9 * kf) if features == "underflow" else (-qf, kf)
    kl = transfer.attention_weights_kl(q, k, qf, kf, scale=0.3, block=7)
    kx = k.repeat_interleave(2, dim=1)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    logp = torch.log_softmax((torch.einsum("bhtd,bhsd->bhts", q, kx) * 0.3).masked_fill(~causal, float("-inf")), -1)
    uniform = -torch.log(causal.sum(-1).float())
    expected = (logp.exp() * (logp - uniform[:, None])).nan_to_num().sum(-1).mean()
    assert float(kl) > 0
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-5)


def test_output_loss_zero_when_la_equals_softmax():
    q, k, v = qkv()
    qf, kf = exact_features(q, k, 0.35)
    teacher = softmax_attention(q, k, v, scale=0.35)
    student = hybrid_attention_reference(q, k, v, qf, kf, **with_spec(scale=0.35, window=4, mode="la_only"))
    assert float(transfer.masked_mse(teacher, student)) < 1e-10


def test_teacher_with_padding_and_window():
    q, k, v = qkv(t=12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    out = softmax_attention(q, k, v, scale=0.3, window=4, valid=valid)
    qf = kf = None
    ref = hybrid_attention_reference(q, k, v, torch.ones(2, 4, 12, 1), torch.ones(2, 2, 12, 1),
                                     **with_spec(scale=0.3, window=4, mode="swa_only", valid=valid))
    assert torch.allclose(out[0], ref[0], atol=1e-5)
    assert torch.allclose(out[1][:, 3:], ref[1][:, 3:], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hooks_return_teacher_so_hidden_states_are_the_base_models(family):
    model = tiny_llama() if family == "llama" else tiny_gemma3()
    ids = random_data(rows=2, seq_len=24).train
    with torch.no_grad():
        base = model.get_decoder()(input_ids=ids).last_hidden_state
    convert(model, HybridConfig(window=4, chunk_size=8))
    xfer = transfer.AttentionTransfer(model, "weights", query_block=8)
    outs = []
    with xfer, torch.no_grad():
        model.get_decoder().register_forward_hook(lambda m, a, o: outs.append(o.last_hidden_state))
        loss = xfer.loss(ids)
    assert torch.isfinite(loss)
    assert torch.allclose(outs[0], base, atol=1e-4)  # base's own window (8 for the tiny Gemma) respected


def test_hybrid_output_loss_zero_when_window_covers_sequence():
    model = tiny_llama()
    convert(model, HybridConfig(window=64, chunk_size=8))  # window >= T: hybrid == softmax
    xfer = transfer.AttentionTransfer(model, "hybrid_output", loss_scale=1000.0)
    with xfer, torch.no_grad():
        loss = xfer.loss(random_data(rows=2, seq_len=32).train)
    assert float(loss) < 1e-6


@pytest.mark.parametrize("objective", ["weights", "output", "hybrid_output"])
def test_objective_decreases_on_tiny_model(objective, tmp_path):
    from accelerate import Accelerator

    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    convert(model, HybridConfig(window=4, chunk_size=8, gamma_trainable=True))
    params = transfer.trainable_transfer_params(model, True, objective == "hybrid_output")
    assert params and all("feature_map" in n or "gamma" in n for n in params)
    xfer = transfer.AttentionTransfer(model, objective, loss_scale=1000.0 if objective == "hybrid_output" else 1.0,
                                      query_block=8)
    data = random_data(rows=8, seq_len=32).train
    spec = loop.LoopSpec(name="stage1", lr=1e-2, batch_size=4, grad_accum=1, epochs=100, max_steps=12,
                         checkpoint_every=100)
    with xfer:
        before = transfer.transfer_validation(xfer, data)
        trainer = loop.Trainer(model=model, params=params, data=data, loss_fn=transfer.transfer_loss_fn(xfer), spec=spec,
                               ckpt_dir=tmp_path, accelerator=Accelerator(cpu=True), log=loop.JsonlLog(None),
                               show_progress=False)
        trainer.run()
        after = transfer.transfer_validation(xfer, data)
    assert after < 0.9 * before, (before, after)
    # base weights untouched
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in params)


@pytest.mark.parametrize("window,pad,block", [(None, 3, 5), (4, 0, 5), (4, 3, 7), (9, 2, 64), (1, 0, 3)])
def test_teacher_in_blocks_equals_one_full_mask(window, pad, block):
    """The masked teacher runs in query blocks over only the keys a block can see: equal to one T x T mask."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 23, 8), torch.randn(2, 2, 23, 8), torch.randn(2, 2, 23, 8)
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :pad] = False
    tq, ts = torch.arange(23)[:, None], torch.arange(23)[None, :]
    mask = (ts <= tq) & (tq - ts < (window or 23)) & valid[:, None, None, :]
    kx, vx = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    want = torch.softmax((q @ kx.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf")), -1).nan_to_num() @ vx
    got = softmax_attention(q, k, v, scale=0.3, window=window, valid=valid, block=block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
