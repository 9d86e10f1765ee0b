"""tools/bench.py --smoke runs end to end at tiny sizes, so the benchmark never rots."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_tool


def _load_bench():
    return load_tool("bench")


def test_bench_smoke(tmp_path):
    bench = _load_bench()
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    tables = {r["table"] for r in rows}
    assert tables == {"mask_build", "attention", "padding", "documents", "compile", "suffix"}
    assert all("skipped" not in r for r in rows), [r for r in rows if "skipped" in r]
    compile_rows = [r for r in rows if r["table"] == "compile"]
    assert [r["method"] for r in compile_rows] == ["Eagle3Attention('flex')", "Eagle3Attention('split')"]
    assert all(r["graphs"] == 1 for r in compile_rows)
    assert (tmp_path / "bench.md").read_text().count("| compiled_mask op, eager |") == 4

    # Attention: per (pass, grad mode, rounds) both floors, the faster at 1x; fwd+bwd in both
    # gradient modes (on CPU the floors only: flex has no CPU backward).
    attention = [r for r in rows if r["table"] == "attention"]
    groups = {(r["pass_"], r["grad"], r["rounds"]) for r in attention}
    assert groups == {(p, g, n) for p, g in (("fwd", ""), ("fwd+bwd", "autograd"), ("fwd+bwd", "backward"))
                      for n in (1, 2)}
    for group in groups:
        mine = [r for r in attention if (r["pass_"], r["grad"], r["rounds"]) == group]
        floors = [r for r in mine if r["method"].startswith("floor:")]
        assert [f["method"].split(",")[1].split()[0] for f in floors] == ["GQA", "MHA"], group
        assert min(f["x_floor"] for f in floors) == 1.0, group
        assert all(r["TFLOP/s"] > 0 for r in mine), group
    documents = [r["method"] for r in rows if r["table"] == "documents"]
    assert documents == [f"Eagle3Attention({b!r}), {layout}" for b in ("flex", "split")
                         for layout in ("one document per row", "doc_ids")]
    suffix = [r for r in rows if r["table"] == "suffix"]
    assert [(r["op"], r["rounds"]) for r in suffix] == [(op, n) for n in (1, 2) for op in ("forward", "backward")]


def test_bench_flop_and_byte_counts():
    """The formulas behind the TFLOP/s and GB/s columns, at the issue's size."""
    bench = _load_bench()
    # One step at Q_LEN 8192 x 7 rounds, 32 heads, d128: 4 D FLOPs per allowed pair forward, 14 D fwd+bwd.
    causal, suffix = 8192 * 8193 // 2, 8192 * 6
    assert bench.attention.attention_tflop(1, 32, 8192, 7, 128, 128, True) * 1e12 == 32 * (causal + suffix) * 14 * 128
    floor_tflop = bench.attention.attention_tflop(1, 32, 8192, 7, 128, 128, False, suffix=False)
    assert floor_tflop * 1e12 == 32 * causal * 4 * 128
    # Suffix op, bf16: forward reads q and 6 rounds of K/V, writes out_s and lse_s (fp32);
    # backward reads dO_s, out_s (fp32), lse_s, q and 6 rounds, writes dq and 6 rounds.
    q_tensor, kv_round, lse = 8192 * 32 * 128 * 2, 8192 * 8 * 256 * 2, 8192 * 32 * 4
    fwd, bwd = bench.suffix.suffix_bytes(1, 32, 8, 8192, 7, 7, 128, 128)
    assert fwd == q_tensor + 6 * kv_round + 2 * q_tensor + lse
    assert bwd == 4 * q_tensor + lse + 2 * q_tensor + 6 * kv_round + 6 * kv_round
    assert (round(fwd / 1e9, 2), round(bwd / 1e9, 2)) == (0.40, 0.81)
    assert bench.suffix.suffix_bytes(1, 32, 8, 8192, 7, 9, 128, 128) == (fwd, bwd)  # live clamped to max_rounds


def test_kernel_table_of_a_step():
    """--profile's per-row table (the draft table's breakdown): the ops one call of the step ran."""
    bench = _load_bench()
    x = torch.randn(8, 8)
    table = bench.common._kernel_table(lambda: (x @ x).relu(), torch.device("cpu"), steps=2)
    assert "aten::mm" in table and "aten::relu" in table, table


def test_draft_reps_below_one_is_refused(capsys):
    """--draft-reps 0 (or not an int) stops at the parser, naming the value, before any row runs."""
    bench = _load_bench()
    for bad, shown in (("0", "0"), ("-2", "-2"), ("two", "'two'")):
        with pytest.raises(SystemExit):
            bench.main(["--only", "draft", "--draft-reps", bad])
        assert f"argument --draft-reps: must be an int >= 1, got {shown}" in capsys.readouterr().err
