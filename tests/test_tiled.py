"""``compiled_mask::tiled_mlp``: opcheck, and the chunked math (forward and every gradient, chunks
that do not divide the rows) against the plain SwiGLU MLP's autograd in float64, eager and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from compiled_mask.draft.tiled import _tiled_mlp, _tiled_mlp_backward, tiled_mlp

H, I = 8, 24  # noqa: E741


def _inputs(shape=(2, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return make(*shape, H), make(I, H) / H**0.5, make(I, H) / H**0.5, make(H, I) / I**0.5


def _plain(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _value_and_grads(fn, inputs, dout):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dout))


def test_opcheck():
    x, gate, up, down = _inputs()
    torch.library.opcheck(_tiled_mlp, (x.requires_grad_(), gate, up, down, 3))
    dout = torch.randn_like(x)
    torch.library.opcheck(_tiled_mlp_backward, (dout, x.detach(), gate, up, down, 3))


@pytest.mark.parametrize("chunk_rows", [1, 3, 10, 64])  # 10 rows: chunks of 1, of 3 (+ 1), one, one larger
def test_float64_matches_the_plain_mlp(chunk_rows):
    inputs = _inputs()
    dout = torch.randn(2, 5, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _value_and_grads(lambda *t: tiled_mlp(*t, chunk_rows=chunk_rows), inputs, dout)
    want = _value_and_grads(_plain, inputs, dout)
    for name, g, w in zip(("out", "dx", "d_gate", "d_up", "d_down"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel_err(g, w) < 1e-12, (name, rel_err(g, w))


def test_compiled_equals_eager(fresh_compile_state):
    inputs = _inputs(dtype=torch.float32)
    dout = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(1))
    fn = lambda *t: tiled_mlp(*t, chunk_rows=3)  # noqa: E731
    got = _value_and_grads(torch.compile(fn, fullgraph=True), inputs, dout)
    want = _value_and_grads(fn, inputs, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("chunk_rows", [0, -1, 2.0, True, None])
def test_chunk_rows_refused(chunk_rows):
    with pytest.raises(ValueError, match=rf"tiled_mlp: chunk_rows must be an int >= 1, got chunk_rows={chunk_rows!r}"):
        tiled_mlp(*_inputs(), chunk_rows=chunk_rows)
