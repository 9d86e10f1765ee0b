"""Exact parity of the analytical BlockMask with create_block_mask on the reference mask_mod."""

from __future__ import annotations

import pytest
import strategies
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import (
    PAIRS,
    assert_same_blocks,
    assert_same_live_blocks,
    ceil_div,
    eagle3_dense,
    listed,
    reference_block_mask,
)

from compiled_mask import Eagle3BlockMask, eagle3_block_mask

# (Q_LEN, KV_LEN, BLOCK_SIZE): each row names what it covers.
GRID = [
    (256, 256, 128),  # single round, aligned
    (256, 2048, 128),  # many rounds (8), aligned
    (1024, 4096, (256, 128)),  # Blackwell FA4 blocks, aligned
    (300, 900, 128),  # Q_LEN not a block multiple: diagonals straddle kv blocks
    (300, 1000, 128),  # KV_LEN not a multiple of Q_LEN: a partial last round
    (100, 250, (64, 32)),  # rectangular, both unaligned
    (50, 200, 128),  # Q_LEN smaller than one block
    (1, 1, 128),  # Q_LEN = 1, one key
    (1, 7, 128),  # Q_LEN = 1: every suffix key attends (x % 1 == 0)
    (1, 5, 1),  # Q_LEN = 1 with 1x1 blocks: suffix blocks are FULL
    (7, 30, 1),  # 1x1 blocks: one block per pair
    (12, 40, (4, 2)),  # tiny rectangular blocks
    (130, 520, (128, 64)),  # rectangular, unaligned, 4 rounds
    (384, 1280, (256, 128)),  # Q_LEN a multiple of KV_BS but not of Q_BS
]


@pytest.mark.parametrize("Q_LEN, KV_LEN, BLOCK_SIZE", GRID)
def test_matches_create_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE):
    ours = eagle3_block_mask(Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE)
    assert_same_blocks(ours, reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE))


@pytest.mark.parametrize("B, H", [(2, 1), (1, 3), (2, 3), (None, None)])
def test_batch_and_heads(B, H):
    ours = eagle3_block_mask(100, 300, B=B, H=H, device="cpu", BLOCK_SIZE=(64, 32))
    assert_same_blocks(ours, reference_block_mask(100, 300, (64, 32), B=B, H=H))


def test_mask_mod_is_the_reference():
    Q_LEN, KV_LEN = 37, 120
    bm = eagle3_block_mask(Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=16)
    q = torch.arange(Q_LEN).unsqueeze(-1)
    kv = torch.arange(KV_LEN).unsqueeze(0)
    assert torch.equal(bm.mask_mod(None, None, q, kv), eagle3_dense(Q_LEN, KV_LEN))


def test_aligned_structure():
    """DESIGN.md's aligned case: causal FULL below the diagonal, r PARTIAL per suffix round."""
    Q_LEN, rounds, (q_bs, kv_bs) = 512, 3, (256, 128)
    r = q_bs // kv_bs
    bm = eagle3_block_mask(Q_LEN, Q_LEN * rounds, device="cpu", BLOCK_SIZE=(q_bs, kv_bs))
    n_q = Q_LEN // q_bs
    for qi in range(n_q):
        full = set(bm.full_kv_indices[0, 0, qi, : bm.full_kv_num_blocks[0, 0, qi]].tolist())
        partial = set(bm.kv_indices[0, 0, qi, : bm.kv_num_blocks[0, 0, qi]].tolist())
        assert full == set(range(qi * r))
        suffix = {s * Q_LEN // kv_bs + qi * r + j for s in range(1, rounds) for j in range(r)}
        assert partial == set(range(qi * r, (qi + 1) * r)) | suffix


@st.composite
def shapes(draw):
    kv_bs = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]))
    q_bs = kv_bs * draw(st.sampled_from([1, 2, 4]))
    Q_LEN = draw(st.integers(1, 300))
    rounds = draw(st.integers(1, 6))
    extra = draw(st.integers(0, Q_LEN - 1))
    # Keep the number of blocks (and create_block_mask's dense grid) small enough to be fast.
    KV_LEN = Q_LEN * rounds + extra
    if ceil_div(Q_LEN, q_bs) * ceil_div(KV_LEN, kv_bs) > 20_000:
        kv_bs, q_bs = 64, 128
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 2))
    return Q_LEN, KV_LEN, (q_bs, kv_bs), B, H


