"""fla_route: when the linear states' flash-linear-attention kernels may train, and the backward that passes fla's
refusal. The kernels themselves are GPU-tested in test_delta / test_gated; here the route's pieces run on the CPU
with the chunked sums standing in for the kernels."""

from __future__ import annotations

import dataclasses
import functools
import sys
import types

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from linearize.attention.linear import fla_route, linear_state

DELTA = linear_state("delta")


def inputs(t=70, m=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(qf=torch.randn(1, 2, t, m, generator=g).softmax(-1), kf=torch.randn(1, 1, t, m, generator=g).softmax(-1),
                v=torch.randn(1, 1, t, d, generator=g), log_decay=-0.1 * torch.rand(1, 1, t, generator=g),
                beta=torch.rand(1, 1, t, generator=g))


def sums(qf, kf, v, log_decay, beta):
    return DELTA.chunked(qf, kf, v, log_decay=log_decay, beta=beta, lag=2, chunk=16)


@pytest.mark.parametrize("n,width", [(1, 16), (8, 16), (32, 32), (64, 64), (65, 128), (96, 128), (128, 128), (256, 128)])
def test_block_width_follows_the_kernels_tiling(n, width):
    assert fla_route.block_width(n) == width


def test_sizes_tiled_at_the_miscompiled_width_are_not_cleared():
    assert fla_route.clear_of_miscompile(128, 128) and fla_route.clear_of_miscompile(32, 256)
    assert not fla_route.clear_of_miscompile(64, 128) and not fla_route.clear_of_miscompile(128, 48)


@pytest.mark.parametrize("recompute", [False, True])
def test_lifted_backward_gives_the_functions_own_values_and_gradients(recompute):
    """Through the lifted node, alone or inside a non-reentrant checkpoint (gradient checkpointing in training), the
    values and every gradient equal those of the function itself; a None input passes through."""
    x = inputs()
    cot = torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(1))
    want_in = {k: t.clone().requires_grad_() for k, t in x.items()}
    want = sums(**want_in)[0]
    want_g = torch.autograd.grad((want * cot).sum(), list(want_in.values()))

    got_in = {k: t.clone().requires_grad_() for k, t in x.items()}

    def through_lifted(qf, kf, v, log_decay, beta):
        return fla_route.lifted(lambda *a: tuple(sums(*a)), qf, kf, v, log_decay, beta)

    args = list(got_in.values())
    num, den = checkpoint(through_lifted, *args, use_reentrant=False) if recompute else through_lifted(*args)
    assert not den.requires_grad  # the kind's den (1 once a key entered) has no gradient
    torch.testing.assert_close(num, want, rtol=0, atol=0)
    got_g = torch.autograd.grad((num * cot).sum(), args)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)

    no_beta = fla_route.lifted(lambda q, k, v, b: (DELTA.chunked(q, k, v, beta=b, chunk=16)[0],),
                               got_in["qf"], got_in["kf"], got_in["v"], None)[0]
    assert no_beta.requires_grad


