"""Recurrent decoding: a fixed-shape state per layer, read by the one-token output and advanced in place.

After n tokens the state holds
  S, z    sum of phi(k_s) v_s^T and phi(k_s) over keys s <= n - w (older than the next query's window),
  ring    w - 1 slots holding the last min(n, w - 1) keys, values, key features; empty slots are marked invalid,
          and `slot` (a device tensor) is where the next key goes: the oldest key once the ring is full,
  sinks   the first max(num_sinks, softmax_sinks) valid keys and values: 'sinks_only' reads num_sinks of them, the
          softmax sinks (softmax_sinks > 0) the first softmax_sinks, with their key features (sink_kf),
and, with softmax sinks or sparse memory on,
  left_count  how many valid keys have left the window (the first softmax_sinks of them are the sinks, which
          stay out of S, z: the linear branch adds them one by one where it covers all keys),
  memory  the sparse memory's m exact keys and the pending keys of the current block (`memory.SparseMemory`);
          then S, z hold only L_B of the reference's definition, and the boundary step runs every memory_block tokens.
Neither its size nor its tensors' addresses depend on n, and no step reads a Python value that changes with n,
so one decoding step can be captured in a CUDA graph and replayed (`linearize.attention.graph_decode`) -- except
with sparse memory, whose boundary step runs on some tokens only.
Every component mode can be computed from it, so switching modes between generate calls needs no re-prefill.

A step (`decode_step`) is `decode_output` for each component mode needed (reads the state), then `advance_state`
(once; in place).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from linearize.attention.common import (
    check_mode, combine, expand_weight, first_valid, group_queries, masked_softmax_sums, safe_div, sink_positions,
    softcapped, ungroup,
)
from linearize.attention.memory import SparseMemory, memory_boundary, memory_walk


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
    num_sinks: int | None = None  # sinks 'sinks_only' reads (None: all slots)
    softmax_sinks: int = 0
    sink_kf: torch.Tensor | None = None  # (B, Hkv, n, m), with softmax sinks
    left_count: torch.Tensor | None = None  # (B, 1) long, with softmax sinks or sparse memory
    memory: SparseMemory | None = None

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.sink_kf, self.left_count) if t is not None]
        return ([self.S, self.z, self.buf_k, self.buf_v, self.buf_kf, self.buf_valid, self.sink_k, self.sink_v, self.sink_valid]
                + extra + (self.memory.tensors() if self.memory is not None else []))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select(self, rows: torch.Tensor) -> "HybridState":
        """Rows of the batch (beam search reordering, batch selection); all rows share the ring position."""
        pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        names = ("S", "z", "buf_k", "buf_v", "buf_kf", "buf_valid", "sink_k", "sink_v", "sink_valid", "sink_kf", "left_count")
        return replace(self, **{n: pick(getattr(self, n)) for n in names}, slot=self.slot.clone(),
                       memory=None if self.memory is None else self.memory.index_select(rows))


def _pad_slots(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x with zeros appended along `dim` up to n entries."""
    extra = n - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def prefill_state(k, v, kf, valid, *, window: int, num_sinks: int, softmax_sinks: int = 0, sparse_memory: int = 0,
                  memory_block: int = 64) -> HybridState:
    """The state after a whole prompt (k/v (B, Hkv, T, d), kf (B, Hkv, T, m), valid (B, T))."""
    b, hkv, t, d = k.shape
    m = kf.shape[-1]
    f32 = torch.promote_types(k.dtype, torch.float32)
    extras = softmax_sinks > 0 or sparse_memory > 0
    n_old = max(t - window + 1, 0)  # keys 0 .. t - w
    sinks = first_valid(valid, softmax_sinks)
    memory = None
    if sparse_memory:
        candidate = valid & ~sinks
        *_, (S, z, slots) = memory_walk(k, v, kf, candidate, window=window, block=memory_block, slots=sparse_memory,
                                        blocks=t // memory_block + 1, dtype=f32)
        # pending: the keys that left the window since the last boundary, shifted layout as in memory_walk
        start, count = t // memory_block * memory_block, t % memory_block
        pend = [_pad_slots(F.pad(x, (0, 0, window - 1, 0))[:, :, start:start + count], memory_block, 2) for x in (k, v, kf)]
        pvalid = _pad_slots(F.pad(candidate, (window - 1, 0))[:, start:start + count], memory_block, 1)
        memory = SparseMemory(*slots, *pend, pvalid)
    else:
        kf_valid = kf.to(f32) * (valid & ~sinks)[:, None, :, None]
        S = torch.einsum("bhsm,bhsd->bhmd", kf_valid[:, :, :n_old], v[:, :, :n_old].to(f32)).contiguous()
        z = kf_valid[:, :, :n_old].sum(2)
    ring = window - 1
    keep = min(t, ring)
    # the kept keys fill slots 0 .. keep-1 in time order, so the next slot is keep (or 0, the oldest, when full)
    buf_k, buf_v = k.new_zeros(b, hkv, ring, d), v.new_zeros(b, hkv, ring, d)
    buf_kf, buf_valid = kf.new_zeros(b, hkv, ring, m), valid.new_zeros(b, ring)
    buf_k[:, :, :keep], buf_v[:, :, :keep] = k[:, :, t - keep:], v[:, :, t - keep:]
    buf_kf[:, :, :keep], buf_valid[:, :keep] = kf[:, :, t - keep:], valid[:, t - keep:]
    n_sinks = max(num_sinks, softmax_sinks)
    idx, sink_valid = sink_positions(valid, n_sinks)
    take = lambda x: _pad_slots(x.gather(2, idx[:, None, :, None].expand(b, hkv, idx.shape[1], x.shape[-1])), n_sinks, 2)  # noqa: E731
    return HybridState(
        S=S, z=z, buf_k=buf_k, buf_v=buf_v, buf_kf=buf_kf, buf_valid=buf_valid, sink_k=take(k), sink_v=take(v),
        sink_valid=_pad_slots(sink_valid, n_sinks, 1), slot=torch.tensor([keep % ring if ring else 0], device=k.device), seen=t,
        num_sinks=num_sinks, softmax_sinks=softmax_sinks, sink_kf=take(kf) if softmax_sinks else None,
        left_count=valid[:, :n_old].sum(1, keepdim=True) if extras else None, memory=memory,
    )


def _ones_valid(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)


def sinks_after(state: HybridState, k, v, valid, kf=None):
    """The sinks once this token is seen: it joins when fewer than n valid tokens came before it (n = the slots).
    Keys, values, validity and, given `kf` and a state with softmax sinks, key features."""
    count = state.sink_valid.sum(1, keepdim=True)  # (B, 1)
    slot = torch.arange(state.sink_valid.shape[1], device=k.device)[None, :]
    becomes = (slot == count) & valid  # (B, n)
    sel = becomes[:, None, :, None]
    out = torch.where(sel, k, state.sink_k), torch.where(sel, v, state.sink_v), state.sink_valid | becomes
    return out + (torch.where(sel, kf, state.sink_kf),) if kf is not None and state.sink_kf is not None else out


def _keymask(mask: torch.Tensor) -> torch.Tensor:
    """A key mask (B, L) or per KV head (B, Hkv, L) -> broadcastable against (B, Hkv, G, 1, L)."""
    return mask[:, None, None, None, :] if mask.dim() == 2 else mask[:, :, None, None, :]


def _softmax_sums(q, keys, values, mask, scale, softcap):
    """q (B, Hq, 1, d) against keys (B, Hkv, L, d) with mask (B, L) or (B, Hkv, L)."""
    hkv = keys.shape[1]
    logits = softcapped(torch.einsum("bhgtd,bhsd->bhgts", group_queries(q, hkv), keys) * scale, softcap)
    num, den, _ = masked_softmax_sums(logits, _keymask(mask), values, "bhgts,bhsd->bhgtd")
    return ungroup(num), ungroup(den)


def _linear_sums(qf, S, z, window=None):
    """qf against the state S, z and, when given, further keys (kf, v, valid) one by one."""
    hkv = S.shape[1]
    qg = group_queries(qf, hkv)
    num = torch.einsum("bhgtm,bhmd->bhgtd", qg, S)
    den = torch.einsum("bhgtm,bhm->bhgt", qg, z)
    if window is not None:  # S + sum_s kf_s v_s^T without forming that (B, Hkv, m, d) sum
        kf, v, valid = window
        a = torch.einsum("bhgtm,bhsm->bhgts", qg, kf) * _keymask(valid)
        num = num + torch.einsum("bhgts,bhsd->bhgtd", a, v)
        den = den + a.sum(-1)
    return ungroup(num), ungroup(den)


def _join(sets, f32):
    """Key sets [(k, v, kf, mask (B, L) or (B, Hkv, L))] -> one (k, v, kf, mask (B, Hkv, L)) in fp32."""
    b, hkv = sets[0][0].shape[:2]
    k, v, kf = (torch.cat([s[i] for s in sets], 2).to(f32) for i in range(3))
    mask = torch.cat([m if m.dim() == 3 else m[:, None].expand(b, hkv, m.shape[-1]) for *_, m in sets], 2)
    return k, v, kf, mask


def _extended_output(state: HybridState, qc, qfc, k, v, kf, valid, *, scale, weight, rule, placement, mode, softcap, f32):
    """decode_output with softmax sinks and/or sparse memory: the key sets of the reference's definition."""
    window = [(state.buf_k, state.buf_v, state.buf_kf, state.buf_valid), (k, v, kf, valid)]
    sinks = []  # softmax sinks that have left the window (the others are in it)
    if state.softmax_sinks:
        n = state.softmax_sinks
        left = state.sink_valid[:, :n] & (torch.arange(n, device=k.device)[None, :] < state.left_count)
        sinks.append((state.sink_k[:, :, :n], state.sink_v[:, :, :n], state.sink_kf[:, :, :n], left))
    mem = state.memory
    exact = [] if mem is None else [(mem.k, mem.v, mem.kf, mem.valid), (mem.pend_k, mem.pend_v, mem.pend_kf, mem.pend_valid)]
    if mode == "la_only" or (mode == "hybrid" and placement == "overlap"):
        _, av, akf, amask = _join(sinks + exact + window, f32)  # every key so far: S + these
        la = _linear_sums(qfc, state.S, state.z, (akf, av, amask))
        if mode == "la_only":
            return safe_div(*la)
    else:
        la = _linear_sums(qfc, state.S, state.z)
    sk, sv, _, smask = _join(sinks + window if mode == "swa_only" else sinks + exact + window, f32)
    swa = _softmax_sums(qc, sk, sv, smask, scale, softcap)
    if mode == "swa_only":
        return safe_div(*swa)
    return combine(rule, expand_weight(weight, qc.shape[0], qc.shape[1], 1, qc), swa, la)


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
        n = state.sink_valid.shape[1] if state.num_sinks is None else state.num_sinks
        sink_k, sink_v, sink_valid = sink_k[:, :, :n], sink_v[:, :, :n], sink_valid[:, :n]
        return safe_div(*_softmax_sums(qc, sink_k.to(f32), sink_v.to(f32), sink_valid, scale, softcap)).to(q.dtype)
    if state.left_count is not None:
        return _extended_output(state, qc, qfc, k, v, kf, valid, scale=scale, weight=weight, rule=rule,
                                placement=placement, mode=mode, softcap=softcap, f32=f32).to(q.dtype)
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


def _leave(state: HybridState, k, v, kf, valid) -> None:
    """With softmax sinks or sparse memory: the key (k, v, kf, valid) leaving the window goes where the reference
    puts it -- nowhere if it is a softmax sink, else the pending block (then, at a boundary, memory or S, z) or,
    without memory, S and z."""
    keep = valid
    if state.softmax_sinks:  # the first softmax_sinks valid keys to leave are the sinks
        keep = valid & (state.left_count >= state.softmax_sinks)
    state.left_count.add_(valid.to(state.left_count.dtype))
    mem = state.memory
    if mem is None:
        _fold(state, kf, v, keep)
        return
    block = mem.pend_valid.shape[1]
    i = state.seen % block  # the pending slot of the key leaving as token `seen` arrives
    for buf, x in ((mem.pend_k, k), (mem.pend_v, v), (mem.pend_kf, kf)):
        buf[:, :, i:i + 1].copy_(x)
    mem.pend_valid[:, i:i + 1].copy_(keep)
    if (state.seen + 1) % block == 0:  # the next query starts a block: its boundary step
        S, z, slots = memory_boundary(state.S, state.z, mem.slots, (mem.pend_k, mem.pend_v, mem.pend_kf, mem.pend_valid))
        for dst, src in zip((state.S, state.z) + mem.slots, (S, z) + slots):
            dst.copy_(src)
        mem.pend_valid.zero_()


def advance_state(state: HybridState, k, v, kf, valid=None, *, fold: bool = True) -> None:
    """Append one token (k/v (B, Hkv, 1, d), kf (B, Hkv, 1, m), valid (B, 1)) to the state, in place.

    The key in the write slot leaves the window: it is folded into S, z (an empty slot adds zero; `fold=False` when a
    fused kernel already did), then the new key takes its place. Only shapes decide the Python control flow, so this
    can run inside a captured CUDA graph (not with sparse memory: its boundary step runs every memory_block tokens).
    """
    if valid is None:
        valid = _ones_valid(k)
    extended = state.left_count is not None
    if extended and not fold:
        raise ValueError("softmax sinks and sparse memory place the leaving key themselves; fold=False is not supported")
    for dst, src in zip((state.sink_k, state.sink_v, state.sink_valid, state.sink_kf), sinks_after(state, k, v, valid, kf)):
        dst.copy_(src)
    ring = state.buf_k.shape[2]
    if ring == 0:  # window 1: the new key leaves the window at once
        if extended:
            _leave(state, k, v, kf, valid)
        elif fold:
            _fold(state, kf, v, valid)
    else:
        slot = state.slot
        if extended:
            _leave(state, *(x.index_select(2, slot) for x in (state.buf_k, state.buf_v, state.buf_kf)),
                   state.buf_valid.index_select(1, slot))
        elif fold:
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
