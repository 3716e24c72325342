"""Batch-1 `generate()` speed of a converted model on the GPU: the captured decode step (the default) against the
eager step, and the captured step with the norms and MLPs compiled into it (LINEARIZE_COMPILED_STEP=1), tokens/s of
the new tokens (prompt and warm-up included, as `linearize generate` reports them). Each path's greedy tokens are
compared with the eager step's; the compiled one also with HF's eager loop run with the same norms and MLPs compiled
(inductor rounds a fused bf16 chain once, not after every kernel, so its logits differ from the uncompiled ones by
a bf16 step and a random-weight model's near-tied argmax can differ: the capture is right when it equals that loop).

    python benchmarks/generate_speed.py OUT_JSON [--model shape:gemma3-270m | MODEL] [--new-tokens 256] [--layers global]

MODEL is anything `linearize.load_base` takes (a .gguf file, say); the default is the Gemma-3-270M shape with random
weights (speed does not depend on them). Greedy, bf16, a 32-token random prompt, converted with HybridConfig() on
`--layers` ('all', the default; 'global': the base's full-attention layers only, its sliding-window layers decoding
on rings of their window; or comma-separated layer indices).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationMixin

import linearize
from linearize.attention.graph_decode import compiled_outside_attention
from linearize.bench.decode import decode_shape
from linearize.bench.kernels import environment
from linearize.models.generation import COMPILED_ENV
from linearize.records import benchmark_header


def parse_layers(text: str):
    return [int(i) for i in text.split(",")] if text[:1].isdigit() else text


def build(model: str, layers="all"):
    if model.startswith("shape:"):
        cfg, cls = decode_shape(model.removeprefix("shape:"))
        torch.manual_seed(0)
        with torch.device("cuda"):
            base = cls(cfg).to(torch.bfloat16)
    else:
        base, _ = linearize.load_base(model, dtype=torch.bfloat16, device="cuda", check=False)
    return linearize.convert(base.eval(), linearize.HybridConfig(layers=layers))


def matching_tokens(a: torch.Tensor, b: torch.Tensor, prompt_tokens: int) -> int:
    """How many new tokens two greedy generations share before their first difference."""
    same = (a[:, prompt_tokens:] == b[:, prompt_tokens:]).all(0)
    return int(same.numel() if same.all() else (~same).nonzero()[0, 0])


def timed(fn, new_tokens: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--model", default="shape:gemma3-270m")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--layers", type=parse_layers, default="all",
                   help="layers to convert: 'all', 'global' or comma-separated indices (default all)")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    model = build(args.model, args.layers)
    prompt = torch.randint(1, 1000, (1, 32), device="cuda")
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, do_sample=False)  # Triton compiles, cuBLAS set-up: not timed
        GenerationMixin.generate(model, prompt, max_new_tokens=8, do_sample=False)
        captured_tps, captured = timed(lambda: model.generate(prompt, **kw), args.new_tokens)
        path = model.decode_path
        eager_tps, eager = timed(lambda: GenerationMixin.generate(model, prompt, **kw), args.new_tokens)
        os.environ[COMPILED_ENV] = "1"
        try:
            model.generate(prompt, max_new_tokens=8, do_sample=False)  # compiles the norms and MLPs: not timed
            compiled_tps, compiled = timed(lambda: model.generate(prompt, **kw), args.new_tokens)
            compiled_path = model.decode_path
        finally:
            del os.environ[COMPILED_ENV]
        with compiled_outside_attention(model):
            compiled_eager = GenerationMixin.generate(model, prompt, **kw)
    env = environment(args.commit, ["generate_speed"] + sys.argv[1:])
    env["command"] = "python benchmarks/generate_speed.py " + " ".join(sys.argv[1:])
    res = dict(benchmark_header(env), model=args.model, layers=args.layers, batch=1,
               prompt_tokens=32, new_tokens=args.new_tokens, captured_tokens_per_s=captured_tps,
               eager_tokens_per_s=eager_tps, speedup=captured_tps / eager_tps, decode_path=path.describe(),
               captured_equals_eager=bool(torch.equal(captured, eager)), compiled_tokens_per_s=compiled_tps,
               compiled_over_captured=compiled_tps / captured_tps, compiled_decode_path=compiled_path.describe(),
               compiled_equals_eager=bool(torch.equal(compiled, eager)),
               compiled_tokens_as_eager=matching_tokens(compiled, eager, prompt.shape[1]),
               compiled_equals_compiled_eager=bool(torch.equal(compiled, compiled_eager)))
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
