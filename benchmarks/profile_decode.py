"""Where the converted model's decode step spends its GPU time at a large batch (issue 21: the step runs at ~44-57%
of its memory floor at batch 4096 on an H100; is the rest the attention kernel, the norms and MLPs, the LM head?).

One step is run eagerly (not captured: at thousands of rows per step the launch gaps are small beside the kernels)
under the torch profiler, with the norms and MLPs compiled as in the `*_compiled` rows, and its kernels are summed
by part: the fused decode kernel, the feature maps, GEMMs (projections, MLPs, LM head), inductor's fused kernels
(norms, MLP activations) and the rest. The captured step is timed too, so the kernel sum can be read against it.

    PYTHONPATH=$PWD/src python benchmarks/profile_decode.py OUT [--batch 4096] [--context 32768] [--fold 1,16]

Writes OUT/profile_decode.json and OUT/profile_decode.md (commit, device, command, every kernel group and the top
kernels of each setting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from linearize.attention.graph_decode import GraphDecoder
from linearize.attention.cache import cache_nbytes
from linearize.bench.decode import (_fill_hybrid_cache, _timed_steps, decode_shape, fold_every, memory_floor_ms,
                                    weight_bytes_per_step)
from linearize.bench.timing import copy_bandwidth, free
from linearize.config import HybridConfig
from linearize.models.convert import convert

#: kernel-name fragments -> the part of the step they belong to (first match wins)
PARTS = (("fused_decode", "fused decode kernel (attention + state update)"),
         ("gemm", "GEMM (projections, MLP, LM head)"), ("cutlass", "GEMM (projections, MLP, LM head)"),
         ("nvjet", "GEMM (projections, MLP, LM head)"), ("sm90_xmma", "GEMM (projections, MLP, LM head)"),
         ("triton_", "inductor-fused (norms, activations)"),
         ("elementwise", "eager elementwise"), ("reduce", "eager reductions"), ("copy", "copies"),
         ("index", "indexing"), ("cat", "copies"))


def part(name: str) -> str:
    low = name.lower()
    return next((label for frag, label in PARTS if frag in low), "other")


def profile_step(decoder, ids, steps: int = 3) -> tuple[dict, list]:
    """GPU time (ms per step) by part and the 15 longest kernels of `steps` eager steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(ids)
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
               if e.self_device_time_total > 0]
    parts = defaultdict(float)
    for name, ms, _ in kernels:
        parts[part(name)] += ms
    return dict(parts), sorted(kernels, key=lambda k: -k[1])[:15]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="gemma3-270m")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--fold", default="1,16", help="deferred-fold settings F to profile, comma-separated")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth()
    cfg, cls = decode_shape(args.shape)
    with torch.device("cuda"):
        model = cls(cfg).to(dtype).eval()
    convert(model, HybridConfig())
    weights = weight_bytes_per_step(model)
    result = dict(device=torch.cuda.get_device_name(), commit=os.environ.get("LINEARIZE_COMMIT"),
                  command="python benchmarks/profile_decode.py " + " ".join(sys.argv[1:]), shape=args.shape,
                  batch=args.batch, context=args.context, copy_bandwidth_bytes_per_s=bandwidth, settings=[])
    ids = torch.randint(1, 1000, (args.batch, 1), device="cuda")
    for f in (int(x) for x in args.fold.split(",")):
        try:
            row = measure(model, ids, args, f, weights, bandwidth, dtype)
        except Exception as exc:  # recorded; the next setting still runs
            traceback.print_exc(limit=6)
            result["settings"].append(dict(fold=f, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            continue
        result["settings"].append(row)
        parts = row["kernel_ms_by_part"]
        print(f"fold {f}: captured {row['captured_ms']:.2f} ms/step ({row['tokens_per_s']:.0f} tok/s, floor "
              f"{row['floor_ms']:.2f} ms = {100 * row['floor_fraction']:.0f}%); eager kernels "
              f"{row['kernel_ms_total']:.2f} ms: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])),
              flush=True)
    write(result, args.out)


def measure(model, ids, args, f: int, weights: int, bandwidth: float, dtype) -> dict:
    """One deferred-fold setting F = f: the eager step's kernels by part, and the captured step's time."""
    with fold_every(f), torch.inference_mode():
        free()
        cache = _fill_hybrid_cache(model, args.batch, args.context, dtype)
        nbytes = cache_nbytes(cache)
        eager = GraphDecoder(model, cache, positions=args.context, capture=False, fuse=True)
        for _ in range(2 * f + 2):  # compile, and a whole fold cycle before the profile
            eager.step(ids)
        parts, top = profile_step(eager, ids, steps=max(3, f))
        del eager, cache
        free()
        cache = _fill_hybrid_cache(model, args.batch, args.context, dtype)
        graph = GraphDecoder(model, cache, positions=args.context, fuse=True)
        tps, ms = _timed_steps(lambda i: graph.step(ids), args.batch, 4, 2 * max(16, f))
        del graph, cache
        free()
    floor = memory_floor_ms(weights + nbytes, bandwidth)
    return dict(fold=f, captured_ms=ms, tokens_per_s=tps, floor_ms=floor, floor_fraction=floor / ms,
                state_bytes=nbytes, weight_bytes=weights, kernel_ms_by_part=parts,
                kernel_ms_total=sum(parts.values()), top_kernels=[dict(name=n, ms=t, per_step=c) for n, t, c in top])


def write(result: dict, out: str) -> None:
    bandwidth = result["copy_bandwidth_bytes_per_s"]
    with open(os.path.join(out, "profile_decode.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [f"Device **{result['device']}**, commit `{result['commit']}`, command `{result['command']}`; "
             f"{result['shape']} shape, batch {result['batch']}, context {result['context']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s.", ""]
    for row in result["settings"]:
        if "error" in row:
            lines += [f"### Deferred fold F = {row['fold']}: {row['error']}", ""]
            continue
        lines += [f"### Deferred fold F = {row['fold']}: captured step {row['captured_ms']:.2f} ms, floor "
                  f"{row['floor_ms']:.2f} ms ({100 * row['floor_fraction']:.0f}%); eager kernels "
                  f"{row['kernel_ms_total']:.2f} ms per step", "", "| part | ms per step | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {100 * v / row['kernel_ms_total']:.0f}% |"
                  for k, v in sorted(row["kernel_ms_by_part"].items(), key=lambda kv: -kv[1])]
        lines += ["", "| kernel | ms per step | launches per step |", "|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['ms']:.3f} | {k['per_step']} |" for k in row["top_kernels"]] + [""]
    with open(os.path.join(out, "profile_decode.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
