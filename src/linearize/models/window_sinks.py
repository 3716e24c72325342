"""The training-free baseline every conversion must beat: softmax over the last ``window`` keys plus the first
``sinks`` keys (StreamingLLM-style), on exactly the layers a conversion would convert, at equal decode memory.

A layer with its own window (Gemma 3's local layers, a Mistral-style sliding window) is left as it is: cutting it
further, or giving it sinks it never had, takes the model out of its training distribution (on Gemma 3 270M that
gave 3.0 bits per byte with an unbounded window).

How: an attention function registered with transformers' ``AttentionInterface`` under
``linearize_window_sinks_<impl>`` (its mask function is the one of ``<impl>``, 'sdpa' or 'eager', so the model builds
the masks it always builds). The model's attention implementation is switched to it while :func:`window_sinks` is
active; every call it gets goes to the model's own function unchanged, except on the cut layers, where queries are
processed in chunks against the sinks plus the keys of their window only, through that same function with an
explicit mask: memory O(T (w + s)) rather than O(T^2) at 16k-32k tokens, and the family's own scaling, GQA and
soft-capping. When the window and sinks cover every key the call is passed through untouched, so an unbounded
window reproduces the base model bit for bit.

Positions are key indices: sequences must not be left-padded (right padding and a KV cache are fine).
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from linearize.attention.adapters import layer_types
from linearize.config import MEMORY_REREAD
from linearize.errors import LinearizeError
from linearize.models.convert import decoder_layers, is_converted, resolve_layers, text_config

__all__ = ["window_sinks", "target_layers", "window_sinks_mask", "query_memory_baseline"]

NAME = "linearize_window_sinks_"
ATTR = "_linearize_window_sinks"  # (window, sinks, query chunk) on a cut layer's attention module
SUPPORTED = ("sdpa", "eager")


def target_layers(model: nn.Module, layers="global") -> list[int]:
    """The layers the baseline cuts: those a conversion of ``layers`` would convert, less any with its own window."""
    config = text_config(model)
    kinds = layer_types(config)
    return [i for i in resolve_layers(layers, config) if kinds[i] != "sliding_attention"]


def window_sinks_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """(Tq, Tk) bool: key k is seen by query q when it is not in the future and is a sink or in the window."""
    dist = q_pos[:, None] - k_pos[None, :]
    return (dist >= 0) & ((dist < window) | (k_pos[None, :] < sinks))


def _own_function(module: nn.Module, impl: str):
    if impl == "eager":
        return importlib.import_module(type(module).__module__).eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _dispatch(impl: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        own = _own_function(module, impl)
        cut = getattr(module, ATTR, None)
        tk, tq = key.shape[-2], query.shape[-2]
        if cut is None or cut[0] + cut[1] >= tk:
            return own(module, query, key, value, attention_mask, **kwargs)
        window, sinks, chunk = cut
        outs, weights = [], None
        first = tk - tq  # absolute position of the first query: no left padding
        for a in range(0, tq, chunk):
            b = min(a + chunk, tq)
            lo = max(0, first + a - window + 1)  # oldest key any query of the chunk sees in its window
            hi = first + b
            parts = [torch.arange(min(sinks, lo), device=key.device), torch.arange(lo, hi, device=key.device)]
            k_idx = torch.cat(parts)
            q_pos = torch.arange(first + a, first + b, device=key.device)
            allowed = window_sinks_mask(q_pos, k_idx, window, sinks)
            if torch.is_tensor(attention_mask):  # the model's own mask (padding) still applies
                given = attention_mask[:, :, a:b].index_select(-1, k_idx)
                allowed = allowed & (given if given.dtype == torch.bool else given == 0)
            mask = allowed[None, None] if allowed.dim() == 2 else allowed
            if impl == "eager":
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min)
            out, weights = own(module, query[:, :, a:b], key.index_select(2, k_idx), value.index_select(2, k_idx),
                               mask, **kwargs)
            outs.append(out)  # (B, chunk, H, d): the functions return the head axis second-to-last
        return torch.cat(outs, dim=1), None

    return attention


def _register(impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = NAME + impl
    AttentionInterface.register(name, _dispatch(impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


@contextlib.contextmanager
def window_sinks(model: nn.Module, window: int, sinks: int, *, layers="global", chunk: int = 2048):
    """While active, the cut layers of ``model`` (see :func:`target_layers`) attend to the last ``window`` keys and
    the first ``sinks``. ``layers``: what a conversion would convert ('all', 'global' or indices)."""
    if window < 1 or sinks < 0 or chunk < 1:
        raise LinearizeError(f"window+sinks baseline: need window >= 1, sinks >= 0, chunk >= 1 (got {window}, {sinks}, {chunk})")
    if is_converted(model):
        raise LinearizeError("the window+sinks baseline runs on a base model, not a converted one")
    config = text_config(model)
    impl = config._attn_implementation
    if impl not in SUPPORTED:
        raise LinearizeError(f"the window+sinks baseline needs attn_implementation 'sdpa' or 'eager', not {impl!r}")
    name = _register(impl)
    cut = target_layers(model, layers)
    blocks = decoder_layers(model)
    configs = {id(c): c for c in (model.config, config)}.values()
    try:
        for c in configs:
            c._attn_implementation = name
        for i in cut:
            setattr(blocks[i].self_attn, ATTR, (window, sinks, chunk))
        yield cut
    finally:
        for c in configs:
            c._attn_implementation = impl
        for i in cut:
            if hasattr(blocks[i].self_attn, ATTR):
                delattr(blocks[i].self_attn, ATTR)


def query_memory_baseline(model: nn.Module, window: int, sinks: int, memory: int, *, layers="global",
                          reread: int = MEMORY_REREAD, fill: bool = True, prefill: str = "none") -> nn.Module:
    """The training-free baseline of a conversion with a memory chosen by the prompt's queries: a copy of the base
    model whose cut layers (:func:`target_layers`) attend, by softmax alone, to the last ``window`` keys, the first
    ``sinks`` and ``memory`` keys chosen at the end of each prompt by its last queries and kept for the generation
    (SnapKV-style; linearize's sparse memory with ``memory_select='query'``), nothing else: the hybrid layer with its
    linear branch weighed 0 (``mix`` with a fixed g = 1), no training. A full (teacher-forced) forward has no end of
    prompt and runs as the window+sinks cut; long-context scoring reads each item through a cached prefill. Its decode
    state is ``window + sinks + memory`` keys and values per cut layer (the untrained linear branch it carries is not
    part of what it stands for). ``reread``: the prompt's last tokens read again against the memory (HybridConfig.
    memory_reread). ``fill``: keys leaving the window after the memory is chosen take its free slots (HybridConfig.
    memory_fill). ``prefill``: 'recall' reads the prompt's tokens before the re-read ones with the online recall memory
    of the same size (HybridConfig.memory_prefill), so a prompt within window + sinks + memory is read exactly.
    ``model`` is left as it is."""
    import copy

    from linearize.config import HybridConfig
    from linearize.models.convert import convert

    if window < 1 or sinks < 0 or memory < 1:
        raise LinearizeError(f"query-memory baseline: need window >= 1, sinks >= 0, memory >= 1 (got {window}, {sinks}, {memory})")
    if is_converted(model):
        raise LinearizeError("the query-memory baseline runs on a base model, not a converted one")
    hybrid = HybridConfig(window=window, softmax_sinks=sinks, sparse_memory=memory, memory_select="query",
                          memory_reread=reread, memory_fill=fill, memory_prefill=prefill, combine="mix", mix_gate="fixed", mix_value=1.0,
                          layers=target_layers(model, layers))
    return convert(copy.deepcopy(model), hybrid).eval()
