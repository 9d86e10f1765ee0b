"""The causal attention op (compiled_mask/_causal.py): a fused kernel returning (out, lse),
merged with another softmax part, differentiable in everything; the layout table of packed
documents on CPU.

CPU: opcheck, forward and gradients (of out and of lse, and of the part) against float64 math,
packed documents against a dense float64 reference; GPU (marked gpu): cuDNN and flash against
float64, the merge kernels against the torch merge, any layout of dO/out/lse, and misaligned
inputs eagerly and compiled.
"""

from __future__ import annotations

import pytest
import torch
from helpers import dense_reference_attention, rel_err

from compiled_mask import _causal
from compiled_mask._causal import (
    _causal_attention,
    _causal_attention_backward,
    _merge_backward_reference,
    _merge_reference,
    causal_attention,
)
from compiled_mask._op import _first_keys


def _qkv(B=2, Hq=4, Hkv=2, L=40, Lk=None, D=16, Dv=None, dtype=torch.float64, device="cpu", seed=0,
         transposed=False):
    """q, k, v leaves; ``transposed``: views of [B, L, H, D] storage (a projection's layout)."""
    g = torch.Generator(device=device).manual_seed(seed)
    Lk = L if Lk is None else Lk

    def make(h, n, d):
        if transposed:
            return torch.randn(B, n, h, d, generator=g, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, h, n, d, generator=g, device=device).to(dtype)

    return tuple(t.requires_grad_() for t in (make(Hq, L, D), make(Hkv, Lk, D), make(Hkv, Lk, Dv or D)))


