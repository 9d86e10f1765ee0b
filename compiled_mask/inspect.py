"""See what torch.compile did: graphs compiled and why it recompiled, as short normalised text.

Meant for users' tests and CI as much as ours: pin the summary with expecttest's
``assertExpectedInline`` and a recompile shows up as a readable diff.

    counter = GraphCounter()
    model = torch.compile(model, backend=counter, fullgraph=True)
    with watch_recompiles() as reasons:
        for r in range(1, 9):
            model(q, k, v, torch.tensor(r))
    print(compile_summary(counter, reasons))   # "graphs: 1\\nrecompiles: none"
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo

__all__ = [
    "GraphCounter",
    "watch_recompiles",
    "watch_graph_breaks",
    "parse_graph_break_log",
    "normalize_guard",
    "compile_summary",
    "compiled_guards",
    "parse_guard_tree",
    "guard_group",
]


class GraphCounter:
    """A ``torch.compile`` backend that counts the graphs dynamo gives it, then compiles them.

    Unlike dynamo's global ``counters``, it counts only the function compiled with it (eager
    flex_attention compiles frames of its own, which would otherwise be counted too).

    Args:
        backend: the backend that does the work, by name or as a callable (default "inductor").
    """

    def __init__(self, backend: str | Callable[..., Any] = "inductor") -> None:
        self.backend = backend
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


@contextlib.contextmanager
def watch_recompiles() -> Iterator[list[str]]:
    """Collect the guard failures that made dynamo recompile while the block runs.

    Yields:
        A list that fills with one normalised reason per recompile (see :func:`normalize_guard`).
    """
    failures = torch._dynamo.utils.guard_failures
    before = {code: len(reasons) for code, reasons in failures.items()}
    reasons: list[str] = []
    try:
        yield reasons
    finally:
        for code, found in list(failures.items()):
            reasons.extend(normalize_guard(r) for r in found[before.get(code, 0) :])


_GRAPH_BREAK = re.compile(r"in user code at (?P<file>[^\n]+?):(?P<line>\d+)\n.*?Graph Break Reason: (?P<reason>.*)", re.S)


def parse_graph_break_log(text: str) -> tuple[str, int, str] | None:
    """``(file, line, reason)`` from one record of dynamo's ``graph_breaks`` log, else None.

    torch 2.13 writes "Graph break in user code at FILE:LINE", then "Graph Break Reason: ...",
    whose first line may be the generic "Encountered graph break when attempting to trace ...":
    the reason kept is the first line after it that says what was unsupported.
    """
    match = _GRAPH_BREAK.search(text)
    if match is None:
        return None
    lines = [line.strip() for line in match["reason"].splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith("Encountered graph break")]
    reason = (specific or lines or [""])[0]
    return match["file"], int(match["line"]), normalize_guard(reason)


@contextlib.contextmanager
def watch_graph_breaks() -> Iterator[list[str]]:
    """Collect dynamo's graph breaks while the block runs, as ``"FILE:LINE `source`: reason"``.

    Listens on dynamo's ``graph_breaks`` artifact logger alone, and puts its level, handlers and
    propagation back afterwards (no global torch logging settings are touched).
    """
    logger = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks")
    breaks: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            parsed = parse_graph_break_log(record.getMessage())
            if parsed is not None:
                file, line, reason = parsed
                source = linecache.getline(file, line).strip()
                breaks.append(f"{file}:{line} `{source}`: {reason}")

    handler = _Collect(logging.DEBUG)
    saved = logger.level, logger.propagate, logger.disabled
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.disabled = False
    logger.addHandler(handler)
    try:
        yield breaks
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate, logger.disabled = saved


_COMMENT = re.compile(r"\s+#.*$")
_ID = re.compile(r"\b\d{11,}\b|0x[0-9a-fA-F]+")


def normalize_guard(text: str) -> str:
    """One guard or guard-failure line, stable across runs and torch versions.

    Keeps the first line, drops the trailing ``# source`` comment dynamo appends, replaces object
    ids and addresses by ``<id>``, and collapses whitespace.
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = _COMMENT.sub("", line)
    line = _ID.sub("<id>", line)
    return " ".join(line.split())


