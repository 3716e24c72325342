"""The specification: a plain quadratic implementation with explicit (T x T) masks.

Slow and memory-hungry on purpose; every fast path is tested against it.
For query t (positions counted over the whole row, padding included):
  window   W_t = {s : t - w < s <= t}
  LA       P_t = {s <= t - w} ('complementary') or {s <= t} ('overlap'); {s <= t} in 'la_only' mode
  sinks        = the first `num_sinks` valid tokens, s <= t ('sinks_only' diagnostic)
Padding keys (valid == False) enter no sum.

Softmax sinks (softmax_sinks = n > 0; 'hybrid' and 'swa_only' modes). Z = the first n valid tokens of the row.
  softmax covers W_t + {s in Z : s <= t}; 'complementary' LA covers P_t minus Z ('overlap' and 'la_only' unchanged).

Sparse exact memory (sparse_memory = m > 0, memory_block = C; 'hybrid' mode only: 'swa_only', 'la_only' and
'sinks_only' ignore it). Boundaries b = 0, C, 2C, ...; B(t) = C * floor(t / C) is the last boundary <= t.
  At boundary b the keys that left the window of query b since the previous boundary,
      N_b = {s valid, s not in Z : b - C - w < s <= b - w},
  join the memory's keys as candidates, each scored against the linear state of L_{b-C}
  (S = sum phi(k_s) v_s^T, z = sum phi(k_s) over s in L_{b-C}) by how badly it would recall the key's value:
      score_s = || v_s - phi(k_s)^T S / phi(k_s)^T z ||^2      (+inf where phi(k_s)^T z = 0: nothing to recall from).
  Keys already in memory are scored again at every boundary (as LoLA does): a score kept from an earlier state would
  freeze the memory on the first keys, which all score +inf against the empty state.
      M_b = the m keys of M_{b-C} + N_b with the highest scores (equal scores: the older key first),
      L_b = L_{b-C} + (M_{b-C} + N_b minus M_b),                     M_0 = L_0 = {}.
  Every valid key s <= b - w outside Z is in exactly one of M_b and L_b. For query t, with B = B(t):
      softmax   {s : B - w < s <= t} + {s in Z : s <= t} + M_B    (the window reaches back to the last boundary:
                                                                    keys that left it since are not scored yet)
      LA        L_B ('complementary') or {s <= t} ('overlap')
  so under 'complementary' every valid key s <= t is in exactly one branch. Selection is per (row, KV head) and not
  differentiated (scores and ranking under no_grad).

Sparse memory with the decaying states ('gated', 'delta'). The sets M_b, N_b and the softmax branch are as above;
what differs is the state L, which is no longer a function of the set L_b. As for 'sum', L is the linear branch
under 'complementary'; under 'overlap' the linear branch is the plain state over every key and L only scores. With
a_u = log_decay[u] and entry(s) = s + w (the step at which key s enters the plain lag-w state), key s's age at step
u is A(s, u) = sum_{entry(s) < u' <= u} a_u'. The state L is carried step by step:
      at every step u:     L <- exp(a_u) L                                   (the plain state's decay)
      at a boundary b > 0: score M_{b-C} + N_b against L (as it stands after step b's decay), keep the top m as M_b,
                           and let the others enter L in time order, each weighed by its age gamma_s = exp(A(s, b)):
        'gated'  S += gamma_s phi(k_s) v_s^T,  z += gamma_s phi(k_s);      score ||v - phi(k)^T S / phi(k)^T z||^2
                 (+inf where phi(k)^T z = 0). A key in L at step t thus weighs exp(A(s, t)), the weight it has in the
                 plain gated state: with m = 0 the memory changes only when keys enter (at the next boundary instead
                 of at entry(s)), and with m = 0 and C = 1 it is the plain gated state exactly.
        'delta'  the delta rule's write with strength gamma_s beta_s: S += gamma_s beta_s k^_s (v_s - S^T k^_s)^T;
                 score ||v - S^T k^||^2 (the state's own recall error; k^ the unit-norm feature). den = 1 once a
                 valid key has entered L (per row), else 0. With m = 0 and C = 1 it is the plain lag-w delta state.
  Query t reads L as it stands at step t (after step t's decay and the boundary at t, if any).

Sparse memory chosen by the prompt's question (memory_select = 'query', SnapKV-style; any kind). A full forward has
no end of prompt: it runs without the memory (the definitions above with m = 0). A prefill of a prompt of P tokens
(positions 0 .. P - 1 of the row, padding included) chooses the memory once, for its last R = min(memory_reread, P)
tokens and all later ones (they are read again against it):
  observers  O = the last memory_observe valid positions < P (all of them if fewer), the last token's included;
  score_s  = sum over o in O of softmax_{s' valid, s' <= o}(scale q_o . k_s')[s] for each of the G query heads of s's
             KV head, then their sum (memory_heads 'sum') or their largest (memory_heads 'max');
  N        = {s valid, s not in Z : s <= P - R - w} (outside the window of the first re-read token); pooled_s = max of
             score_s' * [s' in N] over |s' - s| <= memory_pool // 2;  M = the m keys of N with the highest pooled
             scores (equal: the older first), per (row, KV head).
For every query t >= P - R (the prompt's last R tokens and the decoded ones):
      softmax   {s : t - w < s <= t} + {s in Z : s <= t} + M                              ('hybrid' only)
      LA        'complementary': the kind's state over {s valid, s not in Z : s <= t - w, s not in M}, i.e. the kind's
                naive sums with lag w where the keys of M have zero features: 'sum' and 'gated' add phi(k) v^T, the
                delta rule writes k^ = phi(k) / ||phi(k)|| and k^ = 0 writes nothing (den: 1 once a valid key
                outside Z that not every KV head of the row keeps has entered -- a state that took nothing in is
                not mixed in as an empty readout); 'overlap' and 'la_only': every valid key (unchanged). With
                memory_in_state the keys of M keep their features: the state over {s valid, s not in Z : s <= t - w},
                as a full forward (and training) has it.
  So the memory is fixed after the prefill and keys leaving the window later enter the linear state as usual --
  unless memory_fill: then M also holds, per (row, KV head), the first m - |M| keys of {s valid, s not in Z :
  s > P - R - w} in time order (those that leave the window after the selection take its free slots; query t reads
  only those with s <= t), and they stay out of the complementary state as the chosen ones do.
  `query_memory_reference` is this definition as plain loops.
"""

