"""Padded (seq_lens) and packed (doc_ids) batches: exact block parity, attention, one graph."""

from __future__ import annotations

import pytest
import strategies
import torch
import torch._dynamo
import torch._inductor.utils
from helpers import (
    assert_same_blocks,
    assert_same_live_blocks,
    ceil_div,
    cuda_qkv,
    dense_reference_attention,
    eagle3_dense,
    float64_reference,
    reference_block_mask,
    rel_err,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from compiled_mask import Eagle3Attention, Eagle3BlockMask, eagle3_block_mask
from compiled_mask.inspect import GraphCounter, watch_recompiles


def docs(*rows):
    """doc_ids from run lengths per sample: ``(3, 2, -4)`` = doc 0 x3, doc 1 x2, 4 padding."""
    out = []
    for row in rows:
        ids, doc = [], 0
        for n in row:
            ids += [-1] * -n if n < 0 else [doc] * n
            doc += n > 0
        out.append(ids)
    return torch.tensor(out)


# (Q_LEN, KV_LEN, BLOCK_SIZE, seq_lens, doc_ids)
GRID = [
    (256, 768, 128, [256, 200, 1, 0], None),  # full, partial, one token, all padding
    (300, 1000, 128, [300, 129, 450], None),  # Q_LEN off the blocks, length > Q_LEN
    (100, 400, (64, 32), [37, 64], None),  # rectangular blocks
    (12, 40, (4, 2), None, docs((5, 7), (12,), (3, -2, 4, -3), (-11, 1))),  # packed, padding
    (256, 1024, 128, None, docs((100, 28, 128), (256,), (1, 1, 1, 253))),  # docs on/off blocks
    (130, 390, (64, 32), [120, 130], docs((60, 70), (10, 50, -70))),  # both
    (1, 5, 1, [1, 0], docs((1,), (-1,))),  # Q_LEN = 1
]


@pytest.mark.parametrize("Q_LEN, KV_LEN, BLOCK_SIZE, seq_lens, doc_ids", GRID)
def test_matches_create_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE, seq_lens, doc_ids):
    seq_lens = None if seq_lens is None else torch.tensor(seq_lens)
    B = (seq_lens if seq_lens is not None else doc_ids).shape[0]
    ours = eagle3_block_mask(Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE,
                             seq_lens=seq_lens, doc_ids=doc_ids)
    assert ours.kv_num_blocks.shape[:2] == (B, 1)
    ref = reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE, B=B, seq_lens=seq_lens, doc_ids=doc_ids)
    assert_same_blocks(ours, ref)


def test_padding_blocks_are_absent_and_document_blocks_full():
    """A sample of length 128 in a 512 bucket lists nothing past its length; inside one
    document, blocks below the diagonal stay FULL."""
    bm = eagle3_block_mask(512, 1024, device="cpu", seq_lens=torch.tensor([128, 512]))
    assert bm.kv_num_blocks[0, 0].tolist() == [2, 0, 0, 0]  # q-block 0: diagonal + round 2
    assert bm.full_kv_num_blocks[0, 0].tolist() == [0, 0, 0, 0]
    assert bm.full_kv_num_blocks[1, 0].tolist() == [0, 1, 2, 3]
    packed = eagle3_block_mask(512, 512, device="cpu", doc_ids=docs((256, 256)))
    assert packed.full_kv_num_blocks[0, 0].tolist() == [0, 1, 0, 1]  # nothing across documents


