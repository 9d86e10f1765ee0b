"""The causal attention op ``compiled_mask::causal_attention``: fused kernels that return their
log-sum-exp, differentiable in both outputs.

The split backend (``_split.py``) and the context-parallel all-gather mode (``distributed.py``)
need the causal part of the Eagle3 mask (or a plain, non-causal prefix) as ``(out, lse)``, merged
with other parts by log-sum-exp (``_suffix.py``). The op runs a fused kernel on real tensors, so
it can see what compiled code cannot (data pointers, strides) and hand each kernel the layout it
needs (Note [aligned kernel inputs]).

Note [which causal kernel]
    On CUDA the kernel is cuDNN's fused attention, the one SDPA itself picks for causal attention
    on Hopper (docs/benchmarks.md has the comparison with aten's flash kernel); where cuDNN cannot
    run (no cuDNN, a head dim over 128 or not a multiple of 8, a single query) aten's flash
    kernel. On CPU it is the CPU flash kernel, which also takes a mask: packed documents there
    run it with a dense ``[B, 1, L, L]`` additive mask built from the layout table (CPU only; on
    CUDA packed documents run flex_attention, which reads the block mask).

Note [lse gradient through the row term]
    The fused kernels' backward takes dO, out and lse and computes the row term
    ``D = rowsum(dO * out)`` itself; none takes a gradient for lse. But a gradient dL for lse
    enters the scores' gradient exactly as a change of that row term: ``dS = P * (dO V^T - D +
    dL)``. So the backward hands the kernel ``out' = out - (dL / |dO|^2) dO``, whose row term
    with dO is ``D - dL``, and is exact whenever a row with ``dL != 0`` has ``dO != 0``. That holds
    wherever the op is merged with another part by log-sum-exp, as every caller here does: the
    merge gives the part ``dO_c = a * dO`` and ``dL_c = a * (dO . out_c - D)`` with
    ``a = exp(lse_c - lse) > 0``, both zero exactly when dO is (and then ``out'`` is ``out_c``
    minus the projection of ``out_c - out`` on dO: bounded, however small dO is). A row whose dO is
    zero gets no lse gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__: list[str] = []


def _causal_kernel(q: Tensor) -> str:
    """Note [which causal kernel]: "cudnn", "flash" or "cpu". cuDNN refuses one query and one key
    ("s_q = s_kv = 1 is not supported"), so Q_LEN = 1 runs on flash."""
    if q.device.type != "cuda":
        return "cpu"
    L, D = q.shape[-2:]
    return "cudnn" if torch.backends.cudnn.is_available() and D <= 128 and D % 8 == 0 and L > 1 else "flash"


def _kernel_layout(t: Tensor) -> Tensor:
    """``t`` as the fused CUDA kernels read it: unit stride in the head dim and every other stride
    and the data pointer a multiple of 16 bytes; a copy only where it is not.

    Note [aligned kernel inputs]
        cuDNN's attention (called directly, without SDPA's own checks) returned wrong results,
        with no error, for q/k/v whose strides or address are not multiples of 16 bytes: a q
        sliced out of a wider tensor, and a contiguous view at an odd offset into a larger buffer
        (for which ``.contiguous()`` is a no-op, so the copy here is a clone). This runs inside
        the op, on real tensors, eagerly and compiled alike.
    """
    if t.device.type != "cuda":
        return t
    aligned = (t.stride(-1) == 1 and all((s * t.dtype.itemsize) % 16 == 0 for s in t.stride()[:-1])
               and t.data_ptr() % 16 == 0)
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _equal_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with the smaller head dim (q/k's or v's) zero-padded to the larger one.

    Note [value head dim]
        MLA-style drafts use a q/k head dim of 192 and a value head dim of 128; the fused kernels
        want one head dim. Zero columns of q and k add nothing to a score, zero columns of v give
        zero output columns (dropped), and a zero-padded dO adds nothing to the row term: exact,
        at the cost of the padded copies. The softmax scale is the caller's.
    """
    D, Dv = q.shape[-1], v.shape[-1]
    if Dv < D:
        return q, k, F.pad(v, (0, D - Dv))  # [..., D]
    if D < Dv:
        return F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D)), v  # [..., Dv]
    return q, k, v


def _document_mask(first_key: Tensor, L: int, causal: bool, dtype: torch.dtype) -> Tensor:
    """The additive mask ``[B, 1, L, L]`` of a layout table (Note [one layout table] in
    ``_layout.py``): query q attends key positions ``first_key[b, q] <= kv (<= q)``."""
    pos = torch.arange(L, device=first_key.device)  # [L]
    allowed = pos >= first_key.unsqueeze(-1)  # [B, L, L]
    if causal:
        allowed = allowed & (pos <= pos.unsqueeze(-1))
    zero = torch.zeros((), dtype=dtype, device=first_key.device)
    return torch.where(allowed, zero, float("-inf")).unsqueeze(1)  # [B, 1, L, L]


