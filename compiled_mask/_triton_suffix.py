"""The merge op's kernels on CUDA (``_suffix.py``): the suffix rounds folded in, and its backward.

Query i of round 0 sees exactly one key per live suffix round, row ``s * L + i`` of the suffix
K/V (``[B, Hkv, S * L, D]``). So the merge is a handful of dot products per query, memory-bound:
each kernel reads its tiles once and keeps the per-query softmax state in registers. They mirror
``_suffix._merge_reference`` and ``_suffix._merge_backward_reference`` (held to them on CPU by
``tests/test_triton_interpreter.py``). Imported only when a CUDA kernel runs.

Two forms of each kernel; which runs is an argument (``variant``), defaulting to the grouped one
wherever its tiles fit (Note [grouped suffix kernels]):

- ``"grouped"`` (forward) / ``"fused"`` (backward): one program per (query block, batch x kv-head)
  holding the G q-heads that share a K/V head as ``[BLOCK, G, D]`` tiles; the backward is one
  launch that writes dq, every row of the suffix K/V gradient (no atomics: each program owns its
  query rows of every round; dead rounds get zeros) and the gradients of the causal part's output
  and log-sum-exp.
- ``"heads"`` (forward) / ``"split"`` (backward): one program per (query block, batch x q-head);
  the backward in two launches (dq, the row term and the causal part's gradients; then dk, dv
  summed over the group). They run groups wider than ``_MAX_GROUP`` q-heads.

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


@triton.jit
def _tile(ptr, row_stride, col_stride, rows, row_mask, cols, col_mask):
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _live_suffix(ROUNDS, S):
    """Suffix rounds 0 <= s < limit are live (round s + 1 of the buffer): s + 1 < rounds, s < S."""
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
def _merge_forward_grouped_kernel(
    Q, KS, VS, OUT_C, LSE_C, ROUNDS, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd, s_lcb, s_lch, s_lcl,
    Hq, Hkv, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    STAGES: tl.constexpr,
):
    """OUT, LSE: contiguous [B, Hq, L, Dv] / [B, Hq, L]. The causal part's normalised output is
    the softmax state at max lse_c with weight 1; each live round is one online-softmax update."""
    b, hk, bh, h, i, ok, d, e = _group_rows(Hq, Hkv, G, L, BLOCK, BLOCK_G, BLOCK_D, BLOCK_DV)
    i_ok = i < L
    q = _tile3(Q + b * s_qb, s_ql, s_qh, s_qd, i, h, ok, d, d < D)  # [BLOCK, BLOCK_G, BLOCK_D]
    acc = _tile3(OUT_C + b * s_cb, s_cl, s_ch, s_cd, i, h, ok, e, e < Dv)  # [BLOCK, BLOCK_G, BLOCK_DV]
    m = tl.load(LSE_C + b * s_lcb + i[:, None] * s_lcl + h[None, :] * s_lch, mask=ok, other=0.0)  # [BLOCK, BLOCK_G]
    l_sum = tl.full([BLOCK, BLOCK_G], 1.0, tl.float32)
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
    out = acc / l_sum[:, :, None]
    tl.store(OUT + i[:, None, None] * Dv + bh[None, :, None] * L * Dv + e[None, None, :],
             out.to(OUT.dtype.element_ty), mask=ok[:, :, None] & (e < Dv)[None, None, :])
    tl.store(LSE + i[:, None] + bh[None, :] * L, m + tl.log(l_sum), mask=ok)


@triton.jit
def _merge_backward_fused_kernel(
    DOUT, DLSE, Q, KS, VS, OUT_C, LSE_C, OUT, LSE, ROUNDS, DQ, DKS, DVS, D_OUT_C, D_LSE_C,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd, s_lcb, s_lch, s_lcl,
    Hq, Hkv, G, L, D, Dv, S, scale,
    HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, STAGES: tl.constexpr,
):
    """Every gradient in one pass (Note [grouped suffix kernels]). DOUT, OUT, DQ, D_OUT_C:
    contiguous [B, Hq, L, *]; DLSE, LSE, D_LSE_C: contiguous [B, Hq, L]; DKS, DVS: contiguous
    [B, Hkv, S * L, *], every row written (live rounds computed, dead ones zero)."""
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
    dq = tl.zeros([BLOCK, BLOCK_G, BLOCK_D], tl.float32)
    k_base = KS + b * s_kb + hk * s_kh
    v_base = VS + b * s_vb + hk * s_vh
    row0 = (b * Hkv + hk) * S * L + i  # [BLOCK]: this program's row of suffix round 0 in DKS, DVS
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
    # The causal part's gradients: a = exp(lse_c - lse) of the merged softmax is its share.
    lse_c = tl.load(LSE_C + b * s_lcb + i[:, None] * s_lcl + h[None, :] * s_lch, mask=ok, other=0.0)
    a = tl.exp(lse_c - lse)  # [BLOCK, BLOCK_G]
    out_c = _tile3(OUT_C + b * s_cb, s_cl, s_ch, s_cd, i, h, ok, e, e_ok)
    tl.store(D_OUT_C + i[:, None, None] * Dv + bh[None, :, None] * L * Dv + e[None, None, :],
             (a[:, :, None] * dout).to(D_OUT_C.dtype.element_ty), mask=ok[:, :, None] & e_ok[None, None, :])
    tl.store(D_LSE_C + rows, a * (tl.sum(dout * out_c, axis=2) - delta), mask=ok)


@triton.jit
def _query_block(Hq, G, L, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's (batch x q-head) row, batch, q-head, kv-head, query indices (and which are
    in range), and the head-dim ranges of q/k and of v (the per-head kernels)."""
    bh = tl.program_id(0).to(tl.int64)  # the fastest grid axis: the G q-heads sharing K/V run together
    b, h = bh // Hq, bh % Hq
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return bh, b, h, h // G, i, i < L, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _merge_forward_heads_kernel(
    Q, KS, VS, OUT_C, LSE_C, ROUNDS, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd, s_lcb, s_lch, s_lcl,
    Hq, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """:func:`_merge_forward_grouped_kernel` for one q-head per program."""
    bh, b, h, hk, i, i_ok, d, e = _query_block(Hq, G, L, BLOCK, BLOCK_D, BLOCK_DV)
    q = _tile(Q + b * s_qb + h * s_qh, s_ql, s_qd, i, i_ok, d, d < D)
    acc = _tile(OUT_C + b * s_cb + h * s_ch, s_cl, s_cd, i, i_ok, e, e < Dv)
    m = tl.load(LSE_C + b * s_lcb + h * s_lch + i * s_lcl, mask=i_ok, other=0.0)
    l_sum = tl.full([BLOCK], 1.0, tl.float32)
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
    tl.store(OUT + bh * L * Dv + i[:, None] * Dv + e[None, :], (acc / l_sum[:, None]).to(OUT.dtype.element_ty),
             mask=i_ok[:, None] & (e < Dv)[None, :])
    tl.store(LSE + bh * L + i, m + tl.log(l_sum), mask=i_ok)


