"""nn.Modules for Eagle3 TTT: the static-width block mask, and mask + attention in one graph."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from compiled_mask import _fa4
from compiled_mask._checks import (
    _DEFAULT_BLOCK_SIZE,
    _block_sizes,
    _check_device,
    _check_doc_layout,
    _check_positive,
    _check_rounds,
    _check_qkv,
    _live_rounds,
)
from compiled_mask._flex import flex_eagle3_attention
from compiled_mask._inputs import Layout, normalize_layout
from compiled_mask._layout import _valid_queries, _zero_padding
from compiled_mask._split import split_attention
from compiled_mask.block_mask import _eagle3_block_mask

__all__ = ["Eagle3BlockMask", "Eagle3Attention"]


class Eagle3BlockMask(nn.Module):
    """The Eagle3 BlockMask over a static K/V buffer of ``q_len * max_rounds`` keys.

    ``forward(rounds)`` lists only the blocks of the first ``rounds`` rounds; later rounds are
    absent from all eight tensors, so no kernel visits them. All shapes depend only on the
    constructor's ints, so a compiled caller builds one graph for every TTT step
    (Note [static widths] in ``_op.py``).

    Args:
        q_len: queries per round (Q_LEN).
        max_rounds: rounds the K/V buffer holds; KV_LEN = q_len * max_rounds.
        block_size: an int or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)``, KV_BLOCK_SIZE dividing
            Q_BLOCK_SIZE.
        B, H: batch and head dims of the mask tensors (1 broadcasts).

    Example::

        >>> masks = Eagle3BlockMask(256, max_rounds=4)
        >>> bm = masks(torch.tensor(2))  # rounds 0 and 1 live, of 4
        >>> bm.seq_lengths, bm.kv_indices.shape  # static width: one graph for every step
        ((256, 1024), torch.Size([1, 1, 2, 8]))
        >>> bm.kv_num_blocks[0, 0].tolist()  # the diagonal and one block of round 1 per q-block
        [2, 2]
    """

    def __init__(
        self,
        q_len: int,
        max_rounds: int,
        *,
        block_size: int | tuple[int, int] = 128,
        B: int = 1,
        H: int = 1,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        _check_positive(where, q_len=q_len, max_rounds=max_rounds, B=B, H=H)
        self.q_len = q_len
        self.max_rounds = max_rounds
        self.kv_len = q_len * max_rounds
        self.block_size = _block_sizes(where, block_size)
        self.B = B
        self.H = H

    def forward(
        self,
        rounds: Tensor | int,
        *,
        seq_lens: Tensor | None = None,
        doc_ids: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """The BlockMask for ``rounds`` live rounds.

        Args:
            rounds: live rounds, a 0-d int tensor (clamped to [1, max_rounds] in the graph) or,
                eagerly, an int in that range.
            seq_lens: optional ``[B]`` valid length of each sample; doc_ids: optional
                ``[B, q_len]`` document of each position, -1 for padding (``eagle3_mask_mod``).
                Tensors: new values never recompile.
            device: where to build when ``rounds`` is an int (default: CPU); a tensor's own
                device is used otherwise.

        Returns:
            A BlockMask with ``seq_lengths=(q_len, q_len * max_rounds)``.
        """
        where = type(self).__name__
        if isinstance(rounds, Tensor):
            device = rounds.device
        device = _check_device(where, "cpu" if device is None else device)
        _check_rounds(where, rounds, self.max_rounds, device)
        B = _check_doc_layout(where, self.q_len, self.B, seq_lens, doc_ids, device)
        layout = normalize_layout(where, self.q_len, seq_lens, doc_ids, device)  # Note [one layout table]
        rounds = _live_rounds(rounds, self.max_rounds, device)  # Note [widen rounds first]
        return _eagle3_block_mask(self.q_len, self.kv_len, *self.block_size, B, self.H, device,
                                  rounds, layout.first_key)

    def extra_repr(self) -> str:
        return f"q_len={self.q_len}, max_rounds={self.max_rounds}, block_size={self.block_size}"


class Eagle3Attention(nn.Module):
    """Eagle3 TTT attention: the analytical mask and the attention kernel in one compiled graph.

    Queries are the ``q_len`` positions of the sequence; keys and values live in a static buffer
    of ``q_len * max_rounds`` positions (round s at ``[s * q_len, (s + 1) * q_len)``), of which
    the first ``rounds`` rounds are live. Keys of later rounds are never attended (their values
    must still be finite, e.g. a zero-initialised buffer: a kernel may read them in a block that
    straddles the live end, with zero weight). ``torch.compile(model, fullgraph=True)`` of a model
    using this module compiles one graph for every value of ``rounds``.

    Args:
        q_len: queries per round (Q_LEN).
        max_rounds: rounds the K/V buffer holds.
        backend: ``"flex"``: flex_attention (Triton on CUDA, C++ on CPU); ``"fa4"``:
            FlashAttention-4 through flex_attention's FLASH lowering (CUDA SM90+, bf16/fp16,
            compiled; needs ``pip install 'compiled-mask[fa4]'``); ``"split"``: fused causal
            attention (cuDNN's, as SDPA picks on Hopper; flash attention where cuDNN cannot run)
            plus the suffix diagonals as one dot product per query and round, merged by
            log-sum-exp (no block mask; any Q_LEN; ``_split.py``).
        block_size: an int or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)``, KV_BLOCK_SIZE dividing
            Q_BLOCK_SIZE. Default: 128 for flex; for fa4 (128, 128) on Hopper and (256, 128) on
            Blackwell, read from the inputs' device.
        scale: softmax scale; default ``1 / sqrt(D)``.
        kernel_options: passed to flex_attention.

    Example::

        >>> attn = Eagle3Attention(q_len=64, max_rounds=3, backend="split")
        >>> q = torch.randn(2, 8, 64, 32)  # [B, Hq, Q_LEN, D]
        >>> k_buf = torch.zeros(2, 2, 64 * 3, 32)  # [B, Hkv, Q_LEN * max_rounds, D]
        >>> v_buf = torch.zeros(2, 2, 64 * 3, 32)
        >>> k_buf[:, :, :64], v_buf[:, :, :64] = torch.randn(2, 2, 2, 64, 32)  # round 0
        >>> attn(q, k_buf, v_buf, torch.tensor(1)).shape  # step 1: one live round
        torch.Size([2, 8, 64, 32])
    """

    def __init__(
        self,
        q_len: int,
        max_rounds: int,
        *,
        backend: str = "flex",
        block_size: int | tuple[int, int] | None = None,
        scale: float | None = None,
        kernel_options: dict | None = None,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        if backend not in _BACKENDS:
            raise ValueError(
                f"{where}: unknown backend={backend!r}; choose one of {sorted(_BACKENDS)}."
            )
        _check_positive(where, q_len=q_len, max_rounds=max_rounds)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"{where}: scale must be a finite float or None (1 / sqrt(D)), got scale={scale!r}.")
        self.q_len = q_len
        self.max_rounds = max_rounds
        self.kv_len = q_len * max_rounds
        self.backend = backend
        self.scale = None if scale is None else float(scale)
        self.kernel_options = kernel_options
        self.block_size = _BACKENDS[backend].init(where, block_size, kernel_options)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rounds: Tensor | int,
        *,
        seq_lens: Tensor | None = None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """Attention of ``q`` over the live rounds of the K/V buffer.

        Args:
            q: ``[B, Hq, Q_LEN, D]``.
            k: ``[B, Hkv, Q_LEN * max_rounds, D]``, Hq a multiple of Hkv (GQA).
            v: ``[B, Hkv, Q_LEN * max_rounds, Dv]``; Dv may differ from D (MLA-style heads, e.g.
                D 192 and Dv 128) on flex and split (Note [value head dim] in ``_causal.py``);
                fa4 refuses it (``_fa4._check_fa4_head_dims``).
            rounds: live rounds, a 0-d int tensor on q's device (one graph for all values; a
                value outside [1, max_rounds] is clamped), or eagerly an int in that range.
            seq_lens: optional ``[B]`` valid length of each sample (padded batch); doc_ids:
                optional ``[B, Q_LEN]`` document of each position, -1 for padding (packed
                batch); see ``eagle3_mask_mod``. Query rows with nothing to attend (padding)
                come out as zeros, with zero gradients, whatever q, k and v hold at padding
                positions (NaN included). With doc_ids, "split" runs its causal part on
                flex_attention on CUDA (Note [documents in the split backend] in ``_split.py``).

        Returns:
            ``[B, Hq, Q_LEN, Dv]``.
        """
        where = type(self).__name__
        _check_qkv(where, q, k, v, self.q_len, self.kv_len)
        _check_rounds(where, rounds, self.max_rounds, q.device)
        layout = normalize_layout(where, self.q_len, seq_lens, doc_ids, q.device, q.size(0))  # Note [one layout table]
        rounds = _live_rounds(rounds, self.max_rounds, q.device)  # Note [widen rounds first]
        return self._attend(q, k, v, rounds, layout)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, layout: Layout, *,
                finite_padding: bool = False) -> Tensor:
        """The attention from checked, normalised inputs: ``rounds`` widened and clamped
        (``_live_rounds``), ``layout`` from ``normalize_layout``. ``finite_padding``: the caller
        guarantees finite q, k and v at padding positions, so none is zeroed here (Note [padding
        is garbage])."""
        backend = _BACKENDS[self.backend]
        backend.check(self, q, v)
        if q.numel() == 0 or v.size(-1) == 0:  # B or Hq of 0: nothing to attend
            return q.new_zeros(*q.shape[:3], v.size(-1))
        if layout.first_key is not None and not finite_padding:
            q, k, v = _zero_padding(q, k, v, layout.first_key, self.q_len)  # Note [padding is garbage]
        out = backend.run(self, q, k, v, rounds, layout)
        if layout.first_key is None or not backend.zero_padding_rows:
            return out
        return _zero_padding_rows(out, layout.first_key)

    def block_size_for(self, device: torch.device) -> tuple[int, int]:
        """The (Q_BLOCK_SIZE, KV_BLOCK_SIZE) of the mask for inputs on ``device`` (for "split",
        which needs no mask, flex's default: what a BlockMask of the same attention would use)."""
        if self.backend == "split":
            return (_DEFAULT_BLOCK_SIZE, _DEFAULT_BLOCK_SIZE)
        return self.block_size or _fa4.fa4_default_block_size(device)

    def extra_repr(self) -> str:
        return (
            f"q_len={self.q_len}, max_rounds={self.max_rounds}, backend={self.backend!r}, "
            f"block_size={self.block_size}"
        )


# ----------------------------------------------------------------------------- the backend table


def _init_flex(where: str, block_size, kernel_options) -> tuple[int, int]:
    return _block_sizes(where, _DEFAULT_BLOCK_SIZE if block_size is None else block_size)


def _check_flex(attn: Eagle3Attention, q: Tensor, v: Tensor) -> None:
    pass


def _run_flex(attn: Eagle3Attention, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, layout: Layout) -> Tensor:
    B = 1 if layout.first_key is None else q.size(0)
    block_mask = _eagle3_block_mask(attn.q_len, attn.kv_len, *attn.block_size_for(q.device), B, 1, q.device,
                                    rounds, layout.first_key)
    return flex_eagle3_attention(q, k, v, block_mask, scale=attn.scale, kernel_options=attn.kernel_options)


def _init_fa4(where: str, block_size, kernel_options) -> tuple[int, int] | None:
    _fa4._check_fa4_installed(where)
    if block_size is None:
        return None  # from the device, at the first call
    block_size = _block_sizes(where, block_size)
    _fa4._check_fa4_block_size(where, block_size)
    return block_size


def _check_fa4(attn: Eagle3Attention, q: Tensor, v: Tensor) -> None:
    where = type(attn).__name__
    _fa4._check_fa4_device(where, q.device)
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"{where}: backend='fa4' takes bf16 or fp16 inputs, got {q.dtype}. "
            "Cast q, k, v (e.g. .bfloat16()) or use backend='flex'."
        )
    _fa4._check_fa4_head_dims(where, q.size(3), v.size(3))
    _fa4._check_fa4_call(where, attn.q_len, attn.block_size_for(q.device))


