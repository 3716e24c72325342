"""Decoding a converted model by replaying one captured CUDA graph per token.

Eager decoding of a Hugging Face model is bound by the host (hundreds of small kernel launches per token). Every
converted layer keeps a fixed-shape `HybridState` that each step updates in place, and nothing in the step reads a
Python value that changes per token (positions come from a device tensor; the masks Hugging Face builds from the
cache length are ignored by converted layers), so one forward can be captured once and replayed. A sparse memory
chosen online ('recall', kind 'sum') runs its boundary step on every replayed token and commits it only where its
device-side block position ends a block (`HybridState.boundary_every_step`). Layers a conversion
left unconverted must be sliding-window layers: their keys move into fixed rings (`attention/ring.py`), attended
through the ring's mask, passed as the model's attention mask; unconverted full-attention layers are refused.

    cache = DynamicCache(config=model.config)
    logits = model(prompt, **cache_kwargs(cache), use_cache=True).logits      # prefill, eager
    decoder = GraphDecoder(model, cache, positions=prompt.shape[1])
    for _ in range(n):
        ids = logits[:, -1:].argmax(-1)
        logits = decoder.step(ids)                                            # (B, 1, vocab)
"""

from __future__ import annotations

import contextlib
import types

import torch
from transformers.cache_utils import Cache

from linearize.attention.cache import HybridCacheLayer
from linearize.attention.module import HybridAttention
from linearize.attention.ring import RING_ATTENTION, ring_attention_mask, swap_in_rings, unconverted_layers
from linearize.compat import cache_kwargs


#: classes whose names end so are compiled by `compiled_outside_attention`: the parts of a decoder step outside the
#: attention kernel that run as chains of small kernels (a Gemma 3 RMSNorm is about eight elementwise kernels, six per
#: layer; a converted layer's hedgehog feature map a GEMM, two softmaxes and a concatenation for q and again for k:
#: 1.1 ms of softmax and concatenation kernels, elementwise ones besides, in a 30 ms Gemma-3-270M-shaped step at batch
#: 4096 on an H100; compiled, the step took 0.9 ms less: benchmarks/profile_decode.py, results/speed/h100_6544e31/)
OUTSIDE_ATTENTION = ("RMSNorm", "MLP", "FeatureMap")

#: torch.compile's backend for them (tests on the CPU set a tracing-only one)
COMPILE_BACKEND = "inductor"

# one torch.compile wrapper per (class, backend) for the process (not a new one at every entry); the compiled graphs
# themselves dynamo keeps on the class's forward (RECOMPILE_LIMIT), which a step entering the context again (the
# capture after the warm-up steps) finds instead of compiling anew
_COMPILED: dict = {}

#: dynamo's compiled graphs of one function (per code object: every wrapper of a class's forward shares them) while
#: inside the context. One Gemma 3 model used 6 of dynamo's default 8 (input norms and q/k norms of other ranks, the
#: prompt's length and the step's, strides), so a second model of another dtype in the process hit the limit: a hard
#: error under fullgraph. The compiles happen inside the context only (a captured step replays without dynamo).
RECOMPILE_LIMIT = 64


