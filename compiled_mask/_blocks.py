"""The block-index math: which (q-block, kv-block) pairs of the Eagle3 mask are FULL or PARTIAL.

Every flag is a closed-form function of the block's coordinates, so the whole build is
O(n_q * n_kv) elementwise work, with no dense Q_LEN x KV_LEN mask and no Python branching on
tensor values. The rule is derived from the formula in ``mask_mod.py`` alone (no special cases for
aligned shapes); ``tests/test_blocks.py`` checks it against ``create_block_mask``.

Note [block semantics]
    ``create_block_mask`` evaluates the mask on [0, Q_LEN) x [0, KV_LEN) and pads it with False
    up to block multiples. So a block is FULL iff it lies wholly inside the valid range and every
    pair in it attends; PARTIAL iff some but not all of its Q_BLOCK_SIZE x KV_BLOCK_SIZE entries
    attend; absent otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def eagle3_block_flags(
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK_SIZE: int,
    KV_BLOCK_SIZE: int,
    live_kv_len: int | Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """PARTIAL and FULL flags of every (q-block, kv-block) pair of the Eagle3 mask.

    Args:
        Q_LEN, KV_LEN: query length and the *width* of the key axis (ints or SymInts).
        Q_BLOCK_SIZE, KV_BLOCK_SIZE: block sizes.
        live_kv_len: number of keys that exist, ``Q_LEN <= live_kv_len <= KV_LEN``: ``KV_LEN``
            itself, or a 0-d int tensor (the static-width TTT form, Note [static widths] in
            ``_op.py``). Keys at or past it are padding, as past KV_LEN for create_block_mask.
        device: where to build.

    Returns:
        ``(partial, full)``, two bool tensors ``[n_q, n_kv]`` with n_q = ceil(Q_LEN / Q_BLOCK_SIZE)
        and n_kv = ceil(KV_LEN / KV_BLOCK_SIZE).
    """
    n_q = _ceil_div(Q_LEN, Q_BLOCK_SIZE)
    n_kv = _ceil_div(KV_LEN, KV_BLOCK_SIZE)
    # Query rows [q_lo, q_hi] of each q-block, clipped to Q_LEN.
    q_lo = torch.arange(n_q, device=device).unsqueeze(-1) * Q_BLOCK_SIZE  # [n_q, 1]
    q_hi = (q_lo + Q_BLOCK_SIZE).clamp(max=Q_LEN) - 1  # [n_q, 1]
    q_whole = q_lo + Q_BLOCK_SIZE <= Q_LEN  # [n_q, 1]
    # Key columns [kv_lo, kv_end) of each kv-block, clipped to the live keys.
    kv_lo = torch.arange(n_kv, device=device).unsqueeze(0) * KV_BLOCK_SIZE  # [1, n_kv]
    kv_end = (kv_lo + KV_BLOCK_SIZE).clamp(max=live_kv_len)  # [1, n_kv]
    kv_whole = kv_lo + KV_BLOCK_SIZE <= live_kv_len  # [1, n_kv]

    # Causal part: keys [kv_lo, min(kv_end, Q_LEN)), allowed where kv <= q. Some pair attends iff
    # the smallest key is <= the largest query; every pair does iff the largest key is <= the
    # smallest query (an empty part is vacuously "every").
    causal_end = kv_end.clamp(max=Q_LEN)  # [1, n_kv]
    causal_any = (kv_lo < causal_end) & (kv_lo <= q_hi)  # [n_q, n_kv]
    causal_all = (kv_lo >= causal_end) | (causal_end - 1 <= q_lo)  # [n_q, n_kv]

    # Suffix part: keys [max(kv_lo, Q_LEN), kv_end), allowed where (kv - q) % Q_LEN == 0. Over the
    # block, kv - q takes every integer in [d_lo, d_hi] (d_lo >= 1), and a pair attends iff its
    # difference is a multiple of Q_LEN. So: some pair iff the interval holds a multiple; every
    # pair iff all its integers are multiples.
    suffix_lo = kv_lo.clamp(min=Q_LEN)  # [1, n_kv]
    suffix_nonempty = suffix_lo < kv_end  # [1, n_kv]
    d_lo = suffix_lo - q_hi  # [n_q, n_kv]
    d_hi = kv_end - 1 - q_lo  # [n_q, n_kv]
    multiples = d_hi.div(Q_LEN, rounding_mode="floor") - (d_lo - 1).div(Q_LEN, rounding_mode="floor")
    suffix_any = suffix_nonempty & (multiples > 0)  # [n_q, n_kv]
    suffix_all = ~suffix_nonempty | (multiples == d_hi - d_lo + 1)  # [n_q, n_kv]

    full = q_whole & kv_whole & causal_all & suffix_all  # [n_q, n_kv]
    partial = (causal_any | suffix_any) & ~full  # [n_q, n_kv]
    return partial, full


def _compact(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise lists of the set columns of ``flags`` ``[R, W]``, in BlockMask form.

    Returns:
        ``(num [R] int32, indices [R, W] int32)``: row i lists its set columns, ascending, in its
        first ``num[i]`` slots; the other slots hold the unset columns, ascending (the padding
        create_block_mask leaves; any valid index would do).
    """
    num = flags.sum(-1, dtype=torch.int32)  # [R]
    indices = torch.argsort(~flags, dim=-1, stable=True).to(torch.int32)  # [R, W]
    return num, indices


def eagle3_block_tensors(
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK_SIZE: int,
    KV_BLOCK_SIZE: int,
    B: int,
    H: int,
    live_kv_len: int | Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The eight BlockMask tensors of the Eagle3 mask, in ``BlockMask(...)`` argument order.

    Returns:
        ``kv_num_blocks [B, H, n_q]``, ``kv_indices [B, H, n_q, n_kv]``, ``full_kv_num_blocks``,
        ``full_kv_indices`` (same shapes), ``q_num_blocks [B, H, n_kv]``,
        ``q_indices [B, H, n_kv, n_q]``, ``full_q_num_blocks``, ``full_q_indices`` (same shapes);
        all int32, contiguous, new memory (every (b, h) row set is the same mask).
    """
    partial, full = eagle3_block_flags(
        Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, live_kv_len, device
    )
    tensors = []
    for flags in (partial, full, partial.mT, full.mT):
        for t in _compact(flags):
            tensors.append(t.expand(B, H, *t.shape).contiguous())  # [B, H, rows(, width)]
    return tuple(tensors)
