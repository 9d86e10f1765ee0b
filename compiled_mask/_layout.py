"""A padded/packed batch's layout: its one definition, as a table of first keys per query.

``mask_mod.py`` restricts the Eagle3 rule with it, ``_blocks.py`` (and the Triton build mirroring
it) derive the block flags from it, and the backends zero its padding rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _first_keys_reference(Q_LEN: int, seq_lens: Tensor | None, doc_ids: Tensor | None) -> Tensor:
    """The layout as one table: the first key position each query may attend.

    Note [one layout table]
        Under the Eagle3 rule query q attends key positions ``kv_pos = kv % Q_LEN <= q`` only
        (``kv_pos == q`` for the suffix rounds). A layout can only cut that set from below: a
        document is a *maximal run* of equal ids (0,0,1,1,0,0 is three documents; a -1 run splits
        a document in two), so query q of a document starting at ``start`` attends ``start <=
        kv_pos <= q``; a padding query (``q >= seq_lens[b]`` or ``doc_ids[b, q] == -1``) attends
        nothing. So the whole layout is ``first_key[b, q]``: the start of q's document (0 without
        documents), or Q_LEN (no key) for padding, and the rule is ``kv_pos >= first_key[b, q]``.
        Keys past seq_lens or marked -1 need no check of their own: every key a valid query may
        attend lies in its own document, before it. Every integer tensor is a valid layout:
        negative lengths act as 0, lengths past Q_LEN as Q_LEN, any id other than -1 names a
        document. The reference mask_mod, the block rule, the Triton build and every backend read
        this one table (through the op ``compiled_mask::eagle3_first_keys``, ``_op.py``).

    Args:
        Q_LEN: query positions.
        seq_lens: ``[B]`` valid length of each sample, or None; doc_ids: ``[B, Q_LEN]`` document of
            each position, -1 for padding, or None; at least one given. Any integer dtypes but
            uint64 and any strides (checked by ``_checks._check_doc_layout``).

    Returns:
        ``first_key [B, Q_LEN]`` int64, contiguous, on their device.
    """
    device = (doc_ids if doc_ids is not None else seq_lens).device
    pos = torch.arange(Q_LEN, device=device)  # [Q_LEN]
    if doc_ids is None:
        first_key = torch.zeros(seq_lens.shape[0], Q_LEN, dtype=torch.int64, device=device)  # [B, Q_LEN]
    else:
        doc_ids = doc_ids.to(torch.int64)  # [B, Q_LEN]
        run_starts = torch.cat(
            [torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1
        )  # [B, Q_LEN]: q begins a run of equal ids
        first_key = torch.where(run_starts, pos, 0).cummax(-1).values  # [B, Q_LEN]: its run's start
        first_key = torch.where(doc_ids == -1, Q_LEN, first_key)
    if seq_lens is not None:
        padding = pos >= seq_lens.to(torch.int64).unsqueeze(-1)  # [B, Q_LEN]
        first_key = torch.where(padding, Q_LEN, first_key)
    return first_key.contiguous()


def _layout_allowed(b: Tensor, q_idx: Tensor, kv_idx: Tensor, Q_LEN: int, first_key: Tensor) -> Tensor:
    """The layout's restriction of the Eagle3 rule, in mask_mod form (Note [one layout table])."""
    return kv_idx % Q_LEN >= first_key[b, q_idx]


def _valid_queries(Q_LEN: int, first_key: Tensor | None, device: torch.device) -> Tensor:
    """``valid [B', Q_LEN]`` bool: the queries that attend anything (not padding). B' is the batch
    of ``first_key``, or 1 without a layout (every query valid)."""
    if first_key is None:
        return torch.ones(1, Q_LEN, dtype=torch.bool, device=device)  # [1, Q_LEN]
    return first_key <= torch.arange(Q_LEN, device=device)  # [B, Q_LEN]: a document starts at or before q


def _zero_padding(q: Tensor, k: Tensor, v: Tensor, first_key: Tensor, q_len: int,
                  positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v with zeros at the layout's padding positions, in every round of k and v.

    Note [padding is garbage]
        Real pipelines leave anything at padding positions, NaN included. A kernel that reads a
        padding key with zero weight still computes ``0 * v`` (NaN for a NaN v) inside its tile
        product, a masked NaN score can survive an additive mask, and a padding query's NaN
        flows through its scores into the keys' gradients (``dK = dS^T Q``, with the padding
        row's dS NaN): each would reach valid rows or their gradients. So q, k and v are zeroed
        at padding positions before any kernel reads them; the output's padding rows are zeroed
        after (Note [padding without a mask_mod check] in ``modules.py``). A caller that knows its
        padding is finite (``Eagle3Model`` zeroes its inputs there) skips it.

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hkv, L * rounds, D]``, each round holding the same L
            positions as q; first_key: the ``[B, Q_LEN]`` layout table; q_len: Q_LEN;
            positions: ``[L]`` the global positions of the L rows (a context-parallel rank's), or
            None for all Q_LEN.
    """
    valid = _valid_queries(q_len, first_key, q.device)  # [B, Q_LEN]: valid positions
    if positions is not None:
        valid = valid[:, positions]  # [B, L]
    keep_q = valid[:, None, :, None]  # [B, 1, L, 1]
    keep_kv = valid.repeat(1, k.size(2) // valid.size(1))[:, None, :, None]  # [B, 1, L * rounds, 1]
    return torch.where(keep_q, q, 0.0), torch.where(keep_kv, k, 0.0), torch.where(keep_kv, v, 0.0)
