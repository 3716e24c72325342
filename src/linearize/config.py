"""Hybrid attention settings. Each field's help text is the documentation (`linearize info` prints it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

@dataclass(frozen=True)
class ComponentMode:
    """Which branches of a hybrid layer run: one entry of `MODES`. The backends read these fields, never the name."""

    name: str
    uses_window: bool = field(metadata={"help": "Softmax over the sliding window (plus the softmax sinks and, with the linear branch, the sparse memory, when on)."})
    uses_linear: bool = field(metadata={"help": "The linear branch runs (the feature maps are read). With the window too, the branches combine under the combine rule and the linear branch covers the keys the placement gives it; alone, it covers every key."})
    paper_label: str = field(metadata={"help": "Its row name in the paper's Table 1 (evaluate.diagnose.PAPER_LABELS)."})
    uses_sinks: bool = field(default=False, metadata={"help": "Softmax over the first num_sinks valid tokens only (the StreamingLLM sinks diagnostic); excludes the other branches."})
    kernel_code: int | None = field(default=None, metadata={"help": "RULE code of the fused Triton kernels (attention/triton/_kernels.py); None: the kernels do not compute this mode and PyTorch runs it. A mode that combines both branches has one code per combine rule (triton.hybrid.RULES: shared_norm 0, mix 1) and holds the first, 0."})

    def __post_init__(self) -> None:
        if self.uses_sinks and (self.uses_window or self.uses_linear):
            raise ValueError(f"component mode {self.name!r}: the sinks diagnostic runs alone")

    @property
    def combines(self) -> bool:
        """Both branches run and meet in the combine rule."""
        return self.uses_window and self.uses_linear

    @property
    def no_branch(self) -> bool:
        """No branch runs: the layer's attention output is 0."""
        return not (self.uses_window or self.uses_linear or self.uses_sinks)

    def linear_lag(self, placement: str, window: int) -> int | None:
        """Steps a key waits before it enters the linear branch: the window under 'complementary' placement when the
        window covers the recent keys, else 0; None where the linear branch does not run."""
        if not self.uses_linear:
            return None
        return window if self.combines and placement == "complementary" else 0


#: The component modes, the one definition: every backend, command, table and label reads these entries (see
#: ARCHITECTURE.md, "A component mode").
MODES = {mode.name: mode for mode in (
    ComponentMode("hybrid", uses_window=True, uses_linear=True, kernel_code=0, paper_label="SWA + Linear"),
    ComponentMode("swa_only", uses_window=True, uses_linear=False, kernel_code=2, paper_label="SWA only"),
    ComponentMode("la_only", uses_window=False, uses_linear=True, kernel_code=3, paper_label="Linear only"),
    ComponentMode("sinks_only", uses_window=False, uses_linear=False, uses_sinks=True, paper_label="Attn sinks only"),
    ComponentMode("none", uses_window=False, uses_linear=False, paper_label="No attention"),
)}
COMPONENT_MODES = tuple(MODES)


def component_mode(mode: "str | ComponentMode") -> ComponentMode:
    """The registry's entry of a mode name (an entry passes through); ValueError for an unknown name."""
    if isinstance(mode, ComponentMode):
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown component mode {mode!r}; expected one of {COMPONENT_MODES}")
    return MODES[mode]


#: How the two branches combine in 'hybrid' mode (linearize.attention.common.combine).
COMBINE_RULES = ("shared_norm", "mix")
#: Feature maps of the linear branch (their definitions: linearize.feature_maps.FEATURE_MAPS).
FEATURE_MAP_NAMES = ("hedgehog", "exp", "relu", "elu1", "t2r", "none")
PLACEMENTS = ("complementary", "overlap")
#: The prompt's last tokens a query-chosen memory is read again by (HybridConfig.memory_reread's default, and the
#: query-memory baselines'): measured, RESULTS.md "Reading the question again against the memory".
MEMORY_REREAD = 32
#: How the sparse memory chooses its keys (HybridConfig.memory_select).
MEMORY_SELECTS = ("recall", "query")
#: how the query heads of one KV head combine their scores of a key (memory_select "query")
MEMORY_HEADS = ("sum", "max")
#: What a query-memory prompt's tokens before the re-read ones read besides window, sinks and linear state
#: (HybridConfig.memory_prefill).
MEMORY_PREFILLS = ("none", "recall", "exact")
MIX_GATES = ("fixed", "learned", "dynamic")
FEATURE_SIZES = ("full", "half")
BACKENDS = ("auto", "torch", "triton", "reference")
#: Kinds of the linear branch's state (their definitions and registry: linearize.attention.linear).
LINEAR_STATE_KINDS = ("sum", "gated", "delta")
#: Kinds whose state has a normaliser (den); the others give den = 1 and need the 'mix' combine rule.
NORMALISED_STATES = ("sum", "gated")
#: ``HybridConfig.layers`` = MEASURED + ":K": keep the K full-attention layers whose window+sinks cut costs the most
#: loss as full softmax and convert the others (chosen by linearize.models.layer_select before conversion).
MEASURED = "measured"
#: Largest HybridConfig.qk_conv: a short convolution (LAWCAT uses a few taps); decoding keeps K - 1 queries and keys.
MAX_QK_CONV = 16


