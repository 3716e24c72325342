"""`linearize demo`: the embedded default job. Converts Gemma 3 270M with the `ssd` recipe at CPU sizes,
then prints the component table (each benchmark under hybrid / swa_only / la_only / sinks_only / none)."""

from __future__ import annotations

import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="convert Gemma 3 270M with the ssd recipe (CPU sizes) and diagnose it",
                              description=__doc__)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--recipe", default="ssd")
    p.add_argument("--preset", default="cpu", help="size preset of the recipe ('cpu', 'gpu-small', or 'none' for full size)")
    p.add_argument("--out", default="runs/demo", help="output directory (replaced on every demo run)")
    p.add_argument("--tasks", default="piqa,arc_easy", help="benchmarks of the component table")
    p.add_argument("--limit", type=int, default=25, help="questions per benchmark")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from linearize.evaluate.diagnose import diagnose, diagnose_markdown
    from linearize.records import run_metadata, write_record
    from linearize.train import run_recipe

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    out = Path(args.out)
    say(f"[demo] 1/2 converting {args.model} with the '{args.recipe}' recipe (preset {args.preset}) into {out}")
    summary = run_recipe(args.model, args.recipe, out, preset=None if args.preset == "none" else args.preset,
                         overwrite=True, data_dir=args.data_dir)
    say(f"[demo] conversion done in {time.perf_counter() - t0:.0f} s")
    tasks = [t for t in args.tasks.split(",") if t]
    say(f"[demo] 2/2 component diagnostics on {', '.join(tasks)} ({args.limit} questions each)")
    result = diagnose(str(out), tasks=tasks, limit=args.limit, base=args.model, data_dir=args.data_dir, progress=say)
    meta = run_metadata(model_info=result["info"], data_dir=args.data_dir, device=result["device"], seed=1234,
                        tasks=tasks, limit=args.limit, recipe=args.recipe, preset=args.preset)
    record = {"meta": meta, **result, "conversion": summary, "demo_seconds": time.perf_counter() - t0}
    markdown = diagnose_markdown(record)
    write_record(out / "diagnose", "diagnose", record, markdown)
    print(markdown)
    print(f"\n[demo] total {time.perf_counter() - t0:.0f} s; outputs in {out}/ (model, loss.png, summary.json, diagnose/)")
    return 0
