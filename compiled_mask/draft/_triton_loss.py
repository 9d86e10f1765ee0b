"""The head loss's per-row cross entropy as one Triton kernel (CUDA): ``loss.py``'s
:func:`~compiled_mask.draft.loss._xent_rows_torch` in two passes over each row.

A chunk of the fused head loss holds the draft logits ``z`` ``[n, V]`` (the parameter dtype) and
the target's row of ``[n, V]`` (probabilities, or target / teacher logits), or an id. What the
chunk needs from them is memory-bound elementwise work: the draft's log-sum-exp and argmax, the
target's softmax and argmax, the soft cross entropy, and, for the backward, the logits' gradient
``softmax(z) * sum(p) - p``. In torch ops that is about a dozen passes over float32 ``[n, V]``
buffers; here one program per row reads ``z`` and the target twice (pass 1: the running maxima,
sums and dot product; pass 2: the gradient, written over ``z`` in place), with every sum in
float32. Imported only when a CUDA kernel runs; held to the torch form on CPU by
``tests/test_triton_interpreter.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOWEST = tl.constexpr(-3.4028234663852886e38)  # float32's lowest: the start of a running maximum
_BLOCK_V = 2048  # columns a program reads at once


@triton.jit
def _running_max(m, arg, block, cols, valid):
    """Fold one block into a running (max, first argmax): a later block wins only when strictly
    greater, so ties keep the first index, as torch.argmax."""
    block = tl.where(valid, block, _LOWEST)
    block_max = tl.max(block, 0)
    block_arg = tl.min(tl.where(block == block_max, cols, 2**31 - 1), 0)
    better = block_max > m
    return tl.where(better, block_max, m), tl.where(better, block_arg, arg)


@triton.jit
def _xent_rows_kernel(Z, T, IDS, COUNTED, NLL, HIT, V, z_stride, t_stride,
                      KIND: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: KIND 0 probabilities, 1 logits (softmax taken here), 2 ids."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * z_stride
    t_row = T + row * t_stride
    counted = tl.load(COUNTED + row) != 0
    cols0 = tl.arange(0, BLOCK_V)
    t_end = tl.where(counted, V, 0)  # the target's columns read: none in a row that does not count
    if KIND == 2:
        target_id = tl.load(IDS + row)
        counted = counted & (target_id >= 0) & (target_id < V)
        target_id = tl.where(counted, target_id, 0)
    # Pass 1: running max / sum of exp of z, and of the target; p . z and sum(p).
    m_z = tl.full((), _LOWEST, tl.float32)
    s_z = tl.zeros((), tl.float32)
    arg_z = tl.zeros((), tl.int32)
    m_t = tl.full((), _LOWEST, tl.float32)
    s_t = tl.zeros((), tl.float32)
    arg_t = tl.zeros((), tl.int32)
    p_dot_z = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        valid = cols < V
        z = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
        m_new, arg_z = _running_max(m_z, arg_z, z, cols, valid)
        s_z = s_z * tl.exp(m_z - m_new) + tl.sum(tl.where(valid, tl.exp(z - m_new), 0.0), 0)
        m_z = m_new
        if KIND != 2:
            t = tl.load(t_row + cols, mask=cols < t_end, other=0.0).to(tl.float32)
            if KIND == 0:  # probabilities: the sums as they are; the argmax of p
                m_t, arg_t = _running_max(m_t, arg_t, t, cols, valid)
                s_t += tl.sum(t, 0)
                p_dot_z += tl.sum(t * z, 0)
            else:  # logits: online softmax, p . z rescaled with the running max
                t_new, arg_t = _running_max(m_t, arg_t, t, cols, valid)
                e = tl.where(valid, tl.exp(t - t_new), 0.0)
                scale = tl.exp(m_t - t_new)
                s_t = s_t * scale + tl.sum(e, 0)
                p_dot_z = p_dot_z * scale + tl.sum(e * z, 0)
                m_t = t_new
    lse_z = m_z + tl.log(s_z)
    if KIND == 0:
        p_sum = s_t
        nll = lse_z * p_sum - p_dot_z
    elif KIND == 1:
        p_sum = 1.0
        lse_t = m_t + tl.log(s_t)
        nll = lse_z - p_dot_z / s_t
    else:
        p_sum = 1.0
        arg_t = target_id.to(tl.int32)
        nll = lse_z - tl.load(z_row + target_id).to(tl.float32)
    tl.store(NLL + row, tl.where(counted, nll, 0.0))
    tl.store(HIT + row, (counted & (arg_z == arg_t)).to(tl.int8))
    if GRAD:
        # Pass 2: d nll / d z = softmax(z) * sum(p) - p, over z in place; zeros for rows that do
        # not count (their hidden states are zeros: nothing reads these rows' gradient).
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            valid = cols < V
            z = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
            d = tl.exp(z - lse_z) * p_sum
            if KIND == 0:
                d -= tl.load(t_row + cols, mask=cols < t_end, other=0.0).to(tl.float32)
            elif KIND == 1:
                t = tl.load(t_row + cols, mask=cols < t_end, other=0.0).to(tl.float32)
                d -= tl.exp(t - lse_t)
            else:
                d -= tl.where(cols == target_id, 1.0, 0.0)
            d = tl.where(counted, d, 0.0)
            tl.store(z_row + cols, d.to(Z.dtype.element_ty), mask=valid)


_KINDS = {"probs": 0, "logits": 1, "ids": 2}


def xent_rows_triton(z: Tensor, kind: str, target: Tensor, counted: Tensor, grad: bool
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`~compiled_mask.draft.loss._xent_rows_torch`'s contract (arguments and results as
    there), one program per row; the gradient overwrites ``z``."""
    n, V = z.shape
    if z.stride(1) != 1:
        z = z.contiguous()
    if kind == "ids" or target.stride(1) != 1:
        target = target.contiguous()  # ids are read at IDS + row
    counted = counted.contiguous()  # read at COUNTED + row
    nll = z.new_empty((n,), dtype=torch.float32)
    hit = z.new_empty((n,), dtype=torch.int8)
    t_stride = target.stride(0) if kind != "ids" else 0
    _xent_rows_kernel[(n,)](
        z, target, target, counted.view(torch.uint8), nll, hit, V, z.stride(0), t_stride,
        KIND=_KINDS[kind], GRAD=grad, BLOCK_V=max(16, min(_BLOCK_V, triton.next_power_of_2(V))), num_warps=8,
    )
    return nll, hit.bool(), (z if grad else None)


