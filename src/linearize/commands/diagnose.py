"""`linearize diagnose --model M [--limit N]`: which branch earns the score (paper Table 1, attribution, probes)."""

from __future__ import annotations

import argparse
import sys
import time

from linearize.commands.eval import (add_bench_args, add_model_args, hybrid_overrides, int_list, model_spec, parse_batch,
                                     parse_limit, torch_dtype)
from linearize.commands.info import parse_layers
from linearize.config import COMPONENT_MODES, MEMORY_PREFILLS, MEMORY_REREAD

WHAT = ("benchmarks", "attribution", "probes", "long")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose", help="benchmarks under the five component modes (Table 1), attribution, long-context probes",
        description="Run the benchmarks with each component mode of a converted model alone "
                    f"({', '.join(COMPONENT_MODES)}) and on its base model, and write a Table-1-style table with the "
                    "recovery of the base score and the recovery above the no-attention floor, plus the prompt "
                    "lengths against the window. A base model is converted first with an untrained feature map. "
                    "--what adds the per-layer/head attribution and the long-context probes.")
    add_model_args(p)
    add_bench_args(p)
    p.set_defaults(tasks="piqa,arc_easy,arc_challenge,hellaswag,winogrande,mmlu")
    p.add_argument("--base", default=None, help="base model to compare with (default: recorded in the converted "
                                                 "directory's summary.json, or the model itself when it is a base model)")
    p.add_argument("--no-base", action="store_true", help="skip the base-model run")
    p.add_argument("--modes", default=",".join(COMPONENT_MODES), help="component modes to run")
    p.add_argument("--what", default="benchmarks",
                   help="comma-separated: benchmarks, attribution, probes, long (default: benchmarks)")
    g = p.add_argument_group("attribution")
    g.add_argument("--attr-source", default="wikitext2_test", help="held-out text source (linearize.documents)")
    g.add_argument("--attr-seqs", type=int, default=4, help="sequences of held-out text")
    g.add_argument("--attr-len", type=int, default=512, help="tokens per sequence")
    g.add_argument("--per-head-loss", action="store_true", help="also switch branches per head (slow)")
    g = p.add_argument_group("probes")
    g.add_argument("--docs", type=int, default=2, help="long documents for the per-position loss")
    g.add_argument("--doc-len", type=int, default=2048, help="tokens per long document")
    g.add_argument("--contexts", default="512,1024,2048,4096", help="passkey context lengths")
    g.add_argument("--trials", type=int, default=4, help="passkey trials per context length")
    g.add_argument("--probe-modes", default="hybrid,swa_only", help="component modes for the probes")
    g = p.add_argument_group("long (long-context tasks; --limit: questions per task and per length x depth cell)")
    g.add_argument("--long-tasks", default="all", help="comma-separated, or 'all': squad, coqa, drop, passkey, "
                   "niah_single, niah_multikey, niah_multivalue, qa_squad, qa_drop")
    g.add_argument("--cell-limit", type=int, default=None,
                   help="prompts per length x depth cell of the retrieval and long-QA tasks (default: --limit)")
    g.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="prompt tokens of the retrieval tasks")
    g.add_argument("--qa-lengths", default="4096,8192,16384,32768", help="prompt tokens of the long-QA tasks")
    g.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle / gold-passage depths (0 = start, 1 = end)")
    g.add_argument("--sinks", type=int, default=8, help="sink tokens of the window+sinks baseline")
    g.add_argument("--baseline-windows", default="auto",
                   help="windows of the baseline: 'auto' (decode state matched to the conversion), 'auto+FIELD=VALUE+...' "
                        "(matched to the conversion with these HybridConfig changes: auto+sparse_memory=2048 counts a "
                        "2048-key memory) and/or integers")
    g.add_argument("--memory-baselines", default="",
                   help="more training-free baselines: the base with the conversion's window (--window) + sinks + a "
                        "memory of M keys chosen by each prompt's last queries, softmax alone (SnapKV-style): M, or "
                        "'auto' / 'auto+FIELD=VALUE+...' (the memory fills the matched cut's keys beyond the window)")
    g.add_argument("--memory-reread", type=int, default=MEMORY_REREAD,
                   help="the query-memory baselines: the prompt's last tokens read again against the chosen memory "
                        "(HybridConfig.memory_reread, the same default; 1 = the last token)")
    g.add_argument("--memory-fill", action=argparse.BooleanOptionalAction, default=True,
                   help="the query-memory baselines: keys leaving the window after the memory is chosen take its free "
                        "slots (HybridConfig.memory_fill, the same default; --no-memory-fill: they are dropped, the "
                        "baselines of the records before session 17)")
    g.add_argument("--memory-prefill", choices=MEMORY_PREFILLS, default="none",
                   help="the query-memory baselines: what the prompt's tokens before the re-read ones read besides the "
                        "window and sinks (HybridConfig.memory_prefill, the same default; 'recall': the online recall "
                        "memory of the same size, so a prompt within window + sinks + memory is read exactly)")
    g.add_argument("--baselines-only", action="store_true",
                   help="base model only: its window+sinks baselines without the base itself (more baselines beside a "
                        "record that has it, merged by `linearize report --long-out`)")
    g.add_argument("--layers", default="global", help="base model only: the layers a conversion would convert "
                                                      "('all', 'global' or indices); the baseline cuts those")
    g.add_argument("--long-modes", default="hybrid,swa_only,la_only", help="component modes of a converted model")
    g.add_argument("--generate", action="store_true", help="also generate answers (reading/QA): exact match and F1")
    g.add_argument("--max-new-tokens", type=int, default=32, help="generated answer length limit")
    g.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per teacher-forced batch")
    g.add_argument("--position-docs", type=int, default=2, help="long documents for the per-position loss (0: skip)")
    g.add_argument("--position-len", type=int, default=None, help="their length (default: the longest prompt length)")
    p.set_defaults(func=run)


