"""The suffix op (compiled_mask/_suffix.py): the Eagle3 suffix rounds as a softmax part
(out_s, lse_s), differentiable in q and the suffix K/V; its Triton kernels (GPU) against the torch
math.

CPU: opcheck of the op and of its backward op, gradcheck in float64 (out_s and lse_s both
differentiated), dead rounds get zero gradients, a row with no live round is an empty part.
GPU (marked gpu): every kernel form against the reference. The kernels also run in the Triton
interpreter on CPU (tests/test_triton_interpreter.py).
"""

from __future__ import annotations

import pytest
import torch

from compiled_mask._suffix import (
    _suffix_attention,
    _suffix_attention_backward,
    _suffix_backward_reference,
    _suffix_reference,
)


def _merge_args(B, Hq, Hkv, L, S, D, Dv, live, device="cpu", dtype=torch.float32, strided=False, seed=0):
    """Forward inputs of the op ``(q, ks, vs, rounds, scale)`` and a dO, dL pair (in the part's
    float32, or float64).

    ``strided``: every tensor a [B, L, H, D] buffer viewed as [B, H, L, D], like SDPA's layouts.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def make(b, h, n, d, dtype=dtype):
        shape = (b, n, h, d) if strided else (b, h, n, d)
        x = torch.randn(*shape, generator=g, device=device).to(dtype)
        return x.transpose(1, 2) if strided else x

    part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q, ks, vs = make(B, Hq, L, D), make(B, Hkv, L * S, D), make(B, Hkv, L * S, Dv)
    rounds = torch.tensor(min(max(live, 1), S + 1), device=device)  # clamped, as _live_rounds does
    forward = (q, ks, vs, rounds, D**-0.5)
    return forward, (make(B, Hq, L, Dv, dtype=part_dtype), make(B, Hq, L, 1, dtype=part_dtype)[..., 0])


# (B, Hq, Hkv, L, S suffix rounds, D, Dv, live rounds)
CASES = [
    (1, 4, 2, 40, 3, 16, 16, 3),  # GQA, a dead round, L off the kernels' 32-query tiles
    (2, 4, 4, 33, 2, 24, 8, 5),  # live past the buffer (clamped), D not a power of two, Dv != D
    (1, 6, 2, 70, 4, 16, 16, 1),  # every suffix round dead
    (1, 2, 1, 32, 0, 16, 16, 1),  # no suffix rounds at all
]


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    forward, (dout, dlse) = _merge_args(*case, strided=case[0] == 2)
    torch.library.opcheck(_suffix_attention, forward)
    out, lse = _suffix_attention(*forward)
    q, ks, vs, rounds, scale = forward
    for g_lse in (None, dlse):
        torch.library.opcheck(_suffix_attention_backward, (dout, g_lse, q, ks, vs, out, lse, rounds, scale))


@pytest.mark.parametrize("case", [(1, 4, 2, 5, 2, 4, 3, 2), (2, 2, 2, 3, 2, 3, 3, 3), (1, 2, 1, 4, 2, 2, 2, 1)])
def test_gradcheck_float64(case):
    """Every input's gradient, for a loss of the merged out and lse, against finite differences."""
    forward, _ = _merge_args(*case, dtype=torch.float64)
    q, ks, vs, rounds, scale = forward
    leaves = [t.detach().requires_grad_() for t in (q, ks, vs)]
    assert torch.autograd.gradcheck(lambda *tensors: _suffix_attention(*tensors, rounds, scale), leaves)


def test_dead_rounds_get_zero_gradients_and_empty_rows():
    forward, (dout, dlse) = _merge_args(1, 4, 2, 20, 4, 8, 8, live=2)
    q, ks, vs, rounds, scale = forward
    out, lse = _suffix_reference(*forward)
    dq, dks, dvs = _suffix_backward_reference(dout, dlse, q, ks, vs, out, lse, rounds, scale)
    assert dks[:, :, 20:].abs().max() == 0 and dvs[:, :, 20:].abs().max() == 0  # rounds 2 and 3 of 4
    assert dks[:, :, :20].abs().max() > 0
    out, lse = _suffix_reference(q, ks, vs, torch.tensor(1), scale)  # no live suffix round: an empty part
    assert (out == 0).all() and (lse == torch.finfo(lse.dtype).min).all()
    assert all((g == 0).all() for g in _suffix_backward_reference(dout, dlse, q, ks, vs, out, lse, torch.tensor(1), scale))


def test_float64_stays_float64():
    """The part comes back float32, or float64 for float64 inputs: float64-exact (1e-15)."""
    forward, _ = _merge_args(1, 2, 1, 16, 2, 8, 8, live=3, dtype=torch.float64)
    out, lse = _suffix_reference(*forward)
    q, ks, vs, rounds, scale = forward
    scores = torch.stack([(q * ks[:, :, s * 16:(s + 1) * 16].repeat_interleave(2, 1)).sum(-1) * scale
                          for s in range(2)], -1)  # [B, Hq, L, S]
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-14, atol=1e-14)
    assert _suffix_reference(*_merge_args(1, 2, 1, 16, 2, 8, 8, live=3, dtype=torch.bfloat16)[0])[0].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", [(None, None), ("heads", "split")])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("case", CASES + [(2, 32, 8, 1000, 6, 128, 128, 7), (1, 8, 2, 515, 3, 64, 128, 3),
                                          (1, 32, 1, 64, 2, 32, 32, 3)])
def test_kernels_match_reference(case, strided, variant, dtype):
    """The Triton kernels (the default grouped ones, and the per-head ones) against the torch math
    they replace, on the same CUDA inputs; the last case's group (32 q-heads) is too wide for the
    grouped tiles and runs the per-head kernels either way."""
    from compiled_mask._triton_suffix import suffix_backward_triton, suffix_forward_triton

    forward, (dout, dlse) = _merge_args(*case, device="cuda", dtype=dtype, strided=strided)
    got = suffix_forward_triton(*forward, variant=variant[0])
    want = _suffix_reference(*forward)
    for x, w in zip(got, want):
        assert x.is_contiguous() and x.dtype == w.dtype
        torch.testing.assert_close(x, w)
    q, ks, vs, rounds, scale = forward
    for g_lse in (None, dlse):
        args = (dout, g_lse, q, ks, vs, *want, rounds, scale)
        got = suffix_backward_triton(*args, variant=variant[1])
        for name, x, w in zip(("dq", "dks", "dvs"), got, _suffix_backward_reference(*args)):
            assert x.is_contiguous() and x.dtype == w.dtype, name
            torch.testing.assert_close(x, w, msg=name)


@pytest.mark.gpu
def test_opcheck_cuda():
    forward, (dout, dlse) = _merge_args(*CASES[0], device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(_suffix_attention, forward)
    out, lse = _suffix_attention(*forward)
    q, ks, vs, rounds, scale = forward
    torch.library.opcheck(_suffix_attention_backward, (dout, dlse, q, ks, vs, out, lse, rounds, scale))
