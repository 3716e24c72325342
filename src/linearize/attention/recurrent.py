"""Recurrent decoding: a fixed-shape state per layer, read by the one-token output and advanced in place.

After n tokens the state holds
  linear  the linear branch's state (`attention.linear`). Kind 'sum' (additive): one (S, z), the sum of
          phi(k_s) v_s^T and phi(k_s) over keys s <= n - w (older than the next query's window); the modes that cover
          the window's keys too add them from the ring at read time. Other kinds: one `LinearSlot` per lag the layer's
          modes need at prefill (w for 'complementary' hybrid, 0 for 'la_only' / 'overlap'), each the kind's state
          after steps 0 .. n-1 plus, for lag w, the key that enters at the next step (the one that just left the ring);
          each decoding step first advances these states (`step_linear`: decay, key enters, query reads),
  ring    w - 1 slots holding the last min(n, w - 1) keys, values, key features; empty slots are marked invalid,
          and `slot` (a device tensor) is where the next key goes: the oldest key once the ring is full,
  sinks   the first max(num_sinks, softmax_sinks) valid keys and values: 'sinks_only' reads num_sinks of them, the
          softmax sinks (softmax_sinks > 0) the first softmax_sinks, with their key features (sink_kf),
and, with softmax sinks or sparse memory on,
  left_count  how many valid keys have left the window (the first softmax_sinks of them are the sinks, which
          stay out of S, z: the linear branch adds them one by one where it covers all keys),
  memory  the sparse memory's m exact keys and the pending keys of the current block (`memory.SparseMemory`);
          kind 'sum': S, z hold only L_B of the reference's definition, and the boundary step runs every
          memory_block tokens at the end of a step (`advance_state`); other kinds (decoding 'hybrid'): the lag-w
          `LinearSlot` holds the reference's state L with no pending key of its own ('overlap': beside the lag-0
          state that the linear branch reads), and the boundary step runs in `step_linear` after the decay of the
          step it starts. Under memory_select 'query' the memory is chosen once by `prefill_selecting` and stays
          fixed (no pending block: zero slots); the complementary state (S, z, or the lag-w slot) never took the
          kept keys in, and keys leaving the window later enter it as they do without memory (memory_fill: they take the
          memory's free slots first, `_fill_free_slot`),
and, with the q/k convolution (qk_conv = K > 0),
  conv_q, conv_k  the last K - 1 queries and keys (padding as zeros) the convolution reads besides the new token;
          the layer rolls them in place at each step (`HybridAttention.features`).
Neither its size nor its tensors' addresses depend on n, and no step reads a Python value that changes with n,
so one decoding step can be captured in a CUDA graph and replayed (`linearize.attention.graph_decode`). Kind 'sum'
with a 'recall' memory keeps its block position on the device (`memory_slot`); with `boundary_every_step` the
boundary step runs on every token and is committed by masked copies only where a block ends, so it is captured too
(the other kinds' memory step still branches on the host counter).
Every component mode can be computed from it, so switching modes between generate calls needs no re-prefill.

A step (`decode_step`) is `decode_output` for each component mode needed (reads the state), then `advance_state`
(once; in place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from linearize.attention.common import (
    combine,
    expand_weight,
    first_valid,
    group_queries,
    masked_softmax_sums,
    safe_div,
    sink_positions,
    ungroup,
)
from linearize.attention.linear import linear_state as linear_state_kind
from linearize.attention.linear import sum as sum_kind
from linearize.attention.linear.common import KVState, shift_time
from linearize.attention.memory import (
    SparseMemory,
    ages_after_entry,
    frozen_slots,
    kept_out,
    memory_boundary,
    memory_kind,
    memory_walk,
    select_by_query,
)
from linearize.attention.spec import AttentionSpec
from linearize.config import ComponentMode, component_mode


@dataclass
class LinearSlot:
    """A non-additive kind's state for one lag, and (lag > 0) the key entering it at the next step."""

    lag: int
    state: Any
    pend_kf: torch.Tensor | None = None  # (B, Hkv, m)
    pend_v: torch.Tensor | None = None  # (B, Hkv, d)
    pend_beta: torch.Tensor | None = None  # (B, Hkv), kinds with beta
    pend_enter: torch.Tensor | None = None  # (B,)

    def pending(self) -> list[torch.Tensor]:
        return [t for t in (self.pend_kf, self.pend_v, self.pend_beta, self.pend_enter) if t is not None]

    def tensors(self) -> list[torch.Tensor]:
        return self.state.tensors() + self.pending()

    def index_select(self, rows: torch.Tensor) -> "LinearSlot":
        pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        return LinearSlot(self.lag, self.state.index_select(rows), *(pick(t) for t in
                          (self.pend_kf, self.pend_v, self.pend_beta, self.pend_enter)))


