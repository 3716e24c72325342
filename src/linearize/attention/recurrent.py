"""Recurrent decoding: a constant-size state per layer and the one-token step.

After n tokens the state holds
  S, z    sum of phi(k_s) v_s^T and phi(k_s) over keys s <= n - w (older than the next query's window),
  buffer  the last min(n, w - 1) keys, values, key features and validity (the window minus the query),
  sinks   the first `num_sinks` valid keys and values (for the 'sinks_only' diagnostic).
Its size does not depend on n. Every component mode can be computed from it, so switching modes
between generate calls needs no re-prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linearize.attention.common import check_mode, combine, expand_weight, group_queries, safe_div, sink_positions, softcapped, ungroup


@dataclass
class HybridState:
    S: torch.Tensor  # (B, Hkv, m, d)
    z: torch.Tensor  # (B, Hkv, m)
    buf_k: torch.Tensor  # (B, Hkv, L, d), L <= w - 1
    buf_v: torch.Tensor
    buf_kf: torch.Tensor  # (B, Hkv, L, m)
    buf_valid: torch.Tensor  # (B, L)
    sink_k: torch.Tensor  # (B, Hkv, num_sinks, d)
    sink_v: torch.Tensor
    sink_valid: torch.Tensor  # (B, num_sinks)
    seen: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.S, self.z, self.buf_k, self.buf_v, self.buf_kf, self.buf_valid, self.sink_k, self.sink_v, self.sink_valid]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select(self, rows: torch.Tensor) -> "HybridState":
        """Rows of the batch (beam search reordering, batch selection)."""
        picked = [t.index_select(0, rows.to(t.device)) for t in self.tensors()]
        return HybridState(*picked, seen=self.seen)


def prefill_state(k, v, kf, valid, *, window: int, num_sinks: int) -> HybridState:
    """The state after a whole prompt (k/v (B, Hkv, T, d), kf (B, Hkv, T, m), valid (B, T))."""
    b, hkv, t, d = k.shape
    f32 = torch.promote_types(k.dtype, torch.float32)
    kf_valid = kf.to(f32) * valid[:, None, :, None]
    n_old = max(t - window + 1, 0)  # keys 0 .. t - w
    S = torch.einsum("bhsm,bhsd->bhmd", kf_valid[:, :, :n_old], v[:, :, :n_old].to(f32))
    z = kf_valid[:, :, :n_old].sum(2)
    keep = min(t, window - 1)
    start = t - keep
    idx, sink_valid = sink_positions(valid, num_sinks)
    gather = idx[:, None, :, None].expand(b, hkv, idx.shape[1], d)
    sink_k, sink_v = k.gather(2, gather), v.gather(2, gather)
    if idx.shape[1] < num_sinks:  # fewer tokens than sink slots
        extra = num_sinks - idx.shape[1]
        sink_k = torch.cat([sink_k, sink_k.new_zeros(b, hkv, extra, d)], 2)
        sink_v = torch.cat([sink_v, sink_v.new_zeros(b, hkv, extra, d)], 2)
        sink_valid = torch.cat([sink_valid, sink_valid.new_zeros(b, extra)], 1)
    return HybridState(
        S=S, z=z, buf_k=k[:, :, start:], buf_v=v[:, :, start:], buf_kf=kf[:, :, start:], buf_valid=valid[:, start:],
        sink_k=sink_k, sink_v=sink_v, sink_valid=sink_valid, seen=t,
    )


def _softmax_sums(q, keys, values, mask, scale, softcap):
    """q (B, Hq, 1, d) against keys (B, Hkv, L, d) with mask (B, L)."""
    hkv = keys.shape[1]
    logits = softcapped(torch.einsum("bhgtd,bhsd->bhgts", group_queries(q, hkv), keys) * scale, softcap)
    logits = logits.masked_fill(~mask[:, None, None, None, :], float("-inf"))
    c = logits.amax(-1, keepdim=True)
    a = torch.exp(logits - torch.where(torch.isfinite(c), c, torch.zeros_like(c)))
    return ungroup(torch.einsum("bhgts,bhsd->bhgtd", a, values)), ungroup(a.sum(-1))


def _linear_sums(qf, S, z):
    hkv = S.shape[1]
    qg = group_queries(qf, hkv)
    return ungroup(torch.einsum("bhgtm,bhmd->bhgtd", qg, S)), ungroup(torch.einsum("bhgtm,bhm->bhgt", qg, z))


def hybrid_attention_step(
    state: HybridState, q, k, v, qf, kf, *, scale: float, window: int, weight=0.1, rule: str = "shared_norm",
    placement: str = "complementary", mode: str = "hybrid", valid=None, softcap: float | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """One token: q (B, Hq, 1, d), k/v (B, Hkv, 1, d), qf/kf features, valid (B, 1). Returns (output, new state)."""
    check_mode(mode)
    b, hq = q.shape[:2]
    f32 = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 at least
    if valid is None:
        valid = torch.ones(b, 1, dtype=torch.bool, device=q.device)
    win_k = torch.cat([state.buf_k, k], 2)
    win_v = torch.cat([state.buf_v, v], 2)
    win_kf = torch.cat([state.buf_kf, kf], 2)
    win_valid = torch.cat([state.buf_valid, valid], 1)

    # sinks: the current token becomes a sink if fewer than num_sinks valid tokens came before it
    count = state.sink_valid.sum(1, keepdim=True)  # (B, 1)
    slot = torch.arange(state.sink_valid.shape[1], device=q.device)[None, :]
    becomes = (slot == count) & valid  # (B, n)
    sel = becomes[:, None, :, None]
    sink_k = torch.where(sel, k, state.sink_k)
    sink_v = torch.where(sel, v, state.sink_v)
    sink_valid = state.sink_valid | becomes

    # fold the key leaving the buffer into the linear state
    S, z = state.S, state.z
    if win_k.shape[2] > window - 1:
        old_kf = win_kf[:, :, 0].to(f32) * win_valid[:, None, 0, None]
        S = S + old_kf[..., :, None] * win_v[:, :, 0, None, :].to(f32)
        z = z + old_kf
        keep = slice(1, None)
    else:
        keep = slice(0, None)
    new_state = HybridState(
        S=S, z=z, buf_k=win_k[:, :, keep], buf_v=win_v[:, :, keep], buf_kf=win_kf[:, :, keep],
        buf_valid=win_valid[:, keep], sink_k=sink_k, sink_v=sink_v, sink_valid=sink_valid, seen=state.seen + 1,
    )

    qc, qfc = q.to(f32), qf.to(f32)
    if mode == "none":
        out = torch.zeros_like(qc)
    elif mode == "sinks_only":
        out = safe_div(*_softmax_sums(qc, sink_k.to(f32), sink_v.to(f32), sink_valid, scale, softcap))
    else:
        # all keys so far = the old state + the window (the current key included)
        wkf = win_kf.to(f32) * win_valid[:, None, :, None]
        S_all = state.S + torch.einsum("bhsm,bhsd->bhmd", wkf, win_v.to(f32))
        z_all = state.z + wkf.sum(2)
        if mode == "la_only":
            out = safe_div(*_linear_sums(qfc, S_all, z_all))
        else:
            swa = _softmax_sums(qc, win_k.to(f32), win_v.to(f32), win_valid, scale, softcap)
            if mode == "swa_only":
                out = safe_div(*swa)
            else:
                la = _linear_sums(qfc, state.S, state.z) if placement == "complementary" else _linear_sums(qfc, S_all, z_all)
                out = combine(rule, expand_weight(weight, b, hq, 1, qc), swa, la)
    return out.to(q.dtype), new_state
