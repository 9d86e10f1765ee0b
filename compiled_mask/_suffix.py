"""The suffix op ``compiled_mask::suffix_attention``: the Eagle3 suffix rounds as a softmax part.

Under the Eagle3 rule query i of round 0 sees, besides its causal keys, exactly one key per live
suffix round s >= 1: key ``s * Q_LEN + i``. Those keys cost one dot product per (query, round):

    score_s = scale * q . k_s[i]     for live suffix rounds, -inf for dead ones
    lse_s   = logsumexp_s score_s                 (the lowest float when no round is live)
    out_s   = sum_s exp(score_s - lse_s) * v_s[i]  (0 when no round is live)

``(out_s, lse_s)`` is a softmax part over disjoint keys. The op ``suffix_attention`` returns it,
in float32 (float64 for float64 inputs), for callers that merge it with other parts by
log-sum-exp and let autograd chain the two (context parallel's causal op, ``_causal.py``; flex's
document part, ``_split.py``): its gradients, which the merge scales per row, lose nothing to
rounding. The split op folds it into the causal part instead (:func:`suffix_forward`).
Backward, for incoming gradients ``dO`` (of out_s) and ``dL`` (of lse_s), with
``D = rowsum(dO * out_s) - dL``:

    p_s = exp(score_s - lse_s),  ds_s = scale * p_s * (dO . v_s[i] - D)
    dq = sum_s ds_s * k_s[i],  dk_s[i] = sum_g ds_s * q,  dv_s[i] = sum_g p_s * dO

The same backward given a merged softmax's out, lse, dO and dL (the suffix keys one part of it)
returns that softmax's gradients through the suffix keys: the split op (``_split.py``) calls it so
(:func:`suffix_backward`), after :func:`suffix_forward` folded the suffix into the causal part.
On CUDA both directions run the Triton kernels of ``_triton_suffix.py``; elsewhere the torch math
below, which is also their reference (held to it on CPU by the Triton interpreter tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from compiled_mask._causal import _merge_reference
from compiled_mask._dtypes import _f32_or_wider

__all__: list[str] = []


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
    """``[B, Hkv, G, L, S]`` scores of the suffix rounds s = 1..S in the compute dtype, -inf for
    dead rounds (s >= rounds)."""
    ct = _f32_or_wider(q6.dtype)
    scores = (q6.to(ct) * k6.to(ct)).sum(-1) * scale  # [B, Hkv, G, L, S]
    live = torch.arange(1, k6.shape[4] + 1, device=scores.device) < rounds  # [S]
    return scores.masked_fill(~live, float("-inf"))


def _suffix_probs(q6: Tensor, k6: Tensor, rounds: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(p [B, Hkv, G, L, S], lse [B, Hkv, G, L])`` of the live suffix rounds, in the compute
    dtype; p is 0 for dead rounds, lse the lowest float where none is live."""
    scores = _suffix_scores(q6, k6, rounds, scale)
    lse = scores.logsumexp(-1).clamp(min=torch.finfo(scores.dtype).min)  # [B, Hkv, G, L]
    return torch.exp(scores - lse.unsqueeze(-1)), lse


