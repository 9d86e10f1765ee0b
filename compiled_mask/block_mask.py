"""``eagle3_block_mask``: the Eagle3 BlockMask, built analytically, eagerly or inside torch.compile."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature

from compiled_mask._checks import _block_sizes, _check_doc_layout, _check_lengths, _check_positive
from compiled_mask._op import _eagle3_block_mask_op
from compiled_mask.mask_mod import _eagle3_allowed, _eagle3_sample_allowed, eagle3_mask_mod

__all__ = ["eagle3_block_mask"]


def eagle3_block_mask(
    Q_LEN: int,
    KV_LEN: int,
    *,
    B: int | None = 1,
    H: int | None = 1,
    device: torch.device | str = "cuda",
    BLOCK_SIZE: int | tuple[int, int] = 128,
    seq_lens: Tensor | None = None,
    doc_ids: Tensor | None = None,
) -> BlockMask:
    """The Eagle3 BlockMask for ``Q_LEN`` queries and ``KV_LEN`` keys, built in O(blocks).

    A drop-in for ``create_block_mask(eagle3_mask_mod(Q_LEN), B, H, Q_LEN, KV_LEN, device,
    BLOCK_SIZE=BLOCK_SIZE)``: the same eight tensors, without evaluating the mask on the
    Q_LEN x KV_LEN grid (which costs O(Q_LEN * KV_LEN) memory: 69.6 GB at 32K x 4 rounds).

    Works eagerly and inside ``torch.compile(fullgraph=True)``. Inside a compiled function
    ``Q_LEN`` and ``KV_LEN`` may come from tensor shapes (SymInts); see the README, "Dynamic
    shapes", for the settings that make growing KV_LEN compile once. For TTT loops, prefer the
    static-width :class:`~compiled_mask.Eagle3BlockMask`, which never recompiles.

    Args:
        Q_LEN: number of queries (one round), >= 1.
        KV_LEN: number of keys, >= Q_LEN; need not be a multiple of Q_LEN (a partial last round).
        B, H: batch and head dims of the mask; 1 (or None) broadcasts over q/k/v.
        device: where the mask lives.
        BLOCK_SIZE: an int or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` with KV_BLOCK_SIZE dividing
            Q_BLOCK_SIZE, e.g. 128 (flex default, FA4 on Hopper) or (256, 128) (FA4 on Blackwell).
        seq_lens: optional int tensor ``[B]``: valid length of each sample (padded batches).
        doc_ids: optional int tensor ``[B, Q_LEN]``: document of each position, -1 for padding
            (packed batches). With either, the mask has one row set per sample (B = their batch;
            H stays as given), blocks of padding or of pairs across documents are absent, and
            changing their values never recompiles.

    Returns:
        A BlockMask with ``seq_lengths=(Q_LEN, KV_LEN)`` and ``mask_mod=eagle3_mask_mod(Q_LEN,
        seq_lens=..., doc_ids=...)``, whose tensors have shapes ``[B, H, n_q]`` /
        ``[B, H, n_q, n_kv]`` (and the transposes).
    """
    where = "eagle3_block_mask"
    B = 1 if B is None else B
    H = 1 if H is None else H
    _check_lengths(where, Q_LEN, KV_LEN)
    _check_positive(where, B=B, H=H)
    q_bs, kv_bs = _block_sizes(where, BLOCK_SIZE)
    B = _check_doc_layout(where, Q_LEN, B, seq_lens, doc_ids, device)
    tensors = _eagle3_block_mask_op(
        Q_LEN, KV_LEN, q_bs, kv_bs, B, H, torch.device(device), None, seq_lens, doc_ids
    )
    mask_mod = eagle3_mask_mod(Q_LEN, seq_lens=seq_lens, doc_ids=doc_ids)
    return BlockMask((Q_LEN, KV_LEN), *tensors, BLOCK_SIZE=(q_bs, kv_bs), mask_mod=mask_mod)


def _live_eagle3_mask_mod(
    Q_LEN: int, rounds: Tensor, seq_lens: Tensor | None = None, doc_ids: Tensor | None = None
) -> _mask_mod_signature:
    """The Eagle3 rule restricted to the keys of the first ``rounds`` rounds (a 0-d int tensor),
    and to each sample's valid positions and documents when given (``eagle3_mask_mod``).

    Note [live keys in mask_mod]
        The block tensors already leave out every block wholly past the live keys, but a kernel
        still evaluates mask_mod on a PARTIAL block that straddles the end of the live keys
        (Q_LEN not a multiple of KV_BLOCK_SIZE), and eager flex_attention evaluates it on the
        whole grid. Without this check both would let queries see the next, dead round's
        diagonal. The check is ``kv < Q_LEN or kv < rounds * Q_LEN``: the first round is always
        live, so this equals the block tensors' clamp of rounds to [1, max_rounds] without a
        clamp in mask_mod (FA4's CuTe DSL lowering has no ``maximum``, torch 2.11). mask_mod
        captures the very tensor the op takes: Inductor's CPU flex template (torch 2.13) cannot
        lower a mask_mod that captures a tensor computed in the graph and not realized
        (NoValidChoicesError), and an op input is always realized.
    """

    def eagle3_live_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        live = (kv_idx < Q_LEN) | (kv_idx < rounds * Q_LEN)
        allowed = _eagle3_allowed(q_idx, kv_idx, Q_LEN) & live
        if seq_lens is None and doc_ids is None:
            return allowed
        return allowed & _eagle3_sample_allowed(b, q_idx, kv_idx, Q_LEN, seq_lens, doc_ids)

    return eagle3_live_mask


def _plain_eagle3_mask_mod(Q_LEN: int, doc_ids: Tensor | None = None) -> _mask_mod_signature:
    """The Eagle3 rule without the live check and without seq_lens (Note [FA4 mask_mod] in
    ``_fa4.py``); with ``doc_ids`` it keeps the document check, which reads only ``[B, Q_LEN]``.

    The query's document is read at ``q_idx % Q_LEN``: a kernel evaluates mask_mod on whole tiles,
    and the rows of the last tile past Q_LEN must not index past the tensor (their results are
    dropped). The key's position ``kv_idx % Q_LEN`` is in range already.
    """
    if doc_ids is None:
        return eagle3_mask_mod(Q_LEN)

    def eagle3_doc_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same_doc = _eagle3_sample_allowed(b, q_idx % Q_LEN, kv_idx, Q_LEN, None, doc_ids)
        return _eagle3_allowed(q_idx, kv_idx, Q_LEN) & same_doc

    return eagle3_doc_mask


def _plain_mask_mod_is_exact(Q_LEN: int, q_bs: int, kv_bs: int) -> bool:
    """Whether a compiled kernel given the live-round block tensors and the *plain* Eagle3 mask_mod
    (no live check) computes exactly the live mask.

    Note [when the plain mask_mod is exact]
        Dead keys reach mask_mod only through the one PARTIAL kv-block that straddles the live
        end r * Q_LEN; none exists when Q_LEN is a multiple of KV_BLOCK_SIZE. Otherwise take that
        block [lo, lo + KV_BS), lo < r * Q_LEN. A dead key kv = r * Q_LEN + q' in it passes the
        plain rule only with query q' <= KV_BS - 2, which lies in q-block 0 (KV_BS <= Q_BS). The
        block is listed for a q-block only if some live key in it needs a query there: the last
        round's diagonal (or, for r = 1, the causal keys) gives queries q >= lo - (r-1) * Q_LEN >
        Q_LEN - KV_BS. So q-block 0 gets the block only if Q_BS - 1 > Q_LEN - KV_BS, and for
        Q_LEN >= Q_BS + KV_BS - 1 no dead key is ever evaluated. (Checked by brute force against
        the dense mask in tests/test_fa4.py; below the bound mismatches exist.)
    """
    return Q_LEN % kv_bs == 0 or Q_LEN >= q_bs + kv_bs - 1


def _static_eagle3_block_mask(
    Q_LEN: int,
    max_rounds: int,
    q_bs: int,
    kv_bs: int,
    B: int,
    H: int,
    rounds: Tensor | int,
    device: torch.device,
    *,
    seq_lens: Tensor | None = None,
    doc_ids: Tensor | None = None,
    plain_mask_mod: bool = False,
) -> BlockMask:
    """The static-width BlockMask for ``rounds`` live rounds (Note [static widths]); no checks.

    ``plain_mask_mod=True`` gives :func:`_plain_eagle3_mask_mod`: no live check, no seq_lens check,
    the document check if doc_ids are given (the block tensors follow all three). It is exact only
    in a compiled kernel (which evaluates mask_mod on PARTIAL blocks alone), only where
    :func:`_plain_mask_mod_is_exact` says so, and with seq_lens only on the query rows below each
    sample's length (the FA4 backend needs this; Note [padding without a mask_mod check] in
    ``modules.py``). The document check only removes pairs, so it keeps the Note's argument: the
    blocks listed with doc_ids are a subset of those listed without.
    """
    KV_LEN = Q_LEN * max_rounds
    if not isinstance(rounds, Tensor):
        rounds = torch.tensor(rounds, device=device)
    tensors = _eagle3_block_mask_op(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, device, rounds, seq_lens, doc_ids)
    if plain_mask_mod:
        mask_mod = _plain_eagle3_mask_mod(Q_LEN, doc_ids)
    else:
        mask_mod = _live_eagle3_mask_mod(Q_LEN, rounds, seq_lens, doc_ids)
    return BlockMask((Q_LEN, KV_LEN), *tensors, BLOCK_SIZE=(q_bs, kv_bs), mask_mod=mask_mod)