def test_the_refusal_is_lifted_while_the_backward_runs_and_restored_after(monkeypatch):
    """fla's guard reads `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1` when its backward runs: set inside the lifted
    backward, as it was before and after it (a stand-in module here; the CPU has no fla)."""
    chunk_o = types.ModuleType("fla.ops.common.chunk_o")
    chunk_o.TRITON_ABOVE_3_7_1 = False
    for name in ("fla", "fla.ops", "fla.ops.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["fla.ops.common"], "chunk_o", chunk_o, raising=False)
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o", chunk_o)
    seen = []

    def fn(a):
        out = a * 2
        out.register_hook(lambda g: seen.append(chunk_o.TRITON_ABOVE_3_7_1))
        return (out,)

    a = torch.ones(3, requires_grad=True)
    (out,) = fla_route.lifted(fn, a)
    assert seen == [] and chunk_o.TRITON_ABOVE_3_7_1 is False
    out.sum().backward()
    assert seen == [True] and chunk_o.TRITON_ABOVE_3_7_1 is False
    assert torch.equal(a.grad, torch.full((3,), 2.0))


def test_the_check_accepts_kernels_that_compute_the_sums_and_rejects_others():
    right = dataclasses.replace(DELTA, fla_forward=DELTA.chunked)

    def off(qf, kf, v, **kw):  # a miscompiled kernel: the gradient wrt the keys scaled
        num, den = DELTA.chunked(qf, kf * 1.05 - 0.05 * kf.detach(), v, **kw)
        return num, den

    wrong = dataclasses.replace(DELTA, fla_forward=off)
    cpu = torch.device("cpu")
    assert fla_route.agrees(right, functools.partial(fla_route.run, right), 32, 16, cpu)
    assert not fla_route.agrees(wrong, functools.partial(fla_route.run, wrong), 32, 16, cpu)
    assert fla_route.trainable(right, 32, 16, "cpu")
    assert fla_route.DECISIONS["delta m=32 d=16 cpu"].startswith("fla (relative RMS errors against the chunked sums: num 0")
    with pytest.warns(UserWarning, match="did not match"):
        assert not fla_route.trainable(wrong, 32, 16, "cpu")
    assert fla_route.DECISIONS["delta m=32 d=16 cpu"].startswith("chunked: its kernels' gradients did not match")
    with pytest.warns(UserWarning, match="width 64"):
        assert not fla_route.trainable(right, 64, 128, "cpu")


def test_no_kernels_off_cuda_or_without_fla():
    x = inputs()["qf"]
    assert not fla_route.usable(DELTA, x, 16, 8)
    assert not fla_route.usable(linear_state("sum"), x, 16, 8)


def test_the_check_inside_a_checkpointed_forward_leaves_the_checkpoint_intact():
    """The route decides inside a training forward, which gradient checkpointing records and replays: the check runs
    apart (its own thread), so the replay finds the same saved tensors and the gradients are the plain ones."""
    right = dataclasses.replace(DELTA, fla_forward=lambda *a, **k: DELTA.chunked(*a, **k))
    x = inputs(seed=3)
    args = [t.clone().requires_grad_() for t in x.values()]

    def layer(qf, kf, v, log_decay, beta):
        assert fla_route.trainable(right, 32, 16, "cpu")  # computed on the first call, cached for the replay
        return sums(qf, kf, v, log_decay, beta)[0]

    out = checkpoint(layer, *args, use_reentrant=False)
    got = torch.autograd.grad(out.square().sum(), args)
    plain = [t.clone().requires_grad_() for t in x.values()]
    want = torch.autograd.grad(sums(*plain)[0].square().sum(), plain)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_kernels_that_fail_the_check_leave_training_on_the_chunked_sums():
    def broken(*a, **k):
        raise RuntimeError("no kernel image is available")

    kind = dataclasses.replace(DELTA, fla_forward=broken)
    with pytest.warns(UserWarning, match="failed the check on this device .RuntimeError: no kernel image"):
        assert not fla_route.trainable(kind, 32, 16, "cpu")


@pytest.mark.parametrize("refused,cleared,grad,want", [
    (False, False, True, True),   # fla trains here itself
    (True, True, True, True),     # refused, but these sizes were checked on the device
    (True, False, True, False),   # refused and not cleared: the chunked sums train
    (True, False, False, True),   # no gradient: the forward kernels are never refused
])
def test_the_route_takes_the_kernels_where_they_compute_the_call(monkeypatch, refused, cleared, grad, want):
    class OnCuda:  # stands in for a CUDA tensor: the route reads only these
        is_cuda, device = True, "cuda:0"

    asked = []
    monkeypatch.setattr(fla_route, "imports", lambda: True)
    monkeypatch.setattr(fla_route, "refuses_backward", lambda: refused)
    monkeypatch.setattr(fla_route, "trainable", lambda kind, m, d, device: asked.append((kind.name, m, d, device)) or cleared)
    with torch.set_grad_enabled(grad):
        assert fla_route.usable(DELTA, OnCuda(), 128, 64) is want
    assert asked == ([("delta", 128, 64, "cuda:0")] if refused and grad else [])
    assert not fla_route.usable(linear_state("sum"), OnCuda(), 128, 64)  # no fla kernels for 'sum'
