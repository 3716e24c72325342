"""The specification: a plain quadratic implementation with explicit (T x T) masks.

Slow and memory-hungry on purpose; every fast path is tested against it.
For query t (positions counted over the whole row, padding included):
  window   W_t = {s : t - w < s <= t}
  LA       P_t = {s <= t - w} ('complementary') or {s <= t} ('overlap'); {s <= t} in 'la_only' mode
  sinks        = the first `num_sinks` valid tokens, s <= t
Padding keys (valid == False) enter no sum.
"""

from __future__ import annotations

import torch

from linearize.attention.common import check_mode, combine, expand_weight, group_queries, safe_div, sink_positions, softcapped, ungroup


def hybrid_attention_reference(
    q, k, v, qf, kf, *, scale: float, window: int, weight: torch.Tensor | float = 0.1, rule: str = "shared_norm",
    placement: str = "complementary", mode: str = "hybrid", num_sinks: int = 8, valid: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    check_mode(mode)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    if mode == "none":
        return torch.zeros_like(q)
    pos = torch.arange(t, device=q.device)
    diff = pos[:, None] - pos[None, :]  # t - s
    causal = diff >= 0
    keymask = valid[:, None, None, None, :]  # (B, 1, 1, 1, S) against (B, Hkv, G, T, S)

    qg, qfg = group_queries(q, hkv), group_queries(qf, hkv)
    logits = softcapped(torch.einsum("bhgtd,bhsd->bhgts", qg, k) * scale, softcap)

    def softmax_sums(mask):
        mask = mask & keymask
        masked = logits.masked_fill(~mask, float("-inf"))
        c = masked.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        a = torch.exp(masked - c)
        return ungroup(torch.einsum("bhgts,bhsd->bhgtd", a, v)), ungroup(a.sum(-1))

    def linear_sums(mask):
        bterm = torch.einsum("bhgtm,bhsm->bhgts", qfg, kf) * (mask & keymask)
        return ungroup(torch.einsum("bhgts,bhsd->bhgtd", bterm, v)), ungroup(bterm.sum(-1))

    if mode == "sinks_only":
        idx, sink_valid = sink_positions(valid, num_sinks)
        is_sink = torch.zeros(b, t, dtype=torch.bool, device=q.device).scatter(1, idx, sink_valid)
        return safe_div(*softmax_sums(causal & is_sink[:, None, None, None, :]))
    swa = softmax_sums(causal & (diff < window))
    if mode == "swa_only":
        return safe_div(*swa)
    if mode == "la_only":
        return safe_div(*linear_sums(causal))
    la_mask = diff >= (window if placement == "complementary" else 0)
    return combine(rule, expand_weight(weight, b, hq, t, q), swa, linear_sums(la_mask))
