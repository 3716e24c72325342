"""The delta-rule state on the GPU through flash-linear-attention's chunked Gated DeltaNet kernel (fla >= 0.6,
the optional `gpu` extra; imported only when called, so CPU installs never need it).

The kernel has no GQA (q and k must share a head count; its grouping is the other way round, more value heads
than key heads) and no lag, so: the entering-key stream is built as in
`chunked` (keys, values, beta shifted right by `lag` and zeroed where no key may enter, the decay left on the query
positions), keys/values/gates are repeated to the query heads, and q/k are unit-normed here in fp32 with the
interface's norm floor (the kernel is called with scale 1 and without its own l2norm, whose eps differs).
q, k, v go in as bf16 (the kernel's tensor-core path), the gates and beta as fp32, as fla's own tests use them.
"""

from __future__ import annotations

import torch

from linearize.attention.linear.delta.inputs import check_inputs, entering_keys, has_entered, unit_norm

#: The kernel's limit on the key feature size m (its state is m x d, tiled in blocks of 64 rows).
MAX_FEATURES = 256


def kernel_inputs(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0, dtype=torch.bfloat16):
    """The kernel's (q, k, v, g, beta) in its (B, T, Hq, ...) layout, and the (B, T) bool of steps where a key
    enters: q, k, v in `dtype`, the gates and beta in fp32."""
    check_inputs(qf, kf, v, log_decay, beta, enter, lag)
    hq, hkv = qf.shape[1], kf.shape[1]
    k_in, v_in, beta_in, enters = entering_keys(kf, v, beta, enter, lag)
    g = torch.zeros_like(beta_in) if log_decay is None else log_decay

    def heads_last(x, dtype):  # (B, Hkv, T, ...) -> (B, T, Hq, ...), each key/value head repeated for its queries
        return x.repeat_interleave(hq // hkv, dim=1).transpose(1, 2).to(dtype).contiguous()

    q = unit_norm(qf).transpose(1, 2).to(dtype).contiguous()
    return (q, heads_last(k_in, dtype), heads_last(v_in, dtype), heads_last(g, torch.float32),
            heads_last(beta_in, torch.float32)), enters


def fla_supports(m: int, d: int) -> bool:
    """The kernel computes feature size m and value size d: m even and at most MAX_FEATURES, d even."""
    return m <= MAX_FEATURES and m % 2 == 0 and d % 2 == 0


def fla_forward(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0):
    """(num (B, Hq, T, d) in qf's dtype, den (B, Hq, T)); equal to `naive` up to bf16 rounding."""
    m, d = qf.shape[-1], v.shape[-1]
    if not fla_supports(m, d):
        raise ValueError(f"fla's gated delta rule needs an even feature size <= {MAX_FEATURES} and an even value size; got m={m}, d={d}")
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as exc:
        raise ImportError(f"the delta rule's GPU path needs flash-linear-attention >= 0.6 (the `gpu` extra): {exc}") from None
    inputs, enters = kernel_inputs(qf, kf, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag)
    out, _ = chunk_gated_delta_rule(*inputs, scale=1.0, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False)
    return out.transpose(1, 2).to(qf.dtype), has_entered(enters, qf.shape[1], qf.dtype)
