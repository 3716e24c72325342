"""Triton kernels of the hybrid layer against the quadratic reference (outputs and gradients) and the recurrent step.

Without CUDA the kernels run on the CPU under TRITON_INTERPRET=1 at small sizes (set here, before the kernels are
imported); with CUDA the same checks run compiled, and the `gpu` tests add full-size shapes in bf16/fp16.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, where this module is the first to import it

triton = pytest.importorskip("triton")


def _interpret_triton_stdlib() -> None:
    """When something imported triton before TRITON_INTERPRET was set (transformers' model modules do), its
    standard-library helpers (tl.sum, tl.cdiv, ...) are compiled-only JIT functions that the interpreter refuses to
    call; swap them for interpreted twins, as an import under TRITON_INTERPRET=1 would have made them."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    made = {}
    mods = [m for n, m in list(sys.modules.items()) if m is not None and (n == "triton.language" or n.startswith("triton.language."))]
    for mod in mods + [triton.language.core.tensor]:
        for name, val in list(vars(mod).items()):
            if isinstance(val, JITFunction):
                made.setdefault(id(val), InterpretedFunction(val.fn))
                setattr(mod, name, made[id(val)])


if not CUDA:
    _interpret_triton_stdlib()

import linearize.attention.triton._kernels as _kernels  # noqa: E402
import linearize.attention.triton.hybrid as _hybrid  # noqa: E402

if not CUDA and type(_kernels.hybrid_fwd_kernel).__name__ != "InterpretedFunction":
    # imported earlier without the interpreter: rebuild the kernels as interpreted functions
    _kernels = importlib.reload(_kernels)
    _hybrid = importlib.reload(_hybrid)
    _hybrid._patch_interpreter()

from linearize.attention.chunked import hybrid_attention_chunked  # noqa: E402
from linearize.attention.recurrent import decode_step, prefill_state  # noqa: E402
from linearize.attention.reference import hybrid_attention_reference  # noqa: E402
from spec_kwargs import with_spec  # noqa: E402

hybrid_attention_triton = _hybrid.hybrid_attention_triton
decode_output_triton = _hybrid.decode_output_triton
decode_step_triton = _hybrid.decode_step_triton
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _small_segments():
    """Several chunks per segment and several segments, even at the small test lengths."""
    saved = dict(_hybrid.TUNING)
    _hybrid.TUNING["chunks_per_segment"] = 2
    yield
    _hybrid.TUNING.clear()
    _hybrid.TUNING.update(saved)


def _inputs(b, hq, hkv, t, d, m, *, dtype=torch.float32, pad=False, seed=None, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ())))

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = rnd(b, hq, t, d), rnd(b, hkv, t, d), rnd(b, hkv, t, d)
    qf = torch.softmax(rnd(b, hq, t, m), -1)  # positive features, like hedgehog's
    kf = torch.softmax(rnd(b, hkv, t, m), -1)
    valid = None
    if pad:
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[0, : max(1, t // 7)] = False  # left padding
        if b > 1:
            valid[1, -max(1, t // 9):] = False  # right padding
            valid[1, t // 2] = False  # a hole
    tensors = [x.to(device=device, dtype=dtype) for x in (q, k, v, qf, kf)]
    return tensors, (None if valid is None else valid.to(device))


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(tensors, valid, weight, *, tol_out, tol_grad, chunk_size=16, **kw):
    """Triton output and gradients vs the reference in float64 on the same (rounded) inputs; returns the Triton
    inputs, holding their gradients."""
    ins = [x.detach().clone().requires_grad_() for x in tensors]
    w_in = weight.detach().clone().requires_grad_() if torch.is_tensor(weight) else weight
    torch.manual_seed(1)
    out = hybrid_attention_triton(*ins, **with_spec(weight=w_in, valid=valid, chunk_size=chunk_size, **kw))
    assert out.dtype == tensors[0].dtype and out.shape == tensors[0].shape
    assert torch.isfinite(out).all()
    go = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    out.backward(go)

    ref_ins = [x.detach().double().requires_grad_() for x in tensors]
    w_ref = weight.detach().double().requires_grad_() if torch.is_tensor(weight) else weight
    ref = hybrid_attention_reference(*ref_ins, **with_spec(weight=w_ref, valid=valid, **kw))
    ref.backward(go.double())
    assert _rel(out, ref) < tol_out, f"output rel err {_rel(out, ref):.2e}"
    names = ["q", "k", "v", "qf", "kf"]
    for name, a, r in zip(names, ins, ref_ins):
        if r.grad is None or r.grad.abs().max() == 0:
            assert a.grad is None or a.grad.abs().max() == 0, name
            continue
        assert a.grad is not None, name
        assert torch.isfinite(a.grad).all(), name
        assert _rel(a.grad, r.grad) < tol_grad, f"d{name} rel err {_rel(a.grad, r.grad):.2e}"
    if torch.is_tensor(weight) and w_ref.grad is not None and w_ref.grad.abs().max() > 0:
        assert _rel(w_in.grad, w_ref.grad) < tol_grad, f"dweight rel err {_rel(w_in.grad, w_ref.grad):.2e}"
    return ins


# ---------------------------------------------------------------------------------------------------------------
# small shapes: interpreted on CPU, compiled on CUDA
# ---------------------------------------------------------------------------------------------------------------
CASES = [
    # (mode, rule, placement, b, hq, hkv, t, window, weight kind)
    ("hybrid", "shared_norm", "complementary", 2, 4, 2, 45, 20, "head"),  # GQA, padding, T % 16 != 0
    ("hybrid", "mix", "overlap", 1, 2, 2, 37, 9, "rows"),  # per-token gate, MHA
    ("hybrid", "shared_norm", "overlap", 1, 2, 1, 40, 16, "float"),  # window == block, MQA, no padding mask
    ("hybrid", "mix", "complementary", 2, 2, 1, 33, 50, "head"),  # window > T: no linear keys at all
    ("swa_only", "shared_norm", "complementary", 1, 2, 1, 29, 7, "float"),
    ("la_only", "mix", "complementary", 2, 2, 1, 35, 5, "float"),
]


@pytest.mark.parametrize("mode,rule,placement,b,hq,hkv,t,window,wkind", CASES)
def test_forward_backward_matches_reference(mode, rule, placement, b, hq, hkv, t, window, wkind):
    d, m = 16, 32
    tensors, valid = _inputs(b, hq, hkv, t, d, m, pad=wkind != "float" or mode != "hybrid")
    if wkind == "head":
        weight = torch.rand(hq, device=DEVICE) * 0.8 + 0.1
    elif wkind == "rows":
        weight = torch.rand(b, hq, t, device=DEVICE) * 0.8 + 0.1
    else:
        weight = 0.3
    tol = 1e-4 if CUDA else 1e-5  # fp32 (IEEE dots on CUDA)
    _check(tensors, valid, weight, tol_out=tol, tol_grad=tol, scale=d**-0.5, window=window, rule=rule,
           placement=placement, mode=mode)


@pytest.mark.parametrize("code,wkind", [(0, "head"), (1, "rows"), (2, "float"), (3, "float")])
def test_custom_op_kernel_bodies_match_the_reference_and_the_fake_shapes(code, wkind, monkeypatch):
    """ops.kernel_fwd / kernel_bwd (what linearize::hybrid_fwd / hybrid_bwd run on CUDA): the residuals they return
    have the shapes and dtypes the fake implementations promise; the output and every gradient equal the
    reference's (interpreted on CPU, compiled on CUDA)."""
    from linearize.attention.triton import ops

    for name in ("_forward", "_backward", "_config", "_Config"):  # this module's (possibly interpreted) kernels
        monkeypatch.setattr(ops, name, getattr(_hybrid, name))
    mode, rule = _hybrid.KERNEL_CODES[code]
    b, hq, hkv, t, d, m, window = 2, 4, 2, 37, 16, 32, 5
    shift = mode.linear_lag("complementary", window) or 0  # the kernels shift nothing without a linear branch
    tensors, valid = _inputs(b, hq, hkv, t, d, m, pad=True, seed=11)
    weight = {"head": torch.rand(hq, device=DEVICE) * 0.8 + 0.1, "rows": torch.rand(b, hq, t, device=DEVICE) * 0.8 + 0.1,
              "float": None}[wkind]
    params = (d**-0.5, window, 0.3, code, shift, 16)
    v8 = valid.to(torch.int8)
    saved = ops.kernel_fwd(*tensors, weight, v8, *params)
    q, k, v, qf, kf = tensors
    cfg = _hybrid._Config(q, k, qf, scale=params[0], window=window, code=code, shift=shift, chunk_size=16,
                          has_valid=True, wmode=ops._wmode(weight))
    for got, shape, dtype in zip(saved[1:], ops._residual_shapes(q, k, qf, kf, cfg), ops._residual_dtypes(q, kf)):
        assert tuple(got.shape) == (shape or (0,)) and (shape is None or got.dtype == dtype)
    go = torch.randn_like(saved[0])
    grads = ops.kernel_bwd(go, *tensors, weight, v8, *saved, *params)
    for got, shape, dtype in zip(grads, ops._bwd_shapes(q, k, qf, kf, weight, code), ops._bwd_dtypes(q, kf)):
        assert tuple(got.shape) == (shape or (0,)) and (shape is None or got.dtype == dtype)
    ref_ins = [x.detach().double().requires_grad_() for x in tensors]
    w_ref = 0.3 if weight is None else weight.double().requires_grad_()
    ref = hybrid_attention_reference(*ref_ins, **with_spec(scale=params[0], window=window, weight=w_ref, rule=rule,
                                                           placement="complementary", mode=mode, valid=valid))
    ref.backward(go.double())
    tol = 1e-4 if CUDA else 1e-5
    assert _rel(saved[0], ref) < tol
    dq, dkv, dqf, dkf, dw = grads
    expected = {"dv": (dkv[1], ref_ins[2].grad)}
    if mode.uses_window:
        expected.update(dq=(dq, ref_ins[0].grad), dk=(dkv[0], ref_ins[1].grad))
    else:
        assert not dkv[0].any()  # la_only: no key gradient through the window, the half is zeroed
    if mode.uses_linear:
        expected.update(dqf=(dqf, ref_ins[3].grad), dkf=(dkf, ref_ins[4].grad))
    if weight is not None and mode.combines:
        expected["dweight"] = (dw, w_ref.grad)
    for name, (got, want) in expected.items():
        assert _rel(got, want) < tol, f"{name} rel err {_rel(got, want):.2e}"


@pytest.mark.parametrize("b,hq,hkv,t,window,rule,placement", [
    (2, 4, 2, 45, 20, "shared_norm", "complementary"),  # G = 2, padding, T % 16 != 0
    (1, 4, 1, 37, 9, "mix", "overlap"),  # G = 4, window < block
])
def test_key_side_split_matches_reference_and_no_split(b, hq, hkv, t, window, rule, placement, monkeypatch):
    """The key-side backward with its work split over 1, 2 or 3 programs per key chunk (fp32 partials summed): the
    same gradients as the reference, and as each other up to fp32 summation order.  Two feature tiles (block_m 16)
    so that the feature-tile loop is split too."""
    d, m = 16, 32
    monkeypatch.setitem(_hybrid.TUNING, "block_m", 16)
    tensors, valid = _inputs(b, hq, hkv, t, d, m, pad=True, seed=3)
    weight = torch.rand(hq, device=DEVICE) * 0.8 + 0.1
    tol = 1e-4 if CUDA else 1e-5
    grads = {}
    for split in (1, 2, 3):
        monkeypatch.setitem(_hybrid.TUNING, "kv_split", split)
        ins = _check(tensors, valid, weight, tol_out=tol, tol_grad=tol, scale=d**-0.5, window=window, rule=rule,
                     placement=placement)
        grads[split] = [x.grad for x in ins]
    for split in (2, 3):
        for name, a, r in zip(["q", "k", "v", "qf", "kf"], grads[split], grads[1]):
            assert _rel(a, r) < 1e-6, f"split {split}: d{name} differs from no split by {_rel(a, r):.2e}"


def test_key_side_split_heuristic():
    """Split only while B*Hkv*key chunks is below twice the SM count (4 off CUDA), never past the work items."""
    def cfg(b, hq, hkv, t, window=20):
        q, k, qf = (torch.empty(b, h, t, f, device="meta") for h, f in ((hq, 16), (hkv, 16), (hq, 32)))
        return _hybrid._config(q, k, qf, 0.25, window, 0, window, 16, False, 1)

    assert cfg(1, 4, 1, 40).ksplit == 2  # 4 key chunks: 2 programs each fill 2 x 4 SMs
    assert cfg(1, 4, 1, 16, window=1).ksplit == 4  # 2 key chunks, 4 query heads: capped at kv_split_max
    assert cfg(1, 1, 1, 16, window=1).ksplit == 1  # one item per loop: nothing to split
    assert cfg(2, 4, 2, 40).ksplit == 1  # 16 programs


def test_matches_chunked_exactly_enough_and_diagnostic_modes_fall_back():
    tensors, valid = _inputs(1, 2, 1, 24, 16, 32, pad=True)
    kw = dict(scale=0.25, window=6, weight=0.2, valid=valid, chunk_size=16)
    for mode in ("hybrid", "sinks_only", "none"):
        a = hybrid_attention_triton(*tensors, **with_spec(mode=mode, num_sinks=3, **kw))
        b = hybrid_attention_chunked(*tensors, **with_spec(mode=mode, num_sinks=3, **kw))
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), mode


def test_bad_rule_raises():
    tensors, _ = _inputs(1, 1, 1, 8, 16, 32)
    with pytest.raises(ValueError):
        hybrid_attention_triton(*tensors, **with_spec(scale=0.25, window=4, rule="nope"))
    with pytest.raises(ValueError):
        hybrid_attention_triton(*tensors, **with_spec(scale=0.25, window=4, mode="nope"))


@pytest.mark.parametrize("rule", ["shared_norm", "mix"])
def test_half_precision(rule):
    """fp16 inputs (tensor-core operands in fp16, fp32 accumulation).  bf16 is checked by the gpu tests only: the
    Triton 3.6 interpreter's tl.dot mis-reads bf16 operands."""
    tensors, valid = _inputs(2, 4, 2, 40, 16, 32, dtype=torch.float16, pad=True)
    weight = torch.rand(4, device=DEVICE) * 0.8 + 0.1
    _check(tensors, valid, weight, tol_out=1e-2, tol_grad=2e-2, scale=0.25, window=11, rule=rule)


# ---------------------------------------------------------------------------------------------------------------
# decode step
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modes,rule,placement", [
    (["hybrid"], "shared_norm", "complementary"), (["hybrid"], "mix", "overlap"), (["hybrid"], "shared_norm", "overlap"),
    (["swa_only"], "shared_norm", "complementary"), (["la_only"], "mix", "complementary"), (["sinks_only"], "mix", "overlap"),
    (["hybrid", "swa_only", "sinks_only"], "shared_norm", "complementary"),  # per-head modes: the fold comes last
])
@pytest.mark.parametrize("full_d", [False, True])
def test_decode_step_matches_recurrent_and_reference(modes, rule, placement, full_d, monkeypatch):
    """full_d: one program per (b, kv head), which also folds the leaving key into S, z (else advance_state does)."""
    monkeypatch.setitem(_hybrid.TUNING, "decode_full_d_rows_per_sm", 0 if full_d else 10**6)
    monkeypatch.setenv("LINEARIZE_FUSED_DECODE", "0")  # this kernel, not the fused step (test_triton_decode.py)
    b, hq, hkv, d, m, w = 2, 4, 2, 80, 32, 4  # d = 80: two d-tiles, or one masked full-d tile
    for prompt in (0, 9):
        t = prompt + 3 * w  # the ring wraps around
        tensors, valid = _inputs(b, hq, hkv, t, d, m, pad=True)
        q, k, v, qf, kf = tensors
        weight = torch.rand(hq, device=DEVICE)
        kw = dict(scale=0.3, weight=weight, rule=rule, placement=placement)
        st = prefill_state(k[:, :, :prompt], v[:, :, :prompt], kf[:, :, :prompt], valid[:, :prompt],
                           **with_spec(window=w, num_sinks=3))
        st_ref = st.index_select(torch.arange(b))  # a copy
        outs = []
        for i in range(prompt, t):
            sl = slice(i, i + 1)
            args = (q[:, :, sl], k[:, :, sl], v[:, :, sl], qf[:, :, sl], kf[:, :, sl])
            o = decode_step_triton(st, *args, **with_spec(modes=modes, valid=valid[:, sl], **kw))
            o_ref = decode_step(st_ref, *args, **with_spec(modes=modes, valid=valid[:, sl], **kw))
            for mode in modes:
                assert torch.allclose(o[mode], o_ref[mode], atol=2e-5, rtol=1e-4)
            for a, r in zip(st.tensors() + [st.slot], st_ref.tensors() + [st_ref.slot]):
                assert torch.allclose(a.float(), r.float(), atol=1e-5, rtol=1e-5)
            outs.append(o[modes[0]])
        if modes[0] != "sinks_only":
            ref = hybrid_attention_reference(*tensors,
                                             **with_spec(valid=valid, window=w, mode=modes[0], **kw))[:, :, prompt:]
            assert torch.allclose(torch.cat(outs, 2), ref, atol=2e-5, rtol=1e-4)


def test_decode_output_only_reads_the_state():
    tensors, valid = _inputs(1, 2, 1, 9, 16, 32)
    q, k, v, qf, kf = tensors
    st = prefill_state(k[:, :, :8], v[:, :, :8], kf[:, :, :8], torch.ones(1, 8, dtype=torch.bool, device=DEVICE),
                       **with_spec(window=4, num_sinks=2))
    before = [x.clone() for x in st.tensors() + [st.slot]]
    sl = slice(8, 9)
    decode_output_triton(st, q[:, :, sl], k[:, :, sl], v[:, :, sl], qf[:, :, sl], kf[:, :, sl], **with_spec(scale=0.3))
    for a, b in zip(st.tensors() + [st.slot], before):
        assert torch.equal(a, b)


def test_import_without_triton_raises_importerror():
    code = ("import sys; sys.modules['triton'] = None\n"
            "try:\n    import linearize.attention.triton\nexcept ImportError:\n    sys.exit(0)\nsys.exit(1)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# full sizes on the GPU
# ---------------------------------------------------------------------------------------------------------------
GPU_SHAPES = [
    # (b, hq, hkv, t, d, m): Gemma-3-270M-like, Llama-like (fewer heads), odd head_dim
    (1, 4, 1, 1000, 256, 512),
    (2, 8, 2, 777, 128, 256),
    (1, 2, 1, 300, 80, 160),
]


def _poison_allocator():
    """Fill freed CUDA memory with NaN so that an element a kernel forgets to write shows up."""
    x = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del x


GEMMA, LLAMA, ODD = GPU_SHAPES
GPU_CASES = [
    (GEMMA, torch.bfloat16, "hybrid", "shared_norm", "complementary"),
    (GEMMA, torch.bfloat16, "hybrid", "mix", "overlap"),
    (GEMMA, torch.bfloat16, "swa_only", "shared_norm", "complementary"),
    (GEMMA, torch.bfloat16, "la_only", "shared_norm", "complementary"),
    (LLAMA, torch.bfloat16, "hybrid", "shared_norm", "complementary"),
    (LLAMA, torch.float16, "hybrid", "mix", "overlap"),
    (ODD, torch.bfloat16, "hybrid", "shared_norm", "overlap"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape,dtype,mode,rule,placement", GPU_CASES)
def test_gpu_full_size(shape, dtype, mode, rule, placement):
    b, hq, hkv, t, d, m = shape
    _hybrid.TUNING["chunks_per_segment"] = 3
    tensors, valid = _inputs(b, hq, hkv, t, d, m, dtype=dtype, pad=True)
    weight = torch.rand(hq, device="cuda") * 0.8 + 0.1
    _poison_allocator()
    _check(tensors, valid, weight, tol_out=1.5e-2, tol_grad=3e-2, chunk_size=64, scale=d**-0.5, window=64,
           rule=rule, placement=placement, mode=mode)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_default_segments_and_long_sequence():
    _hybrid.TUNING["chunks_per_segment"] = None  # the heuristic used in production
    tensors, valid = _inputs(1, 4, 1, 4100, 256, 512, dtype=torch.bfloat16, pad=False)
    _check(tensors, valid, 0.25, tol_out=1.5e-2, tol_grad=3e-2, chunk_size=64, scale=256**-0.5, window=64)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("placement", ["complementary", "overlap"])
@pytest.mark.parametrize("full_d", [False, True])
def test_gpu_decode_full_size(placement, full_d, monkeypatch):
    monkeypatch.setitem(_hybrid.TUNING, "decode_full_d_rows_per_sm", 0 if full_d else 10**6)
    monkeypatch.setenv("LINEARIZE_FUSED_DECODE", "0")  # this kernel, not the fused step (test_triton_decode.py)
    b, hq, hkv, d, m, w, prompt = 8, 4, 1, 256, 512, 64, 200
    tensors, valid = _inputs(b, hq, hkv, prompt + 70, d, m, dtype=torch.bfloat16, pad=True)
    q, k, v, qf, kf = tensors
    kw = dict(scale=d**-0.5, weight=torch.rand(hq, device="cuda"), placement=placement)
    st = prefill_state(k[:, :, :prompt], v[:, :, :prompt], kf[:, :, :prompt], valid[:, :prompt],
                       **with_spec(window=w, num_sinks=8))
    st_ref = st.index_select(torch.arange(b))  # a copy
    for i in range(prompt, prompt + 70):
        sl = slice(i, i + 1)
        args = (q[:, :, sl], k[:, :, sl], v[:, :, sl], qf[:, :, sl], kf[:, :, sl])
        o = decode_step_triton(st, *args, **with_spec(modes=["hybrid"], valid=valid[:, sl], **kw))["hybrid"]
        o_ref = decode_step(st_ref, *args, **with_spec(modes=["hybrid"], valid=valid[:, sl], **kw))["hybrid"]
        assert _rel(o, o_ref) < 1e-2
    assert _rel(st.S, st_ref.S) < 1e-5 and _rel(st.z, st_ref.z) < 1e-5


def test_bench_cli_arguments_match_the_library():
    import argparse

    from linearize.bench import add_arguments, add_conversion_arguments
    from linearize.cli import build_parser

    cli = vars(build_parser().parse_args(["bench", "--name", "x"]))
    lib, conversion = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_arguments(lib)
    add_conversion_arguments(conversion)  # the CLI's own addition: `linearize bench --conversion`
    expected = {**vars(lib.parse_args(["--name", "x"])), **vars(conversion.parse_args([]))}
    assert {k: v for k, v in cli.items() if k not in ("func", "verb")} == expected
