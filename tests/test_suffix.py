"""The merge op (compiled_mask/_suffix.py): the suffix rounds folded into a causal part by
log-sum-exp, differentiable in every tensor input; its Triton kernels (GPU) against the torch math.

CPU: opcheck of the op and of its backward op, gradcheck in float64 (the merged out and lse both
differentiated), dead rounds get zero gradients. GPU (marked gpu): every kernel form and a
launch config against the reference. The kernels also run in the Triton interpreter on CPU
(tests/test_triton_interpreter.py).
"""

from __future__ import annotations

import pytest
import torch

from compiled_mask._suffix import _merge_backward_reference, _merge_reference, _suffix_merge, _suffix_merge_backward


def _merge_args(B, Hq, Hkv, L, S, D, Dv, live, device="cpu", dtype=torch.float32, strided=False, seed=0):
    """Forward inputs of the op ``(q, ks, vs, out_c, lse_c, rounds, scale)`` and a dO, dL pair.

    ``strided``: every tensor a [B, L, H, D] buffer viewed as [B, H, L, D], like SDPA's layouts.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def make(b, h, n, d, dtype=dtype):
        shape = (b, n, h, d) if strided else (b, h, n, d)
        x = torch.randn(*shape, generator=g, device=device).to(dtype)
        return x.transpose(1, 2) if strided else x

    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q, ks, vs = make(B, Hq, L, D), make(B, Hkv, L * S, D), make(B, Hkv, L * S, Dv)
    out_c = make(B, Hq, L, Dv)
    lse_c = make(B, Hq, L, 1, dtype=lse_dtype)[..., 0] + 3
    rounds = torch.tensor(min(max(live, 1), S + 1), device=device)  # clamped, as _live_rounds does
    forward = (q, ks, vs, out_c, lse_c, rounds, D**-0.5)
    return forward, (make(B, Hq, L, Dv), make(B, Hq, L, 1, dtype=lse_dtype)[..., 0])


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
    torch.library.opcheck(_suffix_merge, forward)
    out, lse = _suffix_merge(*forward)
    q, ks, vs, out_c, lse_c, rounds, scale = forward
    for g_lse in (None, dlse):
        torch.library.opcheck(_suffix_merge_backward, (dout, g_lse, q, ks, vs, out_c, lse_c, out, lse, rounds, scale))


@pytest.mark.parametrize("case", [(1, 4, 2, 5, 2, 4, 3, 2), (2, 2, 2, 3, 2, 3, 3, 3), (1, 2, 1, 4, 2, 2, 2, 1)])
def test_gradcheck_float64(case):
    """Every input's gradient, for a loss of the merged out and lse, against finite differences."""
    forward, _ = _merge_args(*case, dtype=torch.float64)
    q, ks, vs, out_c, lse_c, rounds, scale = forward
    leaves = [t.detach().requires_grad_() for t in (q, ks, vs, out_c, lse_c)]

    def merged(*tensors):
        out, lse = _suffix_merge(*tensors, rounds, scale)
        return out * torch.sigmoid(lse).unsqueeze(-1), lse

    assert torch.autograd.gradcheck(merged, leaves)


def test_dead_rounds_get_zero_gradients():
    forward, (dout, dlse) = _merge_args(1, 4, 2, 20, 4, 8, 8, live=2)
    q, ks, vs, out_c, lse_c, rounds, scale = forward
    out, lse = _merge_reference(*forward)
    dq, dks, dvs, _, _ = _merge_backward_reference(dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, scale)
    assert dks[:, :, 20:].abs().max() == 0 and dvs[:, :, 20:].abs().max() == 0  # rounds 2 and 3 of 4
    assert dks[:, :, :20].abs().max() > 0


def test_float64_stays_float64():
    """The math runs in float32 or wider: a float64 merge is float64-exact (1e-15), not float32's 1e-7."""
    forward, _ = _merge_args(1, 2, 1, 16, 2, 8, 8, live=3, dtype=torch.float64)
    out, lse = _merge_reference(*forward)
    q, ks, vs, out_c, lse_c, rounds, scale = forward
    scores = torch.stack([(q * ks[:, :, s * 16:(s + 1) * 16].repeat_interleave(2, 1)).sum(-1) * scale
                          for s in range(2)], -1)  # [B, Hq, L, S]
    want_lse = torch.logaddexp(lse_c, scores.logsumexp(-1))
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(lse, want_lse, rtol=1e-14, atol=1e-14)


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
    from compiled_mask._triton_suffix import merge_backward_triton, merge_forward_triton

    forward, (dout, dlse) = _merge_args(*case, device="cuda", dtype=dtype, strided=strided)
    got = merge_forward_triton(*forward, variant=variant[0])
    want = _merge_reference(*forward)
    for x, w in zip(got, want):
        assert x.is_contiguous() and x.dtype == w.dtype
        torch.testing.assert_close(x, w)
    q, ks, vs, out_c, lse_c, rounds, scale = forward
    for g_lse in (None, dlse):
        args = (dout, g_lse, q, ks, vs, out_c, lse_c, *want, rounds, scale)
        got = merge_backward_triton(*args, variant=variant[1])
        for name, x, w in zip(("dq", "dks", "dvs", "d_out_c", "d_lse_c"), got, _merge_backward_reference(*args)):
            assert x.is_contiguous() and x.dtype == w.dtype, name
            torch.testing.assert_close(x, w, msg=name)


@pytest.mark.gpu
def test_opcheck_cuda():
    forward, (dout, dlse) = _merge_args(*CASES[0], device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(_suffix_merge, forward)
    out, lse = _suffix_merge(*forward)
    q, ks, vs, out_c, lse_c, rounds, scale = forward
    torch.library.opcheck(_suffix_merge_backward, (dout, dlse, q, ks, vs, out_c, lse_c, out, lse, rounds, scale))
