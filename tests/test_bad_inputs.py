"""Inputs a new user tries: each is exact or refused with an error naming the value and the fix.

The attention cases use Q_LEN 64, max_rounds 3, B 2, 4/2 heads, D 8 (CPU). Each test failed
before the change it guards (a silently wrong result, NaN, or a raw ZeroDivisionError /
IndexError / dynamo traceback).
"""

from __future__ import annotations

import pytest
import torch
from helpers import dense_reference_attention, eagle3_dense, float64_reference, rel_err

from compiled_mask import Eagle3Attention
from compiled_mask.draft import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model
from compiled_mask.draft.unroll import WholeSequence

Q_LEN, ROUNDS = 64, 3


def _qkv(B=2, Hq=4, Hkv=2, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Q_LEN, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Q_LEN * ROUNDS, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Q_LEN * ROUNDS, D, generator=g).to(dtype)
    return q, k, v


def _grads(attn, q, k, v, live=2, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attn(*leaves, torch.tensor(live), **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    return (out, *torch.autograd.grad(out, leaves, dout)), dout


@pytest.mark.parametrize("compiled", [False, True])
def test_split_strided_head_dim(fresh_compile_state, compiled):
    """q/k/v whose last dimension has a stride of 2: exact, like the same values contiguous
    (the CPU flash kernel read them wrong: off by up to 2.8)."""
    q, k, v = _qkv()
    strided = lambda t: torch.stack([t, t], -1).flatten(-2)[..., ::2]  # noqa: E731
    attn = Eagle3Attention(Q_LEN, ROUNDS, backend="split")
    if compiled:
        attn = torch.compile(attn, fullgraph=True)
    got, _ = _grads(attn, *(strided(t) for t in (q, k, v)))
    want, _ = _grads(attn, q, k, v)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w)


def test_split_float64_is_float64_exact():
    """float64 inputs give float64 precision (the suffix step was float32: 2e-7)."""
    q, k, v = _qkv(dtype=torch.float64)
    got, dout = _grads(Eagle3Attention(Q_LEN, ROUNDS, backend="split"), q, k, v)
    want, want_grads = float64_reference(q, k, v, dout, eagle3_dense(Q_LEN, Q_LEN * ROUNDS, live_kv_len=2 * Q_LEN))
    for x, w in zip(got, (want, *want_grads)):
        assert rel_err(x, w) < 1e-12


@pytest.mark.parametrize("backend", ["split", "flex"])
def test_nan_in_padding_query_rows(backend):
    """NaN in q at padding rows: those rows are zeros as promised (split returned NaN rows)."""
    q, k, v = _qkv()
    seq_lens = torch.tensor([40, 64])
    q[0, :, 40:] = float("nan")
    with torch.no_grad():
        out = Eagle3Attention(Q_LEN, ROUNDS, backend=backend)(q, k, v, torch.tensor(2), seq_lens=seq_lens)
    assert not out.isnan().any()
    assert (out[0, :, 40:] == 0).all()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("layout", ["seq_lens", "doc_ids"])
@pytest.mark.parametrize("where", ["kv", "q"])
def test_nan_in_padding_inputs(fresh_compile_state, layout, compiled, where):
    """NaN in k/v at padding positions (every round), or in q at padding rows, must not reach
    valid rows, the output or any gradient (0 * NaN in P @ V made every valid row of the sample
    NaN; a NaN padding query made the valid keys' dk and dv NaN through dS^T Q)."""
    q, k, v = _qkv()
    if layout == "seq_lens":
        kw, padding = {"seq_lens": torch.tensor([40, 64])}, torch.arange(Q_LEN) >= 40
    else:
        doc_ids = torch.tensor([[0] * 20 + [-1] * 10 + [1] * 34, [0] * 64])
        kw, padding = {"doc_ids": doc_ids}, doc_ids[0] == -1
    clean = (q.clone(), k.clone(), v.clone())
    if where == "kv":
        for t in (k, v):
            t.view(2, 2, ROUNDS, Q_LEN, 8)[0, :, :, padding] = float("nan")  # sample 0, every round
    else:
        q[0, :, padding] = float("nan")
    attn = Eagle3Attention(Q_LEN, ROUNDS, backend="split")
    if compiled:
        attn = torch.compile(attn, fullgraph=True)
    got, _ = _grads(attn, q, k, v, **kw)
    want, _ = _grads(attn, *clean, **kw)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):  # dq, dk, dv: equal, and zero at the padding positions
        torch.testing.assert_close(g.nan_to_num(0.0), w)
        assert not g.isnan().any()


