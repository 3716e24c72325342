"""When the linear states' flash-linear-attention kernels (`fla_forward` of 'gated' and 'delta') run, training included.

fla (0.6) refuses the backward of its gated chunk kernels -- `chunk_bwd_dqkwg` with a gate, which both kinds reach --
on Hopper GPUs with Triton >= 3.4 and < 3.7.1 (unless its tilelang kernels take the call): a Triton miscompile (fla
issue 640) whose bisection pins it to one block width of that kernel, 64 (32 and 128 give correct gradients). torch up to
2.12.0 pins Triton in that range, so on an H100 / H200 training took the chunked PyTorch sums: on Qwen2.5-1.5B at
8k-token rows a stage-1 step launched ~150k kernels and kept the GPU busy 5% of its time
(benchmarks/results/speed/h100_5cff4a1/profile_conversion/).

`usable` is the route's answer. Where fla does not refuse, the kernels run whenever fla is installed and the input is
on CUDA. Where it refuses, they run under autograd only if the kernel's block widths for these sizes avoid 64 and a
check on this device passes -- the kernels' outputs and gradients against the kind's chunked PyTorch sums on random
inputs of the call's sizes, batch and head counts (which the kernels compile in), once per kind, shape and device, in
a process of its own (on an H100 with Triton 3.6 the delta kernels also computed wrong gradients at some sizes clear
of width 64, and at feature size 32 made an illegal memory access, which leaves a process's CUDA context unusable) --
else the chunked sums train, with a warning saying why. `run` then calls the kernels so that their backward passes
fla's refusal: the refusal is lifted only while that backward runs, inside this module's own autograd function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

#: fla's widest tile of chunk_bwd_dqkwg on Hopper (its CONST_TILING there) and its narrowest
WIDEST_BLOCK, NARROWEST_BLOCK = 128, 16
#: the tile width that the Triton releases behind fla's refusal miscompile in that kernel (fla issue 640's bisection)
MISCOMPILED_BLOCK = 64
#: the check's tolerances: relative RMS error of bf16 kernels against fp32 sums, as the GPU tests measure them
OUTPUT_RTOL, GRAD_RTOL = 0.02, 0.03
#: the longest the check's process may take (its first use of the kernels compiles and tunes them: minutes)
CHECK_SECONDS = 900


@functools.cache
def imports() -> bool:
    try:
        import fla.ops  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def refuses_backward() -> bool:
    """fla's guard stands here: a Hopper GPU, Triton in [3.4, 3.7.1). (With tilelang installed fla hands some of
    these calls to its tilelang kernels, not all -- simple GLA's fp32 states, no nvcc, FLA_TILELANG=0 -- so the route
    treats the guard as standing and checks whatever kernel fla then runs.)"""
    if not imports():
        return False
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # an fla without the guard
        return False
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def block_width(n: int) -> int:
    """The tile fla's chunk_bwd_dqkwg takes on Hopper for a key or value size n."""
    return min(max(1 << max(n - 1, 0).bit_length(), NARROWEST_BLOCK), WIDEST_BLOCK)


def kernel_sizes(kind, m: int, d: int) -> tuple[int, int]:
    """The key and value sizes the kind's kernel is called with (its `fla_kernel_sizes`, else m and d)."""
    return kind.fla_kernel_sizes(m, d) if kind.fla_kernel_sizes is not None else (m, d)


def clear_of_miscompile(k: int, v: int) -> bool:
    """Kernel key size k and value size v tile it at widths other than the miscompiled one."""
    return MISCOMPILED_BLOCK not in (block_width(k), block_width(v))


@dataclass(frozen=True)
class Shape:
    """What the check runs at: the call's sizes (the kernels' batch and head counts are compile-time constants, so the
    check runs the kernel variants training then runs) with a short row."""

    m: int  # feature size
    d: int  # value size
    b: int = 1
    hq: int = 2
    hkv: int = 1

    @classmethod
    def of(cls, qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor) -> "Shape":
        return cls(m=qf.shape[-1], d=v.shape[-1], b=qf.shape[0], hq=qf.shape[1], hkv=kf.shape[1])

    def __str__(self) -> str:
        return f"m={self.m} d={self.d} b={self.b} hq={self.hq} hkv={self.hkv}"


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).square().mean().sqrt() / want.square().mean().sqrt().clamp_min(1e-12)).item()


