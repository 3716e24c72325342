"""Per-kernel report of the Triton hybrid layer: registers, spills, shared memory, and CUDA time per kernel
(torch profiler) for one forward+backward at the given lengths.

    python benchmarks/kernel_report.py [--lengths 32768] [--configs gemma3-270m,llama]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from linearize.attention.triton import _kernels as K  # noqa: E402
from linearize.attention.spec import AttentionSpec  # noqa: E402
from linearize.attention.triton import hybrid_attention_triton  # noqa: E402
from linearize.bench.kernels import HEAD_CONFIGS, make_inputs  # noqa: E402


def compiled_report():
    for name in ("la_state_fwd_kernel", "hybrid_fwd_kernel", "hybrid_bwd_q_kernel", "la_state_bwd_kernel",
                 "hybrid_bwd_kv_kernel", "hybrid_decode_kernel"):
        fn = getattr(K, name)
        caches = getattr(fn, "device_caches", None) or {}
        for dev, entry in caches.items():
            kernels = entry[0] if isinstance(entry, tuple) else entry
            for key, ck in getattr(kernels, "items", lambda: [])():
                meta = getattr(ck, "metadata", None)
                print(f"{name:22s} regs={getattr(ck, 'n_regs', '?'):>4} spills={getattr(ck, 'n_spills', '?'):>5} "
                      f"shared={getattr(meta, 'shared', '?')} warps={getattr(meta, 'num_warps', '?')} "
                      f"stages={getattr(meta, 'num_stages', '?')}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="2048,32768")
    p.add_argument("--configs", default="gemma3-270m,llama")
    a = p.parse_args()
    for cname in a.configs.split(","):
        cfg = HEAD_CONFIGS[cname]
        for t in [int(x) for x in a.lengths.split(",")]:
            q, k, v, qf, kf = [x.requires_grad_() for x in make_inputs(cfg, t)]
            w = torch.full((cfg["hq"],), 0.1, device="cuda")
            spec = AttentionSpec(scale=cfg["d"] ** -0.5, window=64)

            def step():
                out = hybrid_attention_triton(q, k, v, qf, kf, spec=spec, weight=w)
                out.backward(torch.ones_like(out))

            step()
            torch.cuda.synchronize()
            import time

            for label, fn in (("forward", lambda: hybrid_attention_triton(q, k, v, qf, kf, spec=spec, weight=w)),
                              ("forward+backward", step)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    fn()
                t_issue = (time.perf_counter() - t0) / 10
                torch.cuda.synchronize()
                t_all = (time.perf_counter() - t0) / 10
                print(f"{cname} T={t} {label}: host issue {t_issue * 1e6:.0f} us/call, issue+finish {t_all * 1e6:.0f} us/call")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(f"\n== {cname} T={t}: CUDA time per kernel over 3 forward+backward ==")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print("\n== compiled kernels ==")
    compiled_report()


if __name__ == "__main__":
    main()
