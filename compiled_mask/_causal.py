"""The fused causal attention kernel (forward and backward, :func:`_kernel_forward` and
:func:`_kernel_backward`), and the op ``compiled_mask::causal_attention``: that kernel's attention
merged with another softmax part, differentiable in everything.

The split op (``_split.py``) runs the kernel for the causal part of the Eagle3 mask and folds the
suffix rounds into it. The context-parallel all-gather mode (``distributed.py``) needs the causal
part of a chunk (or a plain, non-causal prefix) merged by log-sum-exp with other parts over
disjoint keys (its suffix rounds, ``_suffix.py``; other chunks' keys), each a differentiable op:
this op takes such a part, ``(out_p, lse_p)``, and returns the merged ``(out, lse)``:

    out_c, lse_c = kernel(q, k, v)                     causal (or every key), fused
    lse          = logaddexp(lse_c, lse_p)
    out          = exp(lse_c - lse) * out_c + exp(lse_p - lse) * out_p

Both run on real tensors, so they can see what compiled code cannot (data pointers, strides) and
hand the kernel the layout it needs (Note [aligned kernel inputs]).

Note [the suffix first]
    The kernels' backward takes dO, the output and the log-sum-exp. Given the *merged* ones it
    returns the exact gradients of this part of the merged softmax (its probabilities are then
    those of the full softmax, and its row term rowsum(dO * out) too: the identity ring attention
    uses). So every part's backward is handed the merged out, lse and dO: in the split op
    directly; in this op by computing the other part first and merging it in here, so that the
    kernel's backward sees the caller's dO itself. Composed the other way, the kernel would get
    the causal part's gradient, exp(lse_c - lse) * dO, rounded to bf16 on its way: an extra
    rounding of every element that made the bf16 gradients ~1.2x less accurate. The part's own
    gradients, ``exp(lse_p - lse) * dO`` and its lse's, stay in the part's dtype (float32 for
    the suffix).

Note [which causal kernel]
    On CUDA the kernel is cuDNN's fused attention, the one SDPA itself picks for causal attention
    on Hopper (docs/benchmarks.md has the comparison with aten's flash kernel); where cuDNN cannot
    run (no cuDNN, a head dim over 128 or not a multiple of 8, a single query) aten's flash
    kernel. On CPU it is the CPU flash kernel, which also takes a mask: packed documents there
    run it with a dense ``[B, 1, L, L]`` additive mask built from the layout table (CPU only; on
    CUDA packed documents run flex_attention, which reads the block mask).

Note [lse gradient through the row term]
    The fused kernels' backward computes the row term ``D = rowsum(dO * out)`` itself; none takes
    a gradient for lse. But a gradient dL of the merged lse enters the scores' gradient exactly as
    a change of that row term: ``dS = P * (dO V^T - D + dL)``. So with dL the kernel is handed
    ``out' = out - (dL / |dO|^2) dO``, whose row term with dO is ``D - dL``: exact whenever a row
    with ``dL != 0`` has ``dO != 0``. That holds wherever the op's output is merged further by
    log-sum-exp (a context-parallel chunk's prefix, then its diagonal block): the merge gives the
    part ``a * dO`` and ``a * (dO . out_part - D)`` with ``a > 0``, both zero exactly when dO is
    (and ``out'`` is then out minus the projection of ``out - out_merged`` on dO: bounded, however
    small dO is). A row whose dO is zero gets no lse gradient. Without dL (the split backend's
    output, whose lse nobody reads) the kernel gets out itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from compiled_mask._dtypes import _f32_or_wider

__all__: list[str] = []


def _causal_kernel(q: Tensor) -> str:
    """Note [which causal kernel]: "cudnn", "flash" or "cpu". cuDNN refuses one query and one key
    ("s_q = s_kv = 1 is not supported"), so Q_LEN = 1 runs on flash."""
    if q.device.type != "cuda":
        return "cpu"
    L, D = q.shape[-2:]
    return "cudnn" if torch.backends.cudnn.is_available() and D <= 128 and D % 8 == 0 and L > 1 else "flash"


def _kernel_strides(t: Tensor) -> Tensor:
    """``t`` as the fused kernels read it: unit stride in the head dim, and on CUDA every other
    stride and the data pointer a multiple of 16 bytes; a copy only where it is not.

    Note [aligned kernel inputs]
        cuDNN's attention (called directly, without SDPA's own checks) returned wrong results,
        with no error, for q/k/v whose strides or address are not multiples of 16 bytes: a q
        sliced out of a wider tensor, and a contiguous view at an odd offset into a larger buffer
        (for which ``.contiguous()`` is a no-op, so the copy here is a clone). This runs inside
        the op, on real tensors, eagerly and compiled alike.
    """
    if t.device.type != "cuda":  # the CPU flash kernel misreads a head dim with a stride other than 1
        return t if t.stride(-1) == 1 else t.contiguous()
    aligned = (t.stride(-1) == 1 and all((s * t.dtype.itemsize) % 16 == 0 for s in t.stride()[:-1])
               and t.data_ptr() % 16 == 0)
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _equal_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v zero-padded to one head dim: the larger of q/k's and v's, and on CUDA up to a
    multiple of 8 (the flash kernel's requirement, which SDPA meets by padding the same way).

    Note [value head dim]
        MLA-style drafts use a q/k head dim of 192 and a value head dim of 128; the fused kernels
        want one head dim (a multiple of 8 on CUDA). Zero columns of q and k add nothing to a
        score, zero columns of v give zero output columns (dropped), and a zero-padded dO adds
        nothing to the row term: exact, at the cost of the padded copies. The softmax scale is
        the caller's.
    """
    D, Dv = q.shape[-1], v.shape[-1]
    width = max(D, Dv)
    if q.device.type == "cuda":
        width = -(-width // 8) * 8
    if D < width:
        q, k = F.pad(q, (0, width - D)), F.pad(k, (0, width - D))  # [..., width]
    if Dv < width:
        v = F.pad(v, (0, width - Dv))  # [..., width]
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


def _positive_scale(q: Tensor, scale: float) -> tuple[Tensor, float]:
    """``(q, scale)`` as the kernels take them.

    Note [a scale of 0 or below]
        The fused kernels scale the scores after masking them, so a scale of 0 turns a masked
        ``-inf`` into NaN and a negative one into ``+inf``. The softmax of ``scale * q.k`` is
        defined for any finite scale (0: uniform over the allowed keys), so such a scale is
        applied to q instead and the kernel runs with scale 1 (its gradient is scaled back);
        positive scales go to the kernel as they are, with no extra rounding.
    """
    if scale > 0:
        return q, scale
    return (q.to(_f32_or_wider(q.dtype)) * scale).to(q.dtype), 1.0


def _merge_reference(out_c: Tensor, lse_c: Tensor, out_p: Tensor, lse_p: Tensor, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor]:
    """Two softmax parts over disjoint keys as one (torch ops): ``(out in dtype, lse)``."""
    ct = _f32_or_wider(torch.promote_types(out_c.dtype, out_p.dtype))
    lse = torch.logaddexp(lse_c.to(ct), lse_p.to(ct))  # [B, H, L]
    out = (torch.exp(lse_c - lse).unsqueeze(-1) * out_c.to(ct)
           + torch.exp(lse_p - lse).unsqueeze(-1) * out_p.to(ct))  # [B, H, L, Dv]
    return out.to(dtype).contiguous(), lse.to(torch.promote_types(lse_c.dtype, lse_p.dtype)).contiguous()


def _merge_backward_reference(dout: Tensor, dlse: Tensor | None, out: Tensor, lse: Tensor, out_p: Tensor,
                              lse_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The merged part's gradients (torch ops): ``(d_out_p, d_lse_p, out for the kernel's row
    term)`` (Note [lse gradient through the row term])."""
    ct = _f32_or_wider(torch.promote_types(out.dtype, out_p.dtype))
    dout_t = dout.to(ct)
    row = (dout_t * out.to(ct)).sum(-1)  # [B, H, L]
    if dlse is not None:
        row = row - dlse.to(ct)
    b = torch.exp(lse_p.to(ct) - lse.to(ct))  # [B, H, L]: the part's share
    d_out_p = (b.unsqueeze(-1) * dout_t).to(out_p.dtype)
    d_lse_p = (b * ((dout_t * out_p.to(ct)).sum(-1) - row)).to(lse_p.dtype)
    return d_out_p.contiguous(), d_lse_p.contiguous(), _row_output(dout, dlse, out)


def _row_output(dout: Tensor, dlse: Tensor | None, out: Tensor) -> Tensor:
    """The output the kernel's backward reads for its row term: ``out``, or with an lse gradient
    ``out - (dL / |dO|^2) dO`` (Note [lse gradient through the row term])."""
    if dlse is None:
        return out
    ct = _f32_or_wider(out.dtype)
    dout_t = dout.to(ct)
    norm2 = (dout_t * dout_t).sum(-1)  # [B, H, L]
    coef = torch.where(norm2 > 0, dlse.to(ct) / norm2.clamp_min(torch.finfo(ct).tiny), 0.0)
    return (out.to(ct) - coef.unsqueeze(-1) * dout_t).to(out.dtype)  # [B, H, L, Dv]


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 and q.device.type == "cpu" else torch.float32


def _kernel_forward(q: Tensor, k: Tensor, v: Tensor, first_key: Tensor | None, scale: float, causal: bool
                    ) -> tuple[Tensor, Tensor]:
    """The fused kernel's attention of q over k, v (Note [which causal kernel]), on real tensors:
    ``(out [B, Hq, L, Dv] in q's dtype, lse [B, Hq, L])``, contiguous; arguments as
    :func:`_causal_attention`'s. A row with no key has out 0 and the lowest float as lse."""
    Dv = v.shape[-1]
    if first_key is not None and q.device.type != "cpu":
        raise NotImplementedError("causal_attention: a layout table (documents) is a CPU-only path; "
                                  "on CUDA the split backend runs flex_attention for documents.")
    q, scale = _positive_scale(q, scale)  # Note [a scale of 0 or below]
    q, k, v = (_kernel_strides(t) for t in _equal_head_dims(q, k, v))  # Note [value head dim]
    kernel = _causal_kernel(q)  # of the padded head dim, the one the kernel sees
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


def _kernel_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o_row: Tensor, lse: Tensor,
                     first_key: Tensor | None, scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fused kernel's backward for :func:`_kernel_forward`: ``(dq, dk, dv)``, contiguous, in
    the inputs' dtypes. ``o_row`` and ``lse`` are the output and log-sum-exp whose softmax the
    gradients are of: the merged ones when this kernel's keys are a part of a larger softmax
    (Note [the suffix first]); ``o_row`` carries an lse gradient (Note [lse gradient through
    the row term]).

    Note [cuDNN backward strides]
        aten's fused attention backward ops, called directly as here, returned wrong gradients
        with no error when dO, out and lse were not contiguous (cuDNN's graph cache is keyed by
        the layouts of q, k and v only, with the first call's other strides built in; flash
        misreads a transposed lse). Here every input is made dense first (a no-op when
        it is), and the gradients come back contiguous, the layout the ops' fakes state.
    """
    D, Dv = q.shape[-1], v.shape[-1]
    q_scale = scale
    q, scale = _positive_scale(q, scale)  # Note [a scale of 0 or below]
    dout = dout.to(q.dtype)
    q_p, k_p, v_p = _equal_head_dims(q, k, v)  # Note [value head dim]
    kernel = _causal_kernel(q_p)  # the forward's: chosen from the padded head dim
    width = v_p.shape[-1]
    if width > Dv:
        dout, o_row = F.pad(dout, (0, width - Dv)), F.pad(o_row, (0, width - Dv))  # [B, Hq, L, width]
    dout, o_row, lse = dout.contiguous(), o_row.contiguous(), lse.contiguous()
    dout, q_p, k_p, v_p, o_row = (_kernel_strides(t) for t in (dout, q_p, k_p, v_p, o_row))  # Note [aligned kernel inputs]
    L, Lk = q.shape[2], k.shape[2]
    lse_k = lse.to(_lse_dtype(q))  # the kernels read their own lse dtype
    if kernel == "cudnn":
        # The dropout seed/offset are read only with dropout; cuDNN's forward returns zeros.
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q_p, k_p, v_p, o_row, lse_k.unsqueeze(-1), seed, seed, None, None, None, L, Lk, 0.0, causal,
            scale=scale)  # cuDNN's logsumexp is [B, H, L, 1]
    elif kernel == "flash":
        # The dropout RNG state is read only with dropout: placeholders of the forward's shapes.
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q_p, k_p, v_p, o_row, lse_k, None, None, L, Lk, 0.0, causal, seed, offset, scale=scale)
    else:
        mask = None if first_key is None else _document_mask(first_key, L, causal, q.dtype)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q_p, k_p, v_p, o_row, lse_k, 0.0, causal and mask is None, attn_mask=mask, scale=scale)
    dq, dk, dv = grads
    if q_scale <= 0:  # the kernel saw q * q_scale
        dq = dq * q_scale
    return dq[..., :D].contiguous(), dk[..., :D].contiguous(), dv[..., :Dv].contiguous()


@torch.library.custom_op("compiled_mask::causal_attention", mutates_args=())
def _causal_attention(q: Tensor, k: Tensor, v: Tensor, out_p: Tensor | None, lse_p: Tensor | None,
                      first_key: Tensor | None, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Private op: attention of q over k, v with a fused kernel (Note [which causal kernel]),
    merged with the part ``(out_p, lse_p)`` when given (module docstring).

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hkv, Lk, D]`` / ``[.., Dv]``, Hq a multiple of Hkv.
        out_p, lse_p: None, or a softmax part over other keys ``[B, Hq, L, Dv]`` / ``[B, Hq, L]``
            (any float dtypes; lse finite: the lowest float for a row with no key).
        first_key: None, or (CPU only) the ``[B, L]`` int64 layout table of packed documents.
        scale: softmax scale. causal: key j attends query i only for j <= i (Lk == L);
            False: every key (a context-parallel prefix).

    Returns:
        ``(out [B, Hq, L, Dv] in q's dtype, lse [B, Hq, L])``, contiguous; lse is fp32 (fp64 for
        fp64 CPU inputs, or wider if the part's is), natural log. A row with no key to attend has
        out 0 and the lowest float as lse (finite, so that a merge stays finite).
    """
    out, lse = _kernel_forward(q, k, v, first_key, scale, causal)
    if out_p is None:
        return out, lse
    if q.device.type == "cuda":
        from compiled_mask._triton_suffix import merge_forward_triton

        return merge_forward_triton(out, lse, out_p, lse_p, out.dtype)
    return _merge_reference(out, lse, out_p, lse_p, out.dtype)


@_causal_attention.register_fake
def _(q, k, v, out_p, lse_p, first_key, scale, causal):
    B, Hq, L, _ = q.shape
    lse_dtype = _lse_dtype(q) if lse_p is None else torch.promote_types(_lse_dtype(q), lse_p.dtype)
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=lse_dtype)


@torch.library.custom_op("compiled_mask::causal_attention_backward", mutates_args=())
def _causal_attention_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, out_p: Tensor | None, lse_p: Tensor | None, first_key: Tensor | None,
                               scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Private op: the gradients of :func:`_causal_attention` for dO and dL (Note [the suffix
    first], Note [lse gradient through the row term]): ``(dq, dk, dv, d_out_p, d_lse_p)``,
    contiguous, the last two empty ``[0]`` tensors without a part.
    """
    dout = dout.to(q.dtype)
    d_out_p, d_lse_p = dout.new_empty(0), dout.new_empty(0)  # no part: nothing to return
    if out_p is None:
        o_row = _row_output(dout, dlse, out)  # Note [lse gradient through the row term]
    elif q.device.type == "cuda":
        from compiled_mask._triton_suffix import merge_backward_triton

        d_out_p, d_lse_p, o_row = merge_backward_triton(dout, dlse, out, lse, out_p, lse_p)
    else:
        d_out_p, d_lse_p, o_row = _merge_backward_reference(dout, dlse, out, lse, out_p, lse_p)
    return (*_kernel_backward(dout, q, k, v, o_row, lse, first_key, scale, causal), d_out_p, d_lse_p)


@_causal_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, out_p, lse_p, first_key, scale, causal):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if out_p is None:
        return (*grads, dout.new_empty(0), dout.new_empty(0))
    return (*grads, torch.empty_like(out_p, memory_format=torch.contiguous_format),
            torch.empty_like(lse_p, memory_format=torch.contiguous_format))


def _setup_causal(ctx, inputs, output) -> None:
    q, k, v, out_p, lse_p, first_key, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, out_p, lse_p, first_key)
    ctx.scale, ctx.causal, ctx.has_part = scale, causal, out_p is not None
    # An output nobody reads gets None, not zeros: without an lse gradient the kernel's backward
    # reads out itself (Note [lse gradient through the row term]).
    ctx.set_materialize_grads(False)


def _causal_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, out_p, lse_p, first_key = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, d_out_p, d_lse_p = _causal_attention_backward(dout, dlse, q, k, v, out, lse, out_p, lse_p,
                                                               first_key, ctx.scale, ctx.causal)
    if not ctx.has_part:
        d_out_p = d_lse_p = None
    return dq, dk, dv, d_out_p, d_lse_p, None, None, None


_causal_attention.register_autograd(_causal_backward, setup_context=_setup_causal)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                     part: tuple[Tensor, Tensor] | None = None, first_key: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of :func:`_causal_attention`: the kernel's attention merged with ``part``
    ``(out_p, lse_p)`` when given; differentiable in q, k, v and the part."""
    out_p, lse_p = (None, None) if part is None else part
    return _causal_attention(q, k, v, out_p, lse_p, first_key, scale, causal)
