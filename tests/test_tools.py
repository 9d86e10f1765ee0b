"""The guard/recompile report (compiled-mask-guards) and the mask picture (compiled-mask-show)."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from expect import TestCase
from test_readme import samples

from compiled_mask.cli import guards, show
from compiled_mask.inspect import guard_group, parse_graph_break_log, parse_guard_tree

pytestmark = pytest.mark.usefixtures("fresh_compile_state")


ROOT = Path(__file__).resolve().parent.parent


def readme_guards_sample(model: str) -> tuple[list[str], list[str]]:
    """The README's ``$ compiled-mask-guards`` sample whose ``--model`` is ``model``."""
    found = [(argv, out) for argv, out in samples((ROOT / "README.md").read_text(), "compiled-mask-guards")
             if dict(zip(argv, argv[1:])).get("--model", guards.DEFAULT_MODEL) == model]
    assert len(found) == 1, f"expected one README sample with --model {model}, found {len(found)}"
    return found[0]


def is_subsequence(shown: list[str], printed: list[str]) -> bool:
    """Every shown line is printed, in order. The count of identity/type guards is left out: it
    depends on what the process compiled before (164 or 165 here, in one torch version)."""
    def norm(line):
        return re.sub(r"identity/type \d+", "identity/type N", line)

    rest = iter(map(norm, printed))
    return all(any(norm(line) == p for p in rest) for line in shown)


class TestGuardReport(TestCase):
    def test_demo_model_one_graph_per_q_len(self):
        report = guards.run(guards.DEFAULT_MODEL, [64, 128], 8, torch.device("cpu"))
        self.assertTrue(report.ok)
        # The README's sample is this run, with some lines cut.
        argv, shown = readme_guards_sample(guards.DEFAULT_MODEL)
        self.assertEqual(argv, ["--q-len", "64", "128", "--max-rounds", "8"])
        printed = guards.format_report(report).splitlines()
        self.assertTrue(is_subsequence(shown, printed), "README.md's sample is not what the tool prints:\n"
                        + "\n".join(printed))
        self.assertExpectedInline(guards.format_report(report, guards=False), """\
model: compiled_mask.examples:demo_model  device: cpu  Q_LEN: 64 128  rounds: 1..8  forward
graphs compiled: 2 (2 Q_LEN value(s) x 8 steps)
recompiles:
  Q_LEN=128 rounds=1: 0/0: tensor 'x' size mismatch at index 1. expected 64, actual 128
graph breaks: none
verdict: OK
  Q_LEN=64: 1 graph for 8 steps: OK
  Q_LEN=128: 1 graph for 8 steps: OK""")
        # The guards of the first graph: the inputs' shapes, and the model's ints as constants.
        first = report.guards[0]
        self.assertExpectedInline("\n".join(first["tensor match"][:4] + first["constant"]), """\
TENSOR_MATCH: L['x'] float32 size=[1, 64, 64] stride=[4096, 64, 1]
TENSOR_MATCH: L['k_buf'] float32 size=[1, 2, 512, 16] stride=[16384, 8192, 16, 1]
TENSOR_MATCH: L['v_buf'] float32 size=[1, 2, 512, 16] stride=[16384, 8192, 16, 1]
TENSOR_MATCH: L['rounds'] int64 size=[] stride=[]
EQUALS_MATCH: L['self'].heads == 4
EQUALS_MATCH: L['self'].q_len == 64
EQUALS_MATCH: L['self']._modules['attn'].q_len == 64
EQUALS_MATCH: L['self']._modules['attn'].kv_len == 512
EQUALS_MATCH: L['self']._modules['attn'].backend == 'flex'
EQUALS_MATCH: L['self']._modules['attn'].block_size == (128, 128)
EQUALS_MATCH: L['self']._modules['attn'].max_rounds == 8
EQUALS_MATCH: L['self'].head_dim == 16
EQUALS_MATCH: L['self'].kv_heads == 2""")

    def test_int_lengths_recompile_and_fail_the_expectation(self):
        report = guards.run("bad_models:int_lengths", [64], 3, torch.device("cpu"))
        self.assertFalse(report.ok)
        self.assertGreater(report.graphs, 1)
        self.assertEqual(report.recompiles[0].rounds, 2)
        self.assertIn("kv_len == 64", report.recompiles[0].reason)
        self.assertIn("Q_LEN=64: 3 graphs for 3 steps: recompile at rounds=2", report.verdicts()[0])
        torch._dynamo.reset()
        self.assertEqual(guards.main(["--model", "bad_models:int_lengths", "--q-len", "64",
                                      "--max-rounds", "2", "--expect-graphs", "1"]), 1)

    def test_item_graph_break_is_reported_with_its_line(self):
        # As the README runs it: from the repository root, the model given as a file.
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)
            report = guards.run("tests/bad_models.py:item_rounds", [64], 3, torch.device("cpu"))
        self.assertFalse(report.ok)
        (brk,) = report.graph_breaks
        self.assertRegex(brk.where, r"^tests/bad_models\.py:\d+ `kv_len = q.size\(2\) \* int\(rounds.item\(\)\)`$")
        self.assertIn("Tensor.item()", brk.reason)
        argv, shown = readme_guards_sample("tests/bad_models.py:item_rounds")
        self.assertEqual(argv, ["--model", "tests/bad_models.py:item_rounds", "--q-len", "64", "--max-rounds", "3",
                                "--no-guards", "--expect-graphs", "1"])
        self.assertEqual(shown, guards.format_report(report, guards=False).splitlines())

    def test_json_and_exit_code(self):
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = guards.main(["--q-len", "64", "--max-rounds", "3", "--json", "--expect-graphs", "1"])
        data = json.loads(out.getvalue())
        self.assertEqual((code, data["ok"], data["graphs"]), (0, True, 1))
        self.assertEqual(data["verdicts"], ["Q_LEN=64: 1 graph for 3 steps: OK"])