@dataclass
class HybridState:
    linear: Any  # kind 'sum': a KVState (S (B, Hkv, m, d), z (B, Hkv, m)); other kinds: a tuple of LinearSlot
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
    kind: str = "sum"
    buf_beta: torch.Tensor | None = None  # (B, Hkv, w - 1) fp32: the ring keys' beta, kinds with beta
    conv_q: torch.Tensor | None = None  # (B, Hq, K - 1, d), with qk_conv = K
    conv_k: torch.Tensor | None = None  # (B, Hkv, K - 1, d)
    # the deferred fold of the fused decode step (attention/triton/decode.py, TUNING['fold_every'] = F > 1): keys that
    # left the window but are not yet in S, z; the linear sums are S, z plus these (`linear_sums`). Every other path
    # folds them first (`flush_pending`, in `fused_step`).
    pend_kf: torch.Tensor | None = None  # (B, Hkv, F, m)
    pend_v: torch.Tensor | None = None  # (B, Hkv, F, d)
    pend_keep: torch.Tensor | None = None  # (B, F) bool: the entry enters S, z (not an empty slot or a softmax sink)
    pend_count: torch.Tensor | None = None  # (1,) long: entries in use (0 .. F-1), shared by the rows as `slot` is
    memory_select: str = "recall"  # the rule that chose `memory`; 'query': fixed since the prefill
    # 'query' with memory_fill: a leaving key takes the memory's first free slot (if any) before the linear state;
    # fill_in_state (memory_in_state): it enters the state as well, as the kept keys did
    memory_fill: bool = False
    fill_in_state: bool = False
    # kind 'sum' with a 'recall' memory: the pending slot of the next key to leave (seen % memory_block) on the device,
    # so a captured step finds its slot and its boundary without the host counter
    memory_slot: torch.Tensor | None = None  # (1,) long, shared by the rows and, as `slot`, left out of tensors()
    # run the memory's boundary step on every token and commit it where `memory_slot` says a block ends (what a
    # captured step replays; set by GraphDecoder); False: only on the tokens the host counter names (cheaper eagerly)
    boundary_every_step: bool = False

    @property
    def memory_fixed(self) -> bool:
        """The memory was chosen at prefill ('query') and no longer changes: leaving keys enter the linear state."""
        return self.memory is not None and self.memory_select == "query"

    @property
    def additive(self) -> bool:
        """The registry's word: an additive state (S, z) is read together with the ring's keys."""
        return linear_state_kind(self.kind).additive

    def _sum_state(self) -> KVState:
        if not self.additive:
            raise ValueError(f"this decode path (Triton kernels, CUDA-graph capture) holds the 'sum' linear state only; "
                             f"linear_state={self.kind!r} decodes eagerly with backend 'auto' or 'torch'")
        return self.linear

    @property
    def S(self) -> torch.Tensor:
        return self._sum_state().S

    @property
    def z(self) -> torch.Tensor:
        return self._sum_state().z

    def linear_tensors(self) -> list[torch.Tensor]:
        if self.additive:
            return self.linear.tensors()
        return [t for slot in self.linear for t in slot.tensors()] + ([self.buf_beta] if self.buf_beta is not None else [])

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.sink_kf, self.left_count, self.conv_q, self.conv_k, self.pend_kf, self.pend_v,
                             self.pend_keep, self.pend_count) if t is not None]
        return (self.linear_tensors() + [self.buf_k, self.buf_v, self.buf_kf, self.buf_valid, self.sink_k, self.sink_v, self.sink_valid]
                + extra + (self.memory.tensors() if self.memory is not None else []))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select(self, rows: torch.Tensor) -> "HybridState":
        """Rows of the batch (beam search reordering, batch selection); all rows share the ring position."""
        pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        names = ("buf_k", "buf_v", "buf_kf", "buf_valid", "sink_k", "sink_v", "sink_valid", "sink_kf", "left_count", "buf_beta",
                 "conv_q", "conv_k", "pend_kf", "pend_v", "pend_keep")
        linear = self.linear.index_select(rows) if self.additive else tuple(s.index_select(rows) for s in self.linear)
        return replace(self, linear=linear, **{n: pick(getattr(self, n)) for n in names}, slot=self.slot.clone(),
                       pend_count=None if self.pend_count is None else self.pend_count.clone(),
                       memory_slot=None if self.memory_slot is None else self.memory_slot.clone(),
                       memory=None if self.memory is None else self.memory.index_select(rows))


def _pending_terms(state: HybridState):
    """The deferred keys' sum terms (kf_j, v_j) with kf zeroed where an entry is unused or stays out of S, z."""
    f = state.pend_keep.shape[1]
    used = (torch.arange(f, device=state.pend_keep.device)[None, :] < state.pend_count) & state.pend_keep  # (B, F)
    S = state.S
    return state.pend_kf.to(S.dtype) * used[:, None, :, None].to(S.dtype), state.pend_v.to(S.dtype)


def linear_sums(state: HybridState) -> tuple[torch.Tensor, torch.Tensor]:
    """S, z of the 'sum' state as the definition has them: with the deferred keys folded in (new tensors), or the
    state's own S, z where nothing is deferred."""
    if state.pend_count is None:
        return state.S, state.z
    kf, v = _pending_terms(state)
    return state.S + torch.einsum("bhfm,bhfd->bhmd", kf, v), state.z + kf.sum(2)


def flush_pending(state: HybridState) -> None:
    """Fold the deferred keys (see HybridState) into S, z in place and empty the list; shapes only decide what runs,
    so a CUDA graph can capture it. Nothing where nothing is deferred."""
    if state.pend_count is None:
        return
    kf, v = _pending_terms(state)
    b, hkv, f, m = kf.shape
    S = state.S
    S.view(b * hkv, m, -1).baddbmm_(kf.reshape(b * hkv, f, m).transpose(1, 2), v.reshape(b * hkv, f, -1))
    state.z.add_(kf.sum(2))
    state.pend_count.zero_()


