"""backend="split": causal flash + suffix diagonals merged by log-sum-exp, forward and backward.

It needs no flex_attention, so unlike the block-mask backends its backward runs on CPU: outputs
and gradients are checked here against a float64 dense reference, eagerly and compiled.
"""

from __future__ import annotations

import pytest
import torch
from expect import TestCase
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import (
    assert_cuda_graph_forward,
    assert_ttt_loop_one_graph,
    backend_errors,
    eagle3_dense,
    float64_reference,
    rel_err,
)

from compiled_mask import Eagle3Attention, _causal
from compiled_mask._op import _first_keys
from compiled_mask._split import _split_attention, _split_attention_backward
from compiled_mask.inspect import GraphCounter, compile_summary, watch_recompiles


def _case(B, Hq, Hkv, q_len, max_rounds, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q = make(B, Hq, q_len, D).requires_grad_()
    k = make(B, Hkv, q_len * max_rounds, D).requires_grad_()
    v = make(B, Hkv, q_len * max_rounds, D).requires_grad_()
    return q, k, v, make(B, Hq, q_len, D)


# (B, Hq, Hkv, q_len, max_rounds, live, D, dtype, tolerance)
CASES = [
    (2, 4, 2, 100, 4, 3, 16, torch.float32, 1e-5),  # Q_LEN off any block size, GQA, a dead round
    (1, 4, 4, 64, 7, 7, 32, torch.float32, 1e-5),  # 7 live rounds
    (1, 8, 2, 130, 5, 1, 16, torch.float32, 1e-5),  # 1 live round: the suffix is all dead
    (1, 4, 2, 128, 4, 4, 32, torch.bfloat16, 1e-2),  # bf16
]


@pytest.mark.parametrize("B, Hq, Hkv, q_len, max_rounds, live, D, dtype, tol", CASES)
def test_forward_backward_vs_float64(B, Hq, Hkv, q_len, max_rounds, live, D, dtype, tol):
    q, k, v, dout = _case(B, Hq, Hkv, q_len, max_rounds, D, dtype)
    attn = Eagle3Attention(q_len, max_rounds, backend="split")
    out = attn(q, k, v, torch.tensor(live))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    allowed = eagle3_dense(q_len, k.shape[2], live_kv_len=q_len * live)
    want, want_grads = float64_reference(q, k, v, dout, allowed)
    assert out.dtype == dtype
    assert rel_err(out, want) < tol
    for name, g, w in zip("qkv", grads, want_grads):
        assert g.dtype == dtype and rel_err(g, w) < tol, name
    if live < max_rounds:  # dead rounds get exactly no gradient
        assert grads[1][:, :, q_len * live :].abs().max() == 0
        assert grads[2][:, :, q_len * live :].abs().max() == 0


def test_int_rounds_eagerly_and_out_of_range_tensor_clamps():
    q, k, v, _ = _case(1, 4, 2, 50, 3, 16, torch.float32)
    attn = Eagle3Attention(50, 3, backend="split")
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v, 2), attn(q, k, v, torch.tensor(2)))
        torch.testing.assert_close(attn(q, k, v, torch.tensor(9)), attn(q, k, v, torch.tensor(3)))
        torch.testing.assert_close(attn(q, k, v, torch.tensor(-1)), attn(q, k, v, torch.tensor(1)))


@pytest.mark.usefixtures("fresh_compile_state")
class TestSplitCompiled(TestCase):
    def test_ttt_loop_forward_backward_one_graph(self):
        """Compiled fwd+bwd over rounds 1..7: one graph, each step equal to the reference."""
        q_len, max_rounds = 100, 7
        counter = GraphCounter()
        attn = torch.compile(Eagle3Attention(q_len, max_rounds, backend="split"), backend=counter,
                             fullgraph=True)
        q, k, v, dout = _case(1, 4, 2, q_len, max_rounds, 16, torch.float32, seed=3)
        with watch_recompiles() as reasons:
            for live in range(1, max_rounds + 1):
                out = attn(q, k, v, torch.tensor(live))
                grads = torch.autograd.grad(out, (q, k, v), dout)
                allowed = eagle3_dense(q_len, k.shape[2], live_kv_len=q_len * live)
                want, want_grads = float64_reference(q, k, v, dout, allowed)
                assert rel_err(out, want) < 1e-5
                assert all(rel_err(g, w) < 1e-5 for g, w in zip(grads, want_grads))
        self.assertExpectedInline(compile_summary(counter, reasons), """\
graphs: 1
recompiles: none""")


