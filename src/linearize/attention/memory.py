"""Sparse exact memory (LoLA-style), shared by the chunked forward and the recurrent state.

The definition is in `linearize.attention.reference`. Both fast paths walk the same boundaries through
`memory_boundary`, in the same order and on the same tensor shapes, so a prompt decoded token by token selects
exactly the keys the full forward selects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from linearize.attention.common import recall_error


@dataclass
class SparseMemory:
    """The m exact keys (time order, per row and KV head) and the pending keys of the current block.

    Pending slot i holds the key that left the window i tokens after the last boundary (the candidates of the next
    one); `pend_valid` marks valid keys outside the softmax sinks.
    """

    k: torch.Tensor  # (B, Hkv, m, d)
    v: torch.Tensor
    kf: torch.Tensor  # (B, Hkv, m, f)
    valid: torch.Tensor  # (B, Hkv, m)
    pend_k: torch.Tensor  # (B, Hkv, C, d)
    pend_v: torch.Tensor
    pend_kf: torch.Tensor  # (B, Hkv, C, f)
    pend_valid: torch.Tensor  # (B, C)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def index_select(self, rows: torch.Tensor) -> "SparseMemory":
        return SparseMemory(*[t.index_select(0, rows.to(t.device)) for t in self.tensors()])

    @property
    def slots(self):
        return self.k, self.v, self.kf, self.valid


def empty_slots(k: torch.Tensor, v: torch.Tensor, kf: torch.Tensor, slots: int):
    """Memory with no key: (k, v, kf, valid) of `slots` empty slots, shaped after k/v/kf (B, Hkv, ., .)."""
    b, hkv = k.shape[:2]
    return (k.new_zeros(b, hkv, slots, k.shape[-1]), v.new_zeros(b, hkv, slots, v.shape[-1]),
            kf.new_zeros(b, hkv, slots, kf.shape[-1]), torch.zeros(b, hkv, slots, dtype=torch.bool, device=k.device))


def memory_boundary(S, z, slots, pending):
    """One boundary: score memory + pending keys against (S, z), keep the top m, fold the rest into S, z.

    slots = (k, v, kf, valid) of the memory; pending = (k, v, kf, valid (B, C)) of the new candidates in time order.
    Returns the new (S, z, slots). Ties rank the older key first (stable sort over time-ordered keys); the kept keys
    stay in time order.
    """
    mvalid = slots[3]
    b, hkv, m = mvalid.shape
    pool = [torch.cat(pair, 2) for pair in zip(slots[:3], pending[:3])]  # k, v, kf: memory then pending
    pool_valid = torch.cat([mvalid, pending[3][:, None, :].expand(b, hkv, pending[3].shape[-1])], 2)
    with torch.no_grad():
        scores = recall_error(pool[2], pool[1], S, z).masked_fill(~pool_valid, float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        keep, drop = order[..., :m].sort(-1).values, order[..., m:]

    def take(x, idx):
        return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))

    # fold only the C dropped keys (invalid ones weigh 0): the update costs C, not m + C, rank-1 terms
    kf_fold = take(pool[2], drop).to(S.dtype) * pool_valid.gather(2, drop).to(S.dtype).unsqueeze(-1)
    S = S + torch.einsum("bhlm,bhld->bhmd", kf_fold, take(pool[1], drop).to(S.dtype))
    z = z + kf_fold.sum(2)
    return S, z, (*(take(x, keep) for x in pool), pool_valid.gather(2, keep))


def memory_walk(k, v, kf, candidate, *, window: int, block: int, slots: int, blocks: int, dtype=torch.float32):
    """(S, z, memory slots) in force for the queries of blocks 0 .. blocks-1, i.e. after boundaries 0, C, 2C, ...

    k/v (B, Hkv, T, d), kf (B, Hkv, T, f); candidate (B, T): valid keys outside the softmax sinks. With the keys
    shifted right by w - 1 (the pending layout), the candidates of boundary jC are block j - 1.
    """
    b, hkv, t, _ = k.shape
    back = max((blocks - 1) * block - (t + window - 1), 0)
    shifted = [F.pad(x, (0, 0, window - 1, back)) for x in (k, v, kf)]
    cand = F.pad(candidate, (window - 1, back))
    S = torch.zeros(b, hkv, kf.shape[-1], v.shape[-1], dtype=dtype, device=k.device)
    z = torch.zeros(b, hkv, kf.shape[-1], dtype=dtype, device=k.device)
    mem = empty_slots(k, v, kf, slots)
    for j in range(blocks):
        if j:
            sl = slice((j - 1) * block, j * block)
            S, z, mem = memory_boundary(S, z, mem, (*(x[:, :, sl] for x in shifted), cand[:, sl]))
        yield S, z, mem
