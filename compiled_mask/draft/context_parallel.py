"""The Eagle3 draft training step with the sequence sharded over a process group (context parallel).

:class:`ContextParallel` is a :class:`~compiled_mask.draft.unroll.Sequence` strategy: passed to
``Eagle3Model(..., sequence=ContextParallel(...))``, it makes the unchanged TTT unroll run on a
rank's shard of the sequence. It owns everything that crosses ranks: the sharded attention (the
library's :class:`~compiled_mask.distributed.Eagle3ContextParallelAttention`), the shifted reads
at chunk boundaries (a halo of the soft target), and the sums of counts and losses over the group.
The model knows nothing of ranks; shard its parameters with FSDP2 (``fully_shard``) over the group.

Each rank passes the same *global* small per-position tensors and its *local* shard of the large
ones (Note [shard order] in ``compiled_mask/distributed.py``):

=================  =================================  ==========================================
input              shape on each rank                 what
=================  =================================  ==========================================
input_ids          ``[B, T]``                         global (the same on every rank)
hidden_states      ``[B, L, 3 * target_hidden_size]``  the rank's shard, L = T / P:
                                                      ``shard_sequence(x, T, P, rank, shard_order, dim=1)``
target (soft)      ``[B, L, V]`` (or TargetLogits /   the rank's shard, as hidden_states
                   TargetHead ``[B, L, Ht]``)
target (int ids)   ``[B, T]``                         global
loss_mask          ``[B, T]``                         global
seq_lens, doc_ids  ``[B]``, ``[B, T]``                global
=================  =================================  ==========================================

Step s reads everything at global position t + s, which for the last s rows of a chunk lies in
the next chunk, on another rank: the global tensors are sliced there, and the soft target gets a
halo, the first ``length - 1`` rows of every chunk, all-gathered (Note [sequence shards] in
``unroll.py``). ``loss``, ``plosses`` and ``acces`` are the global values on every rank (the same
numbers a single process computes on the whole batch), so logs agree; their gradients are set up
so that averaging the ranks' parameter gradients over the group, as FSDP2's ``fully_shard`` and
DDP do by default, gives exactly the single-process gradient (Note [gradients over ranks]).
Compile it whole, ``torch.compile(model, fullgraph=True)``: the collectives are functional, so one
graph serves every training step, all TTT steps included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from compiled_mask._shards import _all_gather, _global_order, _num_chunks, _rank_chunks
from compiled_mask.distributed import Eagle3ContextParallelAttention
from compiled_mask.draft.unroll import _check_unbound

__all__ = ["ContextParallel"]


class ContextParallel:
    """Shard the TTT unroll's sequence over a process group (module docstring).

    Args:
        group: the process group (default: the world); torch.distributed must be initialised.
        mode: ``"allgather"`` or ``"ulysses"`` (``Eagle3ContextParallelAttention``; allgather takes
            no doc_ids, ulysses needs both head counts divisible by P).
        shard_order: ``"zigzag"`` or ``"contiguous"`` (which positions each rank holds).

    ``length - 1`` TTT steps ahead must fit in one chunk: ``q_len / (2P)`` (zigzag) or
    ``q_len / P`` (contiguous) positions.

    Example::

        # On each rank, after torch.distributed.init_process_group(...) (torchrun):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        P, rank = dist.get_world_size(), dist.get_rank()
        cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=50, draft_vocab_size=20)
        torch.manual_seed(0)  # the same weights and batch on every rank, for the example
        model = Eagle3Model(Eagle3DraftModel(cfg), q_len=32, length=3,
                            sequence=ContextParallel(mode="allgather"))
        fully_shard(model, mesh=init_device_mesh("cpu", (P,)))  # gradients averaged over the group
        step = torch.compile(model, fullgraph=True)
        ids, hidden = torch.randint(50, (2, 32)), torch.randn(2, 32, 3 * 32)
        target, loss_mask = torch.randint(20, (2, 32)), torch.ones(2, 32, dtype=torch.bool)
        out = step(ids, shard_sequence(hidden, 32, P, rank, dim=1), target, loss_mask)
        out.loss.backward()  # out.loss, out.plosses, out.acces: the global values on every rank
    """

    rows_name = "L"

    def __init__(self, group: dist.ProcessGroup | None = None, *, mode: str = "allgather",
                 shard_order: str = "zigzag") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "ContextParallel: torch.distributed is not initialised. Call "
                "torch.distributed.init_process_group(...) first (e.g. under torchrun)."
            )
        self.group = dist.group.WORLD if group is None else group
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.mode, self.shard_order = mode, shard_order

    def bind(self, q_len: int, length: int, attention_backend: str) -> nn.Module:
        _check_unbound(self)
        attn = Eagle3ContextParallelAttention(q_len, length, group=self.group, mode=self.mode,
                                              shard_order=self.shard_order, backend=attention_backend)
        P = self.world_size
        chunk_len = q_len // _num_chunks(P, self.shard_order)
        if length - 1 > chunk_len:
            raise ValueError(
                f"ContextParallel: TTT step s reads position t + s, up to length - 1 = {length - 1} "
                f"positions ahead, which must lie within the next chunk; shard_order={self.shard_order!r} cuts "
                f"q_len={q_len} into chunks of {chunk_len} over {P} ranks. Use a q_len of at "
                f"least {(length - 1) * _num_chunks(P, self.shard_order)}, fewer ranks, or fewer TTT steps."
            )
        # Bound only once every check has passed: a refused bind leaves the strategy reusable.
        self.q_len, self.chunk_len = q_len, chunk_len
        self.chunks = _rank_chunks(P, self.rank, self.shard_order)
        return attn

    def local_len(self) -> int:
        return self.chunk_len * len(self.chunks)

    def positions(self, device: torch.device) -> Tensor:
        C = self.chunk_len
        return torch.cat([torch.arange(g * C, (g + 1) * C, device=device) for g in self.chunks])

    def at(self, x: Tensor, s: int, dim: int = 1) -> Tensor:
        C = self.chunk_len
        parts = [x.narrow(dim, g * C + s, C) for g in self.chunks]
        return torch.cat(parts, dim) if len(parts) > 1 else parts[0]  # L positions along dim

    def halo(self, x: Tensor, n: int) -> Tensor | None:
        """``x [B, L, ...]`` -> ``[B, chunks, n, ...]``: the first n rows of the global chunk after
        each local chunk, zeros after the last (no gradient: a target)."""
        n_local, C = len(self.chunks), self.chunk_len
        heads = x.unflatten(1, (n_local, C))[:, :, :n].transpose(0, 1)  # [nl, B, n, ...]
        if n == 0:
            return heads.transpose(0, 1)
        heads = self._all_gather_chunks(heads)  # [chunks, B, n, ...], every chunk's first n rows
        heads = torch.cat([heads, torch.zeros_like(heads[:1])])  # past the last chunk: zeros
        return heads[[g + 1 for g in self.chunks]].transpose(0, 1)  # [B, nl, n, ...]

    def shifted(self, x: Tensor, halo: Tensor | None, s: int) -> list[tuple[int, int, Tensor]]:
        C = self.chunk_len
        pieces = []
        for j in range(len(self.chunks)):
            pieces.append((j * C, (j + 1) * C - s, x[:, j * C + s: (j + 1) * C]))  # own rows from s on
            if s:
                pieces.append(((j + 1) * C - s, (j + 1) * C, halo[:, j, :s]))  # the next chunk's first s
        return pieces

    def sum(self, x: Tensor) -> Tensor:
        return funcol.all_reduce(x, "sum", self.group)

    # Note [gradients over ranks]
    #     Rank r's part of step s's loss is the masked sum over its positions divided by the
    #     count over all ranks (``sum``), so the parts sum to the single-process loss exactly.
    #     Autograd through the attention's functional collectives sends every part's gradient to
    #     the rank that holds the keys it read, so after every rank's backward the ranks'
    #     parameter gradients sum to the single-process gradient. FSDP2 (and DDP) average
    #     gradients over the group by default, so each rank's loss backpropagates P times its
    #     part: the average is then the exact gradient, with no FSDP setting to change. (Over a
    #     larger data-parallel group holding whole context-parallel groups, dp x cp, the default
    #     average is the mean over data-parallel replicas of that gradient, as wanted.) The values
    #     returned are the totals, all-reduced (no gradient: functional all_reduce has none), so
    #     every rank logs the same numbers: ``total + (part - part.detach()) * P`` has the
    #     total's value exactly and P times the part's gradient.
    def totals(self, plosses: Tensor, acces: Tensor) -> tuple[Tensor, Tensor]:
        n = plosses.numel()
        totals = funcol.all_reduce(torch.cat([plosses.detach(), acces.detach()]), "sum", self.group)  # [2n]
        local_grad = (plosses - plosses.detach()) * self.world_size  # zero, with P x the part's gradient
        return totals[:n] + local_grad, totals[n:]

    def hint(self, name: str, local: bool) -> str:
        if not local:
            return f" (every rank passes the global {name}, the same on every rank)"
        return (f". Pass this rank's shard: shard_sequence({name}, {self.q_len}, {self.world_size}, "
                f"rank={self.rank}, shard_order={self.shard_order!r}, dim=1)")

    def __repr__(self) -> str:
        return f"ContextParallel(mode={self.mode!r}, shard_order={self.shard_order!r}, world_size={self.world_size})"

    def _all_gather_chunks(self, x: Tensor) -> Tensor:
        """``x [local chunks, ...]`` on every rank -> ``[all chunks, ...]`` in global chunk order
        (no gradient: ids and targets)."""
        n_local = x.size(0)
        gathered = _all_gather(x.contiguous(), 0, self.group)  # [P * nl, ...], rank-major
        order = [p * n_local + j for p, j in _global_order(self.world_size, self.shard_order)]
        return gathered[order]  # [chunks, ...]