from __future__ import annotations

import torch

from linearize.attention.common import combine, expand_weight, first_valid, group_queries, recall_error, safe_div, ungroup
from linearize.attention.linear import linear_state as linear_state_kind
from linearize.attention.linear.delta.inputs import unit_norm
from linearize.attention.linear.sum import masked_sums
from linearize.attention.memory import memory_kind
from linearize.attention.spec import AttentionSpec
from linearize.config import ComponentMode, component_mode


def memory_sets(kf, v, candidate, *, window: int, block: int, slots: int):
    """M_b and L_b of the module docstring for the boundaries b = 0, C, ... below T: two (B, Hkv, T // C + 1, T)
    masks, recomputed from scratch at every boundary. `candidate` (B, T): valid keys outside the sinks."""
    b, hkv, t, _ = kf.shape
    pos = torch.arange(t, device=kf.device)
    mem = torch.zeros(b, hkv, t, dtype=torch.bool, device=kf.device)
    la = mem.clone()
    mems, las = [mem], [la]
    for bound in range(block, (t - 1) // block * block + 1, block):
        new = (candidate & (pos > bound - block - window) & (pos <= bound - window))[:, None].expand(b, hkv, t)
        with torch.no_grad():
            weights = kf * la.unsqueeze(-1)
            score = recall_error(kf, v, torch.einsum("bhsm,bhsd->bhmd", weights, v), weights.sum(2))
            pool = mem | new
            ranked = torch.where(pool, score, torch.full_like(score, float("-inf")))
            top = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :slots]
            mem = torch.zeros_like(mem).scatter(-1, top, True) & pool
        la = la | (pool & ~mem)
        mems.append(mem)
        las.append(la)
    return torch.stack(mems, 2), torch.stack(las, 2)


