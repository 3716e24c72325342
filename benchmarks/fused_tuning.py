"""Tuning sweep of the fused decode step (attention/triton/decode.py) against the unfused step, one layer, one process.

    python benchmarks/fused_tuning.py [--out-dir benchmarks/results/speed] [--name fused_tuning]
        [--cases gemma3-270m:1024,gemma3-270m:64,gemma3-270m:1,llama3-8b:96,llama3-8b:8] [--grid num_warps=4,8 ...]
        [--search greedy|grid]
    python benchmarks/fused_tuning.py --smoke --out-dir DIR      # a tiny shape; no CUDA: TRITON_INTERPRET=1

Per case (the decode shapes of bench/decode.py, one converted layer, its state filled as at context 32k: the state
does not depend on the context, the ring is the window), the unfused step (`decode_step_triton` with
LINEARIZE_FUSED_DECODE=0: the decode kernel + PyTorch ring and sink writes) and the fused step under settings of
`decode.TUNING_CHOICES` (or --grid): a coordinate search from the default TUNING (--search greedy, the default: each
key in turn takes each of its choices, the fastest kept, two passes) or every combination (--search grid). Each
launch the settings give is timed once: `inner` steps (a multiple of fold_every) captured in one CUDA graph, replayed
after warm-up, CUDA events, the median of --reps replays; and first checked against the unfused step on copies of
the state (largest relative error of the output and of S, with a deferred fold's pending keys, over fold_every + 1
steps). Then the fastest launch is timed without the window and without the S loop (the kernel's SKIP): where its
time goes. The floor is bench/decode's: the layer state's bytes (with a pending list) read once / the copy bandwidth
measured in this run. Writes NAME.json (every row, rewritten after each case) and NAME.md. --minutes (default 7)
bounds the searches, so that the whole run stays within a 10-minute GPU call.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CASES = "gemma3-270m:1024,gemma3-270m:64,gemma3-270m:1,llama3-8b:96,llama3-8b:8"
CONTEXT = 32768


def _tiny_shape():
    """The --smoke shape: a one-layer Llama, GQA 4/2, head_dim 16 (the interpreter runs it in seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    return cfg, LlamaForCausalLM


def one_layer_step(shape: str, batch: int, device: str, hybrid):
    """A converted one-layer model of `shape` with its state filled by bench/decode, and this layer's decode step
    inputs: returns (state, step kwargs (spec, modes, weight), inputs (q, k, v, qf, kf))."""
    from linearize.attention.cache import hybrid_cache_layer
    from linearize.attention.module import HybridAttention
    from linearize.bench.decode import _fill_hybrid_cache, decode_shape
    from linearize.models.convert import convert

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if shape == "tiny":
        cfg, cls = _tiny_shape()
    else:
        cfg, cls = decode_shape(shape, llama_layers=1)
        cfg.num_hidden_layers = 1  # one layer is the step being tuned
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:1]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg).to(dtype).eval()
    convert(model, hybrid)
    mod = next(m for m in model.modules() if isinstance(m, HybridAttention))
    cache = _fill_hybrid_cache(model, batch, CONTEXT, dtype, device=device)
    state = hybrid_cache_layer(cache, mod.layer_idx).state
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, mod.head_dim
    q = torch.randn(batch, hq, 1, d, device=device, dtype=dtype)
    k, v = (torch.randn(batch, hkv, 1, d, device=device, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        qf, kf, _ = mod.features(q, k, None)
        weight = mod.mixing_weight(torch.randn(batch, 1, cfg.hidden_size, device=device, dtype=dtype))
    kw = dict(spec=mod.spec, modes=mod.head_mode_list()[:1], weight=weight)
    del model, cache
    return state, kw, (q, k, v, qf, kf)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timed_ms(step, *, inner: int, reps: int, cuda: bool) -> float:
    """Median ms of one step: `inner` steps captured in a CUDA graph, replayed (after 3 warm-up replays), each replay
    timed with CUDA events; on the CPU (the smoke run) plain calls and the wall clock."""
    step()  # compiles
    if not cuda:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            step()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    del graph
    return statistics.median(times)


def settings_grid(choices: dict) -> list[dict]:
    """Every combination of the choices (the other TUNING keys at their defaults)."""
    from linearize.attention.triton import decode

    keys = list(choices)
    return [{**decode.TUNING, **dict(zip(keys, values))} for values in itertools.product(*(choices[k] for k in keys))]


def sweep_case(shape: str, batch: int, device: str, hybrid, choices: dict, *, search: str, inner: int, reps: int,
               bandwidth: float | None, deadline: float = float("inf"), log=print) -> list[dict]:
    """The unfused row, then a row per fused launch measured: all of the grid's ('grid'), or those a coordinate
    search visits ('greedy': from the default, each key in turn takes each of its choices, the fastest kept; two
    passes); no new launch after `deadline` (time.perf_counter()), so that a run keeps to its time limit."""
    from linearize.attention.recurrent import linear_sums
    from linearize.attention.triton import decode, decode_step_triton
    from linearize.bench.decode import fused_decode, memory_floor_ms

    cuda = device == "cuda"
    state, kw, inputs = one_layer_step(shape, batch, device, hybrid)
    b, hq, _, d = inputs[0].shape
    hkv, m, ring, ns = inputs[1].shape[1], inputs[3].shape[-1], state.buf_k.shape[2], state.sink_k.shape[2]
    shape_args = (b, hkv, hq // hkv, d, m, ring, ns, inputs[0].device, inputs[0].dtype, state.buf_k.dtype)
    nbytes = state.nbytes()
    floor = None if bandwidth is None else memory_floor_ms(nbytes, bandwidth)
    case = dict(shape=shape, batch=b, heads=hq, kv_heads=hkv, head_dim=d, features=m, ring=ring, state_bytes=nbytes,
                floor_ms=floor)

    def step():
        decode_step_triton(state, *inputs, **kw)

    def row(kind, ms, **extra):
        # the floor of the state as the step reads it: with a deferred fold's pending list, that too
        pend = sum(t.numel() * t.element_size() for t in (state.pend_kf, state.pend_v, state.pend_keep)
                   if t is not None)
        row_floor = None if bandwidth is None else memory_floor_ms(nbytes + pend, bandwidth)
        r = dict(case, kind=kind, ms_per_step=ms, tokens_per_s=b / (ms * 1e-3), pending_bytes=pend,
                 floor_ms=row_floor, floor_fraction=None if row_floor is None else row_floor / ms, **extra)
        log(f"{shape:12s} B={b:5d} {kind:7s} {ms:8.4f} ms  {r['tokens_per_s']:12.0f} tok/s  "
            + ("" if floor is None else f"floor {100 * r['floor_fraction']:5.1f}%  ")
            + " ".join(f"{k}={v}" for k, v in extra.items() if k in ("launch", "max_rel_err")))
        return r

    with fused_decode(False):
        unfused = row("unfused", timed_ms(step, inner=inner, reps=reps, cuda=cuda))
    default = tuple(sorted(decode.launch_config(*shape_args).items()))
    measured: dict[tuple, dict] = {}  # launch -> its row (settings: every setting seen that gives it)

    def measure(setting: dict) -> float:
        launch = tuple(sorted(decode.launch_config(*shape_args, setting).items()))
        shown = {k: setting[k] for k in choices}
        if launch in measured:
            if shown not in measured[launch]["settings"]:
                measured[launch]["settings"].append(shown)
            return measured[launch].get("ms_per_step", float("inf"))
        if time.perf_counter() > deadline and measured:
            return float("inf")  # out of time: launches not yet seen are skipped
        decode.TUNING.clear()
        decode.TUNING.update(setting)
        reset_pending(state)
        try:
            ref, ours = copy.deepcopy(state), copy.deepcopy(state)
            err = 0.0
            f = dict(launch)["F"]  # the deferred fold's F (an 'auto' setting resolved by the step's load)
            for _ in range(f + 1):  # through a deferred fold's whole cycle
                with fused_decode(False):
                    want = decode_step_triton(ref, *inputs, **kw)
                with fused_decode(True):
                    got = decode.fused_decode_step(ours, *inputs, **kw)
                if got is None:
                    raise ValueError(f"the fused step does not apply to {shape} at batch {b} (fused_decode_applies)")
                err = max(err, *(_rel(got[k], want[k]) for k in want), _rel(linear_sums(ours)[0], ref.S))
            del ref, ours
            with fused_decode(True):
                # whole fold cycles per replay: every replay the same work
                ms = timed_ms(step, inner=-(-inner // f) * f, reps=reps, cuda=cuda)
        except Exception as exc:  # a launch that does not compile (resources) or fails: recorded, the sweep goes on
            measured[launch] = dict(case, kind="fused", launch=dict(launch), settings=[shown],
                                    error=f"{type(exc).__name__}: {str(exc)[:200]}")
            log(f"{shape:12s} B={b:5d} fused   {dict(launch)}: {measured[launch]['error']}")
            return float("inf")
        measured[launch] = row("fused", ms, launch=dict(launch), default=launch == default, max_rel_err=err,
                               speedup_vs_unfused=unfused["ms_per_step"] / ms, settings=[shown])
        return ms

    saved = dict(decode.TUNING)
    try:
        if search == "grid":
            for setting in settings_grid(choices):
                measure(setting)
        else:
            best = dict(decode.TUNING)
            best_ms = measure(best)
            for _ in range(2):
                for key, values in choices.items():
                    for value in values:
                        candidate = {**best, key: value}
                        ms = measure(candidate)
                        if ms < best_ms:
                            best, best_ms = candidate, ms
        # where the time of the fastest launch goes: the same launch without the window, without the S loop
        timed = [r for r in measured.values() if "ms_per_step" in r]
        if timed:
            fastest = min(timed, key=lambda r: r["ms_per_step"])
            decode.TUNING.clear()
            decode.TUNING.update({**saved, **fastest["settings"][0]})
            reset_pending(state)
            ablations = [ablation_row(step, fastest, skip, inner=inner, reps=reps, cuda=cuda, log=log)
                         for skip in ABLATIONS]
        else:
            ablations = []
    finally:
        decode.TUNING.clear()
        decode.TUNING.update(saved)
    return [unfused, *measured.values(), *ablations]


def reset_pending(state) -> None:
    """Fold a deferred-fold list into S, z and drop it, so that the next setting's fold_every makes its own (a state
    keeps the list it has: decode.fold_every)."""
    from linearize.attention.recurrent import flush_pending

    flush_pending(state)
    state.pend_kf = state.pend_v = state.pend_keep = state.pend_count = None


#: the kernel's SKIP codes: its fastest launch timed without a part (wrong outputs: timing only)
ABLATIONS = {1: "window", 2: "state loop"}


def ablation_row(step, fastest: dict, skip: int, *, inner: int, reps: int, cuda: bool, log=print) -> dict:
    """The fastest launch timed with the kernel's SKIP = skip (a part left out): where its time goes."""
    from linearize.attention.triton import decode
    from linearize.bench.decode import fused_decode

    real = decode.launch_config
    decode.launch_config = lambda *a, **k: {**real(*a, **k), "SKIP": skip}
    try:
        f = fastest["launch"]["F"]
        with fused_decode(True):
            ms = timed_ms(step, inner=-(-inner // f) * f, reps=reps, cuda=cuda)
    finally:
        decode.launch_config = real
    keep = ("shape", "batch", "heads", "kv_heads", "head_dim", "features", "ring", "state_bytes", "floor_ms", "launch")
    r = {k: fastest[k] for k in keep}
    r.update(kind="ablation", skipped=ABLATIONS[skip], ms_per_step=ms, tokens_per_s=r["batch"] / (ms * 1e-3),
             floor_fraction=None if r["floor_ms"] is None else r["floor_ms"] / ms,
             share_of_fastest=1 - ms / fastest["ms_per_step"])
    log(f"{r['shape']:12s} B={r['batch']:5d} without the {ABLATIONS[skip]}: {ms:8.4f} ms "
        f"({100 * r['share_of_fastest']:.0f}% of the fastest launch's time is in it)")
    return r


def render_markdown(result: dict) -> str:
    lines = [f"Commit `{result['commit']}`, device **{result['device']}**; command `{result['command']}`.", "",
             "One converted layer's decode step (state as at context 32k; tokens/s = batch / step time). Floor = the "
             "layer state's bytes read once / the copy bandwidth "
             + ("(not measured: CPU)" if result["copy_bandwidth_bytes_per_s"] is None else
                f"measured in this run ({result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)")
             + f"; fused rows: every launch measured ({result['search']} search), fastest first; `inner` = "
             f"{result['inner']} steps "
             f"per captured graph, median of {result['reps']} replays.", "",
             "| shape | batch | kind | ms/step | tokens/s | floor % | vs unfused | launch | settings | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    cases = list(dict.fromkeys((r["shape"], r["batch"]) for r in rows))
    for case in cases:
        mine = [r for r in rows if (r["shape"], r["batch"]) == case]
        order = {"unfused": 0, "fused": 1, "ablation": 2}
        mine.sort(key=lambda r: (order[r["kind"]], r.get("ms_per_step", float("inf"))))
        for r in mine:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['batch']} | fused | {r['error'][:80]} | | | | "
                             f"{' '.join(f'{k}={v}' for k, v in r['launch'].items())} | | |")
                continue
            floor = "—" if r["floor_fraction"] is None else f"{100 * r['floor_fraction']:.1f}%"
            fused = r["kind"] == "fused"
            launch = " ".join(f"{k}={v}" for k, v in r.get("launch", {}).items())
            settings = "; ".join(",".join(f"{k}={v}" for k, v in s.items()) for s in r.get("settings", []))
            if r["kind"] == "ablation":
                lines.append(f"| {r['shape']} | {r['batch']} | fastest without the {r['skipped']} | "
                             f"{r['ms_per_step']:.4f} | {r['tokens_per_s']:.0f} | {floor} | "
                             f"({100 * r['share_of_fastest']:.0f}% of its time) | | | wrong output |")
                continue
            speedup = f"{r['speedup_vs_unfused']:.2f}x" if fused else "1.00x"
            err = f"{r['max_rel_err']:.1e}" if fused else "—"
            lines.append(f"| {r['shape']} | {r['batch']} | {r['kind']}{' (default)' if r.get('default') else ''} | "
                         f"{r['ms_per_step']:.4f} | {r['tokens_per_s']:.0f} | {floor} | {speedup} | {launch} | "
                         f"{settings} | {err} |")
    return "\n".join(lines) + "\n"


def parse_grid(items: list[str], only: bool = False) -> dict:
    """decode.TUNING_CHOICES with KEY=V1,V2 items replacing a key's choices (ints, None or names); `only`: just the
    given keys."""
    from linearize.attention.triton import decode

    choices = {} if only else dict(decode.TUNING_CHOICES)
    for item in items:
        key, _, values = item.partition("=")
        if key not in decode.TUNING:
            raise ValueError(f"--grid: unknown TUNING key {key!r}; expected one of {tuple(decode.TUNING)}")
        choices[key] = tuple(None if v == "None" else int(v) if v.lstrip("-").isdigit() else v
                             for v in values.split(","))
    return choices


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="benchmarks/results/speed")
    p.add_argument("--name", default="fused_tuning")
    p.add_argument("--cases", default=CASES, help="shape:batch,... (shapes of bench/decode.py)")
    p.add_argument("--grid", nargs="*", default=None, help="KEY=V1,V2 ... replacing decode.TUNING_CHOICES[KEY]")
    p.add_argument("--search", choices=("greedy", "grid"), default=None,
                   help="greedy: a coordinate search from the default (~sum of the choices' counts, twice); grid: "
                   "every combination (hundreds of launches: one case per run)")
    p.add_argument("--minutes", type=float, default=7.0,
                   help="time for the searches, shared by the cases (each stops measuring new launches at its share; "
                   "model set-up and the ablations come on top)")
    p.add_argument("--inner", type=int, default=8, help="steps per captured graph")
    p.add_argument("--reps", type=int, default=15, help="timed replays (median)")
    p.add_argument("--commit", default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny shape, a small grid (without CUDA: on the CPU under "
                   "TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # (before Triton is first imported, if it is not yet)

    from linearize.config import HybridConfig
    from linearize.records import benchmark_header, git_commit

    command = "python benchmarks/fused_tuning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if cuda:
        from linearize.bench.kernels import environment
        from linearize.bench.timing import copy_bandwidth

        env = environment(args.commit, [])
        bandwidth = copy_bandwidth()
    else:
        env = dict(device="cpu (TRITON_INTERPRET=1)", git_commit=args.commit or git_commit()["commit"] or "unknown")
        bandwidth = None
    if args.smoke:
        cases = [("tiny", 2)]
        hybrid = HybridConfig(window=4, softmax_sinks=1)
        choices = parse_grid(args.grid or ["min_tile_d=8,1000000", "contract=loop,dot"], only=True)
        args.search, args.reps = args.search or "grid", min(args.reps, 3)
    else:
        cases = [(s, int(n)) for s, n in (c.split(":") for c in args.cases.split(","))]
        hybrid = HybridConfig()
        choices = parse_grid(args.grid or [])
        args.search = args.search or "greedy"
    env["command"] = command
    result = dict(benchmark_header(env), copy_bandwidth_bytes_per_s=bandwidth, context=CONTEXT, search=args.search,
                  minutes=args.minutes,
                  choices=choices, inner=args.inner,
                  reps=args.reps, hybrid={"window": hybrid.window, "feature_map": hybrid.feature_map,
                                          "softmax_sinks": hybrid.softmax_sinks, "combine": hybrid.combine},
                  rows=[])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from linearize.bench.timing import free

    end = time.perf_counter() + 60 * args.minutes
    for i, (shape, batch) in enumerate(cases):
        free()  # the previous case's state and graphs
        deadline = time.perf_counter() + (end - time.perf_counter()) / (len(cases) - i)  # an equal share of what is left
        result["rows"] += sweep_case(shape, batch, "cuda" if cuda else "cpu", hybrid, choices, search=args.search,
                                     inner=args.inner, reps=args.reps, bandwidth=bandwidth, deadline=deadline)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))  # kept if cut off later
        (out / f"{args.name}.md").write_text(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