def _pad_slots(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x with zeros appended along `dim` up to n entries."""
    extra = n - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def _kind_final_state(kind, kf, v, *, log_decay, beta, enter, lag):
    """The kind's state after the whole prompt: its closed form, or its step run over the prompt."""
    if kind.final_state is not None:
        return kind.final_state(kf, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag)
    b, hkv, t, m = kf.shape
    state = kind.init_state(b, hkv, m, v.shape[-1], dtype=kf.dtype, device=kf.device)
    entered, vs = shift_time(kf, lag), shift_time(v, lag)
    enter_at, beta_at = shift_time(enter, lag, dim=1), None if beta is None else shift_time(beta, lag)
    qf0 = kf.new_zeros(b, hkv, m)  # reads are not needed here
    for i in range(t):
        kind.step(state, qf0, entered[:, :, i], vs[:, :, i], log_decay_t=None if log_decay is None else log_decay[:, :, i],
                  beta_in=None if beta_at is None else beta_at[:, :, i], enter_in=enter_at[:, i])
    return state


def _prefill_slots(kind, kf, v, valid, sinks, *, lags, window, log_decay, beta, lagged_kf=None, lagged_enter=None):
    """`lagged_kf`: the features the lag-w (complementary) state reads, where they differ from kf (the memory's
    kept keys zeroed under 'query'); `lagged_enter`: the keys that enter it, where they are not the valid non-sink
    ones (under 'query', not those every KV head keeps)."""
    kf, v = kf.float(), v.float()
    lagged_kf = kf if lagged_kf is None else lagged_kf.float()
    t = kf.shape[2]
    slots = []
    for lag in sorted(lags):
        if lag not in (0, window):
            raise ValueError(f"linear-state lag {lag}: expected 0 or the window {window}")
        enter = (valid & ~sinks if lagged_enter is None else lagged_enter) if lag else valid  # 'complementary' leaves the softmax sinks out
        feats = lagged_kf if lag else kf
        state = _kind_final_state(kind, feats, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag)
        slot = LinearSlot(lag, state)
        if lag:  # key t - lag enters at the next step (none yet: an empty key that may not enter)
            i = t - lag
            # (shapes without indexing: a prefill may hold no token at all, e.g. a prompt read again whole)
            slot.pend_kf, slot.pend_v = (x[:, :, i].clone() if i >= 0 else x.new_zeros(x.shape[:2] + x.shape[3:])
                                         for x in (feats, v))
            if beta is not None:
                slot.pend_beta = beta[:, :, i].float().clone() if i >= 0 else beta.new_zeros(beta.shape[:2], dtype=torch.float32)
            slot.pend_enter = enter[:, i].clone() if i >= 0 else valid.new_zeros(valid.shape[:1])
        slots.append(slot)
    return tuple(slots)


def _pending_block(k, v, kf, candidate, beta, *, start: int, spec: AttentionSpec):
    """(k, v, kf, valid (B, C), beta or None) of the pending block after a prompt of T tokens: the keys that left
    the window at the end of tokens start .. T-1 (keys start - w + 1 .. T - w), in slots 0 .., zeros after them."""
    t, window, block = k.shape[2], spec.window, spec.memory_block
    count = t - start
    shifted = lambda x, dim: _pad_slots(F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (window - 1, 0)).narrow(dim, start, count), block, dim)  # noqa: E731
    return (*(shifted(x, 2) for x in (k, v, kf)), shifted(candidate, 1),
            None if beta is None else shifted(beta.float(), 2))


def _prefill_memory(kind, k, v, kf, candidate, *, spec: AttentionSpec, log_decay, beta, dtype):
    """The decaying kinds' memory after a prompt of T tokens: (the state L at step T - 1, the SparseMemory). The
    boundaries up to B(T - 1) ran (the one at T, if T is one, runs in the next `step_linear`, which knows a_T)."""
    t, block = k.shape[2], spec.memory_block
    blocks = (t - 1) // block + 1 if t else 1
    start = (blocks - 1) * block  # the last boundary the prompt crossed
    log_decay = log_decay if kind.needs_log_decay else None
    beta = beta if kind.needs_beta else None
    *_, (state, slots) = memory_walk(k, v, kf, candidate, kind=kind, window=spec.window, block=block,
                                     slots=spec.sparse_memory, blocks=blocks, log_decay=log_decay, beta=beta, dtype=dtype)
    pend_k, pend_v, pend_kf, pend_valid, pend_beta = _pending_block(k, v, kf, candidate, beta, start=start, spec=spec)
    age, pend_age = slots[4], None
    if log_decay is not None:  # decay through steps start + 1 .. T - 1; a pending key ages from its entry step on
        steps = log_decay.float()[..., start + 1:t]
        state = kind.decayed(state, steps.sum(-1))
        age = age + steps.sum(-1, keepdim=True)
        pend_age = _pad_slots(ages_after_entry(F.pad(steps, (0, 1)))[..., :t - start], block, 2)
    return state, SparseMemory(*slots[:4], pend_k, pend_v, pend_kf, pend_valid, age=age, pend_age=pend_age,
                               beta=slots[5], pend_beta=pend_beta)


def _no_pending(k, v, kf):
    """The pending block of a fixed memory: zero slots (k, v, kf (B, Hkv, 0, .), valid (B, 0))."""
    b, hkv = k.shape[:2]
    return (k.new_zeros(b, hkv, 0, k.shape[-1]), v.new_zeros(b, hkv, 0, v.shape[-1]), kf.new_zeros(b, hkv, 0, kf.shape[-1]),
            torch.zeros(b, 0, dtype=torch.bool, device=k.device))


