"""Per-position reading of held-out long documents by finished conversions (scripts/cpu_distill_pilot.sh's on the
CPU, a GPU run's with --device cuda) and by their base: each run in `hybrid`, `swa_only` (the window + sinks alone: this component mode leaves out the memory too) and
`readout_off` (the hybrid with its gate pushed to the softmax branch, mix_shift 30: window + sinks + memory; for a run
without LoRA exactly the untrained base with that memory), the base model alone,
on the first long documents (../shared/data, not among the training sources) at a length beyond the training rows.
The next-token loss is averaged per document within bands of positions -- inside window + sinks + memory (read
exactly by the softmax branch of a conversion without LoRA), up to the training length, beyond it -- and compared in
pairs over the documents (95% bootstrap intervals): each variant against the base, and hybrid against swa_only and
against readout_off (does the linear branch earn its bytes over the memory alone?). `--merge` adds the variants of an
earlier record of the same documents (not computed again).

    python scripts/reading_eval.py --runs OUT/lm-lora OUT/kl-maps ... --model smollm2-135m --out RESULTS_DIR
    python scripts/reading_eval.py --runs OUT/runs/delta-all-kl-g09 --model QWEN.gguf --seq-len 8192 --device cuda --out DIR

Writes RESULTS_DIR/reading.json (commit, device, command, each document's band means per variant, the pairs) and
RESULTS_DIR/reading.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import linearize
from linearize.evaluate.lm_eval_model import load_model
from linearize.evaluate.long_score import bootstrap
from linearize.evaluate.probes import long_document_batch, position_losses
from linearize.records import run_metadata, write_json_with_provenance
from linearize.train.recipes import load_recipe


def band_means(loss: torch.Tensor, edges: list[int]) -> dict[str, list[float]]:
    """(docs, T-1) losses -> {"a-b": per-document mean over positions a..b-1}."""
    return {f"{a}-{b}": loss[:, a:b].mean(1).tolist() for a, b in zip(edges, edges[1:]) if b > a}


def position_edges(exact: int, train_len: int, seq_len: int) -> list[int]:
    """The bands' edges over the seq_len - 1 predicted positions: 0, window + sinks + memory, the training length,
    the end -- those inside the document (a run trained on rows as long as the documents has no band past them)."""
    return sorted({e for e in (0, exact, train_len, seq_len - 1) if e <= seq_len - 1})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="finished conversion runs")
    p.add_argument("--model", required=True, help="their base model spec")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="documents per forward pass")
    p.add_argument("--modes", default="hybrid,swa_only,readout_off", help="what to run of each run (comma-separated)")
    p.add_argument("--merge", type=Path, help="an earlier reading.json of the same documents: its variants join")
    p.add_argument("--device", default="cpu", help="where the models run (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the models' weights and activations")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"hybrid", "swa_only", "readout_off"}:
        p.error(f"--modes {args.modes!r}: expected hybrid, swa_only and / or readout_off")
    earlier = json.loads(args.merge.read_text()) if args.merge else None
    if earlier and (earlier["settings"]["docs"], earlier["settings"]["seq_len"]) != (args.docs, args.seq_len):
        p.error(f"--merge {args.merge}: another set of documents ({earlier['settings']['docs']} x "
                f"{earlier['settings']['seq_len']} tokens)")
    for run in args.runs:
        if not (run / ".linearize-complete").is_file():
            p.error(f"{run} is not a finished run")
    # the bands, from the recipes (before any model is loaded, so a --merge that cannot join fails at once): the
    # softmax branch holds every key before window + sinks + memory; the training length
    recipes = [load_recipe(str(run / "recipe.yaml")) for run in args.runs]
    cuts = {(r["hybrid"]["window"] + r["hybrid"]["softmax_sinks"] + r["hybrid"]["sparse_memory"],
             int(r["data"]["seq_len"])) for r in recipes}
    if len(cuts) > 1:
        p.error(f"the runs differ in window + sinks + memory or training length ({sorted(cuts)}): one table needs one set of bands")
    exact, train_len = cuts.pop()
    edges = position_edges(exact, train_len, args.seq_len)
    if earlier and earlier["settings"]["edges"] != edges:
        p.error(f"--merge {args.merge}: other position bands {earlier['settings']['edges']} vs {edges}")
    torch.manual_seed(0)
    base, tok, info = load_model(args.model, device=args.device, dtype=dtype)
    ids = long_document_batch(tok, num_docs=args.docs, seq_len=args.seq_len)

    def losses(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([position_losses(model, ids[i:i + args.batch]) for i in range(0, len(ids), args.batch)])

    t0 = time.perf_counter()
    per_variant = {"base": losses(base)}
    print(f"base {time.perf_counter() - t0:.0f} s", flush=True)
    for run in args.runs:
        model = linearize.load(run, device=args.device, dtype=dtype)
        hybrid = linearize.hybrid_config_of(model)
        for mode in modes:
            t1 = time.perf_counter()
            if mode == "readout_off":
                linearize.set_hybrid(model, mix_shift=hybrid.mix_shift + 30.0)
                per_variant[f"{run.name} {mode}"] = losses(model)
                linearize.set_hybrid(model, mix_shift=hybrid.mix_shift)
            else:
                with linearize.components(model, mode):
                    per_variant[f"{run.name} {mode}"] = losses(model)
            print(f"{run.name} {mode} {time.perf_counter() - t1:.0f} s", flush=True)
        del model
    bands = {name: band_means(loss, edges) for name, loss in per_variant.items()}
    if earlier:
        for name, value in earlier["per_document"].items():
            if name == "base":  # the same model on the same documents: recomputed here, must agree
                assert np.allclose(sum(value.values(), []), sum(bands["base"].values(), []), atol=1e-5), "base differs"
            bands.setdefault(name, value)
    names = sorted(bands, key=lambda n: (n != "base", n))
    pairs = [(n, "base") for n in names if n != "base"]
    for r in args.runs:
        pairs += [(f"{r.name} hybrid", f"{r.name} {m}") for m in ("swa_only", "readout_off")
                  if f"{r.name} hybrid" in bands and f"{r.name} {m}" in bands]
    table = {}
    for band in bands["base"]:
        table[band] = {"variants": {n: bootstrap(bands[n][band]) for n in names},
                       "paired": {f"{a} - {b}": bootstrap(list(np.subtract(bands[a][band], bands[b][band])))
                                  for a, b in pairs}}
    record = {"meta": run_metadata(model_info=info, device=args.device, seed=0, argv=["python", *sys.argv]),
              "settings": {"runs": [str(r) for r in args.runs], "docs": args.docs, "seq_len": args.seq_len, "dtype": args.dtype,
                           "edges": edges, "hybrid": hybrid.to_dict(), "modes": modes,
                           "merged": str(args.merge) if args.merge else None},
              "bands": table, "per_document": bands, "seconds": time.perf_counter() - t0}
    write_json_with_provenance(args.out / "reading.json", record, args.device)

    def ci(b):
        return f"{b['mean']:.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}]" if b["ci95"] else f"{b['mean']:.3f}"

    lines = [f"# Next-token loss (nats) on {args.docs} held-out long documents of {args.seq_len} tokens, by position",
             "", f"Positions below {exact} lie within window + sinks + memory; the runs trained on rows of {train_len}.",
             "", "| variant | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    lines += [f"| {n} | " + " | ".join(f"{table[b]['variants'][n]['mean']:.3f}" for b in table) + " |" for n in names]
    lines += ["", "Paired differences (mean [95% interval] over documents; below 0: the first reads better)", "",
              "| pair | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    lines += [f"| {a} - {b} | " + " | ".join(ci(table[band]["paired"][f"{a} - {b}"]) for band in table) + " |"
              for a, b in pairs]
    lines += ["", f"commit {record['meta']['commit']}, {record['meta'].get('gpu', 'CPU')}, {args.dtype}, {record['seconds']:.0f} s"]
    (args.out / "reading.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
