"""Decode benchmarks: tokens/s of one-token steps against a prefilled cache, base model vs converted.

`run_fair_decode` is the headline: the base model with Hugging Face's `StaticCache` and its one-token forward
captured in a CUDA graph (`CapturedStaticStep`), next to the converted model's captured step (`GraphDecoder`; with
and without the fused decode kernel of `attention/triton/decode.py`), at the same batch and context, for the
Gemma-3-270M shape and a Llama-3-8B-shaped layer stack (random weights); each row is read against its memory floor,
(bytes of weights + cache/state read per step) / (copy bandwidth measured in the same run). `run_eager_decode_bench`
is the older grid (HF's eager loop with a DynamicCache for the base; eager PyTorch, eager Triton and captured steps
for the converted model), kept as a labelled extra.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback

import torch
from transformers.cache_utils import StaticCache

from linearize.attention.cache import cache_nbytes, hybrid_cache_layer
from linearize.attention.graph_decode import GraphDecoder, GraphStep
from linearize.attention.linear.common import KVState
from linearize.attention.module import HybridAttention
from linearize.attention.recurrent import HybridState
from linearize.attention.ring import RingWindowLayer, ring_bytes
from linearize.bench.timing import copy_bandwidth, free, sync
from linearize.compat import cache_kwargs
from linearize.config import HybridConfig
from linearize.models.convert import convert


def gemma3_270m_config():
    from transformers import Gemma3TextConfig

    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, layer_types=types, query_pre_attn_scalar=256,
        max_position_embeddings=262144,
    )


def _fill_base_cache(model, batch, ctx, dtype, device="cuda"):
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    kinds = cfg.layer_types
    for i in range(cfg.num_hidden_layers):
        n = ctx if kinds[i] == "full_attention" else min(ctx, cfg.sliding_window - 1)
        k = torch.randn(batch, cfg.num_key_value_heads, n, cfg.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        cache.update(k, v, i)
        layer = cache.layers[i]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = ctx
        del k, v
    return cache


def _fill_hybrid_cache(model, batch, ctx, dtype, device="cuda"):
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    mods = {m.layer_idx: m for m in model.modules() if isinstance(m, HybridAttention)}
    for i, mod in mods.items():
        if mod.hybrid.linear_state != "sum":  # the synthetic state below is the 'sum' kind's (S, z)
            raise ValueError(f"the decode benchmark builds 'sum' states; layer {i} has linear_state {mod.hybrid.linear_state!r}")
        ring = mod.hybrid.window - 1
        hkv, d, m, n = cfg.num_key_value_heads, cfg.head_dim, mod.feature_map_k.num_features, mod.hybrid.num_sinks
        keep = min(ctx, ring)
        dev = device
        st = HybridState(
            linear=KVState(torch.randn(batch, hkv, m, d, device=dev) * 0.01, torch.rand(batch, hkv, m, device=dev) + 1),
            buf_k=torch.randn(batch, hkv, ring, d, device=dev, dtype=dtype), buf_v=torch.randn(batch, hkv, ring, d, device=dev, dtype=dtype),
            buf_kf=torch.rand(batch, hkv, ring, m, device=dev, dtype=dtype),
            buf_valid=(torch.arange(ring, device=dev) < keep).expand(batch, ring).contiguous(),
            sink_k=torch.randn(batch, hkv, n, d, device=dev, dtype=dtype), sink_v=torch.randn(batch, hkv, n, d, device=dev, dtype=dtype),
            sink_valid=torch.ones(batch, n, dtype=torch.bool, device=dev),
            slot=torch.tensor([keep % ring if ring else 0], device=dev), seen=ctx,
        )
        if mod.hybrid.qk_conv:  # the q/k convolution's past inputs
            taps = mod.hybrid.qk_conv - 1
            st.conv_q = torch.randn(batch, cfg.num_attention_heads, taps, d, device=dev, dtype=dtype)
            st.conv_k = torch.randn(batch, hkv, taps, d, device=dev, dtype=dtype)
        hybrid_cache_layer(cache, i).state = st
    return cache


def _decode_rate(model, cache, batch, ctx, steps, *, graph=False, fuse=False, device="cuda"):
    """tokens/s, ms/step and cache bytes of `steps` decoding steps: eager forwards, or a captured graph's replays
    (`fuse`: with the norms and MLPs compiled into it)."""

    ids = torch.randint(1, 1000, (batch, 1), device=device)
    nbytes = cache_nbytes(cache)
    if graph:
        decoder = GraphDecoder(model, cache, positions=ctx, fuse=fuse)
        warm = decoder.warmup_left + 2  # eager warm-up steps, the capture (+ its first replay), one more replay

        def step(i):
            return decoder.step(ids)
    else:
        warm = 2

        def step(i):
            pos = torch.full((batch, 1), ctx + i, device=device, dtype=torch.long)
            return model(input_ids=ids, **cache_kwargs(cache), use_cache=True, position_ids=pos).logits

    return (*_timed_steps(step, batch, warm, steps), nbytes)


#: converted kinds: (decode backend of the hybrid layers, replayed as a CUDA graph)
CONVERTED_KINDS = {"converted_torch": ("torch", False), "converted_triton": ("triton", False), "converted_graph": ("triton", True)}


def run_eager_decode_bench(contexts, batches, *, steps=8, search_batches=(512, 384, 256, 192, 128, 64), log=print):
    from dataclasses import replace

    from transformers import Gemma3ForCausalLM


    dtype = torch.bfloat16
    cfg = gemma3_270m_config()
    with torch.device("cuda"):
        model = Gemma3ForCausalLM(cfg).to(dtype).eval()
    rows = []

    def measure(kind, batch, ctx, graph=False):
        row = dict(kind=kind, batch=batch, context=ctx)
        cache = None
        try:
            free()
            torch.cuda.reset_peak_memory_stats()
            cache = (_fill_base_cache if kind == "base" else _fill_hybrid_cache)(model, batch, ctx, dtype)
            tps, ms, nbytes = _decode_rate(model, cache, batch, ctx, steps, graph=graph)
            row.update(tokens_per_s=tps, ms_per_step=ms, cache_bytes=nbytes, cache_bytes_per_seq=nbytes / batch,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            log(f"decode {kind:16s} B={batch:4d} ctx={ctx:6d}: {tps:10.1f} tok/s  {ms:8.2f} ms/step  cache {nbytes / 2**20:9.1f} MiB")
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            log(f"decode {kind:16s} B={batch:4d} ctx={ctx:6d}: OOM")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"decode {kind} B={batch} ctx={ctx}: ERROR {row['error']}")
            traceback.print_exc(limit=4)
        finally:
            del cache
            free()
        rows.append(row)
        return row

    # base: the grid, then the largest batch that fits at the longest context
    for ctx in contexts:
        for batch in batches:
            measure("base", batch, ctx)
    largest = None
    for batch in search_batches:
        r = measure("base", batch, max(contexts))
        if "error" not in r:
            largest = batch
            break
    # converted (in place): eager PyTorch step, eager Triton step, the Triton step replayed as a CUDA graph
    convert(model, HybridConfig())
    layers = [m for m in model.modules() if isinstance(m, HybridAttention)]
    for kind, (backend, graph) in CONVERTED_KINDS.items():
        for layer in layers:
            layer.hybrid = replace(layer.hybrid, backend=backend)
        for ctx in contexts:
            for batch in batches:
                measure(kind, batch, ctx, graph)
        if largest:
            measure(kind, largest, max(contexts), graph)
    del model
    free()
    return rows, largest


def decode_ratios(rows, largest, ctx):
    by = {(r["kind"], r["batch"], r["context"]): r for r in rows if "tokens_per_s" in r}
    out = []
    for (kind, batch, c), r in sorted(by.items()):
        base = by.get(("base", batch, c))
        if kind != "base" and base:
            out.append(dict(kind=kind, batch=batch, context=c, speedup_vs_base=r["tokens_per_s"] / base["tokens_per_s"],
                            cache_ratio_base_over_ours=base["cache_bytes"] / max(r["cache_bytes"], 1)))
    return out



# ----------------------------------------------------------------------------------------------------------------
# the fair baseline: a static-cache base model decoded by a captured step, and each path's memory floor
# ----------------------------------------------------------------------------------------------------------------
#: Llama-3-8B's layer shape; the stack is cut to `layers` layers (ratios are per step, so what matters is that both
#: paths run the same stack: weights and cache or state scale alike with the layer count, the LM head does not).
LLAMA3_8B_LAYERS = 32


def llama3_8b_config(layers: int = 8):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                       tie_word_embeddings=False)


def decode_shape(name: str, llama_layers: int = 8):
    if name == "gemma3-270m":
        from transformers import Gemma3ForCausalLM

        return gemma3_270m_config(), Gemma3ForCausalLM
    if name == "llama3-8b":
        from transformers import LlamaForCausalLM

        return llama3_8b_config(llama_layers), LlamaForCausalLM
    raise ValueError(f"unknown decode shape {name!r}: gemma3-270m, llama3-8b")


def static_cache_bytes_per_seq(cfg, length: int, dtype=torch.bfloat16) -> int:
    """Bytes of one sequence in a StaticCache of `length` slots (sliding layers: a ring of their window, flags
    included)."""
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or length
    hkv, d, size = cfg.num_key_value_heads, cfg.head_dim, torch.finfo(dtype).bits // 8
    return sum(ring_bytes(hkv, d, min(window, length), size) if kind == "sliding_attention" else 2 * length * hkv * d * size
               for kind in types)


#: The base's attention in the fair benchmark: HF's SDPA function under a name without a mask function, so no mask is
#: built (see `use_unmasked_sdpa`).
UNMASKED_SDPA = "linearize_unmasked_sdpa"


def use_unmasked_sdpa(model) -> None:
    """Run the base's attention as HF's SDPA without a mask. HF masks the unwritten slots of a StaticCache, and with a
    mask its SDPA call expands the key/value heads to the query heads (`repeat_kv`: the whole cache copied g times per
    step); `fill_static_cache` writes every slot, so no mask is needed and SDPA reads the cache once with native GQA --
    the fastest the base can decode with HF's own modules."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)  # no mask function registered: masks are None
    model.set_attn_implementation(UNMASKED_SDPA)


