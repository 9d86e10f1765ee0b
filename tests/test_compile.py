"""Compile behaviour: fullgraph, and the number of graphs over a TTT loop, pinned with expecttest.

Each test starts from a reset dynamo and a fresh Inductor cache directory, so an entry compiled
earlier (maybe with other settings) can neither hide a recompile nor add one.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from expect import TestCase
from helpers import dense_reference_attention, eagle3_dense
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from compiled_mask import Eagle3Attention, eagle3_block_mask
from compiled_mask.inspect import GraphCounter, compile_summary, watch_recompiles

D = 8


class TinyDraftLayer(nn.Module):
    """The shape of an Eagle3 draft layer: projections around Eagle3Attention (GQA 4/2)."""

    def __init__(self, q_len: int, max_rounds: int, hidden: int = 32) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, 4 * D)
        self.o_proj = nn.Linear(4 * D, hidden)
        self.attn = Eagle3Attention(q_len, max_rounds)

    def forward(self, x, k, v, rounds):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, 4, D).transpose(1, 2).contiguous()  # [B, 4, S, D]
        out = self.attn(q, k, v, rounds)  # [B, 4, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, 4 * D))


def _inputs(q_len, max_rounds, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, q_len, 32, generator=g)
    k = torch.randn(1, 2, q_len * max_rounds, D, generator=g)
    v = torch.randn(1, 2, q_len * max_rounds, D, generator=g)
    return x, k, v


@pytest.fixture(autouse=True)
def fresh_no_grad(fresh_compile_state):
    # no_grad: flex_attention has no backward on CPU (the fwd+bwd counts are GPU tests).
    with torch.no_grad():
        yield


class TestRecompiles(TestCase):
    def test_ttt_loop_compiles_one_graph(self):
        model = TinyDraftLayer(q_len=100, max_rounds=8)
        counter = GraphCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        x, k, v = _inputs(100, 8)
        eager = [model(x, k, v, r) for r in range(1, 9)]  # eager flex compiles frames of its own
        with watch_recompiles() as reasons:
            outs = [compiled(x, k, v, torch.tensor(1))]
            with torch.compiler.set_stance("fail_on_recompile"):
                outs += [compiled(x, k, v, torch.tensor(r)) for r in range(2, 9)]
        for out, want in zip(outs, eager):
            torch.testing.assert_close(out, want)
        self.assertExpectedInline(compile_summary(counter, reasons), """\
graphs: 1
recompiles: none""")

    def test_one_graph_per_q_len(self):
        counter = GraphCounter()
        with watch_recompiles() as reasons:
            for q_len in (64, 100):
                compiled = torch.compile(TinyDraftLayer(q_len, 4), backend=counter, fullgraph=True)
                x, k, v = _inputs(q_len, 4)
                for r in range(1, 5):
                    compiled(x, k, v, torch.tensor(r))
        self.assertExpectedInline(compile_summary(counter, reasons), """\
graphs: 2
recompile: 0/0: tensor 'k' size mismatch at index 2. expected 256, actual 400""")

    def test_python_int_rounds_rejected_under_compile(self):
        """As a Python int, rounds would be a graph constant: a new graph per TTT step."""
        compiled = torch.compile(TinyDraftLayer(64, 3), fullgraph=True)
        x, k, v = _inputs(64, 3)
        # fullgraph=True surfaces it (dynamo wraps the ValueError in a RuntimeError subclass).
        with self.assertRaisesRegex((ValueError, RuntimeError), r"rounds is a Python int inside torch.compile"):
            compiled(x, k, v, 1)

    def test_dynamic_form_compiles_once(self):
        """eagle3_block_mask with lengths from shapes: one graph as KV grows and Q_LEN changes.

        Needs mark_dynamic on the sequence dim and backed_size_oblivious, scoped to the calls
        that compile (without it, size-1 mask dims at Q_LEN = KV_LEN = one block specialize).
        """

        def attend(q, k, v):
            block_mask = eagle3_block_mask(q.size(2), k.size(2), device=q.device)
            return flex_attention(q, k, v, block_mask=block_mask)

        counter = GraphCounter()
        compiled = torch.compile(attend, backend=counter, fullgraph=True)
        g = torch.Generator().manual_seed(0)
        with watch_recompiles() as reasons, torch.fx.experimental._config.patch(
            backed_size_oblivious=True
        ):
            for q_len in (128, 200, 64, 300):
                for r in (1, 2, 3):
                    q = torch.randn(1, 2, q_len, D, generator=g)
                    k = torch.randn(1, 2, q_len * r + 5 * (r - 1), D, generator=g)
                    v = torch.randn_like(k)
                    for t in (q, k, v):
                        torch._dynamo.mark_dynamic(t, 2)
                    out = compiled(q, k, v)
                    want = dense_reference_attention(q, k, v, eagle3_dense(q_len, k.size(2)))
                    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5)
        self.assertExpectedInline(compile_summary(counter, reasons), """\
graphs: 1
recompiles: none""")