def measured_keep(layers: Any) -> int | None:
    """K of a ``'measured:K'`` layer setting; None for any other setting ('all', 'global', a list).
    Raises ValueError for a 'measured' string that does not name a K >= 0."""
    if not isinstance(layers, str) or not layers.startswith(MEASURED):
        return None
    _, sep, k = layers.partition(":")
    if layers.split(":")[0] != MEASURED or not sep or not k.strip().isdigit():
        raise ValueError(f"HybridConfig.layers={layers!r}; the measured form is 'measured:K' with K >= 0 the number "
                         f"of full-attention layers kept as full softmax, e.g. 'measured:4'")
    return int(k)


#: HybridConfig fields that decide which parameters a converted layer has (and their initial values); the others only
#: steer its computation, so they may change after conversion (linearize.set_hybrid, a recipe's inference.hybrid).
STRUCTURAL_FIELDS = ("feature_map", "feature_size", "init_noise", "combine", "gamma_init", "gamma_trainable", "mix_gate",
                     "mix_value", "qk_conv", "linear_state", "decay_init", "delta_beta_init", "layers")


@dataclass
class HybridConfig:
    window: int = field(default=64, metadata={"help": "Sliding-window size w: softmax covers the w most recent keys, the query's own included."})
    feature_map: str = field(default="hedgehog", metadata={"help": "Feature map of the linear branch: hedgehog, exp, relu, elu1, t2r or none (see linearize.feature_maps)."})
    feature_size: str = field(default="full", metadata={"help": "Projection W of the feature map: 'full' is head_dim x head_dim (hedgehog then gives 2*head_dim features), 'half' is head_dim x head_dim/2 (LoLCATs size)."})
    init_noise: float = field(default=0.1, metadata={"help": "W starts as identity plus N(0, init_noise^2); 0 gives the exact identity."})
    combine: str = field(default="shared_norm", metadata={"help": "How the branches combine: 'shared_norm' (LoLCATs Eq. 7, one normaliser, SWA terms scaled by gamma) or 'mix' (g*SWA + (1-g)*LA of separately normalised outputs)."})
    gamma_init: float = field(default=0.1, metadata={"help": "shared_norm: initial gamma = sigmoid(theta) per head (LoLCATs uses 0.1)."})
    gamma_trainable: bool = field(default=True, metadata={"help": "shared_norm: whether gamma is a trainable parameter."})
    mix_gate: str = field(default="fixed", metadata={"help": "mix: 'fixed' g, 'learned' per-head g = sigmoid(theta), or 'dynamic' input-dependent g = sigmoid(w.x + b) per head."})
    mix_value: float = field(default=0.5, metadata={"help": "mix: g (fixed) or its initial value (learned, dynamic)."})
    mix_shift: float = field(default=0.0, metadata={"help": "mix with a 'learned' or 'dynamic' gate, at inference: added to the gate's logit, g = sigmoid(logit + mix_shift), so a trained conversion can lean towards its window (> 0) or its linear branch (< 0) without training: the measured trade-off between reading inside the window and reading past it. Computation only (set_hybrid, `--hybrid mix_shift=1`); 0 = the trained gate."})
    placement: str = field(default="complementary", metadata={"help": "Keys the linear branch covers in 'hybrid' mode: 'complementary' = only keys older than the window (LoLCATs), 'overlap' = all past keys."})
    num_sinks: int = field(default=8, metadata={"help": "Number of leading tokens attended in the 'sinks_only' diagnostic mode."})
    softmax_sinks: int = field(default=0, metadata={"help": "Attention sinks kept in the softmax branch (StreamingLLM): in 'hybrid' and 'swa_only' modes softmax covers the window plus the first n valid tokens of the row; with placement 'complementary' the linear branch leaves them out. 0 = off. Not the same as num_sinks (the 'sinks_only' diagnostic)."})
    sparse_memory: int = field(default=0, metadata={"help": "Sparse exact memory, 'hybrid' mode only: m exact keys per row and KV head in the softmax branch, chosen by memory_select. With 'recall' (LoLA-style, the default): every memory_block tokens, the keys in memory and those that left the window since are scored by how badly the linear state recalls their values (its own readout error: ||v - phi(k)^T S / phi(k)^T z||^2 for 'sum' and 'gated', ||v - S^T k^||^2 for 'delta'); the sparse_memory highest-scoring keys (per row and KV head) stay exact in the softmax branch, the rest enter the linear state. 'gated' and 'delta': an evicted key enters weighed by the decay since the step it would have entered the plain state (w steps after it), exp(sum of log_decay since then), so a key in the state weighs what it weighs in the plain gated state (under 'overlap' the linear branch is the plain state over all keys and this state only scores, as for 'sum', at the cost of a second state); 'delta' writes the evicted keys oldest first with the delta rule, strength beta times that decay. Training-free; the decode state grows by a fixed m + memory_block keys (with 'gated'/'delta' their ages, with 'delta' their betas). 0 = off. Exact definition: linearize.attention.reference."})
    memory_block: int = field(default=64, metadata={"help": "sparse_memory with memory_select 'recall': tokens between memory updates (block boundaries at multiples of it, padding counted); between updates the keys that left the window stay in the softmax branch, so softmax covers up to window + memory_block - 1 recent keys."})
    memory_select: str = field(default="recall", metadata={"help": "How the sparse memory chooses its keys. 'recall' (LoLA): online, every memory_block tokens, in every forward, as sparse_memory says. 'query' (SnapKV-style): once, at the end of a prefill (the forward that builds the decode state from a prompt: generate, a cached forward): every key outside the window of the prompt's last token (not a softmax sink, not padding) is scored by the softmax attention it receives from the prompt's last memory_observe queries (the whole causal softmax over the prompt, summed over those queries; the query heads of its KV head combined as memory_heads says), the scores max-pooled over memory_pool neighbouring positions; the sparse_memory highest stay exact in the softmax branch for the rest of the generation and leave the complementary linear state (it holds what it would hold had they never entered: a zero feature vector adds nothing to 'sum', 'gated' or 'delta'), and the prompt's last token is then decoded against this memory, so the first new token reads it. The memory stays fixed: keys that leave the window later enter the linear state as usual; no pending block is kept. A full (teacher-forced) forward -- training, bits-per-byte scoring -- has no end of prompt and runs without the memory under 'query'. Exact definition: linearize.attention.reference."})
    memory_observe: int = field(default=32, metadata={"help": "memory_select 'query': how many of the prompt's last valid queries score the keys (SnapKV's observation window, the last prompt token included); a shorter prompt uses all of its queries."})
    memory_pool: int = field(default=7, metadata={"help": "memory_select 'query': the keys' scores are max-pooled over this many neighbouring positions (odd; SnapKV uses 7), so the tokens next to a key the question looks for come with it; 1 = no pooling."})
    memory_heads: str = field(default="sum", metadata={"help": "memory_select 'query': how the query heads that share a KV head combine their scores of a key. 'sum' (SnapKV): the attention each gives it, added. 'max': the most any one of them gives it -- a key that one head alone looks for (a retrieval head among the group's G) is then not outranked by keys every head gives a little."})
    memory_in_state: bool = field(default=False, metadata={"help": "memory_select 'query': the kept keys also enter the complementary linear state, as every key outside the window does during training (which runs without the query memory), instead of leaving it (False, the default: the state holds what it would hold had they never entered). With it a conversion trained without a memory reads the linear state it was trained to read, and the memory's keys come in addition, exact, in the softmax branch. Measured on Qwen2.5-Coder-1.5B's delta conversion, SQuAD reading: no change (RESULTS.md, session 15). Computation only (set_hybrid); the decode state is the same size."})
    memory_prefill: str = field(default="none", metadata={"help": "memory_select 'query': what the prompt's tokens before the re-read ones read besides the window, the sinks and the linear state -- in a prefill and in a full (teacher-forced) forward. 'none' (the default): nothing; the memory is chosen only at the prompt's end. 'recall': the online recall memory of the same size (sparse_memory keys, updated every memory_block tokens), as in the training of a conversion trained with sparse_memory (memory_select 'recall'), so a gate trained beside that memory reads the prompt as it learned to; a prompt no longer than window + sinks + sparse_memory is then read exactly. The decode memory is still the query-chosen one (the re-read tokens and every later one read it; keys that leave the window after it is chosen take its free slots, memory_fill, then enter the linear state). Measured on the memory-trained Qwen2.5-Coder-1.5B conversion, 12 SQuAD items (CPU, before memory_fill and the delta den fix of session 17): 0.102 -> 0.089 bits per byte (the recall memory at inference: 0.079; RESULTS.md, session 16). Computation only (set_hybrid); the prefill walks the recall memory too (its cost), the decode state is the same. 'exact' (a diagnostic, not a constant-memory reading): in a prefill those tokens attend by softmax to every earlier key, as the base does (its cost and memory grow with the prompt, as the base's; a full forward runs as with 'none'), and the state, the memory and the re-read tokens are as always -- what a SnapKV-style cache reads, and so what the constant-memory prefill costs. Measured on Qwen2.5-Coder-1.5B's failing 16k long-QA item, 2048 keys: 1.023 -> 0.741 bits per byte, the base 0.300 (CPU, RESULTS.md session 28)."})
    memory_fill: bool = field(default=True, metadata={"help": "memory_select 'query' (the 'recall' memory takes every leaving key already; ignored there): keys that leave the window after the memory is chosen (while the re-read tokens and the decoded ones are read) take the memory's free slots first, in time order, instead of entering the linear state; free slots exist where the prompt had fewer candidates than sparse_memory. So a prompt and its continuation no longer than window + sinks + sparse_memory are read exactly (with memory_prefill 'recall' the prompt's tokens before the re-read ones too); a longer one fills no slot and is read as without it. Measured on the untrained Qwen2.5-Coder-1.5B with 2048 query-chosen keys (H200): reading (SQuAD / CoQA / DROP) +4.7% -> +1.9% bits per byte over the base, every long task unchanged (RESULTS.md, session 17). False: the memory stays as chosen and every later key enters the linear state (the rule before session 17, which saved configs without this field did not have either). Computation only (set_hybrid); the decode state is the same size."})
    memory_reread: int = field(default=MEMORY_REREAD, metadata={"help": "memory_select 'query': how many of the prompt's last tokens are read again against the chosen memory (decoded one by one after it is chosen, in every converted layer, so the upper layers see tokens that have read it): 1 = the last token only; 32 (the default) = the question too, when it is among the last 32 tokens (a prefill streams: without this the question's own tokens never read the memory; measured on Gemma 3 270M at 8k / 16k, 256 keys: long QA 0.877 / 0.854 -> 0.727 / 0.762 bits per byte, the base 0.691 / 0.770, RESULTS.md). The memory is chosen among the keys outside the window of the first re-read token. Computation only (set_hybrid); costs that many decode steps per converted layer at each prefill."})
    memory_pyramid: float = field(default=1.0, metadata={"help": "How the sparse memory's keys spread over the converted layers (PyramidKV-style): 1 = sparse_memory keys in every layer; p > 1 = a linear ramp from the first converted layer down to the last, p times as many keys in the first as in the last, the total the same (sparse_memory x layers, up to rounding: HybridConfig.memory_sizes) -- more exact keys where the lower layers' attention spreads over the prompt. Measured on Qwen2.5-Coder-1.5B's failing 16k long-QA item, the training-free 2048-key query memory, p = 7: 1.023 -> 0.910 bits per byte (4096 keys: 0.855 -> 0.849; CPU, RESULTS.md session 28). Computation only (set_hybrid); the decode state holds the same number of keys in all."})
    linear_state: str = field(default="sum", metadata={"help": "State of the linear branch (linearize.attention.linear): 'sum' (normalised linear attention, LoLCATs), 'gated' (the same with a learned per-head, per-token decay, GLA-style; log_decay = -softplus(x W + b)), 'delta' (gated delta rule, Gated DeltaNet; unnormalised: combine 'mix' only)."})
    decay_init: float = field(default=0.999, metadata={"help": "linear_state 'gated' (and 'delta'): the initial per-token decay exp(log_decay) of every head (W = 0, b set from it); 0.999 forgets over ~1000 tokens, close to 'sum' at conversion."})
    delta_beta_init: float = field(default=0.5, metadata={"help": "linear_state 'delta': the initial write strength beta = sigmoid(x W + b) of every head (W = 0, b set from it)."})
    qk_conv: int = field(default=0, metadata={"help": "Short causal convolution on q/k (LAWCAT): kernel size K of a depthwise convolution over time, one filter per head and channel, applied to the queries and keys of the linear branch only (after RoPE and any q/k norms, before its feature maps); the softmax branch keeps the base's q/k, so with the linear branch off the layer is still the base's window. Starts as the identity (last tap 1), so a fresh conversion equals qk_conv=0; stage 1 trains it with the feature maps. Padding enters it as zeros; decoding keeps the last K - 1 queries and keys per layer. 0 = off, at most 16."})
    chunk_size: int = field(default=64, metadata={"help": "Query/key block size of the chunked implementations."})
    backend: str = field(default="auto", metadata={"help": "'auto' (Triton on CUDA when available, else chunked PyTorch), 'torch', 'triton' or 'reference' (quadratic spec, for tests)."})
    layers: Any = field(default="all", metadata={"help": "Layers to convert: 'all', 'global' (only the base's full-attention layers), a list of layer indices, or 'measured:K': of the base's full-attention layers, keep as full softmax the K whose cut to the training-free window+sinks (this config's window and softmax_sinks, unless the recipe's layer_selection section sets them) raises the loss on long text the most, convert the others; measured once by the conversion run (written to layer_selection.json; the converted model's config stores the list). `linearize select-layers` measures without converting."})

    def __post_init__(self) -> None:
        checks = {
            "combine": (self.combine, COMBINE_RULES),
            "placement": (self.placement, PLACEMENTS),
            "mix_gate": (self.mix_gate, MIX_GATES),
            "feature_size": (self.feature_size, FEATURE_SIZES),
            "backend": (self.backend, BACKENDS),
            "memory_select": (self.memory_select, MEMORY_SELECTS),
            "memory_prefill": (self.memory_prefill, MEMORY_PREFILLS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"HybridConfig.{name}={value!r}; expected one of {allowed}")
        if self.feature_map not in FEATURE_MAP_NAMES:
            raise ValueError(f"HybridConfig.feature_map={self.feature_map!r}; expected one of {sorted(FEATURE_MAP_NAMES)}")
        if self.window < 1:
            raise ValueError(f"HybridConfig.window must be >= 1, got {self.window}")
        if not 0.0 < self.gamma_init < 1.0 or not 0.0 <= self.mix_value <= 1.0:
            raise ValueError("gamma_init must be in (0, 1) and mix_value in [0, 1]")
        if self.mix_shift and (self.combine != "mix" or self.mix_gate == "fixed"):
            raise ValueError(f"mix_shift={self.mix_shift} moves a learned or dynamic mix gate; this config has "
                             f"combine={self.combine!r}, mix_gate={self.mix_gate!r} (a fixed g is mix_value)")
        if self.softmax_sinks < 0 or self.sparse_memory < 0 or self.memory_block < 1:
            raise ValueError("softmax_sinks and sparse_memory must be >= 0 and memory_block >= 1")
        if self.memory_pyramid < 1 or (self.memory_pyramid != 1 and not self.sparse_memory):
            raise ValueError(f"memory_pyramid={self.memory_pyramid} spreads sparse_memory's keys over the layers: it must be "
                             f">= 1 (1 = the same in every layer), and > 1 only with sparse_memory > 0")
        if self.memory_reread < 1:
            raise ValueError(f"memory_reread must be >= 1 (the prompt's last token reads the memory); got {self.memory_reread}")
        if self.memory_heads not in MEMORY_HEADS:
            raise ValueError(f"memory_heads must be one of {MEMORY_HEADS}; got {self.memory_heads!r}")
        if self.memory_observe < 1 or self.memory_pool < 1 or self.memory_pool % 2 == 0:
            raise ValueError(f"memory_observe must be >= 1 and memory_pool an odd number >= 1; got {self.memory_observe} "
                             f"and {self.memory_pool}")
        if self.memory_in_state and self.memory_select != "query":
            raise ValueError("memory_in_state keeps the query memory's keys in the linear state too; the 'recall' memory "
                             "chooses keys by how badly that state recalls them and lets only the others enter: set "
                             "memory_select='query' (or memory_in_state=False)")
        if self.memory_prefill != "none" and self.memory_select != "query":
            raise ValueError(f"memory_prefill={self.memory_prefill!r} sets what a query memory's prompt reads before the memory "
                             f"is chosen; the 'recall' memory is read by every token already: set memory_select='query' "
                             f"(or memory_prefill='none')")
        if self.memory_select != "recall" and not self.sparse_memory:
            raise ValueError(f"memory_select={self.memory_select!r} chooses the sparse memory's keys, but sparse_memory "
                             f"is 0: set sparse_memory > 0 (or leave memory_select 'recall')")
        if self.backend == "triton" and self.softmax_extras:
            raise ValueError("softmax_sinks and sparse_memory run on the PyTorch paths only; the Triton kernels do not "
                             "implement them: use backend 'auto' or 'torch'")
        if not 0 <= self.qk_conv <= MAX_QK_CONV:
            raise ValueError(f"HybridConfig.qk_conv={self.qk_conv}; expected a kernel size 0 (off) .. {MAX_QK_CONV}")
        if self.linear_state not in LINEAR_STATE_KINDS:
            raise ValueError(f"HybridConfig.linear_state={self.linear_state!r}; expected one of {LINEAR_STATE_KINDS}")
        if not 0.0 < self.decay_init < 1.0 or not 0.0 < self.delta_beta_init < 1.0:
            raise ValueError("decay_init must be in (0, 1) and delta_beta_init in (0, 1)")
        if self.linear_state != "sum" and self.backend == "triton":
            raise ValueError(f"the Triton kernels compute the 'sum' state only; use backend 'auto' or 'torch' with "
                             f"linear_state={self.linear_state!r}")
        if self.linear_state not in NORMALISED_STATES and self.combine == "shared_norm":
            raise ValueError(f"linear_state={self.linear_state!r} has no normaliser for 'shared_norm'; set combine='mix'")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if isinstance(self.layers, str) and self.layers not in ("all", "global") and measured_keep(self.layers) is None:
            raise ValueError(f"HybridConfig.layers={self.layers!r}; expected 'all', 'global', 'measured:K' or a list "
                             f"of layer indices")

    @property
    def softmax_extras(self) -> bool:
        """Whether the softmax branch holds keys besides the window (softmax sinks, sparse memory)."""
        return self.softmax_sinks > 0 or self.sparse_memory > 0

    def memory_sizes(self, layers: list[int]) -> dict[int, int]:
        """{layer: the sparse memory's keys there} over the converted ``layers``: sparse_memory each, or with
        memory_pyramid = p > 1 weights falling linearly from p (the first layer) to 1 (the last), scaled to the same
        total; the keys rounding leaves go to the largest remainders (each layer keeps at least one)."""
        order = sorted(layers)
        n = len(order)
        if self.memory_pyramid == 1 or n < 2 or not self.sparse_memory:
            return {i: self.sparse_memory for i in order}
        p = self.memory_pyramid
        weights = [p - (p - 1) * j / (n - 1) for j in range(n)]
        raw = [self.sparse_memory * n * w / sum(weights) for w in weights]
        whole = [int(r + 1e-9) for r in raw]  # a share of 4.9999999 is 5
        sizes = [max(1, x) for x in whole]
        left = self.sparse_memory * n - sum(sizes)
        for j in sorted(range(n), key=lambda j: raw[j] - whole[j], reverse=True)[:max(left, 0)]:
            sizes[j] += 1
        return dict(zip(order, sizes))

    def layer_memory(self, layer: int) -> int:
        """The sparse memory's keys in converted layer ``layer`` (`memory_sizes` over ``layers``, which a converted
        model's config holds as a list)."""
        if self.memory_pyramid == 1 or not self.sparse_memory:
            return self.sparse_memory
        if not isinstance(self.layers, list) or layer not in self.layers:
            raise ValueError(f"memory_pyramid spreads the memory over the converted layers, given as a list (convert "
                             f"resolves them); layer {layer} is not in layers={self.layers!r}")
        return self.memory_sizes(self.layers)[layer]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HybridConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown HybridConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) for every field: the documentation of the layer's options."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
