"""The draft's LM head and its loss, fused and chunked: no ``[rows, V]`` tensor beyond one chunk.

:func:`head_loss` is what one TTT step of :class:`~compiled_mask.draft.Eagle3Model` computes after
its decoder layer, ``lm_head(norm(hidden))`` followed by the masked cross entropy against the
target and the top-1 agreement, without ever holding the ``[B, R, V]`` logits or log-probabilities
(V = draft vocabulary, 32000 for Llama 3 drafts). At long context those, saved by autograd for the
backward, are most of a step's memory (DESIGN.md, "The draft step's memory").

The unfused math it matches is :func:`_head_loss_reference` (plain autograd, the tests' ground
truth). The work is done by the private custom op ``compiled_mask::head_loss``
(:func:`_head_loss`), with a fake and a registered autograd formula beside it, so that
``torch.compile(..., fullgraph=True)`` sees one opaque node.

Note [gradients in the forward]
    As in Liger's chunked distillation losses, the loss is a scalar, so its gradient with respect
    to every input is known in the forward up to one factor, the incoming gradient of the loss.
    The op computes, chunk of rows by chunk of rows, the loss *and* the gradients of the hidden
    states, the norm weight and the head weight, and keeps only those (``[B, R, H]``, ``[H]``,
    ``[V, H]``: the sizes of its inputs); the backward multiplies them by the incoming gradient.
    Nothing ``[rows, V]`` outlives its chunk, and the backward (by default) recomputes nothing.
    The cost is the gradient work done even for a loss that is never backpropagated: the public
    function passes the op which gradients are needed (``requires_grad`` and grad mode), so a
    forward under ``torch.no_grad()`` computes the loss alone. ``hit_sum`` has no gradient, and
    no gradient flows into any form of the target (probabilities, ids, target logits, the
    target's hidden state or lm_head rows): they are data, as in today's trainers.

    Held from the forward to the backward, those gradients cost memory: per call ``[B, R, H]``
    and ``[V, H]`` (a TTT step of an 8B-sized draft at 32768 tokens: 0.5 GiB in bf16, 3.4 GiB
    over 7 steps). With ``recompute=True`` the op keeps its inputs instead (the hidden states, a
    view of what the next TTT step keeps anyway, and the target, an input of the whole step) and
    its backward runs the same chunk loop again, now with the gradients: one more head matmul
    per chunk, and bit for bit the same gradients. (Eagle3Model does not ask for it yet: on CPU
    with Inductor it raised the staged policy's peak, docs/benchmarks.md, 2026-12-07.) The
    gradients are constants to autograd either way, so there is no double backward
    (``create_graph=True`` is refused).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from compiled_mask._dtypes import _f32_or_wider

__all__ = ["TargetHead", "TargetLogits", "head_loss"]


class TargetLogits(NamedTuple):
    """The target model's logits over the draft vocabulary (a soft target).

    Attributes:
        logits: ``[B, R, V]``, any float dtype. The probabilities are their softmax, computed
            per chunk of rows in float32 (float64 for float64 logits), never stored whole.
    """

    logits: Tensor


class TargetHead(NamedTuple):
    """The target's last hidden state and its lm_head rows for the draft vocabulary.

    The most compact soft target: ``[B, R, Ht]`` instead of ``[B, R, V]``. The teacher logits
    ``F.linear(hidden, weight)`` are computed per chunk of rows, then softmax as
    :class:`TargetLogits`.

    Attributes:
        hidden: ``[B, R, Ht]``, the target's last hidden state, already after its final norm.
        weight: ``[V, Ht]``, the rows of the target's lm_head for the draft vocabulary (row i:
            draft id i), in ``hidden``'s dtype.
    """

    hidden: Tensor
    weight: Tensor


# Note [chunk size]
#     One chunk of ``rows`` rows holds a few ``[rows, V]`` buffers at once. In the torch form
#     (CPU): the draft logits (the parameter dtype), the same in float32, which becomes the
#     softmax and then the logits' gradient in place, and the target's probabilities (float32):
#     about three float32 buffers at the peak, so the default there is the largest power of two
#     of rows with ``rows * V <= 2**26`` elements, ~0.8 GiB for the chunk (V = 32000: 2048 rows).
#     The CUDA kernel (Note [few passes over a chunk]) holds only the draft logits, overwritten
#     by their gradient, and, for a teacher head, the teacher logits: two bf16 buffers, so there
#     the default is ``rows * V <= 2**28`` (V = 32000: 8192 rows, ~1 GiB in bf16). Both are small
#     next to the ``[R, V]`` they replace at long context (128K rows: 16 GiB per float32 buffer).
#     Large chunks matter on a GPU: every chunk after the first adds its ``[V, H]`` head-weight
#     gradient into a float32 accumulator (~2.6 GB of memory traffic at V = 32000, H = 4096),
#     and a chunk's ~20 kernels are launched per chunk (with 256-row chunks the op was bound by
#     launches on an H100, docs/benchmarks.md, 2026-12-06); at 8192 tokens a step is one chunk.
#     A power of two keeps the rows a multiple of the tensor core tiles. The default depends on
#     V and the device only (not on R), so a compiled caller gets no guard on R; the op clamps
#     it to R.
#
# Note [few passes over a chunk]
#     Each chunk's ``[rows, V]`` work past the matmuls is memory-bound, so it reads and writes
#     those buffers as few times as it can. On CUDA one Triton kernel (``_triton_loss.py``) reads
#     the draft logits and the target's row twice: once for the running maxima, sums and the
#     soft cross entropy ``lse * sum(p) - p . z``, once to write the logits' gradient over the
#     logits. The torch form (:func:`_xent_rows_torch`, CPU and float64) turns a float32 copy of
#     the logits in place into the softmax and then the gradient, with the same cross entropy as
#     one reduction and one batched dot product (no log-probability buffer).
_CHUNK_ELEMENTS = 2**26  # the torch form (CPU)
_CUDA_CHUNK_ELEMENTS = 2**28  # the Triton kernel (CUDA)


def _default_chunk_rows(V: int, device: torch.device) -> int:
    """Rows per chunk for vocabulary size V on ``device`` (Note [chunk size])."""
    elements = _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CHUNK_ELEMENTS
    return 1 << (max(1, elements // max(V, 1)).bit_length() - 1)


def _loss_dtype(head_dtype: torch.dtype, target_kind: str, target_dtype: torch.dtype) -> torch.dtype:
    """dtype of the loss: the draft's log-probabilities' (``_f32_or_wider`` of the head), widened
    by a soft target's probabilities (its own ``_f32_or_wider``), as ``-(p * logp)`` promotes."""
    dtype = _f32_or_wider(head_dtype)
    if target_kind == "ids":
        return dtype
    return torch.promote_types(dtype, _f32_or_wider(target_dtype))


