"""The draft vocabulary: the most frequent target tokens of the training data.

The draft proposes tokens from ``draft_vocab_size`` target ids only (32000 of Llama 3's 128256),
which makes its head and loss 4x smaller. As SpecForge and TorchSpec do, the ids are the most
frequent tokens the draft must predict (the assistant tokens of the training conversations),
sorted by id; ``Eagle3DraftModel.set_vocab_mapping`` turns them into the ``d2t``/``t2d``
buffers, which the checkpoint and the export carry.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from compiled_mask.draft.data import Document

__all__ = ["token_counts", "draft_vocabulary"]


def token_counts(docs: Iterable[Document], vocab_size: int) -> Tensor:
    """How often each target id is an assistant token, ``[vocab_size]`` int64.

    Args:
        docs: tokenized conversations.
        vocab_size: the target's vocabulary size.
    """
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for doc in docs:
        ids = doc.ids[doc.assistant]
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token_counts: token id {int(ids.max())} is outside the target's "
                             f"vocabulary [0, {vocab_size}); is this the target's tokenizer?")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def draft_vocabulary(counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, float]:
    """The ``draft_vocab_size`` most frequent ids, sorted by id, and the share of the counted
    tokens they cover.

    Ties (and ids never seen, when the data has fewer distinct tokens than the draft vocabulary)
    go to the smaller id, so the result depends only on the counts.

    Args:
        counts: ``[vocab_size]`` from :func:`token_counts`.
        draft_vocab_size: how many ids to keep (at most ``vocab_size``).

    Returns:
        ``(ids [draft_vocab_size] int64 ascending, coverage in [0, 1])``.
    """
    V = counts.numel()
    if not 1 <= draft_vocab_size <= V:
        raise ValueError(f"draft_vocabulary: draft_vocab_size must be in [1, vocab_size={V}], got "
                         f"{draft_vocab_size}.")
    # Stable sort by descending count: equal counts keep id order.
    order = torch.sort(-counts, stable=True).indices
    ids = order[:draft_vocab_size].sort().values
    total = int(counts.sum())
    coverage = float(counts[ids].sum()) / total if total else 0.0
    return ids, coverage
