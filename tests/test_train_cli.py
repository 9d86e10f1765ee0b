"""tools/train.py's refusals (one line, before anything is loaded or compiled), its --help, and
tools/bench_train.py's table (CPU, a tiny random target)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest
from helpers import load_tool


def _run(tool, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = load_tool(tool).main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-1"], "argument --steps: must be an int >= 1, got -1"),
    (["--steps", "0"], "argument --steps: must be an int >= 1, got 0"),
    (["--batches", "0"], "argument --batches: must be an int >= 1, got 0"),
    (["--batch", "0"], "argument --batch: must be an int >= 1, got 0"),
    (["--q-len", "x"], "argument --q-len: must be an int >= 1, got 'x'"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--dtype", "float16"], "--dtype float16 is not supported: AdamW's eps (1e-8) is 0 in float16, so the "
                             "first step turns the weights into NaN; use --dtype bfloat16 (GPUs) or float32"),
    (["--backend", "flex"], "--backend flex cannot train on CPU (torch's flex_attention has no CPU backward); "
                            "use --backend split (the default) on CPU, or --device cuda"),
    (["--backend", "fa4"], "--backend fa4 cannot train on CPU (torch's flex_attention has no CPU backward; FA4 "
                           "needs an NVIDIA GPU); use --backend split (the default) on CPU, or --device cuda"),
    (["--draft-vocab", "600"], "--draft-vocab 600 exceeds --vocab 512; the draft vocabulary is a subset of the "
                               "target's"),
    (["--heads", "5"], "Eagle3DraftConfig: hidden_size=96 is not a multiple of num_attention_heads=5; set "
                       "head_dim explicitly."),
    (["--data", "x.jsonl"], "--data needs --target-model (real data)"),
    (["--resume"], "--resume needs --target-model (real data)"),
    (["--target-model", "m"], "--target-model needs --data"),
    (["--target-model", "m", "--data", "d.jsonl"], "--target-model needs --output-dir"),
    (["--target-model", "m", "--data", "d", "--output-dir", "o", "--hidden", "64"],
     "--hidden is for the synthetic target; with --target-model the draft takes the target's sizes (see "
     "--draft-* options)"),
    (["--target-model", "m", "--data", "d", "--output-dir", "o", "--context-parallel", "ulysses"],
     "--context-parallel is for the synthetic target; with --target-model the draft takes the target's sizes "
     "(see --draft-* options)"),
    (["--target-model", "m", "--data", "d", "--output-dir", "o", "--aux-layers", "1,2"],
     "argument --aux-layers: must be three layer indices >= 0, e.g. 1,15,28; got '1,2'"),
    (["--context-parallel", "allgather", "--backend", "flex", "--device", "cpu"], "--backend flex cannot train on CPU"),
])
def test_refusals(argv, message):
    code, out, err = _run("train", argv)
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: {message}"), last


def test_help_is_whole_and_says_the_defaults():
    code, out, _ = _run("train", ["--help"])
    assert code == 0
    text = " ".join(out.split())
    assert "Train an Eagle3 draft model: on your target model and chat data, or on a synthetic target." in text
    assert "the last line names OUT/draft and the final tau (docs/training.md)." in text
    assert "(default: synthetic 3, real data 7 as Eagle3)" in text  # --ttt-steps
    assert "Throughput of the whole loop with a random-weight Llama-3-8B target: tools/bench_train.py." in text
    # every option says what it does
    options = re.findall(r"^  (--[a-z-]+)(.*)$", out, re.M)
    assert len(options) > 40
    parser = load_tool("train").build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and a.option_strings[0] != "-h" and not a.help]
    assert undocumented == []


def test_bench_help_examples_run():
    """The CPU check in bench_train.py --help runs as written (the tiny target's vocabulary is
    smaller than the default draft vocabulary of 32000)."""
    _, help_text, _ = _run("bench_train", ["--help"])
    line = next(x for x in help_text.splitlines() if "--target llama-tiny" in x)
    argv = shlex.split(line.split("#")[0])[2:]  # after "python tools/bench_train.py"
    assert argv[:2] == ["--target", "llama-tiny"], line
    code, out, err = _run("bench_train", [*argv, "--steps", "1", "--warmup-steps", "1"])
    assert code == 0, err[-2000:]
    assert "draft vocab 512" in out and re.search(r"^whole loop: [\d,]+ tokens/s on CPU$", out, re.M)


def test_bench_prints_the_split_table():
    code, out, err = _run("bench_train", ["--target", "llama-tiny", "--device", "cpu", "--q-len", "32",
                                          "--ttt-steps", "2", "--draft-vocab", "64", "--steps", "2",
                                          "--warmup-steps", "1", "--compiler", "none", "--docs-per-row", "2"])
    assert code == 0, err[-2000:]
    for phase in ("target forward (hidden states, TargetHead)", "draft TTT step, forward + backward (one graph)",
                  "clip + AdamW", "whole loop"):
        assert re.search(rf"^\| {re.escape(phase)} +\| +\d+\.\d \| +\d+\.\d% \| +[\d,]+ \|$", out, re.M), (phase, out)
    assert re.search(r"^whole loop: [\d,]+ tokens/s on CPU$", out, re.M)


@pytest.mark.parametrize("argv, message", [
    (["--q-len", "0"], "argument --q-len: must be an int >= 1, got 0"),
    (["--steps", "x"], "argument --steps: must be an int >= 1, got 'x'"),
])
def test_bench_usage_errors(argv, message):
    """bench_train.py's int flags are tools/train.py's type: the flag and its value named."""
    code, _, err = _run("bench_train", argv)
    assert code == 2 and message in err, err