def check_sample(kind, shape: Shape, device, *, t: int = 160, seed: int = 0) -> dict:
    """Random inputs of the check (its own generator: the caller's random state is left alone); t spans three
    chunks, the last one partial."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen, device=device)

    b, hq, hkv, m, d = shape.b, shape.hq, shape.hkv, shape.m, shape.d
    x = dict(qf=rand(b, hq, t, m).softmax(-1), kf=rand(b, hkv, t, m).softmax(-1), v=rand(b, hkv, t, d))
    if kind.needs_log_decay:
        x["log_decay"] = -0.05 * torch.rand(b, hkv, t, generator=gen, device=device)
    if kind.needs_beta:
        x["beta"] = torch.rand(b, hkv, t, generator=gen, device=device)
    return x


def errors(kind, fla_call, shape: Shape, device, *, seed: int = 0) -> dict[str, float]:
    """Relative RMS errors of `fla_call` (the kernels, as `run` calls them) against the kind's chunked sums on random
    inputs of `shape`: 'num' (the output) and the gradient of each input by its name."""
    x = check_sample(kind, shape, device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    cot = torch.randn(*x["qf"].shape[:3], shape.d, generator=gen, device=device)
    cot_den = torch.randn(*x["qf"].shape[:3], generator=gen, device=device)

    def grads(fn):
        ins = {k: t.detach().requires_grad_() for k, t in x.items()}
        num, den = fn(ins)
        outs = [(num, cot)] + ([(den, cot_den)] if den.requires_grad else [])  # the normalised kinds' den too
        found = torch.autograd.grad([o for o, _ in outs], list(ins.values()), [c for _, c in outs])
        return num.detach(), dict(zip(ins, found))

    with torch.enable_grad():
        want, want_g = grads(lambda i: kind.chunked(i["qf"], i["kf"], i["v"], log_decay=i.get("log_decay"),
                                                    beta=i.get("beta"), lag=3))
        got, got_g = grads(lambda i: fla_call(i["qf"], i["kf"], i["v"], log_decay=i.get("log_decay"),
                                              beta=i.get("beta"), enter=None, lag=3))
    return {"num": _rel_rms(got, want), **{k: _rel_rms(got_g[k], want_g[k]) for k in want_g}}


def within(errs: dict[str, float]) -> bool:
    """The output and every gradient within bf16 tolerance."""
    return errs["num"] < OUTPUT_RTOL and all(e < GRAD_RTOL for k, e in errs.items() if k != "num")


def _kernels_name(fn) -> str:
    """'module:qualname' of a kind's kernel function, for the check's process to import: only a module-level function
    of an importable module (not __main__, a lambda, a nested function or a partial) is named so."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    name = f"{module}:{qualname}"
    try:
        found = module not in (None, "__main__") and _import_kernels(name) is fn
    except (ImportError, AttributeError):
        found = False
    if not found:
        raise ValueError(f"the check imports the kernels by name in its own process; {fn!r} has no such name "
                         f"(a module-level function of an importable module, not __main__, has)")
    return name


def _import_kernels(name: str):
    module, _, qualname = name.partition(":")
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _own_device(device: str, environ) -> tuple[str, dict[str, str]]:
    """The check process's device and environment: this process's CUDA device N is the only GPU the check's process
    sees (N's entry of CUDA_VISIBLE_DEVICES, or N where unset), as its cuda:0 -- the same GPU under any launcher
    (torchrun, accelerate), and no CUDA context on the others (fla reads device 0's properties at import)."""
    env, dev = dict(environ), torch.device(device)
    if dev.type != "cuda" or dev.index is None or torch.version.hip is not None:
        return device, env
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        env["CUDA_VISIBLE_DEVICES"] = str(dev.index)
    else:
        entries = [e.strip() for e in visible.split(",")]
        if dev.index >= len(entries) or not entries[dev.index]:  # not what CUDA read here: leave it as it is
            return device, env
        env["CUDA_VISIBLE_DEVICES"] = entries[dev.index]
    return "cuda:0", env


