"""Where one 2k fwd+bwd of the hybrid layer spends its time, eager and compiled, beside SDPA (issue 21): median time
per step, then the torch profiler's tables by host (self CPU) and by GPU time (self CUDA) over 10 steps.

    python benchmarks/profile_compiled.py > profile.log      (CUDA GPU; Gemma 3 270M heads, window 64)

Measured (H200, a65d9d2; benchmarks/results/speed/logs/profile2k_a65d9d2.log): the compiled layer's step replays
its CUDA graphs in ~0.30 ms of GPU time but spends ~0.9 ms on the host (graph-tree launch, input copies, the autograd
engine), so a single layer at 2k measures that fixed cost; `linearize bench --stack N` chains N layers in one step.
"""
import torch
from torch.profiler import ProfilerActivity, profile

from linearize.bench.kernels import (HEAD_CONFIGS, impl_sdpa, impl_sdpa_compiled, impl_triton, impl_triton_compiled,
                                     make_inputs)
from linearize.bench.timing import time_cuda

cfg = HEAD_CONFIGS["gemma3-270m"]
t, window = 2048, 64
scale = cfg["d"] ** -0.5
weight = torch.full((cfg["hq"],), 0.1, device="cuda")
inputs = make_inputs(cfg, t)
for name, impl in (("sdpa", impl_sdpa(cfg, t, window, scale)), ("sdpa_compiled", impl_sdpa_compiled(cfg, t, window, scale)),
                   ("triton", impl_triton(cfg, t, window, scale, weight)),
                   ("triton_compiled", impl_triton_compiled(cfg, t, window, scale, weight))):
    args = [x.detach().requires_grad_(i in impl.grads) for i, x in enumerate(inputs)]
    go = torch.randn_like(inputs[0])

    def step():
        for a in args:
            a.grad = None
        impl.fn(*args).backward(go)

    for _ in range(5):  # compile, autotune, record the graphs
        step()
    torch.cuda.synchronize()
    ms = time_cuda(step, budget_s=0.5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"===== {name}: {ms:.3f} ms per fwd+bwd", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70), flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=70), flush=True)
