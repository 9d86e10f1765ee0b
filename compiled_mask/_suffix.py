"""The merge op ``compiled_mask::suffix_merge``: the Eagle3 suffix rounds folded into a causal part.

Under the Eagle3 rule query i of round 0 sees, besides its causal keys, exactly one key per live
suffix round s >= 1: key ``s * Q_LEN + i``. Given the causal part's normalised output and
log-sum-exp (from any kernel: ``_causal.py``, flex_attention, a context-parallel prefix), the
suffix costs one dot product per (query, round), merged by log-sum-exp:

    score_s = scale * q . k_s[i]     for live suffix rounds, -inf for dead ones
    lse     = logaddexp(lse_c, logsumexp_s score_s)
    out     = exp(lse_c - lse) * out_c + sum_s exp(score_s - lse) * v_s[i]

The op is differentiable in every tensor input (``register_autograd``), so every variant of the
split backend (plain, packed documents, context parallel) composes it with its causal part and
autograd chains the two; no variant derives a backward of its own. Its backward, for incoming
gradients ``dO`` (of out) and ``dL`` (of lse), with ``D = rowsum(dO * out) - dL``:

    p_s = exp(score_s - lse),  ds_s = scale * p_s * (dO . v_s[i] - D)
    dq = sum_s ds_s * k_s[i],  dk_s[i] = sum_g ds_s * q,  dv_s[i] = sum_g p_s * dO
    a = exp(lse_c - lse),  d out_c = a * dO,  d lse_c = a * (rowsum(dO * out_c) - D)

On CUDA both directions run the Triton kernels of ``_triton_suffix.py``; elsewhere the torch math
below, which is also their reference (held to it on CPU by the Triton interpreter tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__: list[str] = []


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64 (no precision is lost)."""
    return torch.promote_types(dtype, torch.float32)


