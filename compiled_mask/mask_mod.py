"""The Eagle3 TTT attention mask: its exact semantics, as a flex_attention ``mask_mod``.

This file is the ground truth. Everything else in the package (the analytical block math, the
custom op, the attention backends) is tested against :func:`eagle3_mask_mod` evaluated by
``create_block_mask``. A padded/packed batch's layout is defined once, in ``_layout.py``.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.attention.flex_attention import _mask_mod_signature

from compiled_mask._checks import _check_positive
from compiled_mask._inputs import normalize_layout
from compiled_mask._layout import _layout_allowed

__all__ = ["eagle3_mask_mod"]


def _eagle3_allowed(q_idx: Tensor, kv_idx: Tensor, Q_LEN: int) -> Tensor:
    """The Eagle3 rule on broadcastable index tensors (see :func:`eagle3_mask_mod`)."""
    causal = (kv_idx < Q_LEN) & (kv_idx <= q_idx)
    suffix = (kv_idx >= Q_LEN) & ((kv_idx - q_idx) % Q_LEN == 0)
    return causal | suffix


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

    - ``seq_lens[b]``: positions ``>= seq_lens[b]`` are padding;
    - ``doc_ids[b]``: -1 marks padding; every other value names a document, and a document is a
      *maximal run* of equal ids (``0,0,1,1,0,0`` is three documents).

    A padding query attends nothing; a valid query attends the keys of the rule whose ``kv_pos``
    lies in its own document (from the document's first position, or 0, up to itself). Every
    integer tensor of the right shape is a valid layout (Note [one layout table]).

    Args:
        Q_LEN: number of query positions (the length of one round). A Python int, or a SymInt
            inside a compiled region.
        seq_lens: optional int tensor ``[B]``, the valid length of each sample.
        doc_ids: optional int tensor ``[B, Q_LEN]``, the document of each position (-1: padding).

    Returns:
        A ``mask_mod(b, h, q_idx, kv_idx) -> Tensor[bool]`` for ``create_block_mask`` and
        ``flex_attention``.

    Example::

        >>> from torch.nn.attention.flex_attention import create_block_mask
        >>> bm = create_block_mask(eagle3_mask_mod(4), None, None, 4, 12, device="cpu", BLOCK_SIZE=1)
        >>> bm.to_dense()[0, 0].int()
        tensor([[1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
                [1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0],
                [1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0],
                [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1]], dtype=torch.int32)
    """
    where = "eagle3_mask_mod"
    _check_positive(where, Q_LEN=Q_LEN)
    first_key = normalize_layout(where, Q_LEN, seq_lens, doc_ids, None).first_key  # Note [one layout table]
    if first_key is None:

        def eagle3_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return _eagle3_allowed(q_idx, kv_idx, Q_LEN)

        return eagle3_mask

    def eagle3_batch_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return _eagle3_allowed(q_idx, kv_idx, Q_LEN) & _layout_allowed(b, q_idx, kv_idx, Q_LEN, first_key)

    return eagle3_batch_mask
