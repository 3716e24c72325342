"""fla_route: when the linear states' flash-linear-attention kernels may train, and the backward that passes fla's
refusal. The kernels themselves are GPU-tested in test_delta / test_gated; here the route's pieces run on the CPU
with the chunked sums standing in for the kernels."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import sys
import types
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from linearize.attention.linear import fla_route, linear_state
from linearize.attention.linear.fla_route import Shape

DELTA = linear_state("delta")
GATED = linear_state("gated")


def inputs(t=70, m=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(qf=torch.randn(1, 2, t, m, generator=g).softmax(-1), kf=torch.randn(1, 1, t, m, generator=g).softmax(-1),
                v=torch.randn(1, 1, t, d, generator=g), log_decay=-0.1 * torch.rand(1, 1, t, generator=g),
                beta=torch.rand(1, 1, t, generator=g))


def sums(qf, kf, v, log_decay, beta):
    return DELTA.chunked(qf, kf, v, log_decay=log_decay, beta=beta, lag=2, chunk=16)


def standing_in(kernel):
    """The delta kind with `kernel` as its fla_forward (the chunked sums: right; anything else: a stand-in kernel).
    The check imports the kernel by name in its own process: module-level functions only."""
    return dataclasses.replace(DELTA, fla_forward=kernel)


# stand-in kernels (fla_forward's signature) for the check's process
def chunked_kernels(qf, kf, v, **kw):
    return DELTA.chunked(qf, kf, v, **kw)


def miscompiled_kernels(qf, kf, v, **kw):  # the gradient wrt the keys scaled, the output right
    return DELTA.chunked(qf, kf * 1.05 - 0.05 * kf.detach(), v, **kw)


#: torch's message for a CUDA error, as the kernels raise it
CUDA_ERROR = ("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors might be "
              "asynchronously reported at some other API call, so the stacktrace below might be incorrect.\nFor "
              "debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable "
              "device-side assertions.\n")


def broken_kernels(*a, **k):
    raise RuntimeError(CUDA_ERROR)


def faulting_kernels(*a, **k):  # a kernel that kills its process, as an illegal memory access in a destructor does
    sys.stderr.write("terminate called after throwing an instance of 'c10::Error'\n  what():  CUDA error: an illegal "
                     "memory access was encountered\nException raised from c10_cuda_check_implementation\n"
                     "frame #0: c10::Error::Error + 0x98 (0x7f in libc10.so)\n")
    sys.stderr.flush()
    os.abort()


def noisy_kernels(qf, kf, v, **kw):  # right, and printing on stdout as libraries do (Triton's autotune report)
    print("{autotuning: best config BV=32}")
    os.write(1, b"from C: {\n")
    atexit.register(print, "{a report at exit}")  # after the answer
    return DELTA.chunked(qf, kf, v, **kw)


@pytest.mark.parametrize("n,width", [(1, 16), (8, 16), (32, 32), (64, 64), (65, 128), (96, 128), (128, 128), (256, 128)])
def test_block_width_follows_the_kernels_tiling(n, width):
    assert fla_route.block_width(n) == width


def test_the_tile_check_reads_the_sizes_each_kernel_sees():
    """The gated kind's kernel gets v with a ones column, padded to a multiple of 16: value size 64 reaches it as 80
    (tiled at 128, cleared), 32 as 48 (tiled at 64, not); the delta kind's kernel sees m and d themselves."""
    assert fla_route.kernel_sizes(GATED, 128, 64) == (128, 80) and fla_route.kernel_sizes(GATED, 128, 32) == (128, 48)
    assert fla_route.kernel_sizes(DELTA, 128, 64) == (128, 64)
    assert fla_route.clear_of_miscompile(*fla_route.kernel_sizes(GATED, 128, 64))
    assert not fla_route.clear_of_miscompile(*fla_route.kernel_sizes(GATED, 128, 32))
    assert not fla_route.clear_of_miscompile(*fla_route.kernel_sizes(DELTA, 128, 64))
    assert fla_route.clear_of_miscompile(128, 128) and fla_route.clear_of_miscompile(32, 256)
    assert not fla_route.clear_of_miscompile(64, 128) and not fla_route.clear_of_miscompile(128, 48)


