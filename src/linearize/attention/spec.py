"""The hybrid layer's fixed settings, one frozen object: what every backend (reference, chunked, recurrent, Triton)
reads besides the tensors, the component mode and the mixing weight.

A converted layer builds its spec once, from its `HybridConfig` and the base layer's softmax scale
(`AttentionSpec.from_config`), and passes it to whichever backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from linearize.config import MEMORY_REREAD, HybridConfig


@dataclass(frozen=True)
class AttentionSpec:
    """Every field but `scale` is the `HybridConfig` field of the same name (`rule` is its `combine`)."""

    scale: float = field(metadata={"help": "The base attention's softmax scale (the family adapter's)."})
    window: int = field(metadata={"help": "Sliding-window size w (HybridConfig.window)."})
    rule: str = field(default="shared_norm", metadata={"help": "Combine rule of the two branches (HybridConfig.combine)."})
    placement: str = field(default="complementary", metadata={"help": "Keys the linear branch covers when the window runs too."})
    num_sinks: int = field(default=8, metadata={"help": "Leading tokens the 'sinks_only' diagnostic attends."})
    softmax_sinks: int = field(default=0, metadata={"help": "Attention sinks kept in the softmax branch; 0 = off."})
    sparse_memory: int = field(default=0, metadata={"help": "Exact keys the sparse memory keeps; 0 = off."})
    memory_block: int = field(default=64, metadata={"help": "Tokens between sparse-memory updates."})
    memory_select: str = field(default="recall", metadata={"help": "How the sparse memory chooses its keys (HybridConfig.memory_select)."})
    memory_observe: int = field(default=32, metadata={"help": "'query': the prompt's last queries that score the keys."})
    memory_pool: int = field(default=7, metadata={"help": "'query': max-pooling width of the keys' scores (1 = none)."})
    memory_heads: str = field(default="sum", metadata={"help": "'query': how a KV head's query heads combine their scores (HybridConfig.memory_heads)."})
    memory_reread: int = field(default=MEMORY_REREAD, metadata={"help": "'query': the prompt's last tokens read again against the memory (HybridConfig.memory_reread)."})
    memory_in_state: bool = field(default=False, metadata={"help": "'query': the kept keys also enter the linear state (HybridConfig.memory_in_state)."})
    memory_prefill: str = field(default="none", metadata={"help": "'query': what the prompt reads before the memory is chosen (HybridConfig.memory_prefill)."})
    memory_fill: bool = field(default=True, metadata={"help": "'query': keys leaving the window later take the memory's free slots (HybridConfig.memory_fill)."})
    chunk_size: int = field(default=64, metadata={"help": "Block size of the chunked implementations and the kernels."})
    linear_state: str = field(default="sum", metadata={"help": "Kind of the linear branch's state (attention.linear)."})
    backend: str = field(default="auto", metadata={"help": "The requested backend; module.choose_backend decides."})

    @classmethod
    def from_config(cls, hybrid: HybridConfig, scale: float, layer: int | None = None) -> "AttentionSpec":
        """The spec of converted layer ``layer`` (its share of the memory, HybridConfig.layer_memory); None: the
        memory's size as configured."""
        memory = hybrid.sparse_memory if layer is None else hybrid.layer_memory(layer)
        return cls(scale=scale, window=hybrid.window, rule=hybrid.combine, placement=hybrid.placement,
                   num_sinks=hybrid.num_sinks, softmax_sinks=hybrid.softmax_sinks, sparse_memory=memory,
                   memory_block=hybrid.memory_block, memory_select=hybrid.memory_select,
                   memory_observe=hybrid.memory_observe, memory_pool=hybrid.memory_pool, memory_heads=hybrid.memory_heads,
                   memory_reread=hybrid.memory_reread, memory_in_state=hybrid.memory_in_state,
                   memory_prefill=hybrid.memory_prefill, memory_fill=hybrid.memory_fill,
                   chunk_size=hybrid.chunk_size,
                   linear_state=hybrid.linear_state, backend=hybrid.backend)

    @property
    def softmax_extras(self) -> bool:
        """Whether the softmax branch holds keys besides the window (softmax sinks, sparse memory)."""
        return self.softmax_sinks > 0 or self.sparse_memory > 0

    @property
    def selects_at_prefill(self) -> bool:
        """The sparse memory is chosen once, at the end of a prefill, by the prompt's last queries ('query')."""
        return self.sparse_memory > 0 and self.memory_select == "query"

    def full_forward(self) -> AttentionSpec:
        """The spec a full (teacher-forced) forward runs, and a query-memory prefill for the tokens before the re-read
        ones: this one, but under 'query' without the sparse memory, which is chosen at the prompt's end
        (`recurrent.prefill_selecting`) -- or, with memory_prefill 'recall', with the online recall memory instead."""
        if not self.selects_at_prefill:
            return self
        if self.memory_prefill == "recall":
            return replace(self, memory_select="recall", memory_prefill="none")
        return replace(self, sparse_memory=0)