@pytest.mark.parametrize("compiled", [False, True])
def test_nan_in_padding_keys_flex(fresh_compile_state, compiled):
    """The same for the flex backend, forward (no CPU backward)."""
    q, k, v = _qkv()
    seq_lens = torch.tensor([40, 64])
    clean = (k.clone(), v.clone())
    for t in (k, v):
        t.view(2, 2, ROUNDS, Q_LEN, 8)[0, :, :, 40:] = float("nan")
    attn = Eagle3Attention(Q_LEN, ROUNDS, backend="flex")
    if compiled:
        attn = torch.compile(attn, fullgraph=True)
    with torch.no_grad():
        got = attn(q, k, v, torch.tensor(3), seq_lens=seq_lens)
        want = attn(q, *clean, torch.tensor(3), seq_lens=seq_lens)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_split_scale_zero_or_negative(scale):
    """A softmax scale of 0 or below is defined (0: uniform over the allowed keys); split gave NaN."""
    q, k, v = _qkv(dtype=torch.float64)
    got, dout = _grads(Eagle3Attention(Q_LEN, ROUNDS, backend="split", scale=scale), q, k, v)
    allowed = eagle3_dense(Q_LEN, Q_LEN * ROUNDS, live_kv_len=2 * Q_LEN)
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    want = dense_reference_attention(*ref, allowed, scale=scale)
    want_grads = torch.autograd.grad(want, ref, dout)
    for x, w in zip(got, (want, *want_grads)):  # (with scale 0, dq is 0)
        assert not x.isnan().any()
        torch.testing.assert_close(x, w, rtol=1e-10, atol=1e-12)


def test_scale_must_be_finite():
    for scale in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match=r"scale must be a finite float or None"):
            Eagle3Attention(Q_LEN, ROUNDS, backend="split", scale=scale)


@pytest.mark.parametrize("backend", ["split", "flex"])
def test_zero_sizes(backend):
    """B = 0 and Hq = 0 give empty outputs (flex's behaviour); Hkv = 0 and D = 0 are refused
    (ZeroDivisionError / 'cannot reshape' / '0.0 cannot be raised to a negative power')."""
    attn = Eagle3Attention(Q_LEN, ROUNDS, backend=backend)
    rounds = torch.tensor(2)
    for B, Hq, Hkv in ((0, 4, 2), (2, 0, 2)):
        q, k, v = _qkv(B=B, Hq=Hq, Hkv=Hkv)
        with torch.no_grad():
            out = attn(q, k, v, rounds)
        assert out.shape == (B, Hq, Q_LEN, 8)
    q, k, v = _qkv(Hkv=0, Hq=0)
    with pytest.raises(ValueError, match=r"at least one head and q/k a head dim of at least 1, got Hkv=0"):
        attn(q, k, v, rounds)
    q, k, v = _qkv(D=0)
    with pytest.raises(ValueError, match=r"got Hkv=2 and D=0"):
        attn(q, k, v, rounds)


def test_compiled_errors_name_the_fix(fresh_compile_state):
    """Inside torch.compile: a Python int rounds after a tensor call, and a Q_LEN that does not
    fit, raise our message (not dynamo's BUILD_STRING error, nor bare symbolic sizes)."""
    attn = torch.compile(Eagle3Attention(Q_LEN, ROUNDS, backend="split"), fullgraph=True)
    q, k, v = _qkv()
    attn(q, k, v, torch.tensor(1))
    with pytest.raises(Exception) as err:
        attn(q, k, v, 2)
    assert "rounds is a Python int inside torch.compile" in str(err.value.__cause__)
    for L in (48, 32):  # the second changed size is traced as a symbol
        with pytest.raises(Exception) as err:
            attn(torch.randn(2, 4, L, 8), k, v, torch.tensor(1))
        cause = str(err.value.__cause__)
        assert "q must have Q_LEN=64 positions (dim 2)" in cause
        assert "48" in cause or "is traced as a symbol; the same call eagerly" in cause, cause


# ----------------------------------------------------------------------------- the draft model

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, draft_vocab_size=40, rope_theta=10000.0)


def _model(**kw):
    torch.manual_seed(0)
    return Eagle3Model(Eagle3DraftModel(Eagle3DraftConfig(**TINY)), 32, 3, **kw).double()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 32), generator=g)
    hidden = torch.randn(2, 32, 96, generator=g, dtype=torch.float64)
    target = torch.randn(2, 32, 40, generator=g, dtype=torch.float64).softmax(-1)
    loss_mask = torch.rand(2, 32, generator=g) > 0.3
    return ids, hidden, target, loss_mask


def _loss_and_grads(model, *batch, **kw):
    out = model(*batch, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params)


