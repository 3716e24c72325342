"""`linearize diagnose --model M [--limit N]`: which branch earns the score (paper Table 1, attribution, probes)."""

from __future__ import annotations

import sys
import time

from linearize.commands.eval import add_bench_args, add_model_args, model_spec, parse_batch, parse_limit, torch_dtype

WHAT = ("benchmarks", "attribution", "probes")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose", help="benchmarks under the five component modes (Table 1), attribution, long-context probes",
        description="Run the benchmarks with each component mode of a converted model alone (hybrid, swa_only, "
                    "la_only, sinks_only, none) and on its base model, and write a Table-1-style table with the "
                    "recovery of the base score and the recovery above the no-attention floor, plus the prompt "
                    "lengths against the window. A base model is converted first with an untrained feature map. "
                    "--what adds the per-layer/head attribution and the long-context probes.")
    add_model_args(p)
    add_bench_args(p)
    p.set_defaults(tasks="piqa,arc_easy,arc_challenge,hellaswag,winogrande,mmlu")
    p.add_argument("--base", default=None, help="base model to compare with (default: recorded in the converted "
                                                 "directory's summary.json, or the model itself when it is a base model)")
    p.add_argument("--no-base", action="store_true", help="skip the base-model run")
    p.add_argument("--modes", default="hybrid,swa_only,la_only,sinks_only,none", help="component modes to run")
    p.add_argument("--what", default="benchmarks",
                   help="comma-separated: benchmarks, attribution, probes (default: benchmarks)")
    g = p.add_argument_group("attribution")
    g.add_argument("--attr-source", default="wikitext2_test", help="held-out text source (linearize.train.data)")
    g.add_argument("--attr-seqs", type=int, default=4, help="sequences of held-out text")
    g.add_argument("--attr-len", type=int, default=512, help="tokens per sequence")
    g.add_argument("--per-head-loss", action="store_true", help="also switch branches per head (slow)")
    g = p.add_argument_group("probes")
    g.add_argument("--docs", type=int, default=2, help="long documents for the per-position loss")
    g.add_argument("--doc-len", type=int, default=2048, help="tokens per long document")
    g.add_argument("--contexts", default="512,1024,2048,4096", help="passkey context lengths")
    g.add_argument("--trials", type=int, default=4, help="passkey trials per context length")
    g.add_argument("--probe-modes", default="hybrid,swa_only", help="component modes for the probes")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import linearize
    from linearize.errors import LinearizeError
    from linearize.evaluate.harness import default_data_dir
    from linearize.evaluate.lm_eval_model import load_model
    from linearize.evaluate.report import run_metadata, write_record

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
    records = {}

    model, tokenizer, info = load_model(spec, device=args.device, dtype=torch_dtype(args.dtype, args.device),
                                        check=not args.no_check, seed=args.seed)
    common = dict(model_info=info, data_dir=data_dir, device=str(model.device), seed=args.seed)

    if "benchmarks" in what:
        from linearize.evaluate.diagnose import diagnose, diagnose_markdown

        base = False if args.no_base else args.base
        result = diagnose(model, tokenizer, tasks=tasks, limit=parse_limit(args.limit), modes=modes, base=base,
                          window=window, batch_size=parse_batch(args.batch_size), data_dir=data_dir, seed=args.seed,
                          bootstrap=args.bootstrap, max_length=args.max_length, check=not args.no_check, progress=say)
        info = {**info, **{k: v for k, v in result["info"].items() if v is not None}, "model": spec}
        meta = run_metadata(**{**common, "model_info": info}, tasks=tasks, limit=args.limit, modes=modes)
        record = {"meta": meta, **result}
        md = diagnose_markdown(record)
        records["diagnose"] = (record, md)
        print(md)
        if args.out:
            write_record(args.out, "diagnose", record, md)

    if "probes" in what:
        from linearize.evaluate.probes import plot_position_loss, probes_markdown, run_probes

        was_converted = linearize.is_converted(model)
        base = None if args.no_base else (args.base or info.get("base"))
        body = run_probes(model, tokenizer, base=base, modes=[m.strip() for m in args.probe_modes.split(",") if m.strip()],
                          window=window, docs=args.docs, doc_len=args.doc_len, contexts=args.contexts.split(","),
                          trials=args.trials, seed=args.seed, check=not args.no_check, progress=say)
        if not was_converted:  # run_probes probed the base, then converted it untrained
            info = {**info, "kind": "converted_untrained", "hybrid": linearize.hybrid_config_of(model).to_dict()}
        meta = run_metadata(**{**common, "model_info": info}, docs=args.docs, doc_len=args.doc_len)
        record = {"meta": meta, **body}
        md = probes_markdown(record)
        print(md)
        if args.out:
            write_record(args.out, "probes", record, md)
            plot_position_loss(body["position_loss"], f"{args.out}/position_loss.png", title=f"{spec}: per-position loss")

    if "attribution" in what and not linearize.is_converted(model):
        torch.manual_seed(args.seed)
        linearize.convert(model, linearize.HybridConfig() if window is None else linearize.HybridConfig(window=window))
        info = {**info, "kind": "converted_untrained", "hybrid": linearize.hybrid_config_of(model).to_dict()}

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
