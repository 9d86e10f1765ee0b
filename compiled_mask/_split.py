"""The "split" backend: the causal part on a fused kernel, the suffix rounds merged by log-sum-exp.

The Eagle3 mask is causal over the first Q_LEN keys plus, for each later round s, the single key
``s * Q_LEN + q`` of query q. A block-sparse kernel pays a whole tile per q-block for each of those
diagonals; here they cost one dot product per (query, round):

    out_s, lse_s = suffix_attention(q, k[Q_LEN:], v[Q_LEN:], rounds)        (_suffix.py)
    out, lse     = causal_attention(q, k[:Q_LEN], v[:Q_LEN], part=(out_s, lse_s))   (_causal.py)

Both are differentiable ops (each with its backward, written once; the suffix first: Note [the
suffix first] in ``_causal.py``); this file only composes them, and so does the
context-parallel all-gather mode (``distributed.py``).

Note [documents in the split backend]
    Packed documents need a causal part that stops at each document's start. cuDNN and flash
    cannot do that per position without a host sync (varlen needs the number of documents), so
    on CUDA the causal part is flex_attention over the per-document causal BlockMask
    (``eagle3_block_mask`` with KV_LEN = Q_LEN: only the blocks inside documents), whose
    log-sum-exp autograd differentiates; on CPU it is the causal op with the layout table, which
    runs the CPU flash kernel under a dense document mask (Note [which causal kernel] in
    ``_causal.py``). A row with nothing to attend (padding) gets a finite lowest-float lse so the
    merge stays finite; the caller zeroes padding rows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from compiled_mask._causal import _merge_reference, causal_attention
from compiled_mask._flex import _qk_as_wide_as_v
from compiled_mask._suffix import suffix_attention

__all__: list[str] = []


def split_attention(q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, *, q_len: int, scale: float | None,
                    first_key: Tensor | None = None, document_mask: BlockMask | None = None) -> Tensor:
    """Eagle3 attention as a causal part plus the suffix diagonals (module docstring).

    Args:
        q: ``[B, Hq, Q_LEN, D]``; k, v: ``[B, Hkv, Q_LEN * max_rounds, D]`` / ``[.., Dv]`` (Hq a
            multiple of Hkv); rounds: 0-d int64, the live rounds, clamped to [1, max_rounds];
            q_len: Q_LEN; scale: softmax scale (default ``1 / sqrt(D)``).
        first_key: the ``[B, Q_LEN]`` layout table of packed documents (CPU), or None.
        document_mask: the per-document causal BlockMask over the first Q_LEN keys (CUDA), or None.

    Returns:
        ``[B, Hq, Q_LEN, Dv]``; padding rows are not zeroed here (the caller does).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k0, v0 = k[:, :, :q_len], v[:, :, :q_len]  # round 0: the causal keys
    suffix = suffix_attention(q, k[:, :, q_len:], v[:, :, q_len:], rounds, scale)  # (out_s, lse_s)
    if document_mask is None:
        return causal_attention(q, k0, v0, scale=scale, part=suffix, first_key=first_key)[0]
    # Note [documents in the split backend]
    q_c, k_c, _ = _qk_as_wide_as_v(q, k0, v0, scale)  # Note [flex tiles follow the q/k head dim]
    out_c, aux = flex_attention(q_c, k_c, v0, block_mask=document_mask, scale=scale,
                                enable_gqa=q.size(1) != k.size(1), return_aux=AuxRequest(lse=True))
    lse_c = aux.lse.clamp(min=torch.finfo(aux.lse.dtype).min)  # -inf on empty rows
    return _merge_reference(out_c, lse_c, *suffix, q.dtype)[0]
