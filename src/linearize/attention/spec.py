"""The hybrid layer's fixed settings, one frozen object: what every backend (reference, chunked, recurrent, Triton)
reads besides the tensors, the component mode and the mixing weight.

A converted layer builds its spec once, from its `HybridConfig` and the base layer's softmax scale
(`AttentionSpec.from_config`), and passes it to whichever backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from linearize.config import HybridConfig


@dataclass(frozen=True)
class AttentionSpec:
    scale: float  # the base attention's softmax scale
    window: int
    rule: str = "shared_norm"  # HybridConfig.combine
    placement: str = "complementary"
    num_sinks: int = 8  # the 'sinks_only' diagnostic's sinks
    softmax_sinks: int = 0
    sparse_memory: int = 0
    memory_block: int = 64
    chunk_size: int = 64
    linear_state: str = "sum"
    backend: str = "auto"

    @classmethod
    def from_config(cls, hybrid: HybridConfig, scale: float) -> "AttentionSpec":
        return cls(scale=scale, window=hybrid.window, rule=hybrid.combine, placement=hybrid.placement,
                   num_sinks=hybrid.num_sinks, softmax_sinks=hybrid.softmax_sinks, sparse_memory=hybrid.sparse_memory,
                   memory_block=hybrid.memory_block, chunk_size=hybrid.chunk_size, linear_state=hybrid.linear_state,
                   backend=hybrid.backend)

    @property
    def softmax_extras(self) -> bool:
        """Whether the softmax branch holds keys besides the window (softmax sinks, sparse memory)."""
        return self.softmax_sinks > 0 or self.sparse_memory > 0
