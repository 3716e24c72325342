"""Does a constant-memory model read a prompt that fits its memory exactly? On a real base model (CPU is enough):
the training-free query memory (`query_memory_baseline`: window + sinks + M keys, softmax alone) with
`memory_prefill='recall'` (the prompt read with the online recall memory) and `memory_fill` (keys leaving the window
after the choice take its free slots) against the base, item by item, on long-context reading items no longer than
window + sinks + M tokens: the bits of each gold answer should agree to float rounding.

    python scripts/check_memory_exact.py --model QWEN.gguf --out results/.../cpu-prefill-fill-exact [--task drop --limit 8]

Writes OUT/exact.json (commit, device, command, every item's bits for both models, the largest difference) and
OUT/exact.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import linearize
from linearize.evaluate.lm_eval_model import load_model
from linearize.evaluate.long_context import run_long
from linearize.models.window_sinks import query_memory_baseline
from linearize.records import run_metadata, write_json_with_provenance


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a base model spec (a GGUF file, a directory)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--task", default="drop", help="a long-context reading task (squad, coqa, drop)")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--sinks", type=int, default=8)
    p.add_argument("--memory", type=int, default=2048)
    args = p.parse_args()
    torch.manual_seed(0)
    base, tok, info = load_model(args.model, device="cpu", dtype=torch.float32)
    common = dict(tasks=[args.task], limit=args.limit, position_docs=0, reps=200, baseline_windows=[], layers="all",
                  window=args.window, progress=print, check=False)
    t0 = time.perf_counter()
    plain = run_long(base, tok, base=None, **common)
    memory = query_memory_baseline(base, args.window, args.sinks, args.memory, layers="all", fill=True)
    linearize.set_hybrid(memory, memory_prefill="recall")
    read = run_long(memory, tok, base=None, modes=["hybrid"], **common)
    rows = [{"qid": a["qid"], "prompt_tokens": a["prompt_tokens"], "base": a["base"]["bits"],
             "memory": b["hybrid"]["bits"]} for a, b in zip(plain["items"], read["items"])]
    worst = max(abs(r["memory"] - r["base"]) for r in rows)
    fits = args.window + args.sinks + args.memory
    record = {"meta": run_metadata(model_info=info, device="cpu", seed=0, argv=["python", *sys.argv]),
              "settings": vars(args) | {"out": str(args.out), "fits_tokens": fits}, "items": rows,
              "max_abs_bits_difference": worst, "seconds": time.perf_counter() - t0}
    write_json_with_provenance(args.out / "exact.json", record, "cpu")
    lines = [f"# {args.task}: base vs window {args.window} + {args.sinks} sinks + {args.memory} query-chosen keys "
             f"(memory_prefill recall, memory_fill), bits of the gold answer", "",
             "| item | prompt tokens | base | memory | difference |", "|---|---|---|---|---|"]
    lines += [f"| {r['qid']} | {r['prompt_tokens']} | {r['base']:.4f} | {r['memory']:.4f} | {r['memory'] - r['base']:+.1e} |" for r in rows]
    lines += ["", f"largest difference {worst:.1e} bits; commit {record['meta']['commit']}, CPU, fp32"]
    (args.out / "exact.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
