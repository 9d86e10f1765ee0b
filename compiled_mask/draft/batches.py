"""Micro-batches of packed rows, as a pure function of their index.

Micro-batch i holds rows ``i * B .. i * B + B - 1`` of an endless sequence of epochs, each epoch a
permutation of all rows drawn from ``(seed, epoch)``. Nothing else is state: a run resumed at
optimizer step k continues at micro-batch ``k * accumulation``, exactly where it stopped.

:class:`OnlineBatches` runs the target on each micro-batch's documents (the target in the
training loop); :class:`~compiled_mask.draft.offline.OfflineBatches` reads what
:func:`~compiled_mask.draft.offline.write_features` stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compiled_mask.draft.data import Document, row_layout
from compiled_mask.draft.loss import TargetHead
from compiled_mask.draft.target import TargetModel, counted_positions
from compiled_mask.draft.trainer import Batch

__all__ = ["batch_rows", "make_batch", "OnlineBatches"]


def batch_rows(index: int, batch: int, num_rows: int, seed: int) -> list[int]:
    """The rows of micro-batch ``index``: ``batch`` row indices in ``[0, num_rows)``.

    Args:
        index: the micro-batch (0, 1, ...).
        batch: rows per micro-batch (B).
        num_rows: rows per epoch.
        seed: the shuffle's seed; epoch e is ``randperm(num_rows)`` from seed ``seed * 1000003 + e``.
    """
    out = []
    perms: dict[int, Tensor] = {}
    for slot in range(index * batch, (index + 1) * batch):
        epoch, pos = divmod(slot, num_rows)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch)
            perms[epoch] = torch.randperm(num_rows, generator=g)
        out.append(int(perms[epoch][pos]))
    return out


def make_batch(input_ids: Tensor, hidden_states: Tensor, last_hidden: Tensor, loss_mask: Tensor,
               doc_ids: Tensor, head_weight: Tensor, dtype: torch.dtype, packed: bool) -> Batch:
    """A :class:`~compiled_mask.draft.trainer.Batch` from the per-position tensors of B rows.

    Args:
        input_ids, loss_mask, doc_ids: ``[B, T]`` (:func:`~compiled_mask.draft.data.row_layout`).
        hidden_states: ``[B, T, 3H]``; last_hidden: ``[B, T, H]`` (the target's, at t + 1).
        head_weight: ``[draft_vocab, H]`` the target's lm_head rows of the draft vocabulary.
        dtype: the draft's parameter dtype (the auxiliary hidden states are cast to it).
        packed: pass ``doc_ids`` (several documents per row); else every row holds one
            document from position 0 and ``seq_lens`` says where it ends.
    """
    device = head_weight.device
    # The one place the target distribution is given: its compact form, the target's last hidden
    # state and lm_head rows; the loss computes softmax(last_hidden @ head_weight.T) per chunk of
    # rows (as target_probs does whole), never holding [B, T, V].
    last_hidden = last_hidden.to(device)
    target = TargetHead(last_hidden, head_weight.to(last_hidden.dtype))  # [B, T, H], [V, H]
    doc_ids = doc_ids.to(device)
    extra = {"doc_ids": doc_ids} if packed else {"seq_lens": (doc_ids >= 0).sum(-1)}
    return Batch(input_ids.to(device), hidden_states.to(device, dtype), target, loss_mask.to(device),
                 **extra)


class OnlineBatches:
    """Micro-batches computed by running the target on their rows' documents.

    Args:
        docs: the tokenized conversations.
        rows: the packing, each row a list of indices into ``docs`` (``pack_documents``).
        target: the target model.
        draft_to_target: ``[draft_vocab]`` the target id of each draft id.
        q_len, batch: positions per row (T) and rows per micro-batch (B).
        dtype: the draft's parameter dtype.
        seed: the row shuffle's seed.
        packed: several documents per row (``doc_ids``), or one (``seq_lens``).
    """

    def __init__(self, docs: Sequence[Document], rows: Sequence[Sequence[int]], target: TargetModel,
                 draft_to_target: Tensor, q_len: int, batch: int, dtype: torch.dtype, seed: int = 0,
                 packed: bool = True) -> None:
        if not rows:
            raise ValueError("OnlineBatches: no rows to train on (no conversation was kept).")
        self.docs, self.rows, self.target, self.draft_to_target = docs, rows, target, draft_to_target
        self.head_weight = target.head_rows(draft_to_target)  # [draft_vocab, H]
        self.q_len, self.batch, self.dtype, self.seed, self.packed = q_len, batch, dtype, seed, packed
        self.layouts = [row_layout([docs[d] for d in row], q_len) for row in rows]

    def get(self, index: int) -> Batch:
        picked = batch_rows(index, self.batch, len(self.rows), self.seed)
        row_docs = [[self.docs[d] for d in self.rows[r]] for r in picked]
        layouts = [self.layouts[r] for r in picked]
        hidden, last, top = self.target.rows(row_docs, layouts, self.q_len)
        stack = lambda key: torch.stack([lay[key] for lay in layouts])  # noqa: E731
        # Note [the target's top token outside the draft vocabulary] in target.py
        counted = counted_positions(stack("loss_mask"), top, self.draft_to_target)
        return make_batch(stack("input_ids"), hidden, last, counted, stack("doc_ids"), self.head_weight, self.dtype,
                          self.packed)
