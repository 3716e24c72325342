"""Recurrent decoding: a fixed-shape state per layer, read by the one-token output and advanced in place.

After n tokens the state holds
  S, z    sum of phi(k_s) v_s^T and phi(k_s) over keys s <= n - w (older than the next query's window),
  ring    w - 1 slots holding the last min(n, w - 1) keys, values, key features; empty slots are marked invalid,
          and `slot` (a device tensor) is where the next key goes: the oldest key once the ring is full,
  sinks   the first `num_sinks` valid keys and values (for the 'sinks_only' diagnostic).
Neither its size nor its tensors' addresses depend on n, and no step reads a Python value that changes with n,
so one decoding step can be captured in a CUDA graph and replayed (`linearize.attention.graph_decode`).
Every component mode can be computed from it, so switching modes between generate calls needs no re-prefill.

A step (`decode_step`) is `decode_output` for each component mode needed (reads the state), then `advance_state`
(once; in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linearize.attention.common import check_mode, combine, expand_weight, group_queries, safe_div, sink_positions, softcapped, ungroup


@dataclass
class HybridState:
    S: torch.Tensor  # (B, Hkv, m, d)
    z: torch.Tensor  # (B, Hkv, m)
    buf_k: torch.Tensor  # (B, Hkv, w - 1, d): the ring, in slot order (not time order)
    buf_v: torch.Tensor
    buf_kf: torch.Tensor  # (B, Hkv, w - 1, m)
    buf_valid: torch.Tensor  # (B, w - 1)
    sink_k: torch.Tensor  # (B, Hkv, num_sinks, d)
    sink_v: torch.Tensor
    sink_valid: torch.Tensor  # (B, num_sinks)
    slot: torch.Tensor  # (1,) long: the ring slot the next key is written to
    seen: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.S, self.z, self.buf_k, self.buf_v, self.buf_kf, self.buf_valid, self.sink_k, self.sink_v, self.sink_valid]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select(self, rows: torch.Tensor) -> "HybridState":
        """Rows of the batch (beam search reordering, batch selection); all rows share the ring position."""
        picked = [t.index_select(0, rows.to(t.device)) for t in self.tensors()]
        return HybridState(*picked, slot=self.slot.clone(), seen=self.seen)


def prefill_state(k, v, kf, valid, *, window: int, num_sinks: int) -> HybridState:
    """The state after a whole prompt (k/v (B, Hkv, T, d), kf (B, Hkv, T, m), valid (B, T))."""
    b, hkv, t, d = k.shape
    m = kf.shape[-1]
    f32 = torch.promote_types(k.dtype, torch.float32)
    kf_valid = kf.to(f32) * valid[:, None, :, None]
    n_old = max(t - window + 1, 0)  # keys 0 .. t - w
    S = torch.einsum("bhsm,bhsd->bhmd", kf_valid[:, :, :n_old], v[:, :, :n_old].to(f32)).contiguous()
    z = kf_valid[:, :, :n_old].sum(2)
    ring = window - 1
    keep = min(t, ring)
    # the kept keys fill slots 0 .. keep-1 in time order, so the next slot is keep (or 0, the oldest, when full)
    buf_k, buf_v = k.new_zeros(b, hkv, ring, d), v.new_zeros(b, hkv, ring, d)
    buf_kf, buf_valid = kf.new_zeros(b, hkv, ring, m), valid.new_zeros(b, ring)
    buf_k[:, :, :keep], buf_v[:, :, :keep] = k[:, :, t - keep:], v[:, :, t - keep:]
    buf_kf[:, :, :keep], buf_valid[:, :keep] = kf[:, :, t - keep:], valid[:, t - keep:]
    idx, sink_valid = sink_positions(valid, num_sinks)
    gather = idx[:, None, :, None].expand(b, hkv, idx.shape[1], d)
    sink_k, sink_v = k.gather(2, gather), v.gather(2, gather)
    if idx.shape[1] < num_sinks:  # fewer tokens than sink slots
        extra = num_sinks - idx.shape[1]
        sink_k = torch.cat([sink_k, sink_k.new_zeros(b, hkv, extra, d)], 2)
        sink_v = torch.cat([sink_v, sink_v.new_zeros(b, hkv, extra, d)], 2)
        sink_valid = torch.cat([sink_valid, sink_valid.new_zeros(b, extra)], 1)
    return HybridState(
        S=S, z=z, buf_k=buf_k, buf_v=buf_v, buf_kf=buf_kf, buf_valid=buf_valid, sink_k=sink_k, sink_v=sink_v,
        sink_valid=sink_valid, slot=torch.tensor([keep % ring if ring else 0], device=k.device), seen=t,
    )


def _ones_valid(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)


def sinks_after(state: HybridState, k, v, valid):
    """The sinks once this token is seen: it joins when fewer than num_sinks valid tokens came before it."""
    count = state.sink_valid.sum(1, keepdim=True)  # (B, 1)
    slot = torch.arange(state.sink_valid.shape[1], device=k.device)[None, :]
    becomes = (slot == count) & valid  # (B, n)
    sel = becomes[:, None, :, None]
    return torch.where(sel, k, state.sink_k), torch.where(sel, v, state.sink_v), state.sink_valid | becomes


def _softmax_sums(q, keys, values, mask, scale, softcap):
    """q (B, Hq, 1, d) against keys (B, Hkv, L, d) with mask (B, L)."""
    hkv = keys.shape[1]
    logits = softcapped(torch.einsum("bhgtd,bhsd->bhgts", group_queries(q, hkv), keys) * scale, softcap)
    logits = logits.masked_fill(~mask[:, None, None, None, :], float("-inf"))
    c = logits.amax(-1, keepdim=True)
    a = torch.exp(logits - torch.where(torch.isfinite(c), c, torch.zeros_like(c)))
    return ungroup(torch.einsum("bhgts,bhsd->bhgtd", a, values)), ungroup(a.sum(-1))


def _linear_sums(qf, S, z, window=None):
    """qf against the state S, z and, when given, the window's keys (kf, v, valid) one by one."""
    hkv = S.shape[1]
    qg = group_queries(qf, hkv)
    num = torch.einsum("bhgtm,bhmd->bhgtd", qg, S)
    den = torch.einsum("bhgtm,bhm->bhgt", qg, z)
    if window is not None:  # S + sum_s kf_s v_s^T without forming that (B, Hkv, m, d) sum
        kf, v, valid = window
        a = torch.einsum("bhgtm,bhsm->bhgts", qg, kf) * valid[:, None, None, None, :]
        num = num + torch.einsum("bhgts,bhsd->bhgtd", a, v)
        den = den + a.sum(-1)
    return ungroup(num), ungroup(den)