def _reference(q, k, v, allowed, scale, part=None):
    """(out, lse) in float64 with dense math, merged with ``part``; allowed: [B or 1, 1, L, Lk] bool."""
    q, k, v = (t.double() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = p @ v
    if part is None:
        return out, lse
    out_p, lse_p = (t.double() for t in part)
    merged = torch.logaddexp(lse, lse_p)
    return torch.exp(lse - merged).unsqueeze(-1) * out + torch.exp(lse_p - merged).unsqueeze(-1) * out_p, merged


def _part(B, Hq, L, Dv, dtype=torch.float64, seed=3, device="cpu"):
    """A softmax part over other keys: out_p, lse_p (leaves)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out_p = torch.randn(B, Hq, L, Dv, generator=g, device=device).to(dtype)
    lse_p = torch.randn(B, Hq, L, generator=g, device=device).to(dtype) + 2
    return out_p.requires_grad_(), lse_p.requires_grad_()


def _doc_layout(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.randint(0, 3, (B, L), generator=g).cummax(-1).values  # runs of documents
    doc_ids[:, -5:] = -1  # padding at the end
    doc_ids[0, 10:13] = -1  # and a padding run inside a document
    return doc_ids


def _allowed(L, Lk, causal, first_key=None):
    pos_q, pos_k = torch.arange(L)[:, None], torch.arange(Lk)[None]
    allowed = (pos_k <= pos_q) if causal else torch.ones(L, Lk, dtype=torch.bool)
    allowed = allowed[None, None]  # [1, 1, L, Lk]
    if first_key is not None:
        allowed = allowed & (pos_k[None] >= first_key[:, :, None]).unsqueeze(1)
    return allowed


@pytest.mark.parametrize("with_part", [False, True])
@pytest.mark.parametrize("causal, Lk", [(True, None), (False, 24)])
@pytest.mark.parametrize("D, Dv", [(16, 16), (24, 16), (16, 24)])
def test_out_and_lse_and_their_gradients_vs_float64(causal, Lk, D, Dv, with_part):
    """out, lse and the gradients (of q, k, v and the part) for a loss of both, GQA and MLA-style
    head dims, with and without a part to merge."""
    q, k, v = _qkv(L=40, Lk=Lk, D=D, Dv=Dv)
    part = _part(2, 4, 40, Dv) if with_part else None
    scale = 0.3
    out, lse = causal_attention(q, k, v, scale=scale, causal=causal, part=part)
    want_out, want_lse = _reference(q, k, v, _allowed(40, k.shape[2], causal), scale, part)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    dout, dlse = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    leaves = (q, k, v, *(part or ()))
    got = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), leaves)
    want = torch.autograd.grad((want_out * dout).sum() + (want_lse * dlse).sum(), leaves)
    for name, x, w in zip(("q", "k", "v", "out_p", "lse_p"), got, want):
        torch.testing.assert_close(x, w, rtol=1e-10, atol=1e-10, msg=name)


def test_lse_gradient_gradcheck():
    """gradcheck of out and lse together, as a further merge uses them: every row with an lse
    gradient also has an output gradient (Note [lse gradient through the row term]); the part's
    gradients too."""
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, L=6, D=4)
    out_p, lse_p = _part(1, 2, 6, 4)

    def merged_like(q, k, v, out_p, lse_p):
        out, lse = causal_attention(q, k, v, scale=0.7, part=(out_p, lse_p))
        return out * torch.sigmoid(lse).unsqueeze(-1)  # each element depends on its row's out and lse

    assert torch.autograd.gradcheck(merged_like, (q, k, v, out_p, lse_p))
    assert torch.autograd.gradcheck(lambda *a: causal_attention(*a, scale=0.7)[0], (q, k, v))


def test_packed_documents_on_cpu_vs_float64():
    """The layout table on CPU: a document mask; padding rows give out 0 and the lowest float as
    lse; gradients of valid rows exact, padding rows' inputs get none."""
    q, k, v = _qkv(B=2, L=40, dtype=torch.float64)
    doc_ids = _doc_layout(2, 40)
    first_key = _first_keys(40, None, doc_ids)
    out, lse = causal_attention(q, k, v, scale=0.25, first_key=first_key)
    allowed = _allowed(40, 40, True, first_key)
    want_out, want_lse = _reference(q, k, v, allowed, 0.25)
    padding = (doc_ids == -1)[:, None, :].expand_as(lse)
    assert (out[padding.unsqueeze(-1).expand_as(out)] == 0).all()
    assert (lse[padding] == torch.finfo(lse.dtype).min).all()
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[~padding], want_lse[~padding], rtol=1e-12, atol=1e-12)
    dout = torch.randn(out.shape, dtype=out.dtype).masked_fill(padding.unsqueeze(-1), 0.0)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(want_out, (q, k, v), dout)
    for name, x, w in zip("qkv", got, want):
        torch.testing.assert_close(x, w, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck(documents, transposed):
    """Both ops' fakes state the real outputs (shapes, dtypes, contiguous), and autograd is
    registered; inputs in a projection's layout too."""
    q, k, v = _qkv(B=2, L=20, D=16, dtype=torch.float32, transposed=transposed)
    first_key = _first_keys(20, None, _doc_layout(2, 20)) if documents else None
    for part in (None, _part(2, 4, 20, 16, dtype=torch.float32)):
        out_p, lse_p = (None, None) if part is None else part
        torch.library.opcheck(_causal_attention, (q, k, v, out_p, lse_p, first_key, 0.25, True))
        out, lse = _causal_attention(q, k, v, out_p, lse_p, first_key, 0.25, True)
        dout, dlse = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2), torch.randn_like(lse)
        parts = () if part is None else (out_p.detach(), lse_p.detach())
        for g_lse in (None, dlse):
            args = (dout, g_lse, *(t.detach() for t in (q, k, v)), out.detach(), lse.detach(),
                    *(parts or (None, None)), first_key, 0.25, True)
            torch.library.opcheck(_causal_attention_backward, args)
            for grad in _causal_attention_backward(*args):
                assert grad.is_contiguous()


