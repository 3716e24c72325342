"""What differs between the transformers releases this project allows (pyproject.toml gives the range).

From transformers 5.24 the models take and return the key/value cache as ``cache``; up to 5.23 it is
``past_key_values`` (deprecated from 5.24, removed in 5.40). Every caller in this project passes and reads
the cache through these helpers, so each release gets the name it knows and no deprecation warning.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

__all__ = ["CACHE_KWARG", "CACHE_KWARGS", "cache_kwargs", "output_cache"]

#: The keyword under which the installed transformers passes the cache to models, layers and attention.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
#: Every name a cache has had; an attention layer accepts any of them.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_kwargs(cache: Cache | None) -> dict[str, Any]:
    """``{name: cache}`` under the installed release's keyword: ``model(ids, **cache_kwargs(cache), use_cache=True)``."""
    return {CACHE_KWARG: cache}


def output_cache(output) -> Cache | None:
    """The cache a model returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None
