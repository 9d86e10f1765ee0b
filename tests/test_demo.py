"""The demo runs end to end at a small size: one graph, and it agrees with the reference."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import load_tool


@pytest.fixture(scope="module")
def demo():
    return load_tool("demo")


def test_demo_small(demo, capsys):
    torch._dynamo.reset()
    assert demo.main(["--q-len", "200", "--rounds", "3", "--hidden", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "graphs compiled: 1" in out
    worst = float(re.search(r"max \|diff\| vs create_block_mask \+ eager flex_attention: (\S+)", out)[1])
    assert worst < 1e-4
    # The compile is announced before the first step runs, once.
    lines = out.splitlines()
    hint = [i for i, line in enumerate(lines) if line.startswith("compiling the step (first step only")]
    first_row = next(i for i, line in enumerate(lines) if re.match(r"\s+1\s+\d+\s+\d+\s", line))
    assert len(hint) == 1 and hint[0] == first_row - 1, out


@pytest.mark.parametrize("argv, message", [
    (["--backend", "nope"], "Eagle3Attention: unknown backend='nope'"),
    (["--q-len", "0"], "Eagle3Attention: q_len must be >= 1"),
    (["--device", "nonsense"], "--device 'nonsense': "),
])
def test_demo_usage_errors_are_one_line(demo, capsys, argv, message):
    assert demo.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"demo.py: error: {message}") and captured.err.count("\n") == 1, captured
    assert not captured.out
