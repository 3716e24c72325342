"""A fixed ring of the last `window` keys and values of a sliding-window softmax layer, for captured decode steps.

A conversion that keeps some layers as they were (`HybridConfig(layers="global")` on Gemma 3 keeps its 15 local
layers) leaves those layers on Hugging Face's cache, which concatenates and slices every step: its shapes change, so
a captured decode step cannot hold it. A sliding-window layer needs only its last `window` keys and values. Here they
sit in a ring of `window` slots: token i (its index in the cache, left padding included, as HF's window counts) goes
to slot i mod window, written at a device index, with a flag per slot for the prompt's padding. Keys are stored after
RoPE, so their order in the ring does not matter to attention; `ring_attention_mask` gives the layer's own (HF)
attention function the valid slots. Masks that HF builds from sequence lengths do not describe a ring, so a step
passes that mask as the model's `attention_mask` (a 4-D mask, which every family's mask builder passes through).

The same layer serves the decode benchmark's static-cache base (every slot filled, attended without a mask).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from linearize.attention.adapters import layer_types
from linearize.attention.module import HybridAttention

#: The attention implementations whose mask format `ring_attention_mask` builds.
RING_ATTENTION = ("sdpa", "eager")


def ring_bytes(heads: int, head_dim: int, window: int, dtype_bytes: int) -> int:
    """Bytes of one sequence's ring: `window` keys and values of `heads` heads, and a validity flag per slot."""
    return 2 * heads * head_dim * window * dtype_bytes + window


class RingWindowLayer(CacheLayerMixin):
    """A cache layer holding the last `window` keys/values (B, H, window, d) of a sliding-window layer in a ring.

    `update` takes one token: it writes at the device index `slot`, flags the slot valid and returns the whole ring
    (a fixed shape every step). `seen` counts the tokens so far (a Python int, as the hybrid states count theirs;
    `GraphDecoder` keeps it right across replays)."""

    is_sliding = True
    is_compileable = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, seen: int):
        super().__init__()
        if keys.shape != values.shape or valid.shape != (keys.shape[0], keys.shape[2]) or valid.dtype != torch.bool:
            raise ValueError(f"a ring needs keys and values of one shape (B, H, window, d) and (B, window) bool flags; "
                             f"got {tuple(keys.shape)}, {tuple(values.shape)}, {tuple(valid.shape)} {valid.dtype}")
        self.keys, self.values, self.valid = keys, values, valid
        self.window = self.sliding_window = keys.shape[2]
        self.seen = seen
        self.slot = torch.tensor([seen % self.window], device=keys.device)  # where the next token goes
        self.is_initialized = True

    @classmethod
    def from_recent(cls, keys: torch.Tensor, values: torch.Tensor, window: int, seen: int,
                    valid: torch.Tensor | None = None) -> RingWindowLayer:
        """The ring after `seen` tokens, from keys/values (B, H, n, d) of the last n of them (HF's sliding layer keeps
        the last window - 1; more are cut). `valid` (B, seen) bool: which tokens are not padding (None: all)."""
        b, h, held, d = keys.shape
        n = min(window - 1, seen)  # the next token fills the window's last slot
        if held < n:
            raise ValueError(f"a ring of window {window} after {seen} tokens needs their last {n} keys; got {held}")
        if valid is not None and valid.shape != (b, seen):
            raise ValueError(f"the ring's padding flags must be ({b}, {seen}) (batch, tokens so far), got {tuple(valid.shape)}")
        ring = cls(keys.new_zeros(b, h, window, d), values.new_zeros(b, h, window, d),
                   torch.zeros(b, window, dtype=torch.bool, device=keys.device), seen)
        slots = torch.arange(seen - n, seen, device=keys.device) % window
        if n:
            ring.keys[:, :, slots] = keys[:, :, held - n:]
            ring.values[:, :, slots] = values[:, :, held - n:]
            ring.valid[:, slots] = True if valid is None else valid[:, seen - n:].to(keys.device, torch.bool)
        return ring

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError("a ring cache layer takes one token per step (decoding); prefill with Hugging Face's cache, "
                             "then make the ring (RingWindowLayer.from_recent)")
        self.keys.index_copy_(2, self.slot, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, self.slot, value_states.to(self.values.dtype))
        self.valid.index_fill_(1, self.slot, True)
        self.slot.add_(1).remainder_(self.window)
        self.seen += 1
        return self.keys, self.values

    def next_valid(self) -> torch.Tensor:
        """(B, window) bool: the slots the next token attends to (the valid ones and its own), without writing."""
        return self.valid.index_fill(1, self.slot, True)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise ValueError("a ring cache layer's slots are not in token order, so Hugging Face's masks do not fit it: pass "
                         "ring_attention_mask(...) as the attention mask (GraphDecoder does)")

    def get_max_length(self) -> int:
        return self.window

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()
        self.valid.zero_()
        self.slot.zero_()
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.to(self.keys.device)
        self.keys, self.values, self.valid = (t.index_select(0, idx) for t in (self.keys, self.values, self.valid))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.valid))


def ring_attention_mask(ring: RingWindowLayer, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask (B, 1, 1, window) of one decode step over `ring`'s slots, in the format of the model's attention
    function: bool (True: attend) for 'sdpa', additive (0 or the dtype's minimum) for 'eager'. Every ring of one
    cache has seen the same tokens, so one mask serves all of them."""
    allowed = ring.next_valid()[:, None, None, :]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"the ring's mask is built for attn_implementation {' or '.join(map(repr, RING_ATTENTION))}, "
                     f"not {attn_implementation!r}")


def unconverted_layers(model: nn.Module) -> tuple[list[int], list[int]]:
    """(sliding, full): the indices of the layers a conversion left as they were, by their attention kind."""
    config = model.config.get_text_config(decoder=True)
    converted = {m.layer_idx for m in model.modules() if isinstance(m, HybridAttention)}
    kinds = layer_types(config)
    kept = [i for i in range(config.num_hidden_layers) if i not in converted]
    return [i for i in kept if kinds[i] == "sliding_attention"], [i for i in kept if kinds[i] != "sliding_attention"]


def swap_in_rings(cache: Cache, layers: list[int], valid: torch.Tensor | None = None) -> list[RingWindowLayer]:
    """Replace the prefilled sliding-window layers `layers` of `cache` by rings (in place); returns the rings.
    `valid` (B, tokens so far) bool: the prompt's padding mask (None: no padding)."""
    rings = []
    for i in layers:
        layer = cache.layers[i] if i < len(cache.layers) else None
        if isinstance(layer, RingWindowLayer):
            rings.append(layer)
            continue
        window = getattr(layer, "sliding_window", None)
        if not getattr(layer, "is_sliding", False) or not window or not torch.is_tensor(getattr(layer, "keys", None)):
            raise ValueError(f"cache layer {i} is not a prefilled sliding-window layer; a ring replaces only those")
        ring = RingWindowLayer.from_recent(layer.keys, layer.values, window, layer.get_seq_length(), valid)
        cache.layers[i] = ring
        rings.append(ring)
    return rings
