"""Triton kernels of the hybrid layer: sliding-window softmax + linear attention, chunked, forward and backward.

Notation (one batch row b, one query head h, its key/value head hk = h // G):
  l_ts   = scale * q_t . k_s                                window logits
  W_t    = {s : t - w < s <= t, valid_s}                    window keys
  c_t    = max_{s in W_t} l_ts (0 when W_t is empty)
  num_s  = sum_{s in W_t} exp(l_ts - c_t) v_s,  den_s = sum_{s in W_t} exp(l_ts - c_t)
  P_t    = {s <= t - SHIFT, valid_s}                        linear keys (SHIFT = w for 'complementary', else 0)
  A_ts   = qf_t . kf_s
  num_l  = sum_{s in P_t} A_ts v_s,                 den_l = sum_{s in P_t} A_ts
  out_t  = a_t * num_s + b_t * num_l                (a, b from the combination rule; see `_coefficients`)

Chunking: the time axis is cut into chunks of BT queries.  The linear branch runs on keys shifted right by
SHIFT (key s sits at position s + SHIFT), so query chunk i meets the *shifted* key chunk i on its diagonal
(causal mask inside) and the state S_i = sum over shifted key chunks < i of kf^T v (m x d) for the rest.
States are built per segment of CPS chunks by `la_state_fwd_kernel` (in-segment exclusive prefix, stored in the
input dtype) plus an exclusive prefix over segment totals (fp32, `seg_prefix_kernel`): S_i = S_loc[i] + S_seg[i // CPS].

RULE codes: 0 shared_norm, 1 mix (both branches, combined by that rule: triton.hybrid.RULES), 2 window only
('swa_only'), 3 linear only ('la_only'); the modes' codes are their linearize.config.MODES entries' kernel_code.
All accumulation is fp32; tensor-core operands are in the input dtype (bf16/fp16), or fp32 with IEEE precision.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------------------------
# forward: linear-attention chunk states
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def la_state_fwd_kernel(
    KF, V, VALID, S_LOC, Z_LOC, S_TOT, Z_TOT,
    T, N, CPS, NSEG, HKV, M, D, SHIFT,
    HAS_VALID: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per-chunk linear-attention states, exclusive within a segment of CPS chunks.

    Naive reference (per b, hk; kf' and v' are kf, v shifted right by SHIFT with invalid keys zeroed):
        for seg: S = 0; z = 0
            for c in chunks of seg: S_loc[c] = S; z_loc[c] = z; S += kf'_c^T v'_c; z += kf'_c.sum(0)
            S_tot[seg] = S; z_tot[seg] = z
    Grid: (NSEG, B*HKV, m-tiles * d-tiles).
    """
    pid_seg = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_md = tl.program_id(2)
    ndt = tl.cdiv(D, BD)
    pid_m = pid_md // ndt
    pid_d = pid_md % ndt
    b = pid_bh // HKV
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mm = offs_m < M
    md = offs_d < D
    bh64 = pid_bh.to(tl.int64)
    kf_base = KF + bh64 * T * M
    v_base = V + bh64 * T * D
    S = tl.zeros([BM, BD], dtype=tl.float32)
    z = tl.zeros([BM], dtype=tl.float32)
    c_lo = pid_seg * CPS
    c_hi = tl.minimum(c_lo + CPS, N)
    for c in range(c_lo, c_hi):
        s_ptr = S_LOC + ((bh64 * N + c) * M + offs_m[:, None]) * D + offs_d[None, :]
        tl.store(s_ptr, S.to(S_LOC.dtype.element_ty), mask=mm[:, None] & md[None, :])
        if pid_d == 0:
            tl.store(Z_LOC + (bh64 * N + c) * M + offs_m, z, mask=mm)
        ks = c * BT - SHIFT + tl.arange(0, BT)
        km = (ks >= 0) & (ks < T)
        if HAS_VALID:
            km = km & (tl.load(VALID + b * T + ks, mask=km, other=0) != 0)
        kf = tl.load(kf_base + ks[:, None] * M + offs_m[None, :], mask=km[:, None] & mm[None, :], other=0.0)
        v = tl.load(v_base + ks[:, None] * D + offs_d[None, :], mask=km[:, None] & md[None, :], other=0.0)
        S += tl.dot(tl.trans(kf), v, input_precision=DOT_PREC)
        z += tl.sum(kf.to(tl.float32), 0)
    t_ptr = S_TOT + ((bh64 * NSEG + pid_seg) * M + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(t_ptr, S, mask=mm[:, None] & md[None, :])
    if pid_d == 0:
        tl.store(Z_TOT + (bh64 * NSEG + pid_seg) * M + offs_m, z, mask=mm)


@triton.jit
def seg_prefix_kernel(X1, E1, NB1, X2, E2, NSEG, REVERSE: tl.constexpr, NSP: tl.constexpr, BLOCK: tl.constexpr):
    """In place, over the segment axis of X1 (B*H, NSEG, E1) and X2 (B*H, NSEG, E2), one launch for both:
    X[:, s] <- sum_{s' < s} X[:, s'] (REVERSE: s' > s).  Programs pid < NB1 take X1, the others X2.
    All NSEG (<= NSP) segments of a column block are loaded at once and scanned: one memory round trip instead of NSEG
    dependent ones.  Exclusive = inclusive - own value, so that every element is read and written by the same thread
    (no cross-thread hazard in place)."""
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    if pid_e < NB1:
        base = X1 + pid_bh.to(tl.int64) * NSEG * E1
        E = E1
        offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    else:
        base = X2 + pid_bh.to(tl.int64) * NSEG * E2
        E = E2
        offs = (pid_e - NB1) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < E
    segs = tl.arange(0, NSP)
    ptr = base + segs[:, None] * E + offs[None, :]
    m2 = (segs < NSEG)[:, None] & msk[None, :]
    x = tl.load(ptr, mask=m2, other=0.0)
    tl.store(ptr, tl.cumsum(x, 0, reverse=REVERSE) - x, mask=m2)


# ----------------------------------------------------------------------------------------------------------------
# forward: the hybrid output, one program per (query chunk, b, h)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def hybrid_fwd_kernel(
    Q, K, V, QF, KF, VALID, WROW, S_LOC, S_SEG, Z_LOC, Z_SEG,
    OUT, XS, XL, ROWS, AMAT,
    scale, wscalar, T, N, CPS, NSEG, HQ, HKV, G, M, D, W, SHIFT, NROW,
    RULE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_LA: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr, WMODE: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Hybrid attention output for BT queries.

    Naive reference (rows t of the chunk, see the module docstring for the symbols):
        A      = (qf_i @ kf'_i^T) * causal * valid'          # diagonal linear block, saved for backward
        den_l  = A.sum(1) + qf_i @ z_i ;  num_l = A @ v'_i + qf_i @ S_i
        num_s, den_s, c, argmax  by an online softmax over the window key blocks
        shared_norm: out = (g num_s + num_l) / (g den_s + den_l)
        mix:         out = g' num_s/den_s + (1 - g') num_l/den_l,  g' = 1 where den_l == 0
    Also stores, per row, ROWS = (c, den_s, den_l, argmax as int32 bits), each (B*HQ*T,); and for backward XS = o_s - out (shared_norm) or o_s (mix),
    XL = o_l - o_s (mix), with o_s = num_s/den_s, o_l = num_l/den_l: differences are formed in fp32 before rounding,
    so the weight gradient (a difference of nearly equal dot products) keeps its precision in bf16.
    Grid: (B*HQ, N).
    """
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    pid_kv = b * HKV + h // G
    dtype = Q.dtype.element_ty
    bh64 = pid_bh.to(tl.int64)
    kv64 = pid_kv.to(tl.int64)
    t0 = pid_t * BT
    offs_t = t0 + tl.arange(0, BT)
    tm = offs_t < T
    offs_d = tl.arange(0, BD)
    md = offs_d < D
    row = bh64 * T + offs_t  # index into (B*HQ, T) arrays

    acc = tl.zeros([BT, BD], dtype=tl.float32)
    den_s = tl.zeros([BT], dtype=tl.float32)
    den_l = tl.zeros([BT], dtype=tl.float32)
    c = tl.zeros([BT], dtype=tl.float32)
    arg = tl.zeros([BT], dtype=tl.int32)
    seg = pid_t // CPS

    if HAS_LA:
        ks = t0 - SHIFT + tl.arange(0, BT)
        km = (ks >= 0) & (ks < T)
        if HAS_VALID:
            km = km & (tl.load(VALID + b * T + ks, mask=km, other=0) != 0)
        A = tl.zeros([BT, BT], dtype=tl.float32)
        den_inter = tl.zeros([BT], dtype=tl.float32)
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            mm = offs_m < M
            qf = tl.load(QF + (bh64 * T + offs_t[:, None]) * M + offs_m[None, :], mask=tm[:, None] & mm[None, :], other=0.0)
            kf = tl.load(KF + (kv64 * T + ks[:, None]) * M + offs_m[None, :], mask=km[:, None] & mm[None, :], other=0.0)
            A += tl.dot(qf, tl.trans(kf), input_precision=DOT_PREC)
            z = tl.load(Z_LOC + (kv64 * N + pid_t) * M + offs_m, mask=mm, other=0.0)
            if HAS_SEG:
                z += tl.load(Z_SEG + (kv64 * NSEG + seg) * M + offs_m, mask=mm, other=0.0)
            den_inter += tl.sum(qf.to(tl.float32) * z[None, :], 1)
        causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
        A = tl.where(causal & km[None, :], A, 0.0)
        den_l = tl.sum(A, 1) + den_inter
        a_ptr = AMAT + ((bh64 * N + pid_t) * BT + tl.arange(0, BT)[:, None]) * BT + tl.arange(0, BT)[None, :]
        tl.store(a_ptr, A)

    if HAS_SWA:
        q = tl.load(Q + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=tm[:, None] & md[None, :], other=0.0)
        m_i = tl.full([BT], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BT], dtype=tl.float32)
        lo = tl.maximum(t0 - W + 1, 0)
        hi = tl.minimum(t0 + BT, T)
        for k0 in range(lo, hi, BT):
            offs_k = k0 + tl.arange(0, BT)
            kin = offs_k < hi
            if HAS_VALID:
                kin = kin & (tl.load(VALID + b * T + offs_k, mask=kin, other=0) != 0)
            kk = tl.load(K + (kv64 * T + offs_k[:, None]) * D + offs_d[None, :], mask=kin[:, None] & md[None, :], other=0.0)
            vv = tl.load(V + (kv64 * T + offs_k[:, None]) * D + offs_d[None, :], mask=kin[:, None] & md[None, :], other=0.0)
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
            diff = offs_t[:, None] - offs_k[None, :]
            msk = (diff >= 0) & (diff < W) & kin[None, :]
            s = tl.where(msk, s, float("-inf"))
            blk_max = tl.max(s, 1)
            blk_arg = tl.argmax(s, 1).to(tl.int32)
            arg = tl.where(blk_max > m_i, k0 + blk_arg, arg)
            m_new = tl.maximum(m_i, blk_max)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), vv, input_precision=DOT_PREC)
            m_i = m_new
        c = tl.where(m_i == float("-inf"), 0.0, m_i)
        den_s = l_i

    # combination coefficients: out = a * acc_swa + bcoef * (LA sums)
    inv_s = tl.where(den_s == 0.0, 0.0, 1.0 / tl.where(den_s == 0.0, 1.0, den_s))
    inv_l = tl.where(den_l == 0.0, 0.0, 1.0 / tl.where(den_l == 0.0, 1.0, den_l))
    if WMODE == 0:
        wrow = tl.zeros([BT], dtype=tl.float32) + wscalar
    elif WMODE == 1:
        wrow = tl.load(WROW + h + offs_t * 0)
    else:
        wrow = tl.load(WROW + row, mask=tm, other=0.0)
    xs_ptr = XS + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :]
    om = tm[:, None] & md[None, :]
    out_ptr = OUT + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :]
    if RULE == 0:
        # accumulate out - o_s = (num_l - den_l o_s) / D, so that XS = o_s - out keeps full precision for backward
        den = wrow * den_s + den_l
        inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        o_s = acc * inv_s[:, None]
        tl.store(out_ptr, o_s.to(OUT.dtype.element_ty), mask=om)  # parked in OUT until the end
        acc = o_s * (-den_l * inv)[:, None]
        bcoef = inv
    elif RULE == 1:
        o_s = acc * inv_s[:, None]
        tl.store(xs_ptr, o_s.to(XS.dtype.element_ty), mask=om)
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        bcoef = inv_l
    elif RULE == 2:
        acc = acc * inv_s[:, None]
        bcoef = inv_l * 0.0
    else:
        bcoef = inv_l

    if HAS_LA:
        vl = tl.load(V + (kv64 * T + ks[:, None]) * D + offs_d[None, :], mask=km[:, None] & md[None, :], other=0.0)
        acc += tl.dot((A * bcoef[:, None]).to(dtype), vl, input_precision=DOT_PREC)
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            mm = offs_m < M
            qf = tl.load(QF + (bh64 * T + offs_t[:, None]) * M + offs_m[None, :], mask=tm[:, None] & mm[None, :], other=0.0)
            qfb = (qf.to(tl.float32) * bcoef[:, None]).to(dtype)
            smask = mm[:, None] & md[None, :]
            st = tl.load(S_LOC + ((kv64 * N + pid_t) * M + offs_m[:, None]) * D + offs_d[None, :], mask=smask, other=0.0)
            st = st.to(tl.float32)
            if HAS_SEG:
                st += tl.load(S_SEG + ((kv64 * NSEG + seg) * M + offs_m[:, None]) * D + offs_d[None, :], mask=smask, other=0.0)
            acc += tl.dot(qfb, st.to(dtype), input_precision=DOT_PREC)

    if RULE == 0:
        tl.store(xs_ptr, (-acc).to(XS.dtype.element_ty), mask=om)  # o_s - out
        tl.debug_barrier()
        acc = acc + tl.load(out_ptr, mask=om, other=0.0).to(tl.float32)
    if RULE == 1:
        tl.store(XL + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], (acc - o_s).to(XL.dtype.element_ty), mask=om)
        gp = tl.where(den_l == 0.0, 1.0, wrow)
        acc = gp[:, None] * o_s + (1.0 - gp)[:, None] * acc

    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=om)
    tl.store(ROWS + row, c, mask=tm)
    tl.store(ROWS + NROW + row, den_s, mask=tm)
    tl.store(ROWS + 2 * NROW + row, den_l, mask=tm)
    tl.store(ROWS + 3 * NROW + row, arg.to(tl.float32, bitcast=True), mask=tm)


# ----------------------------------------------------------------------------------------------------------------
# backward 1: query side (row coefficients, dq, dqf, the diagonal dA blocks)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def hybrid_bwd_q_kernel(
    Q, K, V, QF, KF, VALID, WROW, S_LOC, S_SEG, Z_LOC, Z_SEG,
    OUT, XS, XL, DO, ROWS,
    DQ, DQF, DAMAT, COEF,
    scale, wscalar, T, N, CPS, NSEG, HQ, HKV, G, M, D, W, SHIFT, NROW,
    RULE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_LA: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr, WMODE: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Query-side backward for BT queries.

    With do = dL/dout, the per-row coefficients are
        d num_s = alpha do,  d den_s = beta,  d num_l = delta do,  d den_l = eps,  d c = dc,  d weight = dw
      shared_norm (D = g den_s + den_l, P = do.out, Qs = do.num_s/den_s):
        alpha = g/D, delta = 1/D, beta = -alpha P, eps = -delta P, dw = den_s (Qs - P)/D, dc = -g dw
        (Qs - P = do.XS, read from the fp32-formed difference)
        (the output depends on the window max c through exp(l - c); dc flows to the argmax logit)
      mix (g' = g, or 1 where den_l == 0; Ql = do.num_l/den_l):
        alpha = g'/den_s, beta = -alpha Qs, delta = (1-g')/den_l, eps = -delta Ql, dw = Qs - Ql (0 where den_l == 0)
    Naive reference of the rest:
        dl_ts = p_ts (alpha_t do_t.v_s + beta_t) + [s == argmax_t] dc_t      (window s, p = exp(l - c))
        dq_t  = sum_s dl_ts * scale * k_s
        dA    = (delta do_i @ v'_i^T + eps) * causal * valid'                (saved for the key side)
        dqf_i = dA @ kf'_i + (delta do_i) @ S_i^T + eps z_i^T
    COEF rows: (alpha, beta, delta, eps, dc, dw), each (B*HQ*T,).  Grid: (B*HQ, N).
    """
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    pid_kv = b * HKV + h // G
    dtype = Q.dtype.element_ty
    bh64 = pid_bh.to(tl.int64)
    kv64 = pid_kv.to(tl.int64)
    t0 = pid_t * BT
    offs_t = t0 + tl.arange(0, BT)
    tm = offs_t < T
    offs_d = tl.arange(0, BD)
    md = offs_d < D
    om = tm[:, None] & md[None, :]
    row = bh64 * T + offs_t
    seg = pid_t // CPS

    do = tl.load(DO + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0)  # input dtype
    den_s = tl.load(ROWS + NROW + row, mask=tm, other=0.0)
    den_l = tl.load(ROWS + 2 * NROW + row, mask=tm, other=0.0)
    if WMODE == 0:
        wrow = tl.zeros([BT], dtype=tl.float32) + wscalar
    elif WMODE == 1:
        wrow = tl.load(WROW + h + offs_t * 0)
    else:
        wrow = tl.load(WROW + row, mask=tm, other=0.0)
    inv_s = tl.where(den_s == 0.0, 0.0, 1.0 / tl.where(den_s == 0.0, 1.0, den_s))
    inv_l = tl.where(den_l == 0.0, 0.0, 1.0 / tl.where(den_l == 0.0, 1.0, den_l))
    zero = den_s * 0.0
    if RULE == 0:
        out = tl.load(OUT + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0).to(tl.float32)
        xs = tl.load(XS + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0).to(tl.float32)
        P = tl.sum(do.to(tl.float32) * out, 1)
        Qd = tl.sum(do.to(tl.float32) * xs, 1)  # do . (o_s - out), stored as a difference for precision
        den = wrow * den_s + den_l
        inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        alpha = wrow * inv
        delta = inv
        beta = -alpha * P
        eps = -delta * P
        dw = den_s * Qd * inv
        dc = -wrow * dw
    elif RULE == 1:
        xs = tl.load(XS + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0).to(tl.float32)
        xl = tl.load(XL + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0).to(tl.float32)
        Qs = tl.sum(do.to(tl.float32) * xs, 1)
        Qd = tl.sum(do.to(tl.float32) * xl, 1)  # do . (o_l - o_s)
        Ql = Qs + Qd
        gp = tl.where(den_l == 0.0, 1.0, wrow)
        alpha = gp * inv_s
        beta = -alpha * Qs
        delta = (1.0 - gp) * inv_l
        eps = -delta * Ql
        dw = tl.where(den_l == 0.0, 0.0, -Qd)
        dc = zero
    elif RULE == 2:
        out = tl.load(OUT + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0).to(tl.float32)
        P = tl.sum(do.to(tl.float32) * out, 1)
        alpha = inv_s
        beta = -alpha * P
        delta = zero
        eps = zero
        dw = zero
        dc = zero
    else:
        out = tl.load(OUT + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0).to(tl.float32)
        P = tl.sum(do.to(tl.float32) * out, 1)
        alpha = zero
        beta = zero
        delta = inv_l
        eps = -delta * P
        dw = zero
        dc = zero
    tl.store(COEF + row, alpha, mask=tm)
    tl.store(COEF + NROW + row, beta, mask=tm)
    tl.store(COEF + 2 * NROW + row, delta, mask=tm)
    tl.store(COEF + 3 * NROW + row, eps, mask=tm)
    tl.store(COEF + 4 * NROW + row, dc, mask=tm)
    tl.store(COEF + 5 * NROW + row, dw, mask=tm)

    dq = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_SWA:
        q = tl.load(Q + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], mask=om, other=0.0)
        c = tl.load(ROWS + row, mask=tm, other=0.0)
        arg = tl.where(tm, tl.load(ROWS + 3 * NROW + row, mask=tm, other=0.0).to(tl.int32, bitcast=True), -1)
        doa = (do.to(tl.float32) * alpha[:, None]).to(dtype)
        lo = tl.maximum(t0 - W + 1, 0)
        hi = tl.minimum(t0 + BT, T)
        for k0 in range(lo, hi, BT):
            offs_k = k0 + tl.arange(0, BT)
            kin = offs_k < hi
            if HAS_VALID:
                kin = kin & (tl.load(VALID + b * T + offs_k, mask=kin, other=0) != 0)
            kk = tl.load(K + (kv64 * T + offs_k[:, None]) * D + offs_d[None, :], mask=kin[:, None] & md[None, :], other=0.0)
            vv = tl.load(V + (kv64 * T + offs_k[:, None]) * D + offs_d[None, :], mask=kin[:, None] & md[None, :], other=0.0)
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
            diff = offs_t[:, None] - offs_k[None, :]
            msk = (diff >= 0) & (diff < W) & kin[None, :]
            p = tl.where(msk, tl.exp(s - c[:, None]), 0.0)
            dp = tl.dot(doa, tl.trans(vv), input_precision=DOT_PREC) + beta[:, None]
            dl = p * dp + tl.where(msk & (offs_k[None, :] == arg[:, None]), dc[:, None], 0.0)
            dq += tl.dot((dl * scale).to(dtype), kk, input_precision=DOT_PREC)
    tl.store(DQ + (bh64 * T + offs_t[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=om)

    if HAS_LA:
        ks = t0 - SHIFT + tl.arange(0, BT)
        km = (ks >= 0) & (ks < T)
        if HAS_VALID:
            km = km & (tl.load(VALID + b * T + ks, mask=km, other=0) != 0)
        vl = tl.load(V + (kv64 * T + ks[:, None]) * D + offs_d[None, :], mask=km[:, None] & md[None, :], other=0.0)
        dod = (do.to(tl.float32) * delta[:, None]).to(dtype)
        dA = tl.dot(dod, tl.trans(vl), input_precision=DOT_PREC) + eps[:, None]
        causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
        dA = tl.where(causal & km[None, :], dA, 0.0)
        a_ptr = DAMAT + ((bh64 * N + pid_t) * BT + tl.arange(0, BT)[:, None]) * BT + tl.arange(0, BT)[None, :]
        tl.store(a_ptr, dA)
        dAc = dA.to(dtype)
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            mm = offs_m < M
            kf = tl.load(KF + (kv64 * T + ks[:, None]) * M + offs_m[None, :], mask=km[:, None] & mm[None, :], other=0.0)
            dqf = tl.dot(dAc, kf, input_precision=DOT_PREC)
            smask = mm[:, None] & md[None, :]
            st = tl.load(S_LOC + ((kv64 * N + pid_t) * M + offs_m[:, None]) * D + offs_d[None, :], mask=smask, other=0.0)
            st = st.to(tl.float32)
            if HAS_SEG:
                st += tl.load(S_SEG + ((kv64 * NSEG + seg) * M + offs_m[:, None]) * D + offs_d[None, :], mask=smask, other=0.0)
            dqf += tl.dot(dod, tl.trans(st.to(dtype)), input_precision=DOT_PREC)
            z = tl.load(Z_LOC + (kv64 * N + pid_t) * M + offs_m, mask=mm, other=0.0)
            if HAS_SEG:
                z += tl.load(Z_SEG + (kv64 * NSEG + seg) * M + offs_m, mask=mm, other=0.0)
            dqf += eps[:, None] * z[None, :]
            tl.store(DQF + (bh64 * T + offs_t[:, None]) * M + offs_m[None, :], dqf.to(DQF.dtype.element_ty), mask=tm[:, None] & mm[None, :])


# ----------------------------------------------------------------------------------------------------------------
# backward 2: reverse scan of the linear-attention state gradient
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def la_state_bwd_kernel(
    QF, DO, COEF, DS_LOC, DZ_LOC, DS_TOT, DZ_TOT,
    T, N, CPS, NSEG, HQ, HKV, G, M, D, NROW,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Gradient of the chunk states, exclusive suffix within a segment (the backward twin of la_state_fwd_kernel).

    Naive reference (per b, hk; the query heads h of the group; delta, eps from COEF):
        for seg: dS = 0; dz = 0
            for c in reversed(chunks of seg): dS_loc[c] = dS; dz_loc[c] = dz
                dS += sum_h qf_h,c^T (delta do_h,c);  dz += sum_h (eps qf_h,c).sum(0)
            dS_tot[seg] = dS; dz_tot[seg] = dz
    so that dS_j = sum over query chunks i > j.  Grid: (NSEG, B*HKV, m-tiles * d-tiles).
    """
    pid_seg = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    pid_md = tl.program_id(2)
    ndt = tl.cdiv(D, BD)
    pid_m = pid_md // ndt
    pid_d = pid_md % ndt
    b = pid_bkv // HKV
    hk = pid_bkv % HKV
    dtype = QF.dtype.element_ty
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mm = offs_m < M
    md = offs_d < D
    kv64 = pid_bkv.to(tl.int64)
    dS = tl.zeros([BM, BD], dtype=tl.float32)
    dz = tl.zeros([BM], dtype=tl.float32)
    c_lo = pid_seg * CPS
    c_hi = tl.minimum(c_lo + CPS, N)
    for idx in range(0, c_hi - c_lo):
        c = c_hi - 1 - idx
        s_ptr = DS_LOC + ((kv64 * N + c) * M + offs_m[:, None]) * D + offs_d[None, :]
        tl.store(s_ptr, dS.to(DS_LOC.dtype.element_ty), mask=mm[:, None] & md[None, :])
        if pid_d == 0:
            tl.store(DZ_LOC + (kv64 * N + c) * M + offs_m, dz, mask=mm)
        rows = c * BT + tl.arange(0, BT)
        rm = rows < T
        for g in range(0, G):
            bh64 = (b * HQ + hk * G + g).to(tl.int64)
            qf = tl.load(QF + (bh64 * T + rows[:, None]) * M + offs_m[None, :], mask=rm[:, None] & mm[None, :], other=0.0)
            do = tl.load(DO + (bh64 * T + rows[:, None]) * D + offs_d[None, :], mask=rm[:, None] & md[None, :], other=0.0)
            delta = tl.load(COEF + 2 * NROW + bh64 * T + rows, mask=rm, other=0.0)
            eps = tl.load(COEF + 3 * NROW + bh64 * T + rows, mask=rm, other=0.0)
            dS += tl.dot(tl.trans(qf), (do.to(tl.float32) * delta[:, None]).to(dtype), input_precision=DOT_PREC)
            dz += tl.sum(qf.to(tl.float32) * eps[:, None], 0)
    t_ptr = DS_TOT + ((kv64 * NSEG + pid_seg) * M + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(t_ptr, dS, mask=mm[:, None] & md[None, :])
    if pid_d == 0:
        tl.store(DZ_TOT + (kv64 * NSEG + pid_seg) * M + offs_m, dz, mask=mm)


# ----------------------------------------------------------------------------------------------------------------
# backward 3: key side (dk, dv, dkf), one program per shifted key chunk and key/value head
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def hybrid_bwd_kv_kernel(
    Q, K, V, QF, KF, VALID, DO, ROWS, COEF, AMAT, DAMAT, DS_LOC, DS_SEG, DZ_LOC, DZ_SEG,
    DK, DV, DKF,
    scale, T, N, CPS, NSEG, HQ, HKV, G, M, D, W, SHIFT, NROW, SPLIT_STRIDE,
    HAS_SWA: tl.constexpr, HAS_LA: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr, NSPLIT: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Key-side backward for the BT keys s = j*BT - SHIFT + [0, BT) (the shifted linear chunk j).

    Naive reference (sums over the query heads h of the group):
        window part, queries t in [s, s + w - 1]:
            p_ts = exp(l_ts - c_t);  dv_s += sum_t alpha_t p_ts do_t
            dl_ts = p_ts (alpha_t do_t.v_s + beta_t) + [s == argmax_t] dc_t;  dk_s += sum_t dl_ts scale q_t
        linear part (j < N; A, dA the diagonal blocks of query chunk j; dS_j, dz_j the suffix state gradients):
            dv'  += (A * delta)^T do_j + kf'_j @ dS_j
            dkf' += dA^T qf_j + v'_j @ dS_j^T + dz_j          (valid keys only)
    NSPLIT programs share a key chunk (to fill the GPU when B*HKV*N' is small): program sp takes every NSPLIT-th
    item of each loop -- the query heads of the window part and of the diagonal linear block, the feature tiles
    (each dkf tile whole, over all heads) -- and writes its partial dk, dv at DK/DV + sp * SPLIT_STRIDE (fp32
    buffers summed by split_sum_kernel when NSPLIT > 1).  Every key position belongs to exactly one chunk, so each
    (split's) dk, dv and each dkf element is written once.  Grid: (B*HKV, N', NSPLIT).
    """
    pid_bkv = tl.program_id(0)
    j = tl.program_id(1)
    sp = tl.program_id(2)
    b = pid_bkv // HKV
    hk = pid_bkv % HKV
    dtype = Q.dtype.element_ty
    kv64 = pid_bkv.to(tl.int64)
    ks0 = j * BT - SHIFT
    ks = ks0 + tl.arange(0, BT)
    kin = (ks >= 0) & (ks < T)
    km = kin
    if HAS_VALID:
        km = km & (tl.load(VALID + b * T + ks, mask=kin, other=0) != 0)
    offs_d = tl.arange(0, BD)
    md = offs_d < D
    kmask = km[:, None] & md[None, :]
    kk = tl.load(K + (kv64 * T + ks[:, None]) * D + offs_d[None, :], mask=kmask, other=0.0)
    vv = tl.load(V + (kv64 * T + ks[:, None]) * D + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BT, BD], dtype=tl.float32)
    dv = tl.zeros([BT, BD], dtype=tl.float32)

    if HAS_SWA:
        qlo = tl.maximum(ks0, 0)
        qhi = tl.minimum(ks0 + BT - 1 + W, T)
        for g in range(sp, G, NSPLIT):  # heads split over programs; nested loops keep d=256 registers in check
            bh64 = (b * HQ + hk * G + g).to(tl.int64)
            for q0 in range(qlo, qhi, BT):
                offs_q = q0 + tl.arange(0, BT)
                qm = offs_q < qhi
                qmask = qm[:, None] & md[None, :]
                q = tl.load(Q + (bh64 * T + offs_q[:, None]) * D + offs_d[None, :], mask=qmask, other=0.0)
                do = tl.load(DO + (bh64 * T + offs_q[:, None]) * D + offs_d[None, :], mask=qmask, other=0.0)
                r = bh64 * T + offs_q
                c = tl.load(ROWS + r, mask=qm, other=0.0)
                arg = tl.load(ROWS + 3 * NROW + r, mask=qm, other=0.0).to(tl.int32, bitcast=True)
                alpha = tl.load(COEF + r, mask=qm, other=0.0)
                beta = tl.load(COEF + NROW + r, mask=qm, other=0.0)
                dc = tl.load(COEF + 4 * NROW + r, mask=qm, other=0.0)
                s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
                diff = offs_q[:, None] - ks[None, :]
                msk = (diff >= 0) & (diff < W) & km[None, :] & qm[:, None]
                p = tl.where(msk, tl.exp(s - c[:, None]), 0.0)
                doa = (do.to(tl.float32) * alpha[:, None]).to(dtype)
                dv += tl.dot(tl.trans(p.to(dtype)), doa, input_precision=DOT_PREC)
                dp = tl.dot(doa, tl.trans(vv), input_precision=DOT_PREC) + beta[:, None]
                dl = p * dp + tl.where(msk & (ks[None, :] == arg[:, None]), dc[:, None], 0.0)
                dk += tl.dot(tl.trans((dl * scale).to(dtype)), q, input_precision=DOT_PREC)

    if HAS_LA:
        if j < N:
            rows = j * BT + tl.arange(0, BT)
            rm = rows < T
            blk = tl.arange(0, BT)[:, None] * BT + tl.arange(0, BT)[None, :]
            for g in range(sp, G, NSPLIT):
                bh64 = (b * HQ + hk * G + g).to(tl.int64)
                A = tl.load(AMAT + (bh64 * N + j) * BT * BT + blk)
                delta = tl.load(COEF + 2 * NROW + bh64 * T + rows, mask=rm, other=0.0)
                do = tl.load(DO + (bh64 * T + rows[:, None]) * D + offs_d[None, :], mask=rm[:, None] & md[None, :], other=0.0)
                dv += tl.dot(tl.trans((A * delta[:, None]).to(dtype)), do, input_precision=DOT_PREC)
            seg = j // CPS
            for m0 in range(sp * BM, M, NSPLIT * BM):
                offs_m = m0 + tl.arange(0, BM)
                mm = offs_m < M
                dkf = tl.zeros([BT, BM], dtype=tl.float32)
                for g in range(0, G):
                    bh64 = (b * HQ + hk * G + g).to(tl.int64)
                    dA = tl.load(DAMAT + (bh64 * N + j) * BT * BT + blk)
                    qf = tl.load(QF + (bh64 * T + rows[:, None]) * M + offs_m[None, :], mask=rm[:, None] & mm[None, :], other=0.0)
                    dkf += tl.dot(tl.trans(dA.to(dtype)), qf, input_precision=DOT_PREC)
                smask = mm[:, None] & md[None, :]
                dS = tl.load(DS_LOC + ((kv64 * N + j) * M + offs_m[:, None]) * D + offs_d[None, :], mask=smask, other=0.0)
                dS = dS.to(tl.float32)
                if HAS_SEG:
                    dS += tl.load(DS_SEG + ((kv64 * NSEG + seg) * M + offs_m[:, None]) * D + offs_d[None, :], mask=smask, other=0.0)
                dS = dS.to(dtype)
                dkf += tl.dot(vv, tl.trans(dS), input_precision=DOT_PREC)
                dz = tl.load(DZ_LOC + (kv64 * N + j) * M + offs_m, mask=mm, other=0.0)
                if HAS_SEG:
                    dz += tl.load(DZ_SEG + (kv64 * NSEG + seg) * M + offs_m, mask=mm, other=0.0)
                dkf = tl.where(km[:, None], dkf + dz[None, :], 0.0)
                kf = tl.load(KF + (kv64 * T + ks[:, None]) * M + offs_m[None, :], mask=km[:, None] & mm[None, :], other=0.0)
                dv += tl.dot(kf, dS, input_precision=DOT_PREC)
                tl.store(DKF + (kv64 * T + ks[:, None]) * M + offs_m[None, :], dkf.to(DKF.dtype.element_ty), mask=kin[:, None] & mm[None, :])
        else:
            for m0 in range(sp * BM, M, NSPLIT * BM):
                offs_m = m0 + tl.arange(0, BM)
                mm = offs_m < M
                tl.store(DKF + (kv64 * T + ks[:, None]) * M + offs_m[None, :], tl.zeros([BT, BM], dtype=DKF.dtype.element_ty), mask=kin[:, None] & mm[None, :])

    omask = kin[:, None] & md[None, :]
    out = sp.to(tl.int64) * SPLIT_STRIDE + (kv64 * T + ks[:, None]) * D + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=omask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=omask)


@triton.jit
def split_sum_kernel(PART, OUT, E, NSPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[e] = sum_s PART[s, e] over the NSPLIT partials (fp32, in split order: deterministic), in OUT's dtype.
    Grid: (cdiv(E, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < E
    ptr = PART + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in tl.static_range(NSPLIT):
        acc += tl.load(ptr, mask=msk, other=0.0)
        ptr += E
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------------------------------------------
# decode: one new token against the constant-size state
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def combine_decode(num_s, den_s, num_l, den_l, wrow, RULE: tl.constexpr):
    """One decode step's output (G, D) from the branches' sums: RULE 0 shared_norm, 1 mix (g = wrow; SWA alone where
    the linear branch has no keys), 2 the window alone, 3 the linear branch alone; an empty branch gives 0. The decode
    kernel here and the fused step (attention/triton/decode.py) both end with it."""
    inv_s = tl.where(den_s == 0.0, 0.0, 1.0 / tl.where(den_s == 0.0, 1.0, den_s))
    inv_l = tl.where(den_l == 0.0, 0.0, 1.0 / tl.where(den_l == 0.0, 1.0, den_l))
    if RULE == 0:
        den = wrow * den_s + den_l
        inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        out = (wrow[:, None] * num_s + num_l) * inv[:, None]
    elif RULE == 1:
        gp = tl.where(den_l == 0.0, 1.0, wrow)
        out = gp[:, None] * num_s * inv_s[:, None] + (1.0 - gp)[:, None] * num_l * inv_l[:, None]
    elif RULE == 2:
        out = num_s * inv_s[:, None]
    else:
        out = num_l * inv_l[:, None]
    return out


@triton.jit
def _fold_tile(S, Z, BUFKF, kv64, slot, L, M, D, om, mm, offs_d, md, st, z, v_out, valid_out):
    """S[om, offs_d] = st + kf_out v_out^T and Z[om] = z + kf_out, kf_out = the leaving key's features (0 if invalid)."""
    kf_out = tl.load(BUFKF + (kv64 * L + slot) * M + om, mask=mm, other=0.0).to(tl.float32) * valid_out
    tl.store(S + (kv64 * M + om[:, None]) * D + offs_d[None, :], st + kf_out[:, None] * v_out[None, :], mask=mm[:, None] & md[None, :])
    tl.store(Z + kv64 * M + om, z + kf_out, mask=mm)


@triton.jit
def hybrid_decode_kernel(
    Q, QF, KN, VN, KFN, VALIDN, BUFK, BUFV, BUFKF, BUFVALID, SLOT, S, Z, WROW, OUT,
    scale, L, HQ, HKV, G, M, D,
    RULE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_LA: tl.constexpr, LA_WINDOW: tl.constexpr,
    FOLD: tl.constexpr,
    GP: tl.constexpr, BL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDK: tl.constexpr,
):
    """One decoding step for the G query heads of one (b, hk), output columns [pid_d*BD, +BD).

    Naive reference (recurrent.decode_output; window = the ring (L slots, empty ones invalid) + the new key):
        swa:   l = scale q . k_win; c = max; p = exp(l - c) * valid;  num_s = p @ v_win; den_s = p.sum()
        la:    num_l = qf @ S, den_l = qf . z                                  ('complementary': S, z before the step)
               + (qf . kf_win * valid) @ v_win, + its sum                      ('overlap', 'la_only': all keys so far)
        out  = combine(rule, ...)
    The state is only read (recurrent.advance_state appends the token in place), except with FOLD, where the key in
    the ring's write slot SLOT (leaving the window) is folded into S and z in place, each tile right after it was read:
        S += valid_slot kf_slot v_slot^T, z += valid_slot kf_slot
    FOLD needs one d-tile (BD >= D): that program alone reads and writes its (b, hk)'s S and z.
    All arithmetic in fp32 (broadcast-and-sum; G is small).  Grid: (B*HKV, d-tiles).
    """
    pid_bkv = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid_bkv // HKV
    hk = pid_bkv % HKV
    kv64 = pid_bkv.to(tl.int64)
    offs_g = tl.arange(0, GP)
    gm = offs_g < G
    bh = (b * HQ + hk * G + offs_g).to(tl.int64)  # (GP,)
    offs_l = tl.arange(0, BL)
    lbuf = offs_l < L
    lcur = offs_l == L
    vb = tl.load(BUFVALID + b * L + offs_l, mask=lbuf, other=0)
    vn = tl.load(VALIDN + b + offs_l * 0, mask=lcur, other=0)
    wvalid = (lbuf & (vb != 0)) | (lcur & (vn != 0))
    offs_d = pid_d * BD + tl.arange(0, BD)
    md = offs_d < D
    # window values for this d-tile: (BL, BD)
    vwin = tl.load(BUFV + (kv64 * L + offs_l[:, None]) * D + offs_d[None, :], mask=lbuf[:, None] & md[None, :], other=0.0).to(tl.float32)
    vwin += tl.load(VN + kv64 * D + offs_l[:, None] * 0 + offs_d[None, :], mask=lcur[:, None] & md[None, :], other=0.0).to(tl.float32)
    wrow = tl.load(WROW + bh, mask=gm, other=0.0)
    if FOLD:
        slot = tl.load(SLOT).to(tl.int64)
        v_out = tl.load(BUFV + (kv64 * L + slot) * D + offs_d, mask=md, other=0.0).to(tl.float32)
        valid_out = (tl.load(BUFVALID + b * L + slot) != 0).to(tl.float32)

    num_s = tl.zeros([GP, BD], dtype=tl.float32)
    den_s = tl.zeros([GP], dtype=tl.float32)
    num_l = tl.zeros([GP, BD], dtype=tl.float32)
    den_l = tl.zeros([GP], dtype=tl.float32)
    if HAS_SWA:
        lg = tl.zeros([GP, BL], dtype=tl.float32)
        for d0 in range(0, D, BDK):
            od = d0 + tl.arange(0, BDK)
            mdk = od < D
            q = tl.load(Q + bh[:, None] * D + od[None, :], mask=gm[:, None] & mdk[None, :], other=0.0).to(tl.float32)
            kw = tl.load(BUFK + (kv64 * L + offs_l[:, None]) * D + od[None, :], mask=lbuf[:, None] & mdk[None, :], other=0.0).to(tl.float32)
            kw += tl.load(KN + kv64 * D + offs_l[:, None] * 0 + od[None, :], mask=lcur[:, None] & mdk[None, :], other=0.0).to(tl.float32)
            lg += tl.sum(q[:, None, :] * kw[None, :, :], 2)
        lg = lg * scale
        lg = tl.where(wvalid[None, :], lg, float("-inf"))
        cm = tl.max(lg, 1)
        cm = tl.where(cm == float("-inf"), 0.0, cm)
        p = tl.where(wvalid[None, :], tl.exp(lg - cm[:, None]), 0.0)
        den_s = tl.sum(p, 1)
        num_s = tl.sum(p[:, :, None] * vwin[None, :, :], 1)
    if HAS_LA:
        aw = tl.zeros([GP, BL], dtype=tl.float32)
        for m0 in range(0, M, BM):
            om = m0 + tl.arange(0, BM)
            mm = om < M
            qf = tl.load(QF + bh[:, None] * M + om[None, :], mask=gm[:, None] & mm[None, :], other=0.0).to(tl.float32)
            st = tl.load(S + (kv64 * M + om[:, None]) * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
            z = tl.load(Z + kv64 * M + om, mask=mm, other=0.0)
            num_l += tl.sum(qf[:, :, None] * st[None, :, :], 1)
            den_l += tl.sum(qf * z[None, :], 1)
            if FOLD:
                _fold_tile(S, Z, BUFKF, kv64, slot, L, M, D, om, mm, offs_d, md, st, z, v_out, valid_out)
            if LA_WINDOW:
                kfw = tl.load(BUFKF + (kv64 * L + offs_l[:, None]) * M + om[None, :], mask=lbuf[:, None] & mm[None, :], other=0.0).to(tl.float32)
                kfw += tl.load(KFN + kv64 * M + offs_l[:, None] * 0 + om[None, :], mask=lcur[:, None] & mm[None, :], other=0.0).to(tl.float32)
                aw += tl.sum(qf[:, None, :] * kfw[None, :, :], 2)
        if LA_WINDOW:
            aw = tl.where(wvalid[None, :], aw, 0.0)
            num_l += tl.sum(aw[:, :, None] * vwin[None, :, :], 1)
            den_l += tl.sum(aw, 1)
    elif FOLD:  # the output never reads the state, but the state still advances
        for m0 in range(0, M, BM):
            om = m0 + tl.arange(0, BM)
            mm = om < M
            st = tl.load(S + (kv64 * M + om[:, None]) * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
            z = tl.load(Z + kv64 * M + om, mask=mm, other=0.0)
            _fold_tile(S, Z, BUFKF, kv64, slot, L, M, D, om, mm, offs_d, md, st, z, v_out, valid_out)

    out = combine_decode(num_s, den_s, num_l, den_l, wrow, RULE)
    tl.store(OUT + bh[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=gm[:, None] & md[None, :])
