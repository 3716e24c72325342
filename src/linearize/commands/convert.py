"""`linearize convert --model M --recipe R --out DIR`: run a conversion recipe (attention transfer, LoRA, SSD)."""

from __future__ import annotations

import sys

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a model with a training recipe (attention transfer + LoRA / SSD)",
        description="Convert a pretrained model into a linear + sliding-window hybrid with a recipe: lolcats, la-only, "
                    "hedgecats, ssd, long-context, long-context-all, long-context-kl, long-context-memory (no training) (or a YAML "
                    "file; --list-recipes). Writes the converted model (LoRA merged), the adapter, the resolved recipe, the training log, a loss plot and summary.json to "
                    "--out. Exit status: 0 done, "
                    "2 bad input, 3 done but the validation loss shows a diverged run (see summary.json 'warnings').")
    p.add_argument("--model", help="short name (gemma3-270m, smollm2-135m), HF directory or .gguf file")
    p.add_argument("--recipe", default=None, help="recipe name or YAML path (default: ssd; with --resume: the run's)")
    p.add_argument("--out", help="output directory (must be empty unless --overwrite / --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set stage2.lora.r=4 (value parsed as YAML); repeatable")
    p.add_argument("--preset", default=None, help="size preset, e.g. 'cpu' (a few minutes on a 2-core CPU)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out from its checkpoints, with its model, recipe and data; "
                        "--set may change learning rates, schedules and step counts (logged)")
    p.add_argument("--overwrite", action="store_true", help="replace the run a non-empty --out holds (never other files)")
    p.add_argument("--data-dir", default=None, help="data directory (default: the project's shared data)")
    p.add_argument("--cache-dir", default=None, help="tokenised-data cache directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the recipe that --recipe, --preset and --set resolve to (as the run's recipe.yaml would "
                        "hold it) and exit; nothing is run or written")
    p.set_defaults(func=run)


def run(args) -> int:
    from linearize.errors import LinearizeError
    from linearize.train import available_recipes, run_recipe

    if args.list_recipes:
        from linearize.train.recipes import load_recipe

        names = available_recipes()
        width = max(map(len, names))
        for name in names:
            print(f"{name:{width}s} {load_recipe(name)['description']}")
        return 0
    if args.print_recipe:
        from linearize.train.recipes import recipe_yaml, resolve_recipe

        print(recipe_yaml(resolve_recipe(args.recipe or "ssd", args.overrides, args.preset)), end="")
        return 0
    if not args.model or not args.out:
        raise LinearizeError("convert needs --model and --out")
    summary = run_recipe(args.model, args.recipe, args.out, overrides=args.overrides, preset=args.preset,
                         resume=args.resume, overwrite=args.overwrite, data_dir=args.data_dir, cache_dir=args.cache_dir,
                         show_progress=False if args.no_progress else None)
    print(format_summary(summary))
    for warning in summary.get("warnings", []):
        print(f"linearize convert: WARNING: {warning}", file=sys.stderr)
    return 3 if summary.get("warnings") else 0


def format_summary(summary: dict) -> str:
    modes = list(summary["val"])
    lines = [f"converted {summary['model']} with recipe {summary['recipe']}"
             + (f" (preset {summary['preset']})" if summary.get("preset") else "") + f" -> {summary['out_dir']}",
             "", "validation loss (next-token cross-entropy):", f"  {'':10s}" + "".join(f"{m:>10s}" for m in modes)]
    base = summary.get("val_base", {}).get("base")
    if base is not None:
        lines.append(f"  {'base':10s}" + "".join(f"{base:10.4f}" for _ in modes[:1]))
    for stage, info in summary["stages"].items():
        lines.append(f"  {stage:10s}" + "".join(f"{info['val'].get(m, float('nan')):10.4f}" for m in modes))
    lines.append("")
    for stage, info in summary["stages"].items():
        lines.append(f"  {stage}: {info['steps']} steps, {info['tokens']} tokens, {info['tokens_per_s']:.0f} tokens/s"
                     + (f", early-stopped (best step {info['best_step']})" if info.get("stopped_early") else ""))
    lines.append(f"  wall time {summary['wall_seconds']:.1f} s")
    if summary.get("inference_hybrid"):
        settings = ", ".join(f"{k}={v}" for k, v in summary["inference_hybrid"].items())
        lines.append(f"  the saved model runs with {settings} (recipe section inference; the losses above are "
                     f"without them)")
    return "\n".join(lines)

