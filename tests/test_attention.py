"""Attention through compiled flex_attention on the analytical mask (CPU; forward only).

Eager flex_attention ignores the block tensors (it evaluates mask_mod on the whole grid), so the
mask is checked through *compiled* flex_attention, whose CPU kernel reads them. A negative control
shows that it does: a mask without its FULL blocks gives a different output.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import dense_reference_attention, eagle3_dense, reference_block_mask
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from compiled_mask import Eagle3Attention, eagle3_block_mask, eagle3_mask_mod

ATOL = 2e-5  # float32 kernels vs a float64 reference


@functools.cache
def compiled_flex(Q_LEN: int, KV_LEN: int, BLOCK_SIZE: tuple[int, int]):
    """One compiled flex_attention per shape, fed the eight block tensors as inputs.

    The mask_mod is fixed per shape, so our tensors and create_block_mask's go through the very
    same compiled kernel, and only the tensors differ.
    """
    mask_mod = eagle3_mask_mod(Q_LEN)

    def attend(q, k, v, *tensors):
        block_mask = BlockMask((Q_LEN, KV_LEN), *tensors, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))

    return torch.compile(attend, fullgraph=True)


def _tensors(bm: BlockMask):
    return bm.as_tuple()[2:10]


def _qkv(B, Hq, Hkv, Q_LEN, KV_LEN, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Q_LEN, D, generator=g)
    k = torch.randn(B, Hkv, KV_LEN, D, generator=g)
    v = torch.randn(B, Hkv, KV_LEN, D, generator=g)
    return q, k, v


# (Q_LEN, KV_LEN, BLOCK_SIZE, Hq, Hkv)
SHAPES = [
    (200, 600, (128, 128), 4, 2),  # unaligned Q_LEN, 3 rounds, GQA with an H=1 mask
    (256, 1100, (128, 64), 2, 2),  # rectangular blocks, partial last round
]


@pytest.mark.parametrize("Q_LEN, KV_LEN, BLOCK_SIZE, Hq, Hkv", SHAPES)
def test_compiled_flex_matches_reference(Q_LEN, KV_LEN, BLOCK_SIZE, Hq, Hkv):
    q, k, v = _qkv(2, Hq, Hkv, Q_LEN, KV_LEN)
    attend = compiled_flex(Q_LEN, KV_LEN, BLOCK_SIZE)
    ours = attend(q, k, v, *_tensors(eagle3_block_mask(Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE)))
    theirs = attend(q, k, v, *_tensors(reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE)))
    want = dense_reference_attention(q, k, v, eagle3_dense(Q_LEN, KV_LEN))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.double(), want, rtol=0, atol=ATOL)


def test_negative_control_wrong_mask_fails():
    """Dropping the FULL blocks changes the compiled output: the test above can fail."""
    Q_LEN, KV_LEN, BLOCK_SIZE, Hq, Hkv = SHAPES[1]
    q, k, v = _qkv(2, Hq, Hkv, Q_LEN, KV_LEN)
    tensors = list(_tensors(eagle3_block_mask(Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE)))
    assert tensors[2].sum() > 0
    tensors[2] = torch.zeros_like(tensors[2])  # full_kv_num_blocks
    wrong = compiled_flex(Q_LEN, KV_LEN, BLOCK_SIZE)(q, k, v, *tensors)
    want = dense_reference_attention(q, k, v, eagle3_dense(Q_LEN, KV_LEN))
    assert (wrong.double() - want).abs().max() > 100 * ATOL


@pytest.fixture(scope="module")
def ttt_attention():
    """A compiled Eagle3Attention (Q_LEN=200, 4 rounds, GQA 4/2), shared by the tests below."""
    module = Eagle3Attention(200, 4, block_size=128)
    return module, torch.compile(module, fullgraph=True)


def test_static_buffer_every_round(ttt_attention):
    """Each live count attends exactly to its rounds; the dead rounds' keys are ignored."""
    _, compiled = ttt_attention
    q, k, v = _qkv(2, 4, 2, 200, 800, seed=1)
    for r in range(1, 5):
        out = compiled(q, k, v, torch.tensor(r))
        want = dense_reference_attention(q, k, v, eagle3_dense(200, 800, live_kv_len=200 * r))
        torch.testing.assert_close(out.double(), want, rtol=0, atol=ATOL)


def test_eager_module_ignores_dead_rounds(ttt_attention):
    """Eager flex evaluates mask_mod on the whole grid: the live check is in mask_mod too."""
    module, _ = ttt_attention
    q, k, v = _qkv(1, 4, 2, 200, 800, seed=2)
    out = module(q, k, v, torch.tensor(2))
    want = dense_reference_attention(q, k, v, eagle3_dense(200, 800, live_kv_len=400))
    torch.testing.assert_close(out.double(), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype, value, live", [(torch.uint8, 3, 3), (torch.int32, 2**31 - 1, 4)])
def test_compiled_rounds_of_a_narrow_dtype(ttt_attention, dtype, value, live):
    """rounds is widened to int64 before any arithmetic (Note [widen rounds first]): a uint8 3 is 3
    (3 * Q_LEN in uint8 wraps), and an int32 2**31 - 1 is clamped to max_rounds (it overflowed)."""
    _, compiled = ttt_attention
    q, k, v = _qkv(1, 4, 2, 200, 800, seed=3)
    out = compiled(q, k, v, torch.tensor(value, dtype=dtype))
    want = dense_reference_attention(q, k, v, eagle3_dense(200, 800, live_kv_len=200 * live))
    torch.testing.assert_close(out.double(), want, rtol=0, atol=ATOL)


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("q_len, max_rounds", [(40, 3), (8, 1)])
def test_compiled_flex_keys_shorter_than_a_block(q_len, max_rounds):
    """Key axes shorter than one KV block (Note [CPU flex and short key blocks]): Inductor's CPU
    kernel alone gets these wrong, differently per run; three runs must all be exact."""
    attn = torch.compile(Eagle3Attention(q_len, max_rounds), fullgraph=True)
    for seed in range(3):
        q, k, v = _qkv(1, 2, 2, q_len, q_len * max_rounds, seed=seed)
        out = attn(q, k, v, torch.tensor(max_rounds))
        allowed = eagle3_dense(q_len, q_len * max_rounds)
        torch.testing.assert_close(out.double(), dense_reference_attention(q, k, v, allowed), rtol=0, atol=ATOL)
