"""Stage 1: attention transfer. The base model is frozen; only the feature maps (and, where the recipe says,
gamma / the mixing gate; the gated/delta states' decay and beta projections with the feature maps) train, so the linear branch learns to imitate the base's softmax attention.

The teacher is the base layer's own attention in the same forward: its q/k/v come from the frozen
projections (`HybridAttention.project`), softmax over all past keys -- or over the base's own sliding
window (`module.base_sliding_window`, Gemma 3 local layers) -- with the base's scale, GQA included.
Each converted layer's `transfer_hook` computes the teacher output and the student, adds the layer's loss
to a list, and returns the TEACHER output, so every later layer sees the base model's hidden states. All
layers train together in one forward of `model.get_decoder()`; the LM head is never computed.

Objectives (per layer, averaged over heads, batch and positions; then averaged over layers, times
`loss_scale`):

- ``weights``: KL(teacher softmax weights || LA-only weights), with the LA weights
  ``b_ts / sum_{s<=t} b_ts`` over ALL past keys. This is the Hedgehog cross-entropy minus the teacher's
  entropy (a constant for the feature maps): same gradients, and 0 when the student equals the teacher.
  Computed in blocks of `query_block` queries, each block recomputed in the backward pass
  (activation checkpointing), so no T x T tensor is held. Every b gets +1e-12 (negative b, from the 'none'
  map, count as 0), so the LA weights always form a distribution and the KL is never negative.
  Where the teacher is the base's sliding window, its weights are 0 outside the window; the KL then
  pushes the student's mass into the window through its normaliser. With the 'gated' linear state the LA
  weights carry its decay, ``b_ts exp(sum_{u=s+1}^{t} log_decay_u)`` (its closed form at lag 0); the 'delta'
  state has no such weights (refused: use ``output`` or ``hybrid_output``).
- ``output``: MSE between the teacher output and the ``la_only`` output (per head, before o_proj).
- ``hybrid_output``: MSE between the teacher output and the ``hybrid`` output (LoLCATs; they use
  ``loss_scale`` 1000).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from linearize.attention.common import group_queries, key_mask, softmax_attention, ungroup
from linearize.attention.module import hybrid_param_kind
from linearize.models.convert import hybrid_modules

#: The transfer objectives of stage 1, name -> the loss of one layer (recipes check stage1.objective against it).
#: Each objective adds itself with `register_objective`, so a new one is one function in one place.
#: The loss is called as ``fn(module, q, k, v, valid, weight, teacher, window=..., query_block=...)``: the layer, its
#: projected q/k/v (B, H, T, d), the valid-key mask, the mixing weight, the teacher's output and its window.
OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {}
_NEG = -1e30


def register_objective(name: str):
    """Decorator: add a layer loss to `OBJECTIVES` under `name` (a name is registered once)."""

    def add(fn):
        if name in OBJECTIVES:
            raise ValueError(f"transfer objective {name!r} is registered twice")
        OBJECTIVES[name] = fn
        return fn

    return add


def _block_kl(qg, qfg, k, kf, scale, window, valid, t0, eps, cum=None):
    t1 = t0 + qg.shape[3]
    mask = key_mask(t0, t1, t1, window, valid, qg.device)  # (B|1, 1, 1, C, S)
    la_mask = mask if window is None else key_mask(t0, t1, t1, None, valid, qg.device)  # student: all past keys
    with torch.no_grad():
        logits = torch.einsum("bhgcd,bhsd->bhgcs", qg.float(), k[:, :, :t1].float()) * scale
        logp = torch.log_softmax(logits.masked_fill_(~mask, _NEG), dim=-1)
        p = logp.exp()  # exactly 0 outside the teacher's keys
    bts = torch.einsum("bhgcm,bhsm->bhgcs", qfg.float(), kf[:, :, :t1].float())
    # eps on every student key keeps q a distribution (KL >= 0) even where all b underflow or are negative (the
    # 'none' map); clamping b and its sum separately instead let a map that drives every b below eps score -H(p) < 0
    bts = (bts.clamp_min(0.0) + eps).masked_fill(~la_mask, 0.0)
    if cum is None:
        logq = torch.log(bts) - torch.log(bts.sum(-1, keepdim=True))
    else:  # decayed weights b_ts exp(C_t - C_s), normalised in log space (C = cumsum of log_decay, (B, Hkv, T))
        decay = (cum[:, :, None, t0:t1, None] - cum[:, :, None, None, :t1]).to(bts.dtype)  # float64 prefix sums: exact
        logb = (torch.log(bts) + decay).masked_fill(~la_mask, _NEG)
        logq = logb - torch.logsumexp(logb, -1, keepdim=True)
    return (p * (logp - logq.masked_fill(~la_mask, 0.0))).sum(-1)  # (B, Hkv, G, C); p = 0 where masked


def attention_weights_kl(q, k, qf, kf, *, scale: float, window: int | None = None, valid: torch.Tensor | None = None,
                         block: int = 256, eps: float = 1e-12, log_decay: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (batch, query heads, valid queries) of KL(softmax weights || LA weights), blockwise. `log_decay`
    (B, Hkv, T): the gated state's decay, which weighs the LA weights."""
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    qg, qfg = group_queries(q, hkv), group_queries(qf, hkv)
    kls = []
    cum = None if log_decay is None else log_decay.double().cumsum(-1)
    for t0 in range(0, t, block):
        t1 = min(t0 + block, t)
        args = (qg[:, :, :, t0:t1], qfg[:, :, :, t0:t1], k, kf, scale, window, valid, t0, eps, cum)
        # several blocks: recompute each in the backward pass, so only one block's (C x T) tensors live at once
        trains = qf.requires_grad or kf.requires_grad or (log_decay is not None and log_decay.requires_grad)
        if t > block and torch.is_grad_enabled() and trains:
            kls.append(checkpoint(_block_kl, *args, use_reentrant=False))
        else:
            kls.append(_block_kl(*args))
    kl = ungroup(torch.cat(kls, dim=3))  # (B, Hq, T)
    if valid is None:
        return kl.mean()
    w = valid[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * w).sum() / w.sum().clamp_min(1)


