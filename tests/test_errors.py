"""Bad input raises ValueError naming the value and the fix (checked before any op runs)."""

from __future__ import annotations

import pytest
import torch

from compiled_mask import Eagle3Attention, Eagle3BlockMask, eagle3_block_mask, eagle3_mask_mod


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 10), {}, r"Q_LEN must be >= 1, got Q_LEN=0"),
        ((-4, 10), {}, r"Q_LEN must be >= 1, got Q_LEN=-4"),
        ((10, 0), {}, r"KV_LEN must be >= 1, got KV_LEN=0"),
        ((10, 5), {}, r"KV_LEN must be >= Q_LEN .* got Q_LEN=10 and KV_LEN=5\. .*Q_LEN \* r"),
        ((10.0, 20), {}, r"Q_LEN must be an int, got Q_LEN=10\.0"),
        ((10, 20), {"BLOCK_SIZE": (128, 96)}, r"KV_BLOCK_SIZE must divide Q_BLOCK_SIZE, got BLOCK_SIZE=\(128, 96\)"),
        ((10, 20), {"BLOCK_SIZE": (64, 128)}, r"KV_BLOCK_SIZE must divide Q_BLOCK_SIZE, got BLOCK_SIZE=\(64, 128\)"),
        ((10, 20), {"BLOCK_SIZE": 0}, r"Q_BLOCK_SIZE must be >= 1, got Q_BLOCK_SIZE=0"),
        ((10, 20), {"BLOCK_SIZE": (128, -1)}, r"KV_BLOCK_SIZE must be >= 1, got KV_BLOCK_SIZE=-1"),
        ((10, 20), {"BLOCK_SIZE": (128, 64, 32)}, r"BLOCK_SIZE must be an int or a \(Q_BLOCK_SIZE, KV_BLOCK_SIZE\) pair"),
        ((10, 20), {"B": 0}, r"B must be >= 1, got B=0"),
        ((10, 20), {"H": -1}, r"H must be >= 1, got H=-1"),
    ],
)
def test_eagle3_block_mask_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eagle3_block_mask(*args, device="cpu", **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {}, r"eagle3_mask_mod: Q_LEN must be >= 1, got Q_LEN=0"),
        (("256",), {}, r"Q_LEN must be an int, got Q_LEN='256'"),
        ((256.5,), {}, r"Q_LEN must be an int, got Q_LEN=256\.5"),
        ((None,), {}, r"Q_LEN must be an int, got Q_LEN=None"),
        ((True,), {}, r"Q_LEN must be an int, got Q_LEN=True"),
        ((4,), {"seq_lens": [3, 4]}, r"seq_lens must be an int tensor \[B\], got \[3, 4\]"),
        ((4,), {"seq_lens": torch.tensor([3.0])}, r"seq_lens must be an int tensor \[B\], got shape \(1,\) and dtype torch.float32"),
        ((4,), {"doc_ids": torch.zeros(1, 4)}, r"doc_ids must be an int tensor \[B, Q_LEN\], got shape \(1, 4\) and dtype torch.float32"),
        ((4,), {"doc_ids": torch.zeros(1, 5, dtype=torch.long)}, r"doc_ids must be \[B, Q_LEN=4\], got shape \(1, 5\)"),
        ((4,), {"doc_ids": torch.zeros(4, dtype=torch.long)}, r"doc_ids must be an int tensor \[B, Q_LEN\], got shape \(4,\)"),
        ((4,), {"seq_lens": torch.tensor([1, 2]), "doc_ids": torch.zeros(3, 4, dtype=torch.long)}, r"one batch size, got 2 and 3"),
        ((4,), {"seq_lens": torch.tensor([2], dtype=torch.uint64)}, r"seq_lens has dtype torch.uint64, .* seq_lens.to\(torch.int64\)"),
    ],
)
def test_mask_mod_errors(args, kwargs, match):
    """eagle3_mask_mod checks its arguments like the rest of the API (before any tensor op)."""
    with pytest.raises(ValueError, match=match):
        eagle3_mask_mod(*args, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 4), {}, r"q_len must be >= 1, got q_len=0"),
        ((64, 0), {}, r"max_rounds must be >= 1, got max_rounds=0"),
        ((64, 4), {"block_size": (64, 128)}, r"KV_BLOCK_SIZE must divide Q_BLOCK_SIZE"),
        ((64, 4), {"backend": "split", "block_size": 64}, r"backend='split' uses no block mask"),
        ((64, 4), {"backend": "sdpa"}, r"unknown backend='sdpa'; choose one of \['fa4', 'flex', 'split'\]"),
    ],
)
def test_module_construction_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Eagle3Attention(*args, **kwargs)