def _last_words(stderr: str) -> str:
    """The line of a process's stderr that says why it failed: the exception of its last traceback (not the lines
    torch adds below a CUDA error's first), else a C++ error's what(), else the last line."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if tracebacks:
        said = [line for line in lines[tracebacks[-1] + 1:] if not line[0].isspace()]
        if said:
            return said[0][:300]
    what = [line.split("what():", 1)[1].strip() for line in lines if "what():" in line]
    return (what or lines or ["(nothing on stderr)"])[-1][:300]


#: the check's process: stdout (fd 1) joins stderr before anything is imported (a library's prints, Triton's autotune
#: report), the answer goes out on a copy of the original; the import path is this process's sys.path (argv[2:]), set
#: before linearize is imported, PYTHONPATH left alone for the processes it starts
_CHILD = ("import os, sys; answer = os.dup(1); os.dup2(2, 1); sys.path[:] = sys.argv[2:]; "
          "from linearize.attention.linear.fla_route import _check_main; _check_main(sys.argv[1], answer)")


def check_in_own_process(kind, shape: Shape, device: str) -> dict[str, float]:
    """`errors` of the kind's kernels at `shape` on `device`, computed in a new Python process (this one's import path;
    the kernels by name), so that a kernel that faults leaves this process's CUDA context alone. Raises RuntimeError
    with the process's last words when it does not answer."""
    own_device, env = _own_device(device, os.environ)
    spec = dict(kind=kind.name, kernels=_kernels_name(kind.fla_forward), shape=dataclasses.asdict(shape),
                device=own_device)
    path = [os.fspath(p) for p in sys.path if isinstance(p, (str, os.PathLike))]
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec), *path], stdin=subprocess.DEVNULL,
                              capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=CHECK_SECONDS)
    except subprocess.TimeoutExpired:  # run has killed the process (as on Ctrl-C, whose KeyboardInterrupt goes on up)
        raise RuntimeError(f"its process did not answer within {CHECK_SECONDS} s") from None
    if done.returncode == 0:
        with contextlib.suppress(ValueError):
            answer = json.loads(done.stdout)
            if isinstance(answer, dict):
                return answer
        raise RuntimeError(f"its process ended without an answer: {_last_words(done.stderr)}")
    code = str(done.returncode)
    with contextlib.suppress(ValueError):  # killed by a signal (a kernel's abort: SIGABRT)
        code += f" ({signal.Signals(-done.returncode).name})" if done.returncode < 0 else ""
    raise RuntimeError(f"its process ended with exit code {code}: {_last_words(done.stderr)}")


