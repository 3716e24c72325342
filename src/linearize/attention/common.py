"""Pieces every implementation of the hybrid layer shares: the combination rule and safe division.

Tensor layout everywhere: q (B, Hq, T, d), k/v (B, Hkv, T, d), qf (B, Hq, T, m), kf (B, Hkv, T, m).
Query heads are grouped over key/value heads (GQA): query head h uses key/value head h // (Hq // Hkv).
`weight` broadcasts to (B, Hq, T): gamma for `shared_norm`, g for `mix`.
Branch sums arrive as numerators (B, Hq, T, d) and denominators (B, Hq, T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def pad_time(x: torch.Tensor, front: int, back: int, dim: int = 2) -> torch.Tensor:
    """x with `front` zeros before and `back` zeros after along the time axis `dim`."""
    return F.pad(x, [0, 0] * (x.dim() - dim - 1) + [front, back])


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (a query with no keys: padding, or an empty linear support)."""
    empty = den == 0
    return torch.where(empty.unsqueeze(-1), torch.zeros_like(num), num / torch.where(empty, torch.ones_like(den), den).unsqueeze(-1))


def combine(rule: str, weight: torch.Tensor, swa: tuple[torch.Tensor, torch.Tensor], la: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Combine SWA and LA sums in 'hybrid' mode.

    shared_norm: (gamma * num_swa + num_la) / (gamma * den_swa + den_la)   (LoLCATs Eq. 7)
    mix:         g * num_swa/den_swa + (1 - g) * num_la/den_la; where LA has no keys, SWA alone.
    """
    num_s, den_s = swa
    num_l, den_l = la
    weight = weight.to(num_s.dtype)
    if rule == "shared_norm":
        return safe_div(weight.unsqueeze(-1) * num_s + num_l, weight * den_s + den_l)
    if rule == "mix":
        g = torch.where(den_l == 0, torch.ones_like(den_l), weight.expand_as(den_l))
        return g.unsqueeze(-1) * safe_div(num_s, den_s) + (1 - g).unsqueeze(-1) * safe_div(num_l, den_l)
    raise ValueError(f"unknown combination rule {rule!r}")


def expand_weight(weight, b: int, hq: int, t: int, like: torch.Tensor) -> torch.Tensor:
    """A float, a per-head (Hq,) tensor or a (B, Hq, T) tensor -> (B, Hq, T)."""
    if not torch.is_tensor(weight):  # filled on the device: a host-to-device copy cannot be captured in a CUDA graph
        return like.new_full((b, hq, t), float(weight))
    w = weight.to(dtype=like.dtype, device=like.device)
    if w.dim() == 1:
        w = w.view(1, -1, 1)
    return w.expand(b, hq, t)


def group_queries(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, ...) -> (B, Hkv, G, ...) so that key/value tensors broadcast over the group axis."""
    b, hq = x.shape[:2]
    return x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:])


