"""nn.Modules for Eagle3 TTT: the static-width block mask, and mask + attention in one graph."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from compiled_mask import _fa4, _split
from compiled_mask._checks import (
    _DEFAULT_BLOCK_SIZE,
    _block_sizes,
    _check_device,
    _check_doc_layout,
    _check_input_layout,
    _check_positive,
    _check_rounds,
    _live_rounds,
)
from compiled_mask._flex import flex_eagle3_attention
from compiled_mask._layout import _valid_queries
from compiled_mask._op import _first_keys
from compiled_mask.block_mask import _eagle3_block_mask

__all__ = ["Eagle3BlockMask", "Eagle3Attention"]

# Backends that run a kernel over the Eagle3 BlockMask; "split" needs no mask (_split.py).
_MASK_BACKENDS = {"flex": flex_eagle3_attention, "fa4": _fa4.fa4_eagle3_attention}
_BACKENDS = (*_MASK_BACKENDS, "split")


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
        rounds = _live_rounds(rounds, self.max_rounds, device)  # Note [widen rounds first]
        first_key = _first_keys(self.q_len, seq_lens, doc_ids)  # Note [one layout table]
        return _eagle3_block_mask(self.q_len, self.kv_len, *self.block_size, B, self.H, device,
                                  rounds, first_key)

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
        if backend == "fa4":
            _fa4._check_fa4_installed(where)
        if backend == "split" and (block_size is not None or kernel_options is not None):
            raise ValueError(
                f"{where}: backend='split' uses no block mask: block_size and kernel_options do "
                f"not apply (got block_size={block_size}, kernel_options={kernel_options})."
            )
        if block_size is None and backend == "flex":
            block_size = _DEFAULT_BLOCK_SIZE
        self.block_size = None if block_size is None else _block_sizes(where, block_size)
        if backend == "fa4" and self.block_size is not None:
            _fa4._check_fa4_block_size(where, self.block_size)
        self.q_len = q_len
        self.max_rounds = max_rounds
        self.kv_len = q_len * max_rounds
        self.backend = backend
        self.scale = scale
        self.kernel_options = kernel_options

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
                D 192 and Dv 128) on flex and split (Note [value head dim] in ``_split.py``); fa4
                refuses it (``_fa4._check_fa4_head_dims``).
            rounds: live rounds, a 0-d int tensor on q's device (one graph for all values; a
                value outside [1, max_rounds] is clamped), or eagerly an int in that range.
            seq_lens: optional ``[B]`` valid length of each sample (padded batch); doc_ids:
                optional ``[B, Q_LEN]`` document of each position, -1 for padding (packed
                batch); see ``eagle3_mask_mod``. Query rows with nothing to attend (padding)
                come out as zeros, with zero gradients. With doc_ids, "split" runs its causal
                part on flex_attention (Note [documents in the split backend] in ``_split.py``).

        Returns:
            ``[B, Hq, Q_LEN, Dv]``.
        """
        where = type(self).__name__
        _check_qkv(q, k, v, self.q_len, self.kv_len)
        _check_rounds(where, rounds, self.max_rounds, q.device)
        _check_input_layout(where, self.q_len, seq_lens, doc_ids, q)
        rounds = _live_rounds(rounds, self.max_rounds, q.device)  # Note [widen rounds first]
        first_key = _first_keys(self.q_len, seq_lens, doc_ids)  # Note [one layout table]
        if self.backend == "split":
            return self._split_forward(q, k, v, rounds, first_key, documents=doc_ids is not None)
        block_size = self.block_size_for(q.device)
        if self.backend == "fa4":
            _fa4._check_fa4_device(where, q.device)
            if q.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(
                    f"{where}: backend='fa4' takes bf16 or fp16 inputs, got {q.dtype}. "
                    "Cast q, k, v (e.g. .bfloat16()) or use backend='flex'."
                )
            _fa4._check_fa4_head_dims(where, q.size(3), v.size(3))
            _fa4._check_fa4_call(where, self.q_len, block_size)
        B = 1 if first_key is None else q.size(0)
        block_mask = _eagle3_block_mask(
            self.q_len, self.kv_len, *block_size, B, 1, q.device, rounds, first_key,
            plain_mask_mod=self.backend == "fa4",  # Note [FA4 mask_mod] in _fa4.py
        )
        out = _MASK_BACKENDS[self.backend](
            q, k, v, block_mask, scale=self.scale, kernel_options=self.kernel_options
        )
        return out if self.backend == "flex" else _zero_padding_rows(out, first_key)

    def _split_forward(self, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor,
                       first_key: Tensor | None, documents: bool) -> Tensor:
        where = type(self).__name__
        if q.device.type == "cuda" and q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"{where}: backend='split' on CUDA runs a fused causal kernel (cuDNN or flash "
                f"attention), which takes bf16 or fp16 inputs, got {q.dtype}. Cast q, k, v or "
                f"use backend='flex'."
            )
        if q.device.type == "cuda" and max(q.size(3), v.size(3)) > 256:
            raise ValueError(
                f"{where}: backend='split' on CUDA runs flash attention or cuDNN for the causal "
                f"part, which take head dims up to 256, got D={q.size(3)} and Dv={v.size(3)}. "
                "Use backend='flex'."
            )
        if not documents:
            out = _split.split_eagle3_attention(q, k, v, rounds, q_len=self.q_len, scale=self.scale)
        else:  # Note [documents in the split backend] in _split.py
            if q.device.type == "cpu" and torch.compiler.is_compiling():
                raise NotImplementedError(
                    f"{where}: backend='split' with doc_ids runs its causal part on "
                    "flex_attention with its log-sum-exp, which torch's compiled CPU flex does "
                    "not return (it runs eagerly on CPU, and compiled on CUDA). On CPU compile "
                    "backend='flex' instead."
                )
            causal = _eagle3_block_mask(self.q_len, self.q_len, _DEFAULT_BLOCK_SIZE, _DEFAULT_BLOCK_SIZE,
                                        q.size(0), 1, q.device, None, first_key)
            out = _split.split_document_attention(q, k, v, rounds, causal, q_len=self.q_len,
                                                  scale=self.scale)
        return _zero_padding_rows(out, first_key)

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