# ----------------------------------------------------------------------------- the final norm
#
# Note [the norm in two kernels]
#     Before its matmul a chunk normalises its rows (RMSNorm), and after it turns the gradient of
#     the normalised rows into the hidden states' and the norm weight's. In torch ops that is
#     about fifteen elementwise passes over ``[n, H]`` buffers per chunk, each a kernel launch
#     inside the op, where Inductor cannot fuse them. Here each direction is one kernel that
#     reads its rows once per pass and keeps only ``inv`` ``[n]`` between them (the backward
#     recomputes x * inv from the hidden states). Rounding as ``loss._rms_norm_rows_torch``: the
#     normalised rows in the hidden states' dtype, times the weight in the parameters' dtype;
#     the gradient of the normalised rows times the weight in the parameters' dtype, then in the
#     hidden states'.


@triton.jit
def _norm_forward_kernel(X, W, COUNTED, NORMED, INV, N, H, x_stride, x_col, eps,
                         ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """ROWS rows per program: INV = rsqrt(mean(x^2) + eps) (float32), NORMED = w * (x * inv);
    a row that does not count reads as zeros and normalises to zeros."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    r_ok = r < N
    counted = tl.load(COUNTED + r, mask=r_ok, other=0) != 0
    cols0 = tl.arange(0, BLOCK_H)
    sq = tl.zeros([ROWS], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + cols0
        ok = counted[:, None] & (cols < H)[None, :]
        x = tl.load(X + r[:, None] * x_stride + cols[None, :] * x_col, mask=ok, other=0.0).to(tl.float32)
        sq += tl.sum(x * x, 1)
    inv = tl.math.rsqrt(tl.where(counted, sq / H + eps, 1.0))  # 1 in rows that do not count
    tl.store(INV + r, inv, mask=r_ok)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + cols0
        ok = counted[:, None] & (cols < H)[None, :]
        x = tl.load(X + r[:, None] * x_stride + cols[None, :] * x_col, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (x * inv[:, None]).to(X.dtype.element_ty), 0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
        tl.store(NORMED + r[:, None] * H + cols[None, :], (w[None, :] * xhat).to(NORMED.dtype.element_ty),
                 mask=r_ok[:, None] & (cols < H)[None, :])


@triton.jit
def _norm_backward_kernel(DN, X, W, COUNTED, INV, DX, DW_PART, N, H, x_stride, x_col, dn_stride, dx_stride,
                          ROWS: tl.constexpr, BLOCK_H: tl.constexpr, GRAD_X: tl.constexpr, GRAD_W: tl.constexpr):
    """ROWS rows per program: DX = inv * dy - x * inv^3 * mean(dy * x) with dy = dn * w (rounded
    to DN's dtype, then X's), zero in rows that do not count; DW_PART [program, H]: this
    program's sum over its rows of dn * (x * inv), which is zero in rows that do not count."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid * ROWS + tl.arange(0, ROWS)
    r_ok = r < N
    counted = tl.load(COUNTED + r, mask=r_ok, other=0) != 0
    inv = tl.load(INV + r, mask=r_ok, other=0.0)
    cols0 = tl.arange(0, BLOCK_H)
    mean = tl.zeros([ROWS], tl.float32)
    if GRAD_X:
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + cols0
            ok = counted[:, None] & (cols < H)[None, :]
            x = tl.load(X + r[:, None] * x_stride + cols[None, :] * x_col, mask=ok, other=0.0).to(tl.float32)
            dn = tl.load(DN + r[:, None] * dn_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
            dy = (dn * w[None, :]).to(DN.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
            mean += tl.sum(dy * x, 1)
        mean = mean / H
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + cols0
        col_ok = cols < H
        ok = counted[:, None] & col_ok[None, :]
        x = tl.load(X + r[:, None] * x_stride + cols[None, :] * x_col, mask=ok, other=0.0).to(tl.float32)
        dn = tl.load(DN + r[:, None] * dn_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if GRAD_X:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            dy = (dn * w[None, :]).to(DN.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
            dx = inv[:, None] * dy - x * (inv * inv * inv * mean)[:, None]
            tl.store(DX + r[:, None] * dx_stride + cols[None, :], tl.where(ok, dx, 0.0).to(DX.dtype.element_ty),
                     mask=r_ok[:, None] & col_ok[None, :])
        if GRAD_W:
            xhat = tl.where(ok, (x * inv[:, None]).to(X.dtype.element_ty), 0.0).to(tl.float32)
            tl.store(DW_PART + pid * H + cols, tl.sum(dn * xhat, 0), mask=col_ok)


_NORM_ROWS = 4  # rows per program, in [4, 1024] float32 tiles
_NORM_BLOCK_H = 1024


def _norm_config(n: int, H: int) -> tuple[tuple[int], dict]:
    return (triton.cdiv(n, _NORM_ROWS),), dict(ROWS=_NORM_ROWS, BLOCK_H=min(_NORM_BLOCK_H, triton.next_power_of_2(H)),
                                              num_warps=4)


def rms_norm_rows_triton(x: Tensor, counted: Tensor, weight: Tensor, eps: float, dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor]:
    """``loss._rms_norm_rows_torch``'s contract (arguments and results as there)."""
    n, H = x.shape
    weight = weight.contiguous()  # read at W + column
    normed = x.new_empty((n, H), dtype=dtype)
    inv = x.new_empty((n,), dtype=torch.float32)
    grid, config = _norm_config(n, H)
    _norm_forward_kernel[grid](x, weight, counted.contiguous().view(torch.uint8), normed, inv, n, H, x.stride(0),
                               x.stride(1), eps, **config)
    return normed, inv


def rms_norm_rows_backward_triton(d_normed: Tensor, x: Tensor, inv: Tensor, counted: Tensor, weight: Tensor,
                                  d_x: Tensor | None, grad_weight: bool) -> Tensor | None:
    """``loss._rms_norm_rows_backward_torch``'s contract (arguments and results as there)."""
    n, H = x.shape
    weight = weight.contiguous()  # read at W + column
    if d_normed.stride(1) != 1:
        d_normed = d_normed.contiguous()
    grid, config = _norm_config(n, H)
    part = x.new_empty((grid[0], H) if grad_weight else (0,), dtype=torch.float32)
    dx = x.new_empty((0, H)) if d_x is None else d_x if d_x.stride(1) == 1 else torch.empty_like(
        d_x, memory_format=torch.contiguous_format)  # written at DX + row * stride + column
    _norm_backward_kernel[grid](d_normed, x, weight, counted.contiguous().view(torch.uint8), inv, dx, part, n, H,
                                x.stride(0), x.stride(1), d_normed.stride(0), dx.stride(0),
                                GRAD_X=d_x is not None, GRAD_W=grad_weight, **config)
    if d_x is not None and dx is not d_x:
        d_x.copy_(dx)
    return part.sum(0) if grad_weight else None