@st.composite
def layouts(draw):
    """A shape and a layout: lengths past both ends, documents that come back after another id,
    -1 runs anywhere, every integer dtype and stride (strategies.py)."""
    kv_bs = draw(st.sampled_from([1, 2, 8, 16, 64]))
    q_bs = kv_bs * draw(st.sampled_from([1, 2, 4]))
    Q_LEN = draw(st.integers(1, 160))
    rounds = draw(st.integers(1, 4))
    KV_LEN = Q_LEN * rounds + draw(st.integers(0, Q_LEN - 1))
    if ceil_div(Q_LEN, q_bs) * ceil_div(KV_LEN, kv_bs) > 8_000:
        q_bs, kv_bs = 64, 32
    B = draw(st.integers(1, 3))
    seq_lens, doc_ids = draw(strategies.layouts(B, Q_LEN, need_one=True))
    return Q_LEN, KV_LEN, (q_bs, kv_bs), B, seq_lens, doc_ids


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_reference_is_the_definition(data):
    """eagle3_mask_mod with a layout == the definition in plain Python (maximal runs of equal ids
    are documents, -1 and positions past seq_lens are padding), for every dtype and stride."""
    Q_LEN = data.draw(st.integers(1, 24))
    KV_LEN = Q_LEN * data.draw(st.integers(1, 3)) + data.draw(st.integers(0, Q_LEN - 1))
    B = data.draw(st.integers(1, 3))
    seq_lens, doc_ids = data.draw(strategies.layouts(B, Q_LEN, need_one=True))
    want = strategies.python_allowed(Q_LEN, KV_LEN, seq_lens, doc_ids, B)
    assert torch.equal(eagle3_dense(Q_LEN, KV_LEN, seq_lens=seq_lens, doc_ids=doc_ids), want)


# Documents that are not one run per id: the cases that gave wrong attention before documents
# were defined as maximal runs (ids compared across the whole row). (Q_LEN, KV_LEN, doc_ids)
NON_CONTIGUOUS = [
    (12, 36, [[0] * 3 + [1] * 3 + [0] * 3 + [1] * 3]),  # 0,1,0,1: four documents
    (12, 36, [[0] * 5 + [-1] * 2 + [0] * 5, [1] * 12]),  # a -1 run inside a document splits it
    (200, 600, [[0] * 70 + [1] * 60 + [0] * 70, [0] * 100 + [-1] * 3 + [0] * 97]),  # off the blocks
]


@pytest.mark.parametrize("Q_LEN, KV_LEN, doc_ids", NON_CONTIGUOUS)
@pytest.mark.parametrize("BLOCK_SIZE", [(4, 2), 128])
def test_non_contiguous_documents_match_create_block_mask(Q_LEN, KV_LEN, doc_ids, BLOCK_SIZE):
    doc_ids = torch.tensor(doc_ids)
    assert torch.equal(eagle3_dense(Q_LEN, KV_LEN, doc_ids=doc_ids),
                       strategies.python_allowed(Q_LEN, KV_LEN, None, doc_ids, len(doc_ids)))
    ours = eagle3_block_mask(Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE, doc_ids=doc_ids)
    assert_same_blocks(ours, reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE, B=len(doc_ids), doc_ids=doc_ids))


@pytest.mark.usefixtures("fresh_compile_state")
def test_non_contiguous_documents_compiled_flex_vs_float64():
    """Compiled flex reads the block tensors and the mask_mod's document check: both must follow
    maximal runs (this was off by 2.9 against float64 while the eager paths were right)."""
    Q_LEN, KV_LEN, rows = NON_CONTIGUOUS[2]
    doc_ids = torch.tensor(rows)
    attn = torch.compile(Eagle3Attention(Q_LEN, KV_LEN // Q_LEN), fullgraph=True)
    q, k, v = _qkv(2, seed=11)
    with torch.no_grad():
        out = attn(q, k, v, torch.tensor(3), doc_ids=doc_ids)
    allowed = strategies.python_allowed(Q_LEN, KV_LEN, None, doc_ids, 2)
    torch.testing.assert_close(out.double(), dense_reference_attention(q, k, v, allowed), rtol=0, atol=2e-5)


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_fuzz_matches_create_block_mask(layout):
    Q_LEN, KV_LEN, BLOCK_SIZE, B, seq_lens, doc_ids = layout
    ours = eagle3_block_mask(Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE,
                             seq_lens=seq_lens, doc_ids=doc_ids)
    ref = reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE, B=B, seq_lens=seq_lens, doc_ids=doc_ids)
    assert_same_blocks(ours, ref)


def test_static_width_with_documents():
    q_len, max_rounds, block_size = 100, 4, (64, 32)
    seq_lens, doc_ids = torch.tensor([90, 100]), docs((40, -10, 50), (30, 30, 40))
    module = Eagle3BlockMask(q_len, max_rounds, block_size=block_size)
    for r in range(1, max_rounds + 1):
        ours = module(torch.tensor(r), seq_lens=seq_lens, doc_ids=doc_ids)
        ref = reference_block_mask(q_len, q_len * r, block_size, B=2, seq_lens=seq_lens, doc_ids=doc_ids)
        assert_same_live_blocks(ours, ref)


@pytest.fixture(scope="module")
def compiled_flex_attention():
    torch._dynamo.reset()
    counter = GraphCounter()
    with torch._inductor.utils.fresh_cache():
        yield counter, torch.compile(Eagle3Attention(200, 3), backend=counter, fullgraph=True)
    torch._dynamo.reset()


def _qkv(B, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 200, 16, generator=g), torch.randn(B, 2, 600, 16, generator=g),
            torch.randn(B, 2, 600, 16, generator=g))


