"""The block math as one fused Triton kernel (CUDA): all eight BlockMask tensors in one launch.

Each program owns one row: a q-block row of the kv-direction tensors (programs [0, n_q)) or a
kv-block row of the q-direction tensors (programs [n_q, n_q + n_kv)). It evaluates the FULL and
PARTIAL flags of its row in closed form (the same rule as ``_blocks.py``, which is the reference
this kernel is tested against), counts them, and writes each set column to its rank among the set
columns and each unset one after them: exactly the stable compaction ``_blocks._compact`` does.
So the build is one pass that writes O(B * H * n_q * n_kv) int32s and reads nothing but the 0-d
live-round count. Imported only when a CUDA build runs (Triton is not needed on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _flags(q_lo, q_hi, q_whole, kv_lo, KV_BLOCK_SIZE, live, Q_LEN):
    """(partial, full) of blocks with queries [q_lo, q_hi] and keys from kv_lo; see _blocks.py."""
    kv_end = tl.minimum(kv_lo + KV_BLOCK_SIZE, live)
    kv_whole = kv_lo + KV_BLOCK_SIZE <= live
    causal_end = tl.minimum(kv_end, Q_LEN)
    causal_any = (kv_lo < causal_end) & (kv_lo <= q_hi)
    causal_all = (kv_lo >= causal_end) | (causal_end - 1 <= q_lo)
    suffix_lo = tl.maximum(kv_lo, Q_LEN)
    suffix_nonempty = suffix_lo < kv_end
    d_lo = suffix_lo - q_hi
    d_hi = kv_end - 1 - q_lo
    # Where the suffix part is non-empty, d_hi >= d_lo >= 1: truncating division is floor.
    multiples = d_hi // Q_LEN - (d_lo - 1) // Q_LEN
    suffix_any = suffix_nonempty & (multiples > 0)
    suffix_all = (suffix_lo >= kv_end) | (multiples == d_hi - d_lo + 1)
    full = q_whole & kv_whole & causal_all & suffix_all
    partial = (causal_any | suffix_any) & (full == 0)
    return partial, full


@triton.jit
def _row_flags(row, cols, IS_KV_ROW: tl.constexpr, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN):
    if IS_KV_ROW:  # row = q-block, cols = kv-blocks
        q_lo = row * Q_BLOCK_SIZE
        kv_lo = cols * KV_BLOCK_SIZE
    else:  # row = kv-block, cols = q-blocks
        q_lo = cols * Q_BLOCK_SIZE
        kv_lo = row * KV_BLOCK_SIZE
    q_hi = tl.minimum(q_lo + Q_BLOCK_SIZE, Q_LEN) - 1
    q_whole = q_lo + Q_BLOCK_SIZE <= Q_LEN
    return _flags(q_lo, q_hi, q_whole, kv_lo, KV_BLOCK_SIZE, live, Q_LEN)


@triton.jit
def _write_row(num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, row, n_rows, width, BH,
               IS_KV_ROW: tl.constexpr, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN,
               BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    # Pass 1: how many PARTIAL and FULL columns the row has (the padding starts after them).
    n_partial = 0
    n_full = 0
    for start in range(0, width, BLOCK):
        cols = start + offs
        in_row = cols < width
        partial, full = _row_flags(row, cols, IS_KV_ROW, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN)
        n_partial += tl.sum((partial & in_row).to(tl.int32), axis=0)
        n_full += tl.sum((full & in_row).to(tl.int32), axis=0)
    # Pass 2: set columns to their rank among the set ones, unset ones after all set ones.
    seen_partial = 0
    seen_full = 0
    for start in range(0, width, BLOCK):
        cols = start + offs
        in_row = cols < width
        partial, full = _row_flags(row, cols, IS_KV_ROW, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN)
        p = (partial & in_row).to(tl.int32)
        f = (full & in_row).to(tl.int32)
        p_rank = seen_partial + tl.cumsum(p, axis=0) - p  # set columns before this one
        f_rank = seen_full + tl.cumsum(f, axis=0) - f
        p_slot = tl.where(p != 0, p_rank, n_partial + cols - p_rank)
        f_slot = tl.where(f != 0, f_rank, n_full + cols - f_rank)
        for bh in range(BH):
            base = (bh * n_rows + row) * width
            tl.store(idx_ptr + base + p_slot, cols, mask=in_row)
            tl.store(full_idx_ptr + base + f_slot, cols, mask=in_row)
        seen_partial += tl.sum(p, axis=0)
        seen_full += tl.sum(f, axis=0)
    for bh in range(BH):
        tl.store(num_ptr + bh * n_rows + row, n_partial)
        tl.store(full_num_ptr + bh * n_rows + row, n_full)


@triton.jit
def _eagle3_block_mask_kernel(
    kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx,
    rounds_ptr, Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, n_q, n_kv, BH, max_rounds,
    HAS_ROUNDS: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_ROUNDS:  # live keys: rounds clamped to [1, max_rounds], as _op._live_kv_len
        rounds = tl.load(rounds_ptr).to(tl.int64)
        rounds = tl.minimum(tl.maximum(rounds, 1), max_rounds)
        live = tl.minimum(rounds * Q_LEN, KV_LEN).to(tl.int32)
    else:
        live = KV_LEN
    if pid < n_q:
        _write_row(kv_num, kv_idx, full_kv_num, full_kv_idx, pid, n_q, n_kv, BH, True,
                   Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN, BLOCK_KV)
    else:
        _write_row(q_num, q_idx, full_q_num, full_q_idx, pid - n_q, n_kv, n_q, BH, False,
                   Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN, BLOCK_Q)


def _block(width: int) -> int:
    return min(triton.next_power_of_2(max(width, 16)), 1024)


def eagle3_block_tensors_triton(
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK_SIZE: int,
    KV_BLOCK_SIZE: int,
    B: int,
    H: int,
    rounds: Tensor | None,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as ``_blocks.eagle3_block_tensors``, in one kernel launch on ``device``."""
    n_q = -(-Q_LEN // Q_BLOCK_SIZE)
    n_kv = -(-KV_LEN // KV_BLOCK_SIZE)

    def new(*shape: int) -> Tensor:
        return torch.empty(B, H, *shape, dtype=torch.int32, device=device)

    out = (new(n_q), new(n_q, n_kv), new(n_q), new(n_q, n_kv),
           new(n_kv), new(n_kv, n_q), new(n_kv), new(n_kv, n_q))  # fmt: skip
    rounds_arg = rounds if rounds is not None else out[0]  # unread when HAS_ROUNDS is False
    with torch.cuda.device(device):
        _eagle3_block_mask_kernel[(n_q + n_kv,)](
            *out, rounds_arg, Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, n_q, n_kv, B * H,
            -(-KV_LEN // Q_LEN), HAS_ROUNDS=rounds is not None,
            BLOCK_KV=_block(n_kv), BLOCK_Q=_block(n_q),
        )
    return out
