"""Rebuild a results JSON from the console log of a `bench_attention.py` run (for a run whose JSON stayed on the
device machine).  Times come at the log's printed precision (3 decimals of ms); ratios and useful TFLOP/s are
recomputed with the library's own functions; the JSON says it was reconstructed.

    python benchmarks/reconstruct_from_log.py LOG OUT.json
"""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from linearize.bench.kernels import HEAD_CONFIGS, decode_ratios, layer_ratios, useful_flops  # noqa: E402

LAYER = re.compile(r"^(\S+)\s+T=\s*(\d+)\s+(\w+)\s+fwd\s+([\d.]+) ms\s+fwd\+bwd\s+([\d.]+) ms\s+peak\s+([\d.]+) MiB")
LAYER_ERR = re.compile(r"^(\S+)\s+T=\s*(\d+)\s+(\w+)\s+(OOM|ERROR.*)$")
DECODE = re.compile(r"^decode (\w+)\s+B=\s*(\d+) ctx=\s*(\d+):\s+([\d.]+) tok/s\s+([\d.]+) ms/step\s+cache\s+([\d.]+) MiB")
DECODE_MD = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$")
HEADER = re.compile(r"Device: \*\*(.+?)\*\*, torch (\S+), triton (\S+), fla (\S+), commit `(\w+)`; command `(.+)`\.")


def parse(text: str, window: int = 64) -> dict:
    res = {"layer": [], "decode": []}
    per_seq = {}
    for line in text.splitlines():
        if m := LAYER.match(line):
            cname, t, impl, f, fb, peak = m.groups()
            t, f, fb = int(t), float(f), float(fb)
            cfg = HEAD_CONFIGS[cname]
            flops = useful_flops(impl, cfg, t, window)
            res["layer"].append(dict(config=cname, T=t, impl=impl, **cfg, fwd_ms=f, fwd_bwd_ms=fb, peak_mib=float(peak),
                                     fwd_tflops=flops / (f * 1e-3) / 1e12, fwd_bwd_tflops=3 * flops / (fb * 1e-3) / 1e12))
        elif m := LAYER_ERR.match(line):
            cname, t, impl, err = m.groups()
            res["layer"].append(dict(config=cname, T=int(t), impl=impl, **HEAD_CONFIGS[cname],
                                     error="out of memory" if err == "OOM" else err))
        elif m := DECODE.match(line):
            kind, b, ctx, tps, ms, mib = m.groups()
            res["decode"].append(dict(kind=kind, batch=int(b), context=int(ctx), tokens_per_s=float(tps),
                                      ms_per_step=float(ms), cache_bytes=float(mib) * 2**20,
                                      cache_bytes_per_seq=float(mib) * 2**20 / int(b)))
        elif m := DECODE_MD.match(line):
            per_seq[(m.group(1), int(m.group(2)), int(m.group(3)))] = float(m.group(7)) * 2**20
        elif m := HEADER.search(line):
            dev, torch_v, triton_v, fla_v, commit, cmd = m.groups()
            res["environment"] = dict(device=dev, torch=torch_v, triton=triton_v, fla=fla_v, git_commit=commit, command=cmd)
        elif line.startswith("bf16 matmul peak:"):
            res["matmul_peak_tflops"] = float(line.split(":")[1].split()[0])
        elif line.startswith("Largest batch the base model fits"):
            res["decode_largest_base_batch"] = int(re.search(r"\*\*(\d+)\*\*", line).group(1))
    for r in res["decode"]:
        key = (r["kind"], r["batch"], r["context"])
        if key in per_seq:
            r["cache_bytes_per_seq"] = per_seq[key]
    res["layer_ratios"] = layer_ratios(res["layer"])
    if res["decode"]:
        res["decode_ratios"] = decode_ratios(res["decode"], res.get("decode_largest_base_batch"),
                                             max(r["context"] for r in res["decode"]))
    res["reconstructed_from_log"] = True
    return res


def main():
    log, out = Path(sys.argv[1]), Path(sys.argv[2])
    res = parse(log.read_text())
    full = res["environment"]["git_commit"]
    if m := re.search(r"--commit (\w+)", res["environment"]["command"]):
        full = m.group(1)
    res["environment"]["git_commit"] = full
    res["note"] = ("Reconstructed from the run's console log: the run wrote its JSON inside the device machine's working "
                   "tree (no --out-dir), which did not come back. Numbers are the printed values.")
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}: {len(res['layer'])} layer rows, {len(res['decode'])} decode rows")


if __name__ == "__main__":
    main()
