"""`linearize pack-run RUN OUT [--part-mb 15]`: a run directory packed into parts to carry to another machine."""

from __future__ import annotations


def register(subparsers) -> None:
    from linearize.models.runpack import DEFAULT_PART_MB

    p = subparsers.add_parser(
        "pack-run", help="pack a conversion run (checkpoints, recipe, log) into parts to resume it on another machine",
        description="Pack what resuming a `linearize convert` run needs and nothing that can be derived again (the "
                    "run marker, recipe, data manifest, training log, layer selection, summary and the stages' "
                    "checkpoints; no base model, merged weights, adapter or tokenizer copy) into OUT.part000, "
                    "OUT.part001, ... of at most --part-mb MiB each, and OUT.manifest.json (each part's sha256, the "
                    "base model's fingerprint). Restore it with `linearize unpack-run`.")
    p.add_argument("run", help="the run directory (convert --out)")
    p.add_argument("out", help="the pack's name: OUT.partNNN and OUT.manifest.json are written (must not exist)")
    p.add_argument("--part-mb", type=float, default=DEFAULT_PART_MB,
                   help=f"largest part in MiB (default {DEFAULT_PART_MB:g})")
    p.add_argument("--model", default=None,
                   help="the run's base model (default: the one the run recorded, when it is a short name or a path "
                        "on this machine); its fingerprint goes into the manifest")
    p.set_defaults(func=run)


def run(args) -> int:
    from linearize.models.runpack import manifest_path, pack_run

    manifest = pack_run(args.run, args.out, part_mb=args.part_mb, model=args.model)
    packed = sum(p["bytes"] for p in manifest["parts"])
    state = "complete" if manifest["run"]["complete"] else "unfinished"
    print(f"packed the {state} run {args.run} ({len(manifest['run']['files'])} files) into "
          f"{len(manifest['parts'])} part(s), {packed / 2**20:.2f} MiB: {manifest_path(args.out)} and "
          + ", ".join(p["name"] for p in manifest["parts"]))
    return 0
