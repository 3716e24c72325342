"""One small adapter per model family: how its attention builds q, k, v (norms, RoPE, scale).

Shapes come from the model config; the adapter only names the family's public pieces.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from linearize.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class FamilyAdapter:
    family: str
    modeling_module: str  # transformers module holding the family's apply_rotary_pos_emb
    qk_norm: bool  # q_norm / k_norm on the head dim before RoPE (Gemma 3, Qwen 3)
    scale: Callable[[object], float]

    def rope(self) -> Callable:
        return importlib.import_module(self.modeling_module).apply_rotary_pos_emb


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _inverse_sqrt_head_dim(config) -> float:
    return head_dim(config) ** -0.5


ADAPTERS: dict[str, FamilyAdapter] = {}


def register(model_type: str, adapter: FamilyAdapter) -> None:
    ADAPTERS[model_type] = adapter


register("gemma3_text", FamilyAdapter("gemma3", "transformers.models.gemma3.modeling_gemma3", True, lambda c: c.query_pre_attn_scalar**-0.5))
register("llama", FamilyAdapter("llama", "transformers.models.llama.modeling_llama", False, _inverse_sqrt_head_dim))
register("mistral", FamilyAdapter("mistral", "transformers.models.mistral.modeling_mistral", False, _inverse_sqrt_head_dim))
register("qwen2", FamilyAdapter("qwen2", "transformers.models.qwen2.modeling_qwen2", False, _inverse_sqrt_head_dim))
register("qwen3", FamilyAdapter("qwen3", "transformers.models.qwen3.modeling_qwen3", True, _inverse_sqrt_head_dim))


def base_model_type(config) -> str | None:
    """The base family's model_type; a converted model's config names it apart from its own (``linearized_llama``)."""
    return getattr(config, "base_model_type", None) or getattr(config, "model_type", None)


def adapter_for(config) -> FamilyAdapter:
    model_type = base_model_type(config)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"no attention adapter for model_type {model_type!r}; supported: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]


def layer_types(config) -> list[str]:
    """The base model's attention type per layer ('full_attention' or 'sliding_attention')."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
