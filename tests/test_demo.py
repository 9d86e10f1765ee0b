"""The demo runs end to end at a small size: one graph, and it agrees with the reference."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

DEMO = Path(__file__).resolve().parent.parent / "tools" / "demo.py"


def test_demo_small(capsys):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    torch._dynamo.reset()
    assert demo.main(["--q-len", "200", "--rounds", "3", "--hidden", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "graphs compiled: 1" in out
    worst = float(re.search(r"max \|diff\| vs create_block_mask \+ eager flex_attention: (\S+)", out)[1])
    assert worst < 1e-4
