"""What autograd keeps for the backward pass while a function runs (saved-tensor hooks): the tests' memory checks."""

from __future__ import annotations

import torch


def largest_saved(fn):
    """``(fn(), numel of the largest tensor saved for the backward pass while it ran)``."""
    biggest = 0

    def pack(x):
        nonlocal biggest
        biggest = max(biggest, x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        result = fn()
    return result, biggest


def kept_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass while `fn` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
