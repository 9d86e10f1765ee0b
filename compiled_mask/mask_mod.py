"""The Eagle3 TTT attention mask: its exact semantics, as a flex_attention ``mask_mod``.

This file is the ground truth. Everything else in the package (the analytical block math, the
custom op, the attention backends) is tested against :func:`eagle3_mask_mod` evaluated by
``create_block_mask``.
"""

from __future__ import annotations

import functools
import operator

from torch import Tensor
from torch.nn.attention.flex_attention import _mask_mod_signature

__all__ = ["eagle3_mask_mod"]


def _eagle3_allowed(q_idx: Tensor, kv_idx: Tensor, Q_LEN: int) -> Tensor:
    """The Eagle3 rule on broadcastable index tensors (see :func:`eagle3_mask_mod`)."""
    causal = (kv_idx < Q_LEN) & (kv_idx <= q_idx)
    suffix = (kv_idx >= Q_LEN) & ((kv_idx - q_idx) % Q_LEN == 0)
    return causal | suffix


def _eagle3_sample_allowed(
    b: Tensor, q_idx: Tensor, kv_idx: Tensor, Q_LEN: int,
    seq_lens: Tensor | None, doc_ids: Tensor | None,
) -> Tensor:
    """The per-sample restrictions of :func:`eagle3_mask_mod`; at least one of seq_lens, doc_ids."""
    kv_pos = kv_idx % Q_LEN  # the key's position inside its round
    conditions = []
    if seq_lens is not None:
        conditions += [q_idx < seq_lens[b], kv_pos < seq_lens[b]]
    if doc_ids is not None:
        doc = doc_ids[b, q_idx]
        conditions += [doc != -1, doc_ids[b, kv_pos] == doc]
    return functools.reduce(operator.and_, conditions)


def eagle3_mask_mod(
    Q_LEN: int, *, seq_lens: Tensor | None = None, doc_ids: Tensor | None = None
) -> _mask_mod_signature:
    """The reference Eagle3 ``mask_mod`` for ``Q_LEN`` query positions.

    Query ``q_idx`` (``0 <= q_idx < Q_LEN``) may attend key ``kv_idx`` iff::

        (kv_idx < Q_LEN and kv_idx <= q_idx)                       # causal over the first round
        or (kv_idx >= Q_LEN and (kv_idx - q_idx) % Q_LEN == 0)     # one diagonal per later round

    The rule is defined for any ``KV_LEN >= Q_LEN``; a ``KV_LEN`` that is not a multiple of
    ``Q_LEN`` simply ends in a partial round. This is the ``mask_mod`` of TorchSpec's
    ``generate_eagle3_mask(Q_LEN, KV_LEN)``.

    Padded and packed batches restrict it per sample b (with ``kv_pos = kv_idx % Q_LEN``, the
    key's position inside its round):

    - ``seq_lens[b]``: only ``q_idx < seq_lens[b]`` and ``kv_pos < seq_lens[b]`` attend;
    - ``doc_ids[b]``: only pairs in one document, ``doc_ids[b, q_idx] == doc_ids[b, kv_pos]``,
      and never a position marked -1 (padding). Documents must be contiguous runs of positions
      (the block math relies on it); a suffix key ``kv_pos == q_idx`` is in q's document anyway.

    Args:
        Q_LEN: number of query positions (the length of one round). A Python int, or a SymInt
            inside a compiled region.
        seq_lens: optional int tensor ``[B]``, the valid length of each sample.
        doc_ids: optional int tensor ``[B, Q_LEN]``, the document of each position (-1: padding).

    Returns:
        A ``mask_mod(b, h, q_idx, kv_idx) -> Tensor[bool]`` for ``create_block_mask`` and
        ``flex_attention``.
    """
    if isinstance(Q_LEN, int) and Q_LEN < 1:
        raise ValueError(f"eagle3_mask_mod: Q_LEN must be a positive int, got Q_LEN={Q_LEN}.")
    if seq_lens is None and doc_ids is None:

        def eagle3_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return _eagle3_allowed(q_idx, kv_idx, Q_LEN)

        return eagle3_mask

    def eagle3_batch_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return _eagle3_allowed(q_idx, kv_idx, Q_LEN) & _eagle3_sample_allowed(
            b, q_idx, kv_idx, Q_LEN, seq_lens, doc_ids
        )

    return eagle3_batch_mask
