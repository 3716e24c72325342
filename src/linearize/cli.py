"""`linearize <verb>`: one command line over the library. Each verb lives in linearize/commands/<verb>.py
(a hyphen in the verb is an underscore in the file name) and provides `register(subparsers)`, which adds its parser and sets `func`."""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("info", "convert", "pack-run", "unpack-run", "select-layers", "eval", "diagnose", "generate", "bench", "report", "study", "demo", "lmeval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        name = f"linearize.commands.{verb.replace('-', '_')}"  # a module name has no hyphen
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # verb not shipped in this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from linearize.errors import LinearizeError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # every argument after it is lm-eval's own, even its --help
        from linearize.commands.lmeval import run

        return run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LinearizeError as exc:
        print(f"linearize {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
