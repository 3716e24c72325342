"""The hybrid kernels as torch.library custom ops: torch.library.opcheck (schema, fake tensors, autograd
registration, AOT dispatch) on the CPU implementation (the chunked path) and on CUDA (the kernels); outputs and
gradients against the quadratic reference; torch.compile traces them without a graph break."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from linearize.attention.reference import hybrid_attention_reference  # noqa: E402
from linearize.attention.spec import AttentionSpec  # noqa: E402
from linearize.attention.triton import hybrid_attention_triton  # noqa: E402
from linearize.attention.triton.ops import hybrid_attention_op, hybrid_fwd  # noqa: E402

CUDA = torch.cuda.is_available()

#: (mode, rule, placement) -> the kernels' code and the linear branch's shift, as hybrid_attention_triton sets them
CASES = {
    "hybrid_shared_norm_complementary": ("hybrid", "shared_norm", "complementary", 0, True),
    "hybrid_mix_overlap": ("hybrid", "mix", "overlap", 1, False),
    "swa_only": ("swa_only", "shared_norm", "complementary", 2, False),
    "la_only": ("la_only", "shared_norm", "complementary", 3, False),
}


def _inputs(device, dtype, *, b=2, hq=4, hkv=2, t=40, d=16, m=8, pad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hkv, hkv))
    qf = torch.softmax(torch.randn(b, hq, t, m, generator=g), -1)
    kf = torch.softmax(torch.randn(b, hkv, t, m, generator=g), -1)
    valid = None
    if pad:
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[0, :5] = False
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, qf, kf)], valid


def _op_args(tensors, valid, case, weight, window=6, chunk_size=16):
    mode, rule, placement, code, complementary = CASES[case]
    q = tensors[0]
    w = None if weight is None else weight.to(device=q.device, dtype=torch.float32)
    v8 = None if valid is None else valid.to(q.device).to(torch.int8)
    return (*tensors, w, v8, q.shape[-1] ** -0.5, window, 0.3 if weight is None else 0.0, code,
            window if complementary else 0, chunk_size)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weight,pad", [(None, False), ("per_head", True)])
def test_opcheck_on_cpu(case, weight, pad):
    tensors, valid = _inputs("cpu", torch.float32, pad=pad)
    w = torch.full((4,), 0.2) if weight == "per_head" else None
    args = list(_op_args(tensors, valid, case, w))
    for i in (0, 1, 2, 3, 4):
        args[i] = args[i].requires_grad_()
    if w is not None:
        args[5] = args[5].requires_grad_()
    torch.library.opcheck(hybrid_fwd, tuple(args))


@pytest.mark.parametrize("case", list(CASES))
def test_op_output_and_gradients_equal_the_reference(case):
    mode, rule, placement, _, _ = CASES[case]
    tensors, valid = _inputs("cpu", torch.float64, pad=True, seed=3)
    weight = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    ins = [x.clone().requires_grad_() for x in tensors]
    w = weight.clone().requires_grad_()
    args = _op_args(ins, valid, case, w)
    out = hybrid_attention_op(*args[:7], scale=args[7], window=args[8], wscalar=args[9], code=args[10], shift=args[11],
                              chunk_size=args[12])
    ref_ins = [x.clone().requires_grad_() for x in tensors]
    w_ref = weight.clone().requires_grad_()
    ref = hybrid_attention_reference(*ref_ins, spec=AttentionSpec(scale=args[7], window=6, rule=rule, placement=placement),
                                     mode=mode, weight=w_ref, valid=valid)
    go = torch.randn_like(ref)
    out.backward(go)
    ref.backward(go)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for name, a, r in zip(["q", "k", "v", "qf", "kf"], ins, ref_ins):
        want = torch.zeros_like(r) if r.grad is None else r.grad
        got = torch.zeros_like(a) if a.grad is None else a.grad
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=name)
    if mode == "hybrid":
        torch.testing.assert_close(w.grad.double(), w_ref.grad, atol=1e-5, rtol=1e-5)


def test_torch_compile_traces_the_op_without_a_graph_break():
    tensors, valid = _inputs("cpu", torch.float32, pad=True)
    args = _op_args(tensors, valid, "hybrid_shared_norm_complementary", torch.full((4,), 0.2))

    def layer(q, k, v, qf, kf):
        o = hybrid_attention_op(q * 1.5, k, v, qf, kf, *args[5:7], scale=args[7], window=args[8], wscalar=args[9],
                                code=args[10], shift=args[11], chunk_size=args[12])
        return (o * o).sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    a = [x.clone().requires_grad_() for x in tensors]
    b = [x.clone().requires_grad_() for x in tensors]
    loss_c, loss_e = compiled(*a), layer(*b)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_a_chain_of_layers_compiles_as_one_graph():
    """`linearize bench --stack`: the chained calls trace into one graph (fullgraph), the same loss and gradients."""
    from linearize.bench.kernels import chained

    tensors, valid = _inputs("cpu", torch.float32, pad=True)
    args = _op_args(tensors, valid, "hybrid_shared_norm_complementary", torch.full((4,), 0.2))

    def layer(q, k, v, qf, kf):
        return hybrid_attention_op(q, k, v, qf, kf, *args[5:7], scale=args[7], window=args[8], wscalar=args[9],
                                   code=args[10], shift=args[11], chunk_size=args[12])

    stack = chained(layer, 3)
    compiled = torch.compile(stack, backend="aot_eager", fullgraph=True)
    a = [x.clone().requires_grad_() for x in tensors]
    b = [x.clone().requires_grad_() for x in tensors]
    out_c, out_e = compiled(*a), stack(*b)
    (out_c * out_c).sum().backward()
    (out_e * out_e).sum().backward()
    torch.testing.assert_close(out_c, out_e)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
# the two residual layouts (both branches; the linear branch alone); the other modes' kernel bodies are checked by
# tests/attention/test_triton.py (interpreted on CPU, compiled on CUDA)
@pytest.mark.parametrize("case", ["hybrid_shared_norm_complementary", "la_only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_opcheck_on_cuda(case, dtype):
    tensors, valid = _inputs("cuda", dtype, t=130, d=32, m=16, pad=True)
    args = list(_op_args(tensors, valid, case, torch.full((4,), 0.2), chunk_size=64))
    for i in (0, 1, 2, 3, 4, 5):
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(hybrid_fwd, tuple(args))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", ["hybrid_shared_norm_complementary"])  # an inductor compile each
def test_compiled_triton_layer_equals_eager(case):
    """torch.compile (inductor, fullgraph) of hybrid_attention_triton runs the custom ops: same output and gradients
    as the eager autograd.Function."""
    mode, rule, placement, _, _ = CASES[case]
    tensors, valid = _inputs("cuda", torch.bfloat16, t=300, d=64, m=32, pad=True)
    weight = torch.full((4,), 0.2, device="cuda")

    def layer(q, k, v, qf, kf):
        return hybrid_attention_triton(q, k, v, qf, kf, spec=AttentionSpec(scale=0.125, window=17, rule=rule, placement=placement),
                                       mode=mode, weight=weight, valid=valid)

    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    a = [x.clone().requires_grad_() for x in tensors]
    b = [x.clone().requires_grad_() for x in tensors]
    out_c, out_e = compiled(*a), layer(*b)
    go = torch.randn_like(out_e)
    out_c.backward(go)
    out_e.backward(go)
    torch.testing.assert_close(out_c, out_e, atol=1e-2, rtol=1e-2)
    for x, y in zip(a, b):
        if y.grad is None:
            assert x.grad is None or not x.grad.any()
        else:
            torch.testing.assert_close(x.grad, y.grad, atol=2e-2, rtol=2e-2)
