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
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo

__all__ = ["GraphCounter", "watch_recompiles", "normalize_guard", "compile_summary"]


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


_COMMENT = re.compile(r"\s+#.*$")
_ID = re.compile(r"\b\d{8,}\b|0x[0-9a-fA-F]+")


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
