"""Decoding with the delta-rule state: one step per token, the state updated in place.

The state's tensors keep their shapes and storage across steps (no Python branch on tensor values, no
reallocation), so a CUDA graph can capture `step`. Not differentiable: `step` is for decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linearize.attention.common import group_queries, ungroup
from linearize.attention.linear.delta.inputs import unit_norm


@dataclass
class DeltaState:
    """S (B, Hkv, m, d): the fast-weight memory; entered (B,) bool: whether any key has entered it yet (den)."""

    S: torch.Tensor
    entered: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.S, self.entered]

    def index_select(self, rows: torch.Tensor) -> "DeltaState":
        """A new state of the batch rows `rows` (beam search, dropped sequences)."""
        return DeltaState(self.S.index_select(0, rows), self.entered.index_select(0, rows))


def init_state(batch: int, num_kv_heads: int, m: int, d: int, *, dtype, device) -> DeltaState:
    """The empty state: no key has entered."""
    return DeltaState(
        S=torch.zeros(batch, num_kv_heads, m, d, dtype=dtype, device=device),
        entered=torch.zeros(batch, dtype=torch.bool, device=device),
    )


@torch.no_grad()
def step(state: DeltaState, qf_t, kf_in, v_in, *, log_decay_t=None, beta_in=None, enter_in=None):
    """Decay the state, let the key (kf_in (B, Hkv, m), v_in (B, Hkv, d)) enter where `enter_in` (B,) allows, and
    read it with qf_t (B, Hq, m): returns num (B, Hq, d), den (B, Hq). `state` is updated in place."""
    S = state.S
    b, hkv, m, d = S.shape
    if qf_t.dim() != 3 or kf_in.shape != (b, hkv, m) or v_in.shape != (b, hkv, d) or qf_t.shape[0] != b or qf_t.shape[1] % hkv:
        raise ValueError(f"step: qf_t {tuple(qf_t.shape)}, kf_in {tuple(kf_in.shape)}, v_in {tuple(v_in.shape)} do not fit the state {tuple(S.shape)}")
    if log_decay_t is not None:
        S.mul_(log_decay_t.exp().to(S.dtype)[..., None, None])
    k = unit_norm(kf_in.to(S.dtype))
    v = v_in.to(S.dtype)
    strength = torch.ones(b, hkv, dtype=S.dtype, device=S.device) if beta_in is None else beta_in.to(S.dtype)
    if enter_in is not None:
        # zeros, not a branch: a key that may not enter changes nothing (and garbage at padding cannot leak in)
        strength = torch.where(enter_in[:, None], strength, 0.0)
        k = torch.where(enter_in[:, None, None], k, 0.0)
        v = torch.where(enter_in[:, None, None], v, 0.0)
        state.entered.logical_or_(enter_in)
    else:
        state.entered.fill_(True)
    error = v - torch.einsum("bhmd,bhm->bhd", S, k)
    S.add_(k[..., :, None] * (strength[..., None] * error)[..., None, :])
    num, den = read(state, qf_t[:, :, None])
    return num[:, :, 0], den[:, :, 0]


def read(state: DeltaState, qf, *, log_decay=None):
    """(num (B, Hq, L, d), den (B, Hq, L)) of queries qf (B, Hq, L, m): num = S^T q^, den = 1 once a key entered;
    with log_decay (B, Hkv, L), query l reads the state decayed by exp(log_decay[l]) (den unchanged)."""
    S = state.S
    b, hkv = S.shape[:2]
    q_hat = group_queries(unit_norm(qf.to(S.dtype)), hkv)  # (B, Hkv, G, L, m)
    num = torch.einsum("bhglm,bhmd->bhgld", q_hat, S)
    if log_decay is not None:
        num = num * torch.exp(log_decay.to(S.dtype))[:, :, None, :, None]
    num = ungroup(num)
    den = state.entered.to(S.dtype)[:, None, None].expand(b, num.shape[1], num.shape[2])
    return num, den


def decayed(state: DeltaState, log_decay) -> DeltaState:
    """A new state: S times exp(log_decay) (B, Hkv). Not in place."""
    return DeltaState(state.S * torch.exp(log_decay.to(state.S.dtype))[..., None, None], state.entered)
