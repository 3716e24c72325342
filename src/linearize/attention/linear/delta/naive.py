"""The specification of the gated delta-rule state: its recurrence as a plain loop over steps. Slow on purpose;
`chunked`, `step` and `fla_forward` are tested against it.

  for t = 0 .. T-1:  S <- exp(log_decay[t]) S
                     s = t - lag; if s >= 0 and enter[s]:  S <- S + beta_s k^_s (v_s - S^T k^_s)^T
                     num_t = S^T q^_t;  den_t = 1 if any key has entered by t else 0
with k^, q^ the features divided by max(||.||, 1e-6), S (m x d) per key/value head, query head h reading head
h // (Hq // Hkv).
"""

from __future__ import annotations

import torch

from linearize.attention.common import group_queries, ungroup
from linearize.attention.linear.delta.inputs import check_inputs, unit_norm


def naive(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0):
    """(num (B, Hq, T, d), den (B, Hq, T)) of the delta-rule state read by every query."""
    check_inputs(qf, kf, v, log_decay, beta, enter, lag)
    b, hq, t_len, m = qf.shape
    hkv, d = kf.shape[1], v.shape[-1]
    q_hat = group_queries(unit_norm(qf), hkv)  # (B, Hkv, G, T, m)
    k_hat = unit_norm(kf)
    S = qf.new_zeros(b, hkv, m, d)
    entered = torch.zeros(b, dtype=torch.bool, device=qf.device)
    nums, dens = [], []
    for t in range(t_len):
        if log_decay is not None:
            S = S * log_decay[:, :, t].exp()[..., None, None]
        s = t - lag
        if s >= 0:
            enters = torch.ones(b, dtype=torch.bool, device=qf.device) if enter is None else enter[:, s]
            k = k_hat[:, :, s]
            strength = torch.ones(b, hkv, dtype=qf.dtype, device=qf.device) if beta is None else beta[:, :, s]
            error = v[:, :, s] - torch.einsum("bhmd,bhm->bhd", S, k)
            update = strength[..., None, None] * k[..., :, None] * error[..., None, :]
            S = torch.where(enters[:, None, None, None], S + update, S)
            entered = entered | enters
        nums.append(torch.einsum("bhgm,bhmd->bhgd", q_hat[:, :, :, t], S))
        dens.append(entered.to(qf.dtype)[:, None].expand(b, hq))
    num = ungroup(torch.stack(nums, dim=3))
    return num, torch.stack(dens, dim=2)