GUARD_TREE = """\
TREE_GUARD_MANAGER:
+- RootGuardManager
| +- GLOBAL_STATE: ___check_global_state() against {"grad_mode":false}
| +- GuardManager: source=L['q'], accessed_by=FrameLocalsGuardAccessor(key='q', framelocals_idx=1)
| | +- TENSOR_MATCH: check_tensor(L['q'], Tensor, DispatchKeySet(CPU, BackendSelect), torch.float32, device=None, requires_grad=False, size=[1, 2, 64, 8], stride=[1024, 512, 8, 1])  # if t.dim() != 4:  # modules.py:180
| | +- NO_TENSOR_ALIASING
| +- LAMBDA_GUARD: 2 <= L['q'].size()[2]  # bm = ...  # demo.py:7
| +- EQUALS_MATCH: L['self'].q_len == 64
| +- ID_MATCH: ___check_obj_id(L['self'], 140234567890123), type=<class 'X'>
"""


def test_parse_guard_tree():
    parsed = parse_guard_tree(GUARD_TREE)
    assert parsed == [
        ("GLOBAL_STATE", '___check_global_state() against {"grad_mode":false}'),
        ("TENSOR_MATCH", "L['q'] float32 size=[1, 2, 64, 8] stride=[1024, 512, 8, 1]"),
        ("NO_TENSOR_ALIASING", ""),
        ("LAMBDA_GUARD", "2 <= L['q'].size()[2]"),
        ("EQUALS_MATCH", "L['self'].q_len == 64"),
        ("ID_MATCH", "___check_obj_id(L['self'], <id>), type=<class 'X'>"),
    ]
    assert [guard_group(*g) for g in parsed] == [
        "global/config", "tensor match", "identity/type", "shape/stride", "constant", "identity/type"]


def test_parse_graph_break_log():
    record = (
        "Graph break in user code at /x/model.py:37\n"
        "Graph Break Reason: Encountered graph break when attempting to trace CALL: a call:\n\n"
        "Unsupported Tensor.item() call with capture_scalar_outputs=False\n"
        "  Explanation: ...\n"
    )
    assert parse_graph_break_log(record) == (
        "/x/model.py", 37, "Unsupported Tensor.item() call with capture_scalar_outputs=False")
    suppressed = ("Graph break (user stack suppressed due to duplicate graph break) in user code at "
                  "/x/model.py:9\nGraph Break Reason: Tensor.tolist")
    assert parse_graph_break_log(suppressed) == ("/x/model.py", 9, "Tensor.tolist")
    assert parse_graph_break_log("something else") is None


