"""The split backend's Triton kernels (CUDA): the suffix part, and the log-sum-exp merge.

The suffix op (``_suffix.py``): query i of round 0 sees exactly one key per live suffix round,
row ``s * L + i`` of the suffix K/V (``[B, Hkv, S * L, D]``). So the part is a handful of dot
products per query, memory-bound: each kernel reads its tiles once and keeps the per-query
softmax state in registers. The merge kernels fold such a part into the causal kernel's output
inside the causal op (``_causal.py``). They mirror ``_suffix._suffix_reference``,
``_suffix._suffix_backward_reference``, ``_causal._merge_reference`` and
``_causal._merge_backward_reference`` (held to them on CPU by ``tests/test_triton_interpreter.py``).
Imported only when a CUDA kernel runs.

Two forms of each suffix kernel; which runs is an argument (``variant``), defaulting to the grouped
one wherever its tiles fit (Note [grouped suffix kernels]):

- ``"grouped"`` (forward) / ``"fused"`` (backward): one program per (query block, batch x kv-head)
  holding the G q-heads that share a K/V head as ``[BLOCK, G, D]`` tiles; the backward is one
  launch that writes dq and every row of the suffix K/V gradient (no atomics: each program owns
  its query rows of every round; dead rounds get zeros).
- ``"heads"`` (forward) / ``"split"`` (backward): one program per (query block, batch x q-head);
  the backward in two launches (dq and the row term; then dk, dv summed over the group). They
  run groups wider than ``_MAX_GROUP`` q-heads.

Launch parameters of the grouped kernels are an argument too (``config``: rows per program, warps,
pipeline stages); the defaults are the fastest measured (docs/benchmarks.md, "suffix kernels").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L = 32  # queries per program of the per-head kernels: 32 x 128 fp32 tiles stay in registers
PIPELINE = tl.constexpr(3)  # loads of the next round issued while this one computes
GROUPED_FORWARD = dict(rows=16, num_warps=2, stages=3)  # rows = G heads x BLOCK queries per program
FUSED_BACKWARD = dict(rows=16, num_warps=2, stages=3)
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # float32's lowest: the lse of a part with no key

# Note [grouped suffix kernels]
#     The G q-heads of a GQA group read the same K/V rows. The grouped kernels hold a group's G
#     heads as [BLOCK, G, D] tiles, so one program reads each live round's K/V once, and the
#     backward is a single pass: per round it has p and ds of all G heads, adds ds * k into each
#     head's dq (registers), and stores dk_s = sum_g ds * q_g and dv_s = sum_g p * dO_g. The
#     tiles are [BLOCK, G, D], queries first: Triton spreads the leading axis over warps, so the
#     per-round sums over the group stay within a warp (heads first made the backward 5x slower,
#     docs/benchmarks.md). A group wider than _MAX_GROUP q-heads runs the per-head kernels (its
#     tiles would not fit in registers).
_MAX_GROUP = 16

# Note [a part folded in]
#     The split op (``_split.py``) merges the suffix rounds into the causal kernel's part
#     ``(out_c, lse_c)`` inside the forward kernels: the online softmax starts from that part's
#     state (running max lse_c, sum 1, accumulator out_c: the state after a block of keys whose
#     normalised output is out_c) instead of the empty one, and the result is stored in q's dtype.
#     So the suffix part never exists as a tensor of its own. Its backward needs no such state:
#     given the merged out, lse and dO it is exact as it is (Note [the suffix first] in
#     ``_causal.py``); there the kernels start their float32 dq from the causal kernel's (``DQ0``,
#     as that kernel rounded it) and round the sum once, and write their rows of the whole K/V
#     gradient (``kv_rows`` rows per (batch, kv-head)), so neither is summed or concatenated
#     again outside.


@triton.jit
def _tile(ptr, row_stride, col_stride, rows, row_mask, cols, col_mask):
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _live_suffix(ROUNDS, S):
    """Suffix rounds 0 <= s < limit are live (round s + 1 of the buffer): s + 1 < rounds, s < S;
    rounds is clamped to [1, S + 1] by the caller (``_checks._live_rounds``)."""
    return tl.minimum(tl.load(ROUNDS) - 1, S)


@triton.jit
def _tile3(ptr, row_stride, head_stride, col_stride, rows, heads, ok, cols, col_mask):
    """A ``[BLOCK, BLOCK_G, BLOCK_D]`` fp32 tile: rows x heads x columns (Note [grouped suffix kernels])."""
    offsets = (rows[:, None, None] * row_stride + heads[None, :, None] * head_stride
               + cols[None, None, :] * col_stride)
    return tl.load(ptr + offsets, mask=ok[:, :, None] & col_mask[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def _group_rows(Hq, Hkv, G, L, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """This program's batch, kv-head, the (batch x q-head) rows ``[BLOCK_G]`` and q-heads
    ``[BLOCK_G]`` of its group, its query indices ``[BLOCK]``, the valid (query, head) pairs
    ``[BLOCK, BLOCK_G]`` and the head-dim ranges of q/k and of v."""
    # int64 offsets: K/V of B=8, 8 heads, d=128 at 32K x 8 rounds already holds 2.1e9 > 2**31 elements
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # query blocks: the fastest axis
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // Hkv, bhk % Hkv
    g = tl.arange(0, BLOCK_G)
    h = hk * G + g  # [BLOCK_G]
    ok = (i < L)[:, None] & (g < G)[None, :]  # [BLOCK, BLOCK_G]
    return b, hk, b * Hq + h, h, i, ok, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _suffix_forward_grouped_kernel(
    Q, KS, VS, ROUNDS, OUT_C, LSE_C, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    Hq, Hkv, G, L, D, Dv, S, scale,
    HAS_PART: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, STAGES: tl.constexpr,
):
    """OUT, LSE: contiguous [B, Hq, L, Dv] (any float dtype) / [B, Hq, L] (fp32). One
    online-softmax update per live round, from the empty state, or with HAS_PART from the part
    OUT_C, LSE_C (contiguous as OUT, LSE; Note [a part folded in]); a row with nothing gets out
    0 and the lowest float as lse."""
    b, hk, bh, h, i, ok, d, e = _group_rows(Hq, Hkv, G, L, BLOCK, BLOCK_G, BLOCK_D, BLOCK_DV)
    i_ok = i < L
    q = _tile3(Q + b * s_qb, s_ql, s_qh, s_qd, i, h, ok, d, d < D)  # [BLOCK, BLOCK_G, BLOCK_D]
    if HAS_PART:
        acc = _tile3(OUT_C, Dv, L * Dv, 1, i, bh, ok, e, e < Dv)  # [BLOCK, BLOCK_G, BLOCK_DV]
        m = tl.load(LSE_C + i[:, None] + bh[None, :] * L, mask=ok, other=0.0)  # [BLOCK, BLOCK_G]
        l_sum = tl.full([BLOCK, BLOCK_G], 1.0, tl.float32)
    else:
        acc = tl.zeros([BLOCK, BLOCK_G, BLOCK_DV], tl.float32)
        m = tl.full([BLOCK, BLOCK_G], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK, BLOCK_G], tl.float32)
    k_base = KS + b * s_kb + hk * s_kh
    v_base = VS + b * s_vb + hk * s_vh
    for s in tl.range(0, _live_suffix(ROUNDS, S), num_stages=STAGES):
        k = _tile(k_base, s_kl, s_kd, s * L + i, i_ok, d, d < D)  # read once for the G heads
        score = tl.sum(q * k[:, None, :], axis=2) * scale  # [BLOCK, BLOCK_G]
        m_new = tl.maximum(m, score)
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        v = _tile(v_base, s_vl, s_vd, s * L + i, i_ok, e, e < Dv)
        acc = acc * alpha[:, :, None] + p[:, :, None] * v[:, None, :]
        l_sum = l_sum * alpha + p
        m = m_new
    live = l_sum > 0
    out = acc / tl.where(live, l_sum, 1.0)[:, :, None]
    tl.store(OUT + i[:, None, None] * Dv + bh[None, :, None] * L * Dv + e[None, None, :],
             out.to(OUT.dtype.element_ty), mask=ok[:, :, None] & (e < Dv)[None, None, :])
    tl.store(LSE + i[:, None] + bh[None, :] * L, tl.where(live, m + tl.log(tl.where(live, l_sum, 1.0)), _LOWEST), mask=ok)


@triton.jit
def _suffix_backward_fused_kernel(
    DOUT, DLSE, Q, KS, VS, OUT, LSE, ROUNDS, DQ0, DQ, DKS, DVS,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    Hq, Hkv, G, L, D, Dv, S, kv_rows, scale,
    HAS_DLSE: tl.constexpr, HAS_DQ0: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, STAGES: tl.constexpr,
):
    """Every gradient in one pass (Note [grouped suffix kernels]). DOUT, OUT, DQ (and DQ0, added
    into DQ with HAS_DQ0): contiguous [B, Hq, L, *]; DLSE, LSE: contiguous [B, Hq, L]; DKS, DVS:
    [B, Hkv, S * L, *] with kv_rows rows from one (batch, kv-head) to the next and unit strides
    otherwise, every row written (live rounds computed, dead ones zero)."""
    b, hk, bh, h, i, ok, d, e = _group_rows(Hq, Hkv, G, L, BLOCK, BLOCK_G, BLOCK_D, BLOCK_DV)
    i_ok = i < L
    d_ok, e_ok = d < D, e < Dv
    k_ok, v_ok = i_ok[:, None] & d_ok[None, :], i_ok[:, None] & e_ok[None, :]  # [BLOCK, BLOCK_D], [BLOCK, BLOCK_DV]
    rows = i[:, None] + bh[None, :] * L  # [BLOCK, BLOCK_G]: (query, head) rows of the contiguous tensors
    dout = _tile3(DOUT, Dv, L * Dv, 1, i, bh, ok, e, e_ok)  # [BLOCK, BLOCK_G, BLOCK_DV]
    delta = tl.sum(dout * _tile3(OUT, Dv, L * Dv, 1, i, bh, ok, e, e_ok), axis=2)  # [BLOCK, BLOCK_G]
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    lse = tl.load(LSE + rows, mask=ok, other=0.0)  # [BLOCK, BLOCK_G]
    q = _tile3(Q + b * s_qb, s_ql, s_qh, s_qd, i, h, ok, d, d_ok)  # [BLOCK, BLOCK_G, BLOCK_D]
    if HAS_DQ0:
        dq = _tile3(DQ0, D, L * D, 1, i, bh, ok, d, d_ok)  # [BLOCK, BLOCK_G, BLOCK_D]
    else:
        dq = tl.zeros([BLOCK, BLOCK_G, BLOCK_D], tl.float32)
    k_base = KS + b * s_kb + hk * s_kh
    v_base = VS + b * s_vb + hk * s_vh
    row0 = (b * Hkv + hk) * kv_rows + i  # [BLOCK]: this program's row of suffix round 0 in DKS, DVS
    limit = _live_suffix(ROUNDS, S)
    for s in tl.range(0, limit, num_stages=STAGES):
        k = _tile(k_base, s_kl, s_kd, s * L + i, i_ok, d, d_ok)
        v = _tile(v_base, s_vl, s_vd, s * L + i, i_ok, e, e_ok)
        # Rows out of range (padded heads, queries past L) load zeros: their p is 1 but dO is 0, so
        # they add nothing to dk, dv, and their dq is not stored.
        p = tl.exp(tl.sum(q * k[:, None, :], axis=2) * scale - lse)  # [BLOCK, BLOCK_G]
        ds = p * (tl.sum(dout * v[:, None, :], axis=2) - delta) * scale
        dq += ds[:, :, None] * k[:, None, :]
        row = row0 + s * L
        tl.store(DKS + row[:, None] * D + d[None, :], tl.sum(ds[:, :, None] * q, axis=1).to(DKS.dtype.element_ty),
                 mask=k_ok)
        tl.store(DVS + row[:, None] * Dv + e[None, :], tl.sum(p[:, :, None] * dout, axis=1).to(DVS.dtype.element_ty),
                 mask=v_ok)
    for s in tl.range(tl.maximum(limit, 0), S):  # dead rounds: zero gradients
        row = row0 + s * L
        tl.store(DKS + row[:, None] * D + d[None, :], tl.zeros([BLOCK, BLOCK_D], DKS.dtype.element_ty), mask=k_ok)
        tl.store(DVS + row[:, None] * Dv + e[None, :], tl.zeros([BLOCK, BLOCK_DV], DVS.dtype.element_ty), mask=v_ok)
    tl.store(DQ + i[:, None, None] * D + bh[None, :, None] * L * D + d[None, None, :], dq.to(DQ.dtype.element_ty),
             mask=ok[:, :, None] & d_ok[None, None, :])


@triton.jit
def _query_block(Hq, G, L, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's (batch x q-head) row, batch, q-head, kv-head, query indices (and which are
    in range), and the head-dim ranges of q/k and of v (the per-head kernels)."""
    bh = tl.program_id(0).to(tl.int64)  # the fastest grid axis: the G q-heads sharing K/V run together
    b, h = bh // Hq, bh % Hq
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return bh, b, h, h // G, i, i < L, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _suffix_forward_heads_kernel(
    Q, KS, VS, ROUNDS, OUT_C, LSE_C, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    Hq, G, L, D, Dv, S, scale,
    HAS_PART: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """:func:`_suffix_forward_grouped_kernel` for one q-head per program."""
    bh, b, h, hk, i, i_ok, d, e = _query_block(Hq, G, L, BLOCK, BLOCK_D, BLOCK_DV)
    q = _tile(Q + b * s_qb + h * s_qh, s_ql, s_qd, i, i_ok, d, d < D)
    if HAS_PART:
        acc = _tile(OUT_C + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv)
        m = tl.load(LSE_C + bh * L + i, mask=i_ok, other=0.0)
        l_sum = tl.full([BLOCK], 1.0, tl.float32)
    else:
        acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK], tl.float32)
    k_base = KS + b * s_kb + hk * s_kh
    v_base = VS + b * s_vb + hk * s_vh
    for s in tl.range(0, _live_suffix(ROUNDS, S), num_stages=PIPELINE):
        k = _tile(k_base, s_kl, s_kd, s * L + i, i_ok, d, d < D)
        score = tl.sum(q * k, axis=1) * scale
        m_new = tl.maximum(m, score)
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        v = _tile(v_base, s_vl, s_vd, s * L + i, i_ok, e, e < Dv)
        acc = acc * alpha[:, None] + p[:, None] * v
        l_sum = l_sum * alpha + p
        m = m_new
    live = l_sum > 0
    tl.store(OUT + bh * L * Dv + i[:, None] * Dv + e[None, :],
             (acc / tl.where(live, l_sum, 1.0)[:, None]).to(OUT.dtype.element_ty), mask=i_ok[:, None] & (e < Dv)[None, :])
    tl.store(LSE + bh * L + i, tl.where(live, m + tl.log(tl.where(live, l_sum, 1.0)), _LOWEST), mask=i_ok)


