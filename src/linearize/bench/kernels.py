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
  decode    (`linearize.bench.decode`) tokens/s vs context and batch, Gemma-3-270M and Llama-3-8B shapes (random
            weights): the base with HF's StaticCache and its one-token forward captured in a CUDA graph vs the
            converted model's captured step (GraphDecoder), same batch, each against its memory floor (bytes read per
            step / copy bandwidth measured in the run); with --eager-decode also the older grid (base in HF's eager
            loop with a DynamicCache; converted eager PyTorch / Triton steps), a labelled extra
Ratios are computed inside the run.  Results go to JSON; `render_markdown` makes the README table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.spec import AttentionSpec
from linearize.bench import add_arguments
from linearize.bench.decode import decode_ratios, render_fair_markdown, run_eager_decode_bench, run_fair_decode
from linearize.bench.timing import free as _free, sync as _sync, time_cuda
from linearize.records import benchmark_header, git_commit

HEAD_CONFIGS = {
    "gemma3-270m": dict(hq=4, hkv=1, d=256, m=512),
    "llama": dict(hq=32, hkv=8, d=128, m=256),
}
IMPLS = ("sdpa", "swa", "chunked", "triton", "fla_swa", "sdpa_compiled", "triton_compiled")


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

        return hybrid_attention_triton(q, k, v, q, k, spec=AttentionSpec(scale=scale, window=window), mode="swa_only")

    return triton_fn if _FLEX.get("broken") else flex_fn


def impl_swa(cfg, t, window, scale):
    fn = _window_fn(window, scale)
    impl = Impl("swa", lambda q, k, v, qf, kf: fn(q, k, v), (0, 1, 2))
    impl.window_impl = "triton_swa_only" if _FLEX.get("broken") else "flex_attention"
    return impl


def impl_chunked(cfg, t, window, scale, weight):

    def fn(q, k, v, qf, kf):  # exactly HybridAttention.attend's torch backend: fp32 upcast
        f32 = [x.float() for x in (q, k, v, qf, kf)]
        return hybrid_attention_chunked(*f32, spec=AttentionSpec(scale=scale, window=window), weight=weight.float()).to(q.dtype)

    return Impl("chunked", fn, (0, 1, 2, 3, 4))


def impl_triton(cfg, t, window, scale, weight, rule="shared_norm", placement="complementary"):
    from linearize.attention.triton import hybrid_attention_triton

    spec = AttentionSpec(scale=scale, window=window, rule=rule, placement=placement)

    def fn(q, k, v, qf, kf):
        return hybrid_attention_triton(q, k, v, qf, kf, spec=spec, weight=weight)

    return Impl("triton", fn, (0, 1, 2, 3, 4))


def chained(fn, layers: int):
    """fn(q, ...) called `layers` times, each call's queries the first queries plus the last output (the residual
    stream of a model's attention layers, other inputs shared): one step through that many layers."""
    if layers == 1:
        return fn

    def stack(q, *rest):
        x = q
        for _ in range(layers):
            x = x + fn(x, *rest)
        return x

    return stack


def impl_compiled(name, fn, grads, layers: int = 1):
    """`fn` (chained over `layers`) under torch.compile as a compiled training step runs it: inductor with CUDA graphs
    (mode "reduce-overhead"), fullgraph, static shapes, the whole chain one graph. The Triton layer goes through its
    custom ops (linearize.attention.triton.ops); nothing is captured again around it (no graph_* keys)."""
    compiled = torch.compile(chained(fn, layers), mode="reduce-overhead", fullgraph=True, dynamic=False)

    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()  # each call a new step: the previous outputs may be overwritten
        return compiled(*args)

    impl = Impl(name, step, grads)
    impl.graphable = False
    return impl


def impl_sdpa_compiled(cfg, t, window, scale, layers: int = 1):
    def fn(q, k, v, qf, kf):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    return impl_compiled("sdpa_compiled", fn, (0, 1, 2), layers)


def impl_triton_compiled(cfg, t, window, scale, weight, layers: int = 1):
    return impl_compiled("triton_compiled", impl_triton(cfg, t, window, scale, weight).fn, (0, 1, 2, 3, 4), layers)


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
    name = name.removesuffix("_compiled")
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
    if getattr(impl, "graphable", True):
        res["graph_fwd_ms"], res["graph_fwd_bwd_ms"], res["graph_error"] = graph_times(fwd, fwd_bwd, args, budget_s=budget_s)
    del args, base_in, go
    _free()
    return res


def per_layer(times: dict, layers: int) -> dict:
    """bench_layer's times of a chain of `layers` calls -> per call (the peak memory stays the chain's)."""
    return {k: (v / layers if k.endswith("_ms") and v is not None else v) for k, v in times.items()}


