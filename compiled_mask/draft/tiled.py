"""The SwiGLU MLP tiled over the sequence: ``compiled_mask::tiled_mlp``, for very long Q_LEN.

At Q_LEN 131072 the draft's MLP (hidden 4096, intermediate 14336) holds three ``[T, 14336]``
activations of 3.75 GB each in bf16, in the forward and again when a recomputing memory policy
replays the step in the backward. Tiled, it holds one chunk of rows at a time: the op saves only
its input, and its backward recomputes each chunk's activations just before using them.

Per row the math is :class:`~compiled_mask.draft.model._MLP`'s, op for op in the same dtypes
(``down(silu(gate(x)) * up(x))``). The weight gradients are one matmul per chunk in the weights'
dtype (bf16: rounded once at the matmul's end, as the untiled matmul is), summed over chunks in
float32 (float64 for float64), then cast to the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from compiled_mask._dtypes import _f32_or_wider

__all__ = ["tiled_mlp"]


def _chunks(n: int, rows: int):
    for r0 in range(0, n, rows):
        yield r0, min(r0 + rows, n)


@torch.library.custom_op("compiled_mask::tiled_mlp", mutates_args=())
def _tiled_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, chunk_rows: int) -> Tensor:
    """Private op: ``down(silu(gate(x)) * up(x))`` over chunks of ``chunk_rows`` rows.

    Args:
        x: ``[..., H]``; gate, up: ``[I, H]``; down: ``[H, I]`` (nn.Linear weights, one dtype).
        chunk_rows: rows (of x flattened to ``[N, H]``) per chunk, >= 1.

    Returns:
        ``[..., H]``, contiguous.
    """
    flat = x.reshape(-1, x.shape[-1])  # [N, H]
    out = torch.empty(flat.shape[0], down.shape[0], dtype=x.dtype, device=x.device)  # [N, H]
    for r0, r1 in _chunks(flat.shape[0], chunk_rows):
        xr = flat[r0:r1]
        out[r0:r1] = F.linear(F.silu(F.linear(xr, gate)) * F.linear(xr, up), down)
    return out.view(*x.shape[:-1], down.shape[0])


@_tiled_mlp.register_fake
def _(x, gate, up, down, chunk_rows):
    return x.new_empty(*x.shape[:-1], down.shape[0])


@torch.library.custom_op("compiled_mask::tiled_mlp_backward", mutates_args=())
def _tiled_mlp_backward(dout: Tensor, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, chunk_rows: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Private op: ``(dx, d_gate, d_up, d_down)`` of :func:`_tiled_mlp`, each chunk's activations
    recomputed just before use."""
    flat = x.reshape(-1, x.shape[-1])  # [N, H]
    dflat = dout.reshape(-1, dout.shape[-1])  # [N, H]
    dx = torch.empty(flat.shape, dtype=x.dtype, device=x.device)  # contiguous, as the fake states
    acc = _f32_or_wider(gate.dtype)
    d_gate, d_up = torch.zeros(gate.shape, dtype=acc, device=x.device), torch.zeros(up.shape, dtype=acc, device=x.device)
    d_down = torch.zeros(down.shape, dtype=acc, device=x.device)
    for r0, r1 in _chunks(flat.shape[0], chunk_rows):
        xr, dr = flat[r0:r1], dflat[r0:r1]
        g, u = F.linear(xr, gate), F.linear(xr, up)  # [n, I]
        a = F.silu(g)
        d_down += (dr.T @ (a * u)).to(acc)  # [H, I]
        dh = dr @ down  # [n, I]
        du = dh * a
        sig = torch.sigmoid(g.to(acc))
        dg = (dh * u).to(acc) * sig * (1 + g.to(acc) * (1 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
        dg = dg.to(x.dtype)
        d_gate += (dg.T @ xr).to(acc)  # [I, H]
        d_up += (du.T @ xr).to(acc)
        dx[r0:r1] = dg @ gate + du @ up  # [n, H]
    return dx.view(x.shape), d_gate.to(gate.dtype), d_up.to(up.dtype), d_down.to(down.dtype)


@_tiled_mlp_backward.register_fake
def _(dout, x, gate, up, down, chunk_rows):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(gate),
            torch.empty_like(up), torch.empty_like(down))


def _setup(ctx, inputs, output) -> None:
    x, gate, up, down, chunk_rows = inputs
    ctx.save_for_backward(x, gate, up, down)
    ctx.chunk_rows = chunk_rows


def _backward(ctx, dout: Tensor):
    x, gate, up, down = ctx.saved_tensors
    dx, d_gate, d_up, d_down = _tiled_mlp_backward(dout.contiguous(), x, gate, up, down, ctx.chunk_rows)
    return dx, d_gate, d_up, d_down, None


_tiled_mlp.register_autograd(_backward, setup_context=_setup)


def tiled_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, *, chunk_rows: int) -> Tensor:
    """The SwiGLU MLP over chunks of ``chunk_rows`` rows, saving only ``x`` for backward
    (module docstring); differentiable in x and the three weights.

    Example::

        >>> x = torch.randn(2, 10, 8, requires_grad=True)
        >>> gate, up, down = torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)
        >>> tiled_mlp(x, gate, up, down, chunk_rows=4).shape
        torch.Size([2, 10, 8])
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"tiled_mlp: chunk_rows must be an int >= 1, got chunk_rows={chunk_rows!r}.")
    return _tiled_mlp(x, gate, up, down, chunk_rows)