def test_attention_one_graph_zero_padding_rows(compiled_flex_attention):
    """New seq_lens/doc_ids values and new rounds: same graph; padding rows are zeros."""
    counter, attn = compiled_flex_attention
    layouts = [
        (torch.tensor([200, 77, 0]), None),
        (None, docs((50, -20, 130), (200,), (-199, 1))),
        (torch.tensor([150, 180, 10]), docs((100, 100), (1, 199), (10, 190))),
    ]
    with watch_recompiles() as reasons:
        for i, (seq_lens, doc_ids) in enumerate(layouts):
            if seq_lens is None:  # keep the graph's inputs the same: all-valid lengths
                seq_lens = torch.tensor([200, 200, 200])
            for r in (1, 2, 3):
                q, k, v = _qkv(3, seed=10 * i + r)
                out = attn(q, k, v, torch.tensor(r), seq_lens=seq_lens, doc_ids=doc_ids)
                allowed = eagle3_dense(200, 600, live_kv_len=200 * r, seq_lens=seq_lens, doc_ids=doc_ids)
                want = dense_reference_attention(q, k, v, allowed)
                assert not out.isnan().any()
                torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5)
                empty = ~allowed.any(-1).squeeze(1)  # [B, Q_LEN] rows with nothing to attend
                assert empty.any() or i == 1
                assert (out.permute(0, 2, 1, 3)[empty] == 0).all()
    assert reasons == [] or all("doc_ids" in r for r in reasons), reasons
    # One graph without doc_ids, one with (doc_ids None vs a tensor is a different graph).
    assert counter.graphs == 2, reasons


def _check_split_documents(q_len, max_rounds, live, seq_lens, doc_ids, seed, attn=None):
    """Note [documents in the split backend], on CPU against float64: backend="split" (the causal
    op under the layout table's document mask + the suffix merge), forward and q/k/v gradients."""
    B, scale = len(doc_ids if doc_ids is not None else seq_lens), 0.25
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 4, q_len, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(B, 2, q_len * max_rounds, 16, generator=g, requires_grad=True) for _ in "kv")
    dout = torch.randn(q.shape, generator=g)
    allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * live, seq_lens=seq_lens,
                           doc_ids=doc_ids)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = dense_reference_attention(q64, k64, v64, allowed, scale=scale)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), dout.double())

    if attn is None:
        attn = Eagle3Attention(q_len, max_rounds, backend="split", scale=scale)
    out = attn(q, k, v, torch.tensor(live), seq_lens=seq_lens, doc_ids=doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for got, ref in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)
    return out, grads


def test_split_documents_vs_float64():
    doc_ids = docs((20, -5, 35), (60,), (-30, 1, 29))
    out, grads = _check_split_documents(60, 3, 2, None, doc_ids, seed=3)
    assert (out[2, :, :30] == 0).all() and (grads[0][2, :, :30] == 0).all()


