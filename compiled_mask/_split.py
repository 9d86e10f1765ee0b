"""The "split" backend: a causal flash kernel plus the suffix diagonals, merged by log-sum-exp.

The Eagle3 mask is causal over the first Q_LEN keys plus, for each later round s, the single key
``s * Q_LEN + q`` of query q. A block-sparse kernel pays a whole tile per q-block for each of those
diagonals; here they cost one dot product per (query, round):

    out_c, lse_c = flash_attention(q, k[:Q_LEN], v[:Q_LEN], causal)       # the fast kernel
    score_s[q]   = scale * q . k[s * Q_LEN + q]           for live rounds s, -inf for dead ones
    lse          = logaddexp(lse_c, logsumexp_s score_s)                    # one softmax
    out          = exp(lse_c - lse) * out_c + sum_s exp(score_s - lse) * v[s * Q_LEN + q]

Note [backward through the merge]
    The flash kernel's log-sum-exp has no gradient, so the backward is written out (the identity
    ring attention uses): the flash backward given the *merged* output and *merged* lse returns
    the exact gradients of the causal part, because its probabilities exp(s - lse) and its row term
    D = rowsum(dO * O) are then those of the full softmax. The suffix part is elementwise:
    p = exp(score - lse), dv = p * dO, ds = p * (dO . v - D), dq += scale * ds * k,
    dk = scale * ds * q. Everything is plain tensor math plus the flash forward/backward aten ops,
    so it traces into the compiled graph (one graph for every TTT step: only ``rounds`` changes).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _causal_flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, tuple]:
    """Causal flash attention: ``(out [B, Hq, L, D], lse [B, Hq, L] fp32, saved for backward)``."""
    if q.device.type == "cuda":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, ()


def _causal_flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           saved: tuple, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The flash backward for ``out``/``lse`` (the merged ones: Note [backward through the merge])."""
    if q.device.type == "cuda":
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
        )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, True, scale=scale
    )


def _suffix_views(q: Tensor, k: Tensor, v: Tensor, q_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """q grouped by K/V head, and the suffix rounds of k and v laid out per round."""
    B, Hq, L, D = q.shape
    Hkv, KV = k.shape[1], k.shape[2]
    q5 = q.view(B, Hkv, Hq // Hkv, L, D)  # [B, Hkv, G, L, D]
    k_s = k[:, :, q_len:].view(B, Hkv, KV // q_len - 1, q_len, D)  # [B, Hkv, R-1, L, D]
    v_s = v[:, :, q_len:].view(B, Hkv, KV // q_len - 1, q_len, v.shape[-1])  # [B, Hkv, R-1, L, Dv]
    return q5, k_s, v_s


def _suffix_scores(q5: Tensor, k_s: Tensor, rounds: Tensor, scale: float) -> Tensor:
    """``scale * q . k[s * Q_LEN + q]`` for each round s >= 1, -inf where s >= rounds (dead).

    Returns ``[B, Hkv, G, L, R-1]`` float32.
    """
    scores = torch.einsum("bhgid,bhsid->bhgis", q5.float(), k_s.float()) * scale  # [B, Hkv, G, L, R-1]
    suffix_round = torch.arange(1, k_s.shape[2] + 1, device=scores.device)
    return scores.masked_fill(suffix_round >= rounds, float("-inf"))


class _Eagle3Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, q_len: int, scale: float) -> Tensor:
        B, Hq, L, _ = q.shape
        Hkv = k.shape[1]
        out_c, lse_c, saved = _causal_flash_forward(q, k[:, :, :q_len], v[:, :, :q_len], scale)
        q5, k_s, v_s = _suffix_views(q, k, v, q_len)
        scores = _suffix_scores(q5, k_s, rounds, scale)  # [B, Hkv, G, L, R-1]
        lse_c5 = lse_c.view(B, Hkv, Hq // Hkv, L)  # [B, Hkv, G, L]
        lse = torch.logaddexp(lse_c5, scores.logsumexp(-1))  # [B, Hkv, G, L]
        p_s = torch.exp(scores - lse.unsqueeze(-1))  # [B, Hkv, G, L, R-1]
        out_s = torch.einsum("bhgis,bhsid->bhgid", p_s, v_s.float())  # [B, Hkv, G, L, Dv]
        out5 = torch.exp(lse_c5 - lse).unsqueeze(-1) * out_c.view_as(out_s).float() + out_s
        out = out5.to(q.dtype).view(B, Hq, L, -1)  # [B, Hq, L, Dv]
        lse = lse.view(B, Hq, L)  # [B, Hq, L]
        ctx.save_for_backward(q, k, v, rounds, out, lse, *saved[:2], *saved[4:])
        ctx.flash_ints = saved[2:4]
        ctx.q_len, ctx.scale = q_len, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, rounds, out, lse, *saved_tensors = ctx.saved_tensors
        saved = (*saved_tensors[:2], *ctx.flash_ints, *saved_tensors[2:]) if saved_tensors else ()
        q_len, scale = ctx.q_len, ctx.scale
        B, Hq, L, _ = q.shape
        Hkv = k.shape[1]
        dout = dout.contiguous()
        dq_c, dk_c, dv_c = _causal_flash_backward(
            dout, q, k[:, :, :q_len], v[:, :, :q_len], out, lse, saved, scale
        )
        q5, k_s, v_s = _suffix_views(q, k, v, q_len)
        G = Hq // Hkv
        dout5 = dout.view(B, Hkv, G, L, -1).float()  # [B, Hkv, G, L, Dv]
        row = (dout5 * out.view_as(dout5).float()).sum(-1, keepdim=True)  # D = rowsum(dO * O)
        scores = _suffix_scores(q5, k_s, rounds, scale)
        p_s = torch.exp(scores - lse.view(B, Hkv, G, L, 1))  # [B, Hkv, G, L, R-1]
        dv_s = torch.einsum("bhgis,bhgid->bhsid", p_s, dout5)  # [B, Hkv, R-1, L, Dv]
        dp_s = torch.einsum("bhgid,bhsid->bhgis", dout5, v_s.float())  # [B, Hkv, G, L, R-1]
        ds = p_s * (dp_s - row) * scale  # [B, Hkv, G, L, R-1]
        dq = dq_c.float() + torch.einsum("bhgis,bhsid->bhgid", ds, k_s.float()).reshape(B, Hq, L, -1)
        dk_s = torch.einsum("bhgis,bhgid->bhsid", ds, q5.float())  # [B, Hkv, R-1, L, D]
        dk = torch.cat([dk_c.float(), dk_s.reshape(B, Hkv, -1, k.shape[-1])], dim=2)
        dv = torch.cat([dv_c.float(), dv_s.reshape(B, Hkv, -1, v.shape[-1])], dim=2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


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
