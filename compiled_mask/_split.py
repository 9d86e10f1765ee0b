"""The "split" backend: a fused causal kernel plus the suffix diagonals, merged by log-sum-exp.

The Eagle3 mask is causal over the first Q_LEN keys plus, for each later round s, the single key
``s * Q_LEN + q`` of query q. A block-sparse kernel pays a whole tile per q-block for each of those
diagonals; here they cost one dot product per (query, round):

    out_c, lse_c = causal_attention(q, k[:Q_LEN], v[:Q_LEN])              # the fast kernel
    score_s[q]   = scale * q . k[s * Q_LEN + q]           for live rounds s, -inf for dead ones
    lse          = logaddexp(lse_c, logsumexp_s score_s)                    # one softmax
    out          = exp(lse_c - lse) * out_c + sum_s exp(score_s - lse) * v[s * Q_LEN + q]

Note [backward through the merge]
    The causal kernel's log-sum-exp has no gradient, so the backward is written out (the identity
    ring attention uses): its backward given the *merged* output and *merged* lse returns
    the exact gradients of the causal part, because its probabilities exp(s - lse) and its row term
    D = rowsum(dO * O) are then those of the full softmax. The suffix part is elementwise:
    p = exp(score - lse), dv = p * dO, ds = p * (dO . v - D), dq += scale * ds * k,
    dk = scale * ds * q. Everything is aten attention ops plus two custom ops with fake kernels
    (Note [suffix kernels]), so it traces into the compiled graph (one graph for every TTT step:
    only ``rounds`` changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from compiled_mask._flex import _qk_as_wide_as_v

# Note [which causal kernel]
#     On CUDA the causal part runs on cuDNN's fused attention, the kernel SDPA itself picks for the
#     causal floor on Hopper (H200, torch 2.11: fwd+bwd 3.9 ms at Q_LEN=8192, 32/8 heads, d=128,
#     against 6.7 ms for aten's flash kernel, which this backend used first). Its forward returns
#     the log-sum-exp and its backward takes ``out`` and ``logsumexp``, which is all the merge
#     needs. Where cuDNN cannot run (no cuDNN, head dim over 128 or not a multiple of 8) the flash
#     kernel takes over, and on CPU the CPU flash kernel.


def _causal_kernel(q: Tensor) -> str:
    """Note [which causal kernel]. cuDNN refuses one query and one key ("s_q = s_kv = 1 is not
    supported", H200, torch 2.11), and compiled it crashed the process instead: Q_LEN = 1 runs
    on flash."""
    if q.device.type != "cuda":
        return "cpu"
    L, D = q.shape[-2:]
    return "cudnn" if _cudnn_available() and D <= 128 and D % 8 == 0 and L > 1 else "flash"


@torch.compiler.assume_constant_result
def _cudnn_available() -> bool:
    return torch.backends.cudnn.is_available()


def _kernel_layout(t: Tensor) -> Tensor:
    """``t`` as the fused CUDA kernels read it: unit stride in the head dim and every other stride
    and the storage offset a multiple of 16 bytes; a copy only where it is not.

    Note [aligned kernel inputs]
        cuDNN's attention (called directly, without SDPA's own checks) gave a relative error of
        0.21 for a q sliced out of a wider tensor (row stride 69 elements, an odd storage
        offset; H200, torch 2.11), found by the API fuzz. Transposed views of projections
        ([B, S, H, D] storage) keep aligned strides and are passed as they are.
        A contiguous tensor at a misaligned address (a view at an offset into a larger buffer)
        was wrong too: rel err 1.0 for out and q/k/v gradients, eager and compiled, with storage
        offsets of 1 and 3 bf16 elements (H200, torch 2.11), and ``.contiguous()`` returns such a
        tensor as it is: the copy is a clone. Compiled, this function sees no data pointer, and
        ``storage_offset()`` does not trace (torch 2.11: "torch.* op returned non-Tensor").
        A graph compiled for aligned inputs was right when later called with misaligned ones
        (Inductor copies inputs less aligned than the first call's); one compiled for misaligned
        inputs is still wrong: ``tests/test_split.py::test_split_cuda_misaligned_inputs``
        (compiled: xfail, strict). The backward op runs eagerly inside, so it takes the clone.
    """
    if t.device.type != "cuda":
        return t
    aligned = t.stride(-1) == 1 and all((s * t.dtype.itemsize) % 16 == 0 for s in t.stride()[:-1])
    if not torch.compiler.is_compiling():
        aligned = aligned and t.data_ptr() % 16 == 0
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _causal_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True
                    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], tuple]:
    """Causal attention: ``(out [B, Hq, L, D], lse [B, Hq, L] fp32, tensors, consts)``, the last
    two what the kernel's backward needs (tensors to save for backward, and plain values).
    ``causal=False``: every key (the context-parallel prefix, ``distributed.py``)."""
    kernel = _causal_kernel(q)
    q, k, v = (_kernel_layout(t) for t in (q, k, v))  # Note [aligned kernel inputs]
    if kernel == "cudnn":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                               scale=scale)
        )
        return out, lse.view(lse.shape[:3]), (seed, offset), (kernel, max_q, max_k)  # lse: [B, H, L, 1]
    if kernel == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        )
        return out, lse, (cum_q, cum_k, seed, offset), (kernel, max_q, max_k)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, (), (kernel,)


# Note [cuDNN backward layouts]
#     aten's fused attention backward ops, called directly as here (not through SDPA, which
#     makes its inputs contiguous first), returned wrong gradients with no error when dO, out
#     and the log-sum-exp were not contiguous (H200, torch 2.11.0+cu130, cuDNN 9.19.0; q, k, v
#     transposed views of [B, L, H, D], bf16; ``tests/test_split.py::
#     test_causal_backward_any_layout_in_one_process``, rel err against float64):
#     - flash: a log-sum-exp that is a transposed view, alone: dq, dk, dv 2.1-2.4 (dO or out
#       transposed, alone: right); likely the kernel reads lse as if contiguous.
#     - cuDNN: dO, out and lse all transposed, after a call with them contiguous in the same
#       process: 2.6-3.0. As the first call of a fresh process, one or two of them transposed
#       were right (all three: not run). Consistent with its graph cache (aten/src/ATen/native/
#       cudnn/MHA.cpp, MHAParams): keyed by the layouts of q, k and v, with the first call's
#       other strides built in.
#     Eagerly every call here passes contiguous ones; under Inductor ``.contiguous()`` is no
#     layout promise (its clone lowering ignores memory_format), and in the context-parallel
#     all-gather mode, which slices rows of out/dO/lse, q/k gradients came back 23-63% off on
#     2 x H200 (Note [cuDNN in the context-parallel split] in distributed.py). So the kernels'
#     backward is a custom op, opaque to Inductor: inside it, eagerly, dO, out and lse are made
#     contiguous (a no-op when they are), and its gradients are returned contiguous, the layout
#     its fake states. With it, every call of the test above was right (2.6e-3 to 3.2e-3, bf16
#     rounding), for both kernels, in any order.


def _causal_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     tensors: tuple[Tensor, ...], consts: tuple, scale: float, causal: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's backward for ``out``/``lse`` (the merged ones: Note [backward through the merge]),
    through the op :func:`_causal_backward_op` (Note [cuDNN backward layouts])."""
    kernel, *sizes = consts
    return _causal_backward_op(dout, q, k, v, out, lse, list(tensors), kernel, list(sizes), scale, causal)


@torch.library.custom_op("compiled_mask::causal_attention_backward", mutates_args=())
def _causal_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        tensors: list[Tensor | None], kernel: str, sizes: list[int], scale: float, causal: bool
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Private op: the backward of :func:`_causal_forward`'s ``kernel``, given dO, out
    ``[B, Hq, L, Dv]`` and lse ``[B, Hq, L]``; ``tensors``/``sizes``: what the forward kept.
    Returns contiguous ``(dq, dk, dv)`` (Note [cuDNN backward layouts])."""
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    dout, q, k, v, out = (_kernel_layout(t) for t in (dout, q, k, v, out))  # Note [aligned kernel inputs]
    if kernel == "cudnn":
        seed, offset = tensors
        max_q, max_k = sizes
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None, max_q, max_k, 0.0,
            causal, scale=scale,  # cuDNN's logsumexp is [B, H, L, 1]
        )
    elif kernel == "flash":
        cum_q, cum_k, seed, offset = tensors
        max_q, max_k = sizes
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale
        )
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    return tuple(g.contiguous() for g in grads)


@_causal_backward_op.register_fake
def _(dout, q, k, v, out, lse, tensors, kernel, sizes, scale, causal):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# Note [suffix kernels]
#     Each suffix term pairs query i only with key i of each round: per query a few dot products
#     of length D, memory-bound. Traced as torch ops they went badly on CUDA: as einsum, fp32 bmm
#     calls with inner size 1..7 (2.4 ms per step on an H200, Q_LEN=8192, 7 rounds, 32/8 heads);
#     as broadcast multiply + sum, Inductor's reductions still took 1.5 ms per fwd+bwd step. So the
#     suffix is two custom ops: on CUDA, Triton kernels that read each tile once
#     (``_triton_suffix.py``); elsewhere the torch math below, which is also their test reference.


def _suffix_views(q: Tensor, k: Tensor, v: Tensor, q_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """q grouped by K/V head ``[B, Hkv, G, L, 1, D]``; suffix k, v per query ``[B, Hkv, 1, L, S, D]``.

    S = max_rounds - 1 suffix rounds; element ``[..., i, s, :]`` of k is ``k[s * Q_LEN + i]``.
    """
    B, Hq, L, D = q.shape
    Hkv, KV = k.shape[1], k.shape[2]
    S = KV // q_len - 1
    q6 = q.view(B, Hkv, Hq // Hkv, L, 1, D)
    k6 = k[:, :, q_len:].view(B, Hkv, S, L, D).transpose(2, 3).unsqueeze(2)
    v6 = v[:, :, q_len:].view(B, Hkv, S, L, v.shape[-1]).transpose(2, 3).unsqueeze(2)
    return q6, k6, v6


def _suffix_scores(q6: Tensor, k6: Tensor, rounds: Tensor, scale: float) -> Tensor:
    """``scale * q . k[s * Q_LEN + q]`` for each round s >= 1, -inf where s >= rounds (dead).

    Returns ``[B, Hkv, G, L, S]`` float32.
    """
    scores = (q6.float() * k6.float()).sum(-1) * scale  # [B, Hkv, G, L, S]
    suffix_round = torch.arange(1, k6.shape[4] + 1, device=scores.device)  # [S]
    return scores.masked_fill(suffix_round >= rounds, float("-inf"))


def _suffix_forward_reference(q: Tensor, k: Tensor, v: Tensor, out_c: Tensor, lse_c: Tensor,
                              rounds: Tensor, q_len: int, scale: float) -> tuple[Tensor, Tensor]:
    """Fold the live suffix rounds into the causal part: ``(out [B, Hq, L, Dv], lse [B, Hq, L])``.

    ``out_c``/``lse_c``: the causal part's normalised output and fp32 log-sum-exp.
    """
    B, Hq, L, _ = q.shape
    q6, k6, v6 = _suffix_views(q, k, v, q_len)
    scores = _suffix_scores(q6, k6, rounds, scale)  # [B, Hkv, G, L, S]
    lse_c5 = lse_c.reshape(scores.shape[:-1])  # [B, Hkv, G, L]
    lse = torch.logaddexp(lse_c5, scores.logsumexp(-1))  # [B, Hkv, G, L]
    p_s = torch.exp(scores - lse.unsqueeze(-1))  # [B, Hkv, G, L, S]
    out_s = (p_s.unsqueeze(-1) * v6.float()).sum(-2)  # [B, Hkv, G, L, Dv]
    out5 = torch.exp(lse_c5 - lse).unsqueeze(-1) * out_c.reshape(out_s.shape).float() + out_s
    out = out5.to(q.dtype).reshape(B, Hq, L, -1)  # [B, Hq, L, Dv]
    return out.contiguous(), lse.reshape(B, Hq, L).contiguous()  # lse: [B, Hq, L]


@torch.library.custom_op("compiled_mask::eagle3_suffix_forward", mutates_args=())
def _suffix_forward(q: Tensor, k: Tensor, v: Tensor, out_c: Tensor, lse_c: Tensor, rounds: Tensor,
                    q_len: int, scale: float) -> tuple[Tensor, Tensor]:
    """Private op of the split backend: :func:`_suffix_forward_reference`, Triton on CUDA
    (Note [suffix kernels])."""
    return _suffix_forward_reference(q, k, v, out_c, lse_c, rounds, q_len, scale)


@_suffix_forward.register_kernel("cuda")
def _(q, k, v, out_c, lse_c, rounds, q_len, scale):
    from compiled_mask._triton_suffix import suffix_forward_triton

    return suffix_forward_triton(q, k, v, out_c, lse_c, rounds, q_len, scale)


@_suffix_forward.register_fake
def _(q, k, v, out_c, lse_c, rounds, q_len, scale):
    B, Hq, L, _ = q.shape
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=torch.float32)


def _suffix_backward_reference(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, rounds: Tensor, dq_c: Tensor, dk_c: Tensor, dv_c: Tensor,
                               q_len: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The full ``(dq, dk, dv)``: the causal part's gradients plus the suffix terms'.

    ``out``/``lse`` are the merged ones; ``d*_c`` come from the causal kernel's backward given them
    (Note [backward through the merge]); dead rounds get zero gradients.
    """
    B, Hq, L, _ = q.shape
    Hkv = k.shape[1]
    q6, k6, v6 = _suffix_views(q, k, v, q_len)
    dout6 = dout.reshape(B, Hkv, Hq // Hkv, L, 1, -1).float()  # [B, Hkv, G, L, 1, Dv]
    row = (dout6 * out.reshape(dout6.shape).float()).sum(-1)  # D = rowsum(dO * O): [B, Hkv, G, L, 1]
    scores = _suffix_scores(q6, k6, rounds, scale)  # [B, Hkv, G, L, S]
    p_s = torch.exp(scores - lse.reshape(row.shape))  # [B, Hkv, G, L, S]
    dp_s = (dout6 * v6.float()).sum(-1)  # dO . v: [B, Hkv, G, L, S]
    ds = (p_s * (dp_s - row) * scale).unsqueeze(-1)  # [B, Hkv, G, L, S, 1]
    dq_s = (ds * k6.float()).sum(-2)  # [B, Hkv, G, L, D]
    dk_s = (ds * q6.float()).sum(2)  # [B, Hkv, L, S, D]
    dv_s = (p_s.unsqueeze(-1) * dout6).sum(2)  # [B, Hkv, L, S, Dv]
    dq = (dq_c.float() + dq_s.view(B, Hq, L, -1)).to(q.dtype).contiguous()  # [B, Hq, L, D]
    dk_s = dk_s.transpose(2, 3).reshape(B, Hkv, -1, k.shape[-1])  # [B, Hkv, S * L, D]
    dv_s = dv_s.transpose(2, 3).reshape(B, Hkv, -1, v.shape[-1])  # [B, Hkv, S * L, Dv]
    dk = torch.cat([dk_c, dk_s.to(k.dtype)], dim=2)  # [B, Hkv, KV, D]
    dv = torch.cat([dv_c, dv_s.to(v.dtype)], dim=2)  # [B, Hkv, KV, Dv]
    return dq, dk, dv


@torch.library.custom_op("compiled_mask::eagle3_suffix_backward", mutates_args=())
def _suffix_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     rounds: Tensor, dq_c: Tensor, dk_c: Tensor, dv_c: Tensor, q_len: int,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Private op of the split backend: :func:`_suffix_backward_reference`, Triton on CUDA
    (Note [suffix kernels])."""
    return _suffix_backward_reference(dout, q, k, v, out, lse, rounds, dq_c, dk_c, dv_c, q_len, scale)


@_suffix_backward.register_kernel("cuda")
def _(dout, q, k, v, out, lse, rounds, dq_c, dk_c, dv_c, q_len, scale):
    from compiled_mask._triton_suffix import suffix_backward_triton

    return suffix_backward_triton(dout, q, k, v, out, lse, rounds, dq_c, dk_c, dv_c, q_len, scale)


@_suffix_backward.register_fake
def _(dout, q, k, v, out, lse, rounds, dq_c, dk_c, dv_c, q_len, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format), k.new_empty(k.shape),
            v.new_empty(v.shape))


# Note [value head dim]
#     MLA-style drafts (DeepSeek, Kimi) use a q/k head dim of 192 and a value head dim of 128. The
#     suffix kernels take any pair; the fused causal kernels (flash, cuDNN as torch calls it, the
#     CPU flash kernel) want one head dim. So their inputs are zero-padded to the larger one:
#     zero columns of q and k add nothing to a score, zero columns of v give zero output columns,
#     which are dropped (and a zero-padded dO adds nothing to the row term rowsum(dO * O)). The
#     softmax scale is the caller's (1 / sqrt(D) of the unpadded D by default). Exact, at the
#     cost of the padded copies of the first round's K/V (or q/k) and the kernel's wider tiles.


def _equal_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with the smaller head dim (q/k's or v's) zero-padded to the larger one."""
    D, Dv = q.shape[-1], v.shape[-1]
    if Dv < D:
        return q, k, F.pad(v, (0, D - Dv))  # [..., D]
    if D < Dv:
        return F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D)), v  # [..., Dv]
    return q, k, v


