"""A small Eagle3-style draft layer that uses Eagle3Attention: the demo's model and the guard
report's default model.

``demo_model(q_len, max_rounds, device)`` follows the factory contract of
``compiled-mask-guards --model module:callable``: it returns ``(model, make_inputs)`` where
``make_inputs(rounds)`` gives the arguments of one TTT step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from compiled_mask.modules import Eagle3Attention

__all__ = ["DraftLayer", "demo_model"]


class DraftLayer(nn.Module):
    """One Eagle3-style draft layer step: project, write this round's K/V, attend, project back.

    Args:
        q_len: tokens per round (Q_LEN).
        max_rounds: TTT rounds the static K/V buffer holds.
        hidden: model width; heads, kv_heads: query and K/V heads (GQA when they differ).
        block_size, backend: passed to :class:`~compiled_mask.Eagle3Attention`.
    """

    def __init__(self, q_len: int, max_rounds: int, hidden: int = 256, heads: int = 8,
                 kv_heads: int = 2, block_size: int | tuple[int, int] | None = None,
                 backend: str = "flex") -> None:
        super().__init__()
        self.q_len, self.heads, self.kv_heads = q_len, heads, kv_heads
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim)
        self.kv_proj = nn.Linear(hidden, 2 * kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden)
        self.attn = Eagle3Attention(q_len, max_rounds, block_size=block_size, backend=backend)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, S, hidden]`` -> q ``[B, Hq, S, D]``, k and v ``[B, Hkv, S, D]``."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim)  # [B, S, Hq, D]
        kv = self.kv_proj(x).view(B, S, 2, self.kv_heads, self.head_dim)  # [B, S, 2, Hkv, D]
        # contiguous(): Inductor's CPU flex kernel (torch 2.13) fails on a transposed view.
        q = q.transpose(1, 2).contiguous()  # [B, Hq, S, D]
        k, v = kv.permute(2, 0, 3, 1, 4).contiguous()  # 2 x [B, Hkv, S, D]
        return q, k, v

    def finish(self, x: Tensor, attn_out: Tensor) -> Tensor:
        B, S, _ = x.shape
        return x + self.o_proj(attn_out.transpose(1, 2).reshape(B, S, -1))  # [B, S, hidden]

    def forward(self, x: Tensor, k_buf: Tensor, v_buf: Tensor, rounds: Tensor):
        """One TTT step: the next hidden states and the K/V buffers with round ``rounds`` written.

        Args:
            x: ``[B, Q_LEN, hidden]``; k_buf, v_buf: ``[B, Hkv, Q_LEN * max_rounds, D]``;
            rounds: 0-d int tensor, the round this step writes and the live count.
        """
        q, k, v = self.project(x)
        # Write this step's round at [(rounds - 1) * Q_LEN, rounds * Q_LEN): tensor offsets, so
        # the step number never becomes a graph constant.
        slots = (rounds - 1) * self.q_len + torch.arange(self.q_len, device=x.device)  # [S]
        k_buf = k_buf.index_copy(2, slots, k)  # [B, Hkv, Q_LEN * max_rounds, D]
        v_buf = v_buf.index_copy(2, slots, v)
        return self.finish(x, self.attn(q, k_buf, v_buf, rounds)), k_buf, v_buf


def demo_model(q_len: int, max_rounds: int, device: torch.device, *, batch: int = 1,
               hidden: int = 64, dtype: torch.dtype = torch.float32
               ) -> tuple[DraftLayer, Callable[[int], tuple]]:
    """A DraftLayer on ``device`` and a ``make_inputs(rounds)`` for its TTT steps."""
    model = DraftLayer(q_len, max_rounds, hidden=hidden, heads=4, kv_heads=2).to(device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, q_len, hidden, device=device, dtype=dtype, generator=g)
    kv_shape = (batch, model.kv_heads, q_len * max_rounds, model.head_dim)
    k_buf = torch.zeros(kv_shape, device=device, dtype=dtype)
    v_buf = torch.zeros(kv_shape, device=device, dtype=dtype)

    def make_inputs(rounds: int) -> tuple:
        return x, k_buf, v_buf, torch.tensor(rounds, device=device)

    return model, make_inputs