def masked_mse(teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over (B, H, T, d), padding positions left out."""
    err = (student.float() - teacher.float()) ** 2
    if valid is None:
        return err.mean()
    w = valid[:, None, :, None].to(err.dtype)
    return (err * w).sum() / (w.sum() * err.shape[1] * err.shape[-1]).clamp_min(1)


@register_objective("weights")
def weights_objective(module, q, k, v, valid, weight, teacher, *, window, query_block, gates):
    """KL(teacher softmax weights || LA-only weights); the teacher's output is not needed."""
    qf, kf, _ = module.features(q, k, valid)
    return attention_weights_kl(q, k, qf, kf, scale=module.scale, window=window, valid=valid, block=query_block,
                                log_decay=gates.get("log_decay"))


@register_objective("output")
def output_objective(module, q, k, v, valid, weight, teacher, *, window, query_block, gates):
    """MSE between the teacher output and the la_only output."""
    return masked_mse(teacher, module.attend(q, k, v, weight, valid, "la_only", gates), valid)


@register_objective("hybrid_output")
def hybrid_output_objective(module, q, k, v, valid, weight, teacher, *, window, query_block, gates):
    """MSE between the teacher output and the hybrid output (LoLCATs)."""
    return masked_mse(teacher, module.attend(q, k, v, weight, valid, "hybrid", gates), valid)


class AttentionTransfer:
    """Installs the transfer hooks on every converted layer and collects the per-layer losses. `recompute`: each
    layer's loss keeps only its inputs for the backward pass and is computed again there (activation
    checkpointing: the same loss and gradients, the student's intermediate tensors of one layer at a time)."""

    def __init__(self, model, objective: str = "weights", loss_scale: float = 1.0, query_block: int = 256,
                 recompute: bool = False):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown transfer objective {objective!r}; expected one of {tuple(OBJECTIVES)}")
        self.model = model
        self.objective = objective
        self._layer_loss = OBJECTIVES[objective]
        self.loss_scale = float(loss_scale)
        self.query_block = query_block
        self.recompute = recompute
        self.modules = hybrid_modules(model)
        if not self.modules:
            raise ValueError("attention transfer needs a converted model (linearize.convert)")
        unweighted = sorted({m.hybrid.linear_state for m in self.modules if not m.linear_kind.normalised})
        if objective == "weights" and unweighted:
            raise ValueError(f"the 'weights' objective needs attention weights, which linear_state {unweighted[0]!r} "
                             f"does not have; use the 'output' or 'hybrid_output' objective")
        self.losses: list[torch.Tensor] = []

    def hook(self, module, q, k, v, valid, weight, hidden_states):
        window = module.base_sliding_window
        with torch.no_grad():
            teacher = softmax_attention(q, k, v, scale=module.scale, window=window, valid=valid)
        args = (q, k, v, valid, weight, teacher, hidden_states)
        if self.recompute and torch.is_grad_enabled():
            loss = checkpoint(self._student_loss, *args, module=module, window=window, use_reentrant=False)
        else:
            loss = self._student_loss(*args, module=module, window=window)
        self.losses.append(loss)
        return teacher

    def _student_loss(self, q, k, v, valid, weight, teacher, hidden_states, *, module, window):
        """One layer's loss against its teacher (the gates inside: the decay/beta projections train with it)."""
        return self._layer_loss(module, q, k, v, valid, weight, teacher, window=window, query_block=self.query_block,
                                gates=module.state_inputs(hidden_states, valid))

    def __enter__(self):
        for m in self.modules:
            m.transfer_hook = self.hook
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m.transfer_hook = None
        self.losses = []

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder forward (no LM head); the mean per-layer loss times loss_scale."""
        self.losses = []
        self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if len(self.losses) != len(self.modules):
            raise RuntimeError(f"expected {len(self.modules)} layer losses, got {len(self.losses)} (are the hooks installed?)")
        loss = torch.stack(self.losses).mean() * self.loss_scale
        self.losses = []
        return loss


def trainable_transfer_params(model, train_feature_maps: bool = True, train_mixing: bool = False) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then unfreeze the feature maps (with the linear state's decay/beta projections) and/or the
    mixing parameters; returns them by name."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = {}
    for name, p in model.named_parameters():
        kind = hybrid_param_kind(name)
        if (kind in ("feature_map", "linear_state") and train_feature_maps) or (kind == "mixing" and train_mixing):
            p.requires_grad_(True)
            params[name] = p
    return params


def transfer_loss_fn(transfer: AttentionTransfer):
    """The loop's loss function for stage 1."""

    def loss_fn(batch, ctx):
        return transfer.loss(batch), {}

    return loss_fn


@torch.no_grad()
def transfer_validation(transfer: AttentionTransfer, val: torch.Tensor, batch_size: int = 4) -> float:
    total, n = 0.0, 0
    for i in range(0, len(val), batch_size):
        rows = val[i:i + batch_size]
        total += float(transfer.loss(rows)) * len(rows)
        n += len(rows)
    return total / max(n, 1)