def test_model_nan_where_nothing_counts():
    """NaN in the target at positions whose loss_mask is False, and in hidden_states past
    seq_lens: the loss and every gradient equal the same batch with zeros there (the loss was
    NaN)."""
    model = _model()
    ids, hidden, target, loss_mask = _batch()
    seq_lens = torch.tensor([25, 32])
    dirty_target, dirty_hidden = target.clone(), hidden.clone()
    dirty_target[~loss_mask] = float("nan")
    dirty_hidden[0, 25:] = float("nan")
    clean_target = target.masked_fill(~loss_mask[..., None], 0.0)
    clean_hidden = hidden.clone()
    clean_hidden[0, 25:] = 0
    got, got_grads = _loss_and_grads(model, ids, dirty_hidden, dirty_target, loss_mask, seq_lens=seq_lens)
    want, want_grads = _loss_and_grads(model, ids, clean_hidden, clean_target, loss_mask, seq_lens=seq_lens)
    assert torch.isfinite(got.loss)
    torch.testing.assert_close(got.loss, want.loss)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_theta=0.0), r"rope_theta must be a finite number > 1, got rope_theta=0.0"),
    (dict(rope_theta=-5.0), r"rope_theta must be a finite number > 1"),
    (dict(rms_norm_eps=-1e-5), r"rms_norm_eps must be a finite number >= 0, got rms_norm_eps=-1e-05"),
    (dict(rms_norm_eps=float("nan")), r"rms_norm_eps must be a finite number >= 0"),
    (dict(head_dim=0), r"head_dim must be an int >= 1 or None, got head_dim=0"),
    (dict(head_dim=-8), r"head_dim must be an int >= 1 or None"),
    (dict(target_hidden_size=-1), r"target_hidden_size must be an int >= 1 or None, got target_hidden_size=-1"),
])
def test_config_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Eagle3DraftConfig(**{**TINY, **kwargs})


def test_model_refuses():
    draft = Eagle3DraftModel(Eagle3DraftConfig(**TINY))
    with pytest.raises(ValueError, match=r"loss_decay must be a finite number >= 0 \(Eagle3: 0.8\), got nan"):
        Eagle3Model(draft, 32, 3, loss_decay=float("nan"))
    with pytest.raises(ValueError, match=r"length must be at most q_len, got length=34 and q_len=32"):
        Eagle3Model(draft, 32, 34)
    model = Eagle3Model(draft, 32, 3)
    ids, hidden, target, loss_mask = _batch()
    hidden, target = hidden.float(), target.float()
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids \(e.g. int64\), got dtype torch.float32"):
        model(ids.float(), hidden, target, loss_mask)
    bad = ids.clone()
    bad[0, 3] = 100
    with pytest.raises(ValueError, match=r"input_ids must be target-vocabulary ids in \[0, vocab_size = 100\)"):
        model(bad, hidden, target, loss_mask)
    sequence = WholeSequence()
    with pytest.raises(ValueError, match=r"backend"):
        Eagle3Model(draft, 32, 3, sequence=sequence, attention_backend="nope")
    Eagle3Model(draft, 32, 3, sequence=sequence)  # the refused bind left it unbound
    with pytest.raises(ValueError, match=r"this WholeSequence is already bound to a model with q_len=32; pass a "
                       r"new WholeSequence\(\.\.\.\) to each Eagle3Model"):
        Eagle3Model(draft, 16, 3, sequence=sequence)  # it would shift the first model's rows by 16


def test_int_target_outside_the_draft_vocabulary():
    """Int target ids outside [0, draft_vocab) count nothing, at masked and counted positions
    alike (an id >= V raised a raw IndexError, or was clamped)."""
    model = _model()
    ids, hidden, _, loss_mask = _batch()
    target = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(3))
    outside = target.clone()
    outside[0, 5], outside[1, 7] = 40, 10_000
    dropped = target.clone()
    dropped[0, 5] = dropped[1, 7] = -1
    got, want = model(ids, hidden, outside, loss_mask), model(ids, hidden, dropped, loss_mask)
    torch.testing.assert_close(got.plosses, want.plosses)
    torch.testing.assert_close(got.acces, want.acces)


@pytest.mark.parametrize("ids, match", [
    ([5] * 39 + [7], r"target ids must be distinct .* got repeated ids \[5\]"),
    (list(range(39)) + [-1], r"target ids must lie in \[0, vocab_size = 100\), got \[-1\]"),
    (list(range(39)) + [100], r"got \[100\]"),
])
def test_vocab_mapping_refuses(ids, match):
    """Duplicates kept 23 of 24 ids and mapped one back wrong; -1 wrapped to the last row."""
    draft = Eagle3DraftModel(Eagle3DraftConfig(**TINY))
    with pytest.raises(ValueError, match=match):
        draft.set_vocab_mapping(torch.tensor(ids))


def test_target_to_draft_ids_outside_the_vocabulary():
    draft = Eagle3DraftModel(Eagle3DraftConfig(**TINY))
    assert draft.target_to_draft_ids(torch.tensor([3, -100, 100, 5000])).tolist() == [3, -1, -1, -1]
