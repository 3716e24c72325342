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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run of the table, after the run's own (repeatable; e.g. "
                        "'stage2.batch_size=2' for a larger model); a run directory trained with other settings is "
                        "refused")
    p.add_argument("--limit", type=float, default=None,
                   help="questions per benchmark (default: all); long-context tables: questions per task (default: the "
                        "table's, 50)")
    p.add_argument("--tasks", default=None, help="benchmarks (default: all six); long-context tables: the long-context "
                                                  "tasks (default: the table's, squad,drop,passkey,niah_single,qa_squad)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="evaluation dtype (auto: as `linearize eval --dtype auto`; long-context tables: the table's, bfloat16)")
    g = p.add_argument_group("long-context tables (e.g. long-context; defaults: the table's, sized for a GPU; the "
                             "training-free variants of a run are evaluated with it)")
    g.add_argument("--cell-limit", type=int, default=None, help="prompts per length x depth cell of the retrieval and "
                                                                 "long-QA tasks")
    g.add_argument("--lengths", default=None, help="comma-separated prompt tokens of the retrieval tasks")
    g.add_argument("--qa-lengths", default=None, help="comma-separated prompt tokens of the long-QA tasks")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from linearize.study import TABLES, execute, plan

    seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    runs = tuple(r for r in args.runs.split(",") if r) if args.runs else None
    extra = tuple(args.overrides)
    if args.dry_run:
        for study_run, seed in plan(args.table, seeds, runs, extra).jobs:
            print(f"{study_run.name}-seed{seed}: recipe {study_run.recipe} {' '.join(study_run.overrides)} "
                  f"-> modes {','.join(study_run.modes)}")
        for variant in TABLES[args.table].variants:
            print(f"{variant.name}: {variant.run} with {', '.join(f'{k}={v}' for k, v in variant.hybrid)} at load "
                  f"-> modes {','.join(variant.modes)}")
        return 0
    from linearize.commands.eval import torch_dtype

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    dtype = torch_dtype(args.dtype)
    tasks = args.tasks.split(",") if args.tasks else None
    long = _long_settings(TABLES[args.table].long, args, limit, tasks)
    path = execute(args.table, model=args.model, out=args.out, preset=None if args.preset == "none" else args.preset,
                   seeds=seeds, runs=runs, limit=limit, tasks=tasks, data_dir=args.data_dir,
                   batch_size=args.batch_size, dtype=dtype, long=long, extra=extra)
    print(path.read_text())
    print(f"[study] {TABLES[args.table].title}: {path}")
    return 0


def _long_settings(table_settings, args, limit, tasks):
    """The table's long-context settings with the options given on the command line; None for other tables."""
    import dataclasses

    from linearize.errors import LinearizeError

    if table_settings is None:
        if any(v is not None for v in (args.cell_limit, args.lengths, args.qa_lengths)):
            raise LinearizeError(f"--cell-limit, --lengths and --qa-lengths are for long-context tables, not {args.table!r}")
        return None
    ints = lambda text: tuple(int(x) for x in text.split(",") if x.strip())  # noqa: E731
    given = dict(limit=int(limit) if limit is not None else None, tasks=tuple(tasks) if tasks else None,
                 cell_limit=args.cell_limit, lengths=ints(args.lengths) if args.lengths else None,
                 qa_lengths=ints(args.qa_lengths) if args.qa_lengths else None,
                 dtype=None if args.dtype == "auto" else args.dtype)
    return dataclasses.replace(table_settings, **{k: v for k, v in given.items() if v is not None})
