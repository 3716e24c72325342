"""Kind 'gated': normalised linear attention with a per-(KV head, step) scalar decay (GLA-style), log_decay <= 0.

At step t: S <- exp(log_decay[t]) S, z likewise; key s = t - lag enters (S += phi(k_s) v_s^T, z += phi(k_s)); the
query reads num = phi(q_t)^T S, den = phi(q_t)^T z. Closed form: key s weighs exp(sum_{u=s+lag+1}^{t} log_decay[u])
for s + lag <= t. With log_decay None it is the 'sum' kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linearize.attention.common import group_queries, ungroup
from linearize.attention.linear import sum as sum_kind
from linearize.attention.linear.common import (
    KVState,
    entering,
    init_kv_state,
    shift_time,
)

__all__ = ["absorb", "chunked", "decay_weights", "decayed", "final_state", "fla_forward", "fla_kernel_sizes",
           "init_state", "naive", "read", "recall_error", "step"]

init_state = init_kv_state
# sparse memory scores and lets keys in as the 'sum' state does (the decay is in absorb's log_weight)
recall_error, absorb = sum_kind.recall_error, sum_kind.absorb


def _log_decay(log_decay, kf):
    b, hkv, t = kf.shape[:3]
    return torch.zeros(b, hkv, t, dtype=kf.dtype, device=kf.device) if log_decay is None else log_decay.to(kf.dtype)


def decay_weights(log_decay, *, lag=0):
    """(B, Hkv, T, S) weights exp(sum_{u=s+lag+1}^{t} log_decay[u]) of key s at query t, 0 where s + lag > t."""
    t = log_decay.shape[-1]
    cum = log_decay.cumsum(-1)
    lag_in = min(lag, t)
    entered = F.pad(cum[..., lag_in:], (0, lag_in))  # C[s + lag] at position s (0 where s + lag >= T: masked below)
    pos = torch.arange(t, device=log_decay.device)
    reach = (pos[:, None] - pos[None, :]) >= lag
    expo = cum[..., :, None] - entered[..., None, :]
    return torch.exp(expo.masked_fill(~reach, float("-inf")))  # masked before exp: no overflow above the diagonal


def naive(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0):
    hkv = kf.shape[1]
    w = decay_weights(_log_decay(log_decay, kf), lag=lag)[:, :, None] * entering(kf, enter)[:, None, None, None, :]
    bterm = torch.einsum("bhgtm,bhsm->bhgts", group_queries(qf, hkv), kf) * w
    return ungroup(torch.einsum("bhgts,bhsd->bhgtd", bterm, v)), ungroup(bterm.sum(-1))


def chunked(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0, chunk=64):
    """Chunk by chunk: exact (chunk x chunk) decayed products inside a chunk, the state carried between chunks with
    the decay of the whole chunk; every exponent is <= 0, so nothing overflows. No (T x T) tensor."""
    b, hq, t, m = qf.shape
    hkv, d = kf.shape[1], v.shape[-1]
    g = hq // hkv
    ld = _log_decay(log_decay, kf)
    # key s sits at its entry step s + lag, so the sums run over positions <= t with no lag left
    kf = shift_time(kf * entering(kf, enter)[:, None, :, None].to(kf.dtype), lag)
    v = shift_time(v, lag)
    n = -(-t // chunk)
    pad = n * chunk - t
    qc = group_queries(F.pad(qf, (0, 0, 0, pad)), hkv).reshape(b, hkv, g, n, chunk, m)
    kc = F.pad(kf, (0, 0, 0, pad)).reshape(b, hkv, n, chunk, m)
    vc = F.pad(v, (0, 0, 0, pad)).reshape(b, hkv, n, chunk, d)
    cum = F.pad(ld, (0, pad)).reshape(b, hkv, n, chunk).cumsum(-1)  # decay from the chunk start through step i
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=qf.device).tril()
    # inside each chunk, all chunks at once: exact decayed products
    inside = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bhgncm,bhnsm->bhgncs", qc, kc) * inside[:, :, None]  # (B, Hkv, G, N, C, C)
    k_at_end = kc * torch.exp(cum[..., -1:] - cum)[..., None]  # each key decayed to its chunk's last step
    kv_chunk = torch.einsum("bhnsm,bhnsd->bhnmd", k_at_end, vc)  # what a chunk adds to the state, at its end
    k_chunk = k_at_end.sum(3)  # (B, Hkv, N, m)
    decay = torch.exp(cum[..., -1])  # (B, Hkv, N): the whole chunk's decay
    # the only sequential part, two kernels a chunk (unbind once: one backward, not a zero tensor per chunk); the
    # states entering each chunk are read by its queries afterwards, for all chunks at once
    S, z = qf.new_zeros(b, hkv, m, d), qf.new_zeros(b, hkv, m)
    states, norms = [], []
    for kv_j, k_j, decay_j in zip(kv_chunk.unbind(2), k_chunk.unbind(2), decay.unbind(2)):
        states.append(S)
        norms.append(z)
        S = torch.addcmul(kv_j, S, decay_j[..., None, None])
        z = torch.addcmul(k_j, z, decay_j[..., None])
    carry = torch.exp(cum)[:, :, None, :, :, None]  # (B, Hkv, 1, N, C, 1): the entering state decayed to step i
    nums = torch.einsum("bhgncs,bhnsd->bhgncd", scores, vc) \
        + torch.einsum("bhgncm,bhnmd->bhgncd", qc, torch.stack(states, 2)) * carry
    dens = scores.sum(-1) + torch.einsum("bhgncm,bhnm->bhgnc", qc, torch.stack(norms, 2)) * carry[..., 0]
    num = ungroup(nums.reshape(b, hkv, g, n * chunk, d))[:, :, :t]
    den = ungroup(dens.reshape(b, hkv, g, n * chunk))[:, :, :t]
    return num, den


def final_state(kf, v, *, log_decay=None, beta=None, enter=None, lag=0) -> KVState:
    """The state after steps 0 .. T-1 (keys s <= T-1-lag entered), in closed form: the decode prefill."""
    ld = _log_decay(log_decay, kf)
    # a key entering at step p = s + lag decays over the steps after it: exp(sum_{u > p} log_decay[u]), summed from
    # the end so the recent keys' exponents stay small and exact (not a difference of two long prefix sums)
    after = ld.flip(-1).cumsum(-1).flip(-1) - ld
    at_entry = shift_time(kf * entering(kf, enter)[:, None, :, None].to(kf.dtype), lag)
    kw = at_entry * torch.exp(after)[..., None]
    vs = shift_time(v, lag)
    return KVState(torch.einsum("bhsm,bhsd->bhmd", kw, vs).contiguous(), kw.sum(2))


def step(state: KVState, qf_t, kf_in, v_in, *, log_decay_t=None, beta_in=None, enter_in=None):
    if log_decay_t is not None:
        a = torch.exp(log_decay_t.to(state.S.dtype))
        state.S.mul_(a[..., None, None])
        state.z.mul_(a[..., None])
    return sum_kind.step(state, qf_t, kf_in, v_in, enter_in=enter_in)


def fla_kernel_sizes(m: int, d: int) -> tuple[int, int]:
    """The kernel's key and value sizes: v gets a ones column (the kernel's output then carries den), then zeros to
    a kernel-friendly width."""
    return m, -(-(d + 1) // 16) * 16


def fla_forward(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0):
    """The same sums through flash-linear-attention's simple GLA kernel (CUDA): v gets a ones column so the kernel's
    output carries den; the lag is a shift of the keys, GQA a repeat of the KV heads."""
    from fla.ops.simple_gla import chunk_simple_gla

    hq, hkv, d = qf.shape[1], kf.shape[1], v.shape[-1]
    rep = hq // hkv
    kf = shift_time(kf * entering(kf, enter)[:, None, :, None].to(kf.dtype), lag)
    width = fla_kernel_sizes(qf.shape[-1], d)[1]
    vx = torch.cat([shift_time(v, lag), torch.ones_like(v[..., :1]), v.new_zeros(*v.shape[:-1], width - d - 1)], -1)
    ld = _log_decay(log_decay, kf)
    kf, vx, ld = (x.repeat_interleave(rep, 1) for x in (kf, vx, ld))
    dtype = torch.bfloat16
    out, _ = chunk_simple_gla(qf.transpose(1, 2).to(dtype), kf.transpose(1, 2).to(dtype), vx.transpose(1, 2).to(dtype),
                              g=ld.transpose(1, 2).float(), scale=1.0)
    out = out.transpose(1, 2).float()
    return out[..., :d], out[..., d]


def decayed(state: KVState, log_decay) -> KVState:
    """A new state: S and z times exp(log_decay) (B, Hkv). Not in place."""
    a = torch.exp(log_decay.to(state.S.dtype))
    return KVState(state.S * a[..., None, None], state.z * a[..., None])


def read(state: KVState, qf, *, log_decay=None):
    """(num (B, Hq, L, d), den (B, Hq, L)) of queries qf (B, Hq, L, m); with log_decay (B, Hkv, L), query l reads the
    state decayed by exp(log_decay[l])."""
    num, den = sum_kind.read(state, qf)
    if log_decay is None:
        return num, den
    a = ungroup(torch.exp(log_decay.to(num.dtype))[:, :, None].expand(-1, -1, qf.shape[1] // log_decay.shape[1], -1))
    return num * a[..., None], den * a