def _recompile_limit(limit: int):
    """dynamo's per-function recompile limit raised to `limit` while inside (its name changed across torch releases)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(limit, getattr(cfg, name))})


@contextlib.contextmanager
def compiled_outside_attention(model: torch.nn.Module, *, backend: str | None = None):
    """While inside: every norm, MLP and feature map of `model` (classes named as OUTSIDE_ATTENTION ends) runs
    through torch.compile,
    one compiled function per class that all its instances share (their weights are its inputs), so a step launches
    one fused kernel where a norm ran several. A step captured in a CUDA graph inside keeps the fused kernels in
    every replay after the exit. Modules whose `forward` is already an instance attribute (a hook library's wrapper)
    or compiled by the user (`module.compile()`) are left alone; on exit the others run their own forward again.
    The same treatment for a base model and its conversion, whose norms and MLPs are the base's (the feature maps
    are the conversion's own: the base has none). Yields the classes' names."""
    backend = backend or COMPILE_BACKEND
    classes, mods = set(), []
    for m in model.modules():
        cls = type(m)
        if (cls.__name__.endswith(OUTSIDE_ATTENTION) and "forward" not in m.__dict__
                and getattr(m, "_compiled_call_impl", None) is None):
            if (cls, backend) not in _COMPILED:  # dynamic=None: a second batch size recompiles once, that size symbolic
                _COMPILED[cls, backend] = torch.compile(cls.forward, backend=backend, fullgraph=True)
            m.forward = types.MethodType(_COMPILED[cls, backend], m)
            classes.add(cls.__name__)
            mods.append(m)
    try:
        with _recompile_limit(RECOMPILE_LIMIT):
            yield sorted(classes)
    finally:
        for m in mods:
            del m.forward


class GraphStep:
    """A model's one-token forward on static buffers (`ids`, `positions`, the cache), replayed from a CUDA graph.

    The first `warmup_steps` calls run eagerly on a side stream (they are real steps: Triton compiles, cuBLAS sets up
    its workspace); the next one captures the forward and replays it. Used by `GraphDecoder` and by the decode
    benchmark's static-cache base, so both get the same treatment. `capture=False` runs every call eagerly (the same
    forward on the same buffers, on any device). `fuse`: the warm-up steps and the capture run inside
    `compiled_outside_attention` (the norms and MLPs compiled; with capture=False every step does).
    """

    fuse = False  # set by _init_buffers

    def _init_buffers(self, model, cache, positions: torch.Tensor, warmup_steps: int, capture: bool = True,
                      fuse: bool = False) -> None:
        self.model, self.cache, self.positions = model, cache, positions
        self.ids = torch.zeros(positions.shape[0], 1, dtype=torch.long, device=positions.device)
        self.warmup_left = warmup_steps
        self.capture, self.fuse = capture, fuse
        self.side_stream = torch.cuda.Stream(positions.device) if capture else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _model_inputs(self) -> dict:
        """Inputs of the step's forward besides ids, positions and the cache (computed inside the captured region)."""
        return {}

    def _forward(self) -> torch.Tensor:
        with compiled_outside_attention(self.model) if self.fuse else contextlib.nullcontext():
            logits = self.model(input_ids=self.ids, position_ids=self.positions, **cache_kwargs(self.cache),
                                use_cache=True, **self._model_inputs()).logits
        self.positions.add_(1)
        return logits

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _run(self) -> tuple[torch.Tensor, bool]:
        """The step's logits, and whether they came from a replay (False: an eager warm-up step)."""
        if not self.capture:
            return self._forward(), False
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                logits = self._forward()
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return logits, False
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits, True


