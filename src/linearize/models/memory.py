"""Decode memory per sequence: what a model must keep to generate the next token after `context` tokens.

One definition for the three kinds of model that the long-context evaluation puts side by side:

* the base model: keys and values of every layer, a layer with its own window (Gemma's local layers) keeping at
  most that many;
* the window + sinks baseline: on the layers it cuts, the last ``window`` keys/values plus the first ``sinks``;
* a converted model: on each converted layer the recurrent state of :mod:`linearize.attention.recurrent`
  (the linear state in float32 -- its kind's own `state_bytes`, plus for the non-additive kinds under 'complementary'
  the key waiting to enter it and, with beta, the ring's betas --, the ring of the last w - 1 keys, values and key
  features, the sink keys and values, with sparse memory its slots and pending block (for the non-additive kinds
  with their ages and betas, in place of the waiting key; under 'overlap' with a second state, the memory's), with
  the q/k convolution the last K - 1 queries and keys; a memory chosen at prefill (memory_select 'query') is its m
  slots only, the linear state then as without memory), decoding in 'hybrid' mode
  (a non-'sum' state prefilled for 'la_only' as well holds a second linear state); its unconverted sliding-window
  layers a ring of their window (keys, values and a flag per slot, `attention/ring.py`: what the captured decode step
  holds, constant in context); unconverted full-attention layers as in the base model.
"""

from __future__ import annotations

import dataclasses

from linearize.attention.adapters import head_dim, layer_types
from linearize.attention.linear import linear_state
from linearize.attention.ring import ring_bytes
from linearize.config import HybridConfig
from linearize.errors import LinearizeError
from linearize.feature_maps import num_features
from linearize.models.convert import resolve_layers

__all__ = ["decode_state_bytes", "matching_window"]

F32 = 4


def _kv_layer_bytes(hkv: int, d: int, keys: int, dtype_bytes: int) -> int:
    return 2 * hkv * d * keys * dtype_bytes


def _hybrid_layer_bytes(hq: int, hkv: int, d: int, hybrid: HybridConfig, dtype_bytes: int) -> int:
    m = num_features(hybrid.feature_map, d, hybrid.feature_size)
    sink_slots = max(hybrid.num_sinks, hybrid.softmax_sinks)
    online = hybrid.sparse_memory > 0 and hybrid.memory_select == "recall"  # 'query': fixed at prefill, no pending block
    # exact keys kept with their features: the ring of w - 1, and with sparse memory its m slots plus a pending block
    exact = hybrid.window - 1 + hybrid.sparse_memory + (hybrid.memory_block if online else 0)
    featured = exact + (sink_slots if hybrid.softmax_sinks else 0)  # softmax sinks leave the LA sums: features kept
    kind = linear_state(hybrid.linear_state)
    state = kind.state_bytes(hkv, m, d)  # accumulated in float32 whatever the model dtype
    if not kind.additive:
        if online:  # the memory's keys and pending block: their ages (fp32) and, with beta, betas
            state += hkv * (hybrid.sparse_memory + hybrid.memory_block) * (1 + kind.needs_beta) * F32
            if hybrid.placement != "complementary":  # the memory's own state beside the one the linear branch reads
                state += kind.state_bytes(hkv, m, d)
        elif hybrid.placement == "complementary":  # the key entering at the next step (fp32) and its flag (per row)
            state += hkv * (m + d + (1 if kind.needs_beta else 0)) * F32 + 1
        if kind.needs_beta:  # the ring keys' beta
            state += hkv * (hybrid.window - 1) * F32
    kept = hkv * (2 * (exact + sink_slots) * d + featured * m) * dtype_bytes
    # validity flags (memory slots per KV head, the rest per row) and the count of keys that left the window (int64)
    flags = exact + sink_slots + ((hkv - 1) * hybrid.sparse_memory if hybrid.sparse_memory else 0)
    count = 8 if hybrid.sparse_memory or hybrid.softmax_sinks else 0
    conv = (hq + hkv) * max(hybrid.qk_conv - 1, 0) * d * dtype_bytes  # the q/k convolution's past inputs
    return state + kept + flags + count + conv


def decode_state_bytes(config, context: int, *, dtype_bytes: int = 2, hybrid: HybridConfig | None = None,
                       window_sinks: tuple[int, int] | None = None, layers=None) -> int:
    """Bytes of decode state for one sequence after ``context`` tokens.

    ``config``: the base model's (text) config. ``hybrid``: a conversion of ``layers`` (default ``hybrid.layers``);
    ``window_sinks=(w, s)``: the baseline on ``layers``; neither: the base model. ``dtype_bytes``: the model dtype
    (2 for bf16); keys and values are stored in it.
    """
    if hybrid is not None and window_sinks is not None:
        raise LinearizeError("decode_state_bytes: give hybrid= or window_sinks=, not both")
    d, hkv = head_dim(config), config.num_key_value_heads
    kinds = layer_types(config)
    spec = layers if layers is not None else (hybrid.layers if hybrid is not None else "global")
    changed = set(resolve_layers(spec, config)) if (hybrid is not None or window_sinks is not None) else set()
    memory = hybrid.memory_sizes(sorted(changed)) if hybrid is not None else {}  # memory_pyramid: per layer
    total = 0
    for i, kind in enumerate(kinds):
        own = config.sliding_window if kind == "sliding_attention" else None
        if i in changed and hybrid is not None:
            layer = dataclasses.replace(hybrid, sparse_memory=memory[i], memory_pyramid=1.0)
            total += _hybrid_layer_bytes(config.num_attention_heads, hkv, d, layer, dtype_bytes)
        elif hybrid is not None and own is not None:
            total += ring_bytes(hkv, d, own, dtype_bytes)
        elif i in changed and own is None:  # the baseline leaves a layer with its own window as it is
            w, s = window_sinks
            total += _kv_layer_bytes(hkv, d, min(context, w + s), dtype_bytes)
        else:
            total += _kv_layer_bytes(hkv, d, min(context, own) if own else context, dtype_bytes)
    return total


def matching_window(config, hybrid: HybridConfig, *, sinks: int, dtype_bytes: int = 2, layers=None) -> int:
    """The baseline window ``w`` whose ``w + sinks`` keys and values per layer take no more bytes than one converted
    layer's state (layers with their own window count the same on both sides: the baseline leaves them alone; with
    memory_pyramid the mean layer's, sparse_memory keys: the total is the same)."""
    d, hkv = head_dim(config), config.num_key_value_heads
    per_key = 2 * hkv * d * dtype_bytes
    w = _hybrid_layer_bytes(config.num_attention_heads, hkv, d, hybrid, dtype_bytes) // per_key - sinks
    if w < 1:
        raise LinearizeError(f"a converted layer's state holds fewer than {sinks} + 1 keys; lower the sinks")
    return int(w)
