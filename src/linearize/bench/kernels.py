"""Side-by-side GPU benchmarks of the hybrid layer (`linearize bench`, `benchmarks/bench_attention.py`).

Measured in one process on one GPU:
  peak      bf16 matmul TFLOP/s (8192^3, median) -- the ceiling the kernels' useful TFLOP/s are read against
  layer     per-layer forward and forward+backward time (median, CUDA events) and peak extra memory for T = 1k...,
            timed twice: eager calls, and the same call captured once in a CUDA graph and replayed (no launch
            overhead for any path, as inside a graphed or compiled training step):
              sdpa      full causal softmax, F.scaled_dot_product_attention on the flash backend
              swa       sliding-window softmax alone, FlexAttention (compiled) with a sliding-window block mask
              chunked   our chunked PyTorch path, as HybridAttention runs it (fp32 upcast)
              triton    our Triton kernels (bf16)
              fla_swa   fla's chunk_linear_attn (normalised) + the FlexAttention window, combined with the 'mix' rule
            inputs are given (q, k, v and, for the linear paths, the feature maps qf, kf); feature maps excluded
  decode    tokens/s and cache bytes vs context length and batch for a Gemma-3-270M-shaped model (random weights):
            base (HF, DynamicCache) vs converted (constant-size state; eager PyTorch step, eager Triton step, and
            the Triton step captured once in a CUDA graph and replayed, `linearize.attention.graph_decode`)
Ratios are computed inside the run.  Results go to JSON; `render_markdown` makes the README table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.attention.cache import cache_nbytes, hybrid_cache_layer
from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.graph_decode import GraphDecoder
from linearize.attention.module import HybridAttention
from linearize.attention.linear.common import KVState
from linearize.attention.recurrent import HybridState
from linearize.bench import add_arguments
from linearize.compat import cache_kwargs
from linearize.config import HybridConfig
from linearize.models.convert import convert
from linearize.records import benchmark_header, git_commit

HEAD_CONFIGS = {
    "gemma3-270m": dict(hq=4, hkv=1, d=256, m=512),
    "llama": dict(hq=32, hkv=8, d=128, m=256),
}
IMPLS = ("sdpa", "swa", "chunked", "triton", "fla_swa")


# ----------------------------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------------------------
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn, *, budget_s: float = 0.3, min_reps: int = 3, max_reps: int = 30) -> float:
    """Median milliseconds of fn() over repetitions timed with CUDA events (one warm-up call first)."""
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    one = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def matmul_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, budget_s=0.5, min_reps=10, max_reps=50)
    del a, b
    _free()
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------------------------
# the implementations
# ----------------------------------------------------------------------------------------------------------------
def _feature(x, m):
    """Hedgehog-like positive features of width m (a fixed map: the benchmark times attention, not the map)."""
    u = x[..., : m // 2].float()
    return torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1).to(x.dtype)


def make_inputs(cfg: dict, t: int, b: int = 1, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hq, hkv, d, m = cfg["hq"], cfg["hkv"], cfg["d"], cfg["m"]
    q = torch.randn(b, hq, t, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype, generator=g)
    proj_q = torch.randn(b, hq, t, max(d, m // 2), device="cuda", dtype=dtype, generator=g)
    proj_k = torch.randn(b, hkv, t, max(d, m // 2), device="cuda", dtype=dtype, generator=g)
    qf, kf = _feature(proj_q, m), _feature(proj_k, m)
    del proj_q, proj_k
    return q, k, v, qf, kf


class Impl:
    """fn(q, k, v, qf, kf) -> out (B, Hq, T, d), plus which inputs it differentiates."""

    def __init__(self, name, fn, grads):
        self.name, self.fn, self.grads = name, fn, grads


def impl_sdpa(cfg, t, window, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v, qf, kf):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            except RuntimeError:  # flash without native GQA: expand the key/value heads
                g = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                      is_causal=True, scale=scale)

    return Impl("sdpa", fn, (0, 1, 2))


_FLEX = {}


def _flex():
    """flex_attention compiled once with dynamic shapes (one compile per head config, not per length)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)
    return _FLEX["fn"]


