"""Chunked PyTorch implementation: no (T x T) tensor; time and memory grow linearly with T.

Sliding window: queries in blocks of C attend to a key block of C + w - 1 (a band mask inside it).
Linear branch: the `linear_state` kind's `chunked` sums (or its `fla_forward`) with keys entering w steps late for
'complementary', 0 otherwise (attention.linear).
Softmax sinks and sparse memory (see `reference`) add key sets to the softmax branch; each set's max-shifted sums
carry their max, and `merge_softmax` joins them into one softmax. With sparse memory the complementary linear branch
is the memory's walk over its state (`attention.memory`, PyTorch whatever `linear_backend` says: the fla kernels
cannot take the memory).

Training memory: the softmax sums build (B, Hkv, G, T / C, C, C + w - 1) weights (at Qwen2.5-1.5B's shape, window 512,
chunk 64, 4k-token rows of 8: 0.84 GiB each, three kept per layer for the backward pass); under autograd they are
recomputed in the backward pass instead of kept (`_recomputed`): the same values, only q, k, v held.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from linearize.attention.common import (
    combine, expand_weight, first_valid, group_queries, masked_softmax_sums, merge_softmax, pad_time, safe_div,
    sink_positions, ungroup,
)
from linearize.attention.linear import fla_route
from linearize.attention.linear import linear_state as linear_state_kind
from linearize.attention.memory import memory_kind, memory_walk
from linearize.attention.spec import AttentionSpec
from linearize.config import ComponentMode, component_mode


def _recomputed(fn, *args, **kwargs):
    """fn(*args, **kwargs); when a gradient will flow through the tensors in `args`, its intermediates are not kept
    for the backward pass but recomputed there (non-reentrant checkpoint: bit-identical values, so the same
    gradients)."""
    if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
        return checkpoint(functools.partial(fn, **kwargs), *args, use_reentrant=False)
    return fn(*args, **kwargs)


def window_sums(q, k, v, valid, *, scale, window, chunk, to_block_start=False, with_max=False):
    """Numerator (B, Hq, T, d) and denominator (B, Hq, T) of softmax over the window, max-shifted.

    `to_block_start`: the window of query t reaches back to c - w + 1, c = chunk * floor(t / chunk) (the sparse
    memory's softmax span, chunk = memory_block). `with_max`: also the max (B, Hq, T), -inf where no key.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    n = -(-t // chunk)
    tp = n * chunk
    span = chunk + window - 1
    qg = group_queries(pad_time(q, 0, tp - t), hkv).reshape(b, hkv, hq // hkv, n, chunk, d)
    kb = pad_time(k, window - 1, tp - t).unfold(2, span, chunk)  # (B, Hkv, N, d, span)
    vb = pad_time(v, window - 1, tp - t).unfold(2, span, chunk)
    vmask = F.pad(valid, (window - 1, tp - t)).unfold(1, span, chunk)  # (B, N, span)
    i = torch.arange(chunk, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    band = (j <= i + window - 1) if to_block_start else (j >= i) & (j <= i + window - 1)  # key j in query i's window
    mask = band & vmask[:, None, None, :, None, :]  # (B, 1, 1, N, C, span)
    logits = torch.einsum("bhgncd,bhnds->bhgncs", qg, kb) * scale
    num, den, c = masked_softmax_sums(logits, mask, vb, "bhgncs,bhnds->bhgncd")
    num = ungroup(num.reshape(b, hkv, hq // hkv, tp, d))[:, :, :t]
    den, c = (ungroup(x.reshape(b, hkv, hq // hkv, tp))[:, :, :t] for x in (den, c))
    return (num, den, c) if with_max else (num, den)


def sink_sums(q, k, v, valid, *, scale, num_sinks, offset=0, with_max=False):
    """Softmax sums over the first `num_sinks` valid tokens; query t reads sink s when s <= t - offset
    (`offset` an int or a (T,) tensor)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    idx, sink_valid = sink_positions(valid, num_sinks)  # (B, n)
    ks = k.gather(2, idx[:, None, :, None].expand(b, hkv, idx.shape[1], d))
    vs = v.gather(2, idx[:, None, :, None].expand(b, hkv, idx.shape[1], d))
    last = torch.arange(t, device=q.device) - torch.as_tensor(offset, device=q.device)
    mask = sink_valid[:, None, None, None, :] & (idx[:, None, None, None, :] <= last[None, None, None, :, None])
    logits = torch.einsum("bhgtd,bhsd->bhgts", group_queries(q, hkv), ks) * scale
    num, den, c = masked_softmax_sums(logits, mask, vs, "bhgts,bhsd->bhgtd")
    return (ungroup(num), ungroup(den)) + ((ungroup(c),) if with_max else ())


def memory_sums(q, qf, k, v, kf, candidate, *, spec: AttentionSpec, log_decay=None, beta=None):
    """Per memory block of queries: softmax sums over the memory in force (num, den, max) and the linear sums over
    the linear state in force (complementary LA), each query reading the state decayed by its steps since the
    block's boundary. One pass over the T / block boundaries."""
    kind = memory_kind(spec)
    log_decay, beta = (log_decay if kind.needs_log_decay else None), (beta if kind.needs_beta else None)
    block = spec.memory_block
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    n = -(-t // block)
    qg = group_queries(pad_time(q, 0, n * block - t), hkv).reshape(b, hkv, hq // hkv, n, block, d)
    qfb = pad_time(qf, 0, n * block - t).reshape(b, hq, n, block, qf.shape[-1])
    since = None
    if log_decay is not None:  # query jC + c reads the state decayed by the steps jC + 1 .. jC + c
        steps = F.pad(log_decay.float(), (0, n * block - t)).reshape(b, hkv, n, block)
        since = F.pad(steps[..., 1:].cumsum(-1), (1, 0))
    soft, lin = [], []
    walk = memory_walk(k, v, kf, candidate, kind=kind, window=spec.window, block=block, slots=spec.sparse_memory,
                       blocks=n, log_decay=log_decay, beta=beta, dtype=q.dtype)
    # the blocks unbound once: indexing block j in the loop would make each backward step a zero tensor of the whole
    # sequence (O(T^2 / block) memory traffic); unbind's backward stacks the blocks' gradients once
    q_blocks, qf_blocks = qg.unbind(3), qfb.unbind(2)
    since_blocks = None if since is None else since.unbind(2)
    for j, (state, (mk, mv, _, mvalid, *_)) in enumerate(walk):
        logits = torch.einsum("bhgcd,bhsd->bhgcs", q_blocks[j], mk) * spec.scale
        soft.append(masked_softmax_sums(logits, mvalid[:, :, None, None, :], mv, "bhgcs,bhsd->bhgcd"))
        lin.append(kind.read(state, qf_blocks[j]) if since is None else kind.read(state, qf_blocks[j], log_decay=since_blocks[j]))

    def flat(parts):  # per-block pieces (B, Hq, C, ...) -> (B, Hq, T, ...)
        return [torch.cat(x, 2)[:, :, :t] for x in zip(*parts)]

    return flat([[ungroup(x) for x in part] for part in soft]), flat(lin)


def reads_linear_sums(spec: AttentionSpec, mode: ComponentMode) -> bool:
    """A full-sequence call in `mode` computes the kind's linear sums (`linear_backend` chooses how): a mode with the
    linear branch, except where the sparse memory's walk supplies them (a combining mode, keys entering late)."""
    if not mode.uses_linear:
        return False
    return not (spec.sparse_memory > 0 and mode.combines and mode.linear_lag(spec.placement, spec.window) != 0)


def hybrid_attention_chunked(
    q, k, v, qf, kf, *, spec: AttentionSpec, mode: str | ComponentMode = "hybrid", weight=0.1, valid=None,
    log_decay=None, beta=None, linear_backend: str = "chunked",
) -> torch.Tensor:
    """`linear_backend`: 'chunked' (the kind's PyTorch sums) or 'fla' (its flash-linear-attention kernels)."""
    mode = component_mode(mode)
    spec = spec.full_forward()  # under memory_select 'query' the memory acts at prefill only
    kind = linear_state_kind(spec.linear_state)
    linear_fn = kind.chunked
    if linear_backend == "fla":  # its kernels, with fla's refusal of their backward lifted where found safe
        linear_fn = None if kind.fla_forward is None else functools.partial(fla_route.run, kind)
    if linear_fn is None:
        raise ValueError(f"linear state {spec.linear_state!r} has no {linear_backend!r} backend")
    extra = {} if linear_backend == "fla" else {"chunk": spec.chunk_size}

    def linear_sums(enter, lag):
        return linear_fn(qf, kf, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag, **extra)

    b, hq, t, _ = q.shape
    scale, window, chunk = spec.scale, spec.window, spec.chunk_size
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    if mode.no_branch:
        return torch.zeros_like(q)
    if mode.uses_sinks:
        return safe_div(*sink_sums(q, k, v, valid, scale=scale, num_sinks=spec.num_sinks))
    lag = mode.linear_lag(spec.placement, window)
    if not mode.uses_window:
        return safe_div(*linear_sums(valid, lag))
    memory = spec.sparse_memory > 0 and mode.combines
    if not (spec.softmax_sinks or memory):
        swa = _recomputed(window_sums, q, k, v, valid, scale=scale, window=window, chunk=chunk)
        if not mode.uses_linear:
            return safe_div(*swa)
        return combine(spec.rule, expand_weight(weight, b, hq, t, q), swa, linear_sums(valid, lag))
    # softmax over window (stretched to the block start with memory) + sinks (+ memory): disjoint sets, merged
    sinks = first_valid(valid, spec.softmax_sinks)
    if memory:
        block = spec.memory_block
        parts = [_recomputed(window_sums, q, k, v, valid, scale=scale, window=window, chunk=block, to_block_start=True,
                             with_max=True)]
        offset = torch.arange(t, device=q.device) % block + window  # sinks older than B(t) - w + 1
        mem, la_mem = memory_sums(q, qf, k, v, kf, valid & ~sinks, spec=spec, log_decay=log_decay, beta=beta)
        parts.append(mem)
    else:
        parts = [_recomputed(window_sums, q, k, v, valid, scale=scale, window=window, chunk=chunk, with_max=True)]
        offset = window
    if spec.softmax_sinks:
        parts.append(_recomputed(sink_sums, q, k, v, valid, scale=scale, num_sinks=spec.softmax_sinks, offset=offset,
                                 with_max=True))
    swa = merge_softmax(*parts)
    if not mode.uses_linear:
        return safe_div(*swa)
    if lag == 0:  # 'overlap': every key
        la = linear_sums(valid, 0)
    elif memory:
        la = la_mem
    else:
        la = linear_sums(valid & ~sinks, lag)
    return combine(spec.rule, expand_weight(weight, b, hq, t, q), swa, la)