def _zero_padding_rows(out: Tensor, first_key: Tensor | None) -> Tensor:
    """Zero the padding query rows of a layout (Note [padding without a mask_mod check]); ``out``
    as it is without one (``first_key`` None).

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
        how FA4 writes a row with no key.
    """
    if first_key is None:
        return out
    valid = _valid_queries(out.size(2), first_key, out.device)  # [B, Q_LEN]
    return out * valid[:, None, :, None].to(out.dtype)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, q_len: int, kv_len: int) -> None:
    """Shape, dtype and device checks of the attention inputs (metadata only)."""
    where = "Eagle3Attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}.")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(
            f"{where}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{where}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}."
        )
    if q.size(2) != q_len:
        raise ValueError(
            f"{where}: q must have Q_LEN={q_len} positions (dim 2), got q.shape={tuple(q.shape)}."
        )
    if k.size(2) != kv_len or v.size(2) != kv_len:
        raise ValueError(
            f"{where}: k and v must be the static buffer of Q_LEN * max_rounds = {kv_len} "
            f"positions (dim 2), got k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)}. "
            "Allocate it once for max_rounds and write round s at [s * Q_LEN, (s + 1) * Q_LEN)."
        )
    if q.size(0) != k.size(0) or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{where}: batch and head dims must match: q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}."
        )
    if q.size(3) != k.size(3):
        raise ValueError(
            f"{where}: q and k must share the head dim D, got {q.size(3)} and {k.size(3)}."
        )
    if q.size(1) % k.size(1) != 0:
        raise ValueError(
            f"{where}: the number of query heads must be a multiple of the K/V heads (GQA), "
            f"got Hq={q.size(1)} and Hkv={k.size(1)}."
        )