@settings(max_examples=250, deadline=None, derandomize=False)
@given(shapes())
def test_fuzz_matches_create_block_mask(shape):
    Q_LEN, KV_LEN, BLOCK_SIZE, B, H = shape
    ours = eagle3_block_mask(Q_LEN, KV_LEN, B=B, H=H, device="cpu", BLOCK_SIZE=BLOCK_SIZE)
    assert_same_blocks(ours, reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE, B=B, H=H))


@pytest.mark.parametrize(
    "q_len, max_rounds, block_size",
    [(256, 8, 128), (300, 4, 128), (100, 5, (64, 32)), (1, 4, 1), (384, 3, (256, 128))],
)
def test_static_width_lists_only_live_rounds(q_len, max_rounds, block_size):
    """For every live count r, the blocks equal create_block_mask's at KV_LEN = Q_LEN * r."""
    module = Eagle3BlockMask(q_len, max_rounds, block_size=block_size)
    q_bs, kv_bs = module.block_size
    n_kv_max = ceil_div(q_len * max_rounds, kv_bs)
    for r in range(1, max_rounds + 1):
        ours = module(torch.tensor(r))
        assert ours.kv_indices.shape[-1] == n_kv_max  # static width
        assert ours.seq_lengths == (q_len, q_len * max_rounds)
        assert_same_live_blocks(ours, reference_block_mask(q_len, q_len * r, block_size))
        # Its mask_mod is the reference on the live keys and False past them.
        q = torch.arange(q_len).unsqueeze(-1)
        kv = torch.arange(q_len * max_rounds).unsqueeze(0)
        dense = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * r)
        assert torch.equal(ours.mask_mod(None, None, q, kv), dense)


@pytest.mark.parametrize("rounds", [0, -3, 9, 1000, 2**40])
def test_static_width_clamps_out_of_range_tensor(rounds):
    """A live count outside [1, max_rounds] is clamped: valid indices, never out of bounds."""
    module = Eagle3BlockMask(100, 8, block_size=(64, 32))
    clamped = min(max(rounds, 1), 8)
    ours = module(torch.tensor(rounds))
    want = module(torch.tensor(clamped))
    for num_name, idx_name in PAIRS:
        got_set = listed(getattr(ours, num_name), getattr(ours, idx_name))
        assert torch.equal(got_set, listed(getattr(want, num_name), getattr(want, idx_name)))
    q = torch.arange(100).unsqueeze(-1)
    kv = torch.arange(800).unsqueeze(0)
    assert torch.equal(ours.mask_mod(None, None, q, kv), want.mask_mod(None, None, q, kv))


@pytest.mark.parametrize("dtype", strategies.INT_DTYPES)
def test_static_width_rounds_of_every_int_dtype(dtype):
    """Every integer dtype means its value: widened to int64 and clamped, never wrapped."""
    module = Eagle3BlockMask(100, 8, block_size=(64, 32))
    info = torch.iinfo(dtype)
    q = torch.arange(100).unsqueeze(-1)
    kv = torch.arange(800).unsqueeze(0)
    for value in sorted(x for x in {info.min, -1, 0, 3, 8, 9, 127, info.max} if info.min <= x <= info.max):
        ours = module(torch.tensor(value, dtype=dtype))
        live = min(max(value, 1), 8)
        assert_same_live_blocks(ours, reference_block_mask(100, 100 * live, (64, 32)))
        assert torch.equal(ours.mask_mod(None, None, q, kv), eagle3_dense(100, 800, live_kv_len=100 * live))