@torch.library.custom_op("compiled_mask::causal_attention", mutates_args=())
def _causal_attention(q: Tensor, k: Tensor, v: Tensor, first_key: Tensor | None, scale: float,
                      causal: bool) -> tuple[Tensor, Tensor]:
    """Private op: attention of q over k, v with a fused kernel (Note [which causal kernel]).

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hkv, Lk, D]`` / ``[.., Dv]``, Hq a multiple of Hkv.
        first_key: None, or (CPU only) the ``[B, L]`` int64 layout table of packed documents.
        scale: softmax scale. causal: key j attends query i only for j <= i (Lk == L);
            False: every key (a context-parallel prefix).

    Returns:
        ``(out [B, Hq, L, Dv] in q's dtype, lse [B, Hq, L])``, contiguous; lse is fp32 (fp64 for
        fp64 CPU inputs), natural log. A row with no key to attend has out 0 and the lowest
        float as lse (finite, so that a merge stays finite).
    """
    Dv = v.shape[-1]
    kernel = _causal_kernel(q)
    q, k, v = (_kernel_layout(t) for t in _equal_head_dims(q, k, v))  # Note [value head dim]
    if kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        lse = lse.view(lse.shape[:3])  # [B, H, L, 1] -> [B, H, L]
    elif kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    elif first_key is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    else:
        mask = _document_mask(first_key, q.shape[2], causal, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                              scale=scale)
        empty = (first_key > torch.arange(q.shape[2], device=q.device)).unsqueeze(1)  # [B, 1, L]: padding rows
        lse = lse.masked_fill(empty, torch.finfo(lse.dtype).min)
    return out[..., :Dv].contiguous(), lse.contiguous()


@_causal_attention.register_fake
def _(q, k, v, first_key, scale, causal):
    B, Hq, L, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 and q.device.type == "cpu" else torch.float32
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=lse_dtype)


@torch.library.custom_op("compiled_mask::causal_attention_backward", mutates_args=())
def _causal_attention_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, first_key: Tensor | None, scale: float, causal: bool
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """Private op: the gradients of :func:`_causal_attention` for dO and dL (Note [lse gradient
    through the row term]), ``(dq, dk, dv)`` contiguous.

    Note [cuDNN backward layouts]
        aten's fused attention backward ops, called directly as here, returned wrong gradients
        with no error when dO, out and lse were not contiguous (cuDNN's graph cache is keyed by
        the layouts of q, k and v only, with the first call's other strides built in; flash
        misreads a transposed lse). Inside this op every input is made dense first (a no-op when
        it is), and the gradients come back contiguous, the layout the fake states.
    """
    D, Dv = q.shape[-1], v.shape[-1]
    kernel = _causal_kernel(q)
    dout = dout.to(q.dtype)
    if dlse is not None:  # Note [lse gradient through the row term]
        ct = torch.promote_types(q.dtype, torch.float32)
        dout_t = dout.to(ct)
        norm2 = (dout_t * dout_t).sum(-1)  # [B, Hq, L]
        coef = torch.where(norm2 > 0, dlse.to(ct) / norm2.clamp_min(torch.finfo(ct).tiny), 0.0)
        out = (out.to(ct) - coef.unsqueeze(-1) * dout_t).to(q.dtype)  # [B, Hq, L, Dv]
    q_p, k_p, v_p = _equal_head_dims(q, k, v)  # Note [value head dim]
    width = v_p.shape[-1]
    if width > Dv:
        dout, out = F.pad(dout, (0, width - Dv)), F.pad(out, (0, width - Dv))  # [B, Hq, L, width]
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    dout, q_p, k_p, v_p, out = (_kernel_layout(t) for t in (dout, q_p, k_p, v_p, out))  # Note [aligned kernel inputs]
    L, Lk = q.shape[2], k.shape[2]
    if kernel == "cudnn":
        # The dropout seed/offset are read only with dropout; cuDNN's forward returns zeros({1}).
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q_p, k_p, v_p, out, lse.unsqueeze(-1), seed, seed, None, None, None, L, Lk, 0.0, causal,
            scale=scale)  # cuDNN's logsumexp is [B, H, L, 1]
    elif kernel == "flash":
        # The dropout RNG state is read only with dropout: placeholders of the forward's shapes.
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q_p, k_p, v_p, out, lse, None, None, L, Lk, 0.0, causal, seed, offset, scale=scale)
    else:
        mask = None if first_key is None else _document_mask(first_key, L, causal, q.dtype)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q_p, k_p, v_p, out, lse, 0.0, causal and mask is None, attn_mask=mask, scale=scale)
    dq, dk, dv = grads
    return dq[..., :D].contiguous(), dk[..., :D].contiguous(), dv[..., :Dv].contiguous()


@_causal_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, first_key, scale, causal):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_causal(ctx, inputs, output) -> None:
    q, k, v, first_key, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, first_key)
    ctx.scale, ctx.causal = scale, causal


def _causal_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, first_key = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _causal_attention_backward(dout, dlse, q, k, v, out, lse, first_key, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None


_causal_attention.register_autograd(_causal_backward, setup_context=_setup_causal)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                     first_key: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of :func:`_causal_attention`, differentiable in q, k, v (for out and lse)."""
    return _causal_attention(q, k, v, first_key, scale, causal)