@pytest.mark.parametrize("recompute", [False, True])
def test_lifted_backward_gives_the_functions_own_values_and_gradients(recompute):
    """Through the lifted node, alone or inside a non-reentrant checkpoint (gradient checkpointing in training), the
    values and every gradient equal those of the function itself; a None input passes through; the delta kind's den
    (1 once a key entered) gets no gradient."""
    x = inputs()
    cot = torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(1))
    want_in = {k: t.clone().requires_grad_() for k, t in x.items()}
    want = sums(**want_in)[0]
    want_g = torch.autograd.grad((want * cot).sum(), list(want_in.values()))

    got_in = {k: t.clone().requires_grad_() for k, t in x.items()}

    def through_lifted(qf, kf, v, log_decay, beta):
        return fla_route.lifted(lambda *a: tuple(sums(*a)), qf, kf, v, log_decay, beta)

    args = list(got_in.values())
    num, den = checkpoint(through_lifted, *args, use_reentrant=False) if recompute else through_lifted(*args)
    torch.testing.assert_close(num, want, rtol=0, atol=0)
    got_g = torch.autograd.grad((num * cot).sum() + den.sum(), args)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)

    no_beta = fla_route.lifted(lambda q, k, v, b: (DELTA.chunked(q, k, v, beta=b, chunk=16)[0],),
                               got_in["qf"], got_in["kf"], got_in["v"], None)[0]
    assert no_beta.requires_grad


@pytest.mark.parametrize("reentrant", [False, True])
def test_under_gradient_checkpointing_the_layer_is_recomputed_once(reentrant):
    """The lifted node saves its inputs as any op does (the checkpoint drops and restores them) and runs the function
    again in its own backward: the checkpointed region is recomputed once, as without it."""
    calls = []
    x, w = torch.randn(24, 24, requires_grad=True), torch.randn(24, 24, requires_grad=True)

    def region(lift, x, w):
        calls.append(1)
        h = (x @ w).tanh()
        out, = (lift(lambda a, b: (a.sin() * b,), h, x) if lift else (h.sin() * x,))
        return (out.exp() * h).sum()

    def grads(lift):
        calls.clear()
        x.grad = w.grad = None
        checkpoint(functools.partial(region, lift), x, w, use_reentrant=reentrant).backward()
        return (x.grad, w.grad), len(calls)

    want, plain_calls = grads(None)
    got, lifted_calls = grads(fla_route.lifted)
    assert lifted_calls == plain_calls == 2  # the forward, then one recompute
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-6, atol=1e-7)


def test_the_lifted_node_keeps_its_inputs_not_the_functions_intermediates():
    refs = []

    def fn(a, b):
        mid = a.sin()
        refs.append(weakref.ref(mid))
        return (mid * b,)

    a, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    (out,) = fla_route.lifted(fn, a, b)
    assert refs[0]() is None  # the forward's run of fn left nothing behind
    out.sum().backward()
    torch.testing.assert_close(a.grad, a.detach().cos() * b.detach())


def test_the_lifted_node_refuses_a_second_order_gradient():
    a = torch.randn(3, requires_grad=True)
    (out,) = fla_route.lifted(lambda t: (t.sin(),), a)
    (g,) = torch.autograd.grad(out.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), a)


