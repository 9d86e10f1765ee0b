"""``eagle3_block_mask``: the Eagle3 BlockMask, built analytically, eagerly or inside torch.compile."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature

from compiled_mask._checks import (
    _block_sizes,
    _check_device,
    _check_doc_layout,
    _check_lengths,
    _check_positive,
)
from compiled_mask._layout import _layout_allowed
from compiled_mask._inputs import normalize_layout
from compiled_mask._op import _eagle3_block_mask_op
from compiled_mask.mask_mod import _eagle3_allowed

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
            (packed batches; a document is a maximal run of equal ids). With either, the mask has
            one row set per sample (B = their batch; H stays as given), blocks of padding or of
            pairs across documents are absent, and changing their values never recompiles.

    Returns:
        A BlockMask with ``seq_lengths=(Q_LEN, KV_LEN)`` and ``mask_mod=eagle3_mask_mod(Q_LEN,
        seq_lens=..., doc_ids=...)``, whose tensors have shapes ``[B, H, n_q]`` /
        ``[B, H, n_q, n_kv]`` (and the transposes).

    Example::

        >>> bm = eagle3_block_mask(256, 256 * 3, device="cpu", BLOCK_SIZE=128)
        >>> bm.kv_num_blocks[0, 0].tolist(), bm.full_kv_num_blocks[0, 0].tolist()  # per q-block
        ([3, 3], [0, 1])
        >>> bm.kv_indices[0, 0, 1, :3].tolist()  # PARTIAL: the diagonal and one block per round
        [1, 3, 5]
    """
    where = "eagle3_block_mask"
    B = 1 if B is None else B
    H = 1 if H is None else H
    _check_lengths(where, Q_LEN, KV_LEN)
    _check_positive(where, B=B, H=H)
    q_bs, kv_bs = _block_sizes(where, BLOCK_SIZE)
    device = _check_device(where, device)
    B = _check_doc_layout(where, Q_LEN, B, seq_lens, doc_ids, device)
    layout = normalize_layout(where, Q_LEN, seq_lens, doc_ids, device)  # Note [one layout table]
    return _eagle3_block_mask(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, device, None, layout.first_key)


def _eagle3_block_mask(
    Q_LEN: int,
    KV_LEN: int,
    q_bs: int,
    kv_bs: int,
    B: int,
    H: int,
    device: torch.device,
    rounds: Tensor | None,
    first_key: Tensor | None,
    *,
    plain_mask_mod: bool = False,
) -> BlockMask:
    """The BlockMask from checked arguments: the op's eight tensors and the matching mask_mod.

    ``rounds``: None (every key live: :func:`eagle3_block_mask`) or the 0-d int64 live-round count
    already clamped to [1, ceil(KV_LEN / Q_LEN)] (``_checks._live_rounds``); ``first_key``: the
    layout table or None (Note [one layout table] in ``_layout.py``). ``plain_mask_mod=True``
    gives :func:`_plain_eagle3_mask_mod` (the FA4 backend's).
    """
    tensors = _eagle3_block_mask_op(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, device, rounds, first_key)
    if plain_mask_mod:
        mask_mod = _plain_eagle3_mask_mod(Q_LEN, first_key)
    else:
        mask_mod = _eagle3_live_mask_mod(Q_LEN, rounds, first_key)
    return BlockMask((Q_LEN, KV_LEN), *tensors, BLOCK_SIZE=(q_bs, kv_bs), mask_mod=mask_mod)


def _eagle3_live_mask_mod(Q_LEN: int, rounds: Tensor | None, first_key: Tensor | None
                          ) -> _mask_mod_signature:
    """The Eagle3 rule restricted to a layout (``first_key``, Note [one layout table] in
    ``_layout.py``) and, with ``rounds`` (a 0-d int64 tensor in [1, max_rounds]), to the keys of
    the first ``rounds`` rounds. With neither it is :func:`eagle3_mask_mod`'s rule.

    Note [live keys in mask_mod]
        The block tensors already leave out every block wholly past the live keys, but a kernel
        still evaluates mask_mod on a PARTIAL block that straddles the end of the live keys
        (Q_LEN not a multiple of KV_BLOCK_SIZE), and eager flex_attention evaluates it on the
        whole grid. Without this check both would let queries see the next, dead round's
        diagonal. The check is ``kv < rounds * Q_LEN`` on the count the op takes, widened to
        int64 and clamped before it (Note [widen rounds first] in ``_checks.py``). mask_mod
        captures the very tensor the op takes: Inductor's CPU flex template (torch 2.13) cannot
        lower a mask_mod that captures a tensor computed in the graph and not realized
        (NoValidChoicesError), and an op input is always realized. The same holds for first_key.
    """

    def eagle3_live_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = _eagle3_allowed(q_idx, kv_idx, Q_LEN)
        if rounds is not None:
            allowed = allowed & (kv_idx < rounds * Q_LEN)
        if first_key is not None:
            allowed = allowed & _layout_allowed(b, q_idx, kv_idx, Q_LEN, first_key)
        return allowed

    return eagle3_live_mask


def _plain_eagle3_mask_mod(Q_LEN: int, first_key: Tensor | None = None) -> _mask_mod_signature:
    """The Eagle3 rule without the live check (Note [FA4 mask_mod] in ``_fa4.py``), restricted to
    the layout when ``first_key`` is given (it reads only that ``[B, Q_LEN]`` table).

    The query's entry is read at ``q_idx % Q_LEN``: a kernel evaluates mask_mod on whole tiles,
    and the rows of the last tile past Q_LEN must not index past the table (their results are
    dropped). The key's position ``kv_idx % Q_LEN`` is in range already.
    """

    def eagle3_plain_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = _eagle3_allowed(q_idx, kv_idx, Q_LEN)
        if first_key is None:
            return allowed
        return allowed & _layout_allowed(b, q_idx % Q_LEN, kv_idx, Q_LEN, first_key)

    return eagle3_plain_mask


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
        the dense mask in tests/test_fa4.py; below the bound mismatches exist.) A layout only
        removes pairs, from the mask and from the listed blocks alike, so the bound holds with one.
    """
    return Q_LEN % kv_bs == 0 or Q_LEN >= q_bs + kv_bs - 1
