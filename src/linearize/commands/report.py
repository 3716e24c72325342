"""`linearize report DIR...`: several runs' records side by side (Markdown)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="put the records of several runs side by side (Markdown tables)",
        description="Read the records (eval.json, diagnose.json, attribution.json, probes.json) in each DIR and "
                    "print Markdown tables comparing them: benchmarks per run and component mode, passkey accuracy, "
                    "per-position loss, attribution shares.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or record files")
    p.add_argument("--out", default=None, help="also write the Markdown to this file")
    p.add_argument("--long-out", default=None, metavar="DIR",
                   help="long-context records (long.json) of the DIRs merged into one comparison, paired over their "
                        "shared items: DIR/long.json, long.md (with an overview table) and the figures")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from linearize.errors import LinearizeError
    from linearize.evaluate.report import side_by_side

    if args.long_out:
        _merge_long(args.dirs, Path(args.long_out))
        return 0
    try:
        md = side_by_side(args.dirs)
    except FileNotFoundError as exc:
        raise LinearizeError(str(exc)) from exc
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
    return 0


def _merge_long(dirs, out) -> None:
    import json
    from pathlib import Path

    from linearize.errors import LinearizeError
    from linearize.evaluate.long_context import write_merged_long

    records = {}
    for d in dirs:
        path = Path(d) if Path(d).is_file() else Path(d) / "long.json"
        if not path.is_file():
            raise LinearizeError(f"{d}: no long.json (written by `linearize diagnose --what long --out DIR`)")
        label = path.parent.name
        if label in records:
            raise LinearizeError(f"two records are named {label!r}: give their directories distinct names")
        records[label] = json.loads(path.read_text())
    print(write_merged_long(records, out))
