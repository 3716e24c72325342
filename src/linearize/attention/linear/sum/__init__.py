"""Kind 'sum': normalised linear attention, S = sum phi(k_s) v_s^T and z = sum phi(k_s) over the keys that entered;
num = phi(q)^T S, den = phi(q)^T z. No decay (log_decay is ignored), no beta.

Its state is additive, so the hybrid's decode keeps one state (keys older than the window) and adds the ring's keys
at read time for the modes that cover them (`read`'s `extra`); the Triton kernels in `attention/triton/` are its
optional fused backend.
"""

from __future__ import annotations

import torch

from linearize.attention.common import group_queries, pad_time, recall_error as kv_recall_error, ungroup
from linearize.attention.linear.common import KVState, entering, init_kv_state

__all__ = ["absorb", "chunked", "fold", "init_state", "masked_sums", "naive", "read", "recall_error", "step"]

init_state = init_kv_state


def masked_sums(qf, kf, v, mask):
    """Sums over the keys in `mask` (broadcastable to (B, Hkv, G, T, S)): the quadratic definition."""
    hkv = kf.shape[1]
    bterm = torch.einsum("bhgtm,bhsm->bhgts", group_queries(qf, hkv), kf) * mask
    return ungroup(torch.einsum("bhgts,bhsd->bhgtd", bterm, v)), ungroup(bterm.sum(-1))


def naive(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0):
    t = qf.shape[2]
    pos = torch.arange(t, device=qf.device)
    reach = (pos[:, None] - pos[None, :]) >= lag  # key s has entered by step t
    return masked_sums(qf, kf, v, reach & entering(kf, enter)[:, None, None, None, :])


def chunked(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0, chunk=64):
    """Intra-chunk products plus an exclusive prefix sum of per-chunk states; no (T x T) tensor."""
    b, hq, t, m = qf.shape
    hkv, d = kf.shape[1], v.shape[-1]
    kf = (kf * entering(kf, enter)[:, None, :, None].to(kf.dtype))
    kf = pad_time(kf, lag, 0)[:, :, :t]
    v = pad_time(v, lag, 0)[:, :, :t]
    n = -(-t // chunk)
    tp = n * chunk
    qc = group_queries(pad_time(qf, 0, tp - t), hkv).reshape(b, hkv, hq // hkv, n, chunk, m)
    kc = pad_time(kf, 0, tp - t).reshape(b, hkv, n, chunk, m)
    vc = pad_time(v, 0, tp - t).reshape(b, hkv, n, chunk, d)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=qf.device).tril()
    scores = torch.einsum("bhgncm,bhnsm->bhgncs", qc, kc) * causal
    num = torch.einsum("bhgncs,bhnsd->bhgncd", scores, vc)
    den = scores.sum(-1)
    kv = torch.einsum("bhnsm,bhnsd->bhnmd", kc, vc)
    ks = kc.sum(3)
    kv_before = torch.cumsum(kv, dim=2) - kv  # state from the chunks before each chunk
    ks_before = torch.cumsum(ks, dim=2) - ks
    num = num + torch.einsum("bhgncm,bhnmd->bhgncd", qc, kv_before)
    den = den + torch.einsum("bhgncm,bhnm->bhgnc", qc, ks_before)
    num = ungroup(num.reshape(b, hkv, hq // hkv, tp, d))[:, :, :t]
    den = ungroup(den.reshape(b, hkv, hq // hkv, tp))[:, :, :t]
    return num, den


def fold(state: KVState, kf, v, enter) -> None:
    """S += enter * kf v^T and z += enter * kf for one key per row (kf (B, Hkv, m), v (B, Hkv, d), enter (B,)),
    in place."""
    S = state.S
    b, hkv, m, d = S.shape
    kf = kf.to(S.dtype) * enter[:, None, None].to(S.dtype)
    # one batched rank-1 update: no (B, Hkv, m, d) temporary
    S.view(b * hkv, m, d).baddbmm_(kf.reshape(b * hkv, 1, m).transpose(1, 2), v.to(S.dtype).reshape(b * hkv, 1, d))
    state.z.add_(kf)


def read(state: KVState, qf, extra=None):
    """qf (B, Hq, L, m) against the state and, when given, further keys extra = (kf, v, mask) one by one (kf
    (B, Hkv, K, m), v (B, Hkv, K, d), mask (B, K) or (B, Hkv, K)): S + sum_s kf_s v_s^T without forming that sum."""
    S, z = state.S, state.z
    hkv = S.shape[1]
    qg = group_queries(qf, hkv)
    num = torch.einsum("bhgtm,bhmd->bhgtd", qg, S)
    den = torch.einsum("bhgtm,bhm->bhgt", qg, z)
    if extra is not None:
        kf, v, mask = extra
        mask = mask[:, None, None, None, :] if mask.dim() == 2 else mask[:, :, None, None, :]
        a = torch.einsum("bhgtm,bhsm->bhgts", qg, kf) * mask
        num = num + torch.einsum("bhgts,bhsd->bhgtd", a, v)
        den = den + a.sum(-1)
    return ungroup(num), ungroup(den)


def step(state: KVState, qf_t, kf_in, v_in, *, log_decay_t=None, beta_in=None, enter_in=None):
    if enter_in is None:
        enter_in = torch.ones(kf_in.shape[0], dtype=torch.bool, device=kf_in.device)
    fold(state, kf_in, v_in, enter_in)
    num, den = read(state, qf_t[:, :, None].to(state.S.dtype))
    return num[:, :, 0], den[:, :, 0]


# -- sparse memory (attention.memory): score keys against the state, let the evicted ones in -------------------------

def recall_error(state: KVState, kf, v):
    """How badly the state recalls each key's value, ||v - phi(k)^T S / phi(k)^T z||^2 (+inf where phi(k)^T z = 0):
    kf (B, Hkv, L, m), v (B, Hkv, L, d) -> (B, Hkv, L)."""
    return kv_recall_error(kf, v, state.S, state.z)


def absorb(state: KVState, kf, v, valid, *, log_weight=None, beta=None) -> KVState:
    """A new state with the keys kf (B, Hkv, L, m), v (B, Hkv, L, d) added where `valid` (B, Hkv, L), each weighed
    exp(log_weight) (the decay since its entry step; None: 1). Not in place, so gradients flow through it."""
    w = valid.to(state.S.dtype)
    if log_weight is not None:
        w = w * torch.exp(log_weight.to(state.S.dtype))
    kw = kf.to(state.S.dtype) * w[..., None]
    return KVState(state.S + torch.einsum("bhlm,bhld->bhmd", kw, v.to(state.S.dtype)), state.z + kw.sum(2))
