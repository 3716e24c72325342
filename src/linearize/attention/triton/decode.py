"""The whole decode step of a hybrid layer with the 'sum' linear state in one Triton launch.

`fused_decode_step` computes what `recurrent.decode_step` computes for one component mode -- the output of the new
token against the state, then the token appended in place -- but where the PyTorch step (and `decode_step_triton`,
whose kernel only reads the state and folds S, z) still runs a dozen small kernels per layer (ring writes, sink
updates, the slot counter), one program per (batch row, KV head) here reads the ring and S, z once, writes the
output of its G query heads, folds the key leaving the window into S, z, writes the new key into the ring and the
sinks, and advances the shared counters. It runs inside CUDA-graph capture: no host sync, fixed shapes, in place.

Covered: modes 'hybrid' (both combine rules, both placements), 'swa_only' and 'la_only'; softmax sinks
(`softmax_sinks` > 0); GQA; padding (`valid`); per-head, per-row or constant weights. Not covered (the caller keeps
its existing path; `fused_decode_step` returns None): several modes in one step (per-head modes), 'sinks_only' and
'none', sparse memory, the other linear-state kinds, window 1 (no ring), an fp64 state, CPU tensors outside
`TRITON_INTERPRET=1`. The feature maps run before the kernel, in PyTorch (qf, kf are its inputs).

Bytes: a step that folds its leaving key reads the state once and writes S back (the fold changes every entry of
S), so its traffic is the state plus S again; against bench/decode's floor (the state's bytes read once) it is capped
at state / (state + S), ~56% for the Gemma-3-270M shape (hedgehog: S is 4/5 of the state). The deferred fold
(TUNING['fold_every'] = F > 1) lifts the cap: the leaving keys wait in the state's pending list (F keys' features
and values, read by every step) and S is written once per F steps, ~(state + pending) / (state + pending + S / F),
~95% at F = 16 for that shape. The outputs are the same sums in another order (tests: against the PyTorch step
through whole fold cycles); every path that reads S otherwise folds the list first (`recurrent.fused_step`).

Tuning: the launch (`launch_config`: d-tiles, tile sizes, warps, how the G query heads meet a tile, the software
pipeline, the deferred fold) follows TUNING; benchmarks/fused_tuning.py times its choices (TUNING_CHOICES) against
the unfused step on the GPU. Warps, stages and the deferred fold are 'auto' by default: chosen by the step's load and
head_dim (BY_LOAD), so that a large batch gets the deferred fold at F = 16 and a batch of one does not.

Switch: unset, the fused step runs on every CUDA step it covers. The tuning sweep on the H200
(benchmarks/results/speed/fused_tuning.md; one layer, captured graphs; its header says commit 0ce5559, but its
launches and ablation rows are those of 1d9fc94, before the deferred fold) measured the then TUNING defaults -- the
'dot' contract in tf32, 3 pipeline stages, 4 warps -- at 1.67x the unfused step at batch 1024 (Gemma-3-270M shape, 47% of
the floor), 3.9x at batch 64, 2.55x at batch 96 (Llama-3-8B shape, 44%) and 4.95x at batch 8, where the first,
untuned version was 0.1-0.3x at those batches (so it ran at batch <= 4 only). With bf16 inputs its tf32 products
put the outputs ~1e-3 (relative) from the unfused step's (bf16's own rounding is 4e-3; 'ieee': 4e-5, 10% slower);
the state's fold stays exact fp32. `LINEARIZE_FUSED_DECODE=0` turns it off; `=1` also lets it take CPU tensors under
`TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from linearize.attention.spec import AttentionSpec
from linearize.attention.triton._kernels import combine_decode
from linearize.config import COMBINE_RULES, MODES, component_mode

#: The environment switch (see the module docstring).
FUSED_ENV = "LINEARIZE_FUSED_DECODE"

#: Launch knobs (the defaults: the fastest the sweep found at every batch it measured, see the module docstring):
#: warps per program (None: 8 at a 256-column tile, else 4), the fp32 values per thread of one tile
#: (sets the rows of S and the window keys per tile), and the d-tiles: while B*Hkv programs are fewer than
#: programs_per_sm per SM, head_dim is split in halves down to min_tile_d columns. `contract`: how the G query heads
#: of a KV head meet a tile -- 'loop', one head at a time (broadcast and sum), or 'dot', one tl.dot over the heads
#: padded to 16 (tiles of >= 16 keys, rows and columns); `dot_precision`: its fp32 products where the inputs are
#: not fp32 ('tf32', as the forward kernels; 'tf32x3'; 'ieee'); fp32 inputs always take 'ieee'. `stages`: 0, the
#: next tile of S is loaded by hand while this one is used; n > 0, Triton's software pipeline (n tiles in flight).
#: `keys_once`: where one tile spans head_dim, the window's keys are loaded in one tile, not column block by block.
#: `fold_every` F > 1: the deferred fold -- the keys leaving the window wait in the state's pending list
#: (recurrent.HybridState.pend_*) and go into S, z F at a time, so S is written once per F steps instead of every
#: step (a step otherwise reads and writes all of S); 1: each step folds its leaving key. `fold_pass`: where a
#: deferred fold writes S -- 'inline', each tile as the readout reads it, or 'after', a pass of its own in narrow
#: tiles (reads S again once per F steps; the main loop holds fewer registers).
#: A key set to AUTO takes its value by the step's load and head_dim (see BY_LOAD).
TUNING = {"num_warps": "auto", "values_per_thread": 8, "programs_per_sm": 2, "min_tile_d": 32, "contract": "dot",
          "dot_precision": "tf32", "stages": "auto", "keys_once": True, "fold_every": "auto", "fold_pass": "inline"}

#: TUNING's value meaning "chosen by the step's load and head_dim".
AUTO = "auto"

#: The AUTO keys' values: the first entry whose least load -- the step's (batch row, KV head) programs per SM -- and
#: least head_dim the step reaches. Measured on an H100 (results: benchmarks/results/speed/h100_6544e31/ and
#: h100_087411f/; one-layer sweeps of benchmarks/fused_tuning.py, then whole captured steps with the norms, MLPs and
#: feature maps compiled, 32k context):
#: - the deferred fold (F = 16) wins wherever the programs fill the SMs: one Gemma-3-270M-shaped layer at batch 512
#:   (3.9 programs per SM) 0.153 ms against 0.217 without it, at 4096 (31) 1.13 against 1.64; a Llama-3-8B-shaped one
#:   at batch 96 (5.8) 0.084 against 0.098; whole steps likewise (Llama shape at batch 48: 17,457 against 16,898
#:   tokens/s). At batch 1 it does not (Gemma shape 0.98x, Llama shape 414 against 419 tokens/s);
#: - 2 warps and 2 pipeline stages for Gemma's 256-wide heads at those loads (the whole step at batch 4096: 149,950
#:   tokens/s, 62% of its floor, against 140,613 with 4 warps and 3 stages, both with the fold), but 4 warps and 3
#:   stages for Llama's 128-wide ones (0.084 ms against 0.093 with 2 and 2).
#: Loads between 1/132 and 2.9 were not measured; 2 splits them.
BY_LOAD = ((2.0, 256, {"num_warps": 2, "stages": 2, "fold_every": 16}),
           (2.0, 0, {"num_warps": 4, "stages": 3, "fold_every": 16}),
           (0.0, 0, {"num_warps": 4, "stages": 3, "fold_every": 1}))


def resolve_tuning(tuning: dict, programs: int, head_dim: int, device) -> dict:
    """`tuning` with its AUTO values replaced by BY_LOAD's for a step of `programs` (batch rows x KV heads) and
    `head_dim` on `device`."""
    load = programs / _num_sms(device)
    chosen = next(values for least, least_d, values in BY_LOAD if load >= least and head_dim >= least_d)
    return {key: chosen[key] if value == AUTO else value for key, value in tuning.items()}

#: The values of each TUNING key that benchmarks/fused_tuning.py sweeps on the GPU (a variant added to TUNING adds
#: its choices here). dot_precision ('ieee': 42% of the floor against tf32's 47% at Gemma batch 1024) and keys_once
#: (False: never faster) were measured in that sweep and left out; `--grid KEY=...` brings them back.
TUNING_CHOICES = {"num_warps": (2, 4, 8), "values_per_thread": (4, 8, 16), "programs_per_sm": (1, 2, 4, 8, 16),
                  "min_tile_d": (32, 64, 128), "contract": ("loop", "dot"), "stages": (0, 2, 3),
                  "fold_every": (1, 8, 16), "fold_pass": ("inline", "after")}

# the kernel's RULE codes: the hybrid mode's combine rules, then the single-branch modes
_RULE_CODES = {"shared_norm": 0, "mix": 1}
_SINGLE_BRANCH = {"swa_only": 2, "la_only": 3}
FUSED_MODES = ("hybrid", *_SINGLE_BRANCH)
if set(_RULE_CODES) != set(COMBINE_RULES) or any(MODES[m].kernel_code != c for m, c in _SINGLE_BRANCH.items()):
    raise ImportError("attention/triton/decode.py: every combine rule needs its code, and the single-branch codes are "
                      "the mode registry's kernel_code (linearize.config.MODES)")


@triton.jit
def _heads_dot_keys(acc, X, row0, stride, offs, mask, keys, offs_g, G: tl.constexpr, DOT: tl.constexpr,
                    PREC: tl.constexpr, NATIVE: tl.constexpr = False):
    """acc (GP, K) + [X[row0 + g, offs] . keys[k, :] for each head g < G, key k]: keys (K, E). DOT: one tl.dot of the
    (GP, E) rows (GP, K, E >= 16); NATIVE: keys and X in their own 16-bit type (exact products, fp32 sums), else
    keys in fp32. Without DOT one head at a time (a (G, K, E) product would hold G times the tile in registers)."""
    if DOT:
        x = tl.load(X + (row0 + offs_g)[:, None] * stride + offs[None, :], mask=(offs_g < G)[:, None] & mask[None, :],
                    other=0.0)
        if NATIVE:
            acc = tl.dot(x, tl.trans(keys), acc=acc)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(keys), acc=acc, input_precision=PREC)
    else:
        for g in tl.static_range(G):
            x = tl.load(X + (row0 + g) * stride + offs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.where(offs_g[:, None] == g, acc + tl.sum(keys * x[None, :], 1)[None, :], acc)
    return acc


@triton.jit
def _heads_weigh_rows(acc, weights, rows, offs_g, G: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc (GP, E) + weights (GP, K) @ rows (K, E): one tl.dot (GP, K, E >= 16), or one head at a time."""
    if DOT:
        acc = tl.dot(weights, rows, acc=acc, input_precision=PREC)
    else:
        for g in tl.static_range(G):
            w = tl.sum(tl.where(offs_g[:, None] == g, weights, 0.0), 0)
            acc += tl.where(offs_g[:, None] == g, tl.sum(w[:, None] * rows, 0)[None, :], 0.0)
    return acc


