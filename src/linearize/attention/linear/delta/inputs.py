"""What every path of the delta-rule state does to its inputs first: shape checks, unit-norm features, and the
stream of keys entering the state at each step (keys shifted right by `lag`, holes where a key may not enter)."""

from __future__ import annotations

import torch

from linearize.attention.linear.common import shift_time

#: Floor of a feature vector's norm before normalising (a zero vector stays zero instead of dividing by 0).
NORM_FLOOR = 1e-6


def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-6) over the last (feature) axis."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def unit_lower_solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with (I + A) X = rhs, A strictly lower triangular (the delta rule's chunk system). In fp32 where the inputs
    are 16-bit on the CPU (PyTorch has no 16-bit triangular solve there), cast back after."""
    work = torch.float32 if A.device.type == "cpu" and A.dtype in (torch.bfloat16, torch.float16) else A.dtype
    x = torch.linalg.solve_triangular(A.to(work), rhs.to(work), upper=False, unitriangular=True)
    return x.to(rhs.dtype)


def check_inputs(qf, kf, v, log_decay, beta, enter, lag) -> None:
    """One-line ValueErrors for shapes that do not fit the linear-state interface (qf None: a prefill without
    queries)."""
    if kf.dim() != 4 or v.dim() != 4 or (qf is not None and qf.dim() != 4):
        raise ValueError(f"qf, kf, v must be (B, H, T, features); got {None if qf is None else tuple(qf.shape)}, {tuple(kf.shape)}, {tuple(v.shape)}")
    b, hkv, t, m = kf.shape
    if v.shape[:3] != (b, hkv, t):
        raise ValueError(f"v {tuple(v.shape)} does not match kf {tuple(kf.shape)}")
    if qf is not None and (qf.shape[0], qf.shape[2], qf.shape[3]) != (b, t, m):
        raise ValueError(f"kf {tuple(kf.shape)} does not match qf {tuple(qf.shape)}")
    if qf is not None and qf.shape[1] % hkv:
        raise ValueError(f"query heads ({qf.shape[1]}) must be a multiple of key/value heads ({hkv})")
    for name, x in (("log_decay", log_decay), ("beta", beta)):
        if x is not None and x.shape != (b, hkv, t):
            raise ValueError(f"{name} must be (B, Hkv, T) = {(b, hkv, t)}; got {tuple(x.shape)}")
    if enter is not None and (enter.shape != (b, t) or enter.dtype != torch.bool):
        raise ValueError(f"enter must be a bool (B, T) = {(b, t)} tensor; got {enter.dtype} {tuple(enter.shape)}")
    if lag < 0:
        raise ValueError(f"lag must be >= 0; got {lag}")


def entering_keys(kf, v, beta, enter, lag):
    """The key entering at each step t (position t - lag), at query positions: unit-norm keys k^ (B, Hkv, T, m),
    values (B, Hkv, T, d), strengths beta (B, Hkv, T) and the (B, T) bool of steps where a key enters.

    Where no key enters (t < lag, or enter is False) key, value and beta are exact zeros, so such a step changes
    nothing and receives no gradient, whatever the caller left at that position."""
    b, hkv, t, _ = kf.shape
    enters = torch.ones(b, t, dtype=torch.bool, device=kf.device) if enter is None else enter
    enters = shift_time(enters, lag, dim=1)
    if beta is None:
        beta = torch.ones(b, hkv, t, dtype=kf.dtype, device=kf.device)
    on = enters[:, None, :]
    k_in = torch.where(on[..., None], shift_time(unit_norm(kf), lag, dim=2), 0.0)
    v_in = torch.where(on[..., None], shift_time(v, lag, dim=2), 0.0)
    beta_in = torch.where(on, shift_time(beta, lag, dim=2), 0.0)
    return k_in, v_in, beta_in, enters


def has_entered(enters: torch.Tensor, num_q_heads: int, dtype) -> torch.Tensor:
    """den (B, Hq, T): 1 where at least one key has entered the state by step t, else 0 (the delta rule has no
    normaliser; this keeps `combine`'s "no linear keys -> softmax alone")."""
    seen = torch.cumsum(enters, dim=1) > 0
    return seen[:, None, :].to(dtype).expand(-1, num_q_heads, -1)
