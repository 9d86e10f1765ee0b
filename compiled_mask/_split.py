"""The "split" backend: the causal part on a fused kernel, the suffix rounds merged by log-sum-exp.

The Eagle3 mask is causal over the first Q_LEN keys plus, for each later round s, the single key
``s * Q_LEN + q`` of query q. A block-sparse kernel pays a whole tile per q-block for each of those
diagonals; here they cost one dot product per (query, round). The op
``compiled_mask::split_attention`` runs, on real tensors,

    out_c, lse_c = _kernel_forward(q, k[:Q_LEN], v[:Q_LEN])                      (_causal.py)
    out, lse     = suffix_forward(q, k[Q_LEN:], v[Q_LEN:], rounds, part=(out_c, lse_c))  (_suffix.py)

and its backward hands each part's backward the merged output, log-sum-exp and dO (Note [the
suffix first] in ``_causal.py``): the causal kernel's backward, then the suffix kernel, which adds
its dq to the causal one and writes its rows of dk, dv into the whole K/V gradient. Nothing of
the suffix part is stored between the two directions, and no float32 ``[B, H, L, Dv]`` tensor
crosses an op boundary. The context-parallel all-gather mode (``distributed.py``) composes the
same kernels through the differentiable ops ``causal_attention`` and ``suffix_attention``
instead, and packed documents on CUDA merge ``suffix_attention``'s part with flex_attention's
(below): there the float32 part does cross.

Note [documents in the split backend]
    Packed documents need a causal part that stops at each document's start. cuDNN and flash
    cannot do that per position without a host sync (varlen needs the number of documents), so
    on CUDA the causal part is flex_attention over the per-document causal BlockMask
    (``eagle3_block_mask`` with KV_LEN = Q_LEN: only the blocks inside documents), whose
    log-sum-exp autograd differentiates; on CPU the split op's causal kernel takes the layout
    table and runs the CPU flash kernel under a dense document mask (Note [which causal kernel] in
    ``_causal.py``). A row with nothing to attend (padding) gets a finite lowest-float lse so the
    merge stays finite; the caller zeroes padding rows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from compiled_mask._causal import _kernel_backward, _kernel_forward, _lse_dtype, _merge_reference, _row_output
from compiled_mask._flex import _flex_kernel_options, _qk_as_wide_as_v
from compiled_mask._suffix import suffix_attention, suffix_backward, suffix_forward

__all__: list[str] = []


@torch.library.custom_op("compiled_mask::split_attention", mutates_args=())
def _split_attention(q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, first_key: Tensor | None, q_len: int,
                     scale: float) -> tuple[Tensor, Tensor]:
    """Private op: Eagle3 attention as the causal kernel's part merged with the suffix rounds'
    (module docstring); arguments as :func:`split_attention`.

    Returns:
        ``(out [B, Hq, Q_LEN, Dv] in q's dtype, lse [B, Hq, Q_LEN])``, contiguous; lse float32
        (float64 for float64 CPU inputs).
    """
    part = _kernel_forward(q, k[:, :, :q_len], v[:, :, :q_len], first_key, scale, True)
    return suffix_forward(q, k[:, :, q_len:], v[:, :, q_len:], rounds, scale, part)


@_split_attention.register_fake
def _(q, k, v, rounds, first_key, q_len, scale):
    B, Hq, L, _ = q.shape
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=_lse_dtype(q))


@torch.library.custom_op("compiled_mask::split_attention_backward", mutates_args=())
def _split_attention_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, rounds: Tensor, first_key: Tensor | None, q_len: int, scale: float
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """Private op: ``(dq, dk, dv)`` of :func:`_split_attention` for dO and dL, contiguous: each
    part's backward given the merged output and lse (module docstring); dead rounds get zeros."""
    dout = dout.to(q.dtype)
    o_row = _row_output(dout, dlse, out)  # Note [lse gradient through the row term] in _causal.py
    dq_c, dk_c, dv_c = _kernel_backward(dout, q, k[:, :, :q_len], v[:, :, :q_len], o_row, lse, first_key, scale,
                                        True)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dk[:, :, :q_len] = dk_c
    dv[:, :, :q_len] = dv_c
    dq = suffix_backward(dout, dlse, q, k[:, :, q_len:], v[:, :, q_len:], out, lse, rounds, scale, dq_c,
                         dk[:, :, q_len:], dv[:, :, q_len:])
    return dq, dk, dv


@_split_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, rounds, first_key, q_len, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_split(ctx, inputs, output) -> None:
    q, k, v, rounds, first_key, q_len, scale = inputs
    ctx.save_for_backward(q, k, v, *output, rounds, first_key)
    ctx.q_len, ctx.scale = q_len, scale
    ctx.set_materialize_grads(False)  # an unread lse gets None, not zeros


def _split_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, rounds, first_key = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _split_attention_backward(dout, dlse, q, k, v, out, lse, rounds, first_key, ctx.q_len, ctx.scale)
    return dq, dk, dv, None, None, None, None


_split_attention.register_autograd(_split_backward, setup_context=_setup_split)


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
    if document_mask is None:
        return _split_attention(q, k, v, rounds, first_key, q_len, scale)[0]
    # Note [documents in the split backend]
    k0, v0 = k[:, :, :q_len], v[:, :, :q_len]  # round 0: the causal keys
    suffix = suffix_attention(q, k[:, :, q_len:], v[:, :, q_len:], rounds, scale)  # (out_s, lse_s)
    q_c, k_c, _ = _qk_as_wide_as_v(q, k0, v0, scale)  # Note [flex tiles follow the q/k head dim]
    out_c, aux = flex_attention(q_c, k_c, v0, block_mask=document_mask, scale=scale,
                                enable_gqa=q.size(1) != k.size(1), return_aux=AuxRequest(lse=True),
                                kernel_options=_flex_kernel_options(q_c, k_c, document_mask, None))
    lse_c = aux.lse.clamp(min=torch.finfo(aux.lse.dtype).min)  # -inf on empty rows
    return _merge_reference(out_c, lse_c, *suffix, q.dtype)[0]
