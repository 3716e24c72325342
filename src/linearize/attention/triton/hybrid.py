"""The hybrid layer on Triton kernels: `hybrid_attention_triton` (training/prefill, with autograd) and
`decode_output_triton` / `decode_step_triton` (one decoding step against the fixed-shape state).

Both compute exactly what `linearize.attention.chunked.hybrid_attention_chunked` and
`linearize.attention.recurrent.decode_output` compute (the quadratic spec is
`linearize.attention.reference`); the diagnostic modes 'sinks_only' and 'none', float64 inputs, and CPU tensors
outside `TRITON_INTERPRET=1` go to those PyTorch paths.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.recurrent import HybridState, advance_state, decode_output, fused_step
from linearize.attention.spec import AttentionSpec
from linearize.attention.triton import _kernels as K
from linearize.config import COMBINE_RULES, MODES, ComponentMode, component_mode

# The kernels' RULE code (the `if RULE == ...` branches of _kernels.py) of a mode that combines both branches: its
# combine rule's; a single-branch mode's is its registry entry's `kernel_code` (and the rule does not matter).
RULES = {"shared_norm": 0, "mix": 1}
_CODE_PAIRS = [(code, (mode, rule)) for mode in MODES.values() if mode.kernel_code is not None
               for rule, code in (RULES.items() if mode.combines else [("shared_norm", mode.kernel_code)])]
#: RULE code -> (the mode, the combine rule) it computes
KERNEL_CODES = dict(_CODE_PAIRS)
if set(RULES) != set(COMBINE_RULES) or len(KERNEL_CODES) != len(_CODE_PAIRS):
    raise ImportError("every combine rule of linearize.config needs its kernel code here, and no two modes or rules "
                      "may share a kernel code")

# Tuning knobs (tests shrink them to exercise several segments at small T).
TUNING = {
    "block_m": 64,  # feature tile of the linear branch
    "state_block_d": 128,  # value tile of the state scan kernels
    "chunks_per_segment": None,  # None: chosen from the machine's multiprocessor count
    "num_warps": None,  # None: 4 for head_dim <= 64, else 8
    "num_stages": 2,
    # key-side backward: programs per key chunk (None: up to kv_split_max while B*Hkv*chunks < 2x the SM count)
    "kv_split": None,
    "kv_split_max": 4,
    # decode: one program covers all of head_dim once the batch has this many (b, kv head) rows per SM
    "decode_full_d_rows_per_sm": 2,
}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter turns loop bounds into Python ints with int(array of shape (1,)), which numpy >= 2.3
    refuses; make __index__ take the single element instead (only under TRITON_INTERPRET=1, scoped like its own
    patches)."""
    try:
        from triton.runtime import interpreter as _itp
    except ImportError:  # pragma: no cover
        return
    original = getattr(_itp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_linearize_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._linearize_patched = True
    _itp._patch_lang_tensor = patched


if _interpret():
    _patch_interpreter()


def _kernel_ok(x: torch.Tensor) -> bool:
    return (x.is_cuda or _interpret()) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _mode_code(mode: ComponentMode, rule: str) -> int:
    if not mode.combines:
        return mode.kernel_code
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}")
    return RULES[rule]