def test_forward_matches_compiled_flex():
    """The same function as the block-mask backend, on the same inputs (CPU: forward only)."""
    q_len, max_rounds, live = 200, 4, 3
    q, k, v = (t.detach() for t in _case(1, 4, 2, q_len, max_rounds, 16, torch.float32, seed=5)[:3])
    flex = torch.compile(Eagle3Attention(q_len, max_rounds, backend="flex"), fullgraph=True)
    split = Eagle3Attention(q_len, max_rounds, backend="split")
    with torch.no_grad():
        torch.testing.assert_close(split(q, k, v, torch.tensor(live)),
                                   flex(q, k, v, torch.tensor(live)), rtol=0, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize(
    "q_len, max_rounds, live, Hq, Hkv, D",
    [(1000, 7, 7, 8, 2, 128), (1024, 7, 1, 8, 2, 64), (1024, 4, 3, 4, 4, 128)],
)
def test_split_cuda_vs_float64_and_flex(fresh_compile_state, monkeypatch, kernel, q_len, max_rounds,
                                        live, Hq, Hkv, D):
    """On CUDA the causal part runs cuDNN (or flash); bf16 fwd+bwd no worse than flex."""
    assert _causal._causal_kernel(torch.empty(1, 1, 2, D, device="cuda")) == "cudnn"  # the default
    monkeypatch.setattr(_causal, "_causal_kernel", lambda q: kernel)
    errors = backend_errors(("split", "flex"), q_len, max_rounds, live, Hq, Hkv, D, torch.bfloat16)
    for split_err, flex_err in zip(errors["split"], errors["flex"]):
        assert split_err < 1e-2
        assert split_err <= 1.25 * flex_err


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_split_cuda_misaligned_inputs(fresh_compile_state, compiled):
    """Contiguous q, k, v, dO at storage offsets that are not 16-byte aligned (views into larger
    buffers): exact eagerly, and in a graph compiled for such inputs (the causal op sees the real
    tensors: Note [aligned kernel inputs] in _causal.py)."""
    q_len, max_rounds, Hq, Hkv, D = 512, 3, 4, 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)

    def at_offset(offset, *shape):
        flat = torch.randn(torch.Size(shape).numel() + offset, generator=g, device="cuda").bfloat16()
        return flat[offset:].view(shape)

    allowed = eagle3_dense(q_len, q_len * max_rounds)
    for offset in (0, 1, 3):  # elements: 0, 2 and 6 bytes
        attn = Eagle3Attention(q_len, max_rounds, backend="split")
        if compiled:  # compiled afresh for each: Inductor copies inputs less aligned than its first call's
            torch._dynamo.reset()
            attn = torch.compile(attn, fullgraph=True)
        q = at_offset(offset, 1, Hq, q_len, D)
        k, v = (at_offset(offset, 1, Hkv, q_len * max_rounds, D) for _ in range(2))
        dout = at_offset(offset, 1, Hq, q_len, D)
        assert (q.data_ptr() % 16 != 0) == (offset != 0) and q.is_contiguous()
        want, want_grads = float64_reference(q, k, v, dout, allowed)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the same storage, same offset
        out = attn(*leaves, torch.tensor(max_rounds, device="cuda"))
        grads = torch.autograd.grad(out, leaves, dout)
        for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
            assert rel_err(got, ref) < 1e-2, (offset, name, rel_err(got, ref))


@pytest.mark.gpu
def test_split_cuda_ttt_loop_one_graph(fresh_compile_state):
    assert_ttt_loop_one_graph("split", 1024, 8, 2, 128)


@pytest.mark.gpu
def test_split_cuda_graph_forward(fresh_compile_state):
    assert_cuda_graph_forward("split", 1000, 8, 2, 64)


