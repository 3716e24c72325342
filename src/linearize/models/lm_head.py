"""The language-model head, applied in slices: final-logit softcapping and next-token losses.

Training (`train/finetune`) and evaluation (`evaluate/probes`, `evaluate/long_score`) read logits from the last
hidden states a slice of positions at a time, so the (tokens x vocabulary) logits of a whole batch never exist
(Gemma's vocabulary has 262k entries). Gemma 2 caps its final logits (`final_logit_softcapping`), which the
decoder's hidden states do not include, so every caller applies the cap here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["final_softcap", "final_logits", "final_logits_fn", "chunk_loss_sum", "chunk_kl_sum"]


def final_softcap(model) -> float | None:
    """The model's final-logit softcap (None when it has none)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)


def final_logits(head, softcap: float | None, h: torch.Tensor) -> torch.Tensor:
    """float32 logits of hidden states `h` through `head`, capped as the model caps them."""
    logits = head(h).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def final_logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h -> logits`` for `model` (its output embeddings and softcap)."""
    head, softcap = model.get_output_embeddings(), final_softcap(model)
    return lambda h: final_logits(head, softcap, h)


def chunk_loss_sum(head, softcap: float | None, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of targets `y` (N,) under hidden states `h` (N, D); one slice of a chunked loss
    (a plain function of its tensors, so the training loss can recompute it under activation checkpointing)."""
    return F.cross_entropy(final_logits(head, softcap, h), y, reduction="sum")


def chunk_kl_sum(head, softcap: float | None, h: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || model) of the next-token distributions of hidden states `h` and the teacher's
    `h_teacher` (N, D), through the same head; gradients reach `h` only. A plain function of its tensors, like
    `chunk_loss_sum`, so the training loss can recompute it under activation checkpointing."""
    logp = F.log_softmax(final_logits(head, softcap, h), dim=-1)
    with torch.no_grad():
        logq = F.log_softmax(final_logits(head, softcap, h_teacher), dim=-1)
    return F.kl_div(logp, logq, reduction="sum", log_target=True)
