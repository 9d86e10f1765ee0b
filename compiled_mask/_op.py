"""The custom op ``compiled_mask::eagle3_block_mask`` and its fake (meta) implementation.

Private: users call :func:`compiled_mask.eagle3_block_mask` or the modules, which validate their
arguments and wrap the eight tensors in a BlockMask. The op exists so that torch.compile sees the
build as one opaque node with shapes known from ints alone.

Note [static widths]
    Eagle3 TTT grows the keys by one round of Q_LEN per step. If the BlockMask tensors grew with
    it, every step would have new shapes and would recompile. Instead the key axis has a fixed
    width KV_LEN = Q_LEN * max_rounds (the caller's static K/V buffer) and the number of live
    rounds is a 0-d int tensor, read only by tensor ops: keys of rounds past it are treated as
    padding, so their blocks are absent from all eight tensors and no kernel visits them. Every
    shape then depends on Python ints only: one graph serves every step, and FA4 (which refuses
    SymInts in mask_mod) can take it. The live count is clamped to [1, max_rounds] in the graph
    before anything reads it (``_checks._live_rounds``), so no value of it indexes outside the
    tensors.

Note [fused build]
    On CUDA the op runs one Triton kernel (``_triton_blocks.py``) that writes all eight tensors
    (for padded/packed batches, after a second one that scans the layout table into per-sample
    lookup tables); elsewhere it runs the torch-ops version in ``_blocks.py``, which is also the
    reference the kernels are tested against on the GPU. The torch-ops version on CUDA cost about
    a hundred small launches per build with a layout. The op is opaque to Inductor either way,
    so the graph around it sees one node with shapes known from ints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compiled_mask._blocks import _ceil_div, eagle3_block_tensors
from compiled_mask._layout import _first_keys_reference

_Tensors8 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _live_kv_len(rounds: Tensor, Q_LEN: int) -> Tensor:
    """Number of live keys, ``rounds * Q_LEN`` (0-d int64), for a count already widened and clamped
    to [1, KV_LEN / Q_LEN] (``_checks._live_rounds``, the one place it is clamped)."""
    return rounds * Q_LEN


@torch.library.custom_op("compiled_mask::eagle3_block_mask", mutates_args=())
def _eagle3_block_mask_op(
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK_SIZE: int,
    KV_BLOCK_SIZE: int,
    B: int,
    H: int,
    device: torch.device,
    rounds: Tensor | None,
    first_key: Tensor | None,
) -> _Tensors8:
    """Build the eight BlockMask tensors of the Eagle3 mask (private; arguments are unchecked).

    Args:
        Q_LEN, KV_LEN: query length and key-axis width (SymInts allowed).
        Q_BLOCK_SIZE, KV_BLOCK_SIZE: block sizes, KV_BLOCK_SIZE dividing Q_BLOCK_SIZE.
        B, H: batch and head dims of the outputs (1 broadcasts).
        device: where the outputs live.
        rounds: ``None`` (all KV_LEN keys live) or a 0-d int64 tensor on ``device`` with the number
            of live rounds, clamped to [1, KV_LEN / Q_LEN] (Note [static widths]).
        first_key: ``None``, or the ``[B, Q_LEN]`` int64 layout table of a padded/packed batch
            on ``device`` (Note [one layout table] in ``_layout.py``); B must then be its batch.

    Returns:
        ``kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
        full_q_num_blocks, full_q_indices``, int32; shapes in :func:`_fake`.
    """
    live_kv_len = None if rounds is None else _live_kv_len(rounds, Q_LEN)
    if device.type == "cuda":  # Note [fused build]
        from compiled_mask._triton_blocks import eagle3_block_tensors_triton

        return eagle3_block_tensors_triton(
            Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, B, H, device, live_kv_len, first_key
        )
    return eagle3_block_tensors(
        Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE, B, H, device,
        KV_LEN if live_kv_len is None else live_kv_len, first_key
    )


@_eagle3_block_mask_op.register_fake
def _fake(
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK_SIZE: int,
    KV_BLOCK_SIZE: int,
    B: int,
    H: int,
    device: torch.device,
    rounds: Tensor | None,
    first_key: Tensor | None,
) -> _Tensors8:
    # Shapes from the int arguments only: no data reads, so no sync and no data-dependent guard.
    n_q = _ceil_div(Q_LEN, Q_BLOCK_SIZE)
    n_kv = _ceil_div(KV_LEN, KV_BLOCK_SIZE)

    def new(*shape: int) -> Tensor:
        return torch.empty(B, H, *shape, dtype=torch.int32, device=device)

    return (
        new(n_q), new(n_q, n_kv), new(n_q), new(n_q, n_kv),
        new(n_kv), new(n_kv, n_q), new(n_kv), new(n_kv, n_q),
    )  # fmt: skip


@torch.library.custom_op("compiled_mask::eagle3_first_keys", mutates_args=())
def _eagle3_first_keys_op(Q_LEN: int, seq_lens: Tensor | None, doc_ids: Tensor | None) -> Tensor:
    """The layout table ``first_key [B, Q_LEN]`` int64 of ``seq_lens``/``doc_ids`` (private; at
    least one given, checked by the caller): Note [one layout table] in ``_layout.py``.

    Note [the layout table is an op]
        mask_mod captures this table, and Inductor's CPU flex template (torch 2.13) fails to
        lower a mask_mod whose captured tensor is a computed, unrealized buffer
        (NoValidChoicesError: its template asks the buffer for a name). Passing the table to the
        block op as well does not realize the captured node. An op's output always is, so the
        table comes from this op, eagerly and compiled alike.
    """
    return _first_keys_reference(Q_LEN, seq_lens, doc_ids)


@_eagle3_first_keys_op.register_fake
def _(Q_LEN: int, seq_lens: Tensor | None, doc_ids: Tensor | None) -> Tensor:
    layout = doc_ids if doc_ids is not None else seq_lens
    return layout.new_empty(layout.shape[0], Q_LEN, dtype=torch.int64)


def _first_keys(Q_LEN: int, seq_lens: Tensor | None, doc_ids: Tensor | None) -> Tensor | None:
    """The layout table of checked ``seq_lens``/``doc_ids`` (Note [one layout table] in
    ``_layout.py``), or None without a layout."""
    if seq_lens is None and doc_ids is None:
        return None
    return _eagle3_first_keys_op(Q_LEN, seq_lens, doc_ids)
