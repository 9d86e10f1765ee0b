"""The Eagle3 TTT attention mask: its exact semantics, as a flex_attention ``mask_mod``.

This file is the ground truth. Everything else in the package (the analytical block math, the
custom op, the attention backends) is tested against :func:`eagle3_mask_mod` evaluated by
``create_block_mask``.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.attention.flex_attention import _mask_mod_signature

__all__ = ["eagle3_mask_mod"]


def _eagle3_allowed(q_idx: Tensor, kv_idx: Tensor, Q_LEN: int) -> Tensor:
    """The Eagle3 rule on broadcastable index tensors (see :func:`eagle3_mask_mod`)."""
    causal = (kv_idx < Q_LEN) & (kv_idx <= q_idx)
    suffix = (kv_idx >= Q_LEN) & ((kv_idx - q_idx) % Q_LEN == 0)
    return causal | suffix


def eagle3_mask_mod(Q_LEN: int) -> _mask_mod_signature:
    """The reference Eagle3 ``mask_mod`` for ``Q_LEN`` query positions.

    Query ``q_idx`` (``0 <= q_idx < Q_LEN``) may attend key ``kv_idx`` iff::

        (kv_idx < Q_LEN and kv_idx <= q_idx)                       # causal over the first round
        or (kv_idx >= Q_LEN and (kv_idx - q_idx) % Q_LEN == 0)     # one diagonal per later round

    The rule is defined for any ``KV_LEN >= Q_LEN``; a ``KV_LEN`` that is not a multiple of
    ``Q_LEN`` simply ends in a partial round. This is the ``mask_mod`` of TorchSpec's
    ``generate_eagle3_mask(Q_LEN, KV_LEN)``.

    Args:
        Q_LEN: number of query positions (the length of one round). A Python int, or a SymInt
            inside a compiled region.

    Returns:
        A ``mask_mod(b, h, q_idx, kv_idx) -> Tensor[bool]`` for ``create_block_mask`` and
        ``flex_attention``.
    """
    if isinstance(Q_LEN, int) and Q_LEN < 1:
        raise ValueError(f"eagle3_mask_mod: Q_LEN must be a positive int, got Q_LEN={Q_LEN}.")

    def eagle3_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return _eagle3_allowed(q_idx, kv_idx, Q_LEN)

    return eagle3_mask
