"""A synthetic target for the trainer's smoke run (``python tools/train.py`` with no
``--target-model``): a fixed random second-order Markov chain whose next-token distribution depends
on the last two tokens through low-rank tables, and whose three auxiliary hidden states at
position t are fixed random features of tokens t and t - 1.

The draft sees the hidden states of position t and the embedding of token t + 1, and must predict
the chain's distribution of token t + 2; at TTT step s it must carry the token of step s - 1
itself (through its hidden states and its own K/V round), as Eagle3 drafts do. The loss starts
near ln(draft vocabulary) and falls toward the chain's entropy (:meth:`SyntheticTarget.entropy`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SyntheticTarget"]


class SyntheticTarget:
    """A fixed random target model: token sequences, auxiliary hidden states and next-token
    distributions, all from low-rank tables (so the 8B-sized vocabulary stays small in memory).

    Args:
        vocab: token ids ``[0, vocab)``; the draft vocabulary is ``[0, draft_vocab)`` and the
            chain only emits those (so every target is in the draft vocabulary).
        draft_vocab: tokens the chain emits.
        hidden: width of each auxiliary hidden state.
        rank: rank of the tables; sharpness: scale of the chain's logits (higher: lower entropy).
    """

    def __init__(self, vocab: int, draft_vocab: int, hidden: int, device: torch.device,
                 seed: int = 0, rank: int = 32, sharpness: float = 16.0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
        self.draft_vocab, self.device = draft_vocab, device
        self.last = randn(draft_vocab, rank) / math.sqrt(rank)  # token t -> its part of logits t+1
        self.prev = randn(draft_vocab, rank) / math.sqrt(rank)  # token t-1 -> its part
        self.out = randn(draft_vocab, rank) * (sharpness / math.sqrt(rank))
        self.feat = randn(vocab, rank)  # token features of the hidden states
        self.proj = randn(2, rank, 3 * hidden) / math.sqrt(rank)  # [token t, token t-1] -> 3 aux states
        self.gen = torch.Generator(device=device).manual_seed(seed + 1)

    def logits(self, tok: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[..., draft_vocab]`` given tokens t and t - 1."""
        return (self.last[tok] + self.prev[prev]) @ self.out.T

    def batch(self, B: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """One batch aligned for Eagle3Model: ``input_ids, hidden_states, target, loss_mask``."""
        n = T + 2  # positions 0..T+1: position t's target is token t + 2
        toks = torch.empty(B, n, dtype=torch.long, device=self.device)
        toks[:, :2] = torch.randint(0, self.draft_vocab, (B, 2), generator=self.gen, device=self.device)
        for t in range(2, n):
            p = self.logits(toks[:, t - 1], toks[:, t - 2]).softmax(-1)  # [B, V]
            toks[:, t] = torch.multinomial(p, 1, generator=self.gen).squeeze(-1)
        prev = torch.cat([toks[:, :1], toks[:, :-1]], dim=1)  # token t - 1 ([B, n])
        hidden = self.feat[toks[:, :T]] @ self.proj[0] + self.feat[prev[:, :T]] @ self.proj[1]  # [B, T, 3H]
        # The distribution of token t + 2 given tokens t + 1 and t (what step 0 predicts at t).
        target = self.logits(toks[:, 1 : T + 1], toks[:, :T]).softmax(-1)  # [B, T, V]
        loss_mask = torch.ones(B, T, dtype=torch.bool, device=self.device)
        # Probabilities in the parameter dtype (the loss upcasts them): half the memory in bf16.
        return toks[:, 1 : T + 1], hidden.to(dtype), target.to(dtype), loss_mask

    def entropy(self, B: int = 8, T: int = 256) -> float:
        """Mean entropy of the chain's next-token distribution (the loss floor), in nats."""
        _, _, p, _ = self.batch(B, T, torch.float32)
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