class _Eagle3Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, q_len: int, scale: float) -> Tensor:
        Dv = v.shape[-1]
        q_c, k_c, v_c = _equal_head_dims(q, k[:, :, :q_len], v[:, :, :q_len])  # Note [value head dim]
        out_c, lse_c, tensors, consts = _causal_forward(q_c, k_c, v_c, scale)
        out, lse = _suffix_forward(q, k, v, out_c[..., :Dv], lse_c, rounds, q_len, scale)
        ctx.save_for_backward(q, k, v, rounds, out, lse, *tensors)
        ctx.consts, ctx.q_len, ctx.scale = consts, q_len, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, rounds, out, lse, *tensors = ctx.saved_tensors
        q_len, scale = ctx.q_len, ctx.scale
        D, Dv = q.shape[-1], v.shape[-1]
        dout = dout.contiguous()
        q_c, k_c, v_c = _equal_head_dims(q, k[:, :, :q_len], v[:, :, :q_len])  # Note [value head dim]
        dout_c, out_c = dout, out
        if v_c.shape[-1] > Dv:  # [B, Hq, L, D]
            dout_c, out_c = F.pad(dout, (0, v_c.shape[-1] - Dv)), F.pad(out, (0, v_c.shape[-1] - Dv))
        dq_c, dk_c, dv_c = _causal_backward(dout_c, q_c, k_c, v_c, out_c, lse, tuple(tensors), ctx.consts,
                                            scale)
        dq_c, dk_c, dv_c = dq_c[..., :D], dk_c[..., :D], dv_c[..., :Dv]
        dq, dk, dv = _suffix_backward(dout, q, k, v, out, lse, rounds, dq_c, dk_c, dv_c, q_len, scale)
        return dq, dk, dv, None, None, None


