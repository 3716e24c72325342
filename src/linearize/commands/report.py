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
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from linearize.errors import LinearizeError
    from linearize.evaluate.report import side_by_side

    try:
        md = side_by_side(args.dirs)
    except FileNotFoundError as exc:
        raise LinearizeError(str(exc)) from exc
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
    return 0
