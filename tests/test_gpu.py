"""GPU tests: compiled forward and backward on CUDA, larger shapes, graph counts with backward.

Skipped without CUDA (conftest.py). Run them one process per test, so that one illegal memory
access cannot poison the others: ``python tools/run_gpu_tests.py`` (README, "GPU tests").
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import (
    assert_cuda_graph_forward,
    assert_same_blocks,
    assert_ttt_loop_one_graph,
    cuda_qkv,
    eagle3_dense,
    float64_reference,
    reference_block_mask,
    rel_err,
)

from compiled_mask import Eagle3Attention, eagle3_block_mask
from compiled_mask._blocks import eagle3_block_tensors
from compiled_mask._checks import _live_rounds
from compiled_mask._op import _eagle3_block_mask_op, _live_kv_len
from compiled_mask._op import _first_keys

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_compile_state")]


@pytest.mark.parametrize(
    "Q_LEN, KV_LEN, BLOCK_SIZE",
    [(8192, 8192 * 8, 128), (8192, 8192 * 4, (256, 128)), (1000, 7000, 128), (4100, 4100 * 3 + 77, (128, 64))],
)
def test_large_shapes_match_create_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE):
    ours = eagle3_block_mask(Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=BLOCK_SIZE)
    assert_same_blocks(ours, reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE, device="cuda"))


def _fused_vs_torch_ops(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, rounds, seq_lens=None, doc_ids=None):
    cuda = torch.device("cuda")
    rounds_t = None if rounds is None else _live_rounds(torch.tensor(rounds, device=cuda), KV_LEN // Q_LEN, cuda)
    seq_lens, doc_ids = (None if t is None else t.to(cuda) for t in (seq_lens, doc_ids))
    first_key = _first_keys(Q_LEN, seq_lens, doc_ids)
    fused = _eagle3_block_mask_op(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, cuda, rounds_t, first_key)
    live = KV_LEN if rounds is None else _live_kv_len(rounds_t, Q_LEN)
    want = eagle3_block_tensors(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, cuda, live, first_key)
    for i, (f, w) in enumerate(zip(fused, want)):
        assert f.shape == w.shape and f.dtype == w.dtype, i
        assert torch.equal(f, w), (Q_LEN, KV_LEN, q_bs, kv_bs, B, H, rounds, i, seq_lens, doc_ids)


def _random_layout(rng, Q_LEN, B):
    """seq_lens [B] (some past Q_LEN or <= 0) and/or doc_ids [B, Q_LEN] (runs of documents,
    skipped ids, padding runs of -1), or neither."""
    kind = rng.choice(["none", "lens", "docs", "both"])
    seq_lens = doc_ids = None
    if kind in ("lens", "both"):
        seq_lens = torch.tensor([rng.randint(-2, Q_LEN + 3) for _ in range(B)])
    if kind in ("docs", "both"):
        rows = []
        for _ in range(B):
            ids, doc = [], 0
            while len(ids) < Q_LEN:
                n = rng.randint(1, max(1, Q_LEN // rng.choice([1, 2, 5, 20, 100])))
                if rng.random() < 0.2:
                    ids += [-1] * n
                else:
                    ids += [doc] * n
                    doc += rng.choice([1, 3])
            rows.append(ids[:Q_LEN])
        doc_ids = torch.tensor(rows, dtype=rng.choice([torch.int64, torch.int32]))
    return seq_lens, doc_ids


@pytest.mark.parametrize(
    "case",
    [
        (65536, 65536 * 8, 128, 128, 1, 1, None),  # 4096-wide rows: several chunks per row
        (4096, 4096 * 8, 32, 16, 1, 1, 5),  # 2048-wide rows, live rounds
        (32768, 32768 * 8, 256, 128, 2, 2, 3),  # Blackwell layout, B and H copies
        (1, 9, 1, 1, 1, 1, None),
        (3000, 3000 * 8, 128, 128, 1, 1, 0),  # clamped live count
        (3000, 3000 * 8, 128, 128, 1, 1, 2**40),
    ],
)
def test_fused_kernel_matches_torch_ops(case):
    """The CUDA op (one Triton kernel) writes exactly what the torch-ops reference writes."""
    _fused_vs_torch_ops(*case)


def _random_shape(rng):
    """``(Q_LEN, KV_LEN, q_bs, kv_bs, rounds)`` for the fused-vs-torch-ops fuzz: any lengths up to
    3000 x 8 rounds and a partial one, rectangular blocks, live counts in and out of range."""
    kv_bs = rng.choice([1, 2, 16, 64, 128])
    q_bs = kv_bs * rng.choice([1, 2, 4])
    Q_LEN = rng.randint(1, 3000)
    KV_LEN = Q_LEN * rng.randint(1, 8) + rng.randint(0, Q_LEN - 1)
    if (-(-Q_LEN // q_bs)) * (-(-KV_LEN // kv_bs)) > 2_000_000:
        q_bs, kv_bs = 128, 128
    rounds = rng.choice([None, rng.randint(-1, -(-KV_LEN // Q_LEN) + 1)])
    return Q_LEN, KV_LEN, q_bs, kv_bs, rounds


def test_fused_kernel_fuzz():
    rng = random.Random(0)
    for _ in range(300):
        Q_LEN, KV_LEN, q_bs, kv_bs, rounds = _random_shape(rng)
        _fused_vs_torch_ops(Q_LEN, KV_LEN, q_bs, kv_bs, rng.randint(1, 2), rng.randint(1, 2), rounds)


@pytest.mark.parametrize(
    "case",
    [
        (65536, 65536 * 8, 128, 128, 2, 1, 7, [65536, 40000], None),  # several table chunks
        (8192, 8192 * 7, 128, 128, 3, 2, None, None, "packed"),  # H copies per sample
        (1000, 7000, 256, 128, 2, 1, 3, [999, 0], "packed"),  # both, Blackwell layout
        (1, 5, 1, 1, 2, 1, None, [1, 0], [[0], [-1]]),
    ],
)
def test_fused_kernel_with_layouts_matches_torch_ops(case):
    """seq_lens/doc_ids through the two Triton kernels (tables, then blocks) == the torch ops."""
    *shape, seq_lens, doc_ids = case
    Q_LEN, B = shape[0], shape[4]
    if doc_ids == "packed":
        doc_ids = torch.arange(Q_LEN).div(1 + Q_LEN // 7, rounding_mode="floor").repeat(B, 1)
        doc_ids[-1, : Q_LEN // 3] = -1
    seq_lens, doc_ids = (None if t is None else torch.as_tensor(t) for t in (seq_lens, doc_ids))
    _fused_vs_torch_ops(*shape, seq_lens, doc_ids)


def test_fused_kernel_with_layouts_fuzz():
    rng = random.Random(1)
    for _ in range(300):
        Q_LEN, KV_LEN, q_bs, kv_bs, rounds = _random_shape(rng)
        B = rng.randint(1, 3)
        _fused_vs_torch_ops(Q_LEN, KV_LEN, q_bs, kv_bs, B, rng.randint(1, 2), rounds,
                            *_random_layout(rng, Q_LEN, B))


@pytest.mark.parametrize(
    "q_len, max_rounds, live, Hq, Hkv, D, block_size",
    [
        (1000, 7, 7, 8, 2, 64, 128),  # Q_LEN not a block multiple, GQA, 7 rounds
        (1000, 7, 1, 8, 2, 64, 128),  # 1 live round of 7
        (1024, 4, 3, 4, 4, 128, (256, 128)),  # Blackwell layout through flex-Triton, dead round
    ],
)
def test_forward_backward_vs_float64(q_len, max_rounds, live, Hq, Hkv, D, block_size):
    attn = torch.compile(Eagle3Attention(q_len, max_rounds, block_size=block_size), fullgraph=True)
    q, k, v, dout = cuda_qkv(2, Hq, Hkv, q_len, q_len * max_rounds, D, torch.bfloat16)
    out = attn(q, k, v, torch.tensor(live, device="cuda"))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * live)
    want, want_grads = float64_reference(q, k, v, dout, allowed)

    assert rel_err(out, want) < 1e-2
    for name, g, w in zip("qkv", grads, want_grads):
        assert rel_err(g, w) < 1e-2, name
    # Dead rounds get no gradient at all.
    if live < max_rounds:
        assert grads[1][:, :, q_len * live :].abs().max() == 0
        assert grads[2][:, :, q_len * live :].abs().max() == 0


def test_ttt_loop_forward_backward_one_graph():
    assert_ttt_loop_one_graph("flex", 512, 4, 2, 64)


def test_cuda_graph_forward():
    assert_cuda_graph_forward("flex", 512, 4, 2, 64)


@pytest.mark.parametrize("backend", ["split", "flex"])
def test_mla_head_dims(backend):
    """q/k head dim 192, v head dim 128 (DeepSeek/Kimi-family drafts): compiled fwd+bwd against
    float64 on split (Note [value head dim]) and flex; fa4 refuses them (tests/test_fa4.py)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = make(1, 8, 1024, 192), make(1, 2, 4096, 192), make(1, 2, 4096, 128)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = make(1, 8, 1024, 128)
    attn = torch.compile(Eagle3Attention(1024, 4, backend=backend), fullgraph=True)
    out = attn(q, k, v, torch.tensor(3, device="cuda"))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want, want_grads = float64_reference(q, k, v, dout, eagle3_dense(1024, 4096, live_kv_len=3072))
    errors = [rel_err(out, want)] + [rel_err(gr, w) for gr, w in zip(grads, want_grads)]
    print(backend, "rel errors out/dq/dk/dv:", errors)
    assert out.shape == (1, 8, 1024, 128)
    assert all(e < 1e-2 for e in errors), errors


