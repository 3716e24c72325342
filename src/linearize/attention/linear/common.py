"""Pieces the linear-state kinds share: the (S, z) state of the normalised kinds and the lag/enter bookkeeping.

Layout (the interface of every kind, see `linearize.attention.linear`): qf (B, Hq, T, m), kf (B, Hkv, T, m),
v (B, Hkv, T, d), log_decay / beta (B, Hkv, T), enter (B, T) bool; key s enters the state at step s + lag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class KVState:
    """The state of the normalised kinds ('sum', 'gated'): S = sum w phi(k) v^T (B, Hkv, m, d), z = sum w phi(k)
    (B, Hkv, m), fp32; updated in place so a CUDA graph can capture a step."""

    S: torch.Tensor
    z: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.S, self.z]

    def index_select(self, rows: torch.Tensor) -> "KVState":
        return replace(self, S=self.S.index_select(0, rows.to(self.S.device)), z=self.z.index_select(0, rows.to(self.z.device)))


def init_kv_state(batch: int, num_kv_heads: int, m: int, d: int, *, dtype=torch.float32, device=None) -> KVState:
    return KVState(torch.zeros(batch, num_kv_heads, m, d, dtype=dtype, device=device),
                   torch.zeros(batch, num_kv_heads, m, dtype=dtype, device=device))


def entering(kf: torch.Tensor, enter: torch.Tensor | None) -> torch.Tensor:
    """(B, T) mask of the keys that may enter (all where `enter` is None)."""
    if enter is None:
        return torch.ones(kf.shape[0], kf.shape[2], dtype=torch.bool, device=kf.device)
    return enter


def shift_time(x: torch.Tensor, lag: int, dim: int = 2) -> torch.Tensor:
    """x moved `lag` steps later along `dim` (zeros/False in front, the tail cut): position t holds key t - lag, the
    key that enters the state at step t."""
    if lag == 0:
        return x
    t = x.shape[dim]
    front = list(x.shape)
    front[dim] = min(lag, t)
    return torch.cat([x.new_zeros(front), x.narrow(dim, 0, t - front[dim])], dim)
