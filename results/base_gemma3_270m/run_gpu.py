"""Full six-task suite for the base Gemma 3 270M on a GPU (the issue-5 acceptance run).

Run from the repo root with the device bundle restored (see ../shared/tools/device-bundle):
    LINEARIZE_DATA=/tmp/linearize/data PYTHONPATH=/tmp/linearize/site:src \
        python3 results/base_gemma3_270m/run_gpu.py MODEL OUT_DIR [dtype] [batch_size] [tasks]
Loads the model once and runs the benchmarks one at a time, writing each one's report as soon as it
is done (so a run cut short keeps what finished), then eval.json + eval.md with the metadata.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

import linearize
from linearize.evaluate.diagnose import _merge
from linearize.evaluate.harness import default_data_dir, evaluate
from linearize.evaluate.report import eval_markdown, run_metadata, write_record

model_path, out = sys.argv[1], Path(sys.argv[2])
dtype = sys.argv[3] if len(sys.argv) > 3 else "bfloat16"
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64
tasks = sys.argv[5].split(",") if len(sys.argv) > 5 else ["piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "mmlu"]
limit = int(os.environ["LIMIT"]) if os.environ.get("LIMIT") else None  # smoke runs only
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
model, tok = linearize.load_base(model_path, dtype=getattr(torch, dtype), device=os.environ.get("DEVICE", "cuda"))
load_s = time.perf_counter() - t0
print(f"loaded in {load_s:.0f} s", flush=True)
reports, seconds = [], {}
for task in tasks:
    t = time.perf_counter()
    rep = evaluate(model, tok, [task], limit=limit, batch_size=batch, seed=1234, bootstrap=1000)
    seconds[task] = time.perf_counter() - t
    reports.append(rep)
    e = rep[task]
    m = e["headline_metric"]
    print(f"{task}: {m} {100 * e[m]:.2f} [{100 * e[m + '_ci95'][0]:.2f}, {100 * e[m + '_ci95'][1]:.2f}] n={e['n']} ({seconds[task]:.0f} s)", flush=True)
    (out / f"{task}.json").write_text(json.dumps(rep, indent=1))
merged = _merge(reports)
meta = run_metadata(model_info={"model": "gemma3-270m (Q4_K_M GGUF, dequantized)", "kind": "base", "base": "gemma3-270m"},
                    data_dir=default_data_dir(), device=str(model.device), seed=1234, tasks=tasks, limit=limit, batch_size=batch,
                    dtype=dtype, load_seconds=load_s, eval_seconds=seconds, wall_seconds=time.perf_counter() - t0,
                    argv=["python3", *sys.argv])
record = {"meta": meta, "runs": {"base": merged}}
write_record(out, "eval", record, eval_markdown(record))
print(eval_markdown(record))