def _suffix_views(q: Tensor, ks: Tensor, vs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q grouped by K/V head ``[B, Hkv, G, L, 1, D]``; suffix k, v per query ``[B, Hkv, 1, L, S, D]``.

    ``ks``/``vs`` hold the S suffix rounds ``[B, Hkv, S * L, D]``; element ``[..., i, s, :]`` is
    round s + 1's key of query i.
    """
    B, Hq, L, D = q.shape
    Hkv = ks.shape[1]
    S = ks.shape[2] // L
    q6 = q.view(B, Hkv, Hq // Hkv, L, 1, D)  # [B, Hkv, G, L, 1, D]
    k6 = ks.view(B, Hkv, S, L, D).transpose(2, 3).unsqueeze(2)  # [B, Hkv, 1, L, S, D]
    v6 = vs.view(B, Hkv, S, L, vs.shape[-1]).transpose(2, 3).unsqueeze(2)  # [B, Hkv, 1, L, S, Dv]
    return q6, k6, v6


def _suffix_scores(q6: Tensor, k6: Tensor, rounds: Tensor, scale: float) -> Tensor:
    """``scale * q . k_s`` for suffix rounds s = 1..S, -inf where s >= rounds (dead).

    Returns ``[B, Hkv, G, L, S]`` in the compute dtype.
    """
    ct = _compute_dtype(q6.dtype)
    scores = (q6.to(ct) * k6.to(ct)).sum(-1) * scale  # [B, Hkv, G, L, S]
    suffix_round = torch.arange(1, k6.shape[4] + 1, device=scores.device)  # [S]
    return scores.masked_fill(suffix_round >= rounds, float("-inf"))


def _merge_reference(q: Tensor, ks: Tensor, vs: Tensor, out_c: Tensor, lse_c: Tensor, rounds: Tensor,
                     scale: float) -> tuple[Tensor, Tensor]:
    """The forward in torch ops: ``(out [B, Hq, L, Dv] in q's dtype, lse [B, Hq, L] in lse_c's)``."""
    B, Hq, L, _ = q.shape
    ct = _compute_dtype(q.dtype)
    q6, k6, v6 = _suffix_views(q, ks, vs)
    scores = _suffix_scores(q6, k6, rounds, scale)  # [B, Hkv, G, L, S]
    lse_c5 = lse_c.reshape(scores.shape[:-1]).to(ct)  # [B, Hkv, G, L]
    lse = torch.logaddexp(lse_c5, scores.logsumexp(-1))  # [B, Hkv, G, L]
    p_s = torch.exp(scores - lse.unsqueeze(-1))  # [B, Hkv, G, L, S]
    out_s = (p_s.unsqueeze(-1) * v6.to(ct)).sum(-2)  # [B, Hkv, G, L, Dv]
    out5 = torch.exp(lse_c5 - lse).unsqueeze(-1) * out_c.reshape(out_s.shape).to(ct) + out_s
    out = out5.to(q.dtype).reshape(B, Hq, L, -1)  # [B, Hq, L, Dv]
    return out.contiguous(), lse.to(lse_c.dtype).reshape(B, Hq, L).contiguous()


def _merge_backward_reference(dout: Tensor, dlse: Tensor | None, q: Tensor, ks: Tensor, vs: Tensor,
                              out_c: Tensor, lse_c: Tensor, out: Tensor, lse: Tensor, rounds: Tensor,
                              scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward in torch ops (module docstring): ``(dq, dks, dvs, d_out_c, d_lse_c)``; dead
    rounds get zero gradients."""
    B, Hq, L, _ = q.shape
    Hkv = ks.shape[1]
    ct = _compute_dtype(q.dtype)
    q6, k6, v6 = _suffix_views(q, ks, vs)
    dout6 = dout.reshape(B, Hkv, Hq // Hkv, L, 1, -1).to(ct)  # [B, Hkv, G, L, 1, Dv]
    row = (dout6 * out.reshape(dout6.shape).to(ct)).sum(-1)  # rowsum(dO * O): [B, Hkv, G, L, 1]
    if dlse is not None:
        row = row - dlse.reshape(row.shape).to(ct)
    scores = _suffix_scores(q6, k6, rounds, scale)  # [B, Hkv, G, L, S]
    lse5 = lse.reshape(row.shape).to(ct)  # [B, Hkv, G, L, 1]
    p_s = torch.exp(scores - lse5)  # [B, Hkv, G, L, S]
    dp_s = (dout6 * v6.to(ct)).sum(-1)  # dO . v: [B, Hkv, G, L, S]
    ds = (p_s * (dp_s - row) * scale).unsqueeze(-1)  # [B, Hkv, G, L, S, 1]
    dq = (ds * k6.to(ct)).sum(-2).reshape(B, Hq, L, -1)  # [B, Hq, L, D]
    dks = (ds * q6.to(ct)).sum(2).transpose(2, 3).reshape(ks.shape)  # [B, Hkv, S * L, D]
    dvs = (p_s.unsqueeze(-1) * dout6).sum(2).transpose(2, 3).reshape(vs.shape)  # [B, Hkv, S * L, Dv]
    a = torch.exp(lse_c.reshape(row.shape).to(ct) - lse5)  # [B, Hkv, G, L, 1]
    d_out_c = (a.unsqueeze(-1) * dout6).reshape(out_c.shape)  # [B, Hq, L, Dv]
    c_row = (dout6 * out_c.reshape(dout6.shape).to(ct)).sum(-1, keepdim=True)  # [B, Hkv, G, L, 1, 1]
    d_lse_c = (a.unsqueeze(-1) * (c_row - row.unsqueeze(-1))).reshape(lse_c.shape)  # [B, Hq, L]
    return (dq.to(q.dtype).contiguous(), dks.to(ks.dtype).contiguous(), dvs.to(vs.dtype).contiguous(),
            d_out_c.to(out_c.dtype).contiguous(), d_lse_c.to(lse_c.dtype).contiguous())


@torch.library.custom_op("compiled_mask::suffix_merge", mutates_args=())
def _suffix_merge(q: Tensor, ks: Tensor, vs: Tensor, out_c: Tensor, lse_c: Tensor, rounds: Tensor,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Private op: fold the live suffix rounds into the causal part (module docstring).

    Args:
        q: ``[B, Hq, L, D]``; ks, vs: the suffix rounds ``[B, Hkv, S * L, D]`` / ``[.., Dv]``
            (round s + 1 at rows ``[s * L, (s + 1) * L)``), Hq a multiple of Hkv; out_c:
            ``[B, Hq, L, Dv]`` the causal part's normalised output; lse_c: ``[B, Hq, L]`` its
            log-sum-exp (fp32, or fp64 for fp64 inputs; finite: an empty row carries the lowest
            float, not -inf); rounds: 0-d int64, the live rounds counting round 0, clamped by the
            caller to [1, S + 1]; scale: the softmax scale.

    Returns:
        ``(out [B, Hq, L, Dv], lse [B, Hq, L])``, contiguous.
    """
    return _merge_reference(q, ks, vs, out_c, lse_c, rounds, scale)


@_suffix_merge.register_kernel("cuda")
def _(q, ks, vs, out_c, lse_c, rounds, scale):
    from compiled_mask._triton_suffix import merge_forward_triton

    return merge_forward_triton(q, ks, vs, out_c, lse_c, rounds, scale)


@_suffix_merge.register_fake
def _(q, ks, vs, out_c, lse_c, rounds, scale):
    B, Hq, L, _ = q.shape
    return q.new_empty(B, Hq, L, vs.shape[-1]), lse_c.new_empty(B, Hq, L)


@torch.library.custom_op("compiled_mask::suffix_merge_backward", mutates_args=())
def _suffix_merge_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, ks: Tensor, vs: Tensor, out_c: Tensor,
                           lse_c: Tensor, out: Tensor, lse: Tensor, rounds: Tensor, scale: float
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Private op: the backward of :func:`_suffix_merge` (module docstring), ``(dq, dks, dvs,
    d_out_c, d_lse_c)``, each contiguous; ``dlse`` None when the merged lse has no gradient."""
    return _merge_backward_reference(dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, scale)


@_suffix_merge_backward.register_kernel("cuda")
def _(dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, scale):
    from compiled_mask._triton_suffix import merge_backward_triton

    return merge_backward_triton(dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, scale)


@_suffix_merge_backward.register_fake
def _(dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, scale):
    def like(t: Tensor) -> Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(q), like(ks), like(vs), like(out_c), like(lse_c)


def _setup_merge(ctx, inputs, output) -> None:
    q, ks, vs, out_c, lse_c, rounds, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, ks, vs, out_c, lse_c, rounds, out, lse)
    ctx.scale = scale


def _merge_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, ks, vs, out_c, lse_c, rounds, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    grads = _suffix_merge_backward(dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, ctx.scale)
    return (*grads, None, None)


_suffix_merge.register_autograd(_merge_backward, setup_context=_setup_merge)


def suffix_merge(q: Tensor, ks: Tensor, vs: Tensor, out_c: Tensor, lse_c: Tensor, rounds: Tensor,
                 scale: float) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: :func:`_suffix_merge` (differentiable in q, ks, vs, out_c and lse_c)."""
    return _suffix_merge(q, ks, vs, out_c, lse_c, rounds, scale)


def lse_merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two softmax parts over disjoint keys as one, ``(out, lse)`` (torch ops, differentiable);
    out in ``out_a``'s dtype, computed in at least float32."""
    ct = _compute_dtype(out_a.dtype)
    lse = torch.logaddexp(lse_a, lse_b)  # [B, H, L]
    out = (torch.exp(lse_a - lse).unsqueeze(-1) * out_a.to(ct)
           + torch.exp(lse_b - lse).unsqueeze(-1) * out_b.to(ct))  # [B, H, L, Dv]
    return out.to(out_a.dtype), lse
