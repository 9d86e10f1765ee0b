"""The Eagle3 draft training step with the sequence sharded over a process group (context parallel).

The attention side lives in the library (``compiled_mask.distributed``); this module runs the TTT
unroll's shifts, halos and loss reductions over the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from compiled_mask.distributed import (
    Eagle3ContextParallelAttention,
    _all_gather,
    _global_order,
    _num_chunks,
    _rank_chunks,
)
from compiled_mask.draft.model import Eagle3DraftModel
from compiled_mask.draft.unroll import Eagle3Model

__all__ = ["Eagle3ContextParallelModel"]



class Eagle3ContextParallelModel(Eagle3Model):
    """:class:`~compiled_mask.Eagle3Model` with the sequence sharded over a process group.

    The same TTT unroll, losses and outputs, run by every rank of ``group`` on its positions
    (:func:`shard_positions`) with :class:`Eagle3ContextParallelAttention`. Each rank passes the
    same *global* small per-position tensors and its *local* shard of the large ones:

    =================  =================================  ==========================================
    input              shape on each rank                 what
    =================  =================================  ==========================================
    input_ids          ``[B, T]``                         global (the same on every rank)
    hidden_states      ``[B, L, 3 * target_hidden_size]``  the rank's shard, L = T / P:
                                                          ``shard_sequence(x, T, P, rank, layout, dim=1)``
    target (float)     ``[B, L, draft_vocab_size]``       the rank's shard, as hidden_states
    target (int ids)   ``[B, T]``                         global
    loss_mask          ``[B, T]``                         global
    seq_lens, doc_ids  ``[B]``, ``[B, T]``                global
    =================  =================================  ==========================================

    Step s reads everything at global position t + s, which for the last s rows of a chunk lies
    in the next chunk, on another rank: the global tensors are sliced there, and the float target
    gets a halo, the first ``length - 1`` rows of every chunk, all-gathered (Note [sequence
    shards] in ``draft.py``). ``loss``, ``plosses`` and ``acces`` are the global values on every
    rank (the same numbers a single process computes on the whole batch), so logs agree; their
    gradients are set up so that averaging the ranks' parameter gradients over the group, as
    FSDP2's ``fully_shard`` and DDP do by default, gives exactly the single-process gradient
    (Note [gradients over ranks]). Compile it whole, ``torch.compile(model, fullgraph=True)``:
    the collectives are functional, so one graph serves every training step, all TTT steps
    included (with ``fully_shard``, its hooks run outside the graph).

    Args:
        draft_model: the :class:`~compiled_mask.Eagle3DraftModel`, with the same weights on every
            rank (``fully_shard`` the built model to shard them).
        q_len: the global T (tokens per sample).
        length: TTT steps; ``length - 1`` must not exceed a chunk, ``q_len / (2P)`` (zigzag) or
            ``q_len / P`` (contiguous).
        group, mode, layout: as :class:`Eagle3ContextParallelAttention` (``"allgather"`` takes no
            doc_ids; ``"ulysses"`` needs both head counts divisible by P).
        attention_backend: the attention backend (``"split"``; ``"flex"``/``"fa4"`` with Ulysses).
        loss_decay: as :class:`~compiled_mask.Eagle3Model`.

    Example::

        # On each rank, after torch.distributed.init_process_group(...) (torchrun):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        P, rank = dist.get_world_size(), dist.get_rank()
        cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=50, draft_vocab_size=20)
        torch.manual_seed(0)  # the same weights and batch on every rank, for the example
        model = Eagle3ContextParallelModel(Eagle3DraftModel(cfg), q_len=32, length=3, mode="allgather")
        fully_shard(model, mesh=init_device_mesh("cpu", (P,)))  # gradients averaged over the group
        step = torch.compile(model, fullgraph=True)
        ids, hidden = torch.randint(50, (2, 32)), torch.randn(2, 32, 3 * 32)
        target, loss_mask = torch.randint(20, (2, 32)), torch.ones(2, 32, dtype=torch.bool)
        out = step(ids, shard_sequence(hidden, 32, P, rank, dim=1), target, loss_mask)
        out.loss.backward()  # out.loss, out.plosses, out.acces: the global values on every rank
    """

    _where = "Eagle3ContextParallelModel"
    _rows_name = "L"

    def __init__(self, draft_model: Eagle3DraftModel, q_len: int, length: int = 7, *,
                 group: dist.ProcessGroup | None = None, mode: str = "allgather",
                 layout: str = "zigzag", attention_backend: str = "split",
                 loss_decay: float = 0.8) -> None:
        super().__init__(draft_model, q_len, length, attention_backend=attention_backend,
                         loss_decay=loss_decay)
        # The single-process attention the base built gives way to the sharded one.
        self.attn = Eagle3ContextParallelAttention(q_len, length, group=group, mode=mode,
                                                   layout=layout, backend=attention_backend)
        P, rank = self.attn.world_size, self.attn.rank
        self.group, self.world_size, self.rank, self.layout = self.attn.group, P, rank, layout
        self._chunks = _rank_chunks(P, rank, layout)
        self._chunk_len = q_len // _num_chunks(P, layout)
        if length - 1 > self._chunk_len:
            raise ValueError(
                f"{self._where}: TTT step s reads position t + s, up to length - 1 = {length - 1} "
                f"positions ahead, which must lie within the next chunk; layout={layout!r} cuts "
                f"q_len={q_len} into chunks of {self._chunk_len} over {P} ranks. Use a q_len of at "
                f"least {(length - 1) * _num_chunks(P, layout)}, fewer ranks, or fewer TTT steps."
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.attn.mode!r}, layout={self.layout!r}, world_size={self.world_size}"

    def _input_hint(self, name: str, local: bool) -> str:
        if not local:
            return f" (every rank passes the global {name}, the same on every rank)"
        return (f". Pass this rank's shard: shard_sequence({name}, {self.q_len}, {self.world_size}, "
                f"rank={self.rank}, layout={self.layout!r}, dim=1)")

    # Note [gradients over ranks]
    #     Rank r's part of step s's loss is the masked sum over its positions divided by the
    #     count over all ranks (``_sum_over_ranks``), so the parts sum to the single-process loss
    #     exactly. Autograd through the attention's functional collectives sends every part's
    #     gradient to the rank that holds the keys it read, so after every rank's backward the
    #     ranks' parameter gradients sum to the single-process gradient. FSDP2 (and DDP) average
    #     gradients over the group by default, so each rank's loss backpropagates P times its part:
    #     the average is then the exact gradient, with no FSDP setting to change. (Over a larger
    #     data-parallel group holding whole context-parallel groups, dp x cp, the default average
    #     is the mean over data-parallel replicas of that gradient, as wanted.) The values
    #     returned are the totals, all-reduced (no gradient: functional all_reduce has none), so
    #     every rank logs the same numbers: ``total + (part - part.detach()) * P`` has the
    #     total's value exactly and P times the part's gradient.

    def _reduce_steps(self, plosses: Tensor, acces: Tensor) -> tuple[Tensor, Tensor]:
        n = plosses.numel()
        totals = funcol.all_reduce(torch.cat([plosses.detach(), acces.detach()]), "sum", self.group)  # [2n]
        local_grad = (plosses - plosses.detach()) * self.world_size  # zero, with P x the part's gradient
        return totals[:n] + local_grad, totals[n:]

    def _sum_over_ranks(self, x: Tensor) -> Tensor:
        return funcol.all_reduce(x, "sum", self.group)

    def _gather_rows(self, x: Tensor) -> Tensor:
        B = x.size(0)
        chunks = self._all_gather_chunks(x.view(B, len(self._chunks), self._chunk_len).transpose(0, 1))
        return chunks.transpose(0, 1).reshape(B, self.q_len)  # [B, T]

    def _next_chunk_rows(self, x: Tensor, n: int) -> Tensor:
        n_local, C = len(self._chunks), self._chunk_len
        heads = x.unflatten(1, (n_local, C))[:, :, :n].transpose(0, 1)  # [nl, B, n, ...]
        if n == 0:
            return heads.transpose(0, 1)
        heads = self._all_gather_chunks(heads)  # [chunks, B, n, ...], every chunk's first n rows
        heads = torch.cat([heads, torch.zeros_like(heads[:1])])  # past the last chunk: zeros
        return heads[[g + 1 for g in self._chunks]].transpose(0, 1)  # [B, nl, n, ...]

    def _all_gather_chunks(self, x: Tensor) -> Tensor:
        """``x [local chunks, ...]`` on every rank -> ``[all chunks, ...]`` in global chunk order
        (no gradient: ids and targets)."""
        n_local = x.size(0)
        gathered = _all_gather(x.contiguous(), 0, self.group)  # [P * nl, ...], rank-major
        order = [p * n_local + j for p, j in _global_order(self.world_size, self.layout)]
        return gathered[order]  # [chunks, ...]