@pytest.mark.parametrize("backend", ["flex", "split"])
def test_value_head_dim_wider_than_qk(backend):
    """D=128, Dv=136: flex's backward sized its tiles for 128-wide rows and ran out of shared
    memory on an H200 ("No valid triton configs"), on flex and on split with doc_ids (its causal
    part is flex). Note [flex tiles follow the q/k head dim]: compiled fwd+bwd against float64."""
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q_len, max_rounds = 640, 4
    q, k, v = make(2, 6, q_len, 128), make(2, 2, q_len * max_rounds, 128), make(2, 2, q_len * max_rounds, 136)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = make(2, 6, q_len, 136)
    doc_ids = torch.repeat_interleave(torch.tensor([[0, 1, 2, -1], [3, 3, 4, 4]], device="cuda"), q_len // 4, dim=1)
    attn = torch.compile(Eagle3Attention(q_len, max_rounds, backend=backend), fullgraph=True)
    out = attn(q, k, v, torch.tensor(3, device="cuda"), doc_ids=doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * 3, doc_ids=doc_ids.cpu())
    want, want_grads = float64_reference(q, k, v, dout, allowed)
    errors = [rel_err(out, want)] + [rel_err(gr, w) for gr, w in zip(grads, want_grads)]
    print(backend, "rel errors out/dq/dk/dv:", errors)
    assert out.shape == (2, 6, q_len, 136)
    assert all(e < 1e-2 for e in errors), errors
