"""The split backend's suffix terms as Triton kernels (CUDA): merge forward, and backward.

Query i of round 0 sees exactly one key per live suffix round s >= 1, ``k[s * Q_LEN + i]``. So the
suffix is a handful of dot products per query, memory-bound: each kernel reads its tiles once and
keeps the per-query softmax state in registers. ``_split.py`` holds the same math in torch ops
(the CPU path, and the reference these kernels are tested against on CUDA).

By default each kernel runs one program per (query block, batch x kv-head), holding the G
q-heads that share a K/V head as ``[BLOCK, G, D]`` tiles (Note [grouped suffix kernels]): the
forward starts from the causal part's normalised output and log-sum-exp and folds in each live
round by the online-softmax update; the backward is one launch that writes dq and every row of
the K/V gradient buffer (no atomics: each program owns its query rows of every round; dead rounds
get zero gradients).

The per-head forms, one program per (query block, batch x q-head), run groups too wide for those
tiles: a forward, and a backward of two launches (dq with the row term D = rowsum(dO * O); dk_s,
dv_s summed over the group's q-heads). Which form runs: ``FORWARD`` / ``BACKWARD`` (Note [suffix
kernel switches]). Imported only when a CUDA kernel runs (Triton is not needed on CPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L = 32  # queries per program: 32 x 128 fp32 tiles stay in registers at 4 warps
# Loads of the next rounds (or q-heads) are issued while this one computes: the loops are short
# (<= 7 rounds, G heads) and latency-bound. On an H200 at Q_LEN=8192, 32/8 heads, d=128, 3 stages
# took the forward from 190 to 146 us and the backward from 646 to 452 us (with the grid orders
# below; 1 and 2 stages, 2 and 8 warps were slower).
PIPELINE = tl.constexpr(3)


# Note [suffix kernel switches]
#     Each suffix kernel has two forms: FORWARD "grouped" (default; one program per K/V head
#     group, Note [grouped suffix kernels]) or "heads" (one program per q-head); BACKWARD "fused"
#     (default; one grouped kernel) or "split" (the dq kernel, the dk/dv kernel and a copy of the
#     causal part's K/V gradient). The grouped forms are the default since they were measured
#     faster (H200, torch 2.11, triton 3.6, Q_LEN 8192 x 7 rounds, 32/8 heads, d128, bf16:
#     forward 117 against 145 us, backward 211 against 450 us; at 32768 x 7: 422 against 568,
#     811 against 1734 us). The per-head forms run groups wider than _MAX_GROUP, and stay
#     selectable for comparison: the environment variables COMPILED_MASK_SUFFIX_FWD and
#     COMPILED_MASK_SUFFIX_BWD set them when this module is imported; a benchmark may also assign
#     the attributes between calls: the ops read them on every call, inside a compiled graph too
#     (there the op is opaque). GROUPED_FWD and FUSED_BWD are the grouped kernels' launch
#     parameters: ``rows`` = G heads x BLOCK queries per program (BLOCK = rows //
#     next_power_of_2(G), at least 1), ``num_warps``, and ``stages`` of the round loop; the
#     values are the fastest of 36 (rows 16/32/64, 2/4/8 warps, 2/3 stages, fp32 or input-dtype
#     tiles) at both sizes above.
def _switch(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}; unset it for {default!r}")
    return value


FORWARD = _switch("COMPILED_MASK_SUFFIX_FWD", ("heads", "grouped"), "grouped")
BACKWARD = _switch("COMPILED_MASK_SUFFIX_BWD", ("split", "fused"), "fused")
GROUPED_FWD = dict(rows=16, num_warps=2, stages=3)
FUSED_BWD = dict(rows=16, num_warps=2, stages=3)


@triton.jit
def _tile(ptr, row_stride, col_stride, rows, row_mask, cols, col_mask):
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _live_limit(ROUNDS, S):
    """Suffix rounds 1 <= s < limit are live: s < rounds, and s <= S (the buffer's last round)."""
    return tl.minimum(tl.load(ROUNDS), S + 1)


@triton.jit
def _query_block(Hq, G, L, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's (batch x q-head) row, batch, q-head, kv-head, query indices (and which are
    in range), and the head-dim ranges of q/k and of v."""
    # int64 offsets: K/V of B=8, 8 heads, d=128 at 32K x 8 rounds already holds 2.1e9 > 2**31 elements
    bh = tl.program_id(0).to(tl.int64)  # the fastest grid axis: the G q-heads sharing K/V run together
    b, h = bh // Hq, bh % Hq
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return bh, b, h, h // G, i, i < L, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _suffix_forward_kernel(
    Q, K, V, OUT_C, LSE_C, ROUNDS, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd, s_lcb, s_lch, s_lcl, s_ob, s_oh, s_ol, s_od,
    Hq, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh, b, h, hk, i, i_ok, d, e = _query_block(Hq, G, L, BLOCK, BLOCK_D, BLOCK_DV)
    q = _tile(Q + b * s_qb + h * s_qh, s_ql, s_qd, i, i_ok, d, d < D)
    acc = _tile(OUT_C + b * s_cb + h * s_ch, s_cl, s_cd, i, i_ok, e, e < Dv)
    m = tl.load(LSE_C + b * s_lcb + h * s_lch + i * s_lcl, mask=i_ok, other=0.0)
    l_sum = tl.full([BLOCK], 1.0, tl.float32)  # acc is normalised: weight 1 at max m
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    for s in tl.range(1, _live_limit(ROUNDS, S), num_stages=PIPELINE):
        k = _tile(k_base, s_kl, s_kd, s * L + i, i_ok, d, d < D)
        score = tl.sum(q * k, axis=1) * scale
        m_new = tl.maximum(m, score)
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        v = _tile(v_base, s_vl, s_vd, s * L + i, i_ok, e, e < Dv)
        acc = acc * alpha[:, None] + p[:, None] * v
        l_sum = l_sum * alpha + p
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + i[:, None] * s_ol + e[None, :] * s_od,
             out.to(OUT.dtype.element_ty), mask=i_ok[:, None] & (e < Dv)[None, :])
    tl.store(LSE + bh * L + i, m + tl.log(l_sum), mask=i_ok)


@triton.jit
def _suffix_dq_kernel(
    DOUT, Q, K, V, OUT, LSE, ROUNDS, DQ_C, DQ, DELTA,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd,
    Hq, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """DOUT, OUT, DQ: contiguous [B, Hq, L, *]; LSE, DELTA: contiguous [B, Hq, L]."""
    bh, b, h, hk, i, i_ok, d, e = _query_block(Hq, G, L, BLOCK, BLOCK_D, BLOCK_DV)
    dout = _tile(DOUT + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv)
    delta = tl.sum(dout * _tile(OUT + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv), axis=1)
    tl.store(DELTA + bh * L + i, delta, mask=i_ok)
    q = _tile(Q + b * s_qb + h * s_qh, s_ql, s_qd, i, i_ok, d, d < D)
    lse = tl.load(LSE + bh * L + i, mask=i_ok, other=0.0)
    dq = _tile(DQ_C + b * s_cb + h * s_ch, s_cl, s_cd, i, i_ok, d, d < D)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    for s in tl.range(1, _live_limit(ROUNDS, S), num_stages=PIPELINE):
        k = _tile(k_base, s_kl, s_kd, s * L + i, i_ok, d, d < D)
        v = _tile(v_base, s_vl, s_vd, s * L + i, i_ok, e, e < Dv)
        p = tl.exp(tl.sum(q * k, axis=1) * scale - lse)
        ds = p * (tl.sum(dout * v, axis=1) - delta) * scale
        dq += ds[:, None] * k
    tl.store(DQ + bh * L * D + i[:, None] * D + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=i_ok[:, None] & (d < D)[None, :])


@triton.jit
def _suffix_dkv_kernel(
    DOUT, Q, K, V, LSE, DELTA, ROUNDS, DK, DV,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    Hq, Hkv, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """DK, DV: contiguous [B, Hkv, KV, *]; writes the rows of suffix round s = program_id(0) + 1
    (the fastest grid axis: the rounds that read the same q and dO tiles run together)."""
    s = tl.program_id(0) + 1
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bhk = tl.program_id(2).to(tl.int64)
    b, hk = bhk // Hkv, bhk % Hkv
    i_ok = i < L
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    k = _tile(K + b * s_kb + hk * s_kh, s_kl, s_kd, s * L + i, i_ok, d, d < D)
    v = _tile(V + b * s_vb + hk * s_vh, s_vl, s_vd, s * L + i, i_ok, e, e < Dv)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
    live_heads = tl.where(s < _live_limit(ROUNDS, S), G, 0)  # a dead round gets zero gradients
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
    row = (bhk * (S + 1) + s) * L + i
    tl.store(DK + row[:, None] * D + d[None, :], dk.to(DK.dtype.element_ty),
             mask=i_ok[:, None] & (d < D)[None, :])
    tl.store(DV + row[:, None] * Dv + e[None, :], dv.to(DV.dtype.element_ty),
             mask=i_ok[:, None] & (e < Dv)[None, :])


# Note [grouped suffix kernels]
#     The G q-heads of a GQA group read the same K/V rows. The per-head kernels above leave that
#     reuse to the L2 cache (their grids run a group's programs together), and the split backward
#     makes three passes: dq (reads q, dO, O, dq_causal and each live round's K/V, writes dq and
#     the row term D), dk/dv (reads each live round's K/V again, and q, dO, lse and D once per
#     round), and a copy of the causal part's K/V gradient into the full buffer. The grouped
#     kernels hold a group's G heads as [BLOCK, G, D] tiles, so one program reads each live
#     round's K/V once, and the backward is a single pass: per round s it has p and ds of all G
#     heads, adds ds * k_s into each head's dq (registers), and stores dk_s = sum_g ds * q_g and
#     dv_s = sum_g p * dO_g (no atomics: a program owns its query rows of every round). It also
#     writes the dead rounds' zeros and copies the causal part's dk/dv rows of its queries into
#     the first Q_LEN rows of the same buffer: cuDNN's backward has no ``out=``, so its K/V
#     gradient is a tensor of its own, and this copy (8% of the bytes at the size below) is no
#     launch of its own. Bytes each kernel must move: ``suffix_bytes`` in tools/bench.py; at Q_LEN
#     8192, 32/8 heads, d128, bf16, 7 rounds: forward 0.40 GB, backward 0.81 GB (0.07 GB of it the
#     causal copy); on an H200 the backward took 211 us, 3.8 TB/s (80% of the card's 4.8 TB/s).
#     A group wider than _MAX_GROUP q-heads runs the per-head kernels (its tiles would not fit
#     in registers).


# Note [grouped tile order]
#     The grouped tiles are [BLOCK, G, D], not [G, BLOCK, D] (the first version): the same math,
#     but the fused backward went from 1084 to 218 us at the same launch parameters (rows 32,
#     4 warps, 3 stages; H200, Q_LEN 8192 x 7 rounds, 32/8 heads, d128, bf16), from 2.4x slower
#     than the split backward to 2.1x faster. The likely cause, not checked in the generated code:
#     Triton's layout spreads the leading axis over warps, so with heads first every round's sums
#     over the group (dk_s, dv_s) crossed warps through shared memory; with queries first they
#     stay within a warp.
_MAX_GROUP = 16


@triton.jit
def _group_rows(Hq, Hkv, G, L, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """This program's batch, kv-head, the (batch x q-head) rows ``[BLOCK_G]`` and q-heads
    ``[BLOCK_G]`` of its group, its query indices ``[BLOCK]``, the valid (query, head) pairs
    ``[BLOCK, BLOCK_G]`` and the head-dim ranges of q/k and of v."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # query blocks: the fastest axis
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // Hkv, bhk % Hkv
    g = tl.arange(0, BLOCK_G)
    h = hk * G + g  # [BLOCK_G]
    ok = (i < L)[:, None] & (g < G)[None, :]  # [BLOCK, BLOCK_G]
    return b, hk, b * Hq + h, h, i, ok, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _tile3(ptr, row_stride, head_stride, col_stride, rows, heads, ok, cols, col_mask):
    """A ``[BLOCK, BLOCK_G, BLOCK_D]`` fp32 tile: rows x heads x columns (Note [grouped tile order])."""
    offsets = (rows[:, None, None] * row_stride + heads[None, :, None] * head_stride
               + cols[None, None, :] * col_stride)
    return tl.load(ptr + offsets, mask=ok[:, :, None] & col_mask[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def _round_tile(base, row_stride, col_stride, s, L, i, i_ok, cols, col_mask):
    """Round s's K or V rows of queries ``i``: ``[BLOCK, BLOCK_D]`` fp32, read once for G heads."""
    return _tile(base, row_stride, col_stride, s * L + i, i_ok, cols, col_mask)


@triton.jit
def _suffix_forward_grouped_kernel(
    Q, K, V, OUT_C, LSE_C, ROUNDS, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd, s_lcb, s_lch, s_lcl, s_ob, s_oh, s_ol, s_od,
    Hq, Hkv, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    STAGES: tl.constexpr,
):
    """:func:`_suffix_forward_kernel` for the G heads of a kv-head at once (Note [grouped suffix
    kernels]). LSE: contiguous [B, Hq, L]."""
    b, hk, bh, h, i, ok, d, e = _group_rows(Hq, Hkv, G, L, BLOCK, BLOCK_G, BLOCK_D, BLOCK_DV)
    i_ok = i < L
    q = _tile3(Q + b * s_qb, s_ql, s_qh, s_qd, i, h, ok, d, d < D)  # [BLOCK, BLOCK_G, BLOCK_D]
    acc = _tile3(OUT_C + b * s_cb, s_cl, s_ch, s_cd, i, h, ok, e, e < Dv)  # [BLOCK, BLOCK_G, BLOCK_DV]
    m = tl.load(LSE_C + b * s_lcb + i[:, None] * s_lcl + h[None, :] * s_lch, mask=ok, other=0.0)  # [BLOCK, BLOCK_G]
    l_sum = tl.full([BLOCK, BLOCK_G], 1.0, tl.float32)  # acc is normalised: weight 1 at max m
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    for s in tl.range(1, _live_limit(ROUNDS, S), num_stages=STAGES):
        k = _round_tile(k_base, s_kl, s_kd, s, L, i, i_ok, d, d < D)
        score = tl.sum(q * k[:, None, :], axis=2) * scale  # [BLOCK, BLOCK_G]
        m_new = tl.maximum(m, score)
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        v = _round_tile(v_base, s_vl, s_vd, s, L, i, i_ok, e, e < Dv)
        acc = acc * alpha[:, :, None] + p[:, :, None] * v[:, None, :]
        l_sum = l_sum * alpha + p
        m = m_new
    out = acc / l_sum[:, :, None]
    tl.store(OUT + b * s_ob + i[:, None, None] * s_ol + h[None, :, None] * s_oh + e[None, None, :] * s_od,
             out.to(OUT.dtype.element_ty), mask=ok[:, :, None] & (e < Dv)[None, None, :])
    tl.store(LSE + i[:, None] + bh[None, :] * L, m + tl.log(l_sum), mask=ok)


@triton.jit
def _suffix_backward_fused_kernel(
    DOUT, Q, K, V, OUT, LSE, ROUNDS, DQ_C, DK_C, DV_C, DQ, DK, DV,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd, s_kcb, s_kch, s_kcl, s_kcd, s_vcb, s_vch, s_vcl, s_vcd,
    Hq, Hkv, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dq, dk, dv in one pass (Note [grouped suffix kernels]). DOUT, OUT, DQ: contiguous
    [B, Hq, L, *]; LSE: contiguous [B, Hq, L]; DK, DV: contiguous [B, Hkv, KV, *], every row
    written: the causal part's rows copied from DK_C / DV_C, live rounds computed, dead ones zero."""
    b, hk, bh, h, i, ok, d, e = _group_rows(Hq, Hkv, G, L, BLOCK, BLOCK_G, BLOCK_D, BLOCK_DV)
    i_ok = i < L
    d_ok, e_ok = d < D, e < Dv
    k_ok, v_ok = i_ok[:, None] & d_ok[None, :], i_ok[:, None] & e_ok[None, :]  # [BLOCK, BLOCK_D], [BLOCK, BLOCK_DV]
    dout = _tile3(DOUT, Dv, L * Dv, 1, i, bh, ok, e, e_ok)  # [BLOCK, BLOCK_G, BLOCK_DV]
    delta = tl.sum(dout * _tile3(OUT, Dv, L * Dv, 1, i, bh, ok, e, e_ok), axis=2)  # rowsum(dO * O): [BLOCK, BLOCK_G]
    lse = tl.load(LSE + i[:, None] + bh[None, :] * L, mask=ok, other=0.0)  # [BLOCK, BLOCK_G]
    q = _tile3(Q + b * s_qb, s_ql, s_qh, s_qd, i, h, ok, d, d_ok)  # [BLOCK, BLOCK_G, BLOCK_D]
    dq = _tile3(DQ_C + b * s_cb, s_cl, s_ch, s_cd, i, h, ok, d, d_ok)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    row0 = (b * Hkv + hk) * (S + 1) * L + i  # [BLOCK]: this program's rows of round 0 in DK, DV
    limit = _live_limit(ROUNDS, S)
    for s in tl.range(1, limit, num_stages=STAGES):
        k = _round_tile(k_base, s_kl, s_kd, s, L, i, i_ok, d, d_ok)
        v = _round_tile(v_base, s_vl, s_vd, s, L, i, i_ok, e, e_ok)
        # Rows out of range (padded heads, queries past L) load zeros: their p is 1 but dO is 0, so
        # they add nothing to dk, dv, and their dq is not stored.
        p = tl.exp(tl.sum(q * k[:, None, :], axis=2) * scale - lse)  # [BLOCK, BLOCK_G]
        ds = p * (tl.sum(dout * v[:, None, :], axis=2) - delta) * scale
        dq += ds[:, :, None] * k[:, None, :]
        row = row0 + s * L
        tl.store(DK + row[:, None] * D + d[None, :], tl.sum(ds[:, :, None] * q, axis=1).to(DK.dtype.element_ty),
                 mask=k_ok)
        tl.store(DV + row[:, None] * Dv + e[None, :], tl.sum(p[:, :, None] * dout, axis=1).to(DV.dtype.element_ty),
                 mask=v_ok)
    for s in tl.range(tl.maximum(limit, 1), S + 1):  # dead rounds: zero gradients
        row = row0 + s * L
        tl.store(DK + row[:, None] * D + d[None, :], tl.zeros([BLOCK, BLOCK_D], DK.dtype.element_ty), mask=k_ok)
        tl.store(DV + row[:, None] * Dv + e[None, :], tl.zeros([BLOCK, BLOCK_DV], DV.dtype.element_ty), mask=v_ok)
    tl.store(DQ + i[:, None, None] * D + bh[None, :, None] * L * D + d[None, None, :], dq.to(DQ.dtype.element_ty),
             mask=ok[:, :, None] & d_ok[None, None, :])
    dk_c = tl.load(DK_C + b * s_kcb + hk * s_kch + i[:, None] * s_kcl + d[None, :] * s_kcd, mask=k_ok)
    tl.store(DK + row0[:, None] * D + d[None, :], dk_c.to(DK.dtype.element_ty), mask=k_ok)
    dv_c = tl.load(DV_C + b * s_vcb + hk * s_vch + i[:, None] * s_vcl + e[None, :] * s_vcd, mask=v_ok)
    tl.store(DV + row0[:, None] * Dv + e[None, :], dv_c.to(DV.dtype.element_ty), mask=v_ok)


def _blocks(D: int, Dv: int) -> dict:
    return dict(BLOCK=BLOCK_L, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv))


def _grouped(G: int, D: int, Dv: int, config: dict) -> dict:
    """Launch parameters of a grouped kernel (Note [suffix kernel switches])."""
    BLOCK_G = triton.next_power_of_2(G)
    return dict(BLOCK=max(1, config["rows"] // BLOCK_G), BLOCK_G=BLOCK_G, BLOCK_D=triton.next_power_of_2(D),
                BLOCK_DV=triton.next_power_of_2(Dv), STAGES=config["stages"], num_warps=config["num_warps"])


def suffix_forward_triton(q: Tensor, k: Tensor, v: Tensor, out_c: Tensor, lse_c: Tensor,
                          rounds: Tensor, q_len: int, scale: float, variant: str | None = None
                          ) -> tuple[Tensor, Tensor]:
    """``_split._suffix_forward_reference`` on CUDA; ``variant``: "heads" or "grouped" (default:
    ``FORWARD``, Note [suffix kernel switches])."""
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2] // q_len - 1, v.shape[-1]
    G = Hq // Hkv
    out = q.new_empty(B, Hq, L, Dv)
    lse = q.new_empty(B, Hq, L, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out_c.stride(), *lse_c.stride(), *out.stride())
    if (variant or FORWARD) == "grouped" and triton.next_power_of_2(G) <= _MAX_GROUP:
        config = _grouped(G, D, Dv, GROUPED_FWD)
        _suffix_forward_grouped_kernel[(triton.cdiv(L, config["BLOCK"]), B * Hkv)](
            q, k, v, out_c, lse_c, rounds, out, lse, *strides, Hq, Hkv, G, L, D, Dv, S, scale, **config,
        )
        return out, lse
    _suffix_forward_kernel[(B * Hq, triton.cdiv(L, BLOCK_L))](
        q, k, v, out_c, lse_c, rounds, out, lse, *strides, Hq, G, L, D, Dv, S, scale, **_blocks(D, Dv),
    )
    return out, lse


def suffix_backward_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           rounds: Tensor, dq_c: Tensor, dk_c: Tensor, dv_c: Tensor, q_len: int,
                           scale: float, variant: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``_split._suffix_backward_reference`` on CUDA; ``variant``: "split" or "fused" (default:
    ``BACKWARD``, Note [suffix kernel switches])."""
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2] // q_len - 1, v.shape[-1]
    G = Hq // Hkv
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    common = (*q.stride(), *k.stride(), *v.stride())
    if (variant or BACKWARD) == "fused" and triton.next_power_of_2(G) <= _MAX_GROUP:
        config = _grouped(G, D, Dv, FUSED_BWD)
        _suffix_backward_fused_kernel[(triton.cdiv(L, config["BLOCK"]), B * Hkv)](
            dout, q, k, v, out, lse, rounds, dq_c, dk_c, dv_c, dq, dk, dv,
            *common, *dq_c.stride(), *dk_c.stride(), *dv_c.stride(), Hq, Hkv, G, L, D, Dv, S, scale, **config,
        )
        return dq, dk, dv
    dk[:, :, :L] = dk_c
    dv[:, :, :L] = dv_c
    delta = torch.empty_like(lse)
    _suffix_dq_kernel[(B * Hq, triton.cdiv(L, BLOCK_L))](
        dout, q, k, v, out, lse, rounds, dq_c, dq, delta, *common, *dq_c.stride(),
        Hq, G, L, D, Dv, S, scale, **_blocks(D, Dv),
    )
    if S > 0:
        _suffix_dkv_kernel[(S, triton.cdiv(L, BLOCK_L), B * Hkv)](
            dout, q, k, v, lse, delta, rounds, dk, dv, *common,
            Hq, Hkv, G, L, D, Dv, S, scale, **_blocks(D, Dv),
        )
    return dq, dk, dv

