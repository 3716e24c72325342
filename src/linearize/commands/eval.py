"""`linearize eval --model M --tasks piqa,arc_easy [--components hybrid,la_only]`: benchmarks through lm-eval."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from linearize.config import COMPONENT_MODES


def add_model_args(p, *, convert_default: bool = False) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    p.add_argument("--model", help="short name (gemma3-270m, smollm2-135m), HF directory, .gguf, or a converted "
                                    "model directory (config.json with a 'linearize' entry)")
    p.add_argument("--convert", action="store_true", default=convert_default,
                   help="convert a base model on the fly with an untrained feature map (diagnostics of the bare layer)")
    p.add_argument("--window", type=int, default=None, help="sliding window of --convert (default 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto: bfloat16 where the device computes it natively (CUDA with bf16, CPUs with "
                        "AVX512-BF16 or AMX: about 1.7x faster on a 2-core CPU), else float32")
    p.add_argument("--seed", type=int, default=1234, help="seed (lm-eval, bootstrap, feature-map init)")
    p.add_argument("--out", default=None, help="output directory for <verb>.json / .md / .png (default: print only)")
    p.add_argument("--no-check", action="store_true", help="skip the degenerate-output check at load")
    p.add_argument("--hybrid", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a computation-only HybridConfig setting of a converted model at load, e.g. "
                        "--hybrid window=512 (repeatable, or comma-separated: --hybrid sparse_memory=256,"
                        "memory_select=query; fields: python -c 'import linearize; "
                        "print(*linearize.HybridConfig.describe(), sep=chr(10))')")


def add_bench_args(p) -> None:
    p.add_argument("--tasks", default=",".join(("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu")),
                   help="comma-separated benchmarks (piqa, arc_easy, arc_challenge, hellaswag, winogrande, mmlu, "
                        "mmlu_<subject>, mmlu_<category>); default: all six")
    p.add_argument("--limit", type=float, default=None,
                   help="questions per benchmark (a fraction if < 1); mmlu spreads them over its 57 subjects")
    p.add_argument("--batch-size", default="8", help="lm-eval batch size (an int or 'auto')")
    p.add_argument("--data-dir", default=None, help="benchmark data directory (default: the project's shared data)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95%% intervals")
    p.add_argument("--max-length", type=int, default=None, help="context length lm-eval truncates to")


def hybrid_overrides(pairs: list[str]) -> dict:
    """``["window=512", "placement=overlap"]`` (or ``["window=512,placement=overlap"]``) -> typed HybridConfig
    changes, read and checked as a recipe's ``--set`` values are (a one-line error on a bad one)."""
    import dataclasses
    import re

    from linearize.config import HybridConfig
    from linearize.errors import LinearizeError
    from linearize.train.recipes import expect_type, parse_override

    types = {f.name: type(f.default) for f in dataclasses.fields(HybridConfig)}
    out = {}
    # a comma starts a new pair only before FIELD=, so a list value (layers=[0,2]) stays whole
    for pair in (p for arg in pairs for p in re.split(r",(?=\s*[A-Za-z_]\w*=)", arg)):
        parts, value = parse_override(pair)
        if len(parts) != 1 or parts[0] not in types:
            raise LinearizeError(f"--hybrid {pair!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}")
        out[parts[0]] = expect_type(f"--hybrid {parts[0]}", value, types[parts[0]])
    return out


def model_spec(args) -> str:
    from linearize.errors import LinearizeError

    spec = args.model or args.model_pos
    if not spec:
        raise LinearizeError("give a model: --model NAME_OR_DIR")
    return spec


def parse_limit(limit):
    if limit is None:
        return None
    return int(limit) if limit >= 1 else float(limit)


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers (``"4096,8192"``), empty items skipped."""
    return [int(x) for x in text.split(",") if x.strip()]


def parse_batch(bs: str):
    return bs if bs == "auto" else int(bs)


def torch_dtype(name: str, device: str | None = None):
    """The torch dtype of a --dtype choice; 'auto' resolves for `device` (default: cuda when available)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device == "cpu" and _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: keep float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="zero/few-shot benchmarks through lm-eval (offline), optionally per component mode",
        description="Score a base or converted model on piqa, arc_easy, arc_challenge, hellaswag, winogrande (0-shot) "
                    "and mmlu (5-shot) with lm-eval's own prompts and scoring on local data, with bootstrap 95%% "
                    "intervals. --components runs a converted model once per component mode.")
    add_model_args(p)
    add_bench_args(p)
    p.add_argument("--components", default=None,
                   help=f"comma-separated component modes to run ({', '.join(COMPONENT_MODES)}); "
                        "converted models only; default: the model as loaded")
    p.set_defaults(func=run)


def run(args) -> int:
    from linearize.errors import LinearizeError
    from linearize.evaluate.harness import default_data_dir, evaluate
    from linearize.evaluate.lm_eval_model import load_model
    from linearize.records import run_metadata, write_record
    from linearize.evaluate.report import eval_markdown
    from linearize.models.convert import components, is_converted

    spec = model_spec(args)
    data_dir = args.data_dir or default_data_dir()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    modes = [m.strip() for m in args.components.split(",")] if args.components else [None]
    bad = [m for m in modes if m is not None and m not in COMPONENT_MODES]
    if bad:  # before minutes of loading and evaluating the good ones
        raise LinearizeError(f"--components: unknown mode(s) {', '.join(map(repr, bad))}; expected {', '.join(COMPONENT_MODES)}")
    t0 = time.perf_counter()
    model, tokenizer, info = load_model(spec, convert=args.convert, window=args.window, device=args.device,
                                        dtype=torch_dtype(args.dtype, args.device), check=not args.no_check, seed=args.seed,
                                        hybrid=hybrid_overrides(args.hybrid))
    if modes != [None] and not is_converted(model):
        raise LinearizeError("--components needs a converted model (a converted directory, or --convert)")
    load_s = time.perf_counter() - t0
    runs, seconds = {}, {}
    failure = None
    for mode in modes:
        label = mode or ("hybrid" if is_converted(model) else "base")
        t1 = time.perf_counter()
        kwargs = dict(limit=parse_limit(args.limit), batch_size=parse_batch(args.batch_size), data_dir=data_dir,
                      seed=args.seed, bootstrap=args.bootstrap, max_length=args.max_length)
        try:
            if mode is None:
                runs[label] = evaluate(model, tokenizer, tasks, **kwargs)
            else:
                with components(model, mode):
                    runs[label] = evaluate(model, tokenizer, tasks, **kwargs)
        except Exception as exc:  # keep (print and write) the modes that finished, then fail
            failure = exc
            print(f"[eval] {label} failed: {exc}", file=sys.stderr)
            break
        seconds[label] = time.perf_counter() - t1
        print(f"[eval] {label}: {seconds[label]:.1f} s", file=sys.stderr)
    if failure is not None and not runs:
        raise failure
    meta = run_metadata(model_info=info, data_dir=data_dir, device=str(model.device), seed=args.seed,
                        tasks=tasks, limit=args.limit, batch_size=args.batch_size, load_seconds=load_s,
                        eval_seconds=seconds, wall_seconds=time.perf_counter() - t0)
    record = {"meta": meta, "runs": runs}
    md = eval_markdown(record)
    print(md)
    if args.out:
        path, _ = write_record(args.out, "eval", record, md)
        print(f"wrote {path}", file=sys.stderr)
    if failure is not None:
        raise failure
    return 0