@pytest.mark.gpu
def test_split_cuda_refuses_float32():
    attn = Eagle3Attention(128, 2, backend="split")
    q, k = torch.randn(1, 2, 128, 64, device="cuda"), torch.randn(1, 2, 256, 64, device="cuda")
    with pytest.raises(ValueError, match=r"fused causal kernel \(cuDNN or flash attention\), which takes bf16 or fp16 inputs, got torch.float32"):
        attn(q, k, k.clone(), torch.tensor(1, device="cuda"))


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 4]), q_len=st.integers(1, 90),
    max_rounds=st.integers(1, 5), live=st.integers(-1, 7), D=st.sampled_from([8, 16]),
    padded=st.booleans(), data=st.data(),
)
def test_fuzz_split_vs_float64(B, Hkv, G, q_len, max_rounds, live, D, padded, data):
    """Any shape, live count (clamped to [1, max_rounds]) and padding: fwd+bwd equal float64."""
    q, k, v, dout = _case(B, Hkv * G, Hkv, q_len, max_rounds, D, torch.float32, seed=q_len)
    seq_lens = (torch.tensor(data.draw(st.lists(st.integers(0, q_len), min_size=B, max_size=B)))
                if padded else None)
    out = Eagle3Attention(q_len, max_rounds, backend="split")(q, k, v, torch.tensor(live), seq_lens=seq_lens)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    live_kv_len = q_len * min(max(live, 1), max_rounds)
    allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=live_kv_len, seq_lens=seq_lens)
    want, want_grads = float64_reference(q, k, v, dout, allowed)
    for got, ref in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("D, Dv", [(24, 16), (16, 24)])
def test_value_head_dim_differs(compiled, D, Dv):
    """MLA-style heads (Note [value head dim]): the causal kernel gets zero-padded inputs, the
    suffix takes Dv as it is; fwd+bwd exact against float64, eager and compiled."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 50, D, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 150, D, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 150, Dv, generator=g, requires_grad=True)
    dout = torch.randn(2, 4, 50, Dv, generator=g)
    attn = Eagle3Attention(50, 3, backend="split")
    if compiled:
        torch._dynamo.reset()
        attn = torch.compile(attn, fullgraph=True)
    out = attn(q, k, v, torch.tensor(2))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want, want_grads = float64_reference(q, k, v, dout, eagle3_dense(50, 150, live_kv_len=100))
    assert out.shape == (2, 4, 50, Dv)
    assert rel_err(out, want) < 1e-5
    for name, got, ref in zip("qkv", grads, want_grads):
        assert got.shape == ref.shape and rel_err(got, ref) < 1e-5, name


@pytest.mark.parametrize("documents", [False, True])
def test_split_op_opcheck_and_lse_gradcheck(documents):
    """``compiled_mask::split_attention`` and its backward op: fakes state the real outputs and
    autograd is registered (opcheck, q/k/v in a projection's layout); gradcheck in float64 of
    out and lse together (the op returns its lse; an lse gradient must be exact too: Note [lse
    gradient through the row term] in _causal.py), with and without packed documents, a dead
    round and a scale of 0 (Note [a scale of 0 or below])."""

    q_len, max_rounds, B, Hq, Hkv, D = 6, 3, 2, 4, 2, 4
    g = torch.Generator().manual_seed(3)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = make(B, q_len, Hq, D).transpose(1, 2).requires_grad_()
    k = make(B, q_len * max_rounds, Hkv, D).transpose(1, 2).requires_grad_()
    v = make(B, q_len * max_rounds, Hkv, D).transpose(1, 2).requires_grad_()
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, 2, 2]])
    first_key = _first_keys(q_len, None, doc_ids) if documents else None
    rounds = torch.tensor(2)  # round 2 of 3 dead
    torch.library.opcheck(_split_attention, (q, k, v, rounds, first_key, q_len, 0.5))
    out, lse = _split_attention(q, k, v, rounds, first_key, q_len, 0.5)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    for g_lse in (None, dlse):
        args = (dout, g_lse, *(t.detach() for t in (q, k, v, out, lse)), rounds, first_key, q_len, 0.5)
        torch.library.opcheck(_split_attention_backward, args)
    valid = None if first_key is None else (doc_ids >= 0)[:, None, :, None]  # padding rows: no gradient

    def merged_like(q, k, v, scale):
        out, lse = _split_attention(q, k, v, rounds, first_key, q_len, scale)
        y = out * torch.sigmoid(lse).unsqueeze(-1)  # each element depends on its row's out and lse
        return y if valid is None else y * valid

    for scale in (0.5, 0.0):
        assert torch.autograd.gradcheck(lambda q, k, v: merged_like(q, k, v, scale), (q, k, v))
    grads = torch.autograd.grad(merged_like(q, k, v, 0.5).sum(), (k, v))
    for grad in grads:  # the dead round's keys
        assert (grad[:, :, 2 * q_len:] == 0).all()
