"""compiled-mask-guards: what torch.compile did with a TTT loop, and why it compiled more than once.

    compiled-mask-guards                                 # the demo model, Q_LEN 128, rounds 1..8
    compiled-mask-guards --q-len 128 256 --max-rounds 8
    compiled-mask-guards --model mypkg.models:factory --backward --device cuda
    compiled-mask-guards --model tests/bad_models.py:item_rounds --q-len 64   # a file works too
    compiled-mask-guards --expect-graphs 1 --json        # for CI: non-zero exit on extra graphs

``--model module:callable`` (or ``path/to/file.py:callable``) names a factory
``factory(q_len, max_rounds, device)`` that returns ``(model, make_inputs)``, where
``make_inputs(rounds)`` gives the arguments of one TTT step (see
``compiled_mask.examples.demo_model``). The report lists the graphs compiled, every recompile with
its reason, every graph break with its reason and source line, the guards of each compiled graph
grouped by kind, and a verdict: one graph per Q_LEN is OK, anything more is explained.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch._dynamo
import torch.utils._pytree as pytree

from compiled_mask.inspect import (
    GraphCounter,
    compiled_guards,
    guard_group,
    parse_guard_tree,
    watch_graph_breaks,
    watch_recompiles,
)

DEFAULT_MODEL = "compiled_mask.examples:demo_model"
# Groups listed in full; the rest (object identity, types, globals) only counted.
LISTED_GROUPS = ("shape/stride", "tensor match", "constant")


@dataclass
class Recompile:
    q_len: int
    rounds: int
    reason: str


@dataclass
class GraphBreak:
    q_len: int
    reason: str
    where: str


@dataclass
class Report:
    model: str
    device: str
    q_lens: list[int]
    max_rounds: int
    backward: bool
    graphs: int = 0
    graphs_per_q_len: dict[int, int] = field(default_factory=dict)
    recompiles: list[Recompile] = field(default_factory=list)
    graph_breaks: list[GraphBreak] = field(default_factory=list)
    guards: list[dict[str, list[str]]] = field(default_factory=list)  # per compiled graph

    @property
    def ok(self) -> bool:
        return not self.graph_breaks and all(n == 1 for n in self.graphs_per_q_len.values())

    def verdicts(self) -> list[str]:
        lines = []
        for q_len, n in self.graphs_per_q_len.items():
            if n == 1:
                lines.append(f"Q_LEN={q_len}: 1 graph for {self.max_rounds} steps: OK")
                continue
            causes = [f"recompile at rounds={r.rounds}: {r.reason}"
                      for r in self.recompiles if r.q_len == q_len]
            causes += [f"graph break at {b.where}: {b.reason}"
                       for b in self.graph_breaks if b.q_len == q_len]
            lines.append(f"Q_LEN={q_len}: {n} graphs for {self.max_rounds} steps: "
                         + ("; ".join(causes) or "see recompiles above"))
        return lines


def load_factory(spec: str) -> Callable[..., tuple[Any, Callable[[int], tuple]]]:
    """The factory named by ``--model``: ``package.module:callable``, imported with the current
    directory first on ``sys.path`` (as ``python -m``), or ``path/to/file.py:callable``, loaded
    from that file with its folder first on ``sys.path`` (as ``python path/to/file.py``).

    Raises:
        ValueError: the spec is malformed, or names a module, file or attribute that is not there.
    """
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"--model must look like 'package.module:callable' or "
                         f"'path/to/file.py:callable', got {spec!r}.")
    if target.endswith(".py"):
        module = _load_file(spec, Path(target))
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name is None or not (target == e.name or target.startswith(e.name + ".")):
                raise  # the module exists but imports something missing: keep the traceback
            as_file = f"path/to/{target.replace('.', '/')}.py:{name}"
            raise ValueError(f"--model {spec!r}: no module {target!r} from {os.getcwd()}. Run from "
                             f"the folder that holds it, or name the file: --model {as_file}") from None
    if not hasattr(module, name):
        raise ValueError(f"--model {spec!r}: {module.__name__} ({module.__file__}) has no {name!r}.")
    return getattr(module, name)


def _load_file(spec: str, path: Path) -> ModuleType:
    """Load ``path`` as the module named by its stem (reused if that module is this file)."""
    if not path.is_file():
        raise ValueError(f"--model {spec!r}: there is no file {str(path)!r} (from {os.getcwd()}).")
    path = path.resolve()
    loaded = sys.modules.get(path.stem)
    if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[path.stem] = module  # as an import would: dataclasses and pickle look it up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def _loss(out: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise ValueError("--backward: the model's outputs hold no tensor that requires grad.")
    return sum(t.float().sum() for t in leaves)


def run(model_spec: str, q_lens: list[int], max_rounds: int, device: torch.device,
        backward: bool = False, backend: str = "inductor") -> Report:
    """Compile the factory's model and run its TTT loop for every Q_LEN; return the report."""
    if backward and device.type == "cpu":
        raise ValueError("--backward needs a CUDA device: flex_attention has no backward on CPU.")
    factory = load_factory(model_spec)
    report = Report(model_spec, str(device), q_lens, max_rounds, backward)
    counter = GraphCounter(backend)
    grad = torch.enable_grad() if backward else torch.no_grad()
    with grad:
        models = [(q_len, *factory(q_len, max_rounds, device)) for q_len in q_lens]
        torch._dynamo.reset()
        for q_len, model, make_inputs in models:
            compiled = torch.compile(model, backend=counter)
            before = counter.graphs
            for rounds in range(1, max_rounds + 1):
                with watch_recompiles() as reasons, watch_graph_breaks() as breaks:
                    out = compiled(*make_inputs(rounds))
                    if backward:
                        _loss(out).backward()
                if reasons:  # one recompile; the newest entry's failure says why
                    more = f" (and {len(reasons) - 1} older entries failed)" if len(reasons) > 1 else ""
                    report.recompiles.append(Recompile(q_len, rounds, reasons[0] + more))
                for b in breaks:
                    where, _, reason = b.partition("`: ")
                    where = where.removeprefix(os.getcwd() + os.sep)  # files below here: relative
                    report.graph_breaks.append(GraphBreak(q_len, reason, where + "`"))
            report.graphs_per_q_len[q_len] = counter.graphs - before
        report.graphs = counter.graphs
        for text in compiled_guards(models[0][1]):
            groups: dict[str, list[str]] = {}
            for kind, expr in parse_guard_tree(text):
                groups.setdefault(guard_group(kind, expr), []).append(f"{kind}: {expr}")
            report.guards.append(groups)
    return report


