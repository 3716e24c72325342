"""The delta-rule state under sparse memory (attention.memory): its recall error, and the evicted keys written into
it at a memory boundary."""

from __future__ import annotations

import torch

from linearize.attention.linear.delta.inputs import unit_lower_solve, unit_norm
from linearize.attention.linear.delta.recurrent import DeltaState


def recall_error(state: DeltaState, kf, v):
    """The state's own readout error ||v - S^T k^||^2 of keys kf (B, Hkv, L, m), v (B, Hkv, L, d) -> (B, Hkv, L)."""
    S = state.S
    recalled = torch.einsum("bhlm,bhmd->bhld", unit_norm(kf.to(S.dtype)), S)
    return (v.to(S.dtype) - recalled).square().sum(-1)


def absorb(state: DeltaState, kf, v, valid, *, log_weight=None, beta=None) -> DeltaState:
    """A new state after the delta-rule writes of the keys kf (B, Hkv, L, m), v (B, Hkv, L, d), in order l = 0 .. L-1:
        S <- S + b_l k^_l (v_l - S^T k^_l)^T,   b_l = valid_l * exp(log_weight_l) * beta_l
    (log_weight: the decay since the key's entry step, None: 0; beta None: 1). In closed form, as one chunk of the
    chunked delta rule without decay: (I + A) U = diag(b) (V - K S), A_lj = b_l k^_l . k^_j (j < l),
    S_new = S + K^T U. Not in place, so gradients flow through it; `entered` turns on where a valid key is written."""
    S = state.S
    k = unit_norm(kf.to(S.dtype))
    strength = valid.to(S.dtype)
    if log_weight is not None:
        strength = strength * torch.exp(log_weight.to(S.dtype))
    if beta is not None:
        strength = strength * beta.to(S.dtype)
    A = strength[..., None] * (k @ k.transpose(-1, -2)).tril(-1)
    rhs = strength[..., None] * (v.to(S.dtype) - k @ S)
    U = unit_lower_solve(A, rhs)  # the unit diagonal: I + A
    entered = state.entered | valid.flatten(1).any(1)
    return DeltaState(S + k.transpose(-1, -2) @ U, entered)
