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

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


# Per-sample lookup tables of a padded/packed batch (see _blocks.eagle3_block_flags), over query
# positions x: n_before[x] valid queries before x (x in [0, Q_LEN]); first_at[x] the first valid
# query at or after x, Q_LEN if none (x in [0, Q_LEN]). Both come from the layout table
# first_key (Note [one layout table] in _layout.py: x is valid iff first_key[x] <= x), which the
# block kernel also reads directly as each valid query's document start. Without a layout they
# are x, x and 0, and the kernel uses those values directly.


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _layout_tables_kernel(first_key_ptr, n_before_ptr, first_at_ptr, Q_LEN, BLOCK: tl.constexpr):
    """One program per sample: n_before and first_at by running scans over Q_LEN in chunks."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    first_key = first_key_ptr + b * Q_LEN
    n_before = n_before_ptr + b * (Q_LEN + 1)
    first_at = first_at_ptr + b * (Q_LEN + 1)
    tl.store(n_before, 0)
    tl.store(first_at + Q_LEN, Q_LEN)
    count = 0
    for lo in range(0, Q_LEN, BLOCK):  # forward scan: n_before
        x = lo + offs
        in_len = x < Q_LEN
        valid = in_len & (tl.load(first_key + x, mask=in_len, other=Q_LEN) <= x)
        seen = count + tl.cumsum(valid.to(tl.int32), 0)
        tl.store(n_before + x + 1, seen, mask=in_len)
        count += tl.sum(valid.to(tl.int32), 0)
    n_chunks = tl.cdiv(Q_LEN, BLOCK)
    next_valid = Q_LEN
    for i in range(n_chunks):  # backward scan: first_at
        x = (n_chunks - 1 - i) * BLOCK + offs
        in_len = x < Q_LEN
        valid = in_len & (tl.load(first_key + x, mask=in_len, other=Q_LEN) <= x)
        first = tl.associative_scan(tl.where(valid, x, Q_LEN), 0, _min, reverse=True)
        first = tl.minimum(first, next_valid)
        tl.store(first_at + x, first.to(tl.int32), mask=in_len)
        next_valid = tl.min(first, 0)


@triton.jit
def _n_valid(lo, hi, n_before, HAS_LAYOUT: tl.constexpr, Q_LEN):
    """Valid queries in [lo, hi] (0 when lo > hi)."""
    lo = tl.minimum(tl.maximum(lo, 0), Q_LEN)
    end = tl.minimum(tl.maximum(hi + 1, 0), Q_LEN)
    if HAS_LAYOUT:
        return tl.maximum(tl.load(n_before + end) - tl.load(n_before + lo), 0)
    return tl.maximum(end - lo, 0)


@triton.jit
def _flags(q_lo, q_hi, q_whole, kv_lo, KV_BLOCK_SIZE, live, Q_LEN, n_before, first_at, start,
           HAS_LAYOUT: tl.constexpr):
    """(partial, full) of blocks with queries [q_lo, q_hi] and keys from kv_lo: the rule of
    _blocks.eagle3_block_flags, statement for statement."""
    kv_end = tl.minimum(kv_lo + KV_BLOCK_SIZE, live)
    kv_whole = kv_lo + KV_BLOCK_SIZE <= live
    causal_end = tl.minimum(kv_end, Q_LEN)  # causal part: keys [kv_lo, causal_end)
    suffix_lo = tl.maximum(kv_lo, Q_LEN)  # suffix part: keys [suffix_lo, kv_end), kv pairs with kv % Q_LEN
    suffix_nonempty = suffix_lo < kv_end
    d_lo = suffix_lo - q_hi
    d_hi = kv_end - 1 - q_lo
    # Where the suffix part is non-empty, d_hi >= d_lo >= 1: truncating division is floor.
    multiples = d_hi // Q_LEN - (d_lo - 1) // Q_LEN
    if HAS_LAYOUT:
        q_all_valid = _n_valid(q_lo, q_hi, n_before, HAS_LAYOUT, Q_LEN) == q_hi - q_lo + 1
        q_star = tl.load(first_at + tl.minimum(tl.maximum(q_lo, kv_lo), Q_LEN))
        star_start = tl.load(start + tl.minimum(q_star, Q_LEN - 1))
        causal_any = (kv_lo < causal_end) & (q_star <= q_hi) & (star_start < causal_end)
        causal_all = (kv_lo >= causal_end) | (
            q_all_valid & (causal_end - 1 <= q_lo) & (kv_lo >= tl.load(start + q_hi)))
        a = suffix_lo % Q_LEN
        b = (kv_end - 1) % Q_LEN
        hits = tl.where(
            kv_end - suffix_lo >= Q_LEN,
            _n_valid(q_lo, q_hi, n_before, HAS_LAYOUT, Q_LEN),
            tl.where(
                a <= b,
                _n_valid(tl.maximum(q_lo, a), tl.minimum(q_hi, b), n_before, HAS_LAYOUT, Q_LEN),
                _n_valid(tl.maximum(q_lo, a), q_hi, n_before, HAS_LAYOUT, Q_LEN)
                + _n_valid(q_lo, tl.minimum(q_hi, b), n_before, HAS_LAYOUT, Q_LEN),
            ),
        )
        suffix_any = suffix_nonempty & (hits > 0)
        suffix_all = (suffix_lo >= kv_end) | ((multiples == d_hi - d_lo + 1) & q_all_valid)
    else:  # every query valid, one document: the same rule with the tables' values folded in
        causal_any = (kv_lo < causal_end) & (kv_lo <= q_hi)
        causal_all = (kv_lo >= causal_end) | (causal_end - 1 <= q_lo)
        suffix_any = suffix_nonempty & (multiples > 0)
        suffix_all = (suffix_lo >= kv_end) | (multiples == d_hi - d_lo + 1)
    full = q_whole & kv_whole & causal_all & suffix_all
    partial = (causal_any | suffix_any) & (full == 0)
    return partial, full


@triton.jit
def _row_flags(row, cols, IS_KV_ROW: tl.constexpr, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN,
               n_before, first_at, start, HAS_LAYOUT: tl.constexpr):
    if IS_KV_ROW:  # row = q-block, cols = kv-blocks
        q_lo = row * Q_BLOCK_SIZE
        kv_lo = cols * KV_BLOCK_SIZE
    else:  # row = kv-block, cols = q-blocks
        q_lo = cols * Q_BLOCK_SIZE
        kv_lo = row * KV_BLOCK_SIZE
    q_hi = tl.minimum(q_lo + Q_BLOCK_SIZE, Q_LEN) - 1
    q_whole = q_lo + Q_BLOCK_SIZE <= Q_LEN
    return _flags(q_lo, q_hi, q_whole, kv_lo, KV_BLOCK_SIZE, live, Q_LEN, n_before, first_at, start,
                  HAS_LAYOUT)


@triton.jit
def _write_row(num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, row, n_rows, width, copy0, COPIES,
               IS_KV_ROW: tl.constexpr, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN,
               n_before, first_at, start, HAS_LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``row`` of one direction, written to the (batch, head) copies [copy0, copy0 + COPIES)."""
    offs = tl.arange(0, BLOCK)
    # Pass 1: how many PARTIAL and FULL columns the row has (the padding starts after them).
    n_partial = 0
    n_full = 0
    for lo in range(0, width, BLOCK):
        cols = lo + offs
        in_row = cols < width
        partial, full = _row_flags(row, cols, IS_KV_ROW, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN,
                                   n_before, first_at, start, HAS_LAYOUT)
        n_partial += tl.sum((partial & in_row).to(tl.int32), axis=0)
        n_full += tl.sum((full & in_row).to(tl.int32), axis=0)
    # Pass 2: set columns to their rank among the set ones, unset ones after all set ones.
    seen_partial = 0
    seen_full = 0
    for lo in range(0, width, BLOCK):
        cols = lo + offs
        in_row = cols < width
        partial, full = _row_flags(row, cols, IS_KV_ROW, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN,
                                   n_before, first_at, start, HAS_LAYOUT)
        p = (partial & in_row).to(tl.int32)
        f = (full & in_row).to(tl.int32)
        p_rank = seen_partial + tl.cumsum(p, axis=0) - p  # set columns before this one
        f_rank = seen_full + tl.cumsum(f, axis=0) - f
        p_slot = tl.where(p != 0, p_rank, n_partial + cols - p_rank)
        f_slot = tl.where(f != 0, f_rank, n_full + cols - f_rank)
        for c in range(COPIES):
            base = ((copy0 + c) * n_rows + row) * width
            tl.store(idx_ptr + base + p_slot, cols, mask=in_row)
            tl.store(full_idx_ptr + base + f_slot, cols, mask=in_row)
        seen_partial += tl.sum(p, axis=0)
        seen_full += tl.sum(f, axis=0)
    for c in range(COPIES):
        tl.store(num_ptr + (copy0 + c) * n_rows + row, n_partial)
        tl.store(full_num_ptr + (copy0 + c) * n_rows + row, n_full)