class GraphDecoder(GraphStep):
    """One token per `step` for every row of a prefilled cache, by CUDA-graph replay.

    `positions`: the position of each row's next token, an int or a (B, 1) tensor (left-padded rows differ).
    The first `warmup_steps` steps run eagerly on a side stream (they are real steps: Triton compiles, cuBLAS sets up
    its workspace); the next one captures the forward and replays it. Logits of replayed steps live in one static
    buffer that the next step overwrites: clone them to keep them.

    Unconverted sliding-window layers: their cache layers are replaced by rings (in `cache`, in place) holding the last
    window of the prompt; `valid` (B, prompt length) bool is the prompt's padding mask (None: no padding).
    `capture=False` runs every step eagerly through the same forward (what the captured step replays, on any device).
    `fuse`: the norms and MLPs compiled into the step (`compiled_outside_attention`).
    """

    @torch.inference_mode()
    def __init__(self, model: torch.nn.Module, cache: Cache, positions: int | torch.Tensor, *, warmup_steps: int = 2,
                 valid: torch.Tensor | None = None, capture: bool = True, fuse: bool = False):
        if model.training:
            raise ValueError("call model.eval() first: a captured step replays the same dropout masks")
        layers = [m for m in model.modules() if isinstance(m, HybridAttention)]
        if not layers:
            raise ValueError("the model has no converted layers")
        for module in model.modules():
            rope = getattr(module, "rope_type", None)
            if any(kind in ("dynamic", "longrope") for kind in (rope.values() if isinstance(rope, dict) else [rope])):
                raise ValueError("dynamic/longrope RoPE rescales on the host from the positions' values; it cannot be captured")
        if all(layer.get_seq_length() == 0 for layer in cache.layers):
            raise ValueError("the cache is empty: prefill it with an eager forward before capturing the decode step")
        sliding, full = unconverted_layers(model)
        if full:
            raise ValueError(f"unconverted full-attention layers {full} keep a growing KV cache, which a captured step "
                             "cannot hold; convert them (unconverted sliding-window layers decode on a fixed ring)")
        hybrid = [m.layer_idx for m in layers]
        if len(cache.layers) <= max(hybrid + sliding) or any(
                not isinstance(cache.layers[i], HybridCacheLayer) or cache.layers[i].state is None for i in hybrid):
            raise ValueError("the cache does not hold a prefilled hybrid state for every converted layer; prefill it "
                             "with an eager forward of this model first")
        self.attn_implementation = model.config.get_text_config(decoder=True)._attn_implementation
        if sliding and self.attn_implementation not in RING_ATTENTION:
            raise ValueError(f"the unconverted sliding-window layers run attn_implementation "
                             f"{self.attn_implementation!r}; their ring's mask is built for "
                             f"{' or '.join(map(repr, RING_ATTENTION))} (model.set_attn_implementation('sdpa'))")
        self.states = [cache.layers[i].state for i in hybrid]
        # a memory chosen at prefill ('query') is fixed: its step has fixed shapes like the rest of the state; one
        # chosen online ('recall') on kind 'sum' runs its boundary step on every token, committed where a block ends
        online = [st for st in self.states if st.memory is not None and not st.memory_fixed]
        if any(not st.additive for st in online):
            raise ValueError("sparse memory ('recall') on a linear state other than 'sum' runs its boundary step on "
                             "the host's token count, which a captured step cannot replay; decode it eagerly")
        batch = {st.S.shape[0] for st in self.states}
        if len(batch) != 1:
            raise ValueError(f"the layers' states hold different batch sizes {sorted(batch)}")
        (b,) = batch
        device = self.states[0].S.device
        positions = torch.as_tensor(positions, device=device, dtype=torch.long)
        self.positions = positions.expand(b, 1).clone() if positions.numel() == 1 else positions.clone()
        if self.positions.shape != (b, 1):
            raise ValueError(f"positions must be an int or a ({b}, 1) tensor, got shape {tuple(positions.shape)}")
        if capture and (not all(t.is_cuda for st in self.states for t in st.tensors())
                        or not next(model.parameters()).is_cuda):
            raise ValueError("CUDA graphs need the model and its cache on a CUDA device")
        self.rings = swap_in_rings(cache, sliding, valid)
        if len({(r.window, r.seen, r.keys.shape[0]) for r in self.rings}) > 1:
            raise ValueError("the unconverted sliding-window layers differ in window, tokens seen or batch; one mask "
                             "cannot serve their rings")
        if self.rings and (self.rings[0].keys.shape[0] != b or self.rings[0].seen != self.states[0].seen):
            raise ValueError("the rings of the unconverted layers and the hybrid states hold different batches or "
                             "token counts")
        self.attention_layers = layers
        for st in online:  # after every check: a refused decoder leaves the states as they were
            st.boundary_every_step = True
        self._init_buffers(model, cache, self.positions, warmup_steps, capture, fuse)
        self.captured_with = self._signature()

    def _signature(self):
        """What the captured step baked in: the cache's layer objects, the states and each layer's component modes."""
        return [id(layer) for layer in self.cache.layers] + [
            id(layer.state) for layer in self.cache.layers if isinstance(layer, HybridCacheLayer)] + [
            (m.mode, tuple(sorted((m.head_modes or {}).items()))) for m in self.attention_layers]

    def _model_inputs(self) -> dict:
        if not self.rings:
            return {}
        # one mask over the ring slots for every unconverted layer (converted layers ignore masks)
        return {"attention_mask": ring_attention_mask(self.rings[0], self.attn_implementation, self.rings[0].keys.dtype)}

    def _counters(self) -> list:
        return self.states + self.rings

    def _capture(self) -> None:
        seen = [c.seen for c in self._counters()]
        super()._capture()
        # capturing records the kernels without running them: undo the step's Python-side bookkeeping
        for c, n in zip(self._counters(), seen):
            c.seen = n

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, 1, vocab) of the next token given this token's ids (B, 1); `positions` (B, 1) sets this token's
        positions (default: one past the previous step's)."""
        if self._signature() != self.captured_with:
            raise ValueError("the cache states or the component modes changed since this decoder was built; build a new one")
        self.ids.copy_(ids.reshape(self.ids.shape))
        if positions is not None:
            self.positions.copy_(positions.reshape(self.positions.shape))
        logits, replayed = self._run()
        if replayed:  # an eager step counts its tokens itself
            for c in self._counters():
                c.seen += 1
        return logits
