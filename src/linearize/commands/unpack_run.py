"""`linearize unpack-run PACK... --out RUN [--model M]`: a packed run restored, to resume it here."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "unpack-run", help="restore a run packed by `linearize pack-run` into a new directory",
        description="Check a pack (every part present and matching its sha256, the base model's fingerprint equal "
                    "to the run's) and restore the run into --out; nothing is written unless every check passes. "
                    "Then `linearize convert --resume --model M --out RUN` continues it (a finished run: writes its "
                    "model files again, the tokenizer from the base).")
    p.add_argument("pack", nargs="+", help="the pack: its OUT.manifest.json, its parts, OUT, or the folder holding it (a study's packs/NAME/)")
    p.add_argument("--out", required=True, help="directory to restore the run into (new or empty)")
    p.add_argument("--model", default=None,
                   help="the run's base model on this machine (default: the one the pack records, when it is a short "
                        "name or a path here)")
    p.set_defaults(func=run)


def run(args) -> int:
    from linearize.models.rundir import read_run_marker
    from linearize.models.runpack import unpack_run

    manifest = unpack_run(args.pack, args.out, model=args.model)
    model = read_run_marker(args.out)["model"]
    done = "finished; its model files were not packed" if manifest["run"]["complete"] else "unfinished"
    print(f"restored the run ({done}) into {args.out}; continue it with:\n"
          f"  linearize convert --resume --model {model} --out {args.out}")
    return 0