def ungroup(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def sink_positions(valid: torch.Tensor, num_sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the first `num_sinks` valid tokens of each row: (B, n) indices and (B, n) validity."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :num_sinks]
    return order, valid.gather(1, order)


def first_valid(valid: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) mask of the first `n` valid tokens of each row (the sinks)."""
    idx, ok = sink_positions(valid, n)
    return torch.zeros_like(valid).scatter(1, idx, ok)


def masked_softmax_sums(logits: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, eq: str):
    """Max-shifted softmax sums over the keys in `mask`: numerator, denominator and the max (-inf where no key), so
    that sums over disjoint key sets merge exactly (`merge_softmax`). `eq` contracts weights with `values`."""
    logits = logits.masked_fill(~mask, float("-inf"))
    c = logits.amax(-1, keepdim=True)
    a = torch.exp(logits - torch.where(torch.isfinite(c), c, torch.zeros_like(c)))
    return torch.einsum(eq, a, values), a.sum(-1), c[..., 0]


def merge_softmax(*parts):
    """One softmax's (numerator, denominator) from (num, den, max) sums over disjoint key sets."""
    c = torch.stack([p[2] for p in parts]).amax(0)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    scales = [torch.exp(p[2] - c) for p in parts]  # 0 for an empty set (max -inf)
    num = sum(p[0] * s.unsqueeze(-1) for p, s in zip(parts, scales))
    den = sum(p[1] * s for p, s in zip(parts, scales))
    return num, den


def recall_error(kf: torch.Tensor, v: torch.Tensor, S: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sparse memory's score ||v - phi(k)^T S / phi(k)^T z||^2 of keys kf (B, Hkv, L, m), v (B, Hkv, L, d) against
    the linear state S (B, Hkv, m, d), z (B, Hkv, m): how badly the state recalls each value; +inf where the
    normaliser is 0 (the state cannot represent the key at all)."""
    kf, v = kf.to(S.dtype), v.to(S.dtype)
    num = torch.einsum("bhlm,bhmd->bhld", kf, S)
    den = torch.einsum("bhlm,bhm->bhl", kf, z)
    empty = den == 0
    err = (v - num / torch.where(empty, torch.ones_like(den), den).unsqueeze(-1)).square().sum(-1)
    return torch.where(empty, torch.full_like(err, float("inf")), err)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None = None,
                history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time, per head and channel (HybridConfig.qk_conv): x (B, H, T, d), weight
    (H, d, K), out[t] = weight[..., K-1] * x[t] + sum_{j < K-1} weight[..., j] * x[t - K + 1 + j].

    The past taps read x with invalid positions (`valid` (B, T) False) set to 0 and `history` (B, H, K - 1, d), the
    K - 1 (already masked) inputs before x (None: zeros, the start of a row), so padding never reaches a valid token.
    The current tap reads x itself and comes first: with the identity taps (last 1, others 0) out == x bit for bit.
    Returns (out, the K - 1 masked inputs that end the row: the history of the next call)."""
    taps = weight.shape[-1]
    b, h, t, d = x.shape
    masked = x if valid is None else torch.where(valid[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    if history is None:
        history = x.new_zeros(b, h, taps - 1, d)
    padded = torch.cat([history.to(x.dtype), masked], 2)  # (B, H, K - 1 + T, d)
    w = weight.to(x.dtype)[None, :, None]  # (1, H, 1, d, K)
    out = x * w[..., taps - 1]
    for j in range(taps - 1):
        out = out + padded[:, :, j:j + t] * w[..., j]
    return out, padded[:, :, padded.shape[2] - (taps - 1):]


def key_mask(t0: int, t1: int, s: int, window: int | None, valid: torch.Tensor | None, device,
             s0: int = 0) -> torch.Tensor:
    """(B or 1, 1, 1, t1-t0, s-s0) mask of the softmax keys s0..s-1 queries t0..t1-1 see (causal, within `window`,
    not padding)."""
    tq = torch.arange(t0, t1, device=device)[:, None]
    ts = torch.arange(s0, s, device=device)[None, :]
    mask = ts <= tq
    if window is not None:
        mask = mask & (tq - ts < window)
    mask = mask[None, None, None]
    if valid is not None:
        mask = mask & valid[:, None, None, None, s0:s]
    return mask


#: Queries per block of a masked `softmax_attention`: a block sees at most SOFTMAX_BLOCK + window keys, never T x T.
SOFTMAX_BLOCK = 1024


def softmax_attention(q, k, v, *, scale: float, window: int | None = None, valid: torch.Tensor | None = None,
                      block: int = SOFTMAX_BLOCK) -> torch.Tensor:
    """The base's softmax attention (B, Hq, T, d) -- the transfer objectives' teacher, a query memory's exact prefill:
    causal, optionally within the last `window` keys, GQA, padding keys masked.
    Without a window or padding one flash call; with them, blocks of `block` queries over only the keys they can
    see (a block's mask is `block` x (block + window) where one mask for all queries would be T x T)."""
    b, hq, t, d = q.shape
    rep = hq // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if window is None and valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    outs = []
    for t0 in range(0, t, block):
        t1 = min(t0 + block, t)
        s0 = 0 if window is None else max(0, t0 - window + 1)
        mask = key_mask(t0, t1, t1, window, valid, q.device, s0=s0)[:, 0]  # (B or 1, 1, C, S)
        outs.append(F.scaled_dot_product_attention(q[:, :, t0:t1], k[:, :, s0:t1], v[:, :, s0:t1], attn_mask=mask,
                                                   scale=scale))
    return torch.nan_to_num(torch.cat(outs, dim=2))  # a query with no valid key (left padding) gets 0