def _window_mask(t, window, block=128):
    """Sliding-window BlockMask built from its block lists directly (no T x T mask evaluation, no compile):
    query block i needs key blocks i - ceil((w-1)/block) .. i, all partial."""
    from torch.nn.attention.flex_attention import BlockMask

    key = (t, window)
    if key not in _FLEX:
        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        nb = -(-t // block)
        back = -(-(window - 1) // block)
        i = torch.arange(nb, device="cuda", dtype=torch.int32)[:, None]
        j = torch.arange(back + 1, device="cuda", dtype=torch.int32)[None, :]
        idx = i - back + j  # (nb, back + 1), ascending, may start below 0
        num = (idx >= 0).sum(1).to(torch.int32)
        idx = torch.sort(torch.where(idx >= 0, idx, torch.full_like(idx, nb)), dim=1).values  # valid first
        idx = torch.where(idx >= nb, torch.zeros_like(idx), idx)
        kv_indices = torch.zeros(1, 1, nb, nb, device="cuda", dtype=torch.int32)
        kv_indices[0, 0, :, : back + 1] = idx
        _FLEX[key] = BlockMask.from_kv_blocks(num[None, None], kv_indices, BLOCK_SIZE=block, mask_mod=sliding,
                                              seq_lengths=(t, t))
    return _FLEX[key]


def _window_fn(window, scale):
    """The window branch of the baselines: compiled FlexAttention, or (if it fails here) our Triton swa_only."""
    def flex_fn(q, k, v):
        return _flex()(q, k, v, block_mask=_window_mask(q.shape[2], window), scale=scale, enable_gqa=True)

    def triton_fn(q, k, v):
        from linearize.attention.triton import hybrid_attention_triton

        return hybrid_attention_triton(q, k, v, q, k, scale=scale, window=window, mode="swa_only")

    return triton_fn if _FLEX.get("broken") else flex_fn


def impl_swa(cfg, t, window, scale):
    fn = _window_fn(window, scale)
    impl = Impl("swa", lambda q, k, v, qf, kf: fn(q, k, v), (0, 1, 2))
    impl.window_impl = "triton_swa_only" if _FLEX.get("broken") else "flex_attention"
    return impl


def impl_chunked(cfg, t, window, scale, weight):

    def fn(q, k, v, qf, kf):  # exactly HybridAttention.attend's torch backend: fp32 upcast
        f32 = [x.float() for x in (q, k, v, qf, kf)]
        return hybrid_attention_chunked(*f32, scale=scale, window=window, weight=weight.float()).to(q.dtype)

    return Impl("chunked", fn, (0, 1, 2, 3, 4))


def impl_triton(cfg, t, window, scale, weight, rule="shared_norm", placement="complementary"):
    from linearize.attention.triton import hybrid_attention_triton

    def fn(q, k, v, qf, kf):
        return hybrid_attention_triton(q, k, v, qf, kf, scale=scale, window=window, weight=weight, rule=rule,
                                       placement=placement)

    return Impl("triton", fn, (0, 1, 2, 3, 4))


def _trim_fla_autotune(max_configs: int = 4) -> int:
    """Keep at most `max_configs` configs per fla autotuner (preferring 4-8 warps, 2-3 stages), so that tuning fits
    the device-time budget.  Returns how many autotuners were trimmed."""
    from triton.runtime.autotuner import Autotuner

    trimmed = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("fla.") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if isinstance(obj, Autotuner) and len(obj.configs) > max_configs:
                ranked = sorted(obj.configs, key=lambda c: (c.num_warps not in (4, 8), c.num_stages not in (2, 3),
                                                            -sum(v for v in c.kwargs.values() if isinstance(v, int))))
                obj.configs = ranked[:max_configs]
                trimmed += 1
    return trimmed


def impl_fla_swa(cfg, t, window, scale, weight_g):
    """fla chunked linear attention (normalised, keys s <= t) + the window branch, 'mix' rule combination.

    fla takes (B, T, H, K) with as many key heads as query heads: inputs are laid out and expanded outside the timed
    region (favouring fla)."""
    from fla.ops.linear_attn import chunk_linear_attn

    window_fn = _window_fn(window, scale)
    g = cfg["hq"] // cfg["hkv"]

    def prep(q, k, v, qf, kf):
        return (qf.transpose(1, 2).contiguous(), kf.repeat_interleave(g, 1).transpose(1, 2).contiguous(),
                v.repeat_interleave(g, 1).transpose(1, 2).contiguous())

    def fn(q, k, v, qf_t, kf_t, v_t):
        o_l, _ = chunk_linear_attn(qf_t, kf_t, v_t, scale=1.0, normalize=True)
        o_s = window_fn(q, k, v)
        return weight_g * o_s + (1 - weight_g) * o_l.transpose(1, 2)

    impl = Impl("fla_swa", fn, (0, 1, 2, 3, 4, 5))
    impl.prep = prep
    impl.window_impl = "triton_swa_only" if _FLEX.get("broken") else "flex_attention"
    return impl


def useful_flops(name, cfg, t, window, b=1):
    """Forward FLOPs of the minimal algorithm (matmul multiply-adds x 2); backward counted as 2x forward."""
    hq, hkv, d, m = cfg["hq"], cfg["hkv"], cfg["d"], cfg["m"]
    if name == "sdpa":
        return b * hq * 4 * d * t * (t + 1) / 2
    win = sum(min(i + 1, window) for i in range(min(t, window))) + max(0, t - window) * window  # window pairs
    swa = b * hq * 4 * d * win
    la = b * (hq * t * (2 * m * d + 2 * m) + hkv * t * 2 * m * d)  # readout per query head, state update per kv head
    if name == "swa":
        return swa
    return swa + la


# ----------------------------------------------------------------------------------------------------------------
# layer benchmark
# ----------------------------------------------------------------------------------------------------------------
def graph_times(fwd, fwd_bwd, args, *, budget_s: float):
    """(forward ms, forward+backward ms, error) of one call of each captured in a CUDA graph and replayed (median,
    CUDA events).  Warmed up on a side stream first (compiles, autotunes); a step that cannot be captured gives None
    and the reason."""
    times, errors = [], []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for a in args:  # captured backward allocates the gradients in the graph's pool
            a.grad = None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            times.append(time_cuda(graph.replay, budget_s=budget_s))
        except Exception as exc:
            times.append(None)
            errors.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            del graph
            for a in args:
                a.grad = None
            _sync()
            _free()
    return times[0], times[1], "; ".join(errors) or None


def bench_layer(impl: Impl, inputs, *, budget_s: float):
    """Forward and forward+backward median ms, peak extra memory (MiB) of one forward+backward, and the CUDA-graph
    replay times: dict(fwd_ms, fwd_bwd_ms, peak_mib, graph_fwd_ms, graph_fwd_bwd_ms, graph_error)."""
    base_in = [x.detach().requires_grad_(i in impl.grads) for i, x in enumerate(inputs)]
    prep = getattr(impl, "prep", None)
    if prep is not None:
        extra = [x.detach().requires_grad_() for x in prep(*inputs)]
        args = base_in[:3] + extra
    else:
        args = base_in
    out = impl.fn(*args)
    go = torch.randn_like(out)
    del out

    def fwd():
        return impl.fn(*args)

    def fwd_bwd():
        for a in args:
            a.grad = None
        impl.fn(*args).backward(go)

    res = dict(fwd_ms=time_cuda(fwd, budget_s=budget_s), fwd_bwd_ms=time_cuda(fwd_bwd, budget_s=budget_s))
    for a in args:
        a.grad = None
    _sync()
    _free()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    _sync()
    res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for a in args:
        a.grad = None
    _free()
    res["graph_fwd_ms"], res["graph_fwd_bwd_ms"], res["graph_error"] = graph_times(fwd, fwd_bwd, args, budget_s=budget_s)
    del args, base_in, go
    _free()
    return res


def run_layer_bench(lengths, configs, impls, *, window=64, budget_s=0.3, log=print, max_chunked_t=65536, rows=None,
                    on_row=None):
    rows = [] if rows is None else rows
    weight = None
    for cname in configs:
        cfg = HEAD_CONFIGS[cname]
        scale = cfg["d"] ** -0.5
        weight = torch.full((cfg["hq"],), 0.1, device="cuda")
        for t in lengths:
            try:
                inputs = make_inputs(cfg, t)
            except torch.cuda.OutOfMemoryError:
                log(f"{cname} T={t}: inputs do not fit")
                _free()
                continue
            for name in impls:
                row = dict(config=cname, T=t, impl=name, **cfg)
                if name == "chunked" and t > max_chunked_t:
                    row["error"] = f"skipped above T={max_chunked_t}"
                    rows.append(row)
                    continue
                try:
                    if name == "sdpa":
                        impl = impl_sdpa(cfg, t, window, scale)
                    elif name == "swa":
                        impl = impl_swa(cfg, t, window, scale)
                    elif name == "chunked":
                        impl = impl_chunked(cfg, t, window, scale, weight)
                    elif name == "triton":
                        impl = impl_triton(cfg, t, window, scale, weight)
                    elif name == "fla_swa":
                        impl = impl_fla_swa(cfg, t, window, scale, 0.5)
                    else:
                        raise ValueError(name)
                    t0 = time.perf_counter()
                    try:
                        times = bench_layer(impl, inputs, budget_s=budget_s)
                    except Exception as exc:
                        if name not in ("swa", "fla_swa") or _FLEX.get("broken") or isinstance(exc, torch.cuda.OutOfMemoryError):
                            raise
                        _FLEX["broken"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        log(f"FlexAttention failed ({_FLEX['broken'][:120]}); window baselines use Triton swa_only")
                        impl = impl_swa(cfg, t, window, scale) if name == "swa" else impl_fla_swa(cfg, t, window, scale, 0.5)
                        times = bench_layer(impl, inputs, budget_s=budget_s)
                    if hasattr(impl, "window_impl"):
                        row["window_impl"] = impl.window_impl
                    flops = useful_flops(name, cfg, t, window)
                    fwd_ms, fb_ms = times["fwd_ms"], times["fwd_bwd_ms"]
                    row.update(times, fwd_tflops=flops / (fwd_ms * 1e-3) / 1e12,
                               fwd_bwd_tflops=3 * flops / (fb_ms * 1e-3) / 1e12, wall_s=time.perf_counter() - t0)
                    if row.get("graph_error") is None:
                        row.pop("graph_error", None)
                    graphed = (f"  graph fwd {_fmt(row.get('graph_fwd_ms'), '9.3f')} ms  fwd+bwd "
                               f"{_fmt(row.get('graph_fwd_bwd_ms'), '9.3f')} ms")
                    log(f"{cname:12s} T={t:6d} {name:8s} fwd {fwd_ms:9.3f} ms  fwd+bwd {fb_ms:9.3f} ms  peak {row['peak_mib']:9.1f} MiB"
                        f"{graphed}  ({row['wall_s']:.1f}s)" + (f"  graph: {row['graph_error']}" if "graph_error" in row else ""))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    log(f"{cname:12s} T={t:6d} {name:8s} OOM")
                except Exception as exc:  # a baseline that fails is recorded, not fatal
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    log(f"{cname:12s} T={t:6d} {name:8s} ERROR {row['error']}")
                    traceback.print_exc(limit=3)
                finally:
                    _free()
                rows.append(row)
                if on_row:
                    on_row()
            del inputs
            _free()
    return rows


def layer_ratios(rows):
    """Per (config, T): time and memory ratios against sdpa and fla_swa, computed from this run's rows."""
    by = {}
    for r in rows:
        if "fwd_ms" in r:
            by[(r["config"], r["T"], r["impl"])] = r
    out = []
    for (cname, t, impl), r in sorted(by.items()):
        if impl != "triton":
            continue
        entry = dict(config=cname, T=t)
        for other in ("sdpa", "swa", "chunked", "fla_swa"):
            o = by.get((cname, t, other))
            if o:
                entry[f"{other}_over_triton_fwd"] = o["fwd_ms"] / r["fwd_ms"]
                entry[f"{other}_over_triton_fwd_bwd"] = o["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                entry[f"{other}_over_triton_peak_mem"] = o["peak_mib"] / max(r["peak_mib"], 1e-9)
                for key in ("graph_fwd", "graph_fwd_bwd"):  # CUDA-graph replays, where both were captured
                    if o.get(f"{key}_ms") and r.get(f"{key}_ms"):
                        entry[f"{other}_over_triton_{key}"] = o[f"{key}_ms"] / r[f"{key}_ms"]
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------------------------
# decode benchmark
# ----------------------------------------------------------------------------------------------------------------
def gemma3_270m_config():
    from transformers import Gemma3TextConfig

    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, layer_types=types, query_pre_attn_scalar=256,
        max_position_embeddings=131072,
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
        hybrid_cache_layer(cache, i).state = st
    return cache


def _decode_rate(model, cache, batch, ctx, steps, *, graph=False, device="cuda"):
    """tokens/s, ms/step and cache bytes of `steps` decoding steps: eager forwards, or a captured graph's replays."""

    ids = torch.randint(1, 1000, (batch, 1), device=device)
    nbytes = cache_nbytes(cache)
    if graph:
        decoder = GraphDecoder(model, cache, positions=ctx)
        warm = decoder.warmup_left + 2  # eager warm-up steps, the capture (+ its first replay), one more replay

        def step(i):
            return decoder.step(ids)
    else:
        warm = 2

        def step(i):
            pos = torch.full((batch, 1), ctx + i, device=device, dtype=torch.long)
            return model(input_ids=ids, **cache_kwargs(cache), use_cache=True, position_ids=pos).logits

    with torch.inference_mode():
        for i in range(warm):
            step(i)
        _sync()
        t0 = time.perf_counter()
        for i in range(steps):
            step(warm + i)
        _sync()
        dt = time.perf_counter() - t0
    return batch * steps / dt, dt / steps * 1e3, nbytes


#: converted kinds: (decode backend of the hybrid layers, replayed as a CUDA graph)
CONVERTED_KINDS = {"converted_torch": ("torch", False), "converted_triton": ("triton", False), "converted_graph": ("triton", True)}


def run_decode_bench(contexts, batches, *, steps=8, search_batches=(512, 384, 256, 192, 128, 64), log=print):
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
            _free()
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
            _free()
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
    _free()
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
# environment, output, README table
# ----------------------------------------------------------------------------------------------------------------
def environment(commit: str | None, argv) -> dict:
    import triton

    env = dict(
        device=torch.cuda.get_device_name(), sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
        gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        command="linearize bench " + " ".join(argv),
    )
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        env["fla"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if not commit:
        commit = git_commit()["commit"]
    env["git_commit"] = commit or "unknown"
    return env


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def render_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"Device: **{env['device']}**, torch {env['torch']}, triton {env['triton']}, fla {env.get('fla')}, "
             f"commit `{env['git_commit'][:12]}`; command `{env['command']}`.", ""]
    if "matmul_peak_tflops" in res:
        lines += [f"Measured bf16 matmul peak (8192³): **{res['matmul_peak_tflops']:.0f} TFLOP/s**.", ""]
    rows = res.get("layer", [])
    if rows:
        lines += ["### Per-layer time (ms, median) and peak extra memory (MiB), B=1, bf16", ""]
        for cname in dict.fromkeys(r["config"] for r in rows):
            cfg = HEAD_CONFIGS[cname]
            lines += [f"**{cname}** (Hq={cfg['hq']}, Hkv={cfg['hkv']}, d={cfg['d']}, m={cfg['m']})", ""]
            impls = [i for i in IMPLS if any(r["impl"] == i and r["config"] == cname for r in rows)]
            head = "| T | " + " | ".join(f"{i} fwd | {i} fwd+bwd | {i} mem" for i in impls) + " |"
            lines += [head, "|" + "---|" * (1 + 3 * len(impls))]
            for t in sorted({r["T"] for r in rows if r["config"] == cname}):
                cells = []
                for i in impls:
                    r = next((r for r in rows if r["config"] == cname and r["T"] == t and r["impl"] == i), None)
                    if r is None or "fwd_ms" not in r:
                        err = "" if r is None else r.get("error", "")
                        short = "OOM" if "memory" in err else ("skip" if "skipped" in err else ("err" if err else "—"))
                        cells += [short, short, short]
                    else:
                        cells += [_fmt(r["fwd_ms"], ".3f"), _fmt(r["fwd_bwd_ms"], ".3f"), _fmt(r["peak_mib"], ".0f")]
                lines.append(f"| {t} | " + " | ".join(cells) + " |")
            lines.append("")
            graphed = [i for i in impls if any(r["impl"] == i and r["config"] == cname and "graph_fwd_ms" in r for r in rows)]
            if graphed:
                lines += [f"CUDA-graph replay (ms, median; launch overhead removed from every path), {cname}:", "",
                          "| T | " + " | ".join(f"{i} fwd | {i} fwd+bwd" for i in graphed) + " |",
                          "|" + "---|" * (1 + 2 * len(graphed))]
                for t in sorted({r["T"] for r in rows if r["config"] == cname}):
                    cells = []
                    for i in graphed:
                        r = next((r for r in rows if r["config"] == cname and r["T"] == t and r["impl"] == i), None) or {}
                        cells += [_fmt(r.get("graph_fwd_ms"), ".3f"), _fmt(r.get("graph_fwd_bwd_ms"), ".3f")]
                    lines.append(f"| {t} | " + " | ".join(cells) + " |")
                lines.append("")
        ratios = res.get("layer_ratios", [])
        if ratios:
            lines += ["### Ratios in the same run (other / triton; > 1 means triton is faster or smaller)", "",
                      "| config | T | sdpa/triton fwd+bwd | sdpa/triton graph fwd+bwd | sdpa/triton graph fwd | sdpa/triton mem | "
                      "fla_swa/triton fwd+bwd | fla_swa/triton graph fwd+bwd | fla_swa/triton fwd | "
                      "chunked/triton fwd+bwd | swa/triton fwd+bwd | swa/triton graph fwd+bwd | triton useful TFLOP/s (fwd, fwd+bwd) |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for e in ratios:
                tr = next(r for r in rows if r["config"] == e["config"] and r["T"] == e["T"] and r["impl"] == "triton")
                lines.append(
                    f"| {e['config']} | {e['T']} | {_fmt(e.get('sdpa_over_triton_fwd_bwd'))} | "
                    f"{_fmt(e.get('sdpa_over_triton_graph_fwd_bwd'))} | {_fmt(e.get('sdpa_over_triton_graph_fwd'))} | "
                    f"{_fmt(e.get('sdpa_over_triton_peak_mem'))} | "
                    f"{_fmt(e.get('fla_swa_over_triton_fwd_bwd'))} | {_fmt(e.get('fla_swa_over_triton_graph_fwd_bwd'))} | "
                    f"{_fmt(e.get('fla_swa_over_triton_fwd'))} | "
                    f"{_fmt(e.get('chunked_over_triton_fwd_bwd'))} | {_fmt(e.get('swa_over_triton_fwd_bwd'))} | "
                    f"{_fmt(e.get('swa_over_triton_graph_fwd_bwd'))} | "
                    f"{tr['fwd_tflops']:.1f}, {tr['fwd_bwd_tflops']:.1f} |")
            lines.append("")
    dec = res.get("decode", [])
    if dec:
        lines += ["### Decode, Gemma-3-270M shape (random weights), bf16, tokens/s and cache", "",
                  "| kind | batch | context | tokens/s | ms/step | cache MiB | cache MiB/seq |", "|---|---|---|---|---|---|---|"]
        for r in dec:
            if "tokens_per_s" in r:
                lines.append(f"| {r['kind']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.2f} | "
                             f"{r['cache_bytes'] / 2**20:.1f} | {r['cache_bytes_per_seq'] / 2**20:.2f} |")
            else:
                lines.append(f"| {r['kind']} | {r['batch']} | {r['context']} | {r.get('error', '')} | | | |")
        lines.append("")
        if res.get("decode_largest_base_batch"):
            lines += [f"Largest batch the base model fits at context {max(r['context'] for r in dec)}: "
                      f"**{res['decode_largest_base_batch']}**.", ""]
        dr = res.get("decode_ratios", [])
        if dr:
            lines += ["| kind | batch | context | tokens/s vs base | base cache / ours |", "|---|---|---|---|---|"]
            for e in dr:
                lines.append(f"| {e['kind']} | {e['batch']} | {e['context']} | {e['speedup_vs_base']:.2f}x | "
                             f"{e['cache_ratio_base_over_ours']:.1f}x |")
            lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace, argv=None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("linearize bench needs a CUDA GPU")
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    res = {**benchmark_header(environment(args.commit, argv)), "settings": vars(args).copy()}
    res["settings"].pop("func", None)

    def save():
        path.write_text(json.dumps(res, indent=1, default=str))

    t_start = time.perf_counter()
    if not args.skip_peak:
        res["matmul_peak_tflops"] = matmul_peak_tflops()
        print(f"bf16 matmul peak: {res['matmul_peak_tflops']:.0f} TFLOP/s", flush=True)
    impls = [i for i in args.impls.split(",") if i]
    if "fla_swa" in impls:
        try:
            import fla.ops.linear_attn  # noqa: F401

            if args.fla_configs:
                res["fla_autotuners_trimmed"] = _trim_fla_autotune(args.fla_configs)
        except ImportError as exc:
            print(f"fla not importable ({exc}); skipping fla_swa", flush=True)
            impls.remove("fla_swa")
    if not args.skip_layer:
        lengths = [int(x) for x in args.lengths.split(",") if x]
        res["layer"] = []
        run_layer_bench(lengths, [c for c in args.configs.split(",") if c], impls, window=args.window,
                        budget_s=args.budget, log=lambda s: print(s, flush=True), max_chunked_t=args.max_chunked_t,
                        rows=res["layer"], on_row=save)
        if _FLEX.get("broken"):
            res["flex_attention_error"] = _FLEX["broken"]
        res["layer_ratios"] = layer_ratios(res["layer"])
        save()
    if not args.skip_decode:
        contexts = [int(x) for x in args.contexts.split(",") if x]
        batches = [int(x) for x in args.batches.split(",") if x]
        res["decode"], res["decode_largest_base_batch"] = run_decode_bench(
            contexts, batches, steps=args.decode_steps, log=lambda s: print(s, flush=True))
        res["decode_ratios"] = decode_ratios(res["decode"], res["decode_largest_base_batch"], max(contexts))
    res["wall_s"] = time.perf_counter() - t_start
    save()
    md = render_markdown(res)
    (out_dir / f"{args.name}.md").write_text(md)
    print(md, flush=True)
    print(f"wrote {path}", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_attention", description=__doc__.split("\n")[0])
    add_arguments(p)  # the CLI verb's own parser: one definition of the options
    args = p.parse_args(argv)
    run(args, argv)
    return 0
