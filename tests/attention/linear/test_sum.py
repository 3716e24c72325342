"""Kind 'sum' (attention.linear.sum): naive vs chunked vs step-by-step vs the plain recurrence loop."""

import pytest
import torch
from kinds import grads, loop_reference, random_inputs, run_steps

from linearize.attention.linear import LINEAR_STATES

SUM = LINEAR_STATES["sum"]


@pytest.mark.parametrize("lag", [0, 3, 8])
def test_naive_chunked_and_steps_equal_the_recurrence(lag):
    qf, kf, v, _, _, enter = random_inputs(21)
    want_num, want_den, (S, z) = loop_reference(qf, kf, v, log_decay=None, enter=enter, lag=lag)
    results = [SUM.naive(qf, kf, v, enter=enter, lag=lag)]
    results += [SUM.chunked(qf, kf, v, enter=enter, lag=lag, chunk=c) for c in (1, 8, 32)]
    num, den, state = run_steps(SUM, qf, kf, v, log_decay=None, beta=None, enter=enter, lag=lag)
    for got_num, got_den in results + [(num, den)]:
        torch.testing.assert_close(got_num, want_num, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_den, want_den, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.S, S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.z, z, atol=1e-5, rtol=1e-5)


def test_chunked_gradients_equal_naive():
    qf, kf, v, _, _, enter = random_inputs(19, seed=3)
    want = grads(SUM.naive, [qf, kf, v], enter=enter, lag=4)
    got = grads(SUM.chunked, [qf, kf, v], enter=enter, lag=4, chunk=8)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_decay_is_ignored():
    """'sum' has no decay: a log_decay passed by mistake changes nothing (the registry says it needs none)."""
    qf, kf, v, ld, _, enter = random_inputs(9)
    assert not SUM.needs_log_decay
    torch.testing.assert_close(SUM.chunked(qf, kf, v, log_decay=ld, enter=enter, chunk=4),
                               SUM.chunked(qf, kf, v, enter=enter, chunk=4), atol=0, rtol=0)
