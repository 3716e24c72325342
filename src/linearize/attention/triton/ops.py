"""The hybrid layer's Triton kernels as `torch.library` custom ops, so that `torch.compile` traces through them
(no graph break) and captures a whole training step, the attention included.

    linearize::hybrid_fwd   the output and the tensors the backward reads (the launch config's shapes)
    linearize::hybrid_bwd   the gradients (dq, dk and dv stacked, dqf, dkf, the mixing weight's)

Each has a fake (meta) implementation giving shapes from the launch config, and `hybrid_fwd` an autograd formula
(`register_autograd`) calling `hybrid_bwd`. On CUDA they run the kernels of `hybrid.py` (`_forward`, `_backward`,
the same code as the eager `_HybridFn`); on the CPU they run the chunked PyTorch path (the backward by autograd
through it; nothing is saved), so `torch.library.opcheck` runs without a GPU. Tensors a mode does not use are
returned empty (custom ops may not return aliases of each other). `hybrid_attention_op` is the entry point, with the
arguments `hybrid_attention_triton` has already prepared.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.spec import AttentionSpec
from linearize.attention.triton.hybrid import KERNEL_CODES, RULES, _backward, _config, _Config, _forward


def _chunked_call(code, scale, window, shift, chunk_size):
    """The mode and spec under which the chunked PyTorch path computes what kernel code `code` does."""
    mode, rule = KERNEL_CODES[code]
    return mode, AttentionSpec(scale=scale, window=window, rule=rule, placement="complementary" if shift else "overlap",
                               chunk_size=chunk_size)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _wmode(weight) -> int:
    return 0 if weight is None else (1 if weight.dim() == 1 else 2)


def _cfg(q, k, qf, weight, valid, scale, window, code, shift, chunk_size):
    return _config(q, k, qf, scale, window, code, shift, chunk_size, valid is not None, _wmode(weight))


def _residual_shapes(q, k, qf, kf, cfg) -> list[tuple | None]:
    """Shapes of (xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg) on CUDA; None: returned empty (unused by the mode)."""
    b, hq, t, _ = q.shape
    bkv = b * cfg.hkv
    la = cfg.has_la
    return [tuple(q.shape) if cfg.combines else None, tuple(q.shape) if cfg.code == RULES["mix"] else None, (4, b, hq, t),
            (b * hq, cfg.n, cfg.bt, cfg.bt) if la else None, (bkv, cfg.n, cfg.m, cfg.d) if la else None,
            (bkv, cfg.nseg, cfg.m, cfg.d) if la else None, (bkv, cfg.n, cfg.m) if la else None,
            (bkv, cfg.nseg, cfg.m) if la else None]


def _residual_dtypes(q, kf):
    f32 = torch.float32
    return [q.dtype, q.dtype, f32, f32, kf.dtype, f32, f32, f32]


@torch.library.custom_op("linearize::hybrid_fwd", mutates_args=())
def hybrid_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qf: torch.Tensor, kf: torch.Tensor,
               weight: torch.Tensor | None, valid: torch.Tensor | None, scale: float, window: int, wscalar: float,
               code: int, shift: int, chunk_size: int) -> list[torch.Tensor]:
    """(out, xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg): the output and what the backward reads."""
    if q.device.type == "cpu":  # the chunked PyTorch path; the CPU backward recomputes through it
        mode, spec = _chunked_call(code, scale, window, shift, chunk_size)
        out = hybrid_attention_chunked(q, k, v, qf, kf, spec=spec, mode=mode, weight=wscalar if weight is None else weight,
                                       valid=None if valid is None else valid.bool())
        return [out.to(q.dtype)] + [_empty(q) for _ in range(8)]
    return kernel_fwd(q, k, v, qf, kf, weight, valid, scale, window, wscalar, code, shift, chunk_size)


def kernel_fwd(q, k, v, qf, kf, weight, valid, scale, window, wscalar, code, shift, chunk_size):
    """`hybrid_fwd` on the Triton kernels (CUDA; the CPU too under TRITON_INTERPRET=1, which the tests use)."""
    q, k, v, qf, kf = (x.contiguous() for x in (q, k, v, qf, kf))  # the kernels index densely (no-ops when traced so)
    cfg = _cfg(q, k, qf, weight, valid, scale, window, code, shift, chunk_size)
    saved = list(_forward(q, k, v, qf, kf, weight if weight is not None else q, valid if valid is not None else q,
                          wscalar, cfg))
    for i, shape in enumerate(_residual_shapes(q, k, qf, kf, cfg), start=1):
        if shape is None:  # a placeholder pointer (an alias of out or rows): not returned
            saved[i] = _empty(q)
    return saved


@hybrid_fwd.register_fake
def _(q, k, v, qf, kf, weight, valid, scale, window, wscalar, code, shift, chunk_size):
    if q.device.type == "cpu":
        return [torch.empty_like(q)] + [_empty(q) for _ in range(8)]
    # not the cached _config: under dynamic shapes the sizes are symbolic, which a dict key cannot hold
    cfg = _Config(q, k, qf, scale=scale, window=window, code=code, shift=shift, chunk_size=chunk_size,
                  has_valid=valid is not None, wmode=_wmode(weight))
    shapes, dtypes = _residual_shapes(q, k, qf, kf, cfg), _residual_dtypes(q, kf)
    return [torch.empty_like(q)] + [_empty(q) if s is None else q.new_empty(s, dtype=dt) for s, dt in zip(shapes, dtypes)]


def _bwd_shapes(q, k, qf, kf, weight, code):
    """(dq, dkv, dqf, dkf, dw) shapes; None: returned empty."""
    b, hq, t, _ = q.shape
    mode = KERNEL_CODES[code][0]
    has_w = mode.combines and weight is not None
    return [tuple(q.shape) if mode.uses_window else None, (2, *k.shape), tuple(qf.shape) if mode.uses_linear else None,
            tuple(kf.shape) if mode.uses_linear else None,
            (tuple(weight.shape) if weight.dim() == 1 else (b, hq, t)) if has_w else None]


@torch.library.custom_op("linearize::hybrid_bwd", mutates_args=())
def hybrid_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qf: torch.Tensor, kf: torch.Tensor,
               weight: torch.Tensor | None, valid: torch.Tensor | None, out: torch.Tensor, xs: torch.Tensor,
               xl: torch.Tensor, rows: torch.Tensor, amat: torch.Tensor, s_loc: torch.Tensor, s_seg: torch.Tensor,
               z_loc: torch.Tensor, z_seg: torch.Tensor, scale: float, window: int, wscalar: float, code: int,
               shift: int, chunk_size: int) -> list[torch.Tensor]:
    """(dq, dkv = stack(dk, dv), dqf, dkf, dw); the ones a mode has no gradient for are empty."""
    shapes = _bwd_shapes(q, k, qf, kf, weight, code)
    if q.device.type == "cpu":
        grads = _cpu_grads(do, q, k, v, qf, kf, weight, valid, scale, window, wscalar, code, shift, chunk_size)
        dq, dk, dv, dqf, dkf, dw = grads
        res = [dq, torch.stack([dk, dv]), dqf, dkf, dw]
        return [_empty(q) if s is None else r.to(dt) for r, s, dt in zip(res, shapes, _bwd_dtypes(q, kf))]
    return kernel_bwd(do, q, k, v, qf, kf, weight, valid, out, xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg, scale,
                      window, wscalar, code, shift, chunk_size)


def kernel_bwd(do, q, k, v, qf, kf, weight, valid, out, xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg, scale, window,
               wscalar, code, shift, chunk_size):
    """`hybrid_bwd` on the Triton kernels (as `kernel_fwd`)."""
    shapes = _bwd_shapes(q, k, qf, kf, weight, code)
    q, k, v, qf, kf = (x.contiguous() for x in (q, k, v, qf, kf))
    cfg = _cfg(q, k, qf, weight, valid, scale, window, code, shift, chunk_size)
    placeholder = rows
    saved = [x if x.numel() else (out if i < 2 else placeholder) for i, x in enumerate((xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg))]
    dq, dk, dv, dqf, dkf, dw = _backward(do, q, k, v, qf, kf, weight if weight is not None else q,
                                         valid if valid is not None else q, out, *saved, wscalar, cfg)
    if dw is not None:  # a view of the kernels' coefficient buffer: reduced or copied, not returned as a view
        dw = dw.sum((0, 2)) if cfg.wmode == 1 else dw.clone()
    # _backward's dk and dv are the two halves of one (2, *k.shape) buffer: returned as that one tensor (no two
    # outputs may alias); la_only leaves its dk half unwritten
    dkv = (dv._base if dv._base is not None and dv._base.shape == (2, *k.shape)
           else torch.stack([torch.zeros_like(dv) if dk is None else dk, dv]))
    if dk is None:
        dkv[0].zero_()
    res = [dq, dkv, dqf, dkf, dw]
    return [_empty(q) if s is None else r for r, s in zip(res, shapes)]


def _cpu_grads(do, q, k, v, qf, kf, weight, valid, scale, window, wscalar, code, shift, chunk_size):
    """Gradients of the chunked path by autograd (zeros where an input does not enter). A custom op's implementation
    runs with the autograd dispatch keys excluded (thread-local), so autograd runs in a worker thread."""
    mode, spec = _chunked_call(code, scale, window, shift, chunk_size)

    def grads():
        ins = [x.detach().requires_grad_() for x in (q, k, v, qf, kf)]
        w = wscalar if weight is None else weight.detach().requires_grad_()
        out = hybrid_attention_chunked(*ins, spec=spec, mode=mode, weight=w, valid=None if valid is None else valid.bool())
        wrt = ins + ([w] if torch.is_tensor(w) else [])
        found = torch.autograd.grad(out, wrt, do.to(out.dtype), allow_unused=True)
        found = [torch.zeros_like(x) if g is None else g for g, x in zip(found, wrt)]
        return found + [None] * (6 - len(found))

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(grads).result()


def _bwd_dtypes(q, kf):
    return [q.dtype, q.dtype, q.dtype, kf.dtype, torch.float32]


@hybrid_bwd.register_fake
def _(do, q, k, v, qf, kf, weight, valid, out, xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg, scale, window, wscalar,
      code, shift, chunk_size):
    shapes = _bwd_shapes(q, k, qf, kf, weight, code)
    return [_empty(q) if s is None else q.new_empty(s, dtype=dt) for s, dt in zip(shapes, _bwd_dtypes(q, kf))]


def _setup_context(ctx, inputs, output):
    q, k, v, qf, kf, weight, valid, *params = inputs
    ctx.save_for_backward(q, k, v, qf, kf, weight, valid, *output)
    ctx.params = params
    ctx.mark_non_differentiable(*output[1:])


def _backward_formula(ctx, grads):
    q, k, v, qf, kf, weight, valid, *saved = ctx.saved_tensors
    mode = KERNEL_CODES[ctx.params[3]][0]
    dq, dkv, dqf, dkf, dw = hybrid_bwd(grads[0], q, k, v, qf, kf, weight, valid, *saved, *ctx.params)
    dq, dk = (dq, dkv[0]) if mode.uses_window else (None, None)
    dqf, dkf = (dqf, dkf) if mode.uses_linear else (None, None)
    dw = dw if dw.numel() and ctx.needs_input_grad[5] else None
    return dq, dk, dkv[1], dqf, dkf, dw, None, None, None, None, None, None, None


hybrid_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


def hybrid_attention_op(q, k, v, qf, kf, weight, valid, *, scale: float, window: int, wscalar: float, code: int,
                        shift: int, chunk_size: int) -> torch.Tensor:
    """The hybrid output through the custom ops (what `hybrid_attention_triton` runs under torch.compile); inputs
    as `_HybridFn` takes them: contiguous, one dtype, `weight` None / (Hq,) / (B, Hq, T) fp32, `valid` None or int8."""
    return hybrid_fwd(q, k, v, qf, kf, weight, valid, float(scale), int(window), float(wscalar), int(code), int(shift),
                      int(chunk_size))[0]


__all__ = ["hybrid_attention_op", "hybrid_bwd", "hybrid_fwd"]
