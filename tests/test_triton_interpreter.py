"""The Triton kernels on CPU, in the Triton interpreter, against their torch references.

The fused block build (``_triton_blocks.py``) is a second copy of the block rule in
``_blocks.py``, and the suffix kernels (``_triton_suffix.py``) a second copy of the suffix math in
``_split.py``. On a GPU they run compiled; here the interpreter runs them on CPU tensors, so CI
holds each copy to its reference on shapes and layouts that exercise every branch.

Note [an interpreter process of its own]
    ``TRITON_INTERPRET=1`` must be set before triton is first imported (triton's own library
    functions, ``tl.cumsum`` and the like, are jitted at import), and it must not be set where real
    kernels run. So the tests below run in a fresh process with the variable set
    (:func:`test_in_the_triton_interpreter`, which shows their output); in the parent process they
    are skipped with that reason.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import strategies
import torch
import triton  # noqa: F401  (the test extra installs it; a missing triton must fail, not skip)
from helpers import load_tool

from compiled_mask._causal import _merge_backward_reference, _merge_reference
from compiled_mask._suffix import _suffix_backward_reference, _suffix_merge_reference, _suffix_reference
from compiled_mask._blocks import eagle3_block_tensors
from compiled_mask._checks import _live_rounds
from compiled_mask._op import _first_keys, _live_kv_len

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in its own TRITON_INTERPRET=1 process: test_in_the_triton_interpreter")
CPU = torch.device("cpu")


# The interpreted tests, in two processes of about a minute each (so that two test workers share
# them) and of one thread each (two of them on two cores, not four threads): a -k expression and
# its negation, which together select every test.
HALF = "dtype2 or fused_build"


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter process")
@pytest.mark.parametrize("select", [HALF, f"not ({HALF})"])
def test_in_the_triton_interpreter(select):
    """Run this file's kernel tests in fresh processes with TRITON_INTERPRET=1 (Note [an
    interpreter process of its own]): all of them must run, none skip, and pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent  # pytest's rootdir: node ids are relative to it
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         f"({select}) and not test_in_the_triton_interpreter"],
        cwd=root, env=env, capture_output=True, text=True,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(run.stdout[-4000:], run.stderr[-2000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert re.fullmatch(r"[1-9]\d* passed, \d+ deselected in .*", summary), summary


@pytest.fixture(scope="module")
def blocks():
    from compiled_mask import _triton_blocks

    return _triton_blocks


@pytest.fixture(scope="module")
def suffix():
    from compiled_mask import _triton_suffix

    return _triton_suffix


def _assert_build_matches(blocks, Q_LEN, KV_LEN, q_bs, kv_bs, B, H, rounds, seq_lens=None, doc_ids=None):
    """The fused build (one or two interpreted kernels) == the torch-ops build, all eight tensors."""
    live = None if rounds is None else _live_kv_len(_live_rounds(torch.tensor(rounds), KV_LEN // Q_LEN, CPU), Q_LEN)
    first_key = _first_keys(Q_LEN, seq_lens, doc_ids)
    if first_key is not None:
        B = first_key.shape[0]
    got = blocks.eagle3_block_tensors_triton(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, CPU, live, first_key)
    want = eagle3_block_tensors(Q_LEN, KV_LEN, q_bs, kv_bs, B, H, CPU, KV_LEN if live is None else live, first_key)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        assert torch.equal(g, w), (Q_LEN, KV_LEN, q_bs, kv_bs, B, H, rounds, i, seq_lens, doc_ids)


# (Q_LEN, KV_LEN, Q_BS, KV_BS, B, H, rounds): each a branch of the rule.
BUILD_CASES = [
    (256, 1024, 128, 128, 1, 1, None),  # aligned
    (300, 1000, 128, 64, 2, 3, None),  # unaligned, partial last round, B x H copies
    (100, 500, 64, 32, 1, 1, 3),  # a live count: diagonals straddle the live end
    (100, 500, 64, 32, 1, 1, 0),  # clamped to 1
    (100, 500, 64, 32, 1, 1, 99),  # clamped to max_rounds
    (7, 30, 1, 1, 1, 1, 2),  # 1x1 blocks: every pair its own block
    (1, 5, 1, 1, 1, 1, None),  # Q_LEN = 1: FULL suffix blocks
    (12, 40, 4, 2, 1, 2, None),  # tiny rectangular blocks
]


@in_interpreter
@pytest.mark.parametrize("case", BUILD_CASES)
def test_fused_build_matches_torch_ops(blocks, case):
    _assert_build_matches(blocks, *case)


# With layouts: (Q_LEN, KV_LEN, Q_BS, KV_BS, H, rounds, seq_lens, doc_ids)
LAYOUT_CASES = [
    (100, 400, 64, 32, 1, 2, [100, 37, 0, -3, 200], None),  # full, partial, empty, negative, long
    (12, 36, 4, 2, 2, None, None, [[0] * 3 + [1] * 3 + [0] * 3 + [1] * 3, [-1] * 12]),  # 0,1,0,1
    (130, 390, 128, 64, 1, 3, [120, 130], [[0] * 60 + [-1] * 5 + [0] * 65, [5] * 130]),  # -1 inside
    # Two valid queries, 23 and 95: kv block [192, 224) holds the end of round 1 and the start of
    # round 2, whose residues wrap (92..99, 0..23); q-block 0 needs it only for query 23.
    (100, 300, 64, 32, 1, 3, None, [[-1] * 23 + [0] + [-1] * 71 + [1] + [-1] * 4]),
    # Runs of 12 valid and 4 padding positions: every 16-wide chunk of the tables ends in padding,
    # and a 24-query block's first valid query at or after position 12 is in the next chunk.
    (100, 300, 24, 12, 1, 2, [90], [([0] * 12 + [-1] * 4) * 6 + [1] * 4]),
]


@in_interpreter
@pytest.mark.parametrize("case", [(256, 1024, 32, 16, 2, 1, 3), (100, 500, 16, 8, 1, 1, None),
                                  LAYOUT_CASES[2], LAYOUT_CASES[4]])
def test_fused_build_in_small_chunks(blocks, monkeypatch, case):
    """Rows and tables scanned in chunks of 16 (on a GPU: 1024), so that the carries between
    chunks (ranks, counts, running starts) are exercised on small shapes."""
    monkeypatch.setattr(blocks, "_block", lambda width: 16)
    monkeypatch.setattr(blocks, "_TABLE_BLOCK", 16)
    if len(case) == 7:
        _assert_build_matches(blocks, *case)
    else:
        _assert_layout_case_matches(blocks, case)


def _assert_layout_case_matches(blocks, case):
    Q_LEN, KV_LEN, q_bs, kv_bs, H, rounds, seq_lens, doc_ids = case
    seq_lens = None if seq_lens is None else torch.tensor(seq_lens)
    doc_ids = None if doc_ids is None else torch.tensor(doc_ids)
    _assert_build_matches(blocks, Q_LEN, KV_LEN, q_bs, kv_bs, 1, H, rounds, seq_lens, doc_ids)


@in_interpreter
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_fused_build_with_layouts_matches_torch_ops(blocks, case):
    _assert_layout_case_matches(blocks, case)


@in_interpreter
def test_fused_build_random_layouts(blocks):
    """Random shapes, block sizes, live counts and layouts (strided, any int dtype)."""
    rng = random.Random(0)
    for _ in range(8):
        kv_bs = rng.choice([1, 2, 8, 16, 64])
        q_bs = kv_bs * rng.choice([1, 2, 4])
        Q_LEN = rng.randint(1, 120)
        KV_LEN = Q_LEN * rng.randint(1, 4) + rng.randint(0, Q_LEN - 1)
        if -(-KV_LEN // kv_bs) > 64:  # a program per block row: keep the interpreter's count small
            q_bs, kv_bs = 64, 32
        rounds = rng.choice([None, rng.randint(-1, -(-KV_LEN // Q_LEN) + 1)])
        B = rng.randint(1, 3)
        seq_lens, doc_ids = _random_layout(rng, B, Q_LEN)
        _assert_build_matches(blocks, Q_LEN, KV_LEN, q_bs, kv_bs, B, rng.randint(1, 2), rounds, seq_lens, doc_ids)


def _random_layout(rng, B, Q_LEN):
    kind = rng.choice(["none", "lens", "docs", "both", "sparse"])
    if kind == "sparse":  # a few valid positions among padding
        ids = torch.where(torch.rand(B, Q_LEN, generator=torch.Generator().manual_seed(rng.randint(0, 99))) < 0.1,
                          torch.arange(Q_LEN) % 3, -1)
        return None, ids
    seq_lens = doc_ids = None
    if kind in ("lens", "both"):
        seq_lens = strategies.with_strides(
            torch.tensor([rng.randint(-2, Q_LEN + 2) for _ in range(B)]).to(rng.choice(strategies.INT_DTYPES)),
            rng.choice(strategies.STRIDES))
    if kind in ("docs", "both"):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < Q_LEN:
                row += [rng.choice([-1, 0, 0, 1, 1, 2])] * rng.randint(1, max(1, Q_LEN // rng.choice([1, 4, 16])))
            rows.append(row[:Q_LEN])
        doc_ids = strategies.with_strides(torch.tensor(rows).to(rng.choice(strategies.INT_DTYPES)),
                                          rng.choice(strategies.STRIDES))
    return seq_lens, doc_ids


# ----------------------------------------------------------------------------- suffix kernels

# (B, Hq, Hkv, q_len, max_rounds, live, D, Dv)
SUFFIX_CASES = [
    (2, 4, 2, 37, 4, 3, 16, 16),  # Q_LEN off the 32-query tiles, GQA, a dead round
    (1, 2, 2, 64, 3, 3, 8, 8),  # every round live
    (1, 3, 1, 33, 3, 1, 16, 16),  # one live round: the suffix adds nothing
    (1, 2, 1, 40, 3, 9, 24, 16),  # head dim off a power of two, Dv != D, live count clamped
    (1, 8, 2, 22, 4, 3, 16, 8),  # G = 4: grouped tiles of 4 queries (6 blocks, the last partial), Dv != D
    (1, 6, 2, 20, 4, 3, 8, 8),  # G = 3: a padded head in the grouped tiles
    (1, 6, 2, 9, 3, -1, 8, 8),  # negative rounds: nothing live
]
# (forward, backward) kernel forms (_triton_suffix.py)
SUFFIX_VARIANTS = [("heads", "split"), ("grouped", "fused")]


def _suffix_inputs(B, Hq, Hkv, q_len, max_rounds, D, Dv, dtype, strided, seed=0):
    """q and the suffix rounds ks/vs."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    kv = q_len * (max_rounds - 1)
    if strided:  # [B, S, H, D] storage, viewed as [B, H, S, D]
        q = make(B, q_len, Hq, D).transpose(1, 2)
        ks, vs = make(B, kv, Hkv, D).transpose(1, 2), make(B, kv, Hkv, Dv).transpose(1, 2)
    else:
        q, ks, vs = make(B, Hq, q_len, D), make(B, Hkv, kv, D), make(B, Hkv, kv, Dv)
    return q, ks, vs


@in_interpreter
@pytest.mark.parametrize("variants", SUFFIX_VARIANTS, ids="-".join)
@pytest.mark.parametrize("case", SUFFIX_CASES)
@pytest.mark.parametrize("dtype, strided", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_suffix_kernels_match_torch(suffix, case, dtype, strided, variants):
    """Forward (out_s, lse_s) and backward (dq, dks, dvs, with and without an lse gradient) of
    the interpreted kernels == the torch math."""
    _assert_suffix_kernels_match(suffix, case, dtype, strided, variants)


@in_interpreter
def test_grouped_suffix_kernels_small_tiles(suffix):
    """The grouped kernels with fewer rows per program than the group has heads: one query per
    program, the tile arithmetic at its edge."""
    config = dict(rows=2, num_warps=2, stages=3)
    _assert_suffix_kernels_match(suffix, (1, 8, 2, 5, 3, 2, 16, 8), torch.float32, True, SUFFIX_VARIANTS[1], config)


@in_interpreter
def test_grouped_suffix_kernels_wide_group(suffix):
    """G = 32 q-heads per K/V head: wider than a grouped tile, so the grouped variants run the
    per-head kernels (Note [grouped suffix kernels])."""
    _assert_suffix_kernels_match(suffix, (1, 32, 1, 8, 2, 2, 8, 8), torch.float32, False, SUFFIX_VARIANTS[1])


def _assert_suffix_kernels_match(suffix, case, dtype, strided, variants, config=None):
    fwd, bwd = variants
    B, Hq, Hkv, q_len, max_rounds, live, D, Dv = case
    q, ks, vs = _suffix_inputs(B, Hq, Hkv, q_len, max_rounds, D, Dv, dtype, strided)
    rounds, scale = _live_rounds(torch.tensor(live), max_rounds, CPU), D**-0.5
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    out, lse = suffix.suffix_forward_triton(q, ks, vs, rounds, scale, variant=fwd, config=config)
    want_out, want_lse = _suffix_reference(q, ks, vs, rounds, scale)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g)
    for dlse in (None, torch.randn(lse.shape, generator=g)):
        args = (dout, dlse, q, ks, vs, want_out, want_lse, rounds, scale)
        got = suffix.suffix_backward_triton(*args, variant=bwd, config=config)
        want = _suffix_backward_reference(*args)
        for name, x, y in zip(("dq", "dks", "dvs"), got, want):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name}: {m}")

    # As a part of a merged softmax (the split op), with a negative scale: the forward folded into a
    # part (out_c in q's dtype, lse_c with a row of the lowest float: nothing causal to attend), the backward given
    # the merged out/lse, adding into dq0 and writing rows [L, (S + 1) * L) of whole K/V gradients
    # whose first L rows it must leave alone.
    B, Hq, L, _ = q.shape
    out_c = torch.randn(B, Hq, L, Dv, generator=g).to(dtype)
    lse_c = torch.randn(B, Hq, L, generator=g)
    lse_c[:, :, 0] = torch.finfo(torch.float32).min
    out_c[:, :, 0] = 0
    scale = -0.3  # any finite scale: the kernels scale the scores themselves (the causal kernel's is positive)
    out, lse = suffix.suffix_forward_triton(q, ks, vs, rounds, scale, part=(out_c, lse_c), variant=fwd, config=config)
    want_out, want_lse = _suffix_merge_reference(q, ks, vs, rounds, scale, out_c, lse_c)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dq0 = torch.randn(q.shape, generator=g).to(dtype)
    for dlse in (None, torch.randn(lse.shape, generator=g)):
        args = (dout, dlse, q, ks, vs, want_out, want_lse, rounds, scale)
        dk = torch.full((B, ks.shape[1], ks.shape[2] + L, D), 7.0, dtype=dtype)
        dv = torch.full((B, vs.shape[1], vs.shape[2] + L, Dv), 7.0, dtype=dtype)
        dq = suffix.suffix_backward_triton(*args, dq0=dq0, dks=dk[:, :, L:], dvs=dv[:, :, L:], variant=bwd,
                                           config=config)[0]
        want = _suffix_backward_reference(*args, dq0=dq0)
        for name, x, y in zip(("dq", "dks", "dvs"), (dq, dk[:, :, L:], dv[:, :, L:]), want):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name} (part): {m}")
        assert (dk[:, :, :L] == 7).all() and (dv[:, :, :L] == 7).all()


@in_interpreter
@pytest.mark.parametrize("Dv, dtype", [(8, torch.float32), (24, torch.bfloat16)])
def test_merge_kernels_match_torch(suffix, Dv, dtype):
    """The causal op's merge with a part (forward) and the part's gradients (backward, with and
    without an lse gradient), including empty parts, == the torch merge."""
    g = torch.Generator().manual_seed(2)
    B, H, L = 2, 3, 37
    out_c = torch.randn(B, H, L, Dv, generator=g).to(dtype)
    lse_c = torch.randn(B, H, L, generator=g)
    out_p, lse_p = torch.randn(B, H, L, Dv, generator=g), torch.randn(B, H, L, generator=g) + 1
    lse_p[0, 0, :4] = torch.finfo(torch.float32).min
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    got = suffix.merge_forward_triton(out_c, lse_c, out_p, lse_p, dtype)
    want = _merge_reference(out_c, lse_c, out_p, lse_p, dtype)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **tol)
    dout = torch.randn(out_c.shape, generator=g).to(dtype)
    for dlse in (None, torch.randn(lse_c.shape, generator=g)):
        args = (dout, dlse, *want, out_p, lse_p)
        for name, x, y in zip(("d_out_p", "d_lse_p", "row output"), suffix.merge_backward_triton(*args),
                              _merge_backward_reference(*args)):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name}: {m}")


def _load_bench():
    return load_tool("bench")


@in_interpreter
def test_bench_suffix_table(suffix, monkeypatch):
    """``tools/bench.py --only suffix`` on the GPU path (the kernels, interpreted): every variant
    and a sweep entry pass their checks; a wrong backward is reported, and counted, as a mismatch."""
    table = _load_bench().suffix  # tools/benchmarks/suffix.py, where suffix_rows reads SUFFIX_SWEEP
    monkeypatch.setattr(table, "SUFFIX_SWEEP", table.SUFFIX_SWEEP[:1])
    args = (CPU, torch.float32, 10, [3], (4, 2), 8, 1, {"TB/s": 1.0})
    rows, failed = table.suffix_rows(*args, sweep=True)
    assert [(r["op"], r["variant"].split()[0]) for r in rows] == [
        ("forward", "heads"), ("forward", "grouped"), ("backward", "split"), ("backward", "fused"),
        ("forward", "grouped"), ("backward", "fused")]
    assert failed == 0 and all(r["check"] == "ok" for r in rows), rows
    fwd, bwd = table.suffix_bytes(1, 4, 2, 10, 3, 3, 8, 8, 4)
    assert [r["MB"] for r in rows[:4]] == [float(f"{n / 1e6:.4g}") for n in (fwd, fwd, bwd, bwd)]

    real = suffix.suffix_backward_triton

    def off_by_a_little(*args, variant, config):  # the fused variant's dq, 1e-3 off
        dq, *rest = real(*args, variant=variant, config=config)
        return (dq + 1e-3 if variant == "fused" else dq), *rest

    monkeypatch.setattr(suffix, "suffix_backward_triton", off_by_a_little)
    rows, failed = table.suffix_rows(*args, sweep=False)
    assert failed == 1 and [r["check"][:8] for r in rows] == ["ok", "ok", "ok", "MISMATCH"], rows


# ----------------------------------------------------------------------------- head loss kernel

@in_interpreter
@pytest.mark.parametrize("kind", ["probs", "logits", "ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [37, 4100])  # one block, and three (the last partial: 2048-wide blocks)
def test_xent_rows_kernel_matches_torch(kind, dtype, V):
    """``_triton_loss.xent_rows_triton`` (the head loss's rows on CUDA) against
    ``loss._xent_rows_torch``: loss, hits and the logits' gradient of the rows that count, and
    zeros for the others; rows that do not count hold NaN in the target, or an id out of range;
    row 3 has a tie for its maximum (the first index wins, as torch.argmax), and its target agrees;
    the mask, the ids and the target rows are strided views."""
    from compiled_mask.draft._triton_loss import xent_rows_triton
    from compiled_mask.draft.loss import _xent_rows_torch

    g = torch.Generator().manual_seed(V)
    n = 7
    z = (3 * torch.randn(n, V, generator=g)).to(dtype)
    counted = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    if kind == "ids":
        target = torch.randint(0, V, (n,), generator=g)
        target[1], target[5], target[2] = -1, V + 2, -5
    else:
        target = (2 * torch.randn(n, V, generator=g)).to(dtype)
        target[2] = target[4] = float("nan")
        target = target.softmax(-1) if kind == "probs" else target
        target = torch.cat([target, target], -1)[:, ::2]  # rows with a column stride of 2
    z[3, V // 2] = z[3, V - 1] = z[3].max() + 1  # a tie for the argmax: the first one is hit
    if kind == "ids":
        target[3] = V // 2
    else:
        target[3, V // 2] = target[3].max() + 1
    if kind == "ids":
        target = torch.stack([target, target], -1)[:, 0]  # ids with a stride of 2
    counted = torch.stack([counted, counted], -1)[:, 0]  # a mask with a stride of 2
    for grad in (False, True):
        got = xent_rows_triton(z.clone(), kind, target, counted, grad)
        want = _xent_rows_torch(z.clone(), kind, target, counted, grad)
        live = counted & ((target >= 0) & (target < V) if kind == "ids" else True)
        torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], want[1]) and got[1][3], (got[1], want[1])
        if grad:
            torch.testing.assert_close(got[2][live], want[2][live], rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=1e-5)
            assert not got[2][~live].any()
        else:
            assert got[2] is None and want[2] is None


@in_interpreter
@pytest.mark.parametrize("x_dtype, param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("H", [24, 2500])  # one block of columns, and three (the last partial: 1024-wide)
def test_norm_kernels_match_torch(x_dtype, param_dtype, H):
    """``_triton_loss.rms_norm_rows_triton`` and its backward (the head loss's final norm on CUDA)
    against ``loss._rms_norm_rows_torch`` and its backward: normalised rows, inv, the hidden
    states' gradient (zeros in rows that do not count, written into a strided row view) and the
    weight's; 7 rows (not a multiple of the kernels' 4 rows per program), rows that do not count
    hold NaN, the hidden states and the weight have a column stride of 2 (the gradient's rows too,
    once), eps = 0 with an all-zero row that does not count."""
    from compiled_mask.draft._triton_loss import rms_norm_rows_backward_triton, rms_norm_rows_triton
    from compiled_mask.draft.loss import _rms_norm_rows_backward_torch, _rms_norm_rows_torch

    g = torch.Generator().manual_seed(H)
    n = 7
    x = (3 * torch.randn(n, H, generator=g)).to(x_dtype)
    x[2] = float("nan")
    x[4] = 0
    x = torch.stack([x, x], -1).flatten(-2)[:, ::2]  # a column stride of 2
    counted = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    weight = (1 + torch.randn(H, 2, generator=g)).to(param_dtype)[:, 0]  # a stride of 2
    d_normed = torch.randn(n, H, generator=g).to(param_dtype)
    for eps in (1e-5, 0.0):
        got_normed, got_inv = rms_norm_rows_triton(x, counted, weight, eps, param_dtype)
        want_normed, want_inv = _rms_norm_rows_torch(x, counted, weight, eps, param_dtype)
        assert got_normed.dtype == want_normed.dtype == param_dtype
        tol = dict(rtol=1.6e-2, atol=1e-2) if torch.bfloat16 in (x_dtype, param_dtype) else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_normed, want_normed, **tol)
        assert not got_normed[~counted].any()
        torch.testing.assert_close(got_inv[counted], want_inv[counted], rtol=1e-5, atol=0)
        for grad_x, grad_w in ((True, True), (True, False), (False, True)):
            got_dx = torch.full((n, 2 * H), 7.0, dtype=x_dtype)[:, :H] if grad_x else None  # rows of stride 2H
            if grad_x and eps == 0.0:  # a column stride of 2 as well
                got_dx = torch.full((n, 2 * H), 7.0, dtype=x_dtype)[:, ::2]
            want_dx = torch.empty(n, H, dtype=x_dtype) if grad_x else None
            got_dw = rms_norm_rows_backward_triton(d_normed, x, got_inv, counted, weight, got_dx, grad_w)
            want_dw = _rms_norm_rows_backward_torch(d_normed, x, got_inv, counted, weight, want_dx, grad_w)
            if grad_x:
                torch.testing.assert_close(got_dx, want_dx, **tol)
                assert not got_dx[~counted].any()
            if grad_w and x_dtype == torch.float32:
                torch.testing.assert_close(got_dw, want_dw, rtol=1e-5, atol=1e-5)
            elif grad_w:  # the interpreter rounds to bf16 toward zero: each xhat within 2**-7 of the torch one
                xhat = _rms_norm_rows_torch(x, counted, torch.ones_like(weight), eps, torch.float32)[0]
                bound = 2.0**-7 * (d_normed.float().abs() * xhat.abs()).sum(0) + 1e-5  # [H]
                assert ((got_dw - want_dw).abs() <= bound).all(), (got_dw - want_dw).abs().max()
            else:
                assert got_dw is None and want_dw is None