def fill_static_cache(model, batch: int, ctx: int, room: int, dtype=torch.bfloat16) -> StaticCache:
    """A StaticCache of ctx + room slots, every slot filled with random keys/values, the next write at `ctx`.

    Every slot holds a key so that the step can attend without a mask (`use_unmasked_sdpa`): each step reads
    ctx + room keys per full layer, at most `room` (a few dozen) more than a step at context `ctx`. Sliding layers are
    rings of their window (`RingWindowLayer`, a slot write per step that a CUDA graph can capture, instead of HF's
    roll and two full copies); keys are stored after RoPE, so attending to the whole ring unmasked is attending to
    the window."""
    cfg = model.config
    device = next(model.parameters()).device
    cache = StaticCache(config=cfg, max_cache_len=ctx + room)
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    proto = torch.empty(batch, hkv, 1, d, device=device, dtype=dtype)
    for i, layer in enumerate(cache.layers):
        if layer.is_sliding:
            window = min(cfg.sliding_window, ctx + room)
            keys = torch.randn(batch, hkv, window, d, device=device, dtype=dtype)
            cache.layers[i] = RingWindowLayer(keys, torch.randn_like(keys),
                                              torch.ones(batch, window, dtype=torch.bool, device=device), seen=ctx)
            continue
        layer.lazy_initialization(proto, proto)
        layer.keys.normal_()
        layer.values.normal_()
        layer.cumulative_length.fill_(ctx)
    return cache