@settings(max_examples=40, deadline=None)
@given(layout=layouts(), data=st.data())
def test_fuzz_split_documents_vs_float64(layout, data):
    """Random lengths and document layouts (empty and skipped ids, padding runs, Q_LEN = 1)."""
    Q_LEN, KV_LEN, _, _, seq_lens, doc_ids = layout
    max_rounds = KV_LEN // Q_LEN
    live = data.draw(st.integers(1, max_rounds))
    _check_split_documents(Q_LEN, max_rounds, live, seq_lens, doc_ids, seed=data.draw(st.integers(0, 99)))


def test_split_documents_compiled_on_cpu(fresh_compile_state):
    """Packed documents train on CPU compiled too: one graph over TTT steps and layouts, each call
    equal to float64."""
    counter = GraphCounter()
    attn = torch.compile(Eagle3Attention(50, 3, backend="split", scale=0.25), backend=counter, fullgraph=True)
    for live, doc_ids in ((1, docs((20, -5, 25), (50,))), (3, docs((10, 40), (-30, 20)))):
        _check_split_documents(50, 3, live, None, doc_ids, seed=live, attn=attn)
    assert counter.graphs == 1


@pytest.mark.parametrize("compiled", [False, True])
def test_split_padded_batch_forward_backward(compiled):
    """backend="split" with seq_lens: valid rows exact (fwd+bwd vs float64, CPU), padding rows zero
    with zero gradients (Note [padding without a mask_mod check])."""
    q_len, max_rounds, live = 200, 3, 2
    attn = Eagle3Attention(q_len, max_rounds, backend="split")
    if compiled:
        torch._dynamo.reset()
        attn = torch.compile(attn, fullgraph=True)
    q, k, v = (t.requires_grad_() for t in _qkv(3, seed=7))
    dout = torch.randn_like(q)
    seq_lens = torch.tensor([200, 77, 0])
    out = attn(q, k, v, torch.tensor(live), seq_lens=seq_lens)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * live, seq_lens=seq_lens)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = dense_reference_attention(q64, k64, v64, allowed)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    for got, ref in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)
    assert (out[1, :, 77:] == 0).all() and (out[2] == 0).all() and (grads[0][2] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_lens=torch.tensor([[3]])), r"seq_lens must be an int tensor \[B\], got shape \(1, 1\)"),
        (dict(seq_lens=torch.tensor([3.0])), r"seq_lens must be an int tensor \[B\], got shape \(1,\) and dtype torch.float32"),
        (dict(doc_ids=torch.zeros(2, 10, dtype=torch.long)), r"doc_ids must be \[B, Q_LEN=12\], got shape \(2, 10\)"),
        (dict(seq_lens=torch.tensor([1, 2]), doc_ids=torch.zeros(3, 12, dtype=torch.long)), r"one batch size, got 2 and 3"),
        (dict(seq_lens=torch.tensor([1, 2]), B=3), r"B=3 but seq_lens/doc_ids have batch 2"),
        (dict(seq_lens=torch.tensor([1, 2], device="meta")), r"seq_lens is on meta but the mask is built on cpu"),
    ],
)
def test_layout_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eagle3_block_mask(12, 24, device="cpu", **kwargs)


def test_attention_batch_mismatch():
    attn = Eagle3Attention(64, 2)
    q, k = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 128, 8)
    with pytest.raises(ValueError, match=r"seq_lens/doc_ids have batch 3 but q has batch 2"):
        attn(q, k, k.clone(), torch.tensor(1), seq_lens=torch.tensor([1, 2, 3]))


