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