@triton.jit
def _merge_dq_kernel(
    DOUT, DLSE, Q, KS, VS, OUT_C, LSE_C, OUT, LSE, ROUNDS, DQ, DELTA, D_OUT_C, D_LSE_C,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_cb, s_ch, s_cl, s_cd, s_lcb, s_lch, s_lcl,
    Hq, G, L, D, Dv, S, scale,
    HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Pass 1 of the split backward: dq, the row term D (for pass 2) and the causal part's
    gradients. DOUT, OUT, DQ, D_OUT_C: contiguous [B, Hq, L, *]; DLSE, LSE, DELTA, D_LSE_C:
    contiguous [B, Hq, L]."""
    bh, b, h, hk, i, i_ok, d, e = _query_block(Hq, G, L, BLOCK, BLOCK_D, BLOCK_DV)
    dout = _tile(DOUT + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv)
    delta = tl.sum(dout * _tile(OUT + bh * L * Dv, Dv, 1, i, i_ok, e, e < Dv), axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * L + i, mask=i_ok, other=0.0)
    tl.store(DELTA + bh * L + i, delta, mask=i_ok)
    q = _tile(Q + b * s_qb + h * s_qh, s_ql, s_qd, i, i_ok, d, d < D)
    lse = tl.load(LSE + bh * L + i, mask=i_ok, other=0.0)
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
    a = tl.exp(tl.load(LSE_C + b * s_lcb + h * s_lch + i * s_lcl, mask=i_ok, other=0.0) - lse)
    out_c = _tile(OUT_C + b * s_cb + h * s_ch, s_cl, s_cd, i, i_ok, e, e < Dv)
    tl.store(D_OUT_C + bh * L * Dv + i[:, None] * Dv + e[None, :], (a[:, None] * dout).to(D_OUT_C.dtype.element_ty),
             mask=i_ok[:, None] & (e < Dv)[None, :])
    tl.store(D_LSE_C + bh * L + i, a * (tl.sum(dout * out_c, axis=1) - delta), mask=i_ok)


@triton.jit
def _merge_dkv_kernel(
    DOUT, Q, KS, VS, LSE, DELTA, ROUNDS, DKS, DVS,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    Hq, Hkv, G, L, D, Dv, S, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Pass 2 of the split backward: DKS, DVS (contiguous [B, Hkv, S * L, *]) rows of suffix
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
    row = (bhk * S + s) * L + i
    tl.store(DKS + row[:, None] * D + d[None, :], dk.to(DKS.dtype.element_ty), mask=i_ok[:, None] & (d < D)[None, :])
    tl.store(DVS + row[:, None] * Dv + e[None, :], dv.to(DVS.dtype.element_ty), mask=i_ok[:, None] & (e < Dv)[None, :])


def _heads_blocks(D: int, Dv: int) -> dict:
    return dict(BLOCK=BLOCK_L, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv))


def _grouped_blocks(G: int, D: int, Dv: int, config: dict) -> dict:
    """Launch parameters of a grouped kernel from ``config`` (rows, num_warps, stages)."""
    BLOCK_G = triton.next_power_of_2(G)
    return dict(BLOCK=max(1, config["rows"] // BLOCK_G), BLOCK_G=BLOCK_G, BLOCK_D=triton.next_power_of_2(D),
                BLOCK_DV=triton.next_power_of_2(Dv), STAGES=config["stages"], num_warps=config["num_warps"])


def _strides(q: Tensor, ks: Tensor, vs: Tensor, out_c: Tensor, lse_c: Tensor) -> tuple[int, ...]:
    return (*q.stride(), *ks.stride(), *vs.stride(), *out_c.stride(), *lse_c.stride())


def merge_forward_triton(q: Tensor, ks: Tensor, vs: Tensor, out_c: Tensor, lse_c: Tensor, rounds: Tensor,
                         scale: float, variant: str | None = None, config: dict | None = None
                         ) -> tuple[Tensor, Tensor]:
    """``_suffix._merge_reference`` on CUDA. ``variant``: "grouped" (the default where the group
    fits, ``_MAX_GROUP``) or "heads"; ``config``: the grouped kernel's launch parameters
    (default ``GROUPED_FORWARD``)."""
    B, Hq, L, D = q.shape
    Hkv, Dv = ks.shape[1], vs.shape[-1]
    S, G = ks.shape[2] // L, Hq // Hkv
    out = q.new_empty(B, Hq, L, Dv)
    lse = lse_c.new_empty(B, Hq, L)
    strides = _strides(q, ks, vs, out_c, lse_c)
    if _variant(variant, "grouped", "heads", G) == "grouped":
        blocks = _grouped_blocks(G, D, Dv, config or GROUPED_FORWARD)
        _merge_forward_grouped_kernel[(triton.cdiv(L, blocks["BLOCK"]), B * Hkv)](
            q, ks, vs, out_c, lse_c, rounds, out, lse, *strides, Hq, Hkv, G, L, D, Dv, S, scale, **blocks,
        )
    else:
        _merge_forward_heads_kernel[(B * Hq, triton.cdiv(L, BLOCK_L))](
            q, ks, vs, out_c, lse_c, rounds, out, lse, *strides, Hq, G, L, D, Dv, S, scale, **_heads_blocks(D, Dv),
        )
    return out, lse


def merge_backward_triton(dout: Tensor, dlse: Tensor | None, q: Tensor, ks: Tensor, vs: Tensor, out_c: Tensor,
                          lse_c: Tensor, out: Tensor, lse: Tensor, rounds: Tensor, scale: float,
                          variant: str | None = None, config: dict | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_suffix._merge_backward_reference`` on CUDA. ``variant``: "fused" (the default where the
    group fits) or "split"; ``config``: the fused kernel's launch parameters (default
    ``FUSED_BACKWARD``)."""
    B, Hq, L, D = q.shape
    Hkv, Dv = ks.shape[1], vs.shape[-1]
    S, G = ks.shape[2] // L, Hq // Hkv
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dks = ks.new_empty(ks.shape)
    dvs = vs.new_empty(vs.shape)
    d_out_c = torch.empty_like(out_c, memory_format=torch.contiguous_format)
    d_lse_c = lse_c.new_empty(lse_c.shape)
    strides = _strides(q, ks, vs, out_c, lse_c)
    has_dlse = dlse is not None
    dlse = lse if dlse is None else dlse  # not read without HAS_DLSE
    if _variant(variant, "fused", "split", G) == "fused":
        blocks = _grouped_blocks(G, D, Dv, config or FUSED_BACKWARD)
        _merge_backward_fused_kernel[(triton.cdiv(L, blocks["BLOCK"]), B * Hkv)](
            dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, dq, dks, dvs, d_out_c, d_lse_c,
            *strides, Hq, Hkv, G, L, D, Dv, S, scale, HAS_DLSE=has_dlse, **blocks,
        )
        return dq, dks, dvs, d_out_c, d_lse_c
    delta = torch.empty_like(lse)
    _merge_dq_kernel[(B * Hq, triton.cdiv(L, BLOCK_L))](
        dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, dq, delta, d_out_c, d_lse_c,
        *strides, Hq, G, L, D, Dv, S, scale, HAS_DLSE=has_dlse, **_heads_blocks(D, Dv),
    )
    if S > 0:
        _merge_dkv_kernel[(S, triton.cdiv(L, BLOCK_L), B * Hkv)](
            dout, q, ks, vs, lse, delta, rounds, dks, dvs, *strides[:12],
            Hq, Hkv, G, L, D, Dv, S, scale, **_heads_blocks(D, Dv),
        )
    return dq, dks, dvs, d_out_c, d_lse_c


def _variant(variant: str | None, grouped: str, per_head: str, G: int) -> str:
    """The kernel form to run: ``variant`` if given (the per-head form wherever the group is too
    wide for the grouped tiles), else the grouped form where it fits."""
    if variant not in (None, grouped, per_head):
        raise ValueError(f"suffix kernels: unknown variant={variant!r}; choose {grouped!r} or {per_head!r}.")
    fits = triton.next_power_of_2(G) <= _MAX_GROUP
    return grouped if fits and variant in (None, grouped) else per_head
