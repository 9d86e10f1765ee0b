"""tools/bench.py --smoke runs end to end at tiny sizes, so the benchmark never rots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"


def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    tables = {r["table"] for r in rows}
    assert tables == {"mask_build", "attention", "padding", "documents", "compile"}
    assert all("skipped" not in r for r in rows), [r for r in rows if "skipped" in r]
    compile_rows = [r for r in rows if r["table"] == "compile"]
    assert [r["method"] for r in compile_rows] == ["Eagle3Attention('flex')", "Eagle3Attention('split')"]
    assert all(r["graphs"] == 1 for r in compile_rows)
    assert (tmp_path / "bench.md").read_text().count("| compiled_mask op, eager |") == 4