def test_compiled_equals_eager():
    """Inside torch.compile (fullgraph) the op gives the eager outputs and gradients."""
    q, k, v = _qkv(L=30, dtype=torch.float32)
    doc_ids = _doc_layout(2, 30)

    def f(q, k, v, first_key):
        out, lse = causal_attention(q, k, v, scale=0.2, first_key=first_key)
        return (out.sum(-1) * 0.5 + lse.clamp(min=-1e4)).sum()

    torch._dynamo.reset()
    for first_key in (None, _first_keys(30, None, doc_ids)):
        eager = torch.autograd.grad(f(q, k, v, first_key), (q, k, v))
        compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v, first_key), (q, k, v))
        for x, w in zip(compiled, eager):
            torch.testing.assert_close(x, w)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_kernel_choice():
    """cuDNN where it runs; flash for one query (cuDNN refuses s_q = s_kv = 1) and head dims cuDNN
    does not take."""
    assert _causal._causal_kernel(torch.empty(1, 1, 2, 64, device="cuda")) == "cudnn"
    assert _causal._causal_kernel(torch.empty(1, 1, 1, 64, device="cuda")) == "flash"
    assert _causal._causal_kernel(torch.empty(1, 1, 8, 192, device="cuda")) == "flash"


@pytest.mark.gpu
@pytest.mark.parametrize("D, Dv", [(12, 12), (20, 12), (12, 20), (128, 136), (192, 128)])
def test_cuda_head_dims_vs_float64(D, Dv):
    """Head dims the kernels do not take as they are (not a multiple of 8, D != Dv, one above
    cuDNN's 128 after padding): padded inside the op, exact against float64."""
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, L=200, D=D, Dv=Dv, dtype=torch.bfloat16, device="cuda", transposed=True)
    part = _part(1, 4, 200, Dv, dtype=torch.float32, device="cuda")
    out, lse = causal_attention(q, k, v, scale=D ** -0.5, causal=True, part=part)
    want_out, want_lse = _reference(q, k, v, _allowed(200, 200, True).cuda(), D ** -0.5, part)
    assert out.shape == (1, 4, 200, Dv)
    assert rel_err(out, want_out) < 1e-2 and rel_err(lse, want_lse) < 1e-3
    dout = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda").bfloat16()
    leaves = (q, k, v, *part)
    got = torch.autograd.grad((out.float() * dout).sum(), leaves)
    want = torch.autograd.grad((want_out * dout.double()).sum(), leaves)
    for name, x, w in zip(("q", "k", "v", "out_p", "lse_p"), got, want):
        assert rel_err(x, w) < 2e-2, (name, rel_err(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_vs_float64(monkeypatch, kernel, causal):
    """bf16 out, lse and gradients (of both) against float64, each kernel, merged with a part."""
    monkeypatch.setattr(_causal, "_causal_kernel", lambda q: kernel)
    q, k, v = _qkv(B=2, Hq=8, Hkv=2, L=300, Lk=None if causal else 200, D=64, dtype=torch.bfloat16,
                   device="cuda", transposed=True)
    part = _part(2, 8, 300, 64, dtype=torch.float32, device="cuda")
    out, lse = causal_attention(q, k, v, scale=0.125, causal=causal, part=part)
    want_out, want_lse = _reference(q, k, v, _allowed(300, k.shape[2], causal).cuda(), 0.125, part)
    assert rel_err(out, want_out) < 1e-2 and rel_err(lse, want_lse) < 1e-3
    g = torch.Generator(device="cuda").manual_seed(1)
    dout = torch.randn(out.shape, generator=g, device="cuda").bfloat16()
    dlse = 0.1 * torch.randn(lse.shape, generator=g, device="cuda")
    leaves = (q, k, v, *part)
    got = torch.autograd.grad((out.float() * dout).sum() + (lse * dlse).sum(), leaves)
    want = torch.autograd.grad((want_out * dout.double()).sum() + (want_lse * dlse.double()).sum(), leaves)
    for name, x, w in zip(("q", "k", "v", "out_p", "lse_p"), got, want):
        assert rel_err(x, w) < 2e-2, (name, rel_err(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("Dv", [64, 100, 256])
def test_merge_kernels_match_torch(Dv, with_dlse):
    """The Triton merge (forward) and the part's gradients (backward) against the torch merge."""
    from compiled_mask._triton_suffix import merge_backward_triton, merge_forward_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    out_c = torch.randn(2, 8, 300, Dv, generator=g, device="cuda").bfloat16()
    lse_c = torch.randn(2, 8, 300, generator=g, device="cuda")
    out_p, lse_p = _part(2, 8, 300, Dv, dtype=torch.float32, device="cuda")
    lse_p = lse_p.detach().clone()
    lse_p[0, 0, :5] = torch.finfo(torch.float32).min  # empty parts
    got = merge_forward_triton(out_c, lse_c, out_p.detach(), lse_p, torch.bfloat16)
    want = _merge_reference(out_c, lse_c, out_p.detach(), lse_p, torch.bfloat16)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w)
    dout = torch.randn(out_c.shape, generator=g, device="cuda").bfloat16()
    dlse = torch.randn(lse_c.shape, generator=g, device="cuda") if with_dlse else None
    args = (dout, dlse, *want, out_p.detach(), lse_p)
    exact = _merge_backward_reference(*(None if t is None else t.double() for t in args))
    # d_lse_p sums Dv float32 products in another order than torch: each no further from the
    # float64 value than 2x torch's float32 (or float32's resolution of it).
    for name, x, w, w64 in zip(("d_out_p", "d_lse_p", "row output"), merge_backward_triton(*args),
                               _merge_backward_reference(*args), exact):
        err, torch_err = ((t.double() - w64).abs().max().item() for t in (x, w))
        assert err <= max(2 * torch_err, 2 * torch.finfo(x.dtype).eps * w64.abs().max().item()), (name, err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_backward_any_strides_in_one_process(monkeypatch, kernel):
    """dO, out and lse in another layout than the previous call's, for the same q, k, v: exact
    (Note [cuDNN backward strides])."""
    monkeypatch.setattr(_causal, "_causal_kernel", lambda q: kernel)
    q, k, v = (t.detach() for t in _qkv(B=2, Hq=4, Hkv=2, L=64, D=32, dtype=torch.bfloat16, device="cuda",
                                        transposed=True))
    out, lse = _causal_attention(q, k, v, None, None, None, 32**-0.5, True)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want_out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, scale=32**-0.5,
                                                                enable_gqa=True)
    dout = torch.randn(out.shape, device="cuda").bfloat16()
    want = torch.autograd.grad(want_out, leaves, dout.double())
    for order in (("contiguous", "transposed"), ("transposed", "contiguous"), ("contiguous", "transposed")):
        for layout in order:
            d, o, s = dout, out, lse
            if layout == "transposed":
                d, o = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (d, o))
                s = s.transpose(1, 2).contiguous().transpose(1, 2)
            got = _causal_attention_backward(d, None, q, k, v, o, s, None, None, None, 32**-0.5, True)[:3]
            for name, x, w in zip("qkv", got, want):
                assert rel_err(x, w) < 2e-2, (order, layout, name, rel_err(x, w))


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("compiled", [False, True])
def test_misaligned_inputs(compiled):
    """Contiguous q, k, v, dO at addresses that are not 16-byte aligned (views into larger
    buffers), eagerly and in a graph compiled for them: exact (Note [aligned kernel inputs])."""
    L, Hq, Hkv, D = 512, 4, 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)

    def at_offset(offset, *shape):
        flat = torch.randn(torch.Size(shape).numel() + offset, generator=g, device="cuda").bfloat16()
        return flat[offset:].view(shape)

    f = lambda q, k, v: causal_attention(q, k, v, scale=D**-0.5)[0]  # noqa: E731
    for offset in (0, 1, 3):  # elements: 0, 2 and 6 bytes
        if compiled:
            torch._dynamo.reset()
            f = torch.compile(f, fullgraph=True)
        q, k, v = at_offset(offset, 1, Hq, L, D), at_offset(offset, 1, Hkv, L, D), at_offset(offset, 1, Hkv, L, D)
        dout = at_offset(offset, 1, Hq, L, D)
        assert (q.data_ptr() % 16 != 0) == (offset != 0) and q.is_contiguous()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the same storage, same offset
        out = f(*leaves)
        grads = torch.autograd.grad(out, leaves, dout)
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = dense_reference_attention(*ref, _allowed(L, L, True)[0, 0].cuda(), scale=D**-0.5)
        want_grads = torch.autograd.grad(want, ref, dout.double())
        for name, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
            assert rel_err(got, w) < 1e-2, (offset, name, rel_err(got, w))