def _run_fa4(attn: Eagle3Attention, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, layout: Layout) -> Tensor:
    B = 1 if layout.first_key is None else q.size(0)
    block_mask = _eagle3_block_mask(attn.q_len, attn.kv_len, *attn.block_size_for(q.device), B, 1, q.device,
                                    rounds, layout.first_key, plain_mask_mod=True)  # Note [FA4 mask_mod]
    return _fa4.fa4_eagle3_attention(q, k, v, block_mask, scale=attn.scale, kernel_options=attn.kernel_options)


def _init_split(where: str, block_size, kernel_options) -> None:
    if block_size is not None or kernel_options is not None:
        raise ValueError(
            f"{where}: backend='split' uses no block mask: block_size and kernel_options do "
            f"not apply (got block_size={block_size}, kernel_options={kernel_options})."
        )
    return None


def _check_split(attn: Eagle3Attention, q: Tensor, v: Tensor) -> None:
    where = type(attn).__name__
    if q.device.type != "cuda":
        return
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"{where}: backend='split' on CUDA runs a fused causal kernel (cuDNN or flash "
            f"attention), which takes bf16 or fp16 inputs, got {q.dtype}. Cast q, k, v or "
            f"use backend='flex'."
        )
    if max(q.size(3), v.size(3)) > 256:
        raise ValueError(
            f"{where}: backend='split' on CUDA runs flash attention or cuDNN for the causal "
            f"part, which take head dims up to 256, got D={q.size(3)} and Dv={v.size(3)}. "
            "Use backend='flex'."
        )


