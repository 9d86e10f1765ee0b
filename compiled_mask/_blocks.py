"""The block-index math: which (q-block, kv-block) pairs of the Eagle3 mask are FULL or PARTIAL.

Every flag is a closed-form function of the block's coordinates, so the whole build is
O(n_q * n_kv) elementwise work, with no dense Q_LEN x KV_LEN mask and no Python branching on
tensor values. The rule is derived from the formula in ``mask_mod.py`` alone (no special cases for
aligned shapes); ``tests/test_block_mask.py`` checks it against ``create_block_mask``.

Note [block semantics]
    ``create_block_mask`` evaluates the mask on [0, Q_LEN) x [0, KV_LEN) and pads it with False
    up to block multiples. So a block is FULL iff it lies wholly inside the valid range and every
    pair in it attends; PARTIAL iff some but not all of its Q_BLOCK_SIZE x KV_BLOCK_SIZE entries
    attend; absent otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compiled_mask._layout import _valid_queries


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def eagle3_block_flags(
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK_SIZE: int,
    KV_BLOCK_SIZE: int,
    device: torch.device,
    live_kv_len: int | Tensor,
    first_key: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PARTIAL and FULL flags of every (q-block, kv-block) pair of the Eagle3 mask.

    Args:
        Q_LEN, KV_LEN: query length and the *width* of the key axis (ints or SymInts).
        Q_BLOCK_SIZE, KV_BLOCK_SIZE: block sizes.
        live_kv_len: number of keys that exist, ``Q_LEN <= live_kv_len <= KV_LEN``: ``KV_LEN``
            itself, or a 0-d int tensor (the static-width TTT form, Note [static widths] in
            ``_op.py``). Keys at or past it are padding, as past KV_LEN for create_block_mask.
        device: where to build.
        first_key: optional ``[B, Q_LEN]`` int64 layout table of a padded/packed batch: query q of
            sample b attends key positions ``first_key[b, q] <= kv_pos <= q`` (Note [one layout
            table] in ``_layout.py``).

    Returns:
        ``(partial, full)``, two bool tensors ``[B', n_q, n_kv]`` with n_q = ceil(Q_LEN /
        Q_BLOCK_SIZE), n_kv = ceil(KV_LEN / KV_BLOCK_SIZE), and B' the batch of first_key (1
        without it).
    """
    n_q = _ceil_div(Q_LEN, Q_BLOCK_SIZE)
    n_kv = _ceil_div(KV_LEN, KV_BLOCK_SIZE)
    valid = _valid_queries(Q_LEN, first_key, device)  # [B', Q_LEN]
    # The first position of each valid query's document (its value on padding is never read).
    start = torch.zeros(1, Q_LEN, dtype=torch.int64, device=device) if first_key is None else first_key
    B = valid.shape[0]
    start = start.expand(B, Q_LEN)  # [B', Q_LEN]
    # Lookup tables over query positions x in [0, Q_LEN]: valid queries before x, and the first
    # valid query at or after x (Q_LEN if none).
    n_before = torch.nn.functional.pad(valid.cumsum(-1), (1, 0))  # [B', Q_LEN + 1]
    pos = torch.arange(Q_LEN, device=device)  # [Q_LEN]
    first_at = torch.where(valid, pos, Q_LEN).flip(-1).cummin(-1).values.flip(-1)  # [B', Q_LEN]
    first_at = torch.nn.functional.pad(first_at, (0, 1), value=Q_LEN)  # [B', Q_LEN + 1]

    def at(table: Tensor, index: Tensor) -> Tensor:
        """``table[b, index]`` for every sample b; index broadcasts to [n_q, n_kv] or [B', ...]."""
        index = index.expand(B, n_q, n_kv).reshape(B, -1)  # [B', n_q * n_kv]
        return table.gather(1, index).view(B, n_q, n_kv)  # [B', n_q, n_kv]

    def n_valid(lo: Tensor, hi: Tensor) -> Tensor:
        """Valid queries in [lo, hi] (0 when lo > hi)."""
        return (at(n_before, (hi + 1).clamp(0, Q_LEN)) - at(n_before, lo.clamp(0, Q_LEN))).clamp(min=0)

    # Query rows [q_lo, q_hi] of each q-block, clipped to Q_LEN.
    q_lo = torch.arange(n_q, device=device).unsqueeze(-1) * Q_BLOCK_SIZE  # [n_q, 1]
    q_hi = (q_lo + Q_BLOCK_SIZE).clamp(max=Q_LEN) - 1  # [n_q, 1]
    q_whole = q_lo + Q_BLOCK_SIZE <= Q_LEN  # [n_q, 1]
    q_all_valid = n_valid(q_lo, q_hi) == q_hi - q_lo + 1  # [B', n_q, n_kv]
    # Key columns [kv_lo, kv_end) of each kv-block, clipped to the live keys.
    kv_lo = torch.arange(n_kv, device=device).unsqueeze(0) * KV_BLOCK_SIZE  # [1, n_kv]
    kv_end = (kv_lo + KV_BLOCK_SIZE).clamp(max=live_kv_len)  # [1, n_kv]
    kv_whole = kv_lo + KV_BLOCK_SIZE <= live_kv_len  # [1, n_kv]

    # Causal part: keys [kv_lo, causal_end), allowed for a valid q where start[q] <= kv <= q. Some
    # pair attends iff the first valid query q* >= max(q_lo, kv_lo) lies in the block and its
    # document starts at or before the last key (start is non-decreasing in q, so q* is the best
    # candidate). Every pair does iff all queries are valid, the last key is <= the first query,
    # and the first key is >= the last query's document start. (Empty parts: "every" holds.)
    causal_end = kv_end.clamp(max=Q_LEN)  # [1, n_kv]
    q_star = at(first_at, torch.maximum(q_lo, kv_lo).clamp(max=Q_LEN))  # [B', n_q, n_kv]
    causal_any = (
        (kv_lo < causal_end) & (q_star <= q_hi) & (at(start, q_star.clamp(max=Q_LEN - 1)) < causal_end)
    )  # [B', n_q, n_kv]
    causal_all = (kv_lo >= causal_end) | (
        q_all_valid & (causal_end - 1 <= q_lo) & (kv_lo >= at(start, q_hi))
    )  # [B', n_q, n_kv]

    # Suffix part: keys [suffix_lo, kv_end) with suffix_lo = max(kv_lo, Q_LEN); key kv attends
    # query q iff kv % Q_LEN == q and q is valid. So some pair attends iff a valid query of the
    # block is among the residues kv % Q_LEN of those keys: all of [0, Q_LEN) when there are at
    # least Q_LEN keys, else the cyclic interval [a, b] (wrapping when a > b). Every pair does iff
    # every difference kv - q in [d_lo, d_hi] (d_lo >= 1) is a multiple of Q_LEN and every query
    # of the block is valid.
    suffix_lo = kv_lo.clamp(min=Q_LEN)  # [1, n_kv]
    suffix_nonempty = suffix_lo < kv_end  # [1, n_kv]
    a = suffix_lo % Q_LEN  # [1, n_kv]
    b = (kv_end - 1) % Q_LEN  # [1, n_kv]
    hits = torch.where(
        kv_end - suffix_lo >= Q_LEN,
        n_valid(q_lo, q_hi),
        torch.where(
            a <= b,
            n_valid(torch.maximum(q_lo, a), torch.minimum(q_hi, b)),
            n_valid(torch.maximum(q_lo, a), q_hi) + n_valid(q_lo, torch.minimum(q_hi, b)),
        ),
    )  # [B', n_q, n_kv]
    suffix_any = suffix_nonempty & (hits > 0)  # [B', n_q, n_kv]
    d_lo = suffix_lo - q_hi  # [n_q, n_kv]
    d_hi = kv_end - 1 - q_lo  # [n_q, n_kv]
    multiples = d_hi.div(Q_LEN, rounding_mode="floor") - (d_lo - 1).div(Q_LEN, rounding_mode="floor")
    suffix_all = ~suffix_nonempty | ((multiples == d_hi - d_lo + 1) & q_all_valid)  # [B', n_q, n_kv]

    full = q_whole & kv_whole & causal_all & suffix_all  # [B', n_q, n_kv]
    partial = (causal_any | suffix_any) & ~full  # [B', n_q, n_kv]
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
    device: torch.device,
    live_kv_len: int | Tensor,
    first_key: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The eight BlockMask tensors of the Eagle3 mask, in ``BlockMask(...)`` argument order.

    Returns:
        ``kv_num_blocks [B, H, n_q]``, ``kv_indices [B, H, n_q, n_kv]``, ``full_kv_num_blocks``,
        ``full_kv_indices`` (same shapes), ``q_num_blocks [B, H, n_kv]``,
        ``q_indices [B, H, n_kv, n_q]``, ``full_q_num_blocks``, ``full_q_indices`` (same shapes);
        all int32, contiguous, new memory. Every head shares its sample's mask; without
        first_key every sample shares one mask, with it B is its batch.
    """
    partial, full = eagle3_block_flags(
        Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, device, live_kv_len, first_key
    )  # [B', n_q, n_kv] each, B' in (1, B)
    tensors = []
    for flags in (partial, full, partial.mT, full.mT):
        for t in _compact(flags):
            t = t.unsqueeze(1)  # [B', 1, rows(, width)]
            tensors.append(t.expand(B, H, *t.shape[2:]).contiguous())  # [B, H, rows(, width)]
    return tuple(tensors)