Q_LEN, ROUNDS, D = 64, 4, 8


def _qkv(q_shape=(1, 4, Q_LEN, D), kv_shape=(1, 2, Q_LEN * ROUNDS, D), dtype=torch.float32):
    return torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q[0], k, v), r"q must be 4-D \[B, H, S, D\], got shape \(4, 64, 8\)"),
        (lambda q, k, v: (q, k, v.unsqueeze(0)), r"v must be 4-D"),
        (lambda q, k, v: (q, k.double(), v), r"share one floating dtype, got torch.float32, torch.float64"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), r"share one floating dtype"),
        (lambda q, k, v: (q, k.to("meta"), v), r"must be on one device, got cpu, meta, cpu"),
        (lambda q, k, v: (q[:, :, :32], k, v), r"q must have Q_LEN=64 positions .* got q.shape=\(1, 4, 32, 8\)"),
        (lambda q, k, v: (q, k[:, :, :192], v[:, :, :192]), r"static buffer of Q_LEN \* max_rounds = 256 positions .* got k.shape=\(1, 2, 192, 8\)"),
        (lambda q, k, v: (q, k[:, :, :192], v), r"static buffer of Q_LEN \* max_rounds = 256"),
        (lambda q, k, v: (q, torch.cat([k, k], 2), torch.cat([v, v], 2)), r"static buffer .* got k.shape=\(1, 2, 512, 8\)"),
        (lambda q, k, v: (q[:, :3], k, v), r"multiple of the K/V heads \(GQA\), got Hq=3 and Hkv=2"),
        (lambda q, k, v: (torch.cat([q, q]), k, v), r"batch and head dims must match"),
        (lambda q, k, v: (q, k[..., :4], v), r"q and k must share the head dim D, got 8 and 4"),
    ],
)
def test_attention_input_errors(mutate, match):
    attn = Eagle3Attention(Q_LEN, ROUNDS)
    with pytest.raises(ValueError, match=match):
        attn(*mutate(*_qkv()), torch.tensor(1))


@pytest.mark.parametrize(
    "rounds, match",
    [
        (0, r"rounds must be in \[1, max_rounds=4\], got rounds=0"),
        (5, r"rounds must be in \[1, max_rounds=4\], got rounds=5"),
        (2.0, r"rounds must be a 0-d int tensor or an int, got 2.0"),
        (True, r"rounds must be a 0-d int tensor or an int, got True"),
        (torch.tensor(2.0), r"rounds must be a 0-d int tensor, got shape \(\) and dtype torch.float32"),
        (torch.tensor([2]), r"rounds must be a 0-d int tensor, got shape \(1,\)"),
        (torch.tensor(2, device="meta"), r"rounds is on meta but the attention inputs are on cpu"),
        (torch.tensor(2, dtype=torch.uint64), r"rounds has dtype torch.uint64, whose values above 2\*\*63 - 1 cannot be widened"),
    ],
)
def test_rounds_errors(rounds, match):
    with pytest.raises(ValueError, match=match):
        Eagle3Attention(Q_LEN, ROUNDS)(*_qkv(), rounds)
    if not isinstance(rounds, torch.Tensor) or rounds.device.type == "cpu":
        with pytest.raises(ValueError, match=match):
            Eagle3BlockMask(Q_LEN, ROUNDS)(rounds)