def _run_split(attn: Eagle3Attention, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, layout: Layout) -> Tensor:
    first_key = document_mask = None
    if layout.documents:  # Note [documents in the split backend] in _split.py
        if q.device.type == "cuda":
            document_mask = _eagle3_block_mask(attn.q_len, attn.q_len, _DEFAULT_BLOCK_SIZE, _DEFAULT_BLOCK_SIZE,
                                               q.size(0), 1, q.device, None, layout.first_key)
        else:
            first_key = layout.first_key
    return split_attention(q, k, v, rounds, q_len=attn.q_len, scale=attn.scale, first_key=first_key,
                           document_mask=document_mask)


class _Backend(NamedTuple):
    """A backend of :class:`Eagle3Attention`: ``init(where, block_size, kernel_options)`` checks
    the constructor's arguments and returns the block size it keeps; ``check(attn, q, v)``
    refuses inputs it cannot take, before any op runs; ``run(attn, q, k, v, rounds, layout)``
    attends; ``zero_padding_rows``: whether its padding rows need zeroing after it (flex's mask
    leaves them no key, so they are zeros already; Inductor's CPU flex template also takes no
    epilogue)."""

    init: Callable
    check: Callable
    run: Callable
    zero_padding_rows: bool


_BACKENDS = {
    "flex": _Backend(_init_flex, _check_flex, _run_flex, zero_padding_rows=False),
    "fa4": _Backend(_init_fa4, _check_fa4, _run_fa4, zero_padding_rows=True),
    "split": _Backend(_init_split, _check_split, _run_split, zero_padding_rows=True),
}


def _zero_padding_rows(out: Tensor, first_key: Tensor) -> Tensor:
    """Zero the padding query rows of a layout (Note [padding without a mask_mod check]).

    Note [padding without a mask_mod check]
        The split backend runs the Eagle3 rule without a padding check: with seq_lens only, its
        causal kernel has none, and its suffix always lets a query see its own diagonal. For a
        valid query q that changes nothing: its causal keys kv <= q and its suffix keys kv' = q
        are all valid (Note [one layout table] in ``_layout.py``). Only padding rows see anything
        they should not, so they are set to zeros here, the defined output (and their gradients,
        through this product, are zero). With documents, split's causal part runs on the
        per-document mask (Note [documents in the split backend] in ``_split.py``); its suffix
        still needs the zeroing. fa4's plain mask_mod reads the layout table, so its padding rows
        attend nothing already; they are zeroed too, so that the defined output does not rest on
        how FA4 writes a row with no key. A ``where``, not a product: a padding row may hold NaN
        (its q is garbage), and its gradient is zero either way.
    """
    valid = _valid_queries(out.size(2), first_key, out.device)  # [B, Q_LEN]
    return torch.where(valid[:, None, :, None], out, 0.0)  # [B, Hq, Q_LEN, Dv]