def _suffix_reference(q: Tensor, ks: Tensor, vs: Tensor, rounds: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The forward in torch ops: ``(out_s [B, Hq, L, Dv], lse_s [B, Hq, L])``, compute dtype."""
    B, Hq, L, _ = q.shape
    q6, k6, v6 = _suffix_views(q, ks, vs)
    p, lse = _suffix_probs(q6, k6, rounds, scale)  # [B, Hkv, G, L, S], [B, Hkv, G, L]
    out = (p.unsqueeze(-1) * v6.to(p.dtype)).sum(-2)  # [B, Hkv, G, L, Dv]
    return out.reshape(B, Hq, L, -1).contiguous(), lse.reshape(B, Hq, L).contiguous()


def _suffix_backward_reference(dout: Tensor, dlse: Tensor | None, q: Tensor, ks: Tensor, vs: Tensor,
                               out: Tensor, lse: Tensor, rounds: Tensor, scale: float, dq0: Tensor | None = None
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """The backward in torch ops (module docstring): ``(dq, dks, dvs)`` in the inputs' dtypes;
    dead rounds get zero gradients. With ``dq0`` ``[B, Hq, L, D]`` (another part's dq), dq is
    their sum, rounded once."""
    B, Hq, L, _ = q.shape
    Hkv = ks.shape[1]
    q6, k6, v6 = _suffix_views(q, ks, vs)
    ct = _f32_or_wider(q.dtype)
    scores = _suffix_scores(q6, k6, rounds, scale)  # [B, Hkv, G, L, S]
    p = torch.exp(scores - lse.reshape(scores.shape[:-1]).to(ct).unsqueeze(-1))  # the given lse's softmax
    dout6 = dout.reshape(B, Hkv, Hq // Hkv, L, 1, -1).to(ct)  # [B, Hkv, G, L, 1, Dv]
    row = (dout6 * out.reshape(dout6.shape).to(ct)).sum(-1)  # rowsum(dO * O): [B, Hkv, G, L, 1]
    if dlse is not None:
        row = row - dlse.reshape(row.shape).to(ct)
    dp = (dout6 * v6.to(ct)).sum(-1)  # dO . v: [B, Hkv, G, L, S]
    ds = (p * (dp - row) * scale).unsqueeze(-1)  # [B, Hkv, G, L, S, 1]
    dq = (ds * k6.to(ct)).sum(-2).reshape(B, Hq, L, -1)  # [B, Hq, L, D]
    if dq0 is not None:
        dq = dq + dq0.to(ct)
    dks = (ds * q6.to(ct)).sum(2).transpose(2, 3).reshape(ks.shape)  # [B, Hkv, S * L, D]
    dvs = (p.unsqueeze(-1) * dout6).sum(2).transpose(2, 3).reshape(vs.shape)  # [B, Hkv, S * L, Dv]
    return dq.to(q.dtype).contiguous(), dks.to(ks.dtype).contiguous(), dvs.to(vs.dtype).contiguous()


def _suffix_merge_reference(q: Tensor, ks: Tensor, vs: Tensor, rounds: Tensor, scale: float, out_c: Tensor,
                            lse_c: Tensor) -> tuple[Tensor, Tensor]:
    """The suffix part merged into the part ``(out_c, lse_c)`` over other keys (torch ops):
    ``(out in out_c's dtype, lse)``."""
    return _merge_reference(out_c, lse_c, *_suffix_reference(q, ks, vs, rounds, scale), out_c.dtype)


def _suffix_kernels(q: Tensor) -> bool:
    """The Triton kernels run on CUDA without float64 (they keep float32 state)."""
    return q.is_cuda and q.dtype != torch.float64


def suffix_forward(q: Tensor, ks: Tensor, vs: Tensor, rounds: Tensor, scale: float,
                   part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`_suffix_merge_reference` on real tensors, in one Triton kernel on CUDA (Note [a part
    folded in] in ``_triton_suffix.py``)."""
    if _suffix_kernels(q):
        from compiled_mask._triton_suffix import suffix_forward_triton

        return suffix_forward_triton(q, ks, vs, rounds, scale, part=part)
    return _suffix_merge_reference(q, ks, vs, rounds, scale, *part)


def suffix_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, ks: Tensor, vs: Tensor, out: Tensor, lse: Tensor,
                    rounds: Tensor, scale: float, dq0: Tensor, dks: Tensor, dvs: Tensor) -> Tensor:
    """The suffix part's gradients within a merged softmax ``(out, lse)`` (Note [the suffix first]
    in ``_causal.py``: given the merged output, lse, dO and dL, the part's backward is exact) on
    real tensors: returns ``dq0`` plus the part's dq; writes dks and dvs in place."""
    if _suffix_kernels(q):
        from compiled_mask._triton_suffix import suffix_backward_triton

        return suffix_backward_triton(dout, dlse, q, ks, vs, out, lse, rounds, scale, dq0=dq0, dks=dks, dvs=dvs)[0]
    dq, dks_s, dvs_s = _suffix_backward_reference(dout, dlse, q, ks, vs, out, lse, rounds, scale, dq0=dq0)
    dks.copy_(dks_s)
    dvs.copy_(dvs_s)
    return dq


@torch.library.custom_op("compiled_mask::suffix_attention", mutates_args=())
def _suffix_attention(q: Tensor, ks: Tensor, vs: Tensor, rounds: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Private op: the live suffix rounds as a softmax part (module docstring).

    Args:
        q: ``[B, Hq, L, D]``; ks, vs: the suffix rounds ``[B, Hkv, S * L, D]`` / ``[.., Dv]``
            (round s + 1 at rows ``[s * L, (s + 1) * L)``), Hq a multiple of Hkv; rounds: 0-d
            int64, the live rounds counting round 0, clamped by the caller to [1, S + 1]
            (``_checks._live_rounds``); scale: the softmax scale.

    Returns:
        ``(out_s [B, Hq, L, Dv], lse_s [B, Hq, L])``, contiguous, float32 (float64 for float64).
    """
    return _suffix_reference(q, ks, vs, rounds, scale)


@_suffix_attention.register_kernel("cuda")
def _(q, ks, vs, rounds, scale):
    from compiled_mask._triton_suffix import suffix_forward_triton

    return suffix_forward_triton(q, ks, vs, rounds, scale)


@_suffix_attention.register_fake
def _(q, ks, vs, rounds, scale):
    B, Hq, L, _ = q.shape
    ct = _f32_or_wider(q.dtype)
    return q.new_empty(B, Hq, L, vs.shape[-1], dtype=ct), q.new_empty(B, Hq, L, dtype=ct)


@torch.library.custom_op("compiled_mask::suffix_attention_backward", mutates_args=())
def _suffix_attention_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, ks: Tensor, vs: Tensor, out: Tensor,
                               lse: Tensor, rounds: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Private op: the backward of :func:`_suffix_attention` (module docstring), ``(dq, dks,
    dvs)``, contiguous; ``dlse`` None when lse_s has no gradient."""
    return _suffix_backward_reference(dout, dlse, q, ks, vs, out, lse, rounds, scale)


@_suffix_attention_backward.register_kernel("cuda")
def _(dout, dlse, q, ks, vs, out, lse, rounds, scale):
    from compiled_mask._triton_suffix import suffix_backward_triton

    return suffix_backward_triton(dout, dlse, q, ks, vs, out, lse, rounds, scale)


@_suffix_attention_backward.register_fake
def _(dout, dlse, q, ks, vs, out, lse, rounds, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, ks, vs))


def _setup_suffix(ctx, inputs, output) -> None:
    q, ks, vs, rounds, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, ks, vs, rounds, out, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # an unread lse_s gets None, not zeros


def _suffix_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, ks, vs, rounds, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dks, dvs = _suffix_attention_backward(dout, dlse, q, ks, vs, out, lse, rounds, ctx.scale)
    return dq, dks, dvs, None, None


_suffix_attention.register_autograd(_suffix_backward, setup_context=_setup_suffix)


def suffix_attention(q: Tensor, ks: Tensor, vs: Tensor, rounds: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(out_s, lse_s)``: :func:`_suffix_attention` (differentiable in q, ks, vs)."""
    return _suffix_attention(q, ks, vs, rounds, scale)