def _check_main(spec_json: str, answer_fd: int) -> None:
    """The check's process: the relative errors, one line of JSON, on `answer_fd`."""
    faulthandler.dump_traceback_later(CHECK_SECONDS + 60, exit=True)  # ends on its own, should this process be gone
    from linearize.attention.linear import linear_state

    spec = json.loads(spec_json)
    kind = dataclasses.replace(linear_state(spec["kind"]), fla_forward=_import_kernels(spec["kernels"]))
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    errs = errors(kind, functools.partial(_lifted_call, kind), Shape(**spec["shape"]), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a fault surfaces here, in this process
    with os.fdopen(answer_fd, "w") as answer:
        answer.write(json.dumps(errs) + "\n")


#: What `trainable` decided in this process: "<kind> <shape> <device>" -> "fla (<errors>)" or "chunked: <why>" (a
#: run's summary.json and `linearize bench --conversion` record it as 'fla_backward')
DECISIONS: dict[str, str] = {}


@functools.cache
def trainable(kind, shape: Shape, device: str) -> bool:
    """Where fla refuses its backward: may the kind's kernels train at `shape` on `device`? Checked once each."""
    key = f"{kind.name} {shape} {device}"
    k, v = kernel_sizes(kind, shape.m, shape.d)
    if not clear_of_miscompile(k, v):
        why = f"its kernel would tile key size {k} / value size {v} at width {MISCOMPILED_BLOCK}, the width miscompiled"
    else:
        print(f"linearize: fla refuses its gated backward on this GPU and Triton (fla issue 640); checking its "
              f"'{kind.name}' kernels' gradients at {shape} on {device} once, in a process of its own (their first "
              f"use compiles them: a minute or more)", file=sys.stderr, flush=True)
        try:
            errs = check_in_own_process(kind, shape, device)
            measured = ", ".join(f"{name} {e:.3g}" for name, e in errs.items())
            if within(errs):
                DECISIONS[key] = f"fla (relative RMS errors against the chunked sums: {measured})"
                return True
            why = (f"its kernels' gradients did not match the chunked sums on this device (relative RMS errors "
                   f"{measured}; limits {OUTPUT_RTOL} output, {GRAD_RTOL} gradients)")
        except Exception as exc:  # noqa: BLE001 -- any failure of the kernels here keeps training on the chunked sums
            why = f"its kernels failed the check on this device ({type(exc).__name__}: {exc})"
    DECISIONS[key] = f"chunked: {why}"
    warnings.warn(f"linear state {kind.name!r}: flash-linear-attention's backward is refused on this GPU and Triton "
                  f"(fla issue 640; Triton >= 3.7.1 lifts it) and {why}: training takes the chunked "
                  f"PyTorch sums (slower)", stacklevel=2)
    return False


def usable(kind, x: torch.Tensor, shape: Shape) -> bool:
    """The kind's kernels compute this call (x: the layer's q, on its device; `shape`: the call's sizes)."""
    if kind.fla_forward is None or not x.is_cuda or not imports():
        return False
    if kind.fla_supports is not None and not kind.fla_supports(shape.m, shape.d):
        return False
    if not torch.is_grad_enabled() or not refuses_backward():
        return True
    return trainable(kind, shape, str(x.device))


def describe(kind, m: int, d: int, *, cuda: bool) -> str:
    """One line for `linearize info`: what computes the kind's linear sums here, and for training, before any check."""
    if kind.fla_forward is None:
        return "chunked PyTorch sums (no flash-linear-attention kernel for this state)" if not kind.triton else \
            "the package's Triton kernels on CUDA, chunked PyTorch sums elsewhere"
    if not cuda:
        return "chunked PyTorch sums (no CUDA here; flash-linear-attention's kernels on CUDA)"
    if not imports():
        return "chunked PyTorch sums (flash-linear-attention, the `gpu` extra, is not installed)"
    if kind.fla_supports is not None and not kind.fla_supports(m, d):
        return f"chunked PyTorch sums (fla's kernel does not compute feature size {m} / value size {d})"
    if not refuses_backward():
        return "flash-linear-attention's kernels, training included"
    k, v = kernel_sizes(kind, m, d)
    if not clear_of_miscompile(k, v):
        return (f"flash-linear-attention's kernels for inference; training on the chunked PyTorch sums (fla refuses "
                f"its gated backward on this GPU and Triton, issue 640, and key size {k} / value size {v} tile at "
                f"the miscompiled width {MISCOMPILED_BLOCK})")
    return ("flash-linear-attention's kernels; for training once a check of their gradients on the device passes at "
            "the first training step (fla refuses its gated backward on this GPU and Triton, issue 640)")


@contextlib.contextmanager
def _refusal_lifted():
    """fla's guard reads this module global at call time; set for the duration of one backward."""
    try:
        from fla.ops.common import chunk_o
    except ImportError:
        yield
        return
    before = getattr(chunk_o, "TRITON_ABOVE_3_7_1", None)
    chunk_o.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = before


class _LiftedBackward(torch.autograd.Function):
    """fn(*inputs) -> tuple of tensors, as one node: the forward runs fn without a graph and saves only the inputs
    (through the saved-tensor hooks, so gradient checkpointing drops and restores them as any other); the backward
    runs fn again on them and differentiates that graph with fla's refusal lifted -- one more forward of the kernels
    per backward, nothing else kept."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # the backward's run of fn under the forward's autocast state
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.is_tensor = [torch.is_tensor(x) for x in inputs]
        ctx.others = [None if t else x for t, x in zip(ctx.is_tensor, inputs)]
        ctx.save_for_backward(*[x for x in inputs if torch.is_tensor(x)])
        return tuple(fn(*inputs))

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        ins = [next(saved).detach().requires_grad_(ctx.needs_input_grad[i + 1]) if t else other
               for i, (t, other) in enumerate(zip(ctx.is_tensor, ctx.others))]
        wrt = [x for x in ins if torch.is_tensor(x) and x.requires_grad]
        found = [None] * len(wrt)
        with torch.enable_grad():
            outs = ctx.fn(*ins)
            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
            if pairs and wrt:
                with _refusal_lifted():
                    found = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        it = iter(found)
        return (None,) + tuple(next(it) if torch.is_tensor(x) and x.requires_grad else None for x in ins)


def lifted(fn, *inputs) -> tuple:
    """fn(*inputs) with its backward run under fla's refusal lifted (the values and gradients are fn's own)."""
    return _LiftedBackward.apply(fn, *inputs)


def _kernels(kind, enter, lag, qf, kf, v, log_decay, beta):
    return tuple(kind.fla_forward(qf, kf, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag))


def _lifted_call(kind, qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0):
    if torch.is_grad_enabled() and refuses_backward():
        return lifted(functools.partial(_kernels, kind, enter, lag), qf, kf, v, log_decay, beta)
    return kind.fla_forward(qf, kf, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag)


def run(kind, qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0):
    """(num, den) of the kind's `fla_forward`; where fla refuses its backward, with the refusal lifted there -- only
    at shapes `trainable` cleared on this device (a one-line error otherwise: fla's kernels would compute wrong
    gradients or refuse them)."""
    if torch.is_grad_enabled() and refuses_backward():
        shape = Shape.of(qf, kf, v)
        if not trainable(kind, shape, str(qf.device)):
            raise ValueError(f"linear state {kind.name!r}: flash-linear-attention's backward is refused on this GPU "
                             f"and not cleared at {shape} (see the warning above): use the chunked sums")
    return _lifted_call(kind, qf, kf, v, log_decay=log_decay, beta=beta, enter=enter, lag=lag)
