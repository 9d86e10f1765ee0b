"""The package's floor plan: the attention library never imports the draft trainer, reads no
environment variable and writes no global torch config at import; the trainer's heavy
dependencies stay optional (issue 24's "one way through")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted(p for p in (ROOT / "compiled_mask").rglob("*.py") if "draft" not in p.relative_to(ROOT).parts)
PACKAGE = sorted((ROOT / "compiled_mask").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_library_never_imports_the_trainer():
    """compiled_mask/*.py (the attention library) imports nothing from compiled_mask.draft; the
    package root re-exports the draft's names lazily (PEP 562), so importing it stays torch-only."""
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith("compiled_mask.draft"))
                 for p in LIBRARY}
    assert not {k: v for k, v in offenders.items() if v}
    code = ("import sys, compiled_mask; assert 'compiled_mask.draft' not in sys.modules; "
            "from compiled_mask import Eagle3Model; assert 'compiled_mask.draft' in sys.modules; "
            "assert not any(m.split('.')[0] in ('transformers', 'safetensors', 'tokenizers') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_environment_variables_and_no_global_config():
    """No module reads the environment or assigns dynamo/Inductor config (choices are arguments)."""
    for path in PACKAGE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} reads os.{node.attr}")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    text = ast.unparse(t)
                    assert not (("_dynamo.config." in text) or ("_inductor.config." in text)), (
                        f"{path.relative_to(ROOT)}:{node.lineno} writes {text}")


TRITON_MODULES = sorted(".".join(f.relative_to(ROOT).with_suffix("").parts)
                        for f in (ROOT / "compiled_mask").rglob("_triton_*.py"))


@pytest.mark.parametrize("module", TRITON_MODULES)
def test_kernels_read_only_constexpr_globals(module):
    """Compiled Triton refuses a jitted function that reads a module global other than a
    ``tl.constexpr``, another jitted function or a module ("Cannot access global variable"); the
    interpreter allows it, so the CPU run of the kernels cannot catch it: read the names here."""
    import importlib
    import types

    import triton  # the test extra installs it (Linux)
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module)
    kernels = {name: f for name, f in vars(mod).items() if isinstance(f, JITFunction)}
    assert kernels
    for name, kernel in kernels.items():
        for used in kernel.fn.__code__.co_names:
            value = vars(mod).get(used)
            assert value is None or isinstance(value, (triton.language.constexpr, JITFunction, types.ModuleType)), (
                f"{module}.{name} reads the global {used} = {value!r}; make it a tl.constexpr")
