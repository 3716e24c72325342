"""Where one conversion stage's training step spends its time (issue 21: on Qwen2.5-Coder-1.5B at 8k-token rows the
long-context recipe's stage 1 ran at 2.9k tokens/s and stage 2 at 3.7k, 9.9x and 7.8x the cost of the base's own
LoRA step; a forward of the converted model costs only 2.5x the base's).

`linearize bench --conversion`'s measurement (`bench.throughput.measure`) with the first timed step of one stage
run under the torch profiler: its kernels by GPU time, its host operators by CPU time, kernel launches, and the GPU's
busy time against the step's wall time (a step far from busy waits on the host: launch-bound).

    PYTHONPATH=$PWD/src python benchmarks/profile_conversion.py OUT --model M --recipes R [--stage stage1]
        [--seq-len 8192] [--set KEY=VALUE ...] [--steps 2]

Writes OUT/profile_conversion_<stage>.json and .md (commit, device, command, every table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from linearize.attention.module import HybridAttention
from linearize.bench import throughput
from linearize.train import loop


def profiled_train_row(stage: str, store: dict):
    """bench.throughput._train_row, with the first timed step of `stage`'s row run under the profiler (one step: a
    profile of every step of an 8k-row stage took longer to summarise than the GPU call had left)."""
    real = throughput._train_row

    def row(model, name, *args, **kwargs):
        # the base LoRA anchor is timed under the name 'stage2' too: profile the converted model's row
        if name != stage or "prof" in store or not any(isinstance(m, HybridAttention) for m in model.modules()):
            return real(model, name, *args, **kwargs)
        step = loop.Trainer.train_step
        first_timed = kwargs["warmup"]

        def train_step(self, i):
            if i != first_timed or "prof" in store:
                return step(self, i)
            activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available()
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                out = step(self, i)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            store.update(prof=prof, wall_s=time.perf_counter() - t0, model=model)
            return out

        loop.Trainer.train_step = train_step
        try:
            return real(model, name, *args, **kwargs)
        finally:
            loop.Trainer.train_step = step

    return row


#: host-side names of a kernel launch (runtime and driver APIs)
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def tables(prof, wall_s: float) -> dict:
    """One step: the 20 longest kernels and host operators, kernel launches, GPU busy time against the wall."""
    events = prof.key_averages()
    kernels = [e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    host = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return dict(
        wall_ms=wall_s * 1e3, gpu_busy_ms=sum(e.self_device_time_total for e in kernels) / 1e3,
        kernel_launches=sum(e.count for e in events if e.key in LAUNCHES),
        kernels=[dict(name=e.key, ms=e.self_device_time_total / 1e3, calls=e.count)
                 for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:20]],
        host_ops=[dict(name=e.key, ms=e.self_cpu_time_total / 1e3, calls=e.count) for e in host[:20]])


def render(res: dict) -> str:
    t = res["profile"]
    lines = [f"Device **{res['device']}**, commit `{res['commit']}`, command `{res['command']}`.", "",
             f"{res['stage']}: one profiled step {t['wall_ms']:.0f} ms, the GPU busy {t['gpu_busy_ms']:.0f} ms of it, "
             f"{t['kernel_launches']} kernel launches; the row as measured: {res['row'].get('tokens_per_s', 0):.0f} "
             f"tokens/s.", ""]
    for title, key in (("Kernels by GPU time", "kernels"), ("Host operators by self CPU time", "host_ops")):
        lines += [f"### {title} (one step)", "", "| name | ms | calls |", "|---|---|---|"]
        lines += [f"| `{r['name'][:100]}` | {r['ms']:.2f} | {r['calls']:.0f} |" for r in t[key]] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", required=True, help="a .gguf, HF directory, short name or shape:<decode shape>")
    ap.add_argument("--recipes", required=True, help="one recipe name or recipe.yaml")
    ap.add_argument("--stage", default="stage1", choices=("stage1", "stage2"))
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    store: dict = {}
    throughput._train_row = profiled_train_row(args.stage, store)
    other = "stage2" if args.stage == "stage1" else "stage1"
    res = throughput.measure(args.model, (args.recipes,), overrides=[*args.overrides, f"{other}.enabled=false"],
                             steps=args.steps, warmup=args.warmup, seq_len=args.seq_len, batch_size=args.batch_size)
    if "prof" not in store:
        raise SystemExit(f"no {args.stage} row was measured: {[r.get('error') for r in res['rows']]}")
    row = next(r for r in res["rows"] if r["stage"] == args.stage)
    out = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               commit=os.environ.get("LINEARIZE_COMMIT"), command="python benchmarks/profile_conversion.py "
               + " ".join(sys.argv[1:]), stage=args.stage, row={k: v for k, v in row.items() if k != "step_seconds"},
               rows=[{k: r.get(k) for k in ("stage", "what", "tokens_per_s", "cost_vs_base_lora", "error")}
                     for r in res["rows"]],
               profile=tables(store["prof"], store["wall_s"]))
    base = os.path.join(args.out, f"profile_conversion_{args.stage}")
    with open(base + ".json", "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    with open(base + ".md", "w") as fh:
        fh.write(render(out) + "\n")
    print(render(out))


if __name__ == "__main__":
    main()
