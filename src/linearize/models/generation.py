"""Fast generation by default: a converted model's `generate` replays a captured decode step on CUDA.

Hugging Face's `generate` drives the loop as usual (logits processors, sampling, stopping criteria, streamers);
for the duration of the call the model's `forward` is wrapped so that every one-token decode step after the
(eager) prefill goes through `linearize.attention.graph_decode.GraphDecoder`: its first steps run eagerly (Triton
compiles, cuBLAS sets up), the next one is captured, and the rest replay that CUDA graph. Where a captured step
cannot apply -- beam search (the cache is reordered every step), assisted decoding, CPU models, sparse memory
chosen online ('recall') on the linear states other than 'sum' (on 'sum' its boundary step is captured: it runs every
token and is kept at block ends; a memory chosen at prefill, 'query', is fixed and captured with the rest),
unconverted full-attention layers, no cache -- the eager step runs. Unconverted sliding-window layers (Gemma 3's local
layers under `layers="global"`) decode on fixed rings of their window (`attention/ring.py`; the returned cache holds
those rings). Which path ran is on the model after the call (`model.decode_path`, a `DecodePath`) and in one log
line. `LINEARIZE_EAGER_DECODE=1` keeps the eager step everywhere; `LINEARIZE_COMPILED_STEP=1` compiles the model's
norms and MLPs into the captured step (`graph_decode.compiled_outside_attention`; off until measured on a GPU).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from linearize.attention.graph_decode import GraphDecoder
from linearize.attention.linear import linear_state as linear_state_kind
from linearize.attention.module import HybridAttention
from linearize.attention.ring import RING_ATTENTION, unconverted_layers
from linearize.compat import CACHE_KWARG, CACHE_KWARGS

log = logging.getLogger(__name__)

#: Set (to 1) to keep every generate call on the eager step: a way out should a captured step ever misbehave.
EAGER_ENV = "LINEARIZE_EAGER_DECODE"

#: Set (to 1) to compile the norms and MLPs into the captured step: one fused kernel where a norm ran several (the
#: first call compiles, once per process). Off by default until `benchmarks/generate_speed.py` measures it on a GPU.
COMPILED_ENV = "LINEARIZE_COMPILED_STEP"

#: The class that captures and replays the step (tests on CPU put a stand-in here to exercise the plumbing).
DECODER_CLASS = GraphDecoder


@dataclass
class DecodePath:
    """Which decode step one `generate` call ran: 'captured' (GraphDecoder: a few eager warm-up steps, then CUDA-graph
    replays) or 'eager' (the model's own forward every step, `reason` says why)."""

    path: str
    reason: str | None = None
    steps: int = 0  # decode steps after the prefill
    replayed: int = 0  # of them, replays of the captured graph
    rings: int = 0  # unconverted sliding-window layers that decoded on a fixed ring of their window
    ring_window: int | None = None
    compiled: bool = False  # the norms and MLPs compiled into the captured step (LINEARIZE_COMPILED_STEP)

    def describe(self) -> str:
        if self.path == "captured":
            rings = (f"; {self.rings} unconverted sliding-window layers on rings of {self.ring_window} keys"
                     if self.rings else "")
            compiled = "; norms and MLPs compiled into it" if self.compiled else ""
            return f"captured decode step (CUDA graph: {self.replayed} of {self.steps} steps replayed{rings}{compiled})"
        return f"eager decode step ({self.reason})"


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _hybrid_layers(model: nn.Module) -> list[HybridAttention]:
    return [m for m in model.modules() if isinstance(m, HybridAttention)]


def eager_reason(model: nn.Module, generation_config=None, kwargs: dict | None = None) -> str | None:
    """Why a `generate(**kwargs)` call of `model` must run the eager step; None when the captured step applies."""
    kwargs = kwargs or {}
    if _env_on(EAGER_ENV):
        return f"{EAGER_ENV} is set"
    config = generation_config if generation_config is not None else model.generation_config

    def setting(name):  # a keyword of the call overrides the generation config, as in generate
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    if (setting("num_beams") or 1) > 1:
        return "beam search: the cache is reordered every step"
    if kwargs.get("assistant_model") is not None or setting("prompt_lookup_num_tokens") or setting("assistant_early_exit"):
        return "assisted decoding verifies several tokens per step"
    if setting("use_cache") is False:
        return "use_cache=False recomputes the whole sequence every step"
    if setting("output_attentions") or setting("output_hidden_states"):
        return "output_attentions / output_hidden_states ask for per-step tensors a captured step does not return"
    layers = _hybrid_layers(model)
    if not layers:
        return "the model has no converted layers"
    if any(layer.hybrid.sparse_memory and layer.hybrid.memory_select == "recall"
           and not linear_state_kind(layer.hybrid.linear_state).additive for layer in layers):
        return "sparse memory (memory_select 'recall') on a linear state other than 'sum' branches on the host's token count"
    sliding, full = unconverted_layers(model)
    if full:
        return f"unconverted full-attention layers {full} keep a growing KV cache"
    impl = model.config.get_text_config(decoder=True)._attn_implementation
    if sliding and impl not in RING_ATTENTION:
        return (f"the unconverted sliding-window layers run attn_implementation {impl!r}; their ring's mask is built "
                f"for {' or '.join(map(repr, RING_ATTENTION))}")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return f"the model spans several devices ({', '.join(sorted(map(str, devices)))}); a captured step needs one"
    device = devices.pop()
    if device.type != "cuda":
        return f"the model is on {device.type}; a captured step needs CUDA"
    if model.training:
        return "the model is in training mode (dropout); call model.eval()"
    return None


def _input_ids(args, kwargs):
    return kwargs.get("input_ids", args[0] if args else None)


def _cache(kwargs):
    return next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)