def compile_summary(counter: GraphCounter, reasons: list[str]) -> str:
    """``graphs: N`` and the recompile reasons, one per line (``recompiles: none`` if none)."""
    lines = [f"graphs: {counter.graphs}"]
    lines += [f"recompile: {r}" for r in reasons] or ["recompiles: none"]
    return "\n".join(lines)


def compiled_guards(fn_or_module: Any) -> list[str]:
    """The guard tree text of every compiled entry of a function or module's ``forward``, in the
    order they were compiled.

    Pass the original (uncompiled) function or module; dynamo keeps its entries on the code object.
    """
    target = fn_or_module
    if isinstance(target, torch.nn.Module):
        target = type(target).forward
    code = getattr(target, "__code__", None)
    if code is None:
        raise ValueError(f"compiled_guards: expected a function or nn.Module, got {fn_or_module!r}.")
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(code)
    return [str(entry.guard_manager) for entry in reversed(entries)]  # oldest first


_GUARD_LINE = re.compile(r"^[\s|]*\+- ([A-Z][A-Z0-9_]*)(?::\s*(.*))?$")
_TENSOR_MATCH = re.compile(
    r"check_tensor\((?P<source>.+?), \w+, DispatchKeySet\(.*?\), torch\.(?P<dtype>\w+), "
    r"device=\w+, requires_grad=(?P<grad>\w+), size=(?P<size>\[.*?\]), stride=(?P<stride>\[.*?\])\)"
)


def parse_guard_tree(text: str) -> list[tuple[str, str]]:
    """``(kind, expression)`` for every guard in a guard tree (``str(entry.guard_manager)``).

    Structural lines (``RootGuardManager``, ``GuardManager: source=...``) are skipped; expressions
    are normalised by :func:`normalize_guard` (comment, ids and addresses stripped), and a
    TENSOR_MATCH is shortened to ``source dtype size=[..] stride=[..]`` (plus ``requires_grad``).
    This is the only place that parses dynamo's guard text (torch 2.13's format).
    """
    guards = []
    for line in text.splitlines():
        match = _GUARD_LINE.match(line)
        if not match or match[1].endswith("GUARD_MANAGER"):
            continue
        expr = normalize_guard(match[2] or "")
        tensor = _TENSOR_MATCH.search(expr) if match[1] == "TENSOR_MATCH" else None
        if tensor:
            grad = " requires_grad" if tensor["grad"] == "True" else ""
            expr = f"{tensor['source']} {tensor['dtype']} size={tensor['size']} stride={tensor['stride']}{grad}"
        guards.append((match[1], expr))
    return guards


_GLOBAL_KINDS = {"GLOBAL_STATE", "TORCH_FUNCTION_MODE_STACK", "DEFAULT_DEVICE", "GRAD_MODE",
                 "DETERMINISTIC_ALGORITHMS", "TORCH_FUNCTION_STATE", "CONFIG_HASH_MATCH"}


def guard_group(kind: str, expr: str) -> str:
    """The report group of one guard: "shape/stride" (symbolic size relations), "tensor match"
    (an input's dtype/shape/stride), "constant" (a local value, e.g. a module's int attribute),
    "global/config" (grad mode, default device, module globals), or "identity/type"."""
    if kind == "TENSOR_MATCH":
        return "tensor match"
    if kind in _GLOBAL_KINDS or ("L[" not in expr and "size()" not in expr
                                 and "stride()" not in expr and kind in ("LAMBDA_GUARD", "EQUALS_MATCH")):
        return "global/config"
    if kind == "LAMBDA_GUARD" or "size()" in expr or "stride()" in expr:
        return "shape/stride"
    if kind in ("EQUALS_MATCH", "CONSTANT_MATCH"):
        return "constant"
    return "identity/type"