def _check_cuda_layout(backend, q_len, max_rounds, live, seq_lens, doc_ids=None, device="cuda"):
    """Compiled fwd+bwd (bf16) with seq_lens/doc_ids against float64 on the same pairs; finite
    everywhere. Returns the output and gradients."""
    attn = torch.compile(Eagle3Attention(q_len, max_rounds, backend=backend), fullgraph=True)
    B = len(seq_lens if seq_lens is not None else doc_ids)
    q, k, v, dout = cuda_qkv(B, 8, 2, q_len, q_len * max_rounds, 64, torch.bfloat16, seed=1,
                             device=device)
    seq_lens, doc_ids = (None if t is None else t.to(device) for t in (seq_lens, doc_ids))
    out = attn(q, k, v, torch.tensor(live, device=device), seq_lens=seq_lens, doc_ids=doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * live,
                           seq_lens=None if seq_lens is None else seq_lens.cpu(),
                           doc_ids=None if doc_ids is None else doc_ids.cpu())
    want, want_grads = float64_reference(q, k, v, dout, allowed)
    for got, ref in zip((out, *grads), (want, *want_grads)):
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) < 1e-2
    return out, grads


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["split", "fa4"])
def test_cuda_padded_batch_other_backends(fresh_compile_state, backend):
    """seq_lens through split and fa4 on CUDA (Q_LEN off the blocks: fa4's plain mask_mod path)."""
    from compiled_mask._fa4 import fa4_available

    if backend == "fa4" and not fa4_available():
        pytest.skip("needs flash_attn.cute")
    out, grads = _check_cuda_layout(backend, 1000, 4, 3, torch.tensor([1000, 333, 0]))
    assert (out[1, :, 333:] == 0).all() and (out[2] == 0).all() and (grads[0][2] == 0).all()


@pytest.mark.gpu
def test_cuda_padded_batch_forward_backward_no_nan(fresh_compile_state):
    """Padding rows: zero output and zero, finite gradients; the rest matches float64."""
    doc_ids = docs((500, 524), (100, 200, -724), (-1024,))
    out, grads = _check_cuda_layout("flex", 1024, 4, 3, torch.tensor([1024, 300, 0]), doc_ids)
    assert (out[2] == 0).all() and (grads[0][2] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["split", "fa4"])
def test_cuda_documents_other_backends(fresh_compile_state, backend):
    """doc_ids (with seq_lens) through split (flex causal part + suffix) and fa4 (mask_mod reads
    doc_ids): fwd+bwd vs float64, Q_LEN off the blocks; padding rows zero with zero gradients."""
    from compiled_mask._fa4 import fa4_available

    if backend == "fa4" and not fa4_available():
        pytest.skip("needs flash_attn.cute")
    doc_ids = docs((300, 1, 450, 249), (100, 200, -700), (-1000,), (-10, 990))
    out, grads = _check_cuda_layout(backend, 1000, 4, 3, torch.tensor([1000, 250, 1000, 700]), doc_ids)
    assert (out[1, :, 250:] == 0).all() and (out[2] == 0).all() and (grads[0][2] == 0).all()
    assert (out[3, :, :10] == 0).all() and (out[3, :, 700:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["split", "fa4", "flex"])
def test_cuda_documents_one_graph(fresh_compile_state, backend):
    """New doc_ids/seq_lens values and new rounds, fwd+bwd: one graph per backend."""
    from compiled_mask._fa4 import fa4_available

    if backend == "fa4" and not fa4_available():
        pytest.skip("needs flash_attn.cute")
    counter = GraphCounter()
    attn = torch.compile(Eagle3Attention(512, 4, backend=backend), backend=counter, fullgraph=True)
    q, k, v, _ = cuda_qkv(2, 8, 2, 512, 2048, 64, torch.bfloat16)
    layouts = [(docs((512,), (200, 312)), [512, 400]), (docs((1, 511), (-12, 500)), [300, 512])]
    with watch_recompiles() as reasons:
        for doc_ids, seq_lens in layouts:
            for r in (1, 3, 4):
                out = attn(q, k, v, torch.tensor(r, device="cuda"), seq_lens=torch.tensor(seq_lens, device="cuda"),
                           doc_ids=doc_ids.cuda())
                out.sum().backward()
    assert counter.graphs == 1, reasons
    assert reasons == []