@triton.jit
def _suffix_dq_kernel(
    DOUT, DLSE, Q, KS, VS, OUT, LSE, ROUNDS, DQ0, DQ, DELTA,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    Hq, G, L, D, Dv, S, scale,
    HAS_DLSE: tl.constexpr, HAS_DQ0: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Pass 1 of the split backward: dq and the row term D (for pass 2). DOUT, OUT, DQ:
    contiguous [B, Hq, L, *]; DLSE, LSE, DELTA: contiguous [B, Hq, L]."""
    bh, b, h, hk, i, i_ok, d, e = _query_block(Hq, G, L, BLOCK, BLOCK_D, BLOCK_DV)
    dout = _tile(DOUT + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv)
    delta = tl.sum(dout * _tile(OUT + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv), axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * L + i, mask=i_ok, other=0.0)
    tl.store(DELTA + bh * L + i, delta, mask=i_ok)
    q = _tile(Q + b * s_qb + h * s_qh, s_ql, s_qd, i, i_ok, d, d < D)
    lse = tl.load(LSE + bh * L + i, mask=i_ok, other=0.0)
    if HAS_DQ0:
        dq = _tile(DQ0 + bh * L * D, D, 1, i, i_ok, d, d < D)
    else:
        dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    k_base = KS + b * s_kb + hk * s_kh
    v_base = VS + b * s_vb + hk * s_vh
    for s in tl.range(0, _live_suffix(ROUNDS, S), num_stages=PIPELINE):
        k = _tile(k_base, s_kl, s_kd, s * L + i, i_ok, d, d < D)
        v = _tile(v_base, s_vl, s_vd, s * L + i, i_ok, e, e < Dv)
        p = tl.exp(tl.sum(q * k, axis=1) * scale - lse)
        ds = p * (tl.sum(dout * v, axis=1) - delta) * scale
        dq += ds[:, None] * k
    tl.store(DQ + bh * L * D + i[:, None] * D + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=i_ok[:, None] & (d < D)[None, :])


@triton.jit
def _suffix_dkv_kernel(
    DOUT, Q, KS, VS, LSE, DELTA, ROUNDS, DKS, DVS,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    Hq, Hkv, G, L, D, Dv, S, kv_rows, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Pass 2 of the split backward: DKS, DVS ([B, Hkv, S * L, *], kv_rows rows per (batch,
    kv-head), unit strides otherwise) rows of suffix
    round s = program_id(0) (the fastest grid axis: the rounds reading the same q and dO tiles
    run together), summed over the group's q-heads; a dead round gets zeros."""
    s = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bhk = tl.program_id(2).to(tl.int64)
    b, hk = bhk // Hkv, bhk % Hkv
    i_ok = i < L
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    k = _tile(KS + b * s_kb + hk * s_kh, s_kl, s_kd, s * L + i, i_ok, d, d < D)
    v = _tile(VS + b * s_vb + hk * s_vh, s_vl, s_vd, s * L + i, i_ok, e, e < Dv)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
    live_heads = tl.where(s < _live_suffix(ROUNDS, S), G, 0)
    for g in tl.range(0, live_heads, num_stages=PIPELINE):
        bh = b * Hq + hk * G + g
        q = _tile(Q + b * s_qb + (hk * G + g) * s_qh, s_ql, s_qd, i, i_ok, d, d < D)
        dout = _tile(DOUT + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv)
        lse = tl.load(LSE + bh * L + i, mask=i_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + i, mask=i_ok, other=0.0)
        p = tl.exp(tl.sum(q * k, axis=1) * scale - lse)
        ds = p * (tl.sum(dout * v, axis=1) - delta) * scale
        dk += ds[:, None] * q
        dv += p[:, None] * dout
    row = bhk * kv_rows + s * L + i
    tl.store(DKS + row[:, None] * D + d[None, :], dk.to(DKS.dtype.element_ty), mask=i_ok[:, None] & (d < D)[None, :])
    tl.store(DVS + row[:, None] * Dv + e[None, :], dv.to(DVS.dtype.element_ty), mask=i_ok[:, None] & (e < Dv)[None, :])


# ----------------------------------------------------------------------------- the merge


@triton.jit
def _merge_forward_kernel(OUT_C, LSE_C, OUT_P, LSE_P, OUT, LSE, N, Dv,
                          BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Rows r < N of the contiguous [N, Dv] / [N] tensors: the two parts merged by log-sum-exp."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    e = tl.arange(0, BLOCK_DV)
    r_ok = r < N
    ok = r_ok[:, None] & (e < Dv)[None, :]
    lse_c = tl.load(LSE_C + r, mask=r_ok, other=0.0)
    lse_p = tl.load(LSE_P + r, mask=r_ok, other=0.0)
    m = tl.maximum(lse_c, lse_p)
    lse = m + tl.log(tl.exp(lse_c - m) + tl.exp(lse_p - m))
    a, b = tl.exp(lse_c - lse), tl.exp(lse_p - lse)
    out = (a[:, None] * _tile(OUT_C, Dv, 1, r, r_ok, e, e < Dv)
           + b[:, None] * _tile(OUT_P, Dv, 1, r, r_ok, e, e < Dv))
    tl.store(OUT + r[:, None] * Dv + e[None, :], out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(LSE + r, lse, mask=r_ok)


@triton.jit
def _merge_backward_kernel(DOUT, DLSE, OUT, LSE, OUT_P, LSE_P, D_OUT_P, D_LSE_P, O_ROW, N, Dv,
                           HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Rows r < N: the part's gradients d out_p, d lse_p, and (with an lse gradient) the output
    the kernel backward reads for its row term (Note [lse gradient through the row term])."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    e = tl.arange(0, BLOCK_DV)
    r_ok = r < N
    ok = r_ok[:, None] & (e < Dv)[None, :]
    dout = _tile(DOUT, Dv, 1, r, r_ok, e, e < Dv)
    out = _tile(OUT, Dv, 1, r, r_ok, e, e < Dv)
    delta = tl.sum(dout * out, axis=1)
    if HAS_DLSE:
        dlse = tl.load(DLSE + r, mask=r_ok, other=0.0)
        delta -= dlse
        norm2 = tl.sum(dout * dout, axis=1)
        coef = tl.where(norm2 > 0, dlse / tl.where(norm2 > 0, norm2, 1.0), 0.0)
        tl.store(O_ROW + r[:, None] * Dv + e[None, :], (out - coef[:, None] * dout).to(O_ROW.dtype.element_ty),
                 mask=ok)
    b = tl.exp(tl.load(LSE_P + r, mask=r_ok, other=0.0) - tl.load(LSE + r, mask=r_ok, other=0.0))
    out_p = _tile(OUT_P, Dv, 1, r, r_ok, e, e < Dv)
    tl.store(D_OUT_P + r[:, None] * Dv + e[None, :], (b[:, None] * dout).to(D_OUT_P.dtype.element_ty), mask=ok)
    tl.store(D_LSE_P + r, b * (tl.sum(dout * out_p, axis=1) - delta), mask=r_ok)


def _merge_blocks(Dv: int) -> dict:
    BLOCK_DV = triton.next_power_of_2(Dv)
    return dict(BLOCK=max(1, 4096 // BLOCK_DV), BLOCK_DV=BLOCK_DV)


def merge_forward_triton(out_c: Tensor, lse_c: Tensor, out_p: Tensor, lse_p: Tensor, dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor]:
    """``_causal._merge_reference`` on CUDA: ``(out [B, H, L, Dv] in dtype, lse [B, H, L])``."""
    out_c, lse_c, out_p, lse_p = (t.contiguous() for t in (out_c, lse_c, out_p, lse_p))
    out = torch.empty(out_c.shape, dtype=dtype, device=out_c.device)
    lse = torch.empty(lse_c.shape, dtype=torch.promote_types(lse_c.dtype, lse_p.dtype), device=lse_c.device)
    N, Dv = lse_c.numel(), out_c.shape[-1]
    blocks = _merge_blocks(Dv)
    _merge_forward_kernel[(triton.cdiv(N, blocks["BLOCK"]),)](out_c, lse_c, out_p, lse_p, out, lse, N, Dv, **blocks)
    return out, lse


def merge_backward_triton(dout: Tensor, dlse: Tensor | None, out: Tensor, lse: Tensor, out_p: Tensor,
                          lse_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``_causal._merge_backward_reference`` on CUDA: ``(d_out_p, d_lse_p, out for the row term)``."""
    dout, out, lse, out_p, lse_p = (t.contiguous() for t in (dout, out, lse, out_p, lse_p))
    d_out_p = torch.empty(out_p.shape, dtype=out_p.dtype, device=out_p.device)
    d_lse_p = torch.empty(lse_p.shape, dtype=lse_p.dtype, device=lse_p.device)
    o_row = out if dlse is None else torch.empty_like(out)
    N, Dv = lse.numel(), out.shape[-1]
    blocks = _merge_blocks(Dv)
    _merge_backward_kernel[(triton.cdiv(N, blocks["BLOCK"]),)](
        dout, dout if dlse is None else dlse.contiguous(), out, lse, out_p, lse_p, d_out_p, d_lse_p, o_row, N, Dv,
        HAS_DLSE=dlse is not None, **blocks,
    )
    return d_out_p, d_lse_p, o_row


# ----------------------------------------------------------------------------- launches


def _heads_blocks(D: int, Dv: int) -> dict:
    return dict(BLOCK=BLOCK_L, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv))


def _grouped_blocks(G: int, D: int, Dv: int, config: dict) -> dict:
    """Launch parameters of a grouped kernel from ``config`` (rows, num_warps, stages)."""
    BLOCK_G = triton.next_power_of_2(G)
    return dict(BLOCK=max(1, config["rows"] // BLOCK_G), BLOCK_G=BLOCK_G, BLOCK_D=triton.next_power_of_2(D),
                BLOCK_DV=triton.next_power_of_2(Dv), STAGES=config["stages"], num_warps=config["num_warps"])


def suffix_forward_triton(q: Tensor, ks: Tensor, vs: Tensor, rounds: Tensor, scale: float,
                          part: tuple[Tensor, Tensor] | None = None, variant: str | None = None,
                          config: dict | None = None) -> tuple[Tensor, Tensor]:
    """``_suffix._suffix_reference`` on CUDA, or with ``part`` ``(out_c, lse_c)`` its merge with
    that part (``_suffix._suffix_merge_reference``; out then in q's dtype). ``variant``:
    "grouped" (the default where the group fits, ``_MAX_GROUP``) or "heads"; ``config``: the
    grouped kernel's launch parameters (default ``GROUPED_FORWARD``)."""
    if q.dtype == torch.float64:
        raise NotImplementedError("suffix kernels: float64 is a CPU path (the kernels keep float32 state).")
    B, Hq, L, D = q.shape
    Hkv, Dv = ks.shape[1], vs.shape[-1]
    S, G = ks.shape[2] // L, Hq // Hkv
    out = q.new_empty(B, Hq, L, Dv, dtype=torch.float32 if part is None else q.dtype)
    lse = q.new_empty(B, Hq, L, dtype=torch.float32)
    out_c, lse_c = (out, lse) if part is None else (part[0].contiguous(), part[1].float().contiguous())
    strides = (*q.stride(), *ks.stride(), *vs.stride())
    if _variant(variant, "grouped", "heads", G) == "grouped":
        blocks = _grouped_blocks(G, D, Dv, config or GROUPED_FORWARD)
        _suffix_forward_grouped_kernel[(triton.cdiv(L, blocks["BLOCK"]), B * Hkv)](
            q, ks, vs, rounds, out_c, lse_c, out, lse, *strides, Hq, Hkv, G, L, D, Dv, S, scale,
            HAS_PART=part is not None, **blocks,
        )
    else:
        _suffix_forward_heads_kernel[(B * Hq, triton.cdiv(L, BLOCK_L))](
            q, ks, vs, rounds, out_c, lse_c, out, lse, *strides, Hq, G, L, D, Dv, S, scale,
            HAS_PART=part is not None, **_heads_blocks(D, Dv),
        )
    return out, lse


def suffix_backward_triton(dout: Tensor, dlse: Tensor | None, q: Tensor, ks: Tensor, vs: Tensor, out: Tensor,
                           lse: Tensor, rounds: Tensor, scale: float, dq0: Tensor | None = None,
                           dks: Tensor | None = None, dvs: Tensor | None = None, variant: str | None = None,
                           config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``_suffix._suffix_backward_reference`` on CUDA, ``(dq, dks, dvs)``. With ``dq0`` (``[B, Hq,
    L, D]``), dq is ``dq0`` plus the suffix part's, summed in float32; ``dks``/``dvs``, when given,
    are written in place (views of rows ``[L, (S + 1) * L)`` of a contiguous ``[B, Hkv, (S + 1) *
    L, *]`` buffer: the whole K/V gradient of the split op). ``variant``: "fused" (the default
    where the group fits) or "split"; ``config``: the fused kernel's launch parameters (default
    ``FUSED_BACKWARD``)."""
    B, Hq, L, D = q.shape
    Hkv, Dv = ks.shape[1], vs.shape[-1]
    S, G = ks.shape[2] // L, Hq // Hkv
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    has_dlse = dlse is not None
    dlse = lse if dlse is None else dlse.contiguous()  # not read without HAS_DLSE
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dq0 = dq if dq0 is None else dq0.contiguous()  # not read without HAS_DQ0
    dks = ks.new_empty(ks.shape) if dks is None else dks
    dvs = vs.new_empty(vs.shape) if dvs is None else dvs
    kv_rows = dks.stride(1) // D  # rows from one (batch, kv-head) to the next: S * L, or (S + 1) * L
    assert dks.stride(0) == Hkv * dks.stride(1) and dks.stride()[2:] == (D, 1) and dvs.stride() == (
        kv_rows * Hkv * Dv, kv_rows * Dv, Dv, 1), "dks/dvs: contiguous, or row views of a contiguous buffer"
    strides = (*q.stride(), *ks.stride(), *vs.stride())
    if _variant(variant, "fused", "split", G) == "fused":
        blocks = _grouped_blocks(G, D, Dv, config or FUSED_BACKWARD)
        _suffix_backward_fused_kernel[(triton.cdiv(L, blocks["BLOCK"]), B * Hkv)](
            dout, dlse, q, ks, vs, out, lse, rounds, dq0, dq, dks, dvs, *strides, Hq, Hkv, G, L, D, Dv, S, kv_rows,
            scale, HAS_DLSE=has_dlse, HAS_DQ0=dq0 is not dq, **blocks,
        )
        return dq, dks, dvs
    delta = torch.empty_like(lse)
    _suffix_dq_kernel[(B * Hq, triton.cdiv(L, BLOCK_L))](
        dout, dlse, q, ks, vs, out, lse, rounds, dq0, dq, delta, *strides, Hq, G, L, D, Dv, S, scale,
        HAS_DLSE=has_dlse, HAS_DQ0=dq0 is not dq, **_heads_blocks(D, Dv),
    )
    if S > 0:
        _suffix_dkv_kernel[(S, triton.cdiv(L, BLOCK_L), B * Hkv)](
            dout, q, ks, vs, lse, delta, rounds, dks, dvs, *strides, Hq, Hkv, G, L, D, Dv, S, kv_rows, scale,
            **_heads_blocks(D, Dv),
        )
    return dq, dks, dvs


def _variant(variant: str | None, grouped: str, per_head: str, G: int) -> str:
    """The kernel form to run: ``variant`` if given (the per-head form wherever the group is too
    wide for the grouped tiles), else the grouped form where it fits."""
    if variant not in (None, grouped, per_head):
        raise ValueError(f"suffix kernels: unknown variant={variant!r}; choose {grouped!r} or {per_head!r}.")
    fits = triton.next_power_of_2(G) <= _MAX_GROUP
    return grouped if fits and variant in (None, grouped) else per_head