@triton.jit
def _fold_pending(acc, PKF, PV, kv64, M, D, om, mm, offs_d, md, pused, offs_f, F: tl.constexpr, DOT: tl.constexpr,
                  PREC: tl.constexpr):
    """acc (BM, BD) + sum_j pused_j PKF[j, om] PV[j, offs_d]^T over the F deferred keys: one tl.dot of (BM, FP) by
    (FP, BD), or F rank-one updates (rows loaded one at a time: nothing (FP, .) held in registers)."""
    if DOT:
        pkf = tl.load(PKF + (kv64 * F + offs_f[None, :]) * M + om[:, None], mask=mm[:, None] & pused[None, :],
                      other=0.0).to(tl.float32)
        pv = tl.load(PV + (kv64 * F + offs_f[:, None]) * D + offs_d[None, :], mask=pused[:, None] & md[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(pkf, pv, acc=acc, input_precision=PREC)
    else:
        for j in range(F):  # (not unrolled: F rows in flight at once would take F times the registers)
            used_j = tl.sum(tl.where((offs_f == j) & pused, 1.0, 0.0), 0)
            kf_j = tl.load(PKF + (kv64 * F + j) * M + om, mask=mm, other=0.0).to(tl.float32) * used_j
            v_j = tl.load(PV + (kv64 * F + j) * D + offs_d, mask=md, other=0.0).to(tl.float32)
            acc += kf_j[:, None] * v_j[None, :]
    return acc


@triton.jit
def _read_fold_tile(num_l, den_l, st, z, QF, S, BUFKF, PKF, PV, bh, gm, kv64, slot, L, M, D, om, mm, offs_d, md,
                    v_out, fold_w, pused, offs_f, folding, offs_g, G: tl.constexpr, HAS_LA: tl.constexpr,
                    DOT: tl.constexpr, PREC: tl.constexpr, F: tl.constexpr, FOLD_AFTER: tl.constexpr):
    """One tile of S (rows om, columns offs_d) read by the linear branch (num_l += qf S, den_l += qf . z) and folded:
    S[om, offs_d] = st + fold_w kf_out v_out^T (kf_out: the leaving key's features). With the deferred fold (F > 1)
    S is written only when `folding`, then with the deferred keys in use (pused) too."""
    if HAS_LA:
        qf = tl.load(QF + bh[:, None] * M + om[None, :], mask=gm[:, None] & mm[None, :], other=0.0).to(tl.float32)
        num_l = _heads_weigh_rows(num_l, qf, st, offs_g, G, DOT, PREC)
        den_l += tl.sum(qf * z[None, :], 1)
    if F > 1:
        if folding and not FOLD_AFTER:
            kf_out = tl.load(BUFKF + (kv64 * L + slot) * M + om, mask=mm, other=0.0).to(tl.float32) * fold_w
            upd = _fold_pending(st + kf_out[:, None] * v_out[None, :], PKF, PV, kv64, M, D, om, mm, offs_d, md, pused,
                                offs_f, F, DOT, PREC)
            tl.store(S + (kv64 * M + om[:, None]) * D + offs_d[None, :], upd, mask=mm[:, None] & md[None, :])
    else:
        kf_out = tl.load(BUFKF + (kv64 * L + slot) * M + om, mask=mm, other=0.0).to(tl.float32) * fold_w
        tl.store(S + (kv64 * M + om[:, None]) * D + offs_d[None, :], st + kf_out[:, None] * v_out[None, :],
                 mask=mm[:, None] & md[None, :])
    return num_l, den_l


@triton.jit
def fused_decode_kernel(
    Q, QF, KN, VN, KFN, VALIDN, W, OUT,
    BUFK, BUFV, BUFKF, BUFVALID, SLOT, S, Z,
    SINKK, SINKV, SINKKF, SINKVALID, LEFT, SYNC, PKF, PV, PKEEP, PCOUNT,
    scale, wscalar, w_sb, w_sh, B, L, NS, HQ, HKV, M, D, G: tl.constexpr,
    RULE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_LA: tl.constexpr, LA_WINDOW: tl.constexpr,
    HAS_VALIDN: tl.constexpr, W_TENSOR: tl.constexpr, NSS: tl.constexpr,
    SINK_SLOTS: tl.constexpr, SINK_KF: tl.constexpr, ND: tl.constexpr,
    GP: tl.constexpr, BLC: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr, FULL_D: tl.constexpr, MP: tl.constexpr,
    DP: tl.constexpr, NATIVE_QK: tl.constexpr, F: tl.constexpr, FP: tl.constexpr, FOLD_AFTER: tl.constexpr,
    BDF: tl.constexpr, SKIP: tl.constexpr = 0,
):
    """One decode step of the G query heads of one (b, hk), output columns [pid_d*BD, +BD). Grid: B*HKV*ND: ND > 1
    d-tiles where the batch alone would leave SMs idle (each tile reads all of z, the window's keys and features, and
    its own columns of S, v). All arithmetic in fp32.

    Window = the ring's L slots (empty ones invalid) + the new key (index L), BLC keys at a time. With NSS softmax sinks,
    the sinks that have left the window (slot j < NSS, valid, j < left_count[b]) join the softmax and, where the
    linear branch covers the window (LA_WINDOW), the linear sums too (S holds no sink). Then, in place:
        S += keep kf_out v_out^T, z += keep kf_out      (the key in ring slot SLOT leaves the window;
                                                        keep = its valid, and not a softmax sink)
        ring[SLOT] = the new key, sinks[count] = the new key if valid and count < NS,
    and, once every program that reads them is done (arrival counters SYNC: the last d-tile of a (b, hk), then the
    last (b, hk) of a row, then the last row), the ring and sink rows of the new key and z (by the last d-tile), the
    per-row valid flags, sink count and left_count (by the last of the row), and SLOT = (SLOT + 1) % L.
    SKIP (a profiling aid of benchmarks/fused_tuning.py, wrong results): 1 leaves out the window, 2 the S loop.
    """
    pid = tl.program_id(0) // ND  # the d-tiles of one (b, hk) are neighbours: they share its window keys in L2
    pid_d = tl.program_id(0) % ND
    b = pid // HKV
    hk = pid % HKV
    kv64 = pid.to(tl.int64)
    b64 = b.to(tl.int64)
    offs_g = tl.arange(0, GP)
    gm = offs_g < G
    q0 = (b * HQ + hk * G).to(tl.int64)  # the first of the G query rows
    bh = q0 + offs_g  # (GP,)
    offs_d = pid_d * BD + tl.arange(0, BD)
    md = offs_d < D

    # -- what the shared writes at the end overwrite is read before this program arrives there (here, and the
    # window's valid flags below) ----------------------------------------------------------------------------------
    slot = tl.load(SLOT).to(tl.int64)
    if HAS_VALIDN:
        valid_new = tl.load(VALIDN + b64) != 0
    else:
        valid_new = pid >= 0  # no mask: every token valid
    valid_out = tl.load(BUFVALID + b64 * L + slot) != 0
    keep_out = valid_out
    if NSS > 0:
        left = tl.load(LEFT + b64)
        keep_out = valid_out & (left >= NSS)  # the first NSS valid keys to leave are the sinks: not into S, z
    if SINK_SLOTS:
        offs_n = tl.arange(0, BS)
        sv = tl.load(SINKVALID + b64 * NS + offs_n, mask=offs_n < NS, other=0)
        count = tl.sum((sv != 0).to(tl.int32), 0)
        becomes = valid_new & (count < NS)
        if NSS > 0:
            sink_left = (offs_n < NSS) & (sv != 0) & (offs_n < left)

    vnew_d = tl.load(VN + kv64 * D + offs_d, mask=md, other=0.0)
    v_out = tl.load(BUFV + (kv64 * L + slot) * D + offs_d, mask=md, other=0.0).to(tl.float32)
    fold_w = keep_out.to(tl.float32)
    if W_TENSOR:
        wrow = tl.load(W + b64 * w_sb + (hk * G + offs_g).to(tl.int64) * w_sh, mask=gm, other=0.0).to(tl.float32)
    else:
        wrow = tl.zeros([GP], dtype=tl.float32) + wscalar

    # -- the deferred fold (F > 1): the keys in PKF, PV entries j < count (PKEEP: those that enter S) are part of the
    # linear sums; this step's leaving key becomes entry `count`, or, when that makes F, all of them go into S, z ---
    offs_f = tl.arange(0, FP)
    if F > 1:
        pcount = tl.load(PCOUNT)
        folding = pcount + 1 >= F
        pused = (offs_f < pcount) & (tl.load(PKEEP + b64 * F + offs_f, mask=offs_f < F, other=0) != 0)
    else:
        folding = pid >= 0
        pused = offs_f < 0

    # -- the softmax keys (the sinks that left, then the window BLC keys at a time: online softmax, so the sums end
    # shifted by the max over all of them, as recurrent's) and, with LA_WINDOW, the same keys' linear terms ---------
    num_s = tl.zeros([GP, BD], dtype=tl.float32)
    den_s = tl.zeros([GP], dtype=tl.float32)
    c_s = tl.full([GP], float("-inf"), dtype=tl.float32)
    num_l = tl.zeros([GP, BD], dtype=tl.float32)
    den_l = tl.zeros([GP], dtype=tl.float32)
    if NSS > 0:
        vsink = tl.load(SINKV + (kv64 * NS + offs_n[:, None]) * D + offs_d[None, :],
                        mask=(offs_n < NSS)[:, None] & md[None, :], other=0.0).to(tl.float32)
        if HAS_SWA:
            ls = tl.zeros([GP, BS], dtype=tl.float32)
            for d0 in range(0, D, BD):  # the logits over all of head_dim
                od = d0 + tl.arange(0, BD)
                mdk = od < D
                ks = tl.load(SINKK + (kv64 * NS + offs_n[:, None]) * D + od[None, :],
                             mask=(offs_n < NSS)[:, None] & mdk[None, :], other=0.0)
                if not NATIVE_QK:
                    ks = ks.to(tl.float32)
                ls = _heads_dot_keys(ls, Q, q0, D, od, mdk, ks, offs_g, G, DOT, PREC, NATIVE_QK)
            ls = ls * scale
            ls = tl.where(sink_left[None, :], ls, float("-inf"))
            c_s = tl.max(ls, 1)
            ps = tl.where(sink_left[None, :], tl.exp(ls - tl.where(c_s == float("-inf"), 0.0, c_s)[:, None]), 0.0)
            den_s = tl.sum(ps, 1)
            num_s = _heads_weigh_rows(num_s, ps, vsink, offs_g, G, DOT, PREC)
        if HAS_LA and LA_WINDOW:
            asink = tl.zeros([GP, BS], dtype=tl.float32)
            for m0 in range(0, M, BM):
                om = m0 + tl.arange(0, BM)
                mm = om < M
                kfs = tl.load(SINKKF + (kv64 * NS + offs_n[:, None]) * M + om[None, :],
                              mask=(offs_n < NSS)[:, None] & mm[None, :], other=0.0).to(tl.float32)
                asink = _heads_dot_keys(asink, QF, q0, M, om, mm, kfs, offs_g, G, DOT, PREC)
            asink = tl.where(sink_left[None, :], asink, 0.0)
            num_l = _heads_weigh_rows(num_l, asink, vsink, offs_g, G, DOT, PREC)
            den_l += tl.sum(asink, 1)
    if (HAS_SWA or LA_WINDOW) and SKIP != 1:
        for l0 in tl.range(0, L + 1, BLC, num_stages=STAGES if STAGES > 0 else None):
            offs_c = l0 + tl.arange(0, BLC)
            cb = offs_c < L
            cc = offs_c == L
            vbc = tl.load(BUFVALID + b64 * L + offs_c, mask=cb, other=0)
            cvalid = (cb & (vbc != 0)) | (cc & valid_new)
            vc = tl.load(BUFV + (kv64 * L + offs_c[:, None]) * D + offs_d[None, :], mask=cb[:, None] & md[None, :],
                         other=0.0).to(tl.float32)
            vc += tl.where(cc[:, None], vnew_d.to(tl.float32)[None, :], 0.0)
            if HAS_SWA:
                lg = tl.zeros([GP, BLC], dtype=tl.float32)
                if FULL_D:  # this tile's columns are all of head_dim: one load of the keys
                    kc = tl.load(BUFK + (kv64 * L + offs_c[:, None]) * D + offs_d[None, :],
                                 mask=cb[:, None] & md[None, :], other=0.0)
                    kc += tl.load(KN + kv64 * D + offs_c[:, None] * 0 + offs_d[None, :], mask=cc[:, None] & md[None, :],
                                  other=0.0)  # (one of the two is 0: exact in any type)
                    if not NATIVE_QK:
                        kc = kc.to(tl.float32)
                    lg = _heads_dot_keys(lg, Q, q0, D, offs_d, md, kc, offs_g, G, DOT, PREC, NATIVE_QK)
                else:
                    for d0 in range(0, D, BD):  # the logits over all of head_dim
                        od = d0 + tl.arange(0, BD)
                        mdk = od < D
                        kc = tl.load(BUFK + (kv64 * L + offs_c[:, None]) * D + od[None, :],
                                     mask=cb[:, None] & mdk[None, :], other=0.0)
                        kc += tl.load(KN + kv64 * D + offs_c[:, None] * 0 + od[None, :],
                                      mask=cc[:, None] & mdk[None, :], other=0.0)
                        if not NATIVE_QK:
                            kc = kc.to(tl.float32)
                        lg = _heads_dot_keys(lg, Q, q0, D, od, mdk, kc, offs_g, G, DOT, PREC, NATIVE_QK)
                lg = lg * scale
                lg = tl.where(cvalid[None, :], lg, float("-inf"))
                c_new = tl.maximum(c_s, tl.max(lg, 1))
                c_safe = tl.where(c_new == float("-inf"), 0.0, c_new)
                alpha = tl.exp(c_s - c_safe)  # 0 while no key was seen (c_s = -inf)
                p = tl.where(cvalid[None, :], tl.exp(lg - c_safe[:, None]), 0.0)
                den_s = den_s * alpha + tl.sum(p, 1)
                num_s = _heads_weigh_rows(num_s * alpha[:, None], p, vc, offs_g, G, DOT, PREC)
                c_s = c_new
            if HAS_LA and LA_WINDOW:
                a = tl.zeros([GP, BLC], dtype=tl.float32)
                for m0 in range(0, M, BM):
                    om = m0 + tl.arange(0, BM)
                    mm = om < M
                    kfc = tl.load(BUFKF + (kv64 * L + offs_c[:, None]) * M + om[None, :], mask=cb[:, None] & mm[None, :],
                                  other=0.0).to(tl.float32)
                    kfc += tl.load(KFN + kv64 * M + offs_c[:, None] * 0 + om[None, :], mask=cc[:, None] & mm[None, :],
                                   other=0.0).to(tl.float32)
                    a = _heads_dot_keys(a, QF, q0, M, om, mm, kfc, offs_g, G, DOT, PREC)
                a = tl.where(cvalid[None, :], a, 0.0)
                num_l = _heads_weigh_rows(num_l, a, vc, offs_g, G, DOT, PREC)
                den_l += tl.sum(a, 1)

    # -- the linear branch reads S, z tile by tile; each tile of S is folded right after it was read (z at the end).
    # STAGES 0: the next tile's load is issued before this one's arithmetic (two tiles in flight per program);
    # else Triton's software pipeline keeps STAGES tiles in flight (asynchronous copies into shared memory) ---------
    if SKIP == 2:
        pass
    elif STAGES == 0:
        om = tl.arange(0, BM)
        mm = om < M
        st_next = tl.load(S + (kv64 * M + om[:, None]) * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
        z_next = tl.load(Z + kv64 * M + om, mask=mm, other=0.0)
        for m0 in range(0, M, BM):
            om = m0 + tl.arange(0, BM)
            mm = om < M
            st, z = st_next, z_next
            on = om + BM
            mn = on < M
            st_next = tl.load(S + (kv64 * M + on[:, None]) * D + offs_d[None, :], mask=mn[:, None] & md[None, :],
                              other=0.0)
            z_next = tl.load(Z + kv64 * M + on, mask=mn, other=0.0)
            num_l, den_l = _read_fold_tile(num_l, den_l, st, z, QF, S, BUFKF, PKF, PV, bh, gm, kv64, slot, L, M, D, om,
                                           mm, offs_d, md, v_out, fold_w, pused, offs_f, folding, offs_g, G, HAS_LA,
                                           DOT, PREC, F, FOLD_AFTER)
    else:
        for m0 in tl.range(0, M, BM, num_stages=STAGES):
            om = m0 + tl.arange(0, BM)
            mm = om < M
            st = tl.load(S + (kv64 * M + om[:, None]) * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
            z = tl.load(Z + kv64 * M + om, mask=mm, other=0.0)
            num_l, den_l = _read_fold_tile(num_l, den_l, st, z, QF, S, BUFKF, PKF, PV, bh, gm, kv64, slot, L, M, D, om,
                                           mm, offs_d, md, v_out, fold_w, pused, offs_f, folding, offs_g, G, HAS_LA,
                                           DOT, PREC, F, FOLD_AFTER)

    if F > 1 and FOLD_AFTER:  # the fold in a pass of its own, in narrow tiles (few registers; S read again)
        tl.debug_barrier()  # every thread has read its S tiles above before any of them changes
        if folding:
            for m0 in range(0, M, BM):
                om = m0 + tl.arange(0, BM)
                mm = om < M
                kf_out = tl.load(BUFKF + (kv64 * L + slot) * M + om, mask=mm, other=0.0).to(tl.float32) * fold_w
                for d1 in range(0, BD, BDF):
                    od1 = pid_d * BD + d1 + tl.arange(0, BDF)
                    md1 = od1 < D
                    st = tl.load(S + (kv64 * M + om[:, None]) * D + od1[None, :], mask=mm[:, None] & md1[None, :],
                                 other=0.0)
                    vo = tl.load(BUFV + (kv64 * L + slot) * D + od1, mask=md1, other=0.0).to(tl.float32)
                    upd = _fold_pending(st + kf_out[:, None] * vo[None, :], PKF, PV, kv64, M, D, om, mm, od1, md1,
                                        pused, offs_f, F, False, PREC)
                    tl.store(S + (kv64 * M + om[:, None]) * D + od1[None, :], upd, mask=mm[:, None] & md1[None, :])

    if F > 1 and HAS_LA:  # the deferred keys' terms: (qf . kf_j) v_j over the entries in use
        a_p = tl.zeros([GP, FP], dtype=tl.float32)
        for m0 in range(0, M, BM):
            om = m0 + tl.arange(0, BM)
            mm = om < M
            qf = tl.load(QF + bh[:, None] * M + om[None, :], mask=gm[:, None] & mm[None, :], other=0.0).to(tl.float32)
            pkf = tl.load(PKF + (kv64 * F + offs_f[None, :]) * M + om[:, None], mask=mm[:, None] & pused[None, :],
                          other=0.0).to(tl.float32)  # (BM, FP)
            a_p = _heads_weigh_rows(a_p, qf, pkf, offs_g, G, DOT, PREC)
        pv = tl.load(PV + (kv64 * F + offs_f[:, None]) * D + offs_d[None, :], mask=pused[:, None] & md[None, :],
                     other=0.0).to(tl.float32)  # (FP, BD)
        num_l = _heads_weigh_rows(num_l, a_p, pv, offs_g, G, DOT, PREC)
        den_l += tl.sum(a_p, 1)

    out = combine_decode(num_s, den_s, num_l, den_l, wrow, RULE)
    tl.store(OUT + bh[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=gm[:, None] & md[None, :])

    # -- the writes others read: by the last program to arrive (acq_rel atomics; the barrier first, so that every
    # thread of this program has done its reads), first per (b, hk) over its d-tiles, then per row, then the grid ----
    tl.debug_barrier()
    base = B * HKV  # SYNC: B*HKV d-tile counters, B row counters, one grid counter
    if ND > 1:
        kv_last = tl.atomic_add(SYNC + kv64, 1) == ND - 1
    else:
        kv_last = pid >= 0
    # each in one vector (a loop of small tiles would wait on memory once per tile): z += the leaving key's features
    # (all d-tiles read z and that key above), then the new key into the ring (and the sinks)
    om = tl.arange(0, MP)
    mm = (om < M) & kv_last
    od = tl.arange(0, DP)
    mdk = (od < D) & kv_last
    kf_raw = tl.load(BUFKF + (kv64 * L + slot) * M + om, mask=mm, other=0.0)
    zadd = kf_raw.to(tl.float32) * fold_w
    if F > 1:
        for j in range(F):  # folding: z takes the deferred keys too
            used_j = tl.sum(tl.where((offs_f == j) & pused, 1.0, 0.0), 0)
            zadd += tl.load(PKF + (kv64 * F + j) * M + om, mask=mm & folding, other=0.0).to(tl.float32) * used_j
        # not folding: the leaving key becomes deferred entry pcount (its keep flag: by the last of the row, below)
        tl.store(PKF + (kv64 * F + pcount) * M + om, kf_raw, mask=mm & ~folding)
        vrow_out = tl.load(BUFV + (kv64 * L + slot) * D + od, mask=mdk & ~folding, other=0.0)
        tl.store(PV + (kv64 * F + pcount) * D + od, vrow_out.to(PV.dtype.element_ty), mask=mdk & ~folding)
    tl.store(Z + kv64 * M + om, tl.load(Z + kv64 * M + om, mask=mm & folding, other=0.0) + zadd, mask=mm & folding)
    tl.debug_barrier()  # the leaving key is read: its slot takes the new key
    krow = tl.load(KN + kv64 * D + od, mask=mdk, other=0.0)
    vrow = tl.load(VN + kv64 * D + od, mask=mdk, other=0.0)
    tl.store(BUFK + (kv64 * L + slot) * D + od, krow.to(BUFK.dtype.element_ty), mask=mdk)
    tl.store(BUFV + (kv64 * L + slot) * D + od, vrow.to(BUFV.dtype.element_ty), mask=mdk)
    kfn = tl.load(KFN + kv64 * M + om, mask=mm, other=0.0)
    tl.store(BUFKF + (kv64 * L + slot) * M + om, kfn.to(BUFKF.dtype.element_ty), mask=mm)
    if SINK_SLOTS:
        tl.store(SINKK + (kv64 * NS + count) * D + od, krow.to(SINKK.dtype.element_ty), mask=mdk & becomes)
        tl.store(SINKV + (kv64 * NS + count) * D + od, vrow.to(SINKV.dtype.element_ty), mask=mdk & becomes)
    if SINK_KF:
        tl.store(SINKKF + (kv64 * NS + count) * M + om, kfn.to(SINKKF.dtype.element_ty), mask=mm & becomes)
    if ND > 1:
        tl.store(SYNC + kv64, 0, mask=kv_last)
    if HKV > 1:
        row_last = kv_last & (tl.atomic_add(SYNC + base + b64, 1, mask=kv_last) == HKV - 1)
    else:
        row_last = kv_last
    tl.store(BUFVALID + b64 * L + slot, valid_new.to(tl.int8), mask=row_last)
    if SINK_SLOTS:
        tl.store(SINKVALID + b64 * NS + count, (pid >= 0).to(tl.int8), mask=row_last & becomes)
    if NSS > 0:
        tl.store(LEFT + b64, left + valid_out.to(tl.int64), mask=row_last)
    if F > 1:
        tl.store(PKEEP + b64 * F + pcount, keep_out.to(tl.int8), mask=row_last & ~folding)
    if HKV > 1:
        tl.store(SYNC + base + b64, 0, mask=row_last)
    grid_last = row_last & (tl.atomic_add(SYNC + base + B, 1, mask=row_last) == B - 1)
    tl.store(SLOT, (slot + 1) % L, mask=grid_last)
    if F > 1:
        tl.store(PCOUNT, tl.where(folding, 0, pcount + 1), mask=grid_last)
    tl.store(SYNC + base + B, 0, mask=grid_last)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_decode_enabled(x: torch.Tensor) -> bool:
    """Whether `LINEARIZE_FUSED_DECODE` lets the fused step run on tensors like x, (batch, ...) (see the module
    docstring)."""
    setting = os.environ.get(FUSED_ENV, "").strip()
    if setting == "0":
        return False
    return x.is_cuda or (setting == "1" and _interpreting())


def fused_decode_applies(state, q, modes, *, weight=0.1) -> bool:
    """Whether `fused_decode_step` computes this step (else it returns None and the caller keeps its path)."""
    for mode in modes:
        component_mode(mode)  # an unknown name raises
    w_ok = not torch.is_tensor(weight) or weight.dim() in (0, 1, 3)
    return (len(modes) == 1 and modes[0] in FUSED_MODES and w_ok and fused_decode_enabled(q)
            and state.additive and state.memory is None and state.buf_k.shape[2] > 0
            and state.S.dtype == torch.float32 and q.dtype in (torch.float16, torch.bfloat16, torch.float32))


def fold_every(state) -> int:
    """F of the deferred fold for this state: its pending list's length once it has one (a state keeps the F it was
    first stepped with), else TUNING's -- except during CUDA-graph capture, where a new list's zeros would be captured
    and replayed every step: 1 then (each step folds its key; the list is made by an eager step, as GraphDecoder's
    warm-up steps are)."""
    if state.pend_kf is not None:
        return state.pend_kf.shape[2]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return 1
    b, hkv, _, d = state.S.shape
    return int(resolve_tuning(TUNING, b * hkv, d, state.S.device)["fold_every"])


def _pending_list(state, f: int) -> tuple:
    """The kernel's PKF, PV, PKEEP, PCOUNT: the state's deferred-fold list (recurrent.HybridState.pend_*) of F = f > 1
    entries (made, empty, at the first step: before a CUDA graph captures one, as its warm-up steps run eagerly), or
    placeholders for f = 1."""
    if f == 1:
        return state.S, state.S, state.slot, state.slot  # never read
    if state.pend_count is None:
        b, hkv, _, m = state.buf_kf.shape
        state.pend_kf = state.buf_kf.new_zeros(b, hkv, f, m)
        state.pend_v = state.buf_v.new_zeros(b, hkv, f, state.buf_v.shape[-1])
        state.pend_keep = torch.zeros(b, f, dtype=torch.bool, device=state.buf_kf.device)
        state.pend_count = torch.zeros(1, dtype=torch.long, device=state.buf_kf.device)
    return state.pend_kf, state.pend_v, _bool_bytes(state.pend_keep), state.pend_count


def _sync_counters(state, n: int, device) -> torch.Tensor:
    """The kernel's n arrival counters (int32, zero between launches), kept on the state so that a captured graph
    replays against the same buffer."""
    sync = getattr(state, "_fused_sync", None)
    if sync is None or sync.shape[0] != n or sync.device != device:
        sync = torch.zeros(n, dtype=torch.int32, device=device)
        state._fused_sync = sync
    return sync


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def launch_config(b: int, hkv: int, g: int, d: int, m: int, L: int, ns: int, device, dtype, key_dtype=None,
                  tuning: dict | None = None) -> dict:
    """The kernel's tiles, warps and variant for a step of this shape under `tuning` (default TUNING): ND d-tiles of
    BD columns (FULL_D: one tile covers head_dim), GP query rows (the G heads of a KV head, padded), BLC window keys,
    BM rows of S and BS sink slots per tile, MP / DP (m, d as powers of two: the closing writes), num_warps, DOT /
    PREC, STAGES, NATIVE_QK. dtype: q's; key_dtype: the ring's and the new key's (None: both dtype). Settings that
    give the same launch run the same code (the sweep times each once)."""
    key_dtype = dtype if key_dtype is None else key_dtype
    tuning = resolve_tuning(TUNING if tuning is None else tuning, b * hkv, d, device)
    if tuning["contract"] not in ("loop", "dot"):
        raise ValueError(f"TUNING['contract'] must be 'loop' or 'dot', not {tuning['contract']!r}")
    dot = tuning["contract"] == "dot"
    if tuning["fold_pass"] not in ("inline", "after"):
        raise ValueError(f"TUNING['fold_pass'] must be 'inline' or 'after', not {tuning['fold_pass']!r}")
    if int(tuning["fold_every"]) < 1:
        raise ValueError(f"TUNING['fold_every'] must be >= 1, not {tuning['fold_every']!r}")
    least = 16 if dot else 1  # tl.dot's smallest side
    # d-tiles while the (b, kv head) programs alone would leave SMs idle (small batches), down to min_tile_d columns
    bd, nd = _pow2(d, 16), 1
    while bd > 256:  # wider tiles than the kernels were built and measured for: d-tiles
        bd, nd = bd // 2, triton.cdiv(d, bd // 2)
    while (b * hkv * nd < tuning["programs_per_sm"] * _num_sms(device)
           and bd // 2 >= max(tuning["min_tile_d"], least)):
        bd, nd = bd // 2, triton.cdiv(d, bd // 2)
    warps = tuning["num_warps"] or (8 if bd >= 256 else 4)
    # rows of S (and keys of the window) per tile: a (rows, bd) tile is ~values_per_thread values per thread
    rows = max(2, tuning["values_per_thread"] * 32 * warps // bd)
    rows = 1 << (rows.bit_length() - 1)
    prec = "ieee" if not dot or dtype == torch.float32 else tuning["dot_precision"]
    # q . k in one 16-bit type: exact products on the tensor cores, fp32 sums (as fp32 arithmetic on those inputs);
    # not under the interpreter, whose 16-bit tl.dot returns garbage (Triton 3.6)
    native = dot and dtype in (torch.float16, torch.bfloat16) and key_dtype == dtype and not _interpreting()
    return dict(ND=nd, BD=bd, FULL_D=bool(tuning["keys_once"]) and nd == 1 and bd >= d, MP=_pow2(m), DP=_pow2(d), GP=_pow2(g, least), BLC=max(least, min(rows, _pow2(L + 1, 2))),
                BM=max(least, min(rows, 64, _pow2(m, 2))), BS=_pow2(ns, max(2, least)), num_warps=warps, DOT=dot,
                PREC=prec, STAGES=tuning["stages"], NATIVE_QK=native, F=int(tuning["fold_every"]),
                FP=_pow2(tuning["fold_every"], least),
                FOLD_AFTER=int(tuning["fold_every"]) > 1 and tuning["fold_pass"] == "after", BDF=min(bd, 64))


def _bool_bytes(x: torch.Tensor) -> torch.Tensor:
    """A bool tensor as int8 bytes, the same memory (the kernel writes it in place)."""
    if x.dtype != torch.bool or not x.is_contiguous():
        raise ValueError(f"expected a contiguous bool tensor, got {x.dtype} with strides {x.stride()}")
    return x.view(torch.int8)


def fused_decode_step(state, q, k, v, qf, kf, *, spec: AttentionSpec, modes, weight=0.1,
                      valid=None) -> dict[str, torch.Tensor] | None:
    """`recurrent.decode_step` for one component mode in one kernel launch: {mode: output (B, Hq, 1, d)}, the state
    advanced in place; None where `fused_decode_applies` says no (nothing is then changed). q (B, Hq, 1, d), k/v
    (B, Hkv, 1, d), qf (B, Hq, 1, m), kf (B, Hkv, 1, m), valid (B, 1) bool or None (all valid)."""
    if not fused_decode_applies(state, q, modes, weight=weight):
        return None
    (mode,) = modes
    scale, rule, placement = spec.scale, spec.rule, spec.placement
    if mode == "hybrid" and rule not in _RULE_CODES:
        raise ValueError(f"unknown combination rule {rule!r}; expected one of {tuple(_RULE_CODES)}")
    code = _RULE_CODES[rule] if mode == "hybrid" else _SINGLE_BRANCH[mode]
    b, hq, _, d = q.shape
    hkv, m = k.shape[1], qf.shape[-1]
    L = state.buf_k.shape[2]
    ns = state.sink_k.shape[2]
    nss = int(state.softmax_sinks)
    dev = q.device
    w, wscalar, w_sb, w_sh = q, 0.0, 0, 0  # q: a placeholder pointer the kernel never reads
    if torch.is_tensor(weight):
        w = weight.to(device=dev, dtype=torch.float32)
        if w.dim() == 3:  # (B, Hq, T): this token's column
            w = w[..., 0]
            w_sb, w_sh = (w.stride(0) if w.shape[0] > 1 else 0), (w.stride(1) if w.shape[1] > 1 else 0)
        elif w.dim() == 1:
            w_sh = w.stride(0) if w.shape[0] > 1 else 0
    else:
        wscalar = float(weight)
    out = torch.empty(b, hq, 1, d, device=dev, dtype=q.dtype)
    sink_kf = state.sink_kf if nss else state.sink_k
    has_sink_kf = state.sink_kf is not None and ns > 0
    f = fold_every(state)
    pending = _pending_list(state, f)
    same_keys = state.buf_k.dtype == k.dtype == state.sink_k.dtype
    launch = launch_config(b, hkv, hq // hkv, d, m, L, ns, dev, q.dtype, k.dtype if same_keys else torch.float32,
                           {**TUNING, "fold_every": f})
    fused_decode_kernel[(b * hkv * launch["ND"],)](
        q.contiguous(), qf.contiguous(), k.contiguous(), v.contiguous(), kf.contiguous(),
        q if valid is None else _bool_bytes(valid.to(torch.bool).contiguous()), w, out,
        state.buf_k, state.buf_v, state.buf_kf, _bool_bytes(state.buf_valid), state.slot, state.S, state.z,
        state.sink_k, state.sink_v, sink_kf, _bool_bytes(state.sink_valid),
        state.left_count if nss else state.slot, _sync_counters(state, b * hkv + b + 1, dev), *pending,
        float(scale), wscalar, w_sb, w_sh, b, L, ns, hq, hkv,
        m, d, hq // hkv,
        RULE=code, HAS_SWA=code != 3, HAS_LA=code != 2, LA_WINDOW=code == 3 or (code < 2 and placement != "complementary"),
        HAS_VALIDN=valid is not None, W_TENSOR=torch.is_tensor(weight), NSS=nss,
        SINK_SLOTS=ns > 0, SINK_KF=has_sink_kf, **launch,
    )
    state.seen += 1
    return {mode: out}
