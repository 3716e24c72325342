"""A transformers cache layer that holds the hybrid state: constant size, whatever the context length.

A converted attention layer swaps its slot of any `transformers.Cache` (the DynamicCache that
`generate` creates, say) for a `HybridCacheLayer` on first use, so `model.generate` needs no extra argument.
"""

from __future__ import annotations

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin

from linearize.compat import CACHE_KWARG, CACHE_KWARGS

from linearize.attention.recurrent import HybridState


class HybridCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False

    def __init__(self, base_sliding_window: int | None = None):
        super().__init__()
        # mask sizes mimic the layer this one replaces, so masks built for unconverted layers stay right
        self.is_sliding = base_sliding_window is not None
        self.base_sliding_window = base_sliding_window
        self.state: HybridState | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("HybridCacheLayer is filled by linearize's HybridAttention, not by Cache.update")

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen = self.get_seq_length()
        if not self.is_sliding:
            return seen + query_length, 0
        w = self.base_sliding_window
        offset = max(seen - w + 1, 0)
        return (w - 1 + query_length if seen >= w else seen + query_length), offset

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            valid = self.state.buf_valid
            rows = torch.arange(valid.shape[0], device=valid.device).repeat_interleave(repeats)
            self.state = self.state.index_select(rows)


def hybrid_cache_layer(cache: Cache, layer_idx: int) -> HybridCacheLayer:
    """The hybrid layer at `layer_idx` of `cache`, swapping in a fresh one where another kind sits."""
    while len(cache.layers) <= layer_idx:
        if cache.layer_class_to_replicate is None:
            raise ValueError(f"cache has {len(cache.layers)} layers, none for layer {layer_idx}")
        cache.layers.append(cache.layer_class_to_replicate())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, HybridCacheLayer):
        if layer.get_seq_length() > 0:
            raise ValueError(f"cache layer {layer_idx} already holds softmax keys; start generation with an empty cache")
        layer = HybridCacheLayer(getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None)
        cache.layers[layer_idx] = layer
    return layer


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: hybrid states (and rings: `attention/ring.py`) by their own count, plus any softmax
    keys/values of unconverted layers."""
    total = 0
    for layer in cache.layers:
        if callable(getattr(layer, "nbytes", None)):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and torch.is_tensor(layer.keys):
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def take_cache(kwargs: dict) -> Cache | None:
    """Pop the cache from an attention layer's keyword arguments, under whichever name the caller used.

    transformers passes it as ``cache`` from 5.24 and as ``past_key_values`` before; a layer that read only one
    name would see no cache under the other and silently decode every token alone. Anything that is not a
    ``transformers.Cache`` (a legacy tuple, or a cache under a name this layer does not know) is refused.
    """
    found = {name: kwargs.pop(name) for name in CACHE_KWARGS if kwargs.get(name) is not None}
    if len({id(c) for c in found.values()}) > 1:
        raise ValueError(f"two different caches passed to one attention layer (as {' and '.join(found)})")
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if stray:
        raise TypeError(f"a cache arrived as {stray[0]!r}, which linearize's attention does not read; pass it as "
                        f"{CACHE_KWARG!r} (transformers {transformers.__version__})")
    cache = next(iter(found.values()), None)
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"linearize's attention needs a transformers Cache object (DynamicCache, say), "
                        f"got {type(cache).__name__}: legacy tuple caches cannot hold the hybrid state")
    return cache
