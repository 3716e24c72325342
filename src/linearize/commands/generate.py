"""`linearize generate MODEL PROMPT`: greedy or sampled continuation, with a choice of attention components.

A converted model on CUDA decodes with its captured step (`linearize.models.generation`); the last line says which
step ran and the tokens/s (prompt and warm-up included)."""

from __future__ import annotations

import argparse
import time

from linearize.config import COMPONENT_MODES


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a base or converted model")
    p.add_argument("model", help="converted directory, HF directory, .gguf file or short name")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--components", default=None, choices=COMPONENT_MODES,
                   help="attention branches to use (converted models only; default hybrid)")
    p.add_argument("--convert", action="store_true", help="convert a base model on the fly (untrained feature maps)")
    p.add_argument("--window", type=int, default=64, help="window when --convert is given")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(func=run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from transformers import DynamicCache

    from linearize.attention.cache import cache_nbytes
    from linearize.compat import cache_kwargs
    from linearize.evaluate.lm_eval_model import converted_dir_info, load_model
    from linearize.models.convert import components, is_converted

    if args.components and not args.convert and converted_dir_info(args.model) is None:  # checked before loading
        from linearize.errors import LinearizeError

        raise LinearizeError(f"--components needs a converted model; {args.model} is a base model (add --convert "
                             f"to convert it on the fly with untrained feature maps)")
    model, tokenizer, _ = load_model(args.model, convert=args.convert, window=args.window, device=args.device, check=False)
    converted = is_converted(model)
    mode = args.components or "hybrid"
    ctx = components(model, mode) if converted else contextlib.nullcontext()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    cache = DynamicCache(config=model.config)
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.95) if args.sample else dict(do_sample=False)
    start = time.perf_counter()
    with ctx, torch.no_grad():
        out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=args.max_new_tokens, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, inputs.input_ids.shape[1]:]
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    # converted models say which decode step ran (models/generation.py); a base model runs HF's eager loop
    path = getattr(model, "decode_path", None)
    step = path.describe() if path is not None else "eager decode step (HF's loop)"
    print(f"\n[{len(new)} tokens in {seconds:.2f} s, {len(new) / seconds:.1f} tok/s; cache {cache_nbytes(cache) / 2**20:.2f} MiB;"
          f" {'converted, ' + mode if converted else 'base model'}; {step}]")
    return 0
