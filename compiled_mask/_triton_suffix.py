"""The split backend's suffix terms as Triton kernels (CUDA): merge forward, and backward.

Query i of round 0 sees exactly one key per live suffix round s >= 1, ``k[s * Q_LEN + i]``. So the
suffix is a handful of dot products per query, memory-bound: each kernel reads its tiles once and
keeps the per-query softmax state in registers. ``_split.py`` holds the same math in torch ops
(the CPU path, and the reference these kernels are tested against on CUDA).

Forward, one program per (query block, batch x q-head): start from the causal part's normalised
output and log-sum-exp and fold in each live round by the online-softmax update.

Backward, two launches: per (query block, batch x q-head) the row term D = rowsum(dO * O), then
dq = dq_causal + sum_s ds_s * k_s; per (query block, batch x kv-head, suffix round) dk_s and dv_s,
summed over the q-heads of the group (no atomics: each program owns its rows). Dead rounds get zero
gradients. Imported only when a CUDA kernel runs (Triton is not needed on CPU).
"""

from __future__ import annotations

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


def _blocks(D: int, Dv: int) -> dict:
    return dict(BLOCK=BLOCK_L, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv))


def suffix_forward_triton(q: Tensor, k: Tensor, v: Tensor, out_c: Tensor, lse_c: Tensor,
                          rounds: Tensor, q_len: int, scale: float) -> tuple[Tensor, Tensor]:
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2] // q_len - 1, v.shape[-1]
    out = q.new_empty(B, Hq, L, Dv)
    lse = q.new_empty(B, Hq, L, dtype=torch.float32)
    grid = (B * Hq, triton.cdiv(L, BLOCK_L))
    _suffix_forward_kernel[grid](
        q, k, v, out_c, lse_c, rounds, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out_c.stride(), *lse_c.stride(), *out.stride(),
        Hq, Hq // Hkv, L, D, Dv, S, scale, **_blocks(D, Dv),
    )
    return out, lse


def suffix_backward_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           rounds: Tensor, dq_c: Tensor, dk_c: Tensor, dv_c: Tensor, q_len: int,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2] // q_len - 1, v.shape[-1]
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    dk[:, :, :L] = dk_c
    dv[:, :, :L] = dv_c
    delta = torch.empty_like(lse)
    common = (*q.stride(), *k.stride(), *v.stride())
    _suffix_dq_kernel[(B * Hq, triton.cdiv(L, BLOCK_L))](
        dout, q, k, v, out, lse, rounds, dq_c, dq, delta, *common, *dq_c.stride(),
        Hq, Hq // Hkv, L, D, Dv, S, scale, **_blocks(D, Dv),
    )
    if S > 0:
        _suffix_dkv_kernel[(S, triton.cdiv(L, BLOCK_L), B * Hkv)](
            dout, q, k, v, lse, delta, rounds, dk, dv, *common,
            Hq, Hkv, Hq // Hkv, L, D, Dv, S, scale, **_blocks(D, Dv),
        )
    return dq, dk, dv
