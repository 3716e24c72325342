"""`linearize study TABLE`: reproduce one table of the study (see linearize.study for what each table runs)."""

from __future__ import annotations


def register(subparsers) -> None:
    from linearize.study import TABLES

    p = subparsers.add_parser("study", help="train and diagnose the runs of one study table (resumable)",
                              description="Tables: " + "; ".join(f"{k}: {t.title}" for k, t in TABLES.items()))
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--out", default="results/study")
    p.add_argument("--preset", default="gpu-small", help="recipe size preset ('none' for the recipes' full sizes)")
    p.add_argument("--seeds", default="0,1", help="seeds of the headline runs (others use the first)")
    p.add_argument("--runs", default=None,
                   help="comma-separated shell patterns on <run>-seed<seed> (e.g. 'ssd-0.75*,hedgecats-seed1'): run only "
                        "these jobs of the table, so that several processes can share one table")
    p.add_argument("--limit", type=float, default=None, help="questions per benchmark (default: all)")
    p.add_argument("--tasks", default=None, help="benchmarks (default: all six)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="evaluation dtype (auto: as `linearize eval --dtype auto`)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from linearize.study import TABLES, execute, plan

    seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    runs = tuple(r for r in args.runs.split(",") if r) if args.runs else None
    if args.dry_run:
        for study_run, seed in plan(args.table, seeds, runs).jobs:
            print(f"{study_run.name}-seed{seed}: recipe {study_run.recipe} {' '.join(study_run.overrides)} "
                  f"-> modes {','.join(study_run.modes)}")
        return 0
    from linearize.commands.eval import torch_dtype

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    dtype = torch_dtype(args.dtype)
    path = execute(args.table, model=args.model, out=args.out, preset=None if args.preset == "none" else args.preset,
                   seeds=seeds, runs=runs, limit=limit, tasks=args.tasks.split(",") if args.tasks else None, data_dir=args.data_dir,
                   batch_size=args.batch_size, dtype=dtype)
    print(path.read_text())
    print(f"[study] {TABLES[args.table].title}: {path}")
    return 0