class _Config:
    """Launch parameters shared by the forward and backward kernels of one call signature (built once: `_config`)."""

    def __init__(self, q, k, qf, *, scale, window, code, shift, chunk_size, has_valid, wmode):
        b, hq, t, d = q.shape
        self.b, self.hq, self.t, self.d = b, hq, t, d
        self.hkv = k.shape[1]
        self.g = hq // self.hkv
        self.m = qf.shape[-1]
        self.nrow = b * hq * t
        self.scale = float(scale)
        self.has_valid = bool(has_valid)
        self.wmode = wmode  # 0: a float (passed per call), 1: per head (Hq,), 2: per row (B, Hq, T)
        self.window = int(window)
        self.code = code
        mode = KERNEL_CODES[code][0]
        self.has_swa, self.has_la, self.combines = mode.uses_window, mode.uses_linear, mode.combines
        self.shift = int(shift)
        bt = int(chunk_size) if chunk_size else 64
        if bt & (bt - 1) or not 16 <= bt <= 64:
            bt = 64
        self.bt = bt
        self.n = triton.cdiv(t, bt)
        self.bd = _pow2(d)
        self.bm = min(TUNING["block_m"], _pow2(self.m))
        self.sbd = min(TUNING["state_block_d"], self.bd)
        bkv = b * self.hkv
        sms = _num_sms(q.device)
        tiles = triton.cdiv(self.m, self.bm) * triton.cdiv(d, self.sbd)
        cps = TUNING["chunks_per_segment"]
        if cps is None:
            # integer ceil-divisions: the fake (meta) implementation of ops.py runs this on symbolic sizes
            target = max(1, triton.cdiv(2 * sms, max(1, bkv * tiles)))
            cps = max(1, triton.cdiv(self.n, target))
        self.cps = int(cps)
        self.nseg = triton.cdiv(self.n, self.cps)
        self.tiles = tiles
        # segment prefix: all segments of a column block in one program, ~4k elements per program
        self.nsp = _pow2(self.nseg, 1)
        self.seg_block = max(8, 4096 // self.nsp)
        self.seg_nb1 = triton.cdiv(self.m * d, self.seg_block)
        self.seg_grid = (bkv, self.seg_nb1 + triton.cdiv(self.m, self.seg_block))
        # key side: NSPLIT programs per key chunk while the grid alone would leave SMs idle
        self.nk = triton.cdiv(t + self.shift, bt)
        split = TUNING["kv_split"]
        if split is None:
            progs, full = bkv * self.nk, 2 * sms
            items = max(self.g if self.has_swa else 1,
                        triton.cdiv(self.m, self.bm) if self.has_la else 1)  # the busiest loop's items
            split = 1 if progs >= full else min(TUNING["kv_split_max"], triton.cdiv(full, progs), items)
        self.ksplit = max(1, int(split))
        self.num_warps = TUNING["num_warps"] or (4 if self.bd <= 64 else 8)
        self.num_stages = TUNING["num_stages"]
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"


_CONFIGS: dict = {}


def _config(q, k, qf, scale, window, code, shift, chunk_size, has_valid, wmode) -> _Config:
    key = (q.shape, k.shape[1], qf.shape[-1], q.dtype, q.device, scale, window, code, shift, chunk_size,
           has_valid, wmode, *TUNING.values())  # TUNING: tests change it
    cfg = _CONFIGS.get(key)
    if cfg is None:
        if len(_CONFIGS) >= 256:
            _CONFIGS.clear()
        cfg = _CONFIGS[key] = _Config(q, k, qf, scale=scale, window=window, code=code, shift=shift,
                                      chunk_size=chunk_size, has_valid=has_valid, wmode=wmode)
    return cfg


def _segment_prefix(s_tot: torch.Tensor, z_tot: torch.Tensor, cfg: _Config, reverse: bool = False) -> None:
    """In place: segment totals (B*HKV, NSEG, ...) -> exclusive (reverse) prefix sums over the segments."""
    K.seg_prefix_kernel[cfg.seg_grid](s_tot, cfg.m * cfg.d, cfg.seg_nb1, z_tot, cfg.m, cfg.nseg,
                                      REVERSE=reverse, NSP=cfg.nsp, BLOCK=cfg.seg_block, num_warps=4)


def _states_fwd(kf, v, valid, cfg: _Config):
    bkv = cfg.b * cfg.hkv
    dev = kf.device
    s_loc = torch.empty(bkv, cfg.n, cfg.m, cfg.d, device=dev, dtype=kf.dtype)
    z_loc = torch.empty(bkv, cfg.n, cfg.m, device=dev, dtype=torch.float32)
    s_tot = torch.empty(bkv, cfg.nseg, cfg.m, cfg.d, device=dev, dtype=torch.float32)
    z_tot = torch.empty(bkv, cfg.nseg, cfg.m, device=dev, dtype=torch.float32)
    K.la_state_fwd_kernel[(cfg.nseg, bkv, cfg.tiles)](
        kf, v, valid, s_loc, z_loc, s_tot, z_tot,
        cfg.t, cfg.n, cfg.cps, cfg.nseg, cfg.hkv, cfg.m, cfg.d, cfg.shift,
        HAS_VALID=cfg.has_valid, BT=cfg.bt, BM=cfg.bm, BD=cfg.sbd, DOT_PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.nseg > 1:
        _segment_prefix(s_tot, z_tot, cfg)
    return s_loc, s_tot, z_loc, z_tot


def _forward(q, k, v, qf, kf, wrow, valid, wscalar, cfg: _Config):
    """Returns (out, xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg): the output and what backward reads.
    Pointers a mode never reads get an existing tensor (no allocation)."""
    b, hq, t, d = q.shape
    out = torch.empty_like(q)
    xs = torch.empty_like(q) if cfg.combines else out
    xl = torch.empty_like(q) if cfg.code == RULES["mix"] else out
    rows = torch.empty(4, b, hq, t, device=q.device, dtype=torch.float32)  # c, den_s, den_l, argmax (int32 bits)
    if cfg.has_la:
        s_loc, s_seg, z_loc, z_seg = _states_fwd(kf, v, valid, cfg)
        amat = torch.empty(b * hq, cfg.n, cfg.bt, cfg.bt, device=q.device, dtype=torch.float32)
    else:
        s_loc = s_seg = z_loc = z_seg = amat = rows
    K.hybrid_fwd_kernel[(b * hq, cfg.n)](
        q, k, v, qf, kf, valid, wrow, s_loc, s_seg, z_loc, z_seg,
        out, xs, xl, rows, amat,
        cfg.scale, wscalar, t, cfg.n, cfg.cps, cfg.nseg, hq, cfg.hkv, cfg.g, cfg.m, d, cfg.window, cfg.shift, cfg.nrow,
        RULE=cfg.code, HAS_SWA=cfg.has_swa, HAS_LA=cfg.has_la,
        HAS_VALID=cfg.has_valid, HAS_SEG=cfg.nseg > 1, WMODE=cfg.wmode,
        BT=cfg.bt, BM=cfg.bm, BD=cfg.bd, DOT_PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg


def _backward(do, q, k, v, qf, kf, wrow, valid, out, xs, xl, rows, amat, s_loc, s_seg, z_loc, z_seg, wscalar, cfg: _Config):
    dev, dt = q.device, q.dtype
    b, hq, t, d = q.shape
    bkv = b * cfg.hkv
    if do.dtype != dt or not do.is_contiguous():
        do = do.contiguous().to(dt)
    dq = torch.empty_like(q)
    coef = torch.empty(6, b, hq, t, device=dev, dtype=torch.float32)  # alpha, beta, delta, eps, dc, dw
    dqf, damat = (torch.empty_like(qf), torch.empty_like(amat)) if cfg.has_la else (coef, coef)
    K.hybrid_bwd_q_kernel[(b * hq, cfg.n)](
        q, k, v, qf, kf, valid, wrow, s_loc, s_seg, z_loc, z_seg,
        out, xs, xl, do, rows,
        dq, dqf, damat, coef,
        cfg.scale, wscalar, t, cfg.n, cfg.cps, cfg.nseg, hq, cfg.hkv, cfg.g, cfg.m, d, cfg.window, cfg.shift, cfg.nrow,
        RULE=cfg.code, HAS_SWA=cfg.has_swa, HAS_LA=cfg.has_la,
        HAS_VALID=cfg.has_valid, HAS_SEG=cfg.nseg > 1, WMODE=cfg.wmode,
        BT=cfg.bt, BM=cfg.bm, BD=cfg.bd, DOT_PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.has_la:
        ds_loc = torch.empty(bkv, cfg.n, cfg.m, cfg.d, device=dev, dtype=dt)
        dz_loc = torch.empty(bkv, cfg.n, cfg.m, device=dev, dtype=torch.float32)
        ds_seg = torch.empty(bkv, cfg.nseg, cfg.m, cfg.d, device=dev, dtype=torch.float32)
        dz_seg = torch.empty(bkv, cfg.nseg, cfg.m, device=dev, dtype=torch.float32)
        K.la_state_bwd_kernel[(cfg.nseg, bkv, cfg.tiles)](
            qf, do, coef, ds_loc, dz_loc, ds_seg, dz_seg,
            t, cfg.n, cfg.cps, cfg.nseg, hq, cfg.hkv, cfg.g, cfg.m, d, cfg.nrow,
            BT=cfg.bt, BM=cfg.bm, BD=cfg.sbd, DOT_PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if cfg.nseg > 1:
            _segment_prefix(ds_seg, dz_seg, cfg, reverse=True)
        dkf = torch.empty_like(kf)
    else:
        ds_loc = ds_seg = dz_loc = dz_seg = dkf = coef
    dkv = torch.empty((2, *k.shape), device=dev, dtype=dt)
    if cfg.ksplit > 1:  # fp32 partials per split, summed below
        part = torch.empty((cfg.ksplit, 2, *k.shape), device=dev, dtype=torch.float32)
        dk_out, dv_out, stride = part, part[0, 1], dkv.numel()
    else:
        dk_out, dv_out, stride = dkv[0], dkv[1], 0
    K.hybrid_bwd_kv_kernel[(bkv, cfg.nk, cfg.ksplit)](
        q, k, v, qf, kf, valid, do, rows, coef, amat, damat, ds_loc, ds_seg, dz_loc, dz_seg,
        dk_out, dv_out, dkf,
        cfg.scale, t, cfg.n, cfg.cps, cfg.nseg, hq, cfg.hkv, cfg.g, cfg.m, d, cfg.window, cfg.shift, cfg.nrow, stride,
        HAS_SWA=cfg.has_swa, HAS_LA=cfg.has_la,
        HAS_VALID=cfg.has_valid, HAS_SEG=cfg.nseg > 1, NSPLIT=cfg.ksplit,
        BT=cfg.bt, BM=cfg.bm, BD=cfg.bd, DOT_PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.ksplit > 1:
        K.split_sum_kernel[(triton.cdiv(stride, 1024),)](part, dkv, stride, NSPLIT=cfg.ksplit, BLOCK=1024, num_warps=4)
    dk, dv = dkv
    if not cfg.has_swa:  # la_only reads neither q nor k
        dq = dk = None
    dw = None if not cfg.combines or cfg.wmode == 0 else coef[5]  # the weight enters only where the branches combine
    return dq, dk, dv, (dqf if cfg.has_la else None), (dkf if cfg.has_la else None), dw


class _HybridFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qf, kf, wrow, valid, wscalar, cfg):
        saved = _forward(q, k, v, qf, kf, wrow if wrow is not None else q, valid if valid is not None else q,
                         wscalar, cfg)
        ctx.cfg, ctx.wscalar = cfg, wscalar
        ctx.save_for_backward(q, k, v, qf, kf, wrow, valid, *saved)
        return saved[0]

    @staticmethod
    def backward(ctx, do):
        q, k, v, qf, kf, wrow, valid, *saved = ctx.saved_tensors
        cfg = ctx.cfg
        dq, dk, dv, dqf, dkf, dw = _backward(do, q, k, v, qf, kf, wrow if wrow is not None else q,
                                             valid if valid is not None else q, *saved, ctx.wscalar, cfg)
        if dw is not None and ctx.needs_input_grad[5]:
            dw = dw.sum((0, 2)) if cfg.wmode == 1 else dw
        else:
            dw = None
        return dq, dk, dv, dqf, dkf, dw, None, None, None


def _prep(x: torch.Tensor, dt) -> torch.Tensor:
    return x if x.dtype == dt and x.is_contiguous() else x.to(dt).contiguous()


def hybrid_attention_triton(q, k, v, qf, kf, *, spec: AttentionSpec, mode: str | ComponentMode = "hybrid", weight=0.1,
                            valid=None) -> torch.Tensor:
    """Hybrid attention (B, Hq, T, d) with exactly the semantics of `hybrid_attention_chunked`, on Triton kernels.

    Differentiable in q, k, v, qf, kf and weight.  `spec.chunk_size` is the kernels' block size when it is a power of
    two in [16, 64] (64 otherwise); it changes no result.
    """
    mode = component_mode(mode)
    if mode.uses_window and spec.softmax_extras:
        raise ValueError("softmax_sinks and sparse_memory run on the PyTorch paths only; the Triton kernels do not "
                         "implement them")
    if mode.kernel_code is None or not _kernel_ok(q) or q.shape[2] == 0:
        return hybrid_attention_chunked(q, k, v, qf, kf, spec=spec, mode=mode, weight=weight, valid=valid)
    window, scale, chunk_size = spec.window, spec.scale, spec.chunk_size
    b, hq, t, d = q.shape
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    code = _mode_code(mode, spec.rule)
    shift = mode.linear_lag(spec.placement, int(window)) or 0
    dt = q.dtype
    q, k, v, qf, kf = (_prep(x, dt) for x in (q, k, v, qf, kf))
    if valid is not None:  # no valid.all() check: it would synchronise with the device on every call
        valid = valid.to(q.device)
        # a bool mask is read in place as bytes (no copy); under torch.compile it is converted, as torch 2.11's
        # inductor cannot lower a bool -> int8 bitcast on CUDA
        if valid.dtype == torch.bool and valid.is_contiguous() and not torch.compiler.is_compiling():
            valid = valid.view(torch.int8)
        else:
            valid = valid.to(torch.int8).contiguous()
    wscalar, w = 0.0, None
    if not torch.is_tensor(weight):
        wmode, wscalar = 0, float(weight)
    else:
        w = weight.to(device=q.device, dtype=torch.float32)
        if w.dim() == 0:
            w = w.reshape(1).expand(hq)
        if w.dim() == 1:
            wmode = 1
            w = w if w.shape[0] == hq and w.is_contiguous() else w.expand(hq).contiguous()
        else:
            wmode, w = 2, w.expand(b, hq, t).contiguous()
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom ops of ops.py, no graph break
        return torch.ops.linearize.hybrid_fwd(q, k, v, qf, kf, w, valid, float(scale), int(window), float(wscalar), code,
                                              shift, int(chunk_size))[0]
    cfg = _config(q, k, qf, scale, window, code, shift, chunk_size, valid is not None, wmode)
    return _HybridFn.apply(q, k, v, qf, kf, w, valid, wscalar, cfg)


# ----------------------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------------------
def _uses_decode_kernel(state: HybridState, q, mode: ComponentMode) -> bool:
    return mode.kernel_code is not None and _kernel_ok(q) and state.S.dtype == torch.float32 and state.buf_k.shape[2] > 0


def _full_d(b: int, hkv: int, d: int, device) -> bool:
    """One program per (b, kv head) over all of head_dim: it streams its S slab once and computes the window logits
    once (~1.9x faster at B=512, d=256 on an H100); at small batches d-tiles keep more programs running."""
    return d <= 256 and b * hkv >= TUNING["decode_full_d_rows_per_sm"] * _num_sms(device)


def decode_output_triton(
    state: HybridState, q, k, v, qf, kf, *, spec: AttentionSpec, mode: str | ComponentMode = "hybrid", weight=0.1,
    valid=None, fold: bool = False,
) -> torch.Tensor:
    """One token's output (B, Hq, 1, d), same contract as `recurrent.decode_output`: the state is only read
    (`recurrent.advance_state` appends the token), unless `fold`, where the kernel also folds the key leaving the
    window into S and z in place (`decode_step_triton` uses it; then call `advance_state(..., fold=False)`)."""
    mode = component_mode(mode)
    if not _uses_decode_kernel(state, q, mode):
        if fold:
            raise ValueError("fold needs the decode kernel")
        return decode_output(state, q, k, v, qf, kf, spec=spec, mode=mode, weight=weight, valid=valid)
    code = _mode_code(mode, spec.rule)
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    m = qf.shape[-1]
    L = state.buf_k.shape[2]  # the ring: w - 1 slots, empty ones invalid
    dev = q.device
    if valid is None:
        valid = torch.ones(b, 1, dtype=torch.bool, device=dev)
    if torch.is_tensor(weight):
        w = weight.to(device=dev, dtype=torch.float32)
        w = (w.view(1, -1) if w.dim() == 1 else w.reshape(b, hq, -1)[..., 0]).expand(b, hq).contiguous()
    else:
        w = torch.full((b, hq), float(weight), device=dev, dtype=torch.float32)
    la_window = mode.linear_lag(spec.placement, L + 1) == 0  # the linear branch reads the window's keys too
    out = torch.empty(b, hq, 1, d, device=dev, dtype=q.dtype)
    full_d = _full_d(b, hkv, d, dev)
    if fold and not full_d:
        raise ValueError("fold needs one program per (b, kv head): see _full_d")
    bd = _pow2(d) if full_d else min(64, _pow2(d))
    K.hybrid_decode_kernel[(b * hkv, triton.cdiv(d, bd))](
        q.contiguous(), qf.contiguous(), k.contiguous(), v.contiguous(), kf.contiguous(), valid.to(torch.int8).contiguous(),
        state.buf_k, state.buf_v, state.buf_kf, state.buf_valid.to(torch.int8), state.slot, state.S, state.z, w, out,
        float(spec.scale), L, hq, hkv, hq // hkv, m, d,
        RULE=code, HAS_SWA=mode.uses_window, HAS_LA=mode.uses_linear, LA_WINDOW=la_window, FOLD=fold,
        GP=_pow2(hq // hkv, 1), BL=_pow2(L + 1, 2), BM=32, BD=bd, BDK=min(32, _pow2(d)), num_warps=4,
    )
    return out


def decode_step_triton(state: HybridState, q, k, v, qf, kf, *, spec: AttentionSpec, modes, weight=0.1,
                       valid=None) -> dict[str, torch.Tensor]:
    """`recurrent.decode_step` on the decode kernel: where one program covers a whole (b, kv head), the last kernel
    call also folds the leaving key into S and z (saving a pass over S), after every other mode has read them.
    Where the one-launch step of `attention/triton/decode.py` applies, that runs instead (`recurrent.fused_step`)."""
    fused = fused_step(state, q, k, v, qf, kf, spec=spec, modes=modes, weight=weight, valid=valid)
    if fused is not None:
        return fused
    kernel_modes = [mode for mode in modes if _uses_decode_kernel(state, q, component_mode(mode))]
    folding = kernel_modes[-1] if kernel_modes and _full_d(q.shape[0], k.shape[1], q.shape[-1], q.device) else None
    call = dict(spec=spec, weight=weight, valid=valid)
    outs = {mode: decode_output_triton(state, q, k, v, qf, kf, mode=mode, **call) for mode in modes if mode != folding}
    if folding is not None:
        outs[folding] = decode_output_triton(state, q, k, v, qf, kf, mode=folding, fold=True, **call)
    advance_state(state, k, v, kf, valid, fold=folding is None)
    return outs
