"""Shared checks of the linear-state kinds (attention.linear): random inputs and a plain loop over the recurrence."""

from __future__ import annotations

import torch

B, HQ, HKV, M, D = 2, 4, 2, 6, 5


def random_inputs(t, *, seed=0, holes=True):
    """qf, kf > 0 (feature-map-like), v, log_decay <= 0, beta in (0, 1), enter with holes (and a left-padded row)."""
    g = torch.Generator().manual_seed(seed)
    qf = torch.rand(B, HQ, t, M, generator=g) + 0.1
    kf = torch.rand(B, HKV, t, M, generator=g) + 0.1
    v = torch.randn(B, HKV, t, D, generator=g)
    log_decay = -torch.rand(B, HKV, t, generator=g) * 0.5
    beta = torch.rand(B, HKV, t, generator=g) * 0.8 + 0.1
    enter = torch.ones(B, t, dtype=torch.bool)
    if holes:
        enter[0, 3] = enter[0, 7] = False
        enter[1, :4] = False
    return qf, kf, v, log_decay, beta, enter


def loop_reference(qf, kf, v, *, log_decay, enter, lag, normalised=True):
    """The recurrence as the interface states it, one step at a time ('sum'/'gated': S += k v^T, z += k)."""
    b, hq, t, m = qf.shape
    hkv = kf.shape[1]
    rep = hq // hkv
    S = torch.zeros(b, hkv, m, v.shape[-1])
    z = torch.zeros(b, hkv, m)
    nums, dens = [], []
    for i in range(t):
        if log_decay is not None:
            S = S * log_decay[:, :, i, None, None].exp()
            z = z * log_decay[:, :, i, None].exp()
        s = i - lag
        if s >= 0:
            e = enter[:, s].float()[:, None]
            S = S + (e[..., None, None] * kf[:, :, s, :, None] * v[:, :, s, None, :])
            z = z + e[..., None] * kf[:, :, s]
        Sq, zq = S.repeat_interleave(rep, 1), z.repeat_interleave(rep, 1)
        nums.append(torch.einsum("bhm,bhmd->bhd", qf[:, :, i], Sq))
        dens.append(torch.einsum("bhm,bhm->bh", qf[:, :, i], zq))
    return torch.stack(nums, 2), torch.stack(dens, 2), (S, z)


def run_steps(kind, qf, kf, v, *, log_decay, beta, enter, lag):
    """init_state + step token by token, the caller keeping the lag (as the hybrid's decode does)."""
    b, _, t, m = qf.shape
    state = kind.init_state(b, kf.shape[1], m, v.shape[-1], dtype=torch.float32, device=qf.device)
    nums, dens = [], []
    for i in range(t):
        s = i - lag
        if s >= 0:
            kin, vin, ein = kf[:, :, s], v[:, :, s], enter[:, s]
            bin_ = None if beta is None else beta[:, :, s]
        else:  # no key yet: only the decay
            kin, vin, ein = torch.zeros_like(kf[:, :, 0]), torch.zeros_like(v[:, :, 0]), torch.zeros_like(enter[:, 0])
            bin_ = None if beta is None else torch.zeros_like(beta[:, :, 0])
        ld = None if log_decay is None else log_decay[:, :, i]
        num, den = kind.step(state, qf[:, :, i], kin, vin, log_decay_t=ld, beta_in=bin_, enter_in=ein)
        nums.append(num)
        dens.append(den)
    return torch.stack(nums, 2), torch.stack(dens, 2), state


def grads(fn, tensors, **kw):
    """Gradients of a fixed random readout of fn's (num, den) with respect to `tensors`."""
    xs = [x.detach().clone().requires_grad_(True) for x in tensors]
    num, den = fn(*xs[:3], **{**kw, **({"log_decay": xs[3]} if len(xs) > 3 else {})})
    g = torch.Generator().manual_seed(1)
    loss = (num * torch.randn(num.shape, generator=g)).sum() + (den * torch.randn(den.shape, generator=g)).sum()
    return torch.autograd.grad(loss, xs)