@triton.jit
def _eagle3_block_mask_kernel(
    kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx,
    live_ptr, n_before_ptr, first_at_ptr, first_key_ptr,
    Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, n_q, n_kv, COPIES,
    HAS_LIVE: tl.constexpr, HAS_LAYOUT: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Program (row, b): one row of sample b's mask (b = 0 without a layout), COPIES copies."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if HAS_LIVE:  # the live keys, in [Q_LEN, KV_LEN] (_op._live_kv_len)
        live = tl.load(live_ptr).to(tl.int32)
    else:
        live = KV_LEN
    n_before = n_before_ptr + b * (Q_LEN + 1)
    first_at = first_at_ptr + b * (Q_LEN + 1)
    start = first_key_ptr + b * Q_LEN  # a valid query's document start
    if pid < n_q:
        _write_row(kv_num, kv_idx, full_kv_num, full_kv_idx, pid, n_q, n_kv, b * COPIES, COPIES, True,
                   Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN, n_before, first_at, start, HAS_LAYOUT,
                   BLOCK_KV)
    else:
        _write_row(q_num, q_idx, full_q_num, full_q_idx, pid - n_q, n_kv, n_q, b * COPIES, COPIES, False,
                   Q_BLOCK_SIZE, KV_BLOCK_SIZE, live, Q_LEN, n_before, first_at, start, HAS_LAYOUT,
                   BLOCK_Q)


def _block(width: int) -> int:
    """Columns a program handles at once: the row's width, in chunks of at most 1024."""
    return min(triton.next_power_of_2(max(width, 16)), 1024)


_TABLE_BLOCK = 1024  # query positions a layout-table program scans at once


def eagle3_block_tensors_triton(
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK_SIZE: int,
    KV_BLOCK_SIZE: int,
    B: int,
    H: int,
    device: torch.device,
    live_kv_len: Tensor | None,
    first_key: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as ``_blocks.eagle3_block_tensors``, in one kernel launch on ``device`` (two
    with a layout: the per-sample lookup tables first). CPU tensors run in the Triton
    interpreter (``TRITON_INTERPRET=1``), which is how CI tests this kernel."""
    n_q = -(-Q_LEN // Q_BLOCK_SIZE)
    n_kv = -(-KV_LEN // KV_BLOCK_SIZE)

    def new(*shape: int) -> Tensor:
        return torch.empty(B, H, *shape, dtype=torch.int32, device=device)

    out = (new(n_q), new(n_q, n_kv), new(n_q), new(n_q, n_kv),
           new(n_kv), new(n_kv, n_q), new(n_kv), new(n_kv, n_q))  # fmt: skip
    has_layout = first_key is not None
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        if has_layout:  # B is the layout's batch (the op's contract)
            first_key = first_key.contiguous()
            n_before = torch.empty(B, Q_LEN + 1, dtype=torch.int32, device=device)
            first_at = torch.empty(B, Q_LEN + 1, dtype=torch.int32, device=device)
            _layout_tables_kernel[(B,)](first_key, n_before, first_at, Q_LEN, BLOCK=_TABLE_BLOCK)
        else:
            n_before = first_at = first_key = out[0]  # unread without a layout
        _eagle3_block_mask_kernel[(n_q + n_kv, B if has_layout else 1)](
            *out, live_kv_len if live_kv_len is not None else out[0], n_before, first_at, first_key,
            Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, n_q, n_kv, H if has_layout else B * H,
            HAS_LIVE=live_kv_len is not None, HAS_LAYOUT=has_layout,
            BLOCK_KV=_block(n_kv), BLOCK_Q=_block(n_q),
        )
    return out
