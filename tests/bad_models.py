"""Deliberately compile-unfriendly TTT models for the guard report's tests (factory contract of
``compiled-mask-guards --model``: ``factory(q_len, max_rounds, device) -> (model, make_inputs)``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from compiled_mask import eagle3_block_mask


def _qkv(q_len, max_rounds, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 2, q_len, 16, device=device, generator=g)
    k = torch.randn(1, 2, q_len * max_rounds, 16, device=device, generator=g)
    return q, k, torch.randn_like(k)


class IntLengths(nn.Module):
    """Passes KV_LEN as a Python int that changes every step: a graph per new value."""

    def forward(self, q, k, v, kv_len: int):
        block_mask = eagle3_block_mask(q.size(2), kv_len, device=q.device)
        return flex_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], block_mask=block_mask)


def int_lengths(q_len, max_rounds, device):
    q, k, v = _qkv(q_len, max_rounds, device)
    return IntLengths(), lambda rounds: (q, k, v, q_len * rounds)


class ItemRounds(nn.Module):
    """Reads the live rounds with .item(): a graph break, then a graph per value."""

    def forward(self, q, k, v, rounds):
        kv_len = q.size(2) * int(rounds.item())
        block_mask = eagle3_block_mask(q.size(2), kv_len, device=q.device)
        return flex_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], block_mask=block_mask)


def item_rounds(q_len, max_rounds, device):
    q, k, v = _qkv(q_len, max_rounds, device)
    return ItemRounds(), lambda rounds: (q, k, v, torch.tensor(rounds, device=device))
