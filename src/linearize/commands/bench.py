"""`linearize bench`: side-by-side GPU benchmarks of the hybrid layer (see linearize.attention.triton.benchmark).

Per-layer forward / forward+backward time and peak memory vs sequence length for full causal SDPA, window-only
softmax (FlexAttention), the chunked PyTorch path, the Triton kernels and fla + a window; decode tokens/s and cache
memory for a Gemma-3-270M-shaped model, base vs converted.  Writes <out-dir>/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the hybrid layer against softmax attention and fla (GPU)",
                              description=__doc__.split("\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (also used by benchmarks/bench_attention.py); kept free of torch imports."""
    p.add_argument("--name", default="bench", help="results file stem: <out-dir>/<name>.json")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536,131072",
                   help="comma-separated sequence lengths of the layer benchmark")
    p.add_argument("--configs", default="gemma3-270m,llama", help="head configs: gemma3-270m, llama")
    p.add_argument("--impls", default="sdpa,swa,chunked,triton,fla_swa", help="implementations: sdpa, swa, chunked, triton, fla_swa")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timed repetitions per measurement")
    p.add_argument("--max-chunked-t", type=int, default=65536, help="skip the chunked PyTorch path above this length")
    p.add_argument("--contexts", default="1024,4096,16384,32768", help="decode context lengths")
    p.add_argument("--batches", default="1,64", help="decode batch sizes (plus the largest the base fits)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-peak", action="store_true")
    p.add_argument("--fla-configs", type=int, default=1, help="autotune configs kept per fla kernel (0: all)")
    p.add_argument("--commit", default=None, help="git commit to record (default: the checkout's HEAD, else $LINEARIZE_COMMIT)")


def run(args: argparse.Namespace) -> int:
    import sys

    from linearize.attention.triton.benchmark import run as run_bench

    run_bench(args, sys.argv[2:] if len(sys.argv) > 2 else [])
    return 0
