"""What the training-free query memory keeps of the gold passage of each long-QA prompt, under each rule that combines
a KV head's query heads (`memory_heads`): the base model cut to window + sinks + a memory chosen by the prompt's last
queries (`models.window_sinks.query_memory_baseline`, every layer), each item scored through a cached prefill while
`evaluate.memory_coverage` records every layer's choice. A conversion without LoRA (the `long-context-kl` recipe)
chooses with the base's queries and keys, so its memory is this one. Given a converted run instead, the run is read with
its own window, sinks and layers and this memory (its linear state on).

The items are `linearize diagnose --what long`'s with the same seed, lengths, depths and cell limit (default: those of
the Qwen records, results/long/qwen2.5-coder-1.5b/s27/), so each row pairs with those records' per-item scores.

    python scripts/memory_coverage.py QWEN.gguf OUT --device cuda --dtype bfloat16

Writes OUT/coverage.json (commit, device, command, every item's score and per-layer coverage per rule) and
OUT/coverage.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

import linearize
from linearize.commands.eval import int_list
from linearize.commands.info import parse_layers
from linearize.config import MEMORY_HEADS, MEMORY_PREFILLS, MEMORY_REREAD
from linearize.data_dir import default_data_dir
from linearize.evaluate.lm_eval_model import load_model
from linearize.evaluate.long_tasks import build_items
from linearize.evaluate.memory_coverage import coverage_markdown, memory_coverage
from linearize.models.window_sinks import query_memory_baseline
from linearize.records import run_metadata, write_record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the base model (short name, .gguf, HF directory), cut to the training-free memory; or "
                                 "a converted run, read with its own window and layers and this memory")
    p.add_argument("out", type=Path)
    p.add_argument("--heads", default="sum,max", help=f"memory_heads rules to compare, of {MEMORY_HEADS}")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--sinks", type=int, default=8)
    p.add_argument("--memory", type=int, default=2048, help="keys per layer and KV head")
    p.add_argument("--reread", type=int, default=MEMORY_REREAD)
    p.add_argument("--prefill", default="none", choices=MEMORY_PREFILLS,
                   help="memory_prefill: what the prompt's tokens before the re-read ones read ('exact': the base's "
                        "full attention, a diagnostic of what the constant-memory prefill loses)")
    p.add_argument("--pyramid", type=float, default=1.0,
                   help="memory_pyramid: the first cut layer keeps this many times the last one's keys, the same total")
    p.add_argument("--layers", default="all", type=parse_layers,
                   help="the cut layers: 'all', 'global' or comma-separated indices (as `diagnose --layers`)")
    p.add_argument("--task", default="qa_squad", help="a long-QA or retrieval task of `diagnose --what long`")
    p.add_argument("--lengths", type=int_list, default=[16384, 32768], help="prompt tokens")
    p.add_argument("--depths", default="0,0.5,1", help="gold-passage depths")
    p.add_argument("--cell-limit", type=int, default=3, help="prompts per length x depth")
    p.add_argument("--seed", type=int, default=1234, help="the items' seed (diagnose's default)")
    p.add_argument("--only", default=None, help="keep the items whose id contains this (e.g. a question id)")
    p.add_argument("--gold-first", action="store_true",
                   help="an oracle choice of the same size: every layer's memory takes the gold passage's keys before "
                        "any other (the rest by the rule) -- does the model read the passage when the memory holds it?")
    p.add_argument("--device", default=None, help="cuda where available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    heads = [h for h in args.heads.split(",") if h]
    if not heads or set(heads) - set(MEMORY_HEADS):
        p.error(f"--heads: choose among {MEMORY_HEADS}; got {args.heads!r}")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"{args.out} is not empty")
    depths = [float(x) for x in args.depths.split(",") if x]

    data_dir = default_data_dir()
    base, tokenizer, info = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype), seed=args.seed)
    retrieval = not args.task.startswith("qa_")
    items = build_items(tokenizer, [args.task], limit=args.cell_limit, lengths=args.lengths if retrieval else [],
                        qa_lengths=[] if retrieval else args.lengths, depths=depths, seed=args.seed, data_dir=data_dir,
                        cell_limit=args.cell_limit, progress=print)
    if args.only:
        items = [it for it in items if args.only in it.qid]
        if not items:
            p.error(f"--only {args.only!r}: no item of these settings has it in its id")
    converted = linearize.is_converted(base)
    if converted and (args.window, args.sinks, args.layers) != (512, 8, "all"):
        p.error("a converted run keeps its own window, sinks and layers: leave --window / --sinks / --layers out")
    rules = {}
    for rule in heads:
        memory = {}
        if converted:  # its saved inference memory, or the one asked for here
            model = base
            memory = dict(sparse_memory=args.memory, memory_select="query", memory_reread=args.reread,
                          memory_prefill=args.prefill)
        else:
            model = query_memory_baseline(base, args.window, args.sinks, args.memory, layers=args.layers,
                                          reread=args.reread, prefill=args.prefill)
        linearize.set_hybrid(model, memory_heads=rule, memory_pyramid=args.pyramid, **memory)
        print(f"[coverage] memory_heads={rule}: {len(items)} prompts", flush=True)
        rules[rule] = memory_coverage(model, tokenizer, items, gold_first=args.gold_first, progress=lambda s: print(s, flush=True))
        if not converted:
            del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model")}
    record = {"meta": run_metadata(model_info=info, data_dir=data_dir, device=str(base.device), seed=args.seed,
                                   argv=["python", "scripts/memory_coverage.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": settings, "rules": rules}
    write_record(args.out, "coverage", record, coverage_markdown(record))
    print(coverage_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
