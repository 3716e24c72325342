"""`linearize bench`: side-by-side GPU benchmarks of the hybrid layer (see linearize.bench.kernels).

Per-layer forward / forward+backward time and peak memory vs sequence length for full causal SDPA, window-only
softmax (FlexAttention), the chunked PyTorch path, the Triton kernels and fla + a window; decode tokens/s and cache
memory for a Gemma-3-270M-shaped model, base vs converted.  Writes <out-dir>/<name>.json and <name>.md.

`linearize bench --conversion --model M`: conversion throughput instead (see linearize.bench.throughput) -- tokens/s,
seconds per step and peak memory of each training stage of the recipes and of an evaluation forward (GPU or CPU).
"""

from __future__ import annotations

import argparse

from linearize.bench import add_arguments, add_conversion_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the hybrid layer against softmax attention and fla (GPU), "
                                            "or with --conversion the training / evaluation throughput of the recipes",
                              description=__doc__.split("\n")[0])
    add_arguments(p)
    add_conversion_arguments(p)
    p.set_defaults(func=run, name=None)  # the default stem depends on --conversion (see run)


def run(args: argparse.Namespace) -> int:
    import sys

    argv = sys.argv[2:] if len(sys.argv) > 2 else []
    if args.conversion:
        from linearize.bench.throughput import run as run_conversion

        args.name = args.name or "conversion"
        run_conversion(args, argv)
        return 0
    from linearize.bench.kernels import run as run_bench

    args.name = args.name or "bench"
    run_bench(args, argv)
    return 0