def decode_output(
    state: HybridState, q, k, v, qf, kf, *, scale: float, weight=0.1, rule: str = "shared_norm",
    placement: str = "complementary", mode: str = "hybrid", valid=None, softcap: float | None = None,
) -> torch.Tensor:
    """One token's output (B, Hq, 1, d): q (B, Hq, 1, d), k/v (B, Hkv, 1, d), qf/kf features, valid (B, 1).

    The window is the ring plus the new key (slot order does not matter to the sums); the state is only read.
    """
    check_mode(mode)
    b, hq = q.shape[:2]
    f32 = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 at least
    if valid is None:
        valid = _ones_valid(q)
    qc, qfc = q.to(f32), qf.to(f32)
    if mode == "none":
        return torch.zeros_like(q)
    if mode == "sinks_only":
        sink_k, sink_v, sink_valid = sinks_after(state, k, v, valid)
        return safe_div(*_softmax_sums(qc, sink_k.to(f32), sink_v.to(f32), sink_valid, scale, softcap)).to(q.dtype)
    win_v = torch.cat([state.buf_v, v], 2).to(f32)
    win_valid = torch.cat([state.buf_valid, valid], 1)
    # all keys so far = the state + the window (the current key included)
    all_keys = (torch.cat([state.buf_kf, kf], 2).to(f32), win_v, win_valid)
    if mode == "la_only":
        out = safe_div(*_linear_sums(qfc, state.S, state.z, all_keys))
    else:
        swa = _softmax_sums(qc, torch.cat([state.buf_k, k], 2).to(f32), win_v, win_valid, scale, softcap)
        if mode == "swa_only":
            out = safe_div(*swa)
        else:
            la = _linear_sums(qfc, state.S, state.z, None if placement == "complementary" else all_keys)
            out = combine(rule, expand_weight(weight, b, hq, 1, qc), swa, la)
    return out.to(q.dtype)


def _fold(state: HybridState, kf, v, valid) -> None:
    """S += valid * kf v^T and z += valid * kf for one key per row (kf (B, Hkv, 1, m), v (B, Hkv, 1, d)), in place."""
    b, hkv, m, d = state.S.shape
    kf = kf.to(state.S.dtype) * valid[:, None, :, None].to(state.S.dtype)
    # one batched rank-1 update: no (B, Hkv, m, d) temporary
    state.S.view(b * hkv, m, d).baddbmm_(kf.reshape(b * hkv, 1, m).transpose(1, 2), v.to(state.S.dtype).reshape(b * hkv, 1, d))
    state.z.add_(kf[:, :, 0])


def advance_state(state: HybridState, k, v, kf, valid=None, *, fold: bool = True) -> None:
    """Append one token (k/v (B, Hkv, 1, d), kf (B, Hkv, 1, m), valid (B, 1)) to the state, in place.

    The key in the write slot leaves the window: it is folded into S, z (an empty slot adds zero; `fold=False` when a
    fused kernel already did), then the new key takes its place. Only shapes decide the Python control flow, so this
    can run inside a captured CUDA graph.
    """
    if valid is None:
        valid = _ones_valid(k)
    sink_k, sink_v, sink_valid = sinks_after(state, k, v, valid)
    state.sink_k.copy_(sink_k)
    state.sink_v.copy_(sink_v)
    state.sink_valid.copy_(sink_valid)
    ring = state.buf_k.shape[2]
    if ring == 0:  # window 1: the new key leaves the window at once
        if fold:
            _fold(state, kf, v, valid)
    else:
        slot = state.slot
        if fold:
            _fold(state, state.buf_kf.index_select(2, slot), state.buf_v.index_select(2, slot), state.buf_valid.index_select(1, slot))
        state.buf_k.index_copy_(2, slot, k.to(state.buf_k.dtype))
        state.buf_v.index_copy_(2, slot, v.to(state.buf_v.dtype))
        state.buf_kf.index_copy_(2, slot, kf.to(state.buf_kf.dtype))
        state.buf_valid.index_copy_(1, slot, valid)
        state.slot.copy_((slot + 1) % ring)
    state.seen += 1


def decode_step(state: HybridState, q, k, v, qf, kf, *, modes, valid=None, **kwargs) -> dict[str, torch.Tensor]:
    """One token: the output of each component mode in `modes` (all against the state before the token), then the
    token appended in place. `kwargs` are `decode_output`'s (scale, weight, rule, placement, softcap)."""
    outs = {mode: decode_output(state, q, k, v, qf, kf, mode=mode, valid=valid, **kwargs) for mode in modes}
    advance_state(state, k, v, kf, valid)
    return outs