def decayed_memory_walk(qf, kf, v, candidate, *, kind, window: int, block: int, slots: int, log_decay=None,
                        beta=None):
    """The sparse memory of a decaying kind ('gated', 'delta') by a plain loop over the steps of the module
    docstring: the memory M_B(t) in force for each query as a (B, Hkv, T, S) mask, and the linear sums (num (B, Hq,
    T, d), den (B, Hq, T)) of each query against the state L."""
    b, hkv, t, m = kf.shape
    d = v.shape[-1]
    pos = torch.arange(t, device=kf.device)
    ld = torch.zeros(b, hkv, t, dtype=kf.dtype, device=kf.device) if log_decay is None else log_decay
    cum = ld.cumsum(-1)
    at_entry = cum.gather(-1, (pos + window).clamp(max=t - 1).expand(b, hkv, t))  # cum[entry(s)] (used where <= t-1)
    delta = kind.name == "delta"
    k_hat = unit_norm(kf)
    state = kind.init_state(b, hkv, m, d, dtype=kf.dtype, device=kf.device)
    S, second = state.tensors()  # z ('gated') or entered ('delta')
    mem = torch.zeros(b, hkv, t, dtype=torch.bool, device=kf.device)
    mems, nums, dens = [], [], []
    for u in range(t):
        a = ld[:, :, u].exp()
        S = S * a[..., None, None]
        second = second if delta else second * a[..., None]
        if u and u % block == 0:
            new = (candidate & (pos > u - block - window) & (pos <= u - window))[:, None].expand(b, hkv, t)
            pool = mem | new
            with torch.no_grad():
                score = kind.recall_error(type(state)(S, second), kf, v)
                ranked = torch.where(pool, score, torch.full_like(score, float("-inf")))
                top = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :slots]
                keep = torch.zeros_like(mem).scatter(-1, top, True) & pool
            dropped = pool & ~keep
            gamma = torch.exp(cum[..., u, None] - at_entry) * dropped
            if delta:
                for s in range(t):  # the writes, oldest key first
                    strength = gamma[:, :, s] * (1.0 if beta is None else beta[:, :, s])
                    error = v[:, :, s] - torch.einsum("bhmd,bhm->bhd", S, k_hat[:, :, s])
                    S = S + strength[..., None, None] * k_hat[:, :, s, :, None] * error[..., None, :]
                second = second | dropped.flatten(1).any(1)
            else:
                S = S + torch.einsum("bhsm,bhsd->bhmd", kf * gamma[..., None], v)
                second = second + (kf * gamma[..., None]).sum(2)
            mem = keep
        mems.append(mem)
        qg = group_queries(qf[:, :, u], hkv)  # (B, Hkv, G, m)
        if delta:
            nums.append(ungroup(torch.einsum("bhgm,bhmd->bhgd", unit_norm(qg), S)))
            dens.append(second.to(qf.dtype)[:, None].expand(b, qf.shape[1]))
        else:
            nums.append(ungroup(torch.einsum("bhgm,bhmd->bhgd", qg, S)))
            dens.append(ungroup(torch.einsum("bhgm,bhm->bhg", qg, second)))
    return torch.stack(mems, 2), (torch.stack(nums, 2), torch.stack(dens, 2))


