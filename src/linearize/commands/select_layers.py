"""`linearize select-layers MODEL --keep K --out DIR`: which layers to keep as full softmax, by measurement."""

from __future__ import annotations

import sys

from linearize.config import HybridConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "select-layers", help="rank a base model's full-attention layers by the loss their window+sinks cut costs",
        description="Cut each full-attention layer of a base model alone to the training-free window + sinks (what a "
                    "conversion starts from) and measure the mean next-token loss on a few long-document rows. "
                    "Writes layer_selection.json, layer_selection.md and layer_selection.png to --out and prints the "
                    "--set hybrid.layers=[...] that keeps the --keep most sensitive layers as full softmax "
                    "(a conversion with hybrid.layers=measured:K measures the same by itself).")
    p.add_argument("model", help="base model: short name (gemma3-270m, smollm2-135m), HF directory or .gguf file")
    p.add_argument("--keep", type=int, default=None, help="full-attention layers to keep as full softmax "
                                                          "(default: only rank them)")
    p.add_argument("--window", type=int, default=HybridConfig.window,
                   help=f"window of the cut (default {HybridConfig.window}: a conversion's default hybrid.window)")
    p.add_argument("--sinks", type=int, default=HybridConfig.softmax_sinks,
                   help=f"sinks of the cut (default {HybridConfig.softmax_sinks}: hybrid.softmax_sinks)")
    p.add_argument("--rows", type=int, default=4, help="long-document rows measured on (default 4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="which long documents are drawn (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--data-dir", default=None, help="data directory holding longdocs/ (default: the shared data)")
    p.add_argument("--out", required=True, help="output directory for the record, table and plot")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from linearize.documents import long_documents_path
    from linearize.errors import LinearizeError
    from linearize.models import layer_select
    from linearize.models.loading import checked_source, load_base
    from linearize.records import run_metadata, write_record

    if args.window < 1 or args.sinks < 0 or args.rows < 1 or args.batch_size < 1:
        raise LinearizeError("select-layers: need --window >= 1, --sinks >= 0, --rows >= 1 and --batch-size >= 1")
    if args.seq_len <= args.window + args.sinks:
        raise LinearizeError(f"select-layers: --seq-len {args.seq_len} must exceed --window {args.window} + --sinks "
                             f"{args.sinks}, or no cut changes anything")
    if args.keep is not None and args.keep < 0:
        raise LinearizeError(f"select-layers: --keep must be >= 0, got {args.keep}")
    checked_source(args.model)
    long_documents_path(args.data_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_base(args.model, dtype=getattr(torch, args.dtype), device=device, check=False)
    if args.keep is not None:
        layer_select.check_keep(model, args.keep)  # before anything is measured or written
    record = layer_select.select_layers(model, tokenizer, args.keep, window=args.window, sinks=args.sinks,
                                        num_rows=args.rows, seq_len=args.seq_len, seed=args.seed,
                                        data_dir=args.data_dir, batch_size=args.batch_size)
    record["meta"] = run_metadata(device=device, seed=args.seed, data_dir=args.data_dir, model=str(args.model))
    json_path, md_path = write_record(args.out, layer_select.RECORD_KIND, record,
                                      layer_select.selection_markdown(record, f"Layer selection: {args.model}"))
    plot = layer_select.plot_selection(record, json_path.with_suffix(".png"))
    print(f"base loss {record['base_loss']:.4f} nats/token; layers by loss increase when cut to window "
          f"{args.window} + sinks {args.sinks}:")
    by_layer = {e["layer"]: e for e in record["layers"]}
    for i in record["ranking"]:
        print(f"  layer {i:3d}  {by_layer[i]['delta']:+.4f}")
    if args.keep is not None:
        print(f"keep {record['kept']} as full softmax, convert {record['convert']}:")
        print(f"  --set hybrid.layers={layer_select.layers_setting(record['convert'])}")
    else:
        print("pass --keep K to choose the layers to convert", file=sys.stderr)
    print(f"wrote {json_path}, {md_path}, {plot}")
    return 0
