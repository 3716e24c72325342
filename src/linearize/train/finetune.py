"""Stage 2: LoRA fine-tuning of the converted model with the next-token loss (optionally with SSD).

- peft LoRA (defaults r=8, alpha=16, dropout 0 on q/k/v/o_proj); feature maps and mixing parameters
  frozen unless the recipe says otherwise. Without LoRA (`stage2.lora.enabled: false`) only the feature maps and
  mixing parameters train: the base's weights, and so the softmax branch, stay the base's.
- The objective (`FINETUNE_OBJECTIVES`): `lm`, the next-token cross-entropy of the data; or `kl`, the KL divergence
  from the base model's next-token distribution (self-distillation: the teacher is the same forward with every
  converted layer's attention computed as the base layer's own softmax attention and LoRA off, :func:`base_teacher`).
- Both are computed in chunks of `loss_chunk` tokens: hidden states -> lm_head -> loss per chunk, each chunk
  recomputed in the backward pass, so the (tokens x vocabulary) logits of a whole batch never exist (Gemma's
  vocabulary has 262k entries).
- Validation: LM loss of the held-out rows under each component mode (`hybrid`, `swa_only`, `la_only`
  by default), so a collapse (hybrid ~ swa_only, la_only bad) is visible during training.
- Gradient checkpointing (`stage2.gradient_checkpointing`, :func:`layer_checkpointing`): each decoder layer keeps only
  its input for the backward pass and is run again there; the loss and the gradients are those of the plain run.
"""

from __future__ import annotations

import contextlib

import math
import warnings

import torch
from torch.utils.checkpoint import checkpoint

from linearize.attention.module import HybridAttention, hybrid_param_kind
from linearize.models.convert import components, decoder_layers, hybrid_modules, is_converted
from linearize.models.lm_head import chunk_kl_sum, chunk_loss_sum, final_softcap
from linearize.train.ssd import SSDSchedule, clear_drops, dropped_fraction, set_drops
from linearize.attention.common import softmax_attention

#: Stage 2's losses (`stage2.objective`).
FINETUNE_OBJECTIVES = ("lm", "kl")


