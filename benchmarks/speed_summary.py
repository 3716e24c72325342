"""The speed results of one `scripts/gpu_speed.sh` run in one place: OUT/speed.json and OUT/speed.md.

Reads what the run wrote in OUT (speed_layer.json, speed_decode.json, speed_conversion.json, generate_speed.json,
logs/gpu_tests.log), takes each goal's measured ratio from those rows (nothing here is measured or typed in), and
writes the goals table followed by every results table. A file the run did not write shows as 'not measured'.

    python benchmarks/speed_summary.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from linearize.bench.decode import fair_ratios, largest_batch_ratios, render_fair_markdown  # noqa: E402
from linearize.bench.kernels import render_markdown as render_layer  # noqa: E402
from linearize.bench.throughput import render_markdown as render_conversion  # noqa: E402


def _load(out: Path, name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def _compiled_tokens(generate: dict) -> str:
    """The compiled generation's tokens against eager (runs from before these fields name none)."""
    if "compiled_tokens_as_eager" not in generate:
        return ""
    return (f", the first {generate['compiled_tokens_as_eager']} of {generate['new_tokens']}; same as HF's loop with the "
            f"same modules compiled: {generate['compiled_equals_compiled_eager']}")


def _largest(ratios, shape, ctx):
    """The ratio row of `shape` at context `ctx` with the largest batch."""
    rows = [e for e in ratios if e["shape"] == shape and e["context"] == ctx]
    return max(rows, key=lambda e: e["batch"]) if rows else None