class CapturedStaticStep(GraphStep):
    """The base model's one-token forward against a filled StaticCache, captured once in a CUDA graph and replayed:
    the treatment `GraphDecoder` gives a converted model (the same `GraphStep`: warm-up steps on a side stream,
    then capture, then replay). Call `use_unmasked_sdpa(model)` first (no mask is built)."""

    def __init__(self, model, cache: StaticCache, batch: int, position: int, *, warmup_steps: int = 2,
                 fuse: bool = False):
        device = next(model.parameters()).device
        self._init_buffers(model, cache, torch.full((batch, 1), position, dtype=torch.long, device=device), warmup_steps,
                           fuse=fuse)

    @torch.inference_mode()
    def step(self, ids):
        self.ids.copy_(ids)
        return self._run()[0]


def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one decoding step reads: every parameter once (a tied embedding once, as the LM head),
    except an untied input embedding, of which a step gathers only its tokens' rows."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if inp.data_ptr() != out.data_ptr():
        total -= inp.numel() * inp.element_size()
    return total


def memory_floor_ms(nbytes: int, bandwidth: float) -> float:
    """The memory floor of a step that reads `nbytes` (weights, cache or state), in ms: each byte read once at the
    copy bandwidth (bytes/s, `bench.timing.copy_bandwidth`)."""
    return nbytes / bandwidth * 1e3


def _timed_steps(step, batch: int, warm: int, steps: int) -> tuple[float, float]:
    """tokens/s and ms/step of `steps` calls of step(i) (i: the step's index) after `warm` untimed ones (wall clock
    around the loop, the device synchronised at both ends: what a generation loop sees)."""
    with torch.inference_mode():
        for i in range(warm):
            step(i)
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            step(warm + i)
        sync()
        dt = time.perf_counter() - t0
    return batch * steps / dt, dt / steps * 1e3


#: kinds of the fair decode rows
FAIR_KINDS = {
    "base_static_graph": "base, HF StaticCache, one-token forward captured in a CUDA graph",
    "converted_graph": "converted, HybridState, GraphDecoder (the fused one-launch Triton step of each layer, "
                       "attention/triton/decode.py, captured in a CUDA graph), the deferred fold off (F = 1: every "
                       "step folds its leaving key)",
    "converted_graph_unfused": "the same with LINEARIZE_FUSED_DECODE=0 (the previous step: the decode kernel plus "
                               "PyTorch ring and sink updates), in the same run",
    "converted_graph_fold16": "converted_graph with the fused step's deferred fold (TUNING['fold_every'] = 16: the keys "
                              "leaving the window wait in a list of 16 and S is written once per 16 steps instead of "
                              "every step; the default where the step's programs fill the SMs twice over, "
                              "decode.BY_LOAD), in the same run (its floor counts the state without that list)",
    "base_eager_dynamic": "extra: base in HF's eager loop with a DynamicCache (the old, host-bound baseline)",
    "base_static_graph_compiled": "base_static_graph with its norms and MLPs torch.compile'd into the captured step "
                                  "(graph_decode.compiled_outside_attention)",
    "converted_graph_compiled": "converted_graph with the same norms and MLPs compiled (the same treatment; its "
                                "feature maps too)",
    "converted_graph_fold16_compiled": "converted_graph_fold16 with the norms and MLPs compiled: both levers at once "
                                       "(a step that folds every token writes S back each step, a traffic the floor, "
                                       "which counts reads, does not hold; attention/triton/decode.py)",
}

