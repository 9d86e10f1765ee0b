"""The FA4 backend: selection and errors on any machine; numerics and graphs on a GPU with FA4."""

from __future__ import annotations

import pytest
import strategies
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import (
    assert_cuda_graph_forward,
    assert_same_blocks,
    assert_ttt_loop_one_graph,
    backend_errors,
    eagle3_dense,
    reference_block_mask,
)

from compiled_mask import Eagle3Attention, _fa4, eagle3_block_mask, eagle3_mask_mod
from compiled_mask._op import _first_keys
from compiled_mask.block_mask import _eagle3_block_mask, _plain_mask_mod_is_exact


def test_missing_fa4_says_how_to_install(monkeypatch):
    monkeypatch.setattr(_fa4, "fa4_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"needs FlashAttention-4 .* pip install 'compiled-mask\[fa4\]'"):
        Eagle3Attention(128, 4, backend="fa4")


def test_fa4_on_cpu_is_refused(fa4_installed):
    attn = Eagle3Attention(128, 2, backend="fa4", block_size=128)
    q = torch.randn(1, 2, 128, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"backend='fa4' runs on CUDA GPUs .* got inputs on cpu\. Use backend='flex'"):
        attn(q, k, k.clone(), torch.tensor(1))


@pytest.mark.parametrize("block_size", [64, (256, 64), (192, 64)])
def test_fa4_block_size_must_fit_its_tiles(fa4_installed, block_size):
    with pytest.raises(ValueError, match=r"multiples of its 128-wide tiles"):
        Eagle3Attention(128, 4, backend="fa4", block_size=block_size)


@pytest.mark.parametrize("major, expected", [(9, (128, 128)), (10, (256, 128)), (12, (256, 128))])
def test_fa4_default_block_size_follows_the_device(fa4_installed, monkeypatch, major, expected):
    monkeypatch.setattr(_fa4, "_capability_major", lambda index: major)
    attn = Eagle3Attention(128, 4, backend="fa4")
    assert attn.block_size_for(torch.device("cuda", 0)) == expected
    assert Eagle3Attention(128, 4).block_size_for(torch.device("cuda", 0)) == (128, 128)  # flex


def test_fa4_refuses_old_gpus(monkeypatch):
    monkeypatch.setattr(_fa4, "_capability_major", lambda index: 8)
    with pytest.raises(ValueError, match=r"needs a Hopper \(SM90\) or Blackwell \(SM100\+\) GPU, but cuda:0 is sm_8x"):
        _fa4._check_fa4_device("Eagle3Attention", torch.device("cuda", 0))


def test_fa4_refuses_float32(fa4_installed, monkeypatch):
    # Meta tensors stand in for CUDA ones: only metadata is read before the kernel runs.
    monkeypatch.setattr(_fa4, "_check_fa4_device", lambda where, device: None)
    q, k = torch.empty(1, 2, 128, 64, device="meta"), torch.empty(1, 2, 256, 64, device="meta")
    with pytest.raises(ValueError, match=r"backend='fa4' takes bf16 or fp16 inputs, got torch.float32"):
        Eagle3Attention(128, 2, backend="fa4", block_size=128)(q, k, k.clone(), torch.tensor(1, device="meta"))


def _meta_bf16(q_len, rounds):
    q = torch.empty(1, 2, q_len, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 2, q_len * rounds, 64, device="meta", dtype=torch.bfloat16)
    return q, k, k.clone(), torch.tensor(1, device="meta")


def test_fa4_refuses_eager_use(fa4_installed, monkeypatch):
    """Eagerly flex would run its dense path, not FA4 (and without the live check in mask_mod)."""
    monkeypatch.setattr(_fa4, "_check_fa4_device", lambda where, device: None)
    with pytest.raises(ValueError, match=r"backend='fa4' runs inside torch.compile only"):
        Eagle3Attention(128, 2, backend="fa4", block_size=128)(*_meta_bf16(128, 2))


def test_fa4_refuses_small_q_len_off_the_kv_blocks(fa4_installed, monkeypatch):
    monkeypatch.setattr(_fa4, "_check_fa4_device", lambda where, device: None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(NotImplementedError, match=r"q_len=200 is not supported: below Q_BLOCK_SIZE \+ "
                       r"KV_BLOCK_SIZE - 1 = 255 it must be a multiple of KV_BLOCK_SIZE=128 .* Pad Q_LEN"):
        Eagle3Attention(200, 2, backend="fa4", block_size=128)(*_meta_bf16(200, 2))


@pytest.mark.parametrize("q_len, block_size", [(128, (128, 128)), (255, (128, 128)), (1000, (128, 128)),
                                               (383, (256, 128)), (8192, (256, 128))])
def test_fa4_accepts_q_len_where_the_plain_mask_mod_is_exact(monkeypatch, q_len, block_size):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _fa4._check_fa4_call("where", q_len, block_size)  # no error


def _kernel_view(bm, mask_mod, q_len, kv_len, b=0):
    """What a block-sparse kernel computes from ``bm`` for sample ``b``: FULL blocks whole, PARTIAL
    ones via mask_mod."""
    q_bs, kv_bs = bm.BLOCK_SIZE
    q_idx, kv_idx = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    by_mask_mod = mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx)
    seen = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for full, num, idx in ((True, bm.full_kv_num_blocks, bm.full_kv_indices),
                           (False, bm.kv_num_blocks, bm.kv_indices)):
        for row in range(num.shape[2]):
            for col in idx[b, 0, row, : num[b, 0, row]].tolist():
                block = (slice(row * q_bs, (row + 1) * q_bs), slice(col * kv_bs, (col + 1) * kv_bs))
                seen[block] = True if full else by_mask_mod[block]
    return seen


@pytest.mark.parametrize("block_size", [(128, 128), (256, 128), (64, 32)])
def test_plain_mask_mod_exactness_rule(block_size):
    """Note [when the plain mask_mod is exact], by brute force: where _plain_mask_mod_is_exact says
    so, the live-round block tensors with the plain mask_mod give exactly the live mask, for every
    live count; below the bound some unaligned Q_LEN does not (the rule is not vacuous)."""
    q_bs, kv_bs = block_size
    bound = q_bs + kv_bs - 1
    inexact = []
    for q_len in sorted({1, kv_bs - 1, kv_bs + 3, q_bs + 1, bound - 2, bound - 1, bound, bound + 5,
                         2 * q_bs + kv_bs // 2, 3 * kv_bs}):
        max_rounds = 3
        kv_len = q_len * max_rounds
        for live in range(1, max_rounds + 1):
            bm = _eagle3_block_mask(q_len, kv_len, q_bs, kv_bs, 1, 1, torch.device("cpu"),
                                    torch.tensor(live), None, plain_mask_mod=True)
            want = eagle3_dense(q_len, kv_len, live_kv_len=q_len * live)
            exact = torch.equal(_kernel_view(bm, eagle3_mask_mod(q_len), q_len, kv_len), want)
            if _plain_mask_mod_is_exact(q_len, q_bs, kv_bs):
                assert exact, (q_len, live)
            elif not exact:
                inexact.append(q_len)
    assert inexact and max(inexact) < bound


def _documents(q_len, lengths):
    """doc_ids [1, q_len] of consecutive runs; a negative length is a run of padding (-1)."""
    ids, doc = [], 0
    for n in lengths:
        ids += [-1] * -n if n < 0 else [doc] * n
        doc += n > 0
    return torch.tensor([(ids + [-1] * q_len)[:q_len]])


@pytest.mark.parametrize("q_len, block_size", [(1000, (128, 128)), (512, (256, 128)), (300, (64, 32))])
def test_plain_mask_mod_with_layouts_is_exact(q_len, block_size):
    """fa4 with seq_lens and doc_ids: block tensors and the plain mask_mod (no live check) both
    read the layout table; every row is exact, padding rows included (they attend nothing)."""
    max_rounds = 3
    seq_lens = torch.tensor([q_len, q_len // 3, 1, 0, q_len - 129, q_len])
    doc_ids = torch.cat([_documents(q_len, lengths) for lengths in (
        [q_len], [50, 7, q_len], [1, q_len], [q_len], [129, -3, 200, 1, q_len], [-130, 1, 255, -2, q_len]
    )])
    for docs in (None, doc_ids):
        for live in range(1, max_rounds + 1):
            _assert_plain_mask_mod_exact(q_len, max_rounds, block_size, live, seq_lens, docs, len(seq_lens))


def _assert_plain_mask_mod_exact(q_len, max_rounds, block_size, live, seq_lens, doc_ids, B):
    """What FA4 computes from the block tensors (layout, live rounds) and the plain mask_mod
    equals the live mask on every row."""
    bm = _eagle3_block_mask(q_len, q_len * max_rounds, *block_size, B, 1, torch.device("cpu"),
                            torch.tensor(live), _first_keys(q_len, seq_lens, doc_ids), plain_mask_mod=True)
    want = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * live, seq_lens=seq_lens,
                        doc_ids=doc_ids)
    if want.dim() == 2:  # no layout
        want = want.expand(B, 1, *want.shape)
    for b in range(B):
        seen = _kernel_view(bm, bm.mask_mod, q_len, q_len * max_rounds, b)
        assert torch.equal(seen, want[b, 0]), (b, live)


def test_plain_mask_mod_reads_documents_in_bounds():
    """The rows of the last tile past Q_LEN read the layout table at q_idx % Q_LEN, not past its
    end."""
    from compiled_mask.block_mask import _plain_eagle3_mask_mod

    doc_ids = _documents(200, [120, 80])
    mask_mod = _plain_eagle3_mask_mod(200, _first_keys(200, None, doc_ids))
    q_idx, kv_idx = torch.arange(256)[:, None], torch.arange(400)[None, :]
    seen = mask_mod(torch.tensor(0), torch.tensor(0), q_idx, kv_idx)  # IndexError if out of bounds
    want = eagle3_dense(200, 400, doc_ids=doc_ids)[0, 0]
    assert torch.equal(seen[:200], want)


@pytest.mark.parametrize("Q_LEN, rounds", [(1024, 4), (1000, 7), (2304, 8)])
def test_blackwell_layout_matches_create_block_mask(Q_LEN, rounds):
    """The (256, 128) tensors FA4 reads on SM100+, exactly."""
    ours = eagle3_block_mask(Q_LEN, Q_LEN * rounds, device="cpu", BLOCK_SIZE=(256, 128))
    assert_same_blocks(ours, reference_block_mask(Q_LEN, Q_LEN * rounds, (256, 128)))


# ----------------------------------------------------------------------------- GPU, with FA4


def _needs_fa4():
    if not torch.cuda.is_available() or not _fa4.fa4_available():
        pytest.skip("needs CUDA and flash_attn.cute")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs SM90+")


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [(128, 128), (256, 128)])
def test_fa4_accepts_our_tensors(block_size):
    """FA4's own shape validation (flash_attn/cute/block_sparsity.py) on our tensors."""
    _needs_fa4()
    from flash_attn.cute.block_sparsity import (
        BlockSparseTensorsTorch,
        infer_block_sparse_expected_shapes,
        normalize_block_sparse_tensors,
    )

    Q_LEN, KV_LEN = 8192, 8192 * 7
    bm = eagle3_block_mask(Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=block_size)
    fields = BlockSparseTensorsTorch._fields
    kwargs = dict(mask_block_cnt=bm.kv_num_blocks, mask_block_idx=bm.kv_indices,
                  full_block_cnt=bm.full_kv_num_blocks, full_block_idx=bm.full_kv_indices)
    if "block_size" in fields:
        kwargs["block_size"] = block_size
    tensors = BlockSparseTensorsTorch(**kwargs)
    q_stage = block_size[0] // 128
    count_shape, index_shape, _ = infer_block_sparse_expected_shapes(
        tensors, batch_size=2, num_head=8, seqlen_q=Q_LEN, seqlen_k=KV_LEN, m_block_size=128,
        n_block_size=128, q_stage=q_stage, context="", sparse_block_size_q=block_size[0],
        sparse_block_size_kv=block_size[1])
    normalize_block_sparse_tensors(tensors, expected_count_shape=count_shape,
                                   expected_index_shape=index_shape)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "q_len, max_rounds, live, Hq, Hkv, D, dtype",
    [
        (1024, 7, 7, 8, 2, 128, torch.bfloat16),  # GQA, 7 rounds
        (1024, 7, 1, 8, 2, 64, torch.bfloat16),  # 1 live round, d=64
        (1024, 4, 3, 4, 4, 128, torch.float16),  # fp16, a dead last round
        (384, 7, 7, 8, 2, 64, torch.bfloat16),  # Q_LEN a multiple of 128 but not of 256
        (1000, 7, 7, 8, 2, 128, torch.bfloat16),  # Q_LEN off the blocks, every round live
        (300, 5, 3, 4, 2, 64, torch.float16),  # Q_LEN off the blocks, dead rounds
    ],
)
def test_fa4_forward_backward_vs_float64_and_flex(fresh_compile_state, q_len, max_rounds, live, Hq, Hkv, D, dtype):
    _needs_fa4()
    errors = backend_errors(("fa4", "flex"), q_len, max_rounds, live, Hq, Hkv, D, dtype)
    for fa4_err, flex_err in zip(errors["fa4"], errors["flex"]):
        assert fa4_err < 1e-2
        assert fa4_err <= 1.25 * flex_err  # no worse than flex-Triton (up to rounding noise)


@pytest.mark.gpu
def test_fa4_ttt_loop_one_graph_forward_backward(fresh_compile_state):
    _needs_fa4()
    assert_ttt_loop_one_graph("fa4", 1024, 8, 2, 128)


@pytest.mark.gpu
def test_fa4_cuda_graph_forward(fresh_compile_state):
    _needs_fa4()
    assert_cuda_graph_forward("fa4", 1024, 8, 2, 128)


@settings(max_examples=60, deadline=None)
@given(q_bs=st.sampled_from([16, 32, 64]), kv_div=st.sampled_from([1, 2, 4]), data=st.data())
def test_fuzz_plain_mask_mod_exactness_rule(q_bs, kv_div, data):
    """The rule on random shapes and layouts: where it holds, every row is exact."""
    kv_bs = q_bs // kv_div
    q_len = data.draw(st.integers(1, 3 * q_bs + kv_bs))
    max_rounds = data.draw(st.integers(1, 3))
    live = data.draw(st.integers(1, max_rounds))
    B = data.draw(st.integers(1, 3))
    seq_lens, doc_ids = data.draw(strategies.layouts(B, q_len))
    if not _plain_mask_mod_is_exact(q_len, q_bs, kv_bs):
        return
    _assert_plain_mask_mod_exact(q_len, max_rounds, (q_bs, kv_bs), live, seq_lens, doc_ids, B)


@pytest.mark.parametrize("D, Dv", [(192, 128), (64, 32), (256, 256)])
def test_fa4_refuses_head_dims_its_tiles_do_not_take(fa4_installed, monkeypatch, D, Dv):
    """MLA heads (192/128: FA4 asks for 96-wide KV blocks on an H200) and head dims over 128."""
    monkeypatch.setattr(_fa4, "_check_fa4_device", lambda where, device: None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.empty(1, 2, 256, D, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 2, 512, D, device="meta", dtype=torch.bfloat16)
    v = torch.empty(1, 2, 512, Dv, device="meta", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=rf"q/k and v of one head dim up to 128 .* got D={D} and Dv={Dv}"):
        Eagle3Attention(256, 2, backend="fa4", block_size=128)(q, k, v, torch.tensor(1, device="meta"))
