"""The delta-rule state in chunks (the WY / UT-transform form of Gated DeltaNet): equal to `naive`, with a Python
loop over T / chunk chunks instead of T steps, and gradients through autograd.

Inside a chunk of C steps, with G_i the cumulative log-decay from the chunk's start to step i and S0 the state
before the chunk, write the state after step i as
    S_i = e^{G_i} S0 + sum_{j <= i} e^{G_i - G_j} k_j u_j^T
where u_j is key j's effective update. The recurrence gives u_i = b_i (v_i - e^{G_i} S0^T k_i
- sum_{j < i} e^{G_i - G_j} (k_i . k_j) u_j), a unit lower-triangular system (I + A) U = diag(b) V - diag(b e^G) K S0
with A_ij = b_i e^{G_i - G_j} k_i . k_j (j < i). Solved once per chunk for both right-hand sides (all chunks at once,
no S0 needed): U = U_v - W S0. Then, carrying S0 across chunks:
    num_i = e^{G_i} S0^T q_i + sum_{j <= i} e^{G_i - G_j} (q_i . k_j) u_j
    S_C  = e^{G_C} S0 + sum_j e^{G_C - G_j} k_j u_j^T.
Every exponent is <= 0 (masked to -inf above the diagonal before exp), so nothing overflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linearize.attention.common import group_queries, ungroup
from linearize.attention.linear.delta.inputs import check_inputs, entering_keys, has_entered, unit_lower_solve, unit_norm
from linearize.attention.linear.delta.recurrent import DeltaState


def _chunks(x: torch.Tensor, chunk: int, n: int) -> torch.Tensor:
    """(B, H, T, ...) -> (B, H, N, C, ...), zero-padded at the end (zero keys, beta and decay change nothing)."""
    t = x.shape[2]
    pad = [0, 0] * (x.dim() - 3) + [0, n * chunk - t]
    return F.pad(x, pad).reshape(*x.shape[:2], n, chunk, *x.shape[3:])


def _pair_decay(G: torch.Tensor, strict: bool) -> torch.Tensor:
    """(..., C) cumulative log-decays -> (..., C, C) e^{G_i - G_j} for j < i (strict) or j <= i, else 0."""
    c = G.shape[-1]
    keep = torch.ones(c, c, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    return (G[..., :, None] - G[..., None, :]).masked_fill(~keep, float("-inf")).exp()


def _scan(qf, kf, v, log_decay, beta, enter, lag, chunk):
    """The chunk loop: num grouped (B, Hkv, G, T, d) (None without queries), the final state S (B, Hkv, m, d)
    after step T - 1, and the (B, T) bool of steps where a key enters."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    b, hkv, t, m = kf.shape
    d = v.shape[-1]
    k_in, v_in, beta_in, enters = entering_keys(kf, v, beta, enter, lag)
    n = -(-t // chunk)
    K = _chunks(k_in, chunk, n)  # (B, Hkv, N, C, m)
    V = _chunks(v_in, chunk, n)
    beta_c = _chunks(beta_in, chunk, n)  # (B, Hkv, N, C)
    # the decay stays on the query positions (it is applied at step t whichever key enters then)
    g = torch.zeros_like(beta_in) if log_decay is None else log_decay
    G = _chunks(g, chunk, n).cumsum(-1)

    A = beta_c[..., None] * _pair_decay(G, strict=True) * (K @ K.transpose(-1, -2))
    rhs = torch.cat([beta_c[..., None] * V, (beta_c * G.exp())[..., None] * K], dim=-1)
    solved = unit_lower_solve(A, rhs)  # unit diagonal: I + A
    U_v, W = solved.split([d, m], dim=-1)
    to_end = (G[..., -1:] - G).exp()  # e^{G_C - G_j}

    # The only sequential part: the state carried across chunks. Each step is two batched matrix products on
    # (B * Hkv)-batched operands laid out chunk-first once, so a chunk costs three kernels (a step's launches, not its
    # arithmetic, bound a 28-layer model's training step on a GPU); what the queries read is computed for all
    # chunks at once afterwards, from the states entering each chunk.
    def chunk_first(x):  # (B, Hkv, N, ...) -> (N, B * Hkv, ...)
        return x.movedim(2, 0).reshape(n, b * hkv, *x.shape[3:])

    # unbind, not indexing in the loop: one backward (a stack) instead of a full-size zero tensor per chunk
    U_v_n, W_n = chunk_first(U_v).unbind(0), chunk_first(W).unbind(0)
    K_to_end_t = chunk_first(K * to_end[..., None]).transpose(-1, -2).unbind(0)  # N x (B * Hkv, m, C)
    decay_n = chunk_first(G[..., -1].exp())[..., None, None].unbind(0)  # N x (B * Hkv, 1, 1): e^{G_C}
    S = kf.new_zeros(b * hkv, m, d)
    entering, updates = [], []  # kept for the queries only (a decode prefill needs the last state alone)
    for c in range(n):
        U = torch.baddbmm(U_v_n[c], W_n[c], S, alpha=-1)  # U_v - W S0
        if qf is not None:
            entering.append(S)
            updates.append(U)
        S = torch.baddbmm(decay_n[c] * S, K_to_end_t[c], U)
    num = None
    if qf is not None:
        def per_head(xs):  # N x (B * Hkv, r, d) -> (B, Hkv, 1, N, r, d): broadcast over the query groups
            return torch.stack(xs, 1).reshape(b, hkv, 1, n, *xs[0].shape[1:])

        Q = group_queries(_chunks(unit_norm(qf), chunk, n), hkv)  # (B, Hkv, G, N, C, m)
        reads = (Q @ K[:, :, None].transpose(-1, -2)) * _pair_decay(G, strict=False)[:, :, None]  # (B, Hkv, G, N, C, C)
        from_state = G[:, :, None, ..., None].exp() * (Q @ per_head(entering))
        num = (from_state + reads @ per_head(updates)).flatten(3, 4)[:, :, :, :t]
    S = S.reshape(b, hkv, m, d)
    return num, S, enters


def chunked(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0, chunk=64):
    """(num (B, Hq, T, d), den (B, Hq, T)); the same result as `naive`."""
    check_inputs(qf, kf, v, log_decay, beta, enter, lag)
    num, _, enters = _scan(qf, kf, v, log_decay, beta, enter, lag, chunk)
    return ungroup(num), has_entered(enters, qf.shape[1], qf.dtype)


def prefill_state(kf, v, *, log_decay=None, beta=None, enter=None, lag=0, chunk=64) -> DeltaState:
    """The decoding state after a prompt of T steps (keys 0 .. T-1-lag entered, decays 0 .. T-1 applied), in
    chunks: `step` continues from it with the key at T - lag (which the caller keeps) at step T."""
    check_inputs(None, kf, v, log_decay, beta, enter, lag)
    _, S, enters = _scan(None, kf, v, log_decay, beta, enter, lag, chunk)
    return DeltaState(S=S, entered=enters.any(dim=1))
