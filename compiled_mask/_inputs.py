"""The normalised inputs every entry point hands down: the batch layout as one table.

Every public entry (``eagle3_mask_mod``, ``eagle3_block_mask``, the modules, context parallel, the
draft's unroll) checks its ``seq_lens``/``doc_ids`` and turns them into a :class:`Layout` once per
call, here; everything below reads only the normalised form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from compiled_mask._checks import _check_doc_layout
from compiled_mask._op import _first_keys

__all__: list[str] = []


class Layout(NamedTuple):
    """A batch layout, normalised (Note [one layout table] in ``_layout.py``).

    Attributes:
        first_key: ``[B, Q_LEN]`` int64, the first key position each query may attend (Q_LEN for
            padding), or None for a batch without padding or documents.
        documents: whether it came from ``doc_ids``: a causal part must then stop at document
            starts (with ``seq_lens`` alone the causal kernels need no mask).
    """

    first_key: Tensor | None
    documents: bool


NO_LAYOUT = Layout(None, False)


def normalize_layout(where: str, q_len: int, seq_lens: Tensor | None, doc_ids: Tensor | None,
                     device: torch.device | str | None, batch: int | None = None, name: str = "q") -> Layout:
    """Check ``seq_lens [B]`` / ``doc_ids [B, Q_LEN]`` (metadata only: every integer tensor of the
    right shape is a valid layout) and build the table.

    Args:
        where: the entry point, for error messages.
        q_len: Q_LEN.
        seq_lens, doc_ids: as the public entry points take them.
        device: the device they must be on (that of the inputs), or None for any one device.
        batch: the batch they must have (that of the inputs), or None for any.
        name: what ``batch`` is read from, for the error message.
    """
    if seq_lens is None and doc_ids is None:
        return NO_LAYOUT
    B = _check_doc_layout(where, q_len, 1, seq_lens, doc_ids, device)
    if batch is not None and B != batch:
        raise ValueError(f"{where}: seq_lens/doc_ids have batch {B} but {name} has batch {batch}.")
    return Layout(_first_keys(q_len, seq_lens, doc_ids), doc_ids is not None)
