"""The flex_attention backend: Triton on CUDA, Inductor's C++ template on CPU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def flex_eagle3_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None,
    kernel_options: dict | None,
) -> Tensor:
    """flex_attention over ``block_mask``; GQA when q has more heads than k/v.

    Args:
        q: ``[B, Hq, Q_LEN, D]``; k, v: ``[B, Hkv, KV_LEN, D]`` with Hq a multiple of Hkv.
        block_mask: the Eagle3 BlockMask (its B and H may be 1 and broadcast), whose mask_mod
            attends no key at or past the live end (Note [live keys in mask_mod]).

    Returns:
        ``[B, Hq, Q_LEN, Dv]``.
    """
    if q.device.type == "cpu":
        k, v, block_mask = _whole_kv_blocks(k, v, block_mask)
    q, k, scale = _qk_as_wide_as_v(q, k, v, scale)  # Note [flex tiles follow the q/k head dim]
    kernel_options = _flex_kernel_options(q, k, block_mask, kernel_options)
    return flex_attention(
        q,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.size(1) != k.size(1),
        kernel_options=kernel_options,
    )


def _flex_kernel_options(q: Tensor, k: Tensor, block_mask: BlockMask, kernel_options: dict | None) -> dict | None:
    """The caller's ``kernel_options``, asking for the main kernel on CUDA where Inductor's
    decoding kernel would have no tile (Note [flex decoding and grouped heads])."""
    if q.device.type != "cuda" or _decoding_tiles_fit(q.shape[2], q.size(1) // k.size(1), block_mask):
        return kernel_options
    return {"FORCE_USE_FLEX_ATTENTION": True, **(kernel_options or {})}


def _decoding_tiles_fit(q_len: int, group: int, block_mask: BlockMask) -> bool:
    """Whether Inductor's flex decoding kernel, if it picks it, can tile these queries.

    Note [flex decoding and grouped heads]
        For Q_LEN < 128 with a power-of-two group G of q-heads per K/V head (1 included),
        Inductor lowers flex_attention to its decoding kernel, which tiles the G heads of a
        group and their queries together: ``BLOCK_M = max(16, next_power_of_2(Q_LEN * G))``
        (torch's ``flex_decoding.py``). Where that does not divide the BlockMask's Q block size,
        every kernel config is skipped and compiling fails with ``NoValidChoicesError`` (torch
        2.11 on an H200: Q_LEN 122 and 123 with 2/1 and 4/2 heads and a 128-row Q block;
        Q_LEN 64 with 2/1 heads, 123 with 1/1, or a 256-row Q block compiled). There the main
        kernel is asked for (``FORCE_USE_FLEX_ATTENTION``), which takes any Q_LEN; a caller's
        own ``kernel_options`` still win.
    """
    if q_len >= 128 or group & (group - 1):  # the decoding kernel takes power-of-two groups only
        return True
    tile = max(16, 1 << max(0, q_len * group - 1).bit_length())  # its BLOCK_M: next power of two, >= 16
    return block_mask.BLOCK_SIZE[0] % tile == 0


def _whole_kv_blocks(k: Tensor, v: Tensor, block_mask: BlockMask) -> tuple[Tensor, Tensor, BlockMask]:
    """k, v and the mask over a key axis padded with zeros to a whole number of KV blocks.

    Note [CPU flex and short key blocks]
        Inductor's CPU flex template (torch 2.13) returns wrong outputs, differently from run to
        run, when the key length is below the KV block size, where it takes the key length as
        its kv split (seen with head dim 16 and key lengths 8, 24, 40, 56, 120: errors of 0.7 to
        2.3, and NaN, against eager flex; create_block_mask's own masks alike). With the key axis
        padded to whole KV blocks the kernel's split is always the block size, and the results
        are exact. The padded keys are never attended: they lie past the live end, which the
        block tensors and the mask_mod's live check both exclude (Note [live keys in mask_mod]
        in ``block_mask.py``); the block tensors cover them already (n_kv blocks of KV_BS keys).
        Padding costs a copy of k and v on CPU only, and only when KV_LEN is not a multiple of
        KV_BLOCK_SIZE. (tests/test_attention.py and the compiled API fuzz fail without it.)
    """
    Q_LEN, KV_LEN = block_mask.seq_lengths
    kv_bs = block_mask.BLOCK_SIZE[1]
    pad = -KV_LEN % kv_bs
    if pad == 0:
        return k, v, block_mask
    k = F.pad(k, (0, 0, 0, pad))  # [B, Hkv, n_kv * KV_BS, D]
    v = F.pad(v, (0, 0, 0, pad))
    padded = BlockMask((Q_LEN, KV_LEN + pad), *block_mask.as_tuple()[2:10], BLOCK_SIZE=block_mask.BLOCK_SIZE,
                       mask_mod=block_mask.mask_mod)
    return k, v, padded


def _qk_as_wide_as_v(q: Tensor, k: Tensor, v: Tensor, scale: float | None
                     ) -> tuple[Tensor, Tensor, float | None]:
    """q and k zero-padded to v's head dim where flex would size its tiles too small for v, and
    the softmax scale of the unpadded head dim.

    Note [flex tiles follow the q/k head dim]
        flex_attention's Triton kernels round both head dims up to a power of two, but Inductor
        picks their tile sizes and pipeline stages from the q/k head dim alone (torch 2.11-2.13,
        ``get_flex_attention_bwd_configs(head_dim=query.size(-1))``). With D=128 and Dv=136 the
        backward gets the tiles meant for 128-wide rows while v's rows are 256 wide in the
        kernel, and on an H200 it stops with "No valid triton configs ... out of resource:
        Required: 245760 Hardware limit: 232448" (the GPU API fuzz found it, on flex and on
        split with doc_ids). Zero-padding q and k to Dv leaves every score unchanged (the added
        products are 0; the scale stays 1/sqrt(D)) and lets Inductor size the tiles for the
        wider rows, as it does for any head dim that wide. Only shapes whose rounded Dv exceeds
        the rounded D pay for it: a copy of q and of k (MLA-style D 192 over Dv 128 does not).
        The gradients of the padding columns are dropped by F.pad's backward.
    """
    D, Dv = q.size(-1), v.size(-1)
    if _pow2_ceil(Dv) <= _pow2_ceil(D):
        return q, k, scale
    scale = D**-0.5 if scale is None else scale
    return F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D)), scale


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()