class TestShowMask(TestCase):
    def test_text_map(self):
        bm = show.build(300, 1000, (128, 64), None)
        self.assertExpectedInline(show.text_map(bm, 300, 1000), """\
round 1   2    3    4 
    0 ++..+++..+++..++
  128 ##++..+++..+++..
  256 +++++...++...++.
# FULL 2   + PARTIAL 27   . empty 19   (3 x 16 blocks of 128x64; rows start at the query shown)""")

    def test_live_rounds_and_dense(self):
        bm = show.build(6, 18, (2, 2), 2)
        self.assertExpectedInline(show.text_map(bm, 6, 18) + "\n" + show.dense_map(bm, 6, 18), """\
round 1  2  3  
    0 +..+.....
    2 #+..+....
    4 ##+..+...
# FULL 3   + PARTIAL 6   . empty 18   (3 x 9 blocks of 2x2; rows start at the query shown)
#.....|#.....|......
##....|.#....|......
###...|..#...|......
####..|...#..|......
#####.|....#.|......
######|.....#|......""")

    def test_dense_refuses_big_grids(self):
        bm = show.build(1000, 4000, (128, 128), None)
        with self.assertRaisesRegex(ValueError, r"Q_LEN \* KV_LEN = 4000000 is over"):
            show.dense_map(bm, 1000, 4000)

    def test_png(self):
        pytest.importorskip("matplotlib")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mask.png"
            self.assertEqual(show.main(["--q-len", "300", "--rounds", "4", "--png", str(path)]), 0)
            data = path.read_bytes()
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        self.assertEqual((width, height), (800, 400))


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_module:factory"], "--model 'no_such_module:factory': no module 'no_such_module' from "),
    (["--model", "factory"], "--model must look like 'package.module:callable' or 'path/to/file.py:callable'"),
    (["--model", "no/such/file.py:factory"], "--model 'no/such/file.py:factory': there is no file"),
    (["--model", "compiled_mask.examples:nothing"], "--model 'compiled_mask.examples:nothing': compiled_mask.examples ("),
    (["--q-len", "0"], "lengths and rounds must be >= 1, got --q-len 0."),
    (["--device", "cpu", "--backward"], "--backward needs a CUDA device"),
    (["--device", "nonsense"], "--device 'nonsense': "),
])
def test_guards_usage_errors_are_one_line(capsys, argv, message):
    assert guards.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"compiled-mask-guards: error: {message}"), err
    assert err.count("\n") == 1, err  # one line, no traceback


@pytest.mark.parametrize("argv, message", [
    (["--q-len", "300", "--kv-len", "100"], "eagle3_block_mask: KV_LEN must be >= Q_LEN"),
    (["--q-len", "300", "--rounds", "2", "--block-size", "1", "2", "3"], "--block-size takes one or two ints"),
    (["--q-len", "300", "--kv-len", "1000", "--live", "2"], "--live needs whole rounds"),
    (["--q-len", "3000", "--rounds", "3", "--dense"], "--dense prints one char per (q, kv) pair"),
])
def test_show_usage_errors_are_one_line(capsys, argv, message):
    assert show.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"compiled-mask-show: error: {message}"), captured.err
    assert captured.err.count("\n") == 1 and not captured.out, captured