_TARGET_KINDS = ("probs", "ids", "logits", "head")


# Note [rows that do not count]
#     A row that does not count (``counted`` False, or an int target < 0) must not change the
#     loss or any gradient, even when its hidden state or target holds NaN or inf (padding of a
#     batch, rows past the end of a sequence). A weight of 0 is not enough: 0 * NaN = NaN, in
#     the loss and also inside the weight-gradient matmuls, which sum over rows. So such rows are
#     replaced by zeros (``torch.where``) as soon as a chunk reads them, in the hidden states and
#     in every target form, and their normalised states, loss terms and hidden-state gradients
#     are zeroed too (with ``eps = 0`` a zero row normalises to NaN): the result is bit for bit
#     the one for zeros there (tests/test_loss.py checks it).


def _xent_rows_torch(z: Tensor, kind: str, target: Tensor, counted: Tensor, grad: bool
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The cross entropy of a chunk of draft logits against its target, row by row, in torch ops
    (the CPU form, and the reference of ``_triton_loss.xent_rows_triton``, the CUDA form).

    Args:
        z: ``[n, V]`` the draft logits, in the parameter dtype.
        kind: "probs" (``target`` ``[n, V]`` float probabilities, as given), "logits"
            (``target`` ``[n, V]`` float target or teacher logits: their softmax) or "ids"
            (``target`` ``[n]`` int ids; one outside ``[0, V)`` does not count).
        counted: ``[n]`` bool, the rows that count; the others may hold anything in ``target``
            (NaN included) and change nothing (Note [rows that do not count]).
        grad: also return the gradient of the summed loss with respect to ``z``.

    Returns:
        ``(nll, hit, d_z)``: ``nll`` ``[n]`` the loss per row in float32 or wider, 0 where the
        row does not count; ``hit`` ``[n]`` bool, the row counts and the argmax of ``z`` is the
        target's id or argmax; ``d_z`` ``[n, V]`` in ``z``'s dtype (may be ``z`` itself,
        overwritten), finite but unspecified in rows that do not count, or None without
        ``grad``.
    """
    V = z.shape[-1]
    if kind == "ids":
        counted = counted & (target >= 0) & (target < V)
        p, target_id = None, torch.where(counted, target, 0)
    else:
        rows = torch.where(counted[:, None], target, 0)  # [n, V]
        if kind == "probs":
            p = rows.to(_f32_or_wider(rows.dtype))
            target_id = p.argmax(-1)
        else:
            target_id = rows.argmax(-1)
            p = torch.softmax(rows, -1, dtype=_f32_or_wider(rows.dtype))
    hit = (z.argmax(-1) == target_id) & counted
    # Note [few passes over a chunk]
    z_dtype = _f32_or_wider(z.dtype) if p is None else torch.promote_types(_f32_or_wider(z.dtype), p.dtype)
    zf = z.to(z_dtype)  # [n, V]
    lse = torch.logsumexp(zf, -1)  # [n]
    if p is None:
        nll = lse - zf.gather(-1, target_id[:, None]).squeeze(-1)  # [n]
    else:  # -(p . log_softmax(z)) = lse * sum(p) - p . z
        p_sum = p.sum(-1)  # [n]
        nll = lse * p_sum - torch.bmm(p.to(z_dtype).unsqueeze(1), zf.unsqueeze(2)).view(-1)
    nll = torch.where(counted, nll, 0)
    if not grad:
        return nll, hit, None
    # d nll / d z: softmax * sum(p) - p (soft), softmax - onehot (ids); in place in zf.
    d_z = zf.sub_(lse[:, None]).exp_()  # [n, V], the softmax
    if p is None:
        d_z.scatter_add_(-1, target_id[:, None], d_z.new_full((z.shape[0], 1), -1.0))
    else:
        d_z.mul_(p_sum[:, None]).sub_(p)
    return nll, hit, d_z.to(z.dtype)  # as autograd casts


def _triton_rows(x: Tensor, *dtypes: torch.dtype) -> bool:
    """Whether a chunk's row kernels run in Triton (``_triton_loss.py``): on CUDA, with no
    float64 among ``x`` and ``dtypes`` (the kernels keep float32 state)."""
    return x.is_cuda and torch.float64 not in (x.dtype, *dtypes)


def _xent_rows(z: Tensor, kind: str, target: Tensor, counted: Tensor, grad: bool
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`_xent_rows_torch`, or on CUDA, without float64, its Triton kernel."""
    if _triton_rows(z, target.dtype):
        from compiled_mask.draft._triton_loss import xent_rows_triton

        return xent_rows_triton(z, kind, target, counted, grad)
    return _xent_rows_torch(z, kind, target, counted, grad)


def _rms_norm_rows_torch(x: Tensor, counted: Tensor, weight: Tensor, eps: float, dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor]:
    """The final RMSNorm of a chunk's rows, as ``_RMSNorm`` in ``model.py``, in torch ops (the CPU
    form, and the reference of ``_triton_loss.rms_norm_rows_triton``, the CUDA form).

    Args:
        x: ``[n, H]`` hidden states, any strides; counted: ``[n]`` bool, the rows that count
            (the others read as zeros and normalise to zeros, Note [rows that do not count]);
        weight: ``[H]``; eps: the epsilon; dtype: the parameters' dtype, that of the result.

    Returns:
        ``(normed [n, H] in dtype, inv [n])``: ``weight * (x * inv)`` with ``x * inv`` rounded to
        x's dtype, and ``inv = rsqrt(mean(x^2) + eps)`` in float32 (float64 for float64 x),
        unspecified in rows that do not count.
    """
    c_col = counted[:, None]  # [n, 1]
    x32 = torch.where(c_col, x, 0).to(_f32_or_wider(x.dtype))  # [n, H]
    inv = torch.rsqrt(x32.pow(2).mean(-1) + eps)  # [n]
    xhat = torch.where(c_col, (x32 * inv[:, None]).to(x.dtype), 0)  # [n, H]; eps = 0: 0 * inf there
    return (weight * xhat).to(dtype), inv


def _rms_norm_rows_backward_torch(d_normed: Tensor, x: Tensor, inv: Tensor, counted: Tensor, weight: Tensor,
                                  d_x: Tensor | None, grad_weight: bool) -> Tensor | None:
    """The backward of :func:`_rms_norm_rows_torch` (same x, inv, counted, weight) for
    ``d_normed`` ``[n, H]``: writes the hidden states' gradient into ``d_x`` ``[n, H]`` when given
    (zeros in rows that do not count) and returns the weight's ``[H]`` in float32 (or wider) when
    ``grad_weight``, else None."""
    c_col = counted[:, None]  # [n, 1]
    ct = inv.dtype
    x32 = torch.where(c_col, x, 0).to(ct)  # [n, H]
    d_weight = None
    if grad_weight:
        wt = _f32_or_wider(weight.dtype)
        xhat = torch.where(c_col, (x32 * inv[:, None]).to(x.dtype), 0)  # [n, H]
        d_weight = (d_normed.to(wt) * xhat.to(wt)).sum(0)  # [H]
    if d_x is not None:
        d_y = (d_normed * weight).to(d_normed.dtype).to(x.dtype).to(ct)  # [n, H], d (x * inv)
        # y = x * inv with inv = (mean(x**2) + eps) ** -1/2: dx = inv * dy - x * inv**3 * mean(dy * x).
        inv_col = inv[:, None]
        d_x32 = inv_col * d_y - x32 * inv_col.pow(3) * (d_y * x32).mean(-1, keepdim=True)  # [n, H]
        d_x.copy_(torch.where(c_col, d_x32, 0))
    return d_weight


def _rms_norm_rows(x: Tensor, counted: Tensor, weight: Tensor, eps: float, dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor]:
    """:func:`_rms_norm_rows_torch`, or on CUDA its Triton kernel."""
    if _triton_rows(x, weight.dtype, dtype):
        from compiled_mask.draft._triton_loss import rms_norm_rows_triton

        return rms_norm_rows_triton(x, counted, weight, eps, dtype)
    return _rms_norm_rows_torch(x, counted, weight, eps, dtype)


def _rms_norm_rows_backward(d_normed: Tensor, x: Tensor, inv: Tensor, counted: Tensor, weight: Tensor,
                            d_x: Tensor | None, grad_weight: bool) -> Tensor | None:
    """:func:`_rms_norm_rows_backward_torch`, or on CUDA its Triton kernel."""
    if _triton_rows(x, weight.dtype, d_normed.dtype):
        from compiled_mask.draft._triton_loss import rms_norm_rows_backward_triton

        return rms_norm_rows_backward_triton(d_normed, x, inv, counted, weight, d_x, grad_weight)
    return _rms_norm_rows_backward_torch(d_normed, x, inv, counted, weight, d_x, grad_weight)


def _head_loss_chunks(hidden: Tensor, norm_weight: Tensor, head_weight: Tensor, target: Tensor,
                      target_weight: Tensor | None, counted: Tensor, target_kind: str, eps: float,
                      chunk_rows: int, grad_hidden: bool, grad_norm_weight: bool,
                      grad_head_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The body of :func:`_head_loss`: the loop over chunks of rows (arguments as there)."""
    B, R, H = hidden.shape
    V = head_weight.shape[0]
    param_dtype = head_weight.dtype
    loss_dtype = _loss_dtype(param_dtype, target_kind, target.dtype)
    grad_normed = grad_hidden or grad_norm_weight
    grad_any = grad_normed or grad_head_weight
    device = hidden.device
    nll_sum = torch.zeros((), dtype=loss_dtype, device=device)
    hit_sum = torch.zeros((), dtype=loss_dtype, device=device)
    d_hidden = hidden.new_empty((B, R, H) if grad_hidden else (0,))  # every row written below
    # float32 (or float64) accumulators over chunks, stored in the parameters' dtypes at the end.
    # Each chunk's weight gradient is one matmul in the parameters' dtype (bf16: float32
    # accumulation inside it, rounded to bf16 once at its end), then added here: the rounding of
    # an unfused bf16 matmul over all rows, once per chunk.
    d_norm_acc = torch.zeros(H, dtype=_f32_or_wider(norm_weight.dtype), device=device) if grad_norm_weight else None
    d_head_acc = None  # the first chunk's matmul, then its float32 (or wider) sum with the others
    acc_dtype = _f32_or_wider(param_dtype)
    rows = max(1, min(chunk_rows, R))
    kind = "logits" if target_kind == "head" else target_kind  # _xent_rows's: teacher logits are logits
    for b in range(B):
        for r0 in range(0, R, rows):
            r1 = min(r0 + rows, R)
            c = counted[b, r0:r1]  # [n]
            t = target[b, r0:r1]  # [n, V], [n] ids or [n, Ht]
            if target_kind == "ids":
                c = c & (t >= 0) & (t < V)  # ids outside the draft vocabulary do not count (see head_loss)
            elif target_kind == "head":  # the teacher logits [n, V], from zeros where c is False
                t = F.linear(torch.where(c[:, None], t, 0), target_weight)
            x = hidden[b, r0:r1]  # [n, H]
            normed, inv = _rms_norm_rows(x, c, norm_weight, eps, param_dtype)  # [n, H], [n]
            logits = F.linear(normed, head_weight)  # [n, V]
            nll, hit, d_logits = _xent_rows(logits, kind, t, c, grad_any)
            del logits
            nll_sum += nll.sum().to(loss_dtype)
            hit_sum += hit.sum().to(loss_dtype)
            if not grad_any:
                continue
            # Rows that do not count need no mask here: their normed rows are zeros, so they add
            # nothing to d_head_weight; the norm's backward zeroes their other gradients.
            if grad_head_weight:
                d_head_chunk = d_logits.T @ normed  # [V, H], the parameter dtype
                if d_head_acc is None:  # the first chunk: kept as it is (one chunk: no float32 copy)
                    d_head_acc = d_head_chunk
                else:
                    d_head_acc = d_head_acc.to(acc_dtype)  # a no-op once summing (or for float32)
                    d_head_acc += d_head_chunk
            if not grad_normed:
                continue
            d_normed = d_logits @ head_weight  # [n, H]
            del d_logits
            d_norm_chunk = _rms_norm_rows_backward(d_normed, x, inv, c, norm_weight,
                                                   d_hidden[b, r0:r1] if grad_hidden else None, grad_norm_weight)
            if grad_norm_weight:
                d_norm_acc += d_norm_chunk
    d_norm = d_norm_acc.to(norm_weight.dtype) if grad_norm_weight else norm_weight.new_empty((0,))
    if not grad_head_weight:
        d_head = head_weight.new_empty((0,))
    elif d_head_acc is None:  # no rows at all
        d_head = torch.zeros_like(head_weight, memory_format=torch.contiguous_format)
    else:
        d_head = d_head_acc.to(param_dtype)
    return nll_sum, hit_sum, d_hidden, d_norm, d_head


@torch.library.custom_op("compiled_mask::head_loss", mutates_args=())
def _head_loss(hidden: Tensor, norm_weight: Tensor, head_weight: Tensor, target: Tensor,
               target_weight: Tensor | None, counted: Tensor, target_kind: str, eps: float,
               chunk_rows: int, grad_hidden: bool, grad_norm_weight: bool, grad_head_weight: bool,
               recompute: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused RMSNorm + LM head + masked cross entropy, chunked over rows (private; arguments are
    unchecked: call :func:`head_loss`).

    Args:
        hidden: ``[B, R, H]`` pre-norm draft hidden states, any strides.
        norm_weight: ``[H]``; head_weight: ``[V, H]``.
        target: by ``target_kind``: "probs" ``[B, R, V]`` float probabilities, "ids" ``[B, R]``
            int draft ids (< 0: the row does not count), "logits" ``[B, R, V]`` target logits,
            "head" ``[B, R, Ht]`` the target's last hidden state.
        target_weight: ``[V, Ht]`` for "head" (teacher logits ``F.linear(target, target_weight)``),
            else None.
        counted: ``[B, R]`` bool, the rows that count.
        target_kind: "probs", "ids", "logits" or "head".
        eps: RMSNorm epsilon.
        chunk_rows: rows per chunk (>= 1; clamped to R).
        grad_hidden, grad_norm_weight, grad_head_weight: which gradients the backward returns.
        recompute: compute them in the backward, not here (Note [gradients in the forward]).

    Returns:
        ``(nll_sum, hit_sum, d_hidden, d_norm_weight, d_head_weight)``: the two 0-d sums in the
        loss dtype, and the gradients of ``nll_sum`` (Note [gradients in the forward]) in their
        inputs' dtypes, contiguous, or empty ``[0]`` tensors for those not asked for (all three
        with ``recompute``).
    """
    if recompute:  # the backward computes them
        grad_hidden = grad_norm_weight = grad_head_weight = False
    return _head_loss_chunks(hidden, norm_weight, head_weight, target, target_weight, counted,
                             target_kind, eps, chunk_rows, grad_hidden, grad_norm_weight, grad_head_weight)


@_head_loss.register_fake
def _head_loss_fake(hidden, norm_weight, head_weight, target, target_weight, counted, target_kind,
                    eps, chunk_rows, grad_hidden, grad_norm_weight, grad_head_weight, recompute):
    if recompute:
        grad_hidden = grad_norm_weight = grad_head_weight = False
    loss_dtype = _loss_dtype(head_weight.dtype, target_kind, target.dtype)
    nll_sum = hidden.new_empty((), dtype=loss_dtype)
    hit_sum = hidden.new_empty((), dtype=loss_dtype)
    d_hidden = hidden.new_empty(hidden.shape if grad_hidden else (0,))  # [B, R, H], contiguous
    d_norm = norm_weight.new_empty(norm_weight.shape if grad_norm_weight else (0,))  # [H]
    d_head = head_weight.new_empty(head_weight.shape if grad_head_weight else (0,))  # [V, H]
    return nll_sum, hit_sum, d_hidden, d_norm, d_head


def _head_loss_setup_context(ctx, inputs, output) -> None:
    _, hit_sum, d_hidden, d_norm, d_head = output
    ctx.recompute = inputs[-1]
    if ctx.recompute:  # the tensor inputs, the others as they are
        ctx.save_for_backward(*inputs[:6])
        ctx.args = inputs[6:-1]
    else:
        ctx.save_for_backward(d_hidden, d_norm, d_head)
    ctx.computed = inputs[9:12]  # grad_hidden, grad_norm_weight, grad_head_weight
    ctx.mark_non_differentiable(hit_sum, d_hidden, d_norm, d_head)


def _head_loss_backward(ctx, grad_nll, grad_hit, grad_d_hidden, grad_d_norm, grad_d_head):
    """The gradients computed in the forward (or now, with ``recompute``) times the incoming
    gradient of ``nll_sum``; nothing for the target, the mask or the non-tensor arguments (Note
    [gradients in the forward])."""
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise RuntimeError("head_loss has no double backward (create_graph=True): its gradients are computed "
                           "as constants (Note [gradients in the forward] in compiled_mask/draft/loss.py), so "
                           "their own gradients would be silently wrong.")
    grads = ctx.saved_tensors
    if ctx.recompute:
        grads = _head_loss(*grads, *ctx.args, False)[2:]
    grads = tuple(g * grad_nll if computed else None for g, computed in zip(grads, ctx.computed))
    return (*grads, None, None, None, None, None, None, None, None, None, None)


_head_loss.register_autograd(_head_loss_backward, setup_context=_head_loss_setup_context)


def head_loss(hidden: Tensor, norm_weight: Tensor, head_weight: Tensor,
              target: Tensor | TargetLogits | TargetHead, counted: Tensor, *, eps: float,
              chunk_rows: int | None = None, recompute: bool = False) -> tuple[Tensor, Tensor]:
    """``lm_head(norm(hidden))``, its cross entropy against ``target`` and its top-1 hits, summed
    over the counted rows, without ever holding ``[rows, V]`` beyond one chunk of rows.

    Per row, exactly the unfused math of :func:`_head_loss_reference`: RMSNorm (statistics in
    float32, float64 for float64 inputs), ``logits = F.linear(normed, head_weight)`` in the
    parameters' dtype, ``logp = log_softmax`` in float32 (float64 for float64), and ``nll =
    -(p * logp).sum()`` for a soft target ``p`` (probabilities as given, not renormalised;
    ``softmax`` of target logits or of teacher logits), ``-logp[id]`` for an id. A row hits when
    the argmax of the draft logits equals the id, or the argmax of the probabilities / target
    logits / teacher logits.

    The forward computes the gradients too and saves only them (Note [gradients in the
    forward]); gradients flow into ``hidden``, ``norm_weight`` and ``head_weight`` (those that
    require grad), never into the target (the weight gradients: the head's per chunk in the
    parameters' dtype, the norm's per chunk in float32, summed over chunks in float32 or wider),
    and ``hit_sum`` has none. Rows that do not count
    change nothing, even when they hold NaN or inf (Note [rows that do not count]). One opaque
    op: ``torch.compile(..., fullgraph=True)`` traces it with no graph break.

    Args:
        hidden: ``[B, R, H]`` pre-norm draft hidden states, any float dtype and any strides
            (e.g. the view ``h[:, :T - s]``).
        norm_weight: ``[H]`` the draft's final RMSNorm weight.
        head_weight: ``[V, H]`` the draft's lm_head weight (V: draft vocabulary). Its dtype is the
            parameter dtype, the one ``norm_weight * normed(hidden)`` must promote to.
        target: one of
            - a float tensor ``[B, R, V]`` of probabilities, any float dtype (need not sum to 1);
            - an int tensor ``[B, R]`` of draft-vocabulary ids, -1 for a token outside the draft
              vocabulary: such a row does not count, and neither does any id outside ``[0, V)``
              (checking them would read the data, a device sync);
            - :class:`TargetLogits` ``[B, R, V]``;
            - :class:`TargetHead` ``[B, R, Ht]`` and ``[V, Ht]``.
        counted: ``[B, R]`` bool, the rows whose loss and hit count (e.g. the loss mask).
        eps: the RMSNorm epsilon (finite, >= 0).
        chunk_rows: rows per chunk; default: ``rows * V <= 2**26`` elements, a power of two
            (Note [chunk size]).
        recompute: compute the gradients in the backward, from the inputs, instead of in the
            forward: nothing ``[B, R, H]`` or ``[V, H]`` is held between them, for one more pass
            over the chunks (the same numbers, bit for bit; Note [gradients in the forward]).

    Returns:
        ``(nll_sum, hit_sum)``, 0-d tensors in the loss dtype: float32, or float64 when the head
        or a soft target is float64. Divide by the number of counted rows for a mean.

    Raises:
        ValueError: a shape, dtype or device that does not fit, ``chunk_rows < 1`` or a bad
            ``eps``.

    Example::

        >>> B, R, H, V = 2, 10, 16, 50
        >>> hidden = torch.randn(B, R, H, requires_grad=True)
        >>> norm_weight, head_weight = torch.ones(H), torch.randn(V, H, requires_grad=True)
        >>> ids = torch.randint(V, (B, R))
        >>> counted = torch.ones(B, R, dtype=torch.bool)
        >>> nll_sum, hit_sum = head_loss(hidden, norm_weight, head_weight, ids, counted, eps=1e-5)
        >>> (nll_sum / counted.sum()).backward()
        >>> hidden.grad.shape, head_weight.grad.shape, norm_weight.grad is None
        (torch.Size([2, 10, 16]), torch.Size([50, 16]), True)
        >>> probs = torch.softmax(torch.randn(B, R, V), -1).bfloat16()  # a compact soft target
        >>> head_loss(hidden, norm_weight, head_weight, probs, counted, eps=1e-5)[0].dtype
        torch.float32
    """
    target_kind, target_t, target_weight = _check_head_loss_args(
        hidden, norm_weight, head_weight, target, counted, eps, chunk_rows)
    if not isinstance(recompute, bool):
        raise ValueError(f"head_loss: recompute must be True or False, got recompute={recompute!r}.")
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(head_weight.shape[0], hidden.device)
    grad_on = torch.is_grad_enabled()
    nll_sum, hit_sum, *_ = _head_loss(
        hidden, norm_weight, head_weight, target_t, target_weight, counted, target_kind, float(eps),
        chunk_rows, grad_on and hidden.requires_grad, grad_on and norm_weight.requires_grad,
        grad_on and head_weight.requires_grad, recompute,
    )
    return nll_sum, hit_sum


def _check_head_loss_args(hidden, norm_weight, head_weight, target, counted, eps, chunk_rows
                          ) -> tuple[str, Tensor, Tensor | None]:
    """Validate :func:`head_loss`'s arguments (shapes, dtypes, devices and ints only: no data
    read, so no device sync and no data-dependent guard); returns ``(target_kind, target tensor,
    target weight or None)``."""
    where = "head_loss"
    for name, t in (("hidden", hidden), ("norm_weight", norm_weight), ("head_weight", head_weight),
                    ("counted", counted)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}: {name} must be a Tensor, got {type(t).__name__}.")
    if hidden.dim() != 3:
        raise ValueError(f"{where}: hidden must be [B, R, H], got shape {tuple(hidden.shape)}.")
    B, R, H = hidden.shape
    if head_weight.dim() != 2 or head_weight.shape[1] != H or head_weight.shape[0] < 1 or H < 1:
        raise ValueError(
            f"{where}: head_weight must be [V, H] with V >= 1 and H = {H} (from hidden), got shape "
            f"{tuple(head_weight.shape)}. Pass the draft's lm_head.weight."
        )
    V = head_weight.shape[0]
    if norm_weight.shape != (H,):
        raise ValueError(
            f"{where}: norm_weight must be [H] = [{H}] (from hidden), got shape "
            f"{tuple(norm_weight.shape)}. Pass the draft's final norm weight."
        )
    for name, t in (("hidden", hidden), ("norm_weight", norm_weight), ("head_weight", head_weight)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{where}: {name} must be floating point, got dtype {t.dtype}.")
    normed_dtype = torch.promote_types(hidden.dtype, norm_weight.dtype)
    if normed_dtype != head_weight.dtype:
        raise ValueError(
            f"{where}: norm_weight * normed(hidden) is {normed_dtype} (hidden {hidden.dtype}, "
            f"norm_weight {norm_weight.dtype}) but head_weight is {head_weight.dtype}; F.linear "
            f"needs them equal. Cast hidden and the weights to one dtype."
        )
    if counted.shape != (B, R) or counted.dtype != torch.bool:
        raise ValueError(
            f"{where}: counted must be a [B, R] = [{B}, {R}] bool tensor, got shape "
            f"{tuple(counted.shape)} and dtype {counted.dtype}. Pass e.g. loss_mask.bool()."
        )

    target_weight = None
    if isinstance(target, TargetHead):
        target_kind, target_t, target_weight = "head", target.hidden, target.weight
        if not isinstance(target_t, Tensor) or not isinstance(target_weight, Tensor):
            raise ValueError(f"{where}: TargetHead must hold two Tensors (hidden, weight).")
        if target_t.dim() != 3 or target_t.shape[:2] != (B, R):
            raise ValueError(
                f"{where}: TargetHead.hidden must be [B, R, Ht] with B, R = {B}, {R} (from "
                f"hidden), got shape {tuple(target_t.shape)}."
            )
        Ht = target_t.shape[2]
        if target_weight.shape != (V, Ht):
            raise ValueError(
                f"{where}: TargetHead.weight must be [V, Ht] = [{V}, {Ht}] (V from head_weight, "
                f"Ht from TargetHead.hidden), got shape {tuple(target_weight.shape)}. Pass the "
                f"target lm_head's rows of the draft vocabulary, in draft-id order."
            )
        if not target_t.dtype.is_floating_point or target_weight.dtype != target_t.dtype:
            raise ValueError(
                f"{where}: TargetHead.hidden and TargetHead.weight must share one float dtype, "
                f"got {target_t.dtype} and {target_weight.dtype}. Cast them to one dtype."
            )
    elif isinstance(target, TargetLogits):
        target_kind, target_t = "logits", target.logits
        if not isinstance(target_t, Tensor) or not target_t.dtype.is_floating_point:
            raise ValueError(
                f"{where}: TargetLogits.logits must be a float Tensor, got "
                f"{getattr(target_t, 'dtype', type(target_t).__name__)}."
            )
    elif isinstance(target, Tensor):
        target_t = target
        if target.dtype.is_floating_point:
            target_kind = "probs"
        elif target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(
                f"{where}: target must be float probabilities [B, R, V] or integer ids [B, R], "
                f"got dtype {target.dtype}."
            )
        else:
            target_kind = "ids"
            if target.shape != (B, R):
                raise ValueError(
                    f"{where}: an int target must be [B, R] = [{B}, {R}] draft-vocabulary ids, got "
                    f"shape {tuple(target.shape)}. For probabilities pass a float tensor."
                )
    else:
        raise ValueError(
            f"{where}: target must be a Tensor (probabilities or ids), TargetLogits or TargetHead, "
            f"got {type(target).__name__}."
        )
    if target_kind in ("probs", "logits"):
        what = "a float target" if target_kind == "probs" else "TargetLogits.logits"
        if target_t.dim() != 3 or target_t.shape[:2] != (B, R):
            raise ValueError(
                f"{where}: {what} must be [B, R, V] = [{B}, {R}, {V}], got shape "
                f"{tuple(target_t.shape)}. For ids pass an int tensor [B, R]."
            )
        if target_t.shape[2] != V:
            raise ValueError(
                f"{where}: {what} has {target_t.shape[2]} entries per row but the draft vocabulary "
                f"(head_weight rows) has V = {V}. Map the target's distribution onto the draft "
                f"vocabulary first (its t2d columns, in draft-id order)."
            )

    device = hidden.device
    for name, t in (("norm_weight", norm_weight), ("head_weight", head_weight), ("counted", counted),
                    ("target", target_t), ("target weight", target_weight)):
        if t is not None and t.device != device:
            raise ValueError(
                f"{where}: {name} is on {t.device} but hidden is on {device}. Move it to {device}."
            )
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"{where}: chunk_rows must be an int >= 1 or None, got chunk_rows={chunk_rows!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(
            f"{where}: eps must be a finite number >= 0 (the RMSNorm epsilon, e.g. "
            f"config.rms_norm_eps), got eps={eps!r}."
        )
    return target_kind, target_t, target_weight


def _head_loss_reference(hidden: Tensor, norm_weight: Tensor, head_weight: Tensor,
                         target: Tensor | TargetLogits | TargetHead, counted: Tensor, *,
                         eps: float) -> tuple[Tensor, Tensor]:
    """The unfused math of :func:`head_loss`, in plain autograd ops over whole ``[B, R, V]``
    tensors: the tests' ground truth (same arguments, no ``chunk_rows``).

    As ``Eagle3Model.forward`` computes a step's loss today (``compute_logits``, ``_soft_nll``),
    with two differences that leave finite inputs' results unchanged: rows that do not count are
    zeros from the start (Note [rows that do not count]), and RMSNorm's statistics of a float64
    ``hidden`` are float64 (``_RMSNorm``'s ``x.float()`` would take them in float32).
    """
    V = head_weight.shape[0]
    if isinstance(target, Tensor) and not target.dtype.is_floating_point:
        counted = counted & (target >= 0) & (target < V)
    c = counted[..., None]  # [B, R, 1]
    x = torch.where(c, hidden, 0)  # [B, R, H]
    x32 = x.to(_f32_or_wider(x.dtype))
    normed = norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    logits = F.linear(normed, head_weight)  # [B, R, V]
    logp = torch.log_softmax(logits.to(_f32_or_wider(logits.dtype)), -1)  # [B, R, V]
    if isinstance(target, Tensor) and not target.dtype.is_floating_point:
        target_id = torch.where(counted, target, 0)  # [B, R]
        nll = -logp.gather(-1, target_id[..., None]).squeeze(-1)  # [B, R]
    else:
        if isinstance(target, TargetHead):
            t = F.linear(torch.where(c, target.hidden, 0), target.weight)  # [B, R, V]
            p = torch.softmax(t.to(_f32_or_wider(t.dtype)), -1)
        elif isinstance(target, TargetLogits):
            t = torch.where(c, target.logits, 0)  # [B, R, V]
            p = torch.softmax(t.to(_f32_or_wider(t.dtype)), -1)
        else:
            t = torch.where(c, target, 0)  # [B, R, V]
            p = t.to(_f32_or_wider(t.dtype))
        target_id = t.argmax(-1)  # [B, R]
        nll = -(p * logp).sum(-1)  # [B, R]
    nll_sum = torch.where(counted, nll, 0).sum()
    hit_sum = ((logits.argmax(-1) == target_id) & counted).sum().to(nll.dtype)
    return nll_sum, hit_sum
