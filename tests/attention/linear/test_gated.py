"""Kind 'gated' (attention.linear.gated): naive vs chunked vs step-by-step vs the plain recurrence loop."""

import pytest
import torch
from kinds import grads, loop_reference, random_inputs, run_steps

from linearize.attention.linear import LINEAR_STATES

GATED = LINEAR_STATES["gated"]
CUDA = torch.cuda.is_available()
LAGS = [0, 3, 8]  # none, small, the window


@pytest.mark.parametrize("lag", LAGS)
def test_naive_and_chunked_equal_the_recurrence(lag):
    qf, kf, v, ld, _, enter = random_inputs(21)
    want_num, want_den, _ = loop_reference(qf, kf, v, log_decay=ld, enter=enter, lag=lag)
    naive = GATED.naive(qf, kf, v, log_decay=ld, enter=enter, lag=lag)
    for chunk in (1, 4, 8, 32):  # 8 does not divide 21; 32 > T
        chunked = GATED.chunked(qf, kf, v, log_decay=ld, enter=enter, lag=lag, chunk=chunk)
        for got in (naive, chunked):
            torch.testing.assert_close(got[0], want_num, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], want_den, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lag", LAGS)
def test_steps_and_prefill_state_equal_the_recurrence(lag):
    qf, kf, v, ld, _, enter = random_inputs(17, seed=2)
    want_num, want_den, (S, z) = loop_reference(qf, kf, v, log_decay=ld, enter=enter, lag=lag)
    num, den, state = run_steps(GATED, qf, kf, v, log_decay=ld, beta=None, enter=enter, lag=lag)
    torch.testing.assert_close(num, want_num, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(den, want_den, atol=1e-5, rtol=1e-5)
    final = GATED.final_state(kf, v, log_decay=ld, enter=enter, lag=lag)
    for got in (state, final):
        torch.testing.assert_close(got.S, S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.z, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lag", [0, 5])
def test_chunked_gradients_equal_naive(lag):
    qf, kf, v, ld, _, enter = random_inputs(19, seed=3)
    want = grads(GATED.naive, [qf, kf, v, ld], enter=enter, lag=lag)
    got = grads(GATED.chunked, [qf, kf, v, ld], enter=enter, lag=lag, chunk=8)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0  # every input reaches the output
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_no_decay_is_the_sum_kind():
    qf, kf, v, _, _, enter = random_inputs(13, seed=4)
    for lag in (0, 4):
        want = LINEAR_STATES["sum"].naive(qf, kf, v, enter=enter, lag=lag)
        got = GATED.chunked(qf, kf, v, enter=enter, lag=lag, chunk=4)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_left_padding_with_zero_decay_equals_the_row_alone():
    """Padding enters nothing and (log_decay 0 there) decays nothing: the padded row's sums are the row's own."""
    qf, kf, v, ld, _, _ = random_inputs(16, seed=5, holes=False)
    pad = 5
    enter = torch.ones(2, 16, dtype=torch.bool)
    enter[1, :pad] = False
    ld = ld.clone()
    ld[1, :, :pad] = 0
    for fn, kw in ((GATED.naive, {}), (GATED.chunked, {"chunk": 4})):
        num, den = fn(qf, kf, v, log_decay=ld, enter=enter, lag=3, **kw)
        alone = fn(qf[1:, :, pad:], kf[1:, :, pad:], v[1:, :, pad:], log_decay=ld[1:, :, pad:], lag=3, **kw)
        torch.testing.assert_close(num[1:, :, pad:], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(den[1:, :, pad:], alone[1], atol=1e-5, rtol=1e-5)


def test_long_rows_stay_finite():
    """Strong decay over many steps: every exponent is <= 0, so nothing overflows."""
    qf, kf, v, _, _, enter = random_inputs(200, seed=6)
    ld = torch.full((2, 2, 200), -3.0)
    num, den = GATED.chunked(qf, kf, v, log_decay=ld, enter=enter, lag=2, chunk=64)
    assert torch.isfinite(num).all() and torch.isfinite(den).all() and (den[:, :, 10:] > 0).all()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("lag", [0, 64])
def test_fla_forward_matches_naive(lag):
    """flash-linear-attention's simple GLA kernel (bf16 inside) against the fp32 definition."""
    pytest.importorskip("fla")
    qf, kf, v, ld, _, enter = (x.cuda() for x in random_inputs(300, seed=7))
    want = GATED.naive(qf, kf, v, log_decay=ld, enter=enter, lag=lag)
    got = GATED.fla_forward(qf, kf, v, log_decay=ld, enter=enter, lag=lag)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=3e-2 * w.abs().max().item(), rtol=3e-2)



def test_weights_objective_uses_the_decayed_weights():
    """attention_weights_kl with log_decay, blockwise, against the dense KL of the decayed LA weights."""
    from linearize.train.transfer import attention_weights_kl

    t, d = 12, 4
    g = torch.Generator().manual_seed(10)
    q, k = torch.randn(2, 4, t, d, generator=g), torch.randn(2, 2, t, d, generator=g)
    qf, kf, _, ld, _, _ = random_inputs(t, seed=11)
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :3] = False
    got = attention_weights_kl(q, k, qf, kf, scale=0.5, valid=valid, block=5, log_decay=ld)
    # dense: p = causal softmax over valid keys, lq = b_ts exp(C_t - C_s) normalised over the same keys
    keys = torch.ones(t, t, dtype=torch.bool).tril() & valid[:, None, None, None, :]
    kk = k.repeat_interleave(2, 1)
    p = torch.softmax((torch.einsum("bhtd,bhsd->bhts", q, kk) * 0.5).masked_fill(~keys[:, 0], float("-inf")), -1)
    w = torch.einsum("bhtm,bhsm->bhts", qf, kf.repeat_interleave(2, 1)).clamp_min(0) + 1e-12
    w = w * GATED_WEIGHTS(ld).repeat_interleave(2, 1) * keys[:, 0]
    lq = w / w.sum(-1, keepdim=True)
    kl = torch.where(keys[:, 0], p * (p.clamp_min(1e-30).log() - lq.clamp_min(1e-30).log()), torch.zeros_like(p)).sum(-1)
    rows = valid[:, None, :].expand_as(kl)
    want = kl[rows].mean()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got > 0


def GATED_WEIGHTS(log_decay):
    from linearize.attention.linear.gated import decay_weights

    return decay_weights(log_decay, lag=0)


def test_prefill_state_of_a_long_row_with_strong_decay_matches_the_steps():
    """The closed-form prefill sums the decay from the end: exact for the recent keys even when the prefix sum of
    log_decay is in the thousands."""
    qf, kf, v, _, _, enter = random_inputs(3000, seed=12, holes=False)
    ld = -torch.rand(2, 2, 3000, generator=torch.Generator().manual_seed(13)) * 2.0
    *_, want = run_steps(GATED, qf, kf, v, log_decay=ld, beta=None, enter=enter, lag=4)
    got = GATED.final_state(kf, v, log_decay=ld, enter=enter, lag=4)
    torch.testing.assert_close(got.S, want.S, atol=1e-6, rtol=1e-5)  # the prefix-sum difference was off by ~1e-4
    torch.testing.assert_close(got.z, want.z, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("size", [64, 128])
def test_fla_gradients_match_the_chunked_sums_through_the_route(size):
    """The simple GLA kernel's gradients (num and den) against the fp32 chunked sums, through `fla_route.run`: where
    fla refuses its gated backward (Hopper, Triton < 3.7.1) only at sizes the route clears on this device."""
    pytest.importorskip("fla")
    from linearize.attention.linear import fla_route

    shape = fla_route.Shape(m=size, d=size, b=2, hq=4, hkv=2)
    if fla_route.refuses_backward() and not fla_route.trainable(GATED, shape, "cuda:0"):
        pytest.skip(f"fla's gated backward is refused here and {shape} is not cleared to train")
    # other inputs than the route's own check drew (seed 0)
    errs = fla_route.errors(GATED, lambda *a, **k: fla_route.run(GATED, *a, **k), shape, torch.device("cuda"), seed=7)
    assert fla_route.within(errs), errs