def baseline_windows(text: str, option: str = "--baseline-windows") -> list:
    """``--baseline-windows``: "auto,512,auto+sparse_memory=2048" -> ["auto", 512, {"sparse_memory": 2048}] (see
    linearize.evaluate.long_context.run_long); a one-line error on a bad entry."""
    from linearize.errors import LinearizeError

    out = []
    for w in (w.strip() for w in text.split(",") if w.strip()):
        if w == "auto":
            out.append(w)
        elif w.startswith("auto+"):
            out.append(hybrid_overrides([w[len("auto+"):].replace("+", ",")]))
        elif w.isdigit() and int(w) > 0:
            out.append(int(w))
        else:
            raise LinearizeError(f"{option} {w!r}: expected 'auto', 'auto+FIELD=VALUE+...' or a positive integer")
    return out


def run(args) -> int:
    import torch

    from linearize.config import HybridConfig
    from linearize.errors import LinearizeError
    from linearize.evaluate.harness import default_data_dir
    from linearize.evaluate.lm_eval_model import load_model
    from linearize.models.convert import convert, hybrid_config_of, is_converted
    from linearize.records import run_metadata, write_record

    spec = model_spec(args)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = set(what) - set(WHAT)
    if bad:
        raise LinearizeError(f"--what: unknown {sorted(bad)}; choose from {WHAT}")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    data_dir = args.data_dir or default_data_dir()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    window = args.window
    windows = baseline_windows(args.baseline_windows)  # a bad one stops here, before the model loads
    memories = baseline_windows(args.memory_baselines, "--memory-baselines")
    if args.memory_reread < 1:
        raise LinearizeError(f"--memory-reread {args.memory_reread}: must be >= 1 (the prompt's last token)")
    records = {}

    model, tokenizer, info = load_model(spec, device=args.device, dtype=torch_dtype(args.dtype, args.device),
                                        check=not args.no_check, seed=args.seed,
                                        hybrid=hybrid_overrides(args.hybrid))
    common = dict(model_info=info, data_dir=data_dir, device=str(model.device), seed=args.seed)
    # the base to compare with: --base, else the one a run's summary.json records (the model is loaded here, so the
    # parts below cannot read it from the directory themselves)
    recorded_base = args.base or info.get("base")

    if "benchmarks" in what:
        from linearize.evaluate.diagnose import diagnose, diagnose_markdown

        base = False if args.no_base else recorded_base
        result = diagnose(model, tokenizer, tasks=tasks, limit=parse_limit(args.limit), modes=modes, base=base,
                          window=window, batch_size=parse_batch(args.batch_size), data_dir=data_dir, seed=args.seed,
                          bootstrap=args.bootstrap, max_length=args.max_length, check=not args.no_check, progress=say)
        # diagnose() saw a model object: what only the directory says (the recipe, the base) comes from its load
        result["info"] = {**result["info"], **{k: info[k] for k in ("base", "recipe")
                                               if result["info"].get(k) is None and info.get(k) is not None}}
        info = {**info, **{k: v for k, v in result["info"].items() if v is not None}, "model": spec}
        meta = run_metadata(**{**common, "model_info": info}, tasks=tasks, limit=args.limit, modes=modes)
        record = {"meta": meta, **result}
        md = diagnose_markdown(record)
        records["diagnose"] = (record, md)
        print(md)
        if args.out:
            write_record(args.out, "diagnose", record, md)

    if "probes" in what:
        from linearize.evaluate.probes import probes_record

        was_converted = is_converted(model)
        base = None if args.no_base else recorded_base
        record, md = probes_record(model, tokenizer, info, out=args.out, title=f"{spec}: per-position loss",
                                   data_dir=data_dir, seed=args.seed, docs=args.docs, doc_len=args.doc_len, base=base,
                                   modes=[m.strip() for m in args.probe_modes.split(",") if m.strip()], window=window,
                                   contexts=args.contexts.split(","), trials=args.trials, check=not args.no_check,
                                   progress=say)
        if not was_converted:  # converted untrained by the probes: so the later records say
            info = {**info, "kind": "converted_untrained", "hybrid": hybrid_config_of(model).to_dict()}
        print(md)

    if "long" in what:
        from linearize.evaluate.long_context import (DEFAULT_TASKS, long_markdown, plot_bpb, plot_retrieval, run_long,
                                                     training_seq_len)

        tasks_long = list(DEFAULT_TASKS) if args.long_tasks == "all" else [t.strip() for t in args.long_tasks.split(",") if t.strip()]
        converted = is_converted(model)
        if args.baselines_only and converted:
            raise LinearizeError("--baselines-only is for a base model (its window+sinks baselines); this one is converted")
        base = None if args.no_base or not converted else recorded_base
        if converted and base is None and not args.no_base:
            raise LinearizeError("--what long: the converted model records no base model; pass --base or --no-base")
        train_len = training_seq_len(spec) if converted else None
        layers = parse_layers(args.layers)
        body = run_long(model, tokenizer, base=base, modes=[m.strip() for m in args.long_modes.split(",") if m.strip()],
                        tasks=tasks_long, limit=int(args.limit) if args.limit else 20, cell_limit=args.cell_limit, lengths=int_list(args.lengths),
                        qa_lengths=int_list(args.qa_lengths), depths=[float(d) for d in args.depths.split(",") if d.strip()],
                        sinks=args.sinks, baseline_windows=windows, layers=layers, window=window,
                        generate=args.generate, max_new_tokens=args.max_new_tokens, batch_tokens=args.batch_tokens,
                        position_docs=args.position_docs, position_len=args.position_len, train_len=train_len,
                        reps=args.bootstrap, seed=args.seed, check=not args.no_check, data_dir=data_dir,
                        base_row=not args.baselines_only, memory_baselines=memories,
                        memory_reread=args.memory_reread, memory_fill=args.memory_fill,
                        memory_prefill=args.memory_prefill, progress=say)
        meta = run_metadata(**{**common, "model_info": {**info, "base": base or info.get("base")}})
        record = {"meta": meta, **body}
        md = long_markdown(record)
        print(md)
        if args.out:
            write_record(args.out, "long", record, md)
            plot_bpb(record, f"{args.out}/long_bpb.png")
            plot_retrieval(record, f"{args.out}/long_retrieval.png")

    if "attribution" in what and not is_converted(model):
        torch.manual_seed(args.seed)
        convert(model, HybridConfig() if window is None else HybridConfig(window=window))
        info = {**info, "kind": "converted_untrained", "hybrid": hybrid_config_of(model).to_dict()}

    if "attribution" in what:
        from linearize.evaluate.attribution import attribution, attribution_markdown, plot_attribution

        result = attribution(model, tokenizer, source=args.attr_source, num_seqs=args.attr_seqs, seq_len=args.attr_len,
                             per_head_loss=args.per_head_loss, progress=say)
        meta = run_metadata(**{**common, "model_info": info})
        record = {"meta": meta, **result}
        md = attribution_markdown(record)
        print(md)
        if args.out:
            write_record(args.out, "attribution", record, md)
            plot_attribution(result, f"{args.out}/attribution.png", title=f"{spec}")
    say(f"[diagnose] total {time.perf_counter() - t0:.0f} s")
    return 0