def test_the_refusal_is_lifted_while_the_backward_runs_and_restored_after(monkeypatch):
    """fla's guard reads `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1` when its backward runs: set inside the lifted
    backward, as it was before and after it (a stand-in module here; the CPU has no fla)."""
    chunk_o = types.ModuleType("fla.ops.common.chunk_o")
    chunk_o.TRITON_ABOVE_3_7_1 = False
    for name in ("fla", "fla.ops", "fla.ops.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["fla.ops.common"], "chunk_o", chunk_o, raising=False)
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o", chunk_o)
    seen = []

    def fn(a):
        out = a * 2
        if out.requires_grad:  # the backward's run of fn (the forward's runs without a graph)
            out.register_hook(lambda g: seen.append(chunk_o.TRITON_ABOVE_3_7_1))
        return (out,)

    a = torch.ones(3, requires_grad=True)
    (out,) = fla_route.lifted(fn, a)
    assert seen == [] and chunk_o.TRITON_ABOVE_3_7_1 is False
    out.sum().backward()
    assert seen == [True] and chunk_o.TRITON_ABOVE_3_7_1 is False
    assert torch.equal(a.grad, torch.full((3,), 2.0))


def test_the_check_accepts_kernels_that_compute_the_sums_and_rejects_others():
    right, wrong = standing_in(chunked_kernels), standing_in(miscompiled_kernels)
    cpu, shape = torch.device("cpu"), Shape(m=32, d=16, b=2, hq=4, hkv=2)
    assert fla_route.within(fla_route.errors(right, functools.partial(fla_route._lifted_call, right), shape, cpu))
    errs = fla_route.errors(wrong, functools.partial(fla_route._lifted_call, wrong), shape, cpu)
    assert not fla_route.within(errs) and errs["kf"] > fla_route.GRAD_RTOL and errs["num"] < 1e-6
    assert fla_route.trainable(right, shape, "cpu")  # the same, in the check's own process
    assert fla_route.DECISIONS["delta m=32 d=16 b=2 hq=4 hkv=2 cpu"].startswith(
        "fla (relative RMS errors against the chunked sums: num 0")
    with pytest.warns(UserWarning, match="did not match"):
        assert not fla_route.trainable(wrong, shape, "cpu")
    assert "relative RMS errors" in fla_route.DECISIONS["delta m=32 d=16 b=2 hq=4 hkv=2 cpu"]
    with pytest.warns(UserWarning, match="width 64"):
        assert not fla_route.trainable(right, Shape(m=64, d=128), "cpu")


def test_the_check_runs_at_the_calls_batch_and_head_counts():
    """The kernels compile their batch and head counts in: the check's sample has the call's."""
    x = fla_route.check_sample(DELTA, Shape(m=8, d=4, b=3, hq=6, hkv=2), torch.device("cpu"))
    assert x["qf"].shape[:2] == (3, 6) and x["kf"].shape[:2] == (3, 2) and x["v"].shape[-1] == 4
    assert set(x) == {"qf", "kf", "v", "log_decay", "beta"}
    assert set(fla_route.check_sample(GATED, Shape(m=8, d=4), torch.device("cpu"))) == {"qf", "kf", "v", "log_decay"}


def test_kernels_that_fail_the_check_leave_training_on_the_chunked_sums():
    """The warning names the exception in one line (its first: not the lines torch adds below a CUDA error)."""
    with pytest.warns(UserWarning) as said:
        assert not fla_route.trainable(standing_in(broken_kernels), Shape(m=32, d=16), "cpu")
    (warning,) = [str(w.message) for w in said]
    assert "failed the check on this device (RuntimeError: its process ended with exit code 1: RuntimeError: CUDA " \
           "error: no kernel image is available for execution on the device)" in warning
    assert "TORCH_USE_CUDA_DSA" not in warning and "\n" not in warning


def test_kernels_that_kill_the_checks_process_leave_this_one_working():
    """A kernel fault (an illegal memory access breaks the CUDA context of its process for good) ends only the check's
    process: the route says so, with the error the process aborted on, and trains on the chunked sums here."""
    with pytest.warns(UserWarning, match=r"exit code -6 \(SIGABRT\): CUDA error: an illegal memory access was "
                                         r"encountered\)"):
        assert not fla_route.trainable(standing_in(faulting_kernels), Shape(m=32, d=16), "cpu")
    assert "exit code -6 (SIGABRT)" in fla_route.DECISIONS["delta m=32 d=16 b=1 hq=2 hkv=1 cpu"]
    x = inputs()
    assert torch.isfinite(sums(**x)[0]).all()  # this process computes on


def test_the_check_reads_its_answer_whatever_else_its_process_prints(monkeypatch, tmp_path):
    """Prints on stdout (Python's or a C library's) do not reach the answer; this process's import path goes over as
    it is, paths of no directory and non-str entries included, with PYTHONPATH left alone."""
    monkeypatch.setattr(sys, "path", [*sys.path, tmp_path / "not-there", str(tmp_path / "none.zip"), b"/bytes"])
    monkeypatch.setenv("PYTHONPATH", "/somewhere-else")
    errs = fla_route.check_in_own_process(standing_in(noisy_kernels), Shape(m=16, d=8), "cpu")
    assert fla_route.within(errs) and set(errs) == {"num", "qf", "kf", "v", "log_decay", "beta"}


def test_the_check_names_kernels_its_process_can_import():
    assert fla_route._import_kernels(fla_route._kernels_name(DELTA.fla_forward)) is DELTA.fla_forward
    assert fla_route._kernels_name(chunked_kernels) == f"{__name__}:chunked_kernels"

    def nested(*a, **k):
        return None

    in_main = types.FunctionType(chunked_kernels.__code__, {"DELTA": DELTA}, "chunked_kernels")
    in_main.__module__ = "__main__"
    for fn in (lambda *a, **k: None, nested, functools.partial(chunked_kernels), in_main):
        with pytest.raises(ValueError, match="imports the kernels by name in its own process"):
            fla_route.check_in_own_process(standing_in(fn), Shape(m=32, d=16), "cpu")


@pytest.mark.parametrize("visible,device,want", [
    (None, "cuda:3", ("cuda:0", "3")),                       # torchrun / accelerate: all GPUs, rank 3 on cuda:3
    ("4,5,6,7", "cuda:1", ("cuda:0", "5")),                  # a launcher's subset
    ("GPU-aa11, GPU-bb22", "cuda:1", ("cuda:0", "GPU-bb22")),  # by UUID
    ("2", "cuda:0", ("cuda:0", "2")),                        # one GPU a process
    ("0,1", "cuda:2", ("cuda:2", "0,1")),                    # not what CUDA read: as it is
    (None, "cpu", ("cpu", None)),
])
def test_the_checks_process_sees_only_the_gpu_of_the_call(visible, device, want):
    environ = {"LOCAL_RANK": "3"} | ({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible})
    own, env = fla_route._own_device(device, environ)
    assert (own, env.get("CUDA_VISIBLE_DEVICES")) == want and env["LOCAL_RANK"] == "3"


def test_run_refuses_a_shape_the_check_did_not_clear(monkeypatch):
    """Called directly (not through the route) at a shape not cleared, `run` says so in one line instead of letting
    the kernels compute a refused backward."""
    monkeypatch.setattr(fla_route, "refuses_backward", lambda: True)
    x = inputs(m=64, d=8)
    with pytest.warns(UserWarning, match="width 64"), pytest.raises(ValueError, match="not cleared at m=64 d=8"):
        fla_route.run(standing_in(DELTA.chunked), x["qf"], x["kf"], x["v"], log_decay=x["log_decay"], beta=x["beta"])
    with torch.no_grad():  # no backward, nothing refused
        fla_route.run(standing_in(DELTA.chunked), x["qf"], x["kf"], x["v"], log_decay=x["log_decay"], beta=x["beta"])


def test_the_check_inside_a_checkpointed_forward_leaves_the_checkpoint_intact():
    """The route decides inside a training forward, which gradient checkpointing records and replays: the check runs
    apart (its own process), so the replay finds the same saved tensors and the gradients are the plain ones."""
    right = standing_in(chunked_kernels)
    x = inputs(seed=3)
    args = [t.clone().requires_grad_() for t in x.values()]

    def layer(qf, kf, v, log_decay, beta):
        assert fla_route.trainable(right, Shape(m=32, d=16), "cpu")  # computed on the first call, cached for the replay
        return sums(qf, kf, v, log_decay, beta)[0]

    out = checkpoint(layer, *args, use_reentrant=False)
    got = torch.autograd.grad(out.square().sum(), args)
    plain = [t.clone().requires_grad_() for t in x.values()]
    want = torch.autograd.grad(sums(*plain)[0].square().sum(), plain)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_a_check_first_needed_inside_a_backward_runs_there():
    """Under a reentrant checkpoint the forward runs without a graph and the route first asks with gradients on inside
    the backward's recompute: the check (its own process) still decides there."""
    right = standing_in(chunked_kernels)
    seen = []

    def layer(a):
        if torch.is_grad_enabled():
            seen.append(fla_route.trainable(right, Shape(m=16, d=8, b=3), "cpu"))
        return a.sin()

    a = torch.randn(4, requires_grad=True)
    checkpoint(layer, a, use_reentrant=True).sum().backward()
    assert seen == [True]


def test_no_kernels_off_cuda_or_without_fla():
    x = inputs()["qf"]
    assert not fla_route.usable(DELTA, x, Shape(m=16, d=8))
    assert not fla_route.usable(linear_state("sum"), x, Shape(m=16, d=8))


@pytest.mark.parametrize("refused,cleared,grad,want", [
    (False, False, True, True),   # fla trains here itself
    (True, True, True, True),     # refused, but this shape was checked on the device
    (True, False, True, False),   # refused and not cleared: the chunked sums train
    (True, False, False, True),   # no gradient: the forward kernels are never refused
])
def test_the_route_takes_the_kernels_where_they_compute_the_call(monkeypatch, refused, cleared, grad, want):
    class OnCuda:  # stands in for a CUDA tensor: the route reads only these
        is_cuda, device = True, "cuda:0"

    asked = []
    shape = Shape(m=128, d=64, b=2, hq=12, hkv=2)
    monkeypatch.setattr(fla_route, "imports", lambda: True)
    monkeypatch.setattr(fla_route, "refuses_backward", lambda: refused)
    monkeypatch.setattr(fla_route, "trainable", lambda kind, sh, device: asked.append((kind.name, sh, device)) or cleared)
    with torch.set_grad_enabled(grad):
        assert fla_route.usable(DELTA, OnCuda(), shape) is want
    assert asked == ([("delta", shape, "cuda:0")] if refused and grad else [])
    assert not fla_route.usable(linear_state("sum"), OnCuda(), shape)  # no fla kernels for 'sum'


def test_sizes_the_kernel_does_not_compute_never_take_it(monkeypatch):
    """The delta kernel computes an even feature size up to 256 and an even value size: a hedgehog map of full size
    on a 256-wide head (m = 512) stays on the chunked sums, with or without gradients."""
    class OnCuda:
        is_cuda, device = True, "cuda:0"

    monkeypatch.setattr(fla_route, "imports", lambda: True)
    monkeypatch.setattr(fla_route, "refuses_backward", lambda: False)
    assert fla_route.usable(DELTA, OnCuda(), Shape(m=256, d=256))
    with torch.no_grad():
        assert not fla_route.usable(DELTA, OnCuda(), Shape(m=512, d=256))
    assert not fla_route.usable(DELTA, OnCuda(), Shape(m=128, d=63))


def test_the_route_asks_only_where_the_call_reads_the_linear_sums():
    """Modes without the linear branch, and the sparse memory's combining modes whose walk supplies the linear sums,
    never ask fla_route (its check compiles kernels that would not run)."""
    import dataclasses as dc

    from linearize.attention.chunked import reads_linear_sums
    from linearize.attention.spec import AttentionSpec
    from linearize.config import component_mode

    spec = AttentionSpec(scale=0.1, window=8, rule="mix", linear_state="delta")
    assert reads_linear_sums(spec, component_mode("hybrid")) and reads_linear_sums(spec, component_mode("la_only"))
    assert not reads_linear_sums(spec, component_mode("swa_only")) and not reads_linear_sums(spec, component_mode("none"))
    memory = dc.replace(spec, sparse_memory=4)
    assert not reads_linear_sums(memory, component_mode("hybrid"))  # the memory's walk
    assert reads_linear_sums(memory, component_mode("la_only"))  # no window: the memory does not act
    assert reads_linear_sums(dc.replace(memory, placement="overlap"), component_mode("hybrid"))  # every key: the sums


def test_a_check_first_run_in_a_non_reentrant_recompute_leaves_that_checkpoint_intact():
    """Asked inside a backward's recompute, the check's tensors live in another process, out of the recomputing
    checkpoint's saved-tensor hooks, so the recompute finds what the forward saved and the gradients are the plain
    ones."""
    right = standing_in(chunked_kernels)
    seen = []

    def layer(a):
        h = a.sin()
        if torch._C._current_graph_task_id() != -1:  # only in the recompute
            seen.append(fla_route.trainable(right, Shape(m=16, d=8, b=2), "cpu"))
        return (h * a).cos()

    a = torch.randn(4, requires_grad=True)
    checkpoint(layer, a, use_reentrant=False).sum().backward()
    want = torch.autograd.grad((a.sin() * a).cos().sum(), a)[0]
    assert seen == [True]
    torch.testing.assert_close(a.grad, want)


def test_info_says_what_computes_the_linear_sums_here(monkeypatch):
    assert "Triton kernels" in fla_route.describe(linear_state("sum"), 128, 128, cuda=True)
    assert fla_route.describe(DELTA, 128, 128, cuda=False).startswith("chunked PyTorch sums (no CUDA here")
    monkeypatch.setattr(fla_route, "imports", lambda: False)
    assert "is not installed" in fla_route.describe(DELTA, 128, 128, cuda=True)
    monkeypatch.setattr(fla_route, "imports", lambda: True)
    assert "does not compute feature size 512" in fla_route.describe(DELTA, 512, 256, cuda=True)
    monkeypatch.setattr(fla_route, "refuses_backward", lambda: False)
    assert fla_route.describe(DELTA, 128, 128, cuda=True) == "flash-linear-attention's kernels, training included"
    monkeypatch.setattr(fla_route, "refuses_backward", lambda: True)
    assert "training on the chunked PyTorch sums" in fla_route.describe(DELTA, 64, 64, cuda=True)
    assert "value size 48 tile at the miscompiled width 64" in fla_route.describe(GATED, 128, 32, cuda=True)
    assert "once a check of their gradients on the device passes" in fla_route.describe(GATED, 128, 64, cuda=True)