def prefill_state(k, v, kf, valid, *, spec: AttentionSpec, lags=(), log_decay=None, beta=None,
                  conv_history=None, selected=None) -> HybridState:
    """The state after a whole prompt (k/v (B, Hkv, T, d), kf (B, Hkv, T, m), valid (B, T)).
    `conv_history`: with the q/k convolution, the prompt's last K - 1 queries and keys (`common.causal_conv`).

    Kinds other than 'sum': `lags` are the lags of the linear states to keep (`ComponentMode.linear_lag` of the modes
    to decode), log_decay / beta (B, Hkv, T) the layer's gates of the prompt.
    memory_select 'query': `selected` (B, Hkv, T) are the keys the memory keeps (`memory.select_by_query`, among the
    valid keys 0 .. T - w outside the softmax sinks); `prefill_selecting` chooses them."""
    window, num_sinks, softmax_sinks = spec.window, spec.num_sinks, spec.softmax_sinks
    sparse_memory, memory_block, linear_state = spec.sparse_memory, spec.memory_block, spec.linear_state
    kind = linear_state_kind(linear_state)
    b, hkv, t, d = k.shape
    m = kf.shape[-1]
    f32 = torch.promote_types(k.dtype, torch.float32)
    extras = softmax_sinks > 0 or sparse_memory > 0
    n_old = max(t - window + 1, 0)  # keys 0 .. t - w
    sinks = first_valid(valid, softmax_sinks)
    memory, memory_slot = None, None
    if spec.selects_at_prefill:
        if selected is None:
            raise ValueError("memory_select='query' chooses the memory from the prompt's queries: prefill with "
                             "recurrent.prefill_selecting (or pass selected=)")
        outside = (valid & ~sinks & (torch.arange(t, device=k.device) < n_old))[:, None]
        if selected.shape != (b, hkv, t) or (selected & ~outside).any() or (selected.sum(-1) > sparse_memory).any():
            raise ValueError(f"selected must be a (B, Hkv, T) = {(b, hkv, t)} mask of at most sparse_memory="
                             f"{sparse_memory} valid keys per row and KV head, outside the window and the sinks")
        memory = SparseMemory(*frozen_slots(k, v, kf, selected, sparse_memory), *_no_pending(k, v, kf))
    elif sparse_memory:
        memory_kind(spec)  # refuses what the memory does not cover
    # the features the complementary state takes in: under 'query' the kept keys' are zero (they never enter), unless
    # memory_in_state keeps them in it too (the state as trained, which had no query memory)
    lagged_kf, lagged_enter = kf, None
    if memory is not None and not spec.memory_in_state:
        lagged_kf, lagged_enter = kept_out(kf, valid & ~sinks, selected)
    if not kind.additive:
        # the memory's state L, held as the lag-w state: where 'hybrid' may be decoded ('complementary': its lag is w;
        # 'overlap': any lag, 0, as 'la_only' has, so a cache prefilled for 'la_only' alone carries it too)
        hybrid_decoded = window in lags if spec.placement == "complementary" else bool(lags)
        memory_lag = window if sparse_memory and hybrid_decoded and not spec.selects_at_prefill else None
        linear = _prefill_slots(kind, kf, v, valid, sinks, lags=set(lags) - {memory_lag}, window=window,
                                log_decay=log_decay, beta=beta, lagged_kf=lagged_kf, lagged_enter=lagged_enter)
        if memory_lag is not None:
            state, memory = _prefill_memory(kind, k, v, kf, valid & ~sinks, spec=spec, log_decay=log_decay, beta=beta,
                                            dtype=f32)
            linear = tuple(sorted(linear + (LinearSlot(memory_lag, state),), key=lambda slot: slot.lag))
    elif sparse_memory and not spec.selects_at_prefill:
        # the boundary at t, if t is one, runs here (`advance_state` would have run it at the end of token t - 1)
        start = t // memory_block * memory_block
        *_, (linear, slots) = memory_walk(k, v, kf, valid & ~sinks, kind=kind, window=window, block=memory_block,
                                          slots=sparse_memory, blocks=start // memory_block + 1, dtype=f32)
        memory = SparseMemory(*slots[:4], *_pending_block(k, v, kf, valid & ~sinks, None, start=start, spec=spec)[:4])
        memory_slot = torch.tensor([t - start], device=k.device)
    else:
        kf_valid = lagged_kf.to(f32) * (valid & ~sinks)[:, None, :, None]
        S = torch.einsum("bhsm,bhsd->bhmd", kf_valid[:, :, :n_old], v[:, :, :n_old].to(f32)).contiguous()
        z = kf_valid[:, :, :n_old].sum(2)
        linear = KVState(S, z)
    ring = window - 1
    keep = min(t, ring)
    # the kept keys fill slots 0 .. keep-1 in time order, so the next slot is keep (or 0, the oldest, when full)
    buf_k, buf_v = k.new_zeros(b, hkv, ring, d), v.new_zeros(b, hkv, ring, d)
    buf_kf, buf_valid = kf.new_zeros(b, hkv, ring, m), valid.new_zeros(b, ring)
    buf_k[:, :, :keep], buf_v[:, :, :keep] = k[:, :, t - keep:], v[:, :, t - keep:]
    buf_kf[:, :, :keep], buf_valid[:, :keep] = kf[:, :, t - keep:], valid[:, t - keep:]
    buf_beta = None
    if kind.needs_beta:
        buf_beta = torch.zeros(b, hkv, ring, dtype=torch.float32, device=k.device)
        buf_beta[:, :, :keep] = beta[:, :, t - keep:].float()
    n_sinks = max(num_sinks, softmax_sinks)
    idx, sink_valid = sink_positions(valid, n_sinks)
    take = lambda x: _pad_slots(x.gather(2, idx[:, None, :, None].expand(b, hkv, idx.shape[1], x.shape[-1])), n_sinks, 2)  # noqa: E731
    return HybridState(
        linear=linear, buf_k=buf_k, buf_v=buf_v, buf_kf=buf_kf, buf_valid=buf_valid, sink_k=take(k), sink_v=take(v),
        sink_valid=_pad_slots(sink_valid, n_sinks, 1), slot=torch.tensor([keep % ring if ring else 0], device=k.device), seen=t,
        num_sinks=num_sinks, softmax_sinks=softmax_sinks, sink_kf=take(kf) if softmax_sinks else None,
        left_count=valid[:, :n_old].sum(1, keepdim=True) if extras else None, memory=memory,
        kind=linear_state, buf_beta=buf_beta, memory_select=spec.memory_select, memory_slot=memory_slot,
        memory_fill=spec.memory_fill and spec.selects_at_prefill, fill_in_state=spec.memory_in_state,
        conv_q=None if conv_history is None else conv_history[0].clone(memory_format=torch.contiguous_format),
        conv_k=None if conv_history is None else conv_history[1].clone(memory_format=torch.contiguous_format),
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


def _softmax_sums(q, keys, values, mask, scale):
    """q (B, Hq, 1, d) against keys (B, Hkv, L, d) with mask (B, L) or (B, Hkv, L)."""
    hkv = keys.shape[1]
    logits = torch.einsum("bhgtd,bhsd->bhgts", group_queries(q, hkv), keys) * scale
    num, den, _ = masked_softmax_sums(logits, _keymask(mask), values, "bhgts,bhsd->bhgtd")
    return ungroup(num), ungroup(den)


def _linear_read(state: HybridState, qf, extra, lag: int, reads):
    """The linear branch's sums for one query: kind 'sum' reads S, z plus `extra` keys (kf, v, mask) at read time;
    other kinds return what `step_linear` read from the state of that lag."""
    if reads is None:
        return sum_kind.read(state.linear, qf, extra)
    if lag not in reads:
        raise ValueError(f"this cache holds linear_state {state.kind!r} for lags {sorted(reads)} (the modes at prefill), "
                         f"not lag {lag}: start generation with an empty cache to decode in this mode")
    return reads[lag]


def _join(sets, f32):
    """Key sets [(k, v, kf, mask (B, L) or (B, Hkv, L))] -> one (k, v, kf, mask (B, Hkv, L)) in fp32."""
    b, hkv = sets[0][0].shape[:2]
    k, v, kf = (torch.cat([s[i] for s in sets], 2).to(f32) for i in range(3))
    mask = torch.cat([m if m.dim() == 3 else m[:, None].expand(b, hkv, m.shape[-1]) for *_, m in sets], 2)
    return k, v, kf, mask


def _extended_output(state: HybridState, qc, qfc, k, v, kf, valid, spec: AttentionSpec, *, mode: ComponentMode, weight,
                     f32, reads=None):
    """decode_output with softmax sinks and/or sparse memory: the key sets of the reference's definition."""
    window = [(state.buf_k, state.buf_v, state.buf_kf, state.buf_valid), (k, v, kf, valid)]
    sinks = []  # softmax sinks that have left the window (the others are in it)
    if state.softmax_sinks:
        n = state.softmax_sinks
        left = state.sink_valid[:, :n] & (torch.arange(n, device=k.device)[None, :] < state.left_count)
        sinks.append((state.sink_k[:, :, :n], state.sink_v[:, :, :n], state.sink_kf[:, :, :n], left))
    mem = state.memory
    exact = [] if mem is None else [(mem.k, mem.v, mem.kf, mem.valid), (mem.pend_k, mem.pend_v, mem.pend_kf, mem.pend_valid)]
    la = None
    lag = mode.linear_lag(spec.placement, state.buf_k.shape[2] + 1)
    if lag == 0:  # every key so far: S + these (a query memory kept in the state is in S already)
        in_state = mem is not None and state.memory_fixed and spec.memory_in_state
        _, av, akf, amask = _join(sinks + ([] if in_state else exact) + window, f32)
        la = _linear_read(state, qfc, (akf, av, amask), 0, reads)
        if not mode.uses_window:
            return safe_div(*la)
    elif lag is not None:
        la = _linear_read(state, qfc, None, lag, reads)
    # sparse memory's exact keys sit in the softmax branch only where the branches combine
    sk, sv, _, smask = _join(sinks + exact + window if mode.combines else sinks + window, f32)
    swa = _softmax_sums(qc, sk, sv, smask, spec.scale)
    if not mode.uses_linear:
        return safe_div(*swa)
    return combine(spec.rule, expand_weight(weight, qc.shape[0], qc.shape[1], 1, qc), swa, la)


def decode_output(
    state: HybridState, q, k, v, qf, kf, *, spec: AttentionSpec, mode: str | ComponentMode = "hybrid", weight=0.1,
    valid=None, reads=None,
) -> torch.Tensor:
    """One token's output (B, Hq, 1, d): q (B, Hq, 1, d), k/v (B, Hkv, 1, d), qf/kf features, valid (B, 1).

    The window is the ring plus the new key (slot order does not matter to the sums; the window size is the state's,
    set by `prefill_state` from the spec); the state is only read.
    `reads`: for kinds other than 'sum', the linear sums per lag of this token (`step_linear`).
    """
    mode = component_mode(mode)
    b, hq = q.shape[:2]
    f32 = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 at least
    if valid is None:
        valid = _ones_valid(q)
    qc, qfc = q.to(f32), qf.to(f32)
    if mode.no_branch:
        return torch.zeros_like(q)
    if mode.uses_sinks:
        sink_k, sink_v, sink_valid = sinks_after(state, k, v, valid)
        n = state.sink_valid.shape[1] if state.num_sinks is None else state.num_sinks
        sink_k, sink_v, sink_valid = sink_k[:, :, :n], sink_v[:, :, :n], sink_valid[:, :n]
        return safe_div(*_softmax_sums(qc, sink_k.to(f32), sink_v.to(f32), sink_valid, spec.scale)).to(q.dtype)
    if state.left_count is not None:
        return _extended_output(state, qc, qfc, k, v, kf, valid, spec, mode=mode, weight=weight, f32=f32,
                                reads=reads).to(q.dtype)
    win_v = torch.cat([state.buf_v, v], 2).to(f32)
    win_valid = torch.cat([state.buf_valid, valid], 1)
    # all keys so far = the state + the window (the current key included)
    all_keys = (torch.cat([state.buf_kf, kf], 2).to(f32), win_v, win_valid)
    lag = mode.linear_lag(spec.placement, state.buf_k.shape[2] + 1)
    if not mode.uses_window:
        out = safe_div(*_linear_read(state, qfc, all_keys, lag, reads))
    else:
        swa = _softmax_sums(qc, torch.cat([state.buf_k, k], 2).to(f32), win_v, win_valid, spec.scale)
        if not mode.uses_linear:
            out = safe_div(*swa)
        else:
            la = _linear_read(state, qfc, all_keys if lag == 0 else None, lag, reads)
            out = combine(spec.rule, expand_weight(weight, b, hq, 1, qc), swa, la)
    return out.to(q.dtype)


def _fold(state: HybridState, kf, v, valid, beta=None) -> None:
    """The key leaving the window (kf (B, Hkv, 1, m), v (B, Hkv, 1, d), valid (B, 1)) joins the linear state: added
    to S, z at once (kind 'sum'), or made the key that enters the lag-w state at the next step (other kinds)."""
    if state.additive:
        sum_kind.fold(state.linear, kf[:, :, 0], v[:, :, 0], valid[:, 0])
        return
    for slot in state.linear:
        if slot.lag:
            slot.pend_kf.copy_(kf[:, :, 0])
            slot.pend_v.copy_(v[:, :, 0])
            slot.pend_enter.copy_(valid[:, 0])
            if slot.pend_beta is not None:
                slot.pend_beta.copy_(beta[:, :, 0])


def step_linear(state: HybridState, qf, kf, v, valid, *, log_decay=None, beta=None) -> dict:
    """Kinds other than 'sum', once per token before its outputs: every held state takes its step (decay, the
    entering key: this token for lag 0, the pending one for lag w), read with qf. Returns {lag: (num, den)} with
    num (B, Hq, 1, d), den (B, Hq, 1). qf (B, Hq, 1, m), kf (B, Hkv, 1, m), log_decay / beta (B, Hkv, 1)."""
    kind = linear_state_kind(state.kind)
    reads = {}
    ld = None if log_decay is None else log_decay[:, :, 0].float()
    for slot in state.linear:
        if slot.lag and state.memory is not None and not state.memory_fixed:
            reads[slot.lag] = _memory_step(state, slot.state, kind, qf, ld)
            continue
        if slot.lag:
            kin, vin, bin_, ein = slot.pend_kf, slot.pend_v, slot.pend_beta, slot.pend_enter
        else:
            kin, vin, ein = kf[:, :, 0].float(), v[:, :, 0].float(), valid[:, 0]
            bin_ = None if beta is None else beta[:, :, 0].float()
        num, den = kind.step(slot.state, qf[:, :, 0].float(), kin, vin, log_decay_t=ld, beta_in=bin_, enter_in=ein)
        reads[slot.lag] = (num[:, :, None], den[:, :, None])
    return reads


def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, x in zip(dst, src):
        d.copy_(x)


def _memory_step(state: HybridState, linear, kind, qf, log_decay):
    """The decaying kinds with sparse memory, one step (the reference's loop): the state L and every kept or
    pending key age by this step's decay, the boundary runs if this step starts a block, then qf (B, Hq, 1, m)
    reads L. In place; returns (num (B, Hq, 1, d), den (B, Hq, 1))."""
    mem = state.memory
    block = mem.pend_valid.shape[1]
    if log_decay is not None and kind.decayed is not None:
        _copy_into(linear.tensors(), kind.decayed(linear, log_decay).tensors())
        mem.age.add_(log_decay[..., None])
        mem.pend_age.add_(log_decay[..., None])
        if state.seen:  # the key that left the window at the end of the last token enters at this step: age 0
            mem.pend_age[:, :, (state.seen - 1) % block].zero_()
    if state.seen and state.seen % block == 0:
        new, slots = memory_boundary(kind, linear, mem.slots, mem.pending)
        _copy_into(linear.tensors(), new.tensors())
        _copy_into([x for x in mem.slots if x is not None], [x for x in slots if x is not None])
        mem.pend_valid.zero_()
    return kind.read(linear, qf.float())


def _leave(state: HybridState, k, v, kf, valid, beta=None) -> None:
    """With softmax sinks or sparse memory: the key (k, v, kf, valid) leaving the window goes where the reference
    puts it -- nowhere if it is a softmax sink, else the pending block (then, at a boundary, memory or S, z) or,
    without memory or with a memory fixed at prefill ('query'), the linear state."""
    keep = valid
    if state.softmax_sinks:  # the first softmax_sinks valid keys to leave are the sinks
        keep = valid & (state.left_count >= state.softmax_sinks)
    state.left_count.add_(valid.to(state.left_count.dtype))
    mem = state.memory
    if mem is not None and state.memory_fill:
        kf, keep = _fill_free_slot(state, k, v, kf, keep)
    if mem is None or state.memory_fixed:
        _fold(state, kf, v, keep, beta)
        return
    block = mem.pend_valid.shape[1]
    if state.additive:
        _leave_sum_memory(state, k, v, kf, keep)
        return
    i = state.seen % block  # the pending slot of the key leaving as token `seen` arrives
    for buf, x in ((mem.pend_k, k), (mem.pend_v, v), (mem.pend_kf, kf)):
        buf[:, :, i:i + 1].copy_(x)
    mem.pend_valid[:, i:i + 1].copy_(keep)
    if mem.pend_beta is not None:
        mem.pend_beta[:, :, i:i + 1].copy_(beta)


def _fill_free_slot(state: HybridState, k, v, kf, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """memory_fill: the leaving key (k, v, kf (B, Hkv, 1, .), keep (B, 1)) takes the fixed memory's first free slot
    where it has one, per row and KV head, in place (masked writes: no branch on values, so a captured step replays
    it). Returns the features the linear state takes in -- zero where the key went to the memory -- and whether it
    enters (not where every KV head keeps it), unless the kept keys stay in the state (`fill_in_state`)."""
    mem = state.memory
    free = ~mem.valid  # (B, Hkv, m)
    into = free.any(-1, keepdim=True) & keep[:, :, None]  # (B, Hkv, 1)
    first = torch.arange(free.shape[-1], device=free.device) == free.to(torch.int8).argmax(-1, keepdim=True)
    at = first & into  # (B, Hkv, m): the slot this key takes
    for buf, x in ((mem.k, k), (mem.v, v), (mem.kf, kf)):
        buf.copy_(torch.where(at[..., None], x.to(buf.dtype), buf))
    mem.valid.logical_or_(at)
    return (kf, keep) if state.fill_in_state else kept_out(kf, keep, into)


def _leave_sum_memory(state: HybridState, k, v, kf, keep) -> None:
    """Kind 'sum', 'recall' memory: the leaving key takes pending slot `memory_slot`; after the block's last slot (the
    next query starts a block) the boundary step runs. Slot and boundary come from the device counter, and the
    boundary is committed by masked copies, so with `boundary_every_step` no Python branch depends on the token."""
    mem = state.memory
    block = mem.pend_valid.shape[1]
    i = state.memory_slot
    for buf, x in ((mem.pend_k, k), (mem.pend_v, v), (mem.pend_kf, kf)):
        buf.index_copy_(2, i, x.to(buf.dtype))
    mem.pend_valid.index_copy_(1, i, keep)
    if state.boundary_every_step or (state.seen + 1) % block == 0:
        ends = i == block - 1  # (1,): this key fills the block's last slot
        new, slots = memory_boundary(linear_state_kind(state.kind), state.linear, mem.slots, mem.pending)
        for dst, src in zip(state.linear.tensors() + list(mem.slots[:4]), new.tensors() + list(slots[:4])):
            dst.copy_(torch.where(ends, src.to(dst.dtype), dst))
        mem.pend_valid.masked_fill_(ends, False)
    state.memory_slot.copy_((i + 1) % block)


def advance_state(state: HybridState, k, v, kf, valid=None, *, fold: bool = True, beta=None) -> None:
    """Append one token (k/v (B, Hkv, 1, d), kf (B, Hkv, 1, m), valid (B, 1), beta (B, Hkv, 1) for kinds with beta)
    to the state, in place.

    The key in the write slot leaves the window: it is folded into S, z (an empty slot adds zero; `fold=False` when a
    fused kernel already did), then the new key takes its place. Only shapes decide the Python control flow, so this
    can run inside a captured CUDA graph (with a 'recall' memory: kind 'sum' and `boundary_every_step` set).
    """
    if valid is None:
        valid = _ones_valid(k)
    extended = state.left_count is not None
    if extended and not fold:
        raise ValueError("softmax sinks and sparse memory place the leaving key themselves; fold=False is not supported")
    for dst, src in zip((state.sink_k, state.sink_v, state.sink_valid, state.sink_kf), sinks_after(state, k, v, valid, kf)):
        dst.copy_(src)
    ring = state.buf_k.shape[2]
    if beta is not None:
        beta = beta.float()
    if ring == 0:  # window 1: the new key leaves the window at once
        if extended:
            _leave(state, k, v, kf, valid, beta)
        elif fold:
            _fold(state, kf, v, valid, beta)
    else:
        slot = state.slot
        old_beta = None if state.buf_beta is None else state.buf_beta.index_select(2, slot)
        if extended:
            _leave(state, *(x.index_select(2, slot) for x in (state.buf_k, state.buf_v, state.buf_kf)),
                   state.buf_valid.index_select(1, slot), old_beta)
        elif fold:
            _fold(state, state.buf_kf.index_select(2, slot), state.buf_v.index_select(2, slot), state.buf_valid.index_select(1, slot),
                  old_beta)
        if state.buf_beta is not None:
            state.buf_beta.index_copy_(2, slot, beta)
        state.buf_k.index_copy_(2, slot, k.to(state.buf_k.dtype))
        state.buf_v.index_copy_(2, slot, v.to(state.buf_v.dtype))
        state.buf_kf.index_copy_(2, slot, kf.to(state.buf_kf.dtype))
        state.buf_valid.index_copy_(1, slot, valid)
        state.slot.copy_((slot + 1) % ring)
    state.seen += 1


def fused_step(state: HybridState, q, k, v, qf, kf, *, spec: AttentionSpec, modes, weight=0.1,
               valid=None) -> dict[str, torch.Tensor] | None:
    """The whole step in one Triton launch (`attention/triton/decode.py`) where it applies (CUDA, kind 'sum', one
    kernel mode, no sparse memory, unless `LINEARIZE_FUSED_DECODE=0`), else None: the
    caller's path runs, after the keys the fused step deferred are folded into S, z (`flush_pending`)."""
    if state.additive and (q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        try:  # (no Triton import on a plain CPU)
            from linearize.attention.triton.decode import fused_decode_step
        except ImportError:  # no Triton
            fused_decode_step = None
        if fused_decode_step is not None:
            out = fused_decode_step(state, q, k, v, qf, kf, spec=spec, modes=modes, weight=weight, valid=valid)
            if out is not None:
                return out
    flush_pending(state)
    return None


def decode_step(state: HybridState, q, k, v, qf, kf, *, spec: AttentionSpec, modes, weight=0.1, valid=None,
                log_decay=None, beta=None) -> dict[str, torch.Tensor]:
    """One token: the output of each component mode in `modes` (all against the state before the token), then the
    token appended in place. log_decay / beta (B, Hkv, 1): the layer's gates of this token (kinds that use them)."""
    fused = fused_step(state, q, k, v, qf, kf, spec=spec, modes=modes, weight=weight, valid=valid)
    if fused is not None:
        return fused
    reads = None
    if not state.additive:
        if valid is None:
            valid = _ones_valid(k)
        reads = step_linear(state, qf, kf, v, valid, log_decay=log_decay, beta=beta)
    outs = {mode: decode_output(state, q, k, v, qf, kf, spec=spec, mode=mode, weight=weight, valid=valid, reads=reads)
            for mode in modes}
    advance_state(state, k, v, kf, valid, beta=beta)
    return outs


def prefill_selecting(q, k, v, qf, kf, valid, *, spec: AttentionSpec, modes, weight=0.1, lags=(), log_decay=None,
                      beta=None, conv_history=None) -> tuple[HybridState, dict[str, torch.Tensor]]:
    """memory_select 'query' at the end of a prefill of T >= 1 tokens (q/k/v/qf/kf as in `decode_step`, over the
    prompt): the state after the prompt, and each mode's outputs for its last R = min(spec.memory_reread, T) tokens
    {mode: (B, Hq, R, d)}.

    The memory keeps the `memory.select_by_query` keys among those outside the window of the first of those R tokens
    (valid keys 0 .. T - R - w, not softmax sinks), scored by the prompt's last queries (the last token's included).
    The state of the first T - R tokens is built around it (`prefill_state`), then the last R tokens are decoded
    against it one by one, so they -- and the prediction of the first new token -- read the memory
    (`reference.query_memory_reference` is the definition)."""
    t = k.shape[2]
    if t < 1:
        raise ValueError("memory_select='query': a prefill needs at least one token")
    n = t - min(spec.memory_reread, t)
    pos = torch.arange(t, device=k.device)
    candidate = valid & ~first_valid(valid, spec.softmax_sinks) & (pos <= n - spec.window)
    selected = select_by_query(q, k, valid, candidate, spec=spec)
    head = slice(0, n)
    cut = lambda x, sl: None if x is None else x[:, :, sl]  # noqa: E731
    state = prefill_state(k[:, :, head], v[:, :, head], kf[:, :, head], valid[:, head], spec=spec, lags=lags,
                          log_decay=cut(log_decay, head), beta=cut(beta, head), conv_history=conv_history,
                          selected=selected[..., head])
    outs = {mode: [] for mode in modes}
    for i in range(n, t):  # each re-read token reads the state before it, then enters it (decode_step)
        sl = slice(i, i + 1)
        w = weight[..., sl] if torch.is_tensor(weight) and weight.dim() == 3 else weight
        step = decode_step(state, q[:, :, sl], k[:, :, sl], v[:, :, sl], qf[:, :, sl], kf[:, :, sl], spec=spec,
                           modes=modes, weight=w, valid=valid[:, sl], log_decay=cut(log_decay, sl), beta=cut(beta, sl))
        for mode in modes:
            outs[mode].append(step[mode])
    return state, {mode: torch.cat(x, 2) for mode, x in outs.items()}
