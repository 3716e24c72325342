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
    p.add_argument("--pair", action="append", default=[], metavar="ROW_A:ROW_B",
                   help="--long-out: one more paired difference, by merged row names (repeatable), e.g. "
                        "'run-x hybrid:run-y hybrid' (the same weights with and without a change)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from linearize.errors import LinearizeError
    from linearize.evaluate.report import side_by_side

    if args.long_out:
        pairs = []
        for text in args.pair:
            a, sep, b = text.partition(":")
            if not sep or not a.strip() or not b.strip():
                raise LinearizeError(f"--pair {text!r}: expected ROW_A:ROW_B (merged row names)")
            pairs.append((a.strip(), b.strip()))
        _merge_long(args.dirs, Path(args.long_out), pairs)
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


def _merge_long(dirs, out, pairs=()) -> None:
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
    print(write_merged_long(records, out, extra_pairs=pairs))