#: contexts at most this long count as "attention nearly free" rows (see fair_ratios: the ceiling of a speed-up)
SHORT_CONTEXT = 64

FAIR_BATCHES = (1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)

#: batches tried for the converted model beyond the base's largest, largest first: its state does not grow with the
#: context, so on the same GPU it serves more sequences at once (4096 keeps a batch's logits, 4096 x 262144 for
#: Gemma, under 2**31 elements, the int32 index range of many kernels)
CONVERTED_BATCHES = (4096, 3072, 2048, 1536)


#: F of the deferred-fold rows (converted_graph_fold16); time a multiple of it (--decode-steps 32) so every
#: measurement covers whole fold cycles
FOLD_ROWS = 16


@contextlib.contextmanager
def fold_every(f: int):
    """The fused step's deferred fold at F = f (attention/triton/decode.TUNING['fold_every'], read when a state is
    first stepped: GraphDecoder's eager warm-up steps make its list before the capture); restored afterwards."""
    from linearize.attention.triton.decode import TUNING

    saved = TUNING["fold_every"]
    TUNING["fold_every"] = f
    try:
        yield
    finally:
        TUNING["fold_every"] = saved


def default_fold_every(cfg, batch: int) -> int:
    """F of the deferred fold that the fused step takes by default for `batch` rows of a model of `cfg` on this GPU
    (TUNING's, 'auto' resolved by the step's load: decode.BY_LOAD)."""
    from linearize.attention.triton.decode import TUNING, resolve_tuning

    return int(resolve_tuning(TUNING, batch * cfg.num_key_value_heads, cfg.head_dim, torch.device("cuda"))["fold_every"])


def _default_row(rows_by_fold: dict, default: int | None):
    """Of a batch's converted rows by their F ({1: the no-fold row, 16: the fold row}), the one the default step
    runs: the row whose F is the default recorded with them; F = 1 where no default was recorded (runs before the
    fold could be a default) or its row is missing."""
    return rows_by_fold.get(default) or rows_by_fold.get(1)