def test_model_from_a_file(tmp_path, monkeypatch):
    """--model path/to/file.py:callable loads the file, whose folder comes first on sys.path (as
    `python path/to/file.py`), so it may import its neighbours."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "neighbour.py").write_text("ANSWER = 42\n")
    (tmp_path / "models" / "my_models.py").write_text(
        "from neighbour import ANSWER\n\ndef factory(q_len, max_rounds, device):\n    return ANSWER\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    monkeypatch.delitem(sys.modules, "neighbour", raising=False)
    factory = guards.load_factory("models/my_models.py:factory")
    assert factory(1, 1, None) == 42
    assert guards.load_factory("models/my_models.py:factory") is factory  # loaded once
    with pytest.raises(ValueError, match=r"my_models \(.*my_models\.py\) has no 'other'"):
        guards.load_factory("models/my_models.py:other")


# ----------------------------------------------------------------------------- tools/memory_peak.py

def _memory_peak():
    from helpers import load_tool

    return load_tool("memory_peak")


def test_memory_peak_replays_the_allocator_trace(tmp_path):
    """The peak of a trace and the blocks alive then, grouped by the line that allocated them
    (the first frame outside torch; Inductor's generated code counts as outside)."""
    tool = _memory_peak()
    code = tmp_path / "generated.py"
    code.write_text("buf1 = empty_strided_cuda((8, 8))\nbuf2 = empty_strided_cuda((4, 4))\n")
    torch_frame = {"filename": "/site-packages/torch/nn/functional.py", "line": 1}
    first = [torch_frame, {"filename": str(code), "line": 1}]
    second = [{"filename": str(code), "line": 2}]
    events = [
        dict(action="alloc", addr=1, size=100, frames=first),
        dict(action="alloc", addr=2, size=50, frames=second),
        dict(action="free_requested", addr=2, size=50),  # not yet free: only free_completed counts
        dict(action="free_completed", addr=2, size=50),
        dict(action="alloc", addr=3, size=30, frames=second),
        dict(action="alloc", addr=4, size=30, frames=second),  # the peak: 100 + 30 + 30
        dict(action="free_completed", addr=1, size=100),
        dict(action="free_completed", addr=99, size=7),  # allocated before the trace: ignored
    ]
    events = [e for e in events if e["action"] in ("alloc", "free_completed")]
    peak, at_peak = tool.peak_blocks(events)
    assert peak == 160 and sorted(at_peak) == [(30, 3), (30, 4), (100, 0)]
    assert tool.top_lines(events, at_peak, top=5) == [
        (100, 1, "generated.py:1 buf1 = empty_strided_cuda((8, 8))"),
        (60, 2, "generated.py:2 buf2 = empty_strided_cuda((4, 4))"),
    ]
    assert tool.top_lines(events, at_peak, top=1) == [(100, 1, "generated.py:1 buf1 = empty_strided_cuda((8, 8))")]


def test_memory_peak_recompute_holds_less_than_save(capsys):
    """On CPU (profiler memory events), eager: the step with each TTT step's layer recomputed
    peaks well below the one that saves everything."""
    rows = _memory_peak().main(["--device", "cpu", "--size", "tiny", "--q-len", "512", "--compiler", "none",
                                "--memory", "save", "recompute"])
    save, recompute = (row["peak_bytes"] / row["unit_bytes"] for row in rows)
    assert save > 2 * recompute > 0, (save, recompute)
    out = capsys.readouterr().out
    assert "memory=save (save), Q_LEN 512 x 7 TTT steps, none, cpu" in out
    assert "memory=recompute (recompute)" in out
    # --chunk-rows reaches the loss: 16-row chunks instead of all 512 rows in one (V = 1000)
    (small_chunks,) = _memory_peak().main(["--device", "cpu", "--size", "tiny", "--q-len", "512", "--compiler", "none",
                                           "--memory", "save", "--chunk-rows", "16"])
    assert small_chunks["peak_bytes"] / small_chunks["unit_bytes"] < save - 10, (small_chunks, save)


def test_memory_peak_usage_errors(capsys):
    for flag, bad, message in (("--q-len", "0", "must be an int >= 1, got 0"),
                               ("--ttt-steps", "x", "must be an int >= 1, got 'x'"),
                               ("--chunk-rows", "0", "must be an int >= 1, got 0"),
                               ("--top", "-1", "must be an int >= 0, got -1")):
        with pytest.raises(SystemExit):
            # tiny and short, so that a flag the parser let through fails fast instead of measuring
            _memory_peak().main(["--device", "cpu", "--size", "tiny", "--q-len", "8", flag, bad])
        assert f"argument {flag}: {message}" in capsys.readouterr().err