def _prompt_padding(mask, prompt: int) -> torch.Tensor | None:
    """(B, prompt) bool from generate's 2-D attention mask at the first decode step (None: no mask, no padding)."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] < prompt:
        raise ValueError(f"generate passed an attention mask of shape {tuple(getattr(mask, 'shape', ()))}; the rings of "
                         "the unconverted sliding-window layers need the 2-D padding mask")
    return mask[:, :prompt].bool()


class CapturedStep:
    """The stand-in for `model.forward` during one `generate` call: prefill and anything unusual go to the real
    forward; one-token steps against a filled cache go to a decoder built on the first of them."""

    def __init__(self, model: nn.Module):
        self.model, self.forward = model, model.forward
        self.decoder = None
        self.failure: str | None = None  # why the decoder could not be built: the remaining steps run eagerly
        self.busy = False  # the decoder's own (warm-up, capture) forwards call the model again
        self.steps = self.replayed = 0

    def _decode_step(self, args, kwargs) -> bool:
        ids = _input_ids(args, kwargs)
        cache = _cache(kwargs)
        return (torch.is_tensor(ids) and ids.dim() == 2 and ids.shape[1] == 1 and kwargs.get("inputs_embeds") is None
                and cache is not None and kwargs.get("use_cache", True) is not False and cache.get_seq_length() > 0
                and not kwargs.get("output_attentions") and not kwargs.get("output_hidden_states")
                and kwargs.get("labels") is None)

    def __call__(self, *args, **kwargs):
        if self.busy or self.failure is not None or not self._decode_step(args, kwargs):
            return self.forward(*args, **kwargs)
        ids, cache, positions = _input_ids(args, kwargs), _cache(kwargs), kwargs.get("position_ids")
        if positions is None:  # generate gives them; without, every row continues from the cache's length
            positions = torch.full((ids.shape[0], 1), cache.get_seq_length(), device=ids.device, dtype=torch.long)
        if self.decoder is None:
            try:
                rings = bool(unconverted_layers(self.model)[0])  # only rings need the prompt's padding
                valid = _prompt_padding(kwargs.get("attention_mask"), cache.get_seq_length()) if rings else None
                compiled = {"fuse": True} if _env_on(COMPILED_ENV) else {}
                self.decoder = DECODER_CLASS(self.model, cache, positions=positions, valid=valid, **compiled)
            except ValueError as exc:
                self.failure = str(exc)
                log.info("linearize generate: eager decode step: %s", exc)
                return self.forward(*args, **kwargs)
        self.busy = True
        try:
            replay = self.decoder.captured or self.decoder.warmup_left == 0  # that step captures, then replays
            logits = self.decoder.step(ids, positions=positions)
        finally:
            self.busy = False
        self.steps += 1
        self.replayed += int(replay)
        # the replayed logits live in the graph's static buffer, which the next step overwrites
        return CausalLMOutputWithPast(logits=logits.clone(), **{CACHE_KWARG: cache})


def generate(model: nn.Module, base_generate, *args, generation_config=None, **kwargs):
    """`base_generate(*args, **kwargs)` (the family's own `generate`, bound to `model`) with the captured decode step
    where it applies; sets `model.decode_path`."""
    reason = eager_reason(model, generation_config, kwargs)
    step = None
    if reason is None:
        step = CapturedStep(model)
        model.forward = functools.wraps(step.forward)(step)  # wraps: generate inspects forward's signature
    try:
        out = base_generate(*args, generation_config=generation_config, **kwargs)
    finally:
        if step is not None:
            del model.forward  # the instance attribute; the class's forward shows again
    if step is not None and step.decoder is not None:
        rings = getattr(step.decoder, "rings", [])
        path = DecodePath("captured", steps=step.steps, replayed=step.replayed, rings=len(rings),
                          ring_window=rings[0].window if rings else None,
                          compiled=bool(getattr(step.decoder, "fuse", False)))
    else:
        path = DecodePath("eager", reason or step.failure or "no decode step after the prefill")
    model.decode_path = path
    log.info("linearize generate: %s", path.describe())
    return out