def goals(layer, decode, conversion, generate) -> list[dict]:
    """[{goal, measured, met}] from the rows; measured None where the run did not produce the row."""
    out = []

    def add(goal, value, fmt, ok):
        out.append(dict(goal=goal, measured=None if value is None else fmt(value), met=None if value is None else ok(value)))

    # derived again from the rows (a file written before a ratio existed gets it; the rows are what was measured)
    ratios = fair_ratios((decode or {}).get("decode_fair", {}).get("rows", []))
    for ctx, need in ((32768, 6.0), (131072, 10.0)):
        e = _largest(ratios, "gemma3-270m", ctx)
        add(f"decode, Gemma shape, {ctx // 1024}k, largest base batch: converted (the default step) / captured "
            f"static-cache base >= {need:g}x",
            e and (e["default_speedup_vs_static_graph_base"], e["batch"], e["default_fold_every"]),
            lambda v: f"{v[0]:.2f}x (batch {v[1]}, F={v[2]})", lambda v, need=need: v[0] >= need)
    # the other reading of "largest batch": the same GPU filled by each model (its state does not grow with context)
    full = {(e["shape"], e["context"]): e for e in largest_batch_ratios((decode or {}).get("decode_fair", {}).get("rows", []))}
    for ctx, need in ((32768, 6.0), (131072, 10.0)):
        e = full.get(("gemma3-270m", ctx))
        add(f"decode, Gemma shape, {ctx // 1024}k, each model at the largest batch it fits on the GPU, both compiled: "
            f"converted (the default step) / base tokens/s >= {need:g}x",
            e and (e["default_throughput_vs_compiled_base"], e["batch"], e["base_batch"], e["default_fold_every"]),
            lambda v: f"{v[0]:.2f}x (batch {v[1]} against {v[2]}, F={v[3]})", lambda v, need=need: v[0] >= need)
    e = full.get(("gemma3-270m", 32768))
    add("decode, Gemma shape, 32k, the converted step (the default, compiled) at the largest batch it fits: >= 60% of "
        "its memory floor", e and (e["default_floor_fraction"], e["default_fold_every"], e["floor_fraction"]),
        lambda v: f"{100 * v[0]:.0f}% (F={v[1]}; F=1: {100 * v[2]:.0f}%)", lambda v: v[0] >= 0.6)
    e = _largest(ratios, "gemma3-270m", 32768)
    add("decode, Gemma shape, 32k, largest batch: the converted step (the default) >= 60% of its memory floor",
        e and (e["default_floor_fraction"], e["default_fold_every"]), lambda v: f"{100 * v[0]:.0f}% (F={v[1]})",
        lambda v: v[0] >= 0.6)
    # reported beside the goals, per context at the largest base batch: what, the ratio keys shown, how
    reported = [
        ("both with norms and MLPs compiled into the captured step: converted / base, floor %",
         ("compiled_speedup_vs_compiled_base", "compiled_floor_fraction", "batch"),
         lambda v: f"{v[0]:.2f}x, {100 * v[1]:.0f}% of its floor (batch {v[2]})"),
        ("the bounds with the step outside attention as measured: attention kernels at their floor (state-read "
         "bound), attention free (floor % bound)", ("state_read_bound_speedup", "floor_fraction_bound"),
         lambda v: f"{v[0]:.1f}x, {100 * v[1]:.0f}% of the floor"),
        ("both compiled, the converted step with the deferred fold (F=16) too: converted / compiled base, floor %",
         ("compiled_fold16_speedup_vs_compiled_base", "compiled_fold16_floor_fraction", "batch"),
         lambda v: f"{v[0]:.2f}x, {100 * v[1]:.0f}% of its floor (batch {v[2]})"),
        ("the deferred fold (F=16; the default at >= 2 programs per SM): converted / captured base, floor %",
         ("fold16_speedup_vs_static_graph_base", "fold16_floor_fraction", "batch"),
         lambda v: f"{v[0]:.2f}x, {100 * v[1]:.0f}% of its floor (batch {v[2]})"),
        ("the ceiling of any attention speed-up: the base's step outside attention (a 16-token context), ceiling",
         ("outside_attention_ms", "ceiling_speedup_vs_static_graph_base"), lambda v: f"{v[0]:.2f} ms, ceiling {v[1]:.1f}x"),
    ]
    for what, keys, fmt in reported:
        for ctx in (32768, 131072):
            row = _largest(ratios, "gemma3-270m", ctx)
            add(f"decode, Gemma shape, {ctx // 1024}k, largest base batch, {what} (reported)",
                tuple(row[k] for k in keys) if row and keys[0] in row else None, fmt, lambda v: None)
    add("decode, the fused step over the unfused one, Gemma shape, 32k, largest batch (reported)",
        e and e.get("fused_speedup_over_unfused") and (e["fused_speedup_over_unfused"], e["unfused_floor_fraction"]),
        lambda v: f"{v[0]:.2f}x (unfused: {100 * v[1]:.0f}% of its floor)", lambda v: None)
    for ctx in (32768, 131072):
        e = _largest(ratios, "llama3-8b", ctx)
        add(f"decode, Llama-3-8B shape, {ctx // 1024}k, largest base batch: converted / captured base (reported)",
            e and (e["speedup_vs_static_graph_base"], e["batch"]), lambda v: f"{v[0]:.2f}x (batch {v[1]})", lambda v: None)
    add("batch-1 generate() of the converted Gemma shape >= 150 tokens/s (captured step, the default)",
        generate and generate["captured_tokens_per_s"], lambda v: f"{v:.0f} tok/s (eager {generate['eager_tokens_per_s']:.0f})",
        lambda v: v >= 150)
    add("batch-1 generate(), the captured step with norms and MLPs compiled into it (LINEARIZE_COMPILED_STEP=1; reported)",
        generate and generate.get("compiled_tokens_per_s"),
        lambda v: f"{v:.0f} tok/s ({generate['compiled_over_captured']:.2f}x the captured step; same tokens as eager: "
                  f"{generate['compiled_equals_eager']}{_compiled_tokens(generate)})", lambda v: None)
    lr = {(e["config"], e["T"]): e for e in (layer or {}).get("layer_ratios", [])}
    for cfg in ("gemma3-270m", "llama"):
        e = lr.get((cfg, 2048), {}).get("triton_compiled_over_sdpa_fwd_bwd")
        add(f"{cfg}, 2k fwd+bwd, compiled layer <= 1.2x eager SDPA", e, lambda v: f"{v:.2f}x", lambda v: v <= 1.2)
        e = lr.get((cfg, 32768), {}).get("triton_compiled_over_sdpa_fwd_bwd")
        add(f"{cfg}, 32k fwd+bwd, eager SDPA / compiled layer >= 6x", e and 1 / e, lambda v: f"{v:.2f}x", lambda v: v >= 6)
    stage2 = [row for row in (conversion or {}).get("rows", []) if row["stage"] == "stage2" and "cost_vs_base_lora" in row]
    for row in stage2:
        add(f"conversion, stage 2 ({row['what']}, {', '.join(row['recipes'])}) / base LoRA step <= 1.25x",
            row["cost_vs_base_lora"], lambda v: f"{v:.2f}x", lambda v: v <= 1.25)
    if not stage2:
        add("conversion, stage 2 / base LoRA step <= 1.25x", None, str, bool)
    return out


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    layer, decode = _load(out, "speed_layer.json"), _load(out, "speed_decode.json")
    # generate: scripts/gpu_speed.sh's name, or the converted Gemma's file written by generate_speed.py by hand
    conversion = _load(out, "speed_conversion.json")
    generate = _load(out, "generate_speed.json") or _load(out, "generate_speed_gemma3-270m.json")
    first = next((r for r in (layer, decode, conversion, generate) if r), None)
    if first is None:
        raise SystemExit(f"{out}: no results files of scripts/gpu_speed.sh")
    table = goals(layer, decode, conversion, generate)
    tests = out / "logs" / "gpu_tests.log"
    test_line = tests.read_text().strip().splitlines()[-1] if tests.is_file() and tests.read_text().strip() else "not run"
    parts = [(name, r) for name, r in (("layer", layer), ("decode", decode), ("conversion", conversion),
                                       ("generate", generate)) if r]
    # the parts may come from separate runs (a later decode run beside an earlier layer run): each keeps its commit
    commit_of = lambda r: r.get("commit") or r.get("environment", {}).get("git_commit")  # noqa: E731
    res = dict(commit=commit_of(first), device=first.get("device"),
               commits={name: commit_of(r) for name, r in parts},
               commands={name: r.get("command") for name, r in parts}, goals=table, gpu_tests=test_line)
    (out / "speed.json").write_text(json.dumps(res, indent=1))
    commits = sorted({str(c)[:12] for c in res["commits"].values() if c})
    lines = ["# Speed against what a user would run instead (issue 21)", "",
             f"Device **{res['device']}**, commit{'s' if len(commits) > 1 else ''} "
             + ", ".join(f"`{c}`" for c in commits) + ". Commands (each part's commit):", ""]
    lines += [f"- {name}" + (f" (`{str(res['commits'][name])[:12]}`)" if res["commits"][name] else "") + f": `{cmd}`"
              for name, cmd in res["commands"].items()]
    lines += ["", f"GPU tests of this issue: `{test_line}`.", "", "| goal | measured (this run) | met? |", "|---|---|---|"]
    for g in table:
        met = "—" if g["met"] is None else ("**yes**" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {g['measured'] or 'not measured'} | {met} |")
    lines.append("")
    if generate:
        lines += ["## generate()", "", f"Batch 1, {generate['new_tokens']} new tokens after a {generate['prompt_tokens']}-token "
                  f"prompt, `{generate['model']}`: captured {generate['captured_tokens_per_s']:.0f} tok/s, eager "
                  f"{generate['eager_tokens_per_s']:.0f} tok/s ({generate['speedup']:.1f}x); {generate['decode_path']}; "
                  f"same tokens: {generate['captured_equals_eager']}.", ""]
    if decode and decode.get("decode_fair"):
        fair = dict(decode["decode_fair"], ratios=fair_ratios(decode["decode_fair"]["rows"]))
        lines += ["## Decode", ""] + render_fair_markdown(fair)
    if layer:
        lines += ["## Layer", "", render_layer(layer), ""]
    if conversion:
        lines += ["## Conversion throughput", "", render_conversion(conversion)]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