def hybrid_attention_reference(
    q, k, v, qf, kf, *, spec: AttentionSpec, mode: str | ComponentMode = "hybrid", weight: torch.Tensor | float = 0.1,
    valid: torch.Tensor | None = None, log_decay: torch.Tensor | None = None, beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """The linear branch is the `linear_state` kind's `naive` definition (attention.linear): keys enter it `lag` steps
    late (w for 'complementary', else 0), the sinks and padding never ('complementary' LA without the sinks)."""
    mode = component_mode(mode)
    spec = spec.full_forward()  # under memory_select 'query' the memory acts at prefill only
    kind = linear_state_kind(spec.linear_state)
    window = spec.window
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    if mode.no_branch:
        return torch.zeros_like(q)
    pos = torch.arange(t, device=q.device)
    diff = pos[:, None] - pos[None, :]  # t - s
    causal = diff >= 0
    keymask = valid[:, None, None, None, :]  # (B, 1, 1, 1, S) against (B, Hkv, G, T, S)

    qg = group_queries(q, hkv)
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k) * spec.scale

    def softmax_sums(mask):
        mask = mask & keymask
        masked = logits.masked_fill(~mask, float("-inf"))
        c = masked.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        a = torch.exp(masked - c)
        return ungroup(torch.einsum("bhgts,bhsd->bhgtd", a, v)), ungroup(a.sum(-1))

    def linear_sums(enter, lag):
        return kind.naive(qf, kf, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag)

    if mode.uses_sinks:
        return safe_div(*softmax_sums(causal & first_valid(valid, spec.num_sinks)[:, None, None, None, :]))
    if not mode.uses_window:
        return safe_div(*linear_sums(valid, mode.linear_lag(spec.placement, window)))
    window_mask = causal & (diff < window)
    complementary = spec.placement == "complementary"
    la_enter = valid
    if spec.softmax_sinks:
        sinks = first_valid(valid, spec.softmax_sinks)
        window_mask = window_mask | (causal & sinks[:, None, None, None, :])
        if complementary:
            la_enter = valid & ~sinks
    if not mode.uses_linear:
        return safe_div(*softmax_sums(window_mask))
    if spec.sparse_memory:
        block = spec.memory_block
        candidate = valid & ~first_valid(valid, spec.softmax_sinks)
        stretched = causal & (pos[None, :] > ((pos // block) * block - window)[:, None])  # back to B(t) - w
        if not memory_kind(spec).additive:
            mem, la = decayed_memory_walk(qf, kf, v, candidate, kind=kind, window=window, block=block,
                                          slots=spec.sparse_memory, log_decay=log_decay, beta=beta)
            if not complementary:
                la = linear_sums(la_enter, 0)
            return combine(spec.rule, expand_weight(weight, b, hq, t, q),
                           softmax_sums(window_mask | stretched | mem.unsqueeze(2)), la)
        mem, la_set = memory_sets(kf, v, candidate, window=window, block=block, slots=spec.sparse_memory)
        blk = pos // block  # the sets in force for query t are those of boundary B(t)
        mem, la_set = mem[:, :, blk, :].unsqueeze(2), la_set[:, :, blk, :].unsqueeze(2)  # (B, Hkv, 1, T, S)
        window_mask = window_mask | stretched | mem
        if complementary:  # the 'sum' state: L_B is a set of keys
            return combine(spec.rule, expand_weight(weight, b, hq, t, q), softmax_sums(window_mask),
                           masked_sums(qf, kf, v, la_set & keymask))
    return combine(spec.rule, expand_weight(weight, b, hq, t, q), softmax_sums(window_mask),
                   linear_sums(la_enter, mode.linear_lag(spec.placement, window)))


def query_memory_selection(q, k, valid, *, spec: AttentionSpec, prompt: int) -> torch.Tensor:
    """M of memory_select 'query' (module docstring) by plain loops: the (B, Hkv, T) mask of the keys kept after a
    prefill of `prompt` tokens."""
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    sinks = first_valid(valid, spec.softmax_sinks)
    chosen = torch.zeros(b, hkv, t, dtype=torch.bool)
    reach = spec.memory_pool // 2
    for row in range(b):
        keys = [s for s in range(t) if valid[row, s]]
        observers = [o for o in range(prompt) if valid[row, o]][-spec.memory_observe:]
        candidates = [s for s in keys if not sinks[row, s] and s <= prompt - min(spec.memory_reread, prompt) - spec.window]
        for h in range(hkv):
            per_head = [[0.0] * t for _ in range(g)]
            for o in observers:
                seen = [s for s in keys if s <= o]
                for i, head in enumerate(range(h * g, (h + 1) * g)):
                    logits = torch.stack([q[row, head, o].double() @ k[row, h, s].double() for s in seen]) * spec.scale
                    for s, a in zip(seen, torch.softmax(logits, 0).tolist()):
                        per_head[i][s] += a
            combine = max if spec.memory_heads == "max" else sum
            score = [combine(scores[s] for scores in per_head) for s in range(t)]
            pooled = {s: max(score[u] for u in candidates if abs(u - s) <= reach) for s in candidates}
            for s in sorted(candidates, key=lambda s: (-pooled[s], s))[:spec.sparse_memory]:
                chosen[row, h, s] = True
            if spec.memory_fill:  # the keys leaving the window later take the free slots, oldest first
                later = [s for s in keys if not sinks[row, s] and s > prompt - min(spec.memory_reread, prompt) - spec.window]
                for s in later[:spec.sparse_memory - int(chosen[row, h].sum())]:
                    chosen[row, h, s] = True
    return chosen


def query_memory_reference(q, k, v, qf, kf, *, spec: AttentionSpec, prompt: int, mode: str | ComponentMode = "hybrid",
                           weight: torch.Tensor | float = 0.1, valid=None, log_decay=None, beta=None):
    """memory_select 'query' (module docstring): the outputs (B, Hq, T - prompt + R, d) of the prompt's last R =
    min(memory_reread, prompt) tokens and every later one, after a prefill of `prompt` >= 1 tokens, query by query;
    and the memory M (B, Hkv, T)."""
    mode = component_mode(mode)
    kind = linear_state_kind(spec.linear_state)
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    window = spec.window
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    chosen = query_memory_selection(q, k, valid, spec=spec, prompt=prompt)
    sinks = first_valid(valid, spec.softmax_sinks)
    weight = expand_weight(weight, b, hq, t, q)
    lag = mode.linear_lag(spec.placement, window)
    if lag:  # the complementary state: the kept keys never enter (zero features; memory_in_state: they do), nor do the sinks
        kept_out = kf if spec.memory_in_state else kf * ~chosen[..., None]
        enter = valid & ~sinks if spec.memory_in_state else valid & ~sinks & ~chosen.all(1)
        la = kind.naive(qf, kept_out, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag)
    elif lag == 0:
        la = kind.naive(qf, kf, v, log_decay=log_decay, beta=beta, enter=valid, lag=0)
    outs = []
    for t_ in range(prompt - min(spec.memory_reread, prompt), t):
        if mode.no_branch:
            outs.append(torch.zeros_like(q[:, :, t_]))
            continue
        pos = torch.arange(t, device=q.device)
        if mode.uses_sinks:
            soft = valid & first_valid(valid, spec.num_sinks) & (pos <= t_)
        else:
            soft = (pos > t_ - window) & (pos <= t_) | (sinks & (pos <= t_))
        seen = chosen & (pos <= t_) if mode.combines else False  # (memory_fill: the later keys once they exist)
        soft = valid[:, None] & (soft[:, None] | seen)  # (B, Hkv, T)
        logits = torch.einsum("bhgd,bhsd->bhgs", group_queries(q[:, :, t_], hkv), k) * spec.scale
        logits = logits.masked_fill(~soft[:, :, None], float("-inf"))
        c = logits.amax(-1, keepdim=True)
        a = torch.exp(logits - torch.where(torch.isfinite(c), c, torch.zeros_like(c)))
        swa = ungroup(torch.einsum("bhgs,bhsd->bhgd", a, v)), ungroup(a.sum(-1))
        if not mode.uses_linear:
            outs.append(safe_div(*swa))
        elif not mode.uses_window:
            outs.append(safe_div(la[0][:, :, t_], la[1][:, :, t_]))
        else:
            outs.append(combine(spec.rule, weight[:, :, t_], swa, (la[0][:, :, t_], la[1][:, :, t_])))
    return torch.stack(outs, 2), chosen