def _sum_over_slices(slice_sum, model, h: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum of slice_sum(head, softcap, h[i:i+chunk], target[i:i+chunk]) over slices of `chunk` positions, each slice
    recomputed in the backward pass when gradients flow: the vocabulary-sized logits never exist for the whole row."""
    head = model.get_output_embeddings()
    softcap = final_softcap(model)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(slice_sum, head, softcap, h[i:i + chunk], target[i:i + chunk], use_reentrant=False)
        else:
            total = total + slice_sum(head, softcap, h[i:i + chunk], target[i:i + chunk])
    return total


def lm_loss_sum(model, input_ids: torch.Tensor, *, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over a batch of packed rows, and the number of predicted tokens."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = input_ids[:, 1:].reshape(-1)
    return _sum_over_slices(chunk_loss_sum, model, h, y, chunk), int(y.numel())


def lm_loss(model, input_ids: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    total, n = lm_loss_sum(model, input_ids, chunk=chunk)
    return total / max(n, 1)


def _base_attention_hook(module, q, k, v, valid, weight, hidden_states):
    """A converted layer's attention as its base layer computes it (its own window, if any): the teacher."""
    return softmax_attention(q, k, v, scale=module.scale, window=module.base_sliding_window, valid=valid)


@contextlib.contextmanager
def base_teacher(model, peft_model=None):
    """Inside: `model` computes the base model's forward. Every converted layer returns the base layer's own softmax
    attention of its q/k/v (the `transfer_hook` stage 1's teacher uses), with `peft_model`'s adapters switched off, so
    the q/k/v and every other weight are the base's. Full-sequence forwards without a cache only."""
    modules = hybrid_modules(model)
    if not modules:
        raise ValueError("base_teacher needs a converted model (linearize.convert)")
    if any(m.transfer_hook is not None for m in modules):
        raise RuntimeError("a converted layer already has a transfer hook (stage 1's attention transfer?)")
    with peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext():
        for m in modules:
            m.transfer_hook = _base_attention_hook
        try:
            yield model
        finally:
            for m in modules:
                m.transfer_hook = None


def kl_loss_sum(model, input_ids: torch.Tensor, teacher_hidden: torch.Tensor, *,
                chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || model) of the next-token distributions at the positions `lm_loss_sum` scores, and their
    number; `teacher_hidden`: the teacher's last hidden states for the same rows (:func:`base_teacher`)."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    ht = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]).detach()
    return _sum_over_slices(chunk_kl_sum, model, h, ht, chunk), int(h.shape[0])


def kl_loss(model, input_ids: torch.Tensor, *, peft_model=None, chunk: int = 1024) -> torch.Tensor:
    """Mean KL(base || converted) per predicted token of `input_ids` (the teacher computed here, without gradients)."""
    with torch.no_grad(), base_teacher(model, peft_model):
        teacher = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    total, n = kl_loss_sum(model, input_ids, teacher, chunk=chunk)
    return total / max(n, 1)


def add_lora(model, lora: dict, *, train_feature_maps: bool = False, train_mixing: bool = False):
    """Wrap `model` with peft LoRA (in place: the original object gets the adapters); returns
    (peft_model, {name: trainable parameter}) with names as in `model.named_parameters()`. With
    ``lora["enabled"]`` false no adapters are added: (None, the feature maps and / or mixing parameters)."""
    peft_model = None
    if lora.get("enabled", True):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                            target_modules=list(lora["target_modules"]), bias="none")
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` (FutureWarning from transformers 5.24 on)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    params = {}
    for name, p in model.named_parameters():
        kind = hybrid_param_kind(name)
        if "lora_" in name:
            p.requires_grad_(True)
        elif (kind in ("feature_map", "linear_state") and train_feature_maps) or (kind == "mixing" and train_mixing):
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
        if p.requires_grad:
            params[name] = p
    return peft_model, params


#: What a hybrid layer's forward reads besides its inputs and weights that training changes between the forward and
#: the backward pass: the component modes and the SSD draws (cleared once the loss is computed).
_CALL_STATE = ("mode", "head_modes", "drop_swa")


def _call_state(modules: list[HybridAttention]) -> list[tuple[HybridAttention, dict, torch.Tensor | None]]:
    return [(m, {a: getattr(m, a) for a in _CALL_STATE}, m.padding.mask) for m in modules]


def _set_call_state(state) -> None:
    for module, values, mask in state:
        for name, value in values.items():
            setattr(module, name, value)
        module.padding.mask = mask


def _replay_as_in_forward(layer: torch.nn.Module):
    """`checkpoint`'s context_fn for one decoder layer, called at its forward: the recomputation in the backward pass
    runs with the hybrid layers' modes, SSD draws and padding mask of that forward, whatever they are by then."""
    at_forward = _call_state([m for m in layer.modules() if isinstance(m, HybridAttention)])

    @contextlib.contextmanager
    def replay():
        now = _call_state([m for m, _, _ in at_forward])
        _set_call_state(at_forward)
        try:
            yield
        finally:
            _set_call_state(now)

    return contextlib.nullcontext(), replay()


@contextlib.contextmanager
def layer_checkpointing(model):
    """Inside: every decoder layer of `model` trains under activation checkpointing (torch's non-reentrant
    `checkpoint`, so LoRA weights get gradients without input grads): its forward keeps only the layer's inputs, and
    the backward pass runs the layer again (with the same RNG, autocast, component modes and SSD draws) to get the
    tensors its gradients need. Layers run unchanged without gradients (validation) or in eval mode."""
    layers = list(decoder_layers(model))
    for layer in layers:
        if "forward" in vars(layer):
            raise RuntimeError(f"{type(layer).__name__} already has its forward replaced; nested layer_checkpointing?")
    for layer in layers:
        layer.forward = _checkpointed_forward(layer, layer.forward)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def _checkpointed_forward(layer: torch.nn.Module, forward):
    def checkpointed(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: _replay_as_in_forward(layer), **kwargs)

    return checkpointed


def finetune_loss_fn(model, *, chunk: int, ssd: SSDSchedule | None = None, objective: str = "lm", peft_model=None):
    """The loop's loss function for stage 2: the `objective` (lm or kl; kl's teacher with `peft_model`'s adapters
    off), with SSD draws set on the layers before the forward (the teacher's forward runs before them)."""
    if objective not in FINETUNE_OBJECTIVES:
        raise ValueError(f"unknown stage-2 objective {objective!r}; expected one of {FINETUNE_OBJECTIVES}")
    modules = hybrid_modules(model)

    def loss_fn(batch, ctx):
        teacher = None
        if objective == "kl":
            with torch.no_grad(), base_teacher(model, peft_model):
                teacher = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
        info = {}
        if ssd is not None:
            p = ssd.probability(ctx["step"], ctx["total_steps"], ctx["epoch"])
            # one draw per optimizer step (per layer, or per row of the step), the same in every micro-batch
            drops = ssd.draw(p, ctx["step"], len(modules), ctx["rows_per_step"])
            if ssd.granularity == "sample":
                drops = drops[ctx["positions"]]
            set_drops(modules, drops, ssd.granularity)
            info = {"ssd_p": p, "swa_dropped": dropped_fraction(drops)}
        try:
            if teacher is None:
                loss = lm_loss(model, batch, chunk=chunk)
            else:
                total, n = kl_loss_sum(model, batch, teacher, chunk=chunk)
                loss = total / max(n, 1)
        finally:
            if ssd is not None:
                clear_drops(modules)
        return loss, info

    return loss_fn


@torch.no_grad()
def validation_losses(model, val: torch.Tensor, *, modes=("hybrid", "swa_only", "la_only"), batch_size: int = 4,
                      chunk: int = 1024, max_rows: int | None = None, accelerator=None) -> dict[str, float]:
    """Mean next-token loss of `val` rows per component mode ('base' when the model is not converted).

    With several processes each takes every world-th row and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    rows = val if max_rows is None else val[:max_rows]
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    mine = rows[rank::world]
    converted = is_converted(model)
    if converted:
        clear_drops(hybrid_modules(model))
    out = {}
    for mode in (modes if converted else ["base"]):
        total, count = 0.0, 0
        ctx = components(model, mode) if converted else contextlib.nullcontext()
        with ctx:
            for i in range(0, len(mine), batch_size):
                batch = mine[i:i + batch_size].to(device)
                s, n = lm_loss_sum(model, batch, chunk=chunk)
                total += float(s)
                count += n
        if world > 1:
            t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
            t = accelerator.reduce(t, reduction="sum")
            total, count = float(t[0]), int(t[1])
        out[mode] = total / count if count else math.nan
    model.train(was_training)
    return out

