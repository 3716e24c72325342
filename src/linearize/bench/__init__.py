"""Benchmarks, above the library they measure: the hybrid layer's kernels against softmax attention and fla
(`kernels`, GPU) and the conversion throughput of the recipes (`throughput`). `linearize bench` runs them; the options
below are its parser's, shared with benchmarks/bench_attention.py, and import nothing heavy.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (also used by benchmarks/bench_attention.py); kept free of torch imports."""
    p.add_argument("--name", default="bench",
                   help="results file stem: <out-dir>/<name>.json (default: bench; conversion with --conversion)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536,131072",
                   help="comma-separated sequence lengths of the layer benchmark")
    p.add_argument("--configs", default="gemma3-270m,llama", help="head configs: gemma3-270m, llama")
    p.add_argument("--impls", default="sdpa,swa,chunked,triton,fla_swa", help="implementations: sdpa, swa, chunked, triton, fla_swa")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timed repetitions per measurement")
    p.add_argument("--stack", type=int, default=1,
                   help="layer benchmark: each implementation called this many times in a chain (the next call's "
                   "queries = the last queries + its output), one step as a model's attention layers take it; times "
                   "are per layer. A compiled step pays its fixed cost (graph launch, input copies, autograd) once "
                   "per step, so at 2k a single layer measures that cost more than the kernels")
    p.add_argument("--max-chunked-t", type=int, default=65536, help="skip the chunked PyTorch path above this length")
    p.add_argument("--contexts", default="1024,4096,32768,131072",
                   help="decode context lengths: at each, batch 1 and the largest batch the captured static-cache base fits")
    p.add_argument("--decode-shapes", default="gemma3-270m,llama3-8b", help="decode model shapes (random weights): "
                   "gemma3-270m, llama3-8b")
    p.add_argument("--llama-layers", type=int, default=8, help="layers of the Llama-3-8B-shaped stack (of 32; the "
                   "decode ratios are per step)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest decode batch tried")
    p.add_argument("--decode-steps", type=int, default=12, help="timed decode steps per row (after 4 warm-up steps)")
    p.add_argument("--eager-decode", action="store_true", help="also the older decode grid: the base in HF's eager "
                   "loop (DynamicCache) and the converted model's eager steps, a labelled extra")
    p.add_argument("--eager-contexts", default="1024,32768", help="context lengths of --eager-decode")
    p.add_argument("--batches", default="1,64", help="batch sizes of --eager-decode (plus the largest the base fits)")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-peak", action="store_true")
    p.add_argument("--fla-configs", type=int, default=1, help="autotune configs kept per fla kernel (0: all)")
    p.add_argument("--commit", default=None, help="git commit to record (default: the checkout's HEAD, else $LINEARIZE_COMMIT)")


def add_conversion_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "conversion throughput (--conversion)",
        "for each stage of each recipe (stage 1 per distinct transfer objective, stage 2 LoRA with or without SSD): "
        "tokens/s and seconds per optimizer step over --steps steps after --warmup, and peak memory; plus the load and "
        "conversion time and a no-grad evaluation forward of the base and converted models (hybrid, la_only). "
        "Stages that compute the same thing in several recipes are measured once. Random token rows.")
    g.add_argument("--conversion", action="store_true", help="measure conversion throughput instead of the layer "
                   "and decode benchmarks (GPU or CPU)")
    g.add_argument("--model", default="gemma3-270m", help="short name (gemma3-270m, smollm2-135m), HF directory, "
                   ".gguf file, or shape:gemma3-270m / shape:llama3-8b for random weights of that shape, nothing "
                   "loaded (default: gemma3-270m)")
    g.add_argument("--recipes", default="lolcats,ssd,hedgecats",
                   help="comma-separated recipe names or YAML paths (default: lolcats,ssd,hedgecats)")
    g.add_argument("--preset", default=None, help="size preset of the recipes (default: gpu-small on a GPU, cpu otherwise)")
    g.add_argument("--steps", type=int, default=None, help="timed optimizer steps (or forwards) per stage "
                   "(default: 10 on a GPU, 3 on a CPU)")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps before them: allocation, kernel autotuning "
                   "(default: 2 on a GPU, 1 on a CPU)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's data.seq_len)")
    g.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch of both stages and of the "
                   "evaluation forward (default: the preset's)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every recipe as in linearize convert, e.g. --set stage1.objective=output; "
                        "repeatable")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
