"""The flex_attention backend: Triton on CUDA, Inductor's C++ template on CPU."""

from __future__ import annotations

from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def flex_eagle3_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None,
    kernel_options: dict | None,
) -> Tensor:
    """flex_attention over ``block_mask``; GQA when q has more heads than k/v.

    Args:
        q: ``[B, Hq, Q_LEN, D]``; k, v: ``[B, Hkv, KV_LEN, D]`` with Hq a multiple of Hkv.
        block_mask: the Eagle3 BlockMask (its B and H may be 1 and broadcast).

    Returns:
        ``[B, Hq, Q_LEN, Dv]``.
    """
    return flex_attention(
        q,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.size(1) != k.size(1),
        kernel_options=kernel_options,
    )
