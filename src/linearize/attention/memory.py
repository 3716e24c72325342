"""Sparse exact memory, shared by the chunked forward and the recurrent state.

The definition is in `linearize.attention.reference`. Two rules choose the keys (`HybridConfig.memory_select`):
'recall' (LoLA-style, online): both fast paths walk the same boundaries through `memory_boundary`, in the same order
and on the same tensor shapes, so a prompt decoded token by token selects exactly the keys the full forward selects;
the linear-state kind supplies the score (`recall_error`), how evicted keys enter its state (`absorb`) and, for the
kinds with a decay, `decayed` (attention.linear). 'query' (SnapKV-style, once at the end of a prefill):
`select_by_query` scores the keys by the attention of the prompt's last queries (`query_scores`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from linearize.attention.common import group_queries
from linearize.attention.linear import LinearState
from linearize.attention.linear import linear_state as linear_state_kind
from linearize.attention.spec import AttentionSpec


def memory_kind(spec: AttentionSpec) -> LinearState:
    """The linear-state kind the memory serves; a one-line ValueError for what the memory does not cover."""
    kind = linear_state_kind(spec.linear_state)
    if not kind.serves_memory:
        raise ValueError(f"sparse_memory does not cover linear_state={spec.linear_state!r}; set sparse_memory=0")
    return kind


@dataclass
class SparseMemory:
    """The m exact keys (time order, per row and KV head) and the pending keys of the current block.

    Pending slot i holds the key that left the window i tokens after the last boundary (the candidates of the next
    one); `pend_valid` marks valid keys outside the softmax sinks. Kinds with a decay keep each key's log-decay since
    its entry step (w steps after the key, when it would enter the plain state), kinds with beta its beta.
    """

    k: torch.Tensor  # (B, Hkv, m, d)
    v: torch.Tensor
    kf: torch.Tensor  # (B, Hkv, m, f)
    valid: torch.Tensor  # (B, Hkv, m)
    pend_k: torch.Tensor  # (B, Hkv, C, d)
    pend_v: torch.Tensor
    pend_kf: torch.Tensor  # (B, Hkv, C, f)
    pend_valid: torch.Tensor  # (B, C)
    age: torch.Tensor | None = None  # (B, Hkv, m) fp32, kinds with a decay
    pend_age: torch.Tensor | None = None  # (B, Hkv, C)
    beta: torch.Tensor | None = None  # (B, Hkv, m) fp32, kinds with beta
    pend_beta: torch.Tensor | None = None  # (B, Hkv, C)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f.name) for f in fields(self)) if t is not None]

    def index_select(self, rows: torch.Tensor) -> "SparseMemory":
        pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        return SparseMemory(*[pick(getattr(self, f.name)) for f in fields(self)])

    @property
    def slots(self):
        return self.k, self.v, self.kf, self.valid, self.age, self.beta

    @property
    def pending(self):
        return self.pend_k, self.pend_v, self.pend_kf, self.pend_valid, self.pend_age, self.pend_beta


def empty_slots(k: torch.Tensor, v: torch.Tensor, kf: torch.Tensor, slots: int, *, decays: bool = False,
                betas: bool = False):
    """Memory with no key: (k, v, kf, valid, age, beta) of `slots` empty slots, shaped after k/v/kf (B, Hkv, ., .);
    age / beta fp32 zeros where `decays` / `betas`, else None."""
    b, hkv = k.shape[:2]
    f32 = lambda on: torch.zeros(b, hkv, slots, dtype=torch.float32, device=k.device) if on else None  # noqa: E731
    return (k.new_zeros(b, hkv, slots, k.shape[-1]), v.new_zeros(b, hkv, slots, v.shape[-1]),
            kf.new_zeros(b, hkv, slots, kf.shape[-1]), torch.zeros(b, hkv, slots, dtype=torch.bool, device=k.device),
            f32(decays), f32(betas))


def ages_after_entry(log_decay: torch.Tensor) -> torch.Tensor:
    """log_decay (..., L) of steps p+1 .. p+L -> (..., L): entry i (the key entering at step p+1+i) gets the sum of
    the decays after its entry, log_decay[i+1:].sum() (0 for the last)."""
    return log_decay.flip(-1).cumsum(-1).flip(-1) - log_decay


def memory_boundary(kind: LinearState, state, slots, pending):
    """One boundary: score memory + pending keys against the state, keep the top m, let the rest enter the state.

    slots = (k, v, kf, valid, age, beta) of the memory; pending = the same for the new candidates in time order
    (valid (B, C) or (B, Hkv, C)); age / beta None where the kind has none. Returns the new (state, slots). Ties rank
    the older key first (stable sort over time-ordered keys); the kept keys stay in time order and the evicted ones
    enter the state in time order (the delta rule's writes do not commute).
    """
    mvalid = slots[3]
    b, hkv, m = mvalid.shape
    pvalid = pending[3] if pending[3].dim() == 3 else pending[3][:, None, :].expand(b, hkv, pending[3].shape[-1])
    pending = (*pending[:3], pvalid, *pending[4:])
    pool = [None if x is None else torch.cat([x, y], 2) for x, y in zip(slots, pending)]  # memory then pending
    with torch.no_grad():
        scores = kind.recall_error(state, pool[2], pool[1]).masked_fill(~pool[3], float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        keep, drop = order[..., :m].sort(-1).values, order[..., m:].sort(-1).values

    def take(x, idx):
        if x is None:
            return None
        return x.gather(2, idx) if x.dim() == 3 else x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))

    # only the C evicted keys enter (invalid ones weigh 0): the update costs C, not m + C, keys
    out = kind.absorb(state, take(pool[2], drop), take(pool[1], drop), take(pool[3], drop),
                      log_weight=take(pool[4], drop), beta=take(pool[5], drop))
    return out, tuple(take(x, keep) for x in pool)


def memory_walk(k, v, kf, candidate, *, kind: LinearState, window: int, block: int, slots: int, blocks: int,
                log_decay=None, beta=None, dtype=torch.float32):
    """(state, memory slots) in force at the boundaries 0, C, 2C, ... (C = block), one pair per block 0 .. blocks-1:
    the state at step jC, after its boundary; the queries of block j read it decayed by their steps since jC.

    k/v (B, Hkv, T, d), kf (B, Hkv, T, m); candidate (B, T): valid keys outside the softmax sinks; log_decay / beta
    (B, Hkv, T) for the kinds that use them. With the keys shifted right by w - 1 (the pending layout), the
    candidates of boundary jC are block j - 1, and the key at shifted position p enters at step p + 1.
    """
    b, hkv, t, _ = k.shape
    back = max((blocks - 1) * block - (t + window - 1), 0)
    shifted = [F.pad(x, (0, 0, window - 1, back)) for x in (k, v, kf)]
    cand = F.pad(candidate, (window - 1, back))
    shifted_beta = None if beta is None else F.pad(beta.float(), (window - 1, back))
    decays = log_decay is not None
    if decays:  # steps 0 .. (blocks - 1) C, padded with no decay
        log_decay = F.pad(log_decay.float(), (0, max((blocks - 1) * block + 1 - t, 0)))
    state = kind.init_state(b, hkv, kf.shape[-1], v.shape[-1], dtype=dtype, device=k.device)
    mem = empty_slots(k, v, kf, slots, decays=decays, betas=beta is not None)
    for j in range(blocks):
        if j:
            sl = slice((j - 1) * block, j * block)
            age = None
            if decays:  # the steps since the last boundary, (j-1)C + 1 .. jC: the state and the memory's keys decay
                steps = log_decay[..., (j - 1) * block + 1:j * block + 1]
                state = kind.decayed(state, steps.sum(-1))
                mem = (*mem[:4], mem[4] + steps.sum(-1, keepdim=True), mem[5])
                age = ages_after_entry(steps)
            pending = (*(x[:, :, sl] for x in shifted), cand[:, sl], age,
                       None if shifted_beta is None else shifted_beta[:, :, sl])
            state, mem = memory_boundary(kind, state, mem, pending)
        yield state, mem


def query_scores(q, k, valid, *, scale: float, observe: int, heads: str = "sum") -> torch.Tensor:
    """(B, Hkv, T): the softmax attention each key receives from the last `observe` valid queries of its row (the
    causal softmax over the row's valid keys, padding left out), summed over those queries, then over the query heads
    of its KV head (`heads` 'sum') or their largest (`heads` 'max'). q (B, Hq, T, d), k (B, Hkv, T, d), valid (B, T)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    pos = torch.arange(t, device=q.device)
    # the observers' positions: the `observe` largest valid positions of each row (-1 where the row has fewer)
    at = torch.where(valid, pos, -1).topk(min(observe, t), dim=1).values if t else pos.new_zeros(b, 0)
    seen = at >= 0
    qo = q.gather(2, at.clamp(min=0)[:, None, :, None].expand(b, hq, at.shape[1], d))
    logits = torch.einsum("bhgod,bhsd->bhgos", group_queries(qo.float(), hkv), k.float()) * scale
    mask = valid[:, None, :] & (pos[None, None, :] <= at[:, :, None]) & seen[:, :, None]  # (B, O, T)
    logits = logits.masked_fill(~mask[:, None, None], float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)  # an observer with no key (none here: it sees itself) adds 0
    per_head = weights.sum(3)  # (B, Hkv, G, T)
    return per_head.amax(2) if heads == "max" else per_head.sum(2)


#: what `observing_selection` registered: called with each query-memory selection
_SELECTION_OBSERVERS: list[Callable[[torch.Tensor, torch.Tensor, AttentionSpec], None]] = []


@contextlib.contextmanager
def observing_selection(observer: Callable[[torch.Tensor, torch.Tensor, AttentionSpec], None]):
    """Within: observer(chosen, candidate, spec) after each `select_by_query` -- one call per converted layer at the end
    of a prefill, in layer order; chosen (B, Hkv, T), candidate (B, T). For diagnostics of what the memory keeps
    (`linearize.evaluate.memory_coverage`); the selection itself is unchanged."""
    _SELECTION_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _SELECTION_OBSERVERS.remove(observer)


#: what `preferring_keys` set: positions the query memory ranks above the others
_PREFERRED: list[torch.Tensor] = []


@contextlib.contextmanager
def preferring_keys(prefer: torch.Tensor):
    """Within: `select_by_query` ranks the candidates at `prefer` ((T,) or (B, T) bool over the prefill's positions;
    shorter is padded with False) above every other key, in every layer and KV head; the memory still keeps at most
    sparse_memory keys, the rest (and ties among the preferred) by the query rule. For diagnostics: an oracle choice --
    the gold passage of a long-QA item, say -- to read the rule's own choice against (`evaluate.memory_coverage`)."""
    _PREFERRED.append(prefer)
    try:
        yield
    finally:
        _PREFERRED.pop()  # contexts close innermost first (and list.remove would compare tensors)


def select_by_query(q, k, valid, candidate, *, spec: AttentionSpec) -> torch.Tensor:
    """memory_select 'query': the keys the memory keeps, a (B, Hkv, T) mask with at most `spec.sparse_memory` keys per
    row and KV head, all among `candidate` (B, T). The `query_scores` of the candidates (the others count 0) are
    max-pooled over `spec.memory_pool` neighbouring positions; the highest are kept, equal scores the older key
    first; within `preferring_keys`, its keys first. Not differentiated."""
    with torch.no_grad():
        scores = query_scores(q, k, valid, scale=spec.scale, observe=spec.memory_observe, heads=spec.memory_heads)
        scores = scores * candidate[:, None].to(scores.dtype)
        if spec.memory_pool > 1:
            b, hkv, t = scores.shape
            scores = F.max_pool1d(scores.reshape(b * hkv, 1, t), spec.memory_pool, stride=1,
                                  padding=spec.memory_pool // 2).reshape(b, hkv, t)
        ranked = scores.masked_fill(~candidate[:, None], float("-inf"))
        if _PREFERRED:  # lifted above the largest score, so they rank first and keep their order among themselves
            b, t = candidate.shape
            first = _PREFERRED[-1].to(candidate.device, torch.bool)[..., :t]
            first = F.pad(first, (0, t - first.shape[-1])).expand(b, t) & candidate
            ranked = torch.where(first[:, None], ranked + scores.amax() + 1, ranked)
        top = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :spec.sparse_memory]
        chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, top, True) & candidate[:, None]
    for observer in _SELECTION_OBSERVERS:
        observer(chosen, candidate, spec)
    return chosen


def frozen_slots(k, v, kf, selected, slots: int):
    """(k, v, kf, valid) of the memory holding the `selected` keys ((B, Hkv, T) mask, at most `slots` per row and KV
    head) in time order, then empty slots."""
    b, hkv, t = selected.shape
    if t < slots:  # room for every slot
        k, v, kf = (F.pad(x, (0, 0, 0, slots - t)) for x in (k, v, kf))
        selected = F.pad(selected, (0, slots - t))
    idx = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices[..., :slots]  # selected first, in order
    gather = lambda x: x.gather(2, idx[..., None].expand(b, hkv, slots, x.shape[-1]))  # noqa: E731
    return gather(k), gather(v), gather(kf), selected.gather(2, idx)


def kept_out(kf: torch.Tensor, enter: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the complementary linear state takes in of keys a fixed ('query') memory keeps: kf (B, Hkv, L, m) with
    the kept keys' features zeroed (kept (B, Hkv, L)), and enter (B, L) off where every KV head keeps the key -- a
    state that took nothing in is not read (`reference.query_memory_reference` is the definition)."""
    return kf * ~kept[..., None], enter & ~kept.all(1)
