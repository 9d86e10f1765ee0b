"""The README's examples run, and its sample outputs are what the tools print.

Conventions for README.md (whoever writes a section follows them):

- A fenced block with the info string ``python`` runs in CI as written, on a CPU-only machine, on
  its own: each block starts from a fresh namespace (nothing carries over from the block above),
  so it has its imports and makes its inputs. Pick the device in the block
  (``"cuda" if torch.cuda.is_available() else "cpu"``) and keep sizes small enough for a CPU.
- ``python gpu`` marks a block that needs a CUDA device: it runs where there is one (it is marked
  ``gpu``, so ``tools/run_gpu_tests.py`` runs it) and is skipped elsewhere.
- Any other info string (``bash``, ``text``, none) is not run, nor are indented blocks.
- An indented sample that starts with ``$ compiled-mask-show ...`` must be exactly what the tool
  prints for those arguments; ``$ compiled-mask-guards ...`` samples are checked in
  tests/test_tools.py, next to the runs they share.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from compiled_mask.cli import show

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line, info string, code)`` of every fenced block; line is 1-based, of the code's start."""
    return [(text.count("\n", 0, m.start("body")) + 1, m["info"].strip(), m["body"])
            for m in _FENCE.finditer(text)]


def samples(text: str, command: str) -> list[tuple[list[str], list[str]]]:
    """``(argv, output lines)`` of each indented ``$ command ...`` sample: the lines after the
    command up to the first blank or unindented line, without the indent; a ``# ...`` comment
    on the command line is dropped."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(rf"^ {{4}}\$ {re.escape(command)}(?P<args>( .*)?)$", line)
        if match is None:
            continue
        argv = shlex.split(match["args"], comments=True)
        output = []
        for out in lines[i + 1:]:
            if not out.startswith("    ") or not out.strip():
                break
            output.append(out[4:])
        found.append((argv, output))
    return found


BLOCKS = code_blocks(README.read_text())
PYTHON_BLOCKS = [
    pytest.param(code, id=f"README.md:{line}", marks=[pytest.mark.gpu] if "gpu" in info.split()[1:] else [])
    for line, info, code in BLOCKS
    if info.split()[:1] == ["python"]
]


def test_the_readme_has_python_examples():
    """Guards the parser: a change of fence style must not turn every example test off."""
    cpu = [p for p in PYTHON_BLOCKS if not p.marks]
    assert len(cpu) >= 3, [p.id for p in PYTHON_BLOCKS]


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_python_block_runs(code, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "__readme__"})


SHOW_SAMPLES = samples(README.read_text(), "compiled-mask-show")


def test_the_readme_has_show_samples():
    assert SHOW_SAMPLES


@pytest.mark.parametrize("argv, expected", SHOW_SAMPLES, ids=[" ".join(a) for a, _ in SHOW_SAMPLES])
def test_show_sample_is_what_the_tool_prints(argv, expected, capsys):
    assert show.main(argv) == 0
    printed = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert printed == [line.rstrip() for line in expected]  # trailing blanks: editors drop them


def test_samples_parser():
    text = "x\n\n    $ compiled-mask-show --q-len 3  # a comment\n    a\n     b\n\n    c\n"
    assert samples(text, "compiled-mask-show") == [(["--q-len", "3"], ["a", " b"])]
    assert code_blocks("```python gpu\nx = 1\n```\n") == [(2, "python gpu", "x = 1\n")]
