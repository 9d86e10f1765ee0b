"""The custom op: opcheck, and fake shapes equal to real shapes."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compiled_mask._op import _eagle3_block_mask_op
from compiled_mask._op import _first_keys

CPU = torch.device("cpu")
# (Q_LEN, KV_LEN, Q_BS, KV_BS, B, H, rounds)
CASES = [
    (256, 1024, 128, 128, 1, 1, None),
    (300, 1000, 128, 64, 2, 3, None),
    (1, 3, 1, 1, 1, 1, None),
    (100, 500, 64, 32, 1, 1, 3),
    (100, 500, 64, 32, 2, 1, 0),  # clamped to 1 in the op
    (384, 1536, 256, 128, 1, 2, 4),
]


# With padded/packed batches: (Q_LEN, KV_LEN, Q_BS, KV_BS, H, rounds, seq_lens, doc_ids)
LAYOUT_CASES = [
    (100, 400, 64, 32, 1, 2, [100, 37, 0], None),
    (12, 36, 4, 2, 2, None, None, [[0] * 5 + [1] * 7, [-1] * 12]),
    (130, 390, 128, 64, 1, 3, [120, 130], [[0] * 60 + [1] * 70, [0] * 130]),
]


def _args(case, device=CPU):
    *ints, rounds = case
    rounds = None if rounds is None else torch.tensor(rounds, device=device)
    return (*ints, device, rounds, None)


def _layout_args(case, device=CPU):
    Q_LEN, KV_LEN, q_bs, kv_bs, H, rounds, seq_lens, doc_ids = case
    seq_lens = None if seq_lens is None else torch.tensor(seq_lens, device=device)
    doc_ids = None if doc_ids is None else torch.tensor(doc_ids, device=device)
    B = (seq_lens if seq_lens is not None else doc_ids).shape[0]
    rounds = None if rounds is None else torch.tensor(rounds, device=device)
    return (Q_LEN, KV_LEN, q_bs, kv_bs, B, H, device, rounds, _first_keys(Q_LEN, seq_lens, doc_ids))


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    torch.library.opcheck(_eagle3_block_mask_op, _args(case))


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_opcheck_layouts(case):
    torch.library.opcheck(_eagle3_block_mask_op, _layout_args(case))


@pytest.mark.parametrize("case", CASES)
def test_fake_shapes_equal_real(case):
    real = _eagle3_block_mask_op(*_args(case))
    with FakeTensorMode() as mode:
        *ints, rounds = case
        fake_rounds = None if rounds is None else mode.from_tensor(torch.tensor(rounds))
        fake = _eagle3_block_mask_op(*ints, CPU, fake_rounds, None)
    assert len(fake) == len(real) == 8
    for f, r in zip(fake, real):
        assert (f.shape, f.stride(), f.dtype, f.device) == (r.shape, r.stride(), r.dtype, r.device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_opcheck_cuda(case):
    torch.library.opcheck(_eagle3_block_mask_op, _args(case, torch.device("cuda")))


@pytest.mark.gpu
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_opcheck_layouts_cuda(case):
    torch.library.opcheck(_eagle3_block_mask_op, _layout_args(case, torch.device("cuda")))