def run_layer_bench(lengths, configs, impls, *, window=64, budget_s=0.3, log=print, max_chunked_t=65536, rows=None,
                    on_row=None, stack: int = 1):
    """Rows of per-layer times; with `stack` > 1 each implementation runs as a chain of that many calls (`chained`,
    compiled ones as one graph) and its times are divided by it (rows record `layers`)."""
    if stack < 1:
        raise ValueError(f"stack must be >= 1, got {stack}")
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
                row = dict(config=cname, T=t, impl=name, **cfg, **({"layers": stack} if stack > 1 else {}))
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
                    elif name == "sdpa_compiled":
                        impl = impl_sdpa_compiled(cfg, t, window, scale, stack)
                    elif name == "triton_compiled":
                        impl = impl_triton_compiled(cfg, t, window, scale, weight, stack)
                    elif name == "fla_swa":
                        impl = impl_fla_swa(cfg, t, window, scale, 0.5)
                    else:
                        raise ValueError(name)
                    if not name.endswith("_compiled"):  # the compiled ones chain inside their graph
                        impl.fn = chained(impl.fn, stack)
                    t0 = time.perf_counter()
                    try:
                        times = bench_layer(impl, inputs, budget_s=budget_s)
                    except Exception as exc:
                        if name not in ("swa", "fla_swa") or _FLEX.get("broken") or isinstance(exc, torch.cuda.OutOfMemoryError):
                            raise
                        _FLEX["broken"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        log(f"FlexAttention failed ({_FLEX['broken'][:120]}); window baselines use Triton swa_only")
                        impl = impl_swa(cfg, t, window, scale) if name == "swa" else impl_fla_swa(cfg, t, window, scale, 0.5)
                        impl.fn = chained(impl.fn, stack)
                        times = bench_layer(impl, inputs, budget_s=budget_s)
                    times = per_layer(times, stack)
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
        compiled = by.get((cname, t, "triton_compiled"))
        if compiled:  # the compiled training-step path against SDPA as a user runs it (eager) and compiled
            for other in ("sdpa", "sdpa_compiled"):
                o = by.get((cname, t, other))
                if o:
                    entry[f"triton_compiled_over_{other}_fwd_bwd"] = compiled["fwd_bwd_ms"] / o["fwd_bwd_ms"]
                    entry[f"triton_compiled_over_{other}_fwd"] = compiled["fwd_ms"] / o["fwd_ms"]
        out.append(entry)
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
        stacked = max(r.get("layers", 1) for r in rows)
        lines += ["### Per-layer time (ms, median) and peak extra memory (MiB), B=1, bf16"
                  + (f": {stacked} layers chained in one step, time / {stacked}, memory of the whole chain" if stacked > 1 else ""), ""]
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
            compiled = [e for e in ratios if "triton_compiled_over_sdpa_fwd_bwd" in e]
            if compiled:
                lines += ["### The compiled path (torch.compile, CUDA graphs, Triton kernels as custom ops) against SDPA",
                          "", "Time ratios, < 1 means the compiled hybrid layer is faster (goal at 2k: fwd+bwd <= 1.2x "
                          "eager SDPA; at 32k SDPA / compiled >= 6x).", "",
                          "| config | T | compiled triton / eager sdpa fwd+bwd | compiled triton / compiled sdpa fwd+bwd | "
                          "compiled triton / eager sdpa fwd | eager sdpa / compiled triton fwd+bwd |", "|---|---|---|---|---|---|"]
                for e in compiled:
                    r = e["triton_compiled_over_sdpa_fwd_bwd"]
                    lines.append(f"| {e['config']} | {e['T']} | **{r:.2f}x** | "
                                 f"{_fmt(e.get('triton_compiled_over_sdpa_compiled_fwd_bwd'))} | "
                                 f"{_fmt(e.get('triton_compiled_over_sdpa_fwd'))} | {1 / r:.2f}x |")
                lines.append("")
    if res.get("decode_fair"):
        lines += render_fair_markdown(res["decode_fair"])
    dec = res.get("decode", [])
    if dec:
        lines += ["### Extra: decode with the base in HF's eager loop (DynamicCache), Gemma-3-270M shape (random weights), "
                  "bf16, tokens/s and cache", "",
                  "These ratios compare captured or eager converted steps with a host-bound eager base; the fair ratios "
                  "are the captured static-cache ones above.", "",
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
                        rows=res["layer"], on_row=save, stack=args.stack)
        if _FLEX.get("broken"):
            res["flex_attention_error"] = _FLEX["broken"]
        res["layer_ratios"] = layer_ratios(res["layer"])
        save()
    if not args.skip_decode:
        contexts = [int(x) for x in args.contexts.split(",") if x]
        res["decode_fair"] = run_fair_decode(
            [x for x in args.decode_shapes.split(",") if x], contexts, steps=args.decode_steps,
            llama_layers=args.llama_layers, max_batch=args.max_batch,
            eager_extra_context=32768 if 32768 in contexts else max(contexts), log=lambda s: print(s, flush=True),
            on_row=lambda partial: (res.__setitem__("decode_fair", partial), save()))
        save()
    if args.eager_decode:
        contexts = [int(x) for x in args.eager_contexts.split(",") if x]
        batches = [int(x) for x in args.batches.split(",") if x]
        res["decode"], res["decode_largest_base_batch"] = run_eager_decode_bench(
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