def format_report(report: Report, *, guards: bool = True) -> str:
    mode = "forward+backward" if report.backward else "forward"
    lines = [
        f"model: {report.model}  device: {report.device}  "
        f"Q_LEN: {' '.join(map(str, report.q_lens))}  rounds: 1..{report.max_rounds}  {mode}",
        f"graphs compiled: {report.graphs} "
        f"({len(report.q_lens)} Q_LEN value(s) x {report.max_rounds} steps)",
    ]
    lines.append("recompiles:" if report.recompiles else "recompiles: none")
    lines += [f"  Q_LEN={r.q_len} rounds={r.rounds}: {r.reason}" for r in report.recompiles]
    lines.append("graph breaks:" if report.graph_breaks else "graph breaks: none")
    lines += [f"  Q_LEN={b.q_len} at {b.where}: {b.reason}" for b in report.graph_breaks]
    if guards:
        for i, groups in enumerate(report.guards, 1):
            counts = Counter({g: len(v) for g, v in groups.items()})
            lines.append(f"guards of graph {i}: "
                         + ", ".join(f"{g} {n}" for g, n in sorted(counts.items())))
            for group in LISTED_GROUPS:
                lines += [f"  [{group}] {g}" for g in groups.get(group, [])]
    lines.append("verdict: " + ("OK" if report.ok else "EXTRA GRAPHS"))
    lines += [f"  {v}" for v in report.verdicts()]
    return "\n".join(lines)


def _check_args(args: argparse.Namespace) -> torch.device:
    """The device to run on; ValueError for arguments that cannot work."""
    bad = [f"--q-len {q}" for q in args.q_len if q < 1]
    bad += [f"--max-rounds {args.max_rounds}"] if args.max_rounds < 1 else []
    if bad:
        raise ValueError(f"lengths and rounds must be >= 1, got {', '.join(bad)}.")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                         "here. Use --device cpu.")
    if args.backward and device.type == "cpu":
        raise ValueError("--backward needs a CUDA device: flex_attention has no backward on CPU.")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compiled-mask-guards",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="factory 'module:callable' or 'path/to/file.py:callable' -> "
                             "(model, make_inputs)")
    parser.add_argument("--q-len", type=int, nargs="+", default=[128])
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--backward", action="store_true", help="forward+backward (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-guards", action="store_true", help="leave the guard lists out")
    parser.add_argument("--expect-graphs", type=int, default=None,
                        help="exit 1 when more graphs than this were compiled (or any graph break)")
    args = parser.parse_args(argv)
    try:  # usage errors: one line and exit code 2, as argparse's own
        device = _check_args(args)
        load_factory(args.model)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    report = run(args.model, args.q_len, args.max_rounds, device, args.backward, args.backend)
    if args.json:
        data = asdict(report) | {"ok": report.ok, "verdicts": report.verdicts()}
        print(json.dumps(data, indent=1, default=str))
    else:
        print(format_report(report, guards=not args.no_guards))
    if args.expect_graphs is not None and (report.graphs > args.expect_graphs or report.graph_breaks):
        print(f"expected at most {args.expect_graphs} graph(s) and no graph break; compiled "
              f"{report.graphs} with {len(report.graph_breaks)} break(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