@contextlib.contextmanager
def fused_decode(on: bool):
    """The converted layers' decode step with the fused Triton kernel on or off (`LINEARIZE_FUSED_DECODE`, read when
    a step runs or is captured), whatever the caller's environment says; restored afterwards."""
    from linearize.attention.triton.decode import FUSED_ENV  # (Triton is imported only where the benchmark runs)

    saved = os.environ.get(FUSED_ENV)
    os.environ[FUSED_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(FUSED_ENV, None)
        else:
            os.environ[FUSED_ENV] = saved


def base_batches(cfg, ctx: int, room: int, weights: int, *, max_batch: int, dtype=torch.bfloat16) -> list[int]:
    """Batches to try for the base at `ctx`, largest first: those whose static cache fits in 85% of the free memory
    (after the weights and the logits), so that the search starts near the largest that fits."""
    free_bytes = torch.cuda.mem_get_info()[0]
    per_seq = static_cache_bytes_per_seq(cfg, ctx + room, dtype) + 4 * cfg.vocab_size * 2  # + logits and softcap temps
    fit = [b for b in FAIR_BATCHES if b <= max_batch and b * per_seq <= 0.85 * free_bytes]
    return fit or [1]


def converted_batches(model, ctx: int, *, above: int, dtype=torch.bfloat16) -> list[int]:
    """Batches to try for the converted model at `ctx`, largest first: those of CONVERTED_BATCHES above `above` (the
    base's largest) whose state (measured on a one-sequence state) and logits fit in 85% of the free memory."""
    free()
    one = _fill_hybrid_cache(model, 1, ctx, dtype)
    per_seq = cache_nbytes(one) + 4 * model.config.vocab_size * 2  # + logits and softcap temps, as base_batches
    del one
    free()
    free_bytes = torch.cuda.mem_get_info()[0]
    return [b for b in CONVERTED_BATCHES if b > above and b * per_seq <= 0.85 * free_bytes]


def run_fair_decode(shapes=("gemma3-270m", "llama3-8b"), contexts=(1024, 4096, 32768, 131072), *, steps: int = 12,
                    llama_layers: int = 8, max_batch: int = 1024, eager_extra_context: int | None = 32768,
                    fold_rows: bool = True, compiled_rows: bool = True, largest_rows: bool = True, log=print,
                    on_row=None) -> dict:
    """Per shape, context and batch (1 and the largest the base fits): the captured static-cache base and the
    converted model's captured step at the same batch (with the fused decode kernel, then without it), each with its
    memory floor; plus the old eager base at
    `eager_extra_context` (Gemma shape) as a labelled extra; with `fold_rows`, the fused step with its deferred fold
    (converted_graph_fold16) too; with `compiled_rows`, the base (at every context and batch, the short ones too) and
    the converted step again with their norms and MLPs compiled into the step (`*_compiled`: the same treatment for
    both); with `largest_rows` (and compiled_rows), the compiled converted steps once more at the largest batch of
    CONVERTED_BATCHES their state fits (same GPU, each model as full as it goes: `largest_batch_ratios`).
    Returns {copy_bandwidth_bytes_per_s, rows, ratios, largest, ...};
    `on_row(result so far)` after every row (so that a run cut off by a time limit keeps its rows)."""
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    warm = 4  # 2 eager warm-up steps, the capture (+ its replay), one more replay
    room = warm + steps + 4
    rows = []
    result = dict(copy_bandwidth_bytes_per_s=bandwidth, llama_layers=llama_layers, steps=steps, kinds=FAIR_KINDS,
                  rows=rows, ratios=[], largest=[])

    def measure(shape, kind, batch, ctx, model, weights):
        row = dict(shape=shape, kind=kind, batch=batch, context=ctx)
        cache = stepper = None
        try:
            free()
            torch.cuda.reset_peak_memory_stats()
            if kind in ("base_static_graph", "base_static_graph_compiled"):
                cache = fill_static_cache(model, batch, ctx, room, dtype)
                stepper = CapturedStaticStep(model, cache, batch, ctx, fuse=kind.endswith("_compiled"))
                ids = torch.randint(1, 1000, (batch, 1), device="cuda")
                tps, ms = _timed_steps(lambda i: stepper.step(ids), batch, warm, steps)
            elif kind == "base_eager_dynamic":
                cache = _fill_base_cache(model, batch, ctx, dtype)
                tps, ms, _ = _decode_rate(model, cache, batch, ctx, steps, graph=False)
            else:
                cache = _fill_hybrid_cache(model, batch, ctx, dtype)
                fold = FOLD_ROWS if kind.startswith("converted_graph_fold16") else 1
                row.update(fold_every=fold, default_fold_every=default_fold_every(model.config, batch))
                with fused_decode(kind != "converted_graph_unfused"), fold_every(fold):
                    tps, ms, _ = _decode_rate(model, cache, batch, ctx, steps, graph=True,
                                              fuse=kind.endswith("_compiled"))
            nbytes = cache_nbytes(cache)
            floor_ms = memory_floor_ms(weights + nbytes, bandwidth)
            row.update(tokens_per_s=tps, ms_per_step=ms, cache_bytes=nbytes, cache_bytes_per_seq=nbytes / batch,
                       weight_bytes=weights, floor_ms=floor_ms, floor_fraction=floor_ms / ms,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            log(f"decode {shape:12s} {kind:18s} B={batch:5d} ctx={ctx:6d}: {tps:10.0f} tok/s {ms:8.2f} ms/step  "
                f"state {nbytes / 2**20:9.1f} MiB  floor {floor_ms:7.2f} ms ({100 * floor_ms / ms:4.0f}%)")
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            log(f"decode {shape} {kind} B={batch} ctx={ctx}: OOM")
        except Exception as exc:  # recorded; the other rows still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"decode {shape} {kind} B={batch} ctx={ctx}: ERROR {row['error']}")
            traceback.print_exc(limit=6)
        finally:
            cache = stepper = None  # the cache and the captured graph's memory pool go back before the next row
            free()
        rows.append(row)
        result["ratios"] = fair_ratios(rows)
        result["largest"] = largest_batch_ratios(rows)
        if on_row is not None:
            on_row(result)
        return row

    for shape in shapes:
        cfg, cls = decode_shape(shape, llama_layers)
        with torch.device("cuda"):
            model = cls(cfg).to(dtype).eval()
        use_unmasked_sdpa(model)
        weights = weight_bytes_per_step(model)
        plan = {}  # ctx -> batches measured for the base (1 and the largest that fits)
        short = [c for c in contexts if c <= SHORT_CONTEXT]  # measured last, at the other contexts' batches
        for ctx in [c for c in contexts if c > SHORT_CONTEXT]:
            plan[ctx] = [1]
            measure(shape, "base_static_graph", 1, ctx, model, weights)
            for batch in base_batches(cfg, ctx, room, weights, max_batch=max_batch):
                if batch == 1:
                    break
                if "error" not in measure(shape, "base_static_graph", batch, ctx, model, weights):
                    plan[ctx].append(batch)
                    break
        if compiled_rows:
            for ctx, batches in plan.items():
                for batch in batches:
                    measure(shape, "base_static_graph_compiled", batch, ctx, model, weights)
        for ctx in short:  # the base's step outside attention, at every batch measured above (no converted rows)
            for batch in sorted({b for bs in plan.values() for b in bs}):
                measure(shape, "base_static_graph", batch, ctx, model, weights)
                if compiled_rows:
                    measure(shape, "base_static_graph_compiled", batch, ctx, model, weights)
        model.set_attn_implementation("sdpa")  # from here on the model as users run it
        if shape == "gemma3-270m" and eager_extra_context in plan:
            for batch in plan[eager_extra_context]:
                measure(shape, "base_eager_dynamic", batch, eager_extra_context, model, weights)
        convert(model, HybridConfig())
        weights = weight_bytes_per_step(model)
        for ctx, batches in plan.items():
            for batch in batches:
                measure(shape, "converted_graph", batch, ctx, model, weights)
                measure(shape, "converted_graph_unfused", batch, ctx, model, weights)
                if fold_rows:
                    measure(shape, "converted_graph_fold16", batch, ctx, model, weights)
                if compiled_rows:
                    measure(shape, "converted_graph_compiled", batch, ctx, model, weights)
                if compiled_rows and fold_rows:
                    measure(shape, "converted_graph_fold16_compiled", batch, ctx, model, weights)
        if compiled_rows and largest_rows:  # the same GPU filled by each model: ours at the largest batch it fits
            for ctx, batches in plan.items():
                for batch in converted_batches(model, ctx, above=max(batches), dtype=dtype):
                    if "error" not in measure(shape, "converted_graph_compiled", batch, ctx, model, weights):
                        if fold_rows:
                            measure(shape, "converted_graph_fold16_compiled", batch, ctx, model, weights)
                        break
        del model
        free()
    return result


def fair_ratios(rows) -> list[dict]:
    """Per (shape, context, batch): converted / captured static base tokens/s, the base's cache over our state, and
    both floor fractions; the eager base's ratio where that extra row exists; the fused step over the unfused one
    (and the unfused floor fraction) where that row exists."""
    by = {(r["shape"], r["kind"], r["batch"], r["context"]): r for r in rows if "tokens_per_s" in r}
    out = []
    for (shape, kind, batch, ctx), ours in sorted(by.items()):
        base = by.get((shape, "base_static_graph", batch, ctx))
        if kind != "converted_graph" or base is None:
            continue
        entry = dict(shape=shape, batch=batch, context=ctx,
                     speedup_vs_static_graph_base=ours["tokens_per_s"] / base["tokens_per_s"],
                     state_bytes_ratio_base_over_ours=base["cache_bytes"] / max(ours["cache_bytes"], 1),
                     floor_ratio_base_over_ours=base["floor_ms"] / ours["floor_ms"],
                     base_floor_fraction=base["floor_fraction"], ours_floor_fraction=ours["floor_fraction"])
        eager = by.get((shape, "base_eager_dynamic", batch, ctx))
        if eager:
            entry["extra_speedup_vs_eager_dynamic_base"] = ours["tokens_per_s"] / eager["tokens_per_s"]
        unfused = by.get((shape, "converted_graph_unfused", batch, ctx))
        if unfused:
            entry["fused_speedup_over_unfused"] = ours["tokens_per_s"] / unfused["tokens_per_s"]
            entry["unfused_floor_fraction"] = unfused["floor_fraction"]
        # the base at a context of a few tokens and the same batch: its step is everything but attention (weights,
        # MLPs, the vocabulary's logits), which no attention method removes -- the ceiling of any decode speed-up
        short = [r for (sh, kd, bt, cx), r in by.items()
                 if sh == shape and kd == "base_static_graph" and bt == batch and cx <= SHORT_CONTEXT]
        if short:
            outside = min(short, key=lambda r: r["context"])
            entry["outside_attention_ms"] = outside["ms_per_step"]
            entry["ceiling_speedup_vs_static_graph_base"] = base["ms_per_step"] / outside["ms_per_step"]
            # a converted step runs that same step outside attention and reads its state at least once: the
            # speed-up it reaches with attention kernels at their floor, and the floor fraction it reaches with
            # attention free (its floor over that step) -- bounds set by the model's own MLPs and head, not attention
            state_ms = ours["floor_ms"] * ours["cache_bytes"] / (ours["cache_bytes"] + ours["weight_bytes"])
            entry["state_read_bound_speedup"] = base["ms_per_step"] / (outside["ms_per_step"] + state_ms)
            entry["floor_fraction_bound"] = min(1.0, ours["floor_ms"] / outside["ms_per_step"])
        fold = by.get((shape, "converted_graph_fold16", batch, ctx))
        if fold:
            entry["fold16_speedup_vs_static_graph_base"] = fold["tokens_per_s"] / base["tokens_per_s"]
            entry["fold16_floor_fraction"] = fold["floor_fraction"]
        default = _default_row({1: ours, FOLD_ROWS: fold}, ours.get("default_fold_every"))
        entry.update(default_fold_every=default.get("fold_every", 1),
                     default_speedup_vs_static_graph_base=default["tokens_per_s"] / base["tokens_per_s"],
                     default_floor_fraction=default["floor_fraction"])
        # both with their norms and MLPs compiled into the captured step: the same treatment, another level of it
        base_c, ours_c = (by.get((shape, k, batch, ctx)) for k in ("base_static_graph_compiled", "converted_graph_compiled"))
        if base_c and ours_c:
            entry["compiled_speedup_vs_compiled_base"] = ours_c["tokens_per_s"] / base_c["tokens_per_s"]
            entry["compiled_base_over_base"] = base_c["tokens_per_s"] / base["tokens_per_s"]
            entry["compiled_over_ours"] = ours_c["tokens_per_s"] / ours["tokens_per_s"]
            entry["compiled_floor_fraction"] = ours_c["floor_fraction"]
            fold_c = by.get((shape, "converted_graph_fold16_compiled", batch, ctx))
            if fold_c:
                entry["compiled_fold16_speedup_vs_compiled_base"] = fold_c["tokens_per_s"] / base_c["tokens_per_s"]
                entry["compiled_fold16_floor_fraction"] = fold_c["floor_fraction"]
            default_c = _default_row({1: ours_c, FOLD_ROWS: fold_c}, ours_c.get("default_fold_every"))
            entry.update(compiled_default_speedup_vs_compiled_base=default_c["tokens_per_s"] / base_c["tokens_per_s"],
                         compiled_default_floor_fraction=default_c["floor_fraction"])
            short_c = [r for (sh, kd, bt, cx), r in by.items()
                       if sh == shape and kd == "base_static_graph_compiled" and bt == batch and cx <= SHORT_CONTEXT]
            if short_c:
                outside_c = min(short_c, key=lambda r: r["context"])["ms_per_step"]
                entry["compiled_outside_attention_ms"] = outside_c
                entry["compiled_ceiling_speedup"] = base_c["ms_per_step"] / outside_c
                entry["compiled_floor_fraction_bound"] = min(1.0, ours_c["floor_ms"] / outside_c)
        out.append(entry)
    return out


def largest_batch_ratios(rows) -> list[dict]:
    """Per (shape, context): each model at the largest batch it was measured at, both with norms and MLPs compiled
    into the captured step -- the base at the largest batch its cache fits, the converted step (and its deferred
    fold) at the largest of its own rows, which may go past the base's: tokens/s of the same GPU filled by each, the
    serving throughput a user would compare. Without a compiled base row at that context, none."""
    largest = {}  # (shape, context, kind) -> the row of the largest batch
    for r in rows:
        key = (r["shape"], r["context"], r["kind"])
        if "tokens_per_s" in r and r["context"] > SHORT_CONTEXT and r["batch"] > largest.get(key, {"batch": 0})["batch"]:
            largest[key] = r
    out = []
    for shape, ctx in sorted({(sh, cx) for sh, cx, _ in largest}):
        base, ours = largest.get((shape, ctx, "base_static_graph_compiled")), largest.get((shape, ctx, "converted_graph_compiled"))
        if base is None or ours is None:
            continue
        entry = dict(shape=shape, context=ctx, base_batch=base["batch"], base_tokens_per_s=base["tokens_per_s"],
                     base_peak_gib=base.get("peak_gib"), batch=ours["batch"], tokens_per_s=ours["tokens_per_s"],
                     peak_gib=ours.get("peak_gib"), floor_fraction=ours["floor_fraction"],
                     throughput_vs_compiled_base=ours["tokens_per_s"] / base["tokens_per_s"])
        fold = largest.get((shape, ctx, "converted_graph_fold16_compiled"))
        if fold is not None and fold["batch"] == ours["batch"]:
            entry.update(fold16_tokens_per_s=fold["tokens_per_s"], fold16_floor_fraction=fold["floor_fraction"],
                         fold16_throughput_vs_compiled_base=fold["tokens_per_s"] / base["tokens_per_s"])
        else:
            fold = None
        default = _default_row({1: ours, FOLD_ROWS: fold}, ours.get("default_fold_every"))
        entry.update(default_fold_every=default.get("fold_every", 1), default_tokens_per_s=default["tokens_per_s"],
                     default_floor_fraction=default["floor_fraction"],
                     default_throughput_vs_compiled_base=default["tokens_per_s"] / base["tokens_per_s"])
        out.append(entry)
    return out


def render_fair_markdown(fair: dict) -> list[str]:
    bw = fair["copy_bandwidth_bytes_per_s"]
    lines = ["### Decode against a captured static-cache base (random weights, bf16)", "",
             f"Copy bandwidth measured in this run: **{bw / 1e12:.2f} TB/s**. Floor = (weight bytes + cache/state bytes "
             f"read per step) / that bandwidth; floor % = floor time / measured time. Llama-3-8B shape: "
             f"{fair['llama_layers']} of {LLAMA3_8B_LAYERS} layers (ratios are per step). Kinds: "
             + "; ".join(f"`{k}` = {v}" for k, v in fair["kinds"].items()) + ".", "",
             "| shape | kind | batch | context | tokens/s | ms/step | state MiB/seq | floor ms | floor % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in fair["rows"]:
        head = f"| {r['shape']} | {r['kind']} | {r['batch']} | {r['context']} |"
        if "tokens_per_s" not in r:
            lines.append(f"{head} {r.get('error', '')[:80]} | | | | |")
            continue
        lines.append(f"{head} {r['tokens_per_s']:.0f} | {r['ms_per_step']:.2f} | {r['cache_bytes_per_seq'] / 2**20:.2f} | "
                     f"{r['floor_ms']:.2f} | {100 * r['floor_fraction']:.0f}% |")
    lines += ["", "| shape | batch | context | converted / captured base tokens/s | base state / ours | base floor / ours "
              "| base floor % | ours floor % | extra: vs eager base | fused / unfused step | unfused floor % "
              "| deferred fold (F=16) / captured base | its floor % | base step outside attention ms | ceiling "
              "| state-read bound | floor % bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in fair["ratios"]:
        extra, fused = e.get("extra_speedup_vs_eager_dynamic_base"), e.get("fused_speedup_over_unfused")
        unfused = "—" if fused is None else f"{100 * e['unfused_floor_fraction']:.0f}%"
        fold = e.get("fold16_speedup_vs_static_graph_base")
        fold_cells = ("— | —" if fold is None else f"{fold:.2f}x | {100 * e['fold16_floor_fraction']:.0f}%")
        ceiling = e.get("ceiling_speedup_vs_static_graph_base")
        fold_cells += (" | — | — | — | —" if ceiling is None else
                       f" | {e['outside_attention_ms']:.2f} | {ceiling:.1f}x | {e['state_read_bound_speedup']:.1f}x | "
                       f"{100 * e['floor_fraction_bound']:.0f}%")
        lines.append(f"| {e['shape']} | {e['batch']} | {e['context']} | **{e['speedup_vs_static_graph_base']:.2f}x** | "
                     f"{e['state_bytes_ratio_base_over_ours']:.1f}x | {e['floor_ratio_base_over_ours']:.1f}x | "
                     f"{100 * e['base_floor_fraction']:.0f}% | {100 * e['ours_floor_fraction']:.0f}% | "
                     f"{'—' if extra is None else f'{extra:.1f}x'} | {'—' if fused is None else f'{fused:.2f}x'} | "
                     f"{unfused} | {fold_cells} |")
    compiled = [e for e in fair["ratios"] if "compiled_speedup_vs_compiled_base" in e]
    if compiled:
        lines += ["", "Both steps with their norms and MLPs compiled into the captured graph (`*_compiled` rows):", "",
                  "| shape | batch | context | converted / base, both compiled | compiled base / captured base "
                  "| compiled converted / converted | its floor % | with the deferred fold (F=16) / compiled base "
                  "| its floor % | compiled base outside attention ms | ceiling | floor % bound |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in compiled:
            outside = e.get("compiled_outside_attention_ms")
            tail = ("— | — | —" if outside is None else f"{outside:.2f} | {e['compiled_ceiling_speedup']:.1f}x | "
                    f"{100 * e['compiled_floor_fraction_bound']:.0f}%")
            fold = e.get("compiled_fold16_speedup_vs_compiled_base")
            fold_cells = "— | —" if fold is None else f"{fold:.2f}x | {100 * e['compiled_fold16_floor_fraction']:.0f}%"
            lines.append(f"| {e['shape']} | {e['batch']} | {e['context']} | **{e['compiled_speedup_vs_compiled_base']:.2f}x** | "
                         f"{e['compiled_base_over_base']:.2f}x | {e['compiled_over_ours']:.2f}x | "
                         f"{100 * e['compiled_floor_fraction']:.0f}% | {fold_cells} | {tail} |")
    largest = largest_batch_ratios(fair["rows"])
    if largest:
        gib = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        lines += ["", "The same GPU filled by each model (both compiled; the base at the largest batch its cache fits, "
                  "the converted step at the largest batch measured, its state not growing with the context):", "",
                  "| shape | context | base batch | base tokens/s | base peak GiB | converted batch | tokens/s (F=1) "
                  "| peak GiB | its floor % | converted (F=1) / base tokens/s | with the deferred fold (F=16) "
                  "| **the default step / base** (its F, floor %) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in largest:
            fold = e.get("fold16_throughput_vs_compiled_base")
            lines.append(f"| {e['shape']} | {e['context']} | {e['base_batch']} | {e['base_tokens_per_s']:.0f} | "
                         f"{gib(e['base_peak_gib'])} | {e['batch']} | {e['tokens_per_s']:.0f} | {gib(e['peak_gib'])} | "
                         f"{100 * e['floor_fraction']:.0f}% | {e['throughput_vs_compiled_base']:.2f}x | "
                         f"{'—' if fold is None else f'{fold:.2f}x'} | **{e['default_throughput_vs_compiled_base']:.2f}x** "
                         f"(F={e['default_fold_every']}, {100 * e['default_floor_fraction']:.0f}%) |")
    return lines + [""]