def split_eagle3_attention(q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, *, q_len: int,
                           scale: float | None) -> Tensor:
    """Eagle3 attention as causal flash attention + suffix diagonals (module docstring).

    Args:
        q: ``[B, Hq, Q_LEN, D]``; k, v: ``[B, Hkv, Q_LEN * max_rounds, D]`` (Hq a multiple of Hkv);
        rounds: 0-d int tensor, live rounds (rounds s >= rounds are ignored);
        q_len: Q_LEN; scale: softmax scale (default ``1 / sqrt(D)``).

    Returns:
        ``[B, Hq, Q_LEN, Dv]``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _Eagle3Split.apply(q, k, v, rounds, q_len, scale)


# Note [documents in the split backend]
#     Packed documents need a causal part that stops at each document's start, which neither
#     cuDNN's nor the flash kernel can do per position without a host sync (varlen needs the
#     number of documents). So with doc_ids the causal part is flex_attention over the
#     per-document causal BlockMask (eagle3_block_mask with KV_LEN = Q_LEN: only the blocks inside
#     documents), which returns a log-sum-exp that autograd differentiates. The suffix is merged by
#     _SuffixMerge, whose backward returns the gradients of its inputs out_c and lse_c (the same
#     suffix kernels, given zero causal gradients):
#         a = exp(lse_c - lse),  d out_c = a * dO,  d lse_c = a * (dO . out_c - dO . out)
#     flex's backward then gets exactly the causal gradients of the merged softmax (its row term
#     rowsum(d out_c * out_c) - d lse_c is a * D). A row with nothing to attend (padding) has
#     lse_c = -inf from flex; it is clamped to the lowest float so that the merge stays finite.


class _SuffixMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, out_c: Tensor, lse_c: Tensor, rounds: Tensor,
                q_len: int, scale: float) -> Tensor:
        out, lse = _suffix_forward(q, k, v, out_c, lse_c, rounds, q_len, scale)
        ctx.save_for_backward(q, k, v, out_c, lse_c, rounds, out, lse)
        ctx.q_len, ctx.scale = q_len, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out_c, lse_c, rounds, out, lse = ctx.saved_tensors
        q_len = ctx.q_len
        dout = dout.contiguous()
        zero_c = (torch.zeros_like(q), k.new_zeros(k[:, :, :q_len].shape), v.new_zeros(v[:, :, :q_len].shape))
        dq, dk, dv = _suffix_backward(dout, q, k, v, out, lse, rounds, *zero_c, q_len, ctx.scale)
        a = torch.exp(lse_c - lse).unsqueeze(-1)  # [B, Hq, L, 1]
        dout32 = dout.float()
        d_out_c = (a * dout32).to(out_c.dtype)
        d_lse_c = (a * dout32 * (out_c.float() - out.float())).sum(-1)  # [B, Hq, L]
        return dq, dk, dv, d_out_c, d_lse_c, None, None, None


def split_document_attention(q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, causal_mask: BlockMask,
                             *, q_len: int, scale: float | None) -> Tensor:
    """The split backend for packed documents (Note [documents in the split backend]).

    Args:
        q, k, v, rounds, q_len, scale: as :func:`split_eagle3_attention`.
        causal_mask: the per-document causal BlockMask over the first Q_LEN keys.

    Returns:
        ``[B, Hq, Q_LEN, Dv]``; rows with nothing to attend in the causal part still see their
        suffix diagonal (the caller zeroes padding rows).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_c, k_c, _ = _qk_as_wide_as_v(q, k[:, :, :q_len], v, scale)  # Note [flex tiles follow the q/k head dim]
    out_c, aux = flex_attention(q_c, k_c, v[:, :, :q_len], block_mask=causal_mask, scale=scale,
                                enable_gqa=q.size(1) != k.size(1), return_aux=AuxRequest(lse=True))
    lse_c = aux.lse.clamp(min=torch.finfo(torch.float32).min)  # -inf on empty rows
    return _SuffixMerge.apply(q, k, v, out_c, lse_c, rounds, q_len, scale)
