"""`linearize lm-eval ARGS...`: lm-eval's own command line, with linearize's models and tasks available.

lm-eval finds models only in its own registry and has no plugin discovery, so ``lm_eval --model linearize`` cannot
see ours. This verb imports linearize first (the ``linearize`` model, and converted checkpoints registered with the
Auto classes, so ``--model hf --model_args pretrained=DIR`` loads the hybrid), points ``--include_path`` at the
offline ``lz_*`` task configs when none is given, and hands every argument to lm-eval unchanged::

    linearize lm-eval --model linearize --model_args pretrained=runs/ssd,components=la_only --tasks lz_piqa --limit 20
"""

from __future__ import annotations

import argparse
import sys

VERB = "lm-eval"


def register(subparsers) -> None:
    p = subparsers.add_parser(VERB, add_help=False, help="lm-eval's command line with linearize's models and lz_* tasks "
                                                         "(all arguments are lm-eval's; see `linearize lm-eval --help`)")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: run(args.lm_eval_args))


def run(argv: list[str]) -> int:
    from lm_eval.__main__ import cli_evaluate

    from linearize.evaluate.harness import default_data_dir
    from linearize.evaluate.lm_eval_model import register
    from linearize.evaluate.tasks import build_task_dir

    argv = list(argv)
    asks_help = any(a in ("-h", "--help") for a in argv)
    if not asks_help and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(build_task_dir(default_data_dir()))]
    register()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's CLI parses sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exc:  # lm-eval's CLI ends with sys.exit on errors and on --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
