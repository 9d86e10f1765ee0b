"""Run the GPU tests one process per test, so one illegal memory access cannot hide the others.

    python tools/run_gpu_tests.py [PATH ...] [-k EXPR] [-j N] [--require gpu|fa4|2gpus ...] [--timeout S] [--log FILE]

Collects the tests marked ``gpu`` under PATH (default ``tests``), runs each in a fresh ``pytest``
process (``-j N`` of them at once: compiling is CPU-bound, so a 16-core GPU host runs them several
times faster), and prints one line per test: PASS, SKIP (with its reason, counted apart), XFAIL, or
FAIL with the *first* error line (on CUDA the last error is often a consequence of the first).

A test module that fails to import or collect is a failure, shown with its first error: its tests
were never run, so they must not vanish from the count. ``--require gpu`` (a CUDA device),
``--require fa4`` (FlashAttention-4 at a supported version) and ``--require 2gpus`` (two CUDA
devices, for the context-parallel tests) check the requirement up front and turn every skip for that reason into a
failure. ``--timeout S`` kills a test (with the ranks it spawned) after S seconds and counts it
as a failure, so one slow or hung test does not take a whole GPU session's time limit with it.
The exit code is non-zero on any failure, collection error, unmet requirement, or when no test
was collected.

The per-test results come from this file loaded as a pytest plugin (``-p run_gpu_tests``), which
writes one JSON line per collected item, collection error and test phase: no parsing of pytest's
terminal output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_REPORT_ENV = "RUN_GPU_TESTS_REPORT"  # where the plugin writes its JSON lines
# A skip whose reason matches means the requirement was missing (case-insensitive). A reason is
# charged to the first requirement it matches, in this order, the most specific first: "needs 2
# CUDA devices" is the two-GPU requirement, and "needs CUDA and flash_attn.cute" FA4's, not a
# want of any GPU (so --require gpu on one GPU without FA4 counts those tests as SKIP).
_REQUIREMENTS = {
    "2gpus": r"\b2 cuda devices\b",
    "fa4": r"\bfa4\b|flash_attn|flash-attn|flashattention|\bsm_?\d+",
    "gpu": r"\bcuda\b|\bgpu\b|\bsm_?\d+",
}


def skip_requirement(reason: str) -> str | None:
    """The requirement a skip's reason says was missing (:data:`_REQUIREMENTS`), if any."""
    return next((name for name, pattern in _REQUIREMENTS.items() if re.search(pattern, reason, re.I)), None)


def first_error(log: str) -> str:
    """The first ``E   ...`` line of a pytest failure (or a line naming an error), trimmed."""
    lines = log.splitlines()
    for pattern in (r"^E\s+\S", r"\w(Error|Exception):"):
        for line in lines:
            if re.search(pattern, line):
                return line.strip()[:300]
    return "(no error line found; see the log)"


# ------------------------------------------------------------------ the plugin (runs inside pytest)


def _emit(record: dict) -> None:
    path = os.environ.get(_REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _absolute_id(item) -> str:
    """``/abs/path/test_x.py::Class::test[param]``: valid from any working directory."""
    _, sep, rest = item.nodeid.partition("::")
    return str(item.path) + sep + rest


def pytest_collectreport(report) -> None:
    if report.failed:
        _emit({"kind": "collect-error", "where": report.nodeid or ".",
               "error": first_error(report.longreprtext)})


def pytest_collection_finish(session) -> None:
    for item in session.items:  # after -m / -k deselection
        _emit({"kind": "item", "id": _absolute_id(item)})


def pytest_runtest_logreport(report) -> None:
    record = {"kind": "phase", "when": report.when, "outcome": report.outcome}
    if hasattr(report, "wasxfail"):
        record["xfail"] = True
    if report.skipped and isinstance(report.longrepr, tuple):
        record["reason"] = report.longrepr[2].removeprefix("Skipped: ")
    elif report.failed:
        record["error"] = first_error(report.longreprtext)
    _emit(record)


# ------------------------------------------------------------------ the runner


@dataclass
class Result:
    test: str
    status: str  # PASS, SKIP, XFAIL, FAIL
    seconds: float
    detail: str = ""  # the skip reason or the first error


def _pytest(args: list[str], report: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    """pytest in a child process (and its own process group). Past ``timeout`` seconds the whole
    group is killed, ranks it spawned included, and the return code is None."""
    env = dict(os.environ)
    env[_REPORT_ENV] = str(report)
    paths = [str(Path(__file__).parent), env.get("PYTHONPATH")]  # tools/: this file as the plugin
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    command = [sys.executable, "-m", "pytest", "-p", "run_gpu_tests", "-p", "no:cacheprovider", *args]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
            code = child.returncode
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, err = child.communicate()
            code = None
    return subprocess.CompletedProcess(command, code, out, err)


def _records(report: Path) -> list[dict]:
    return [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []


def collect(paths: list[str], keyword: str | None) -> tuple[list[str], list[tuple[str, str]], str]:
    """The gpu-marked test ids, the collection errors ``(where, first error)``, and the log."""
    args = ["--collect-only", "-q", "-m", "gpu", *paths]
    if keyword:
        args += ["-k", keyword]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "collect.jsonl"
        run = _pytest(args, report)
        records = _records(report)
    tests = [r["id"] for r in records if r["kind"] == "item"]
    errors = [(r["where"], r["error"]) for r in records if r["kind"] == "collect-error"]
    log = run.stdout + run.stderr
    if run.returncode not in (0, 1, 2, 5) and not errors:  # pytest itself failed (usage, internal)
        errors.append(("pytest --collect-only", f"exit code {run.returncode}: {first_error(log)}"))
    return tests, errors, log


def run_one(test: str, timeout: float | None = None) -> tuple[Result, str]:
    """Run one test in its own pytest process (killed past ``timeout`` seconds); the result and
    the full log."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "test.jsonl"
        run = _pytest(["-q", "-s", "-x", test], report, timeout)
        phases = [r for r in _records(report) if r["kind"] == "phase"]
        errors = [r for r in _records(report) if r["kind"] == "collect-error"]
    seconds = time.perf_counter() - t0
    log = run.stdout + run.stderr
    if run.returncode is None:
        return Result(test, "FAIL", seconds, f"timed out after {timeout:g} s (--timeout), killed"), log
    failed = [p for p in phases if p["outcome"] == "failed"]
    skipped = [p for p in phases if p["outcome"] == "skipped"]
    if failed:
        return Result(test, "FAIL", seconds, failed[0].get("error", first_error(log))), log
    if errors:
        return Result(test, "FAIL", seconds, errors[0]["error"]), log
    ran = any(p["when"] == "call" for p in phases) or skipped
    if run.returncode not in (0, 5) or not ran:
        # A crash (signal, illegal memory access) or a test that did not run at all.
        detail = f"exit code {run.returncode}, no result: {first_error(log)}"
        return Result(test, "FAIL", seconds, detail), log
    if skipped:
        if skipped[0].get("xfail"):
            return Result(test, "XFAIL", seconds), log
        return Result(test, "SKIP", seconds, skipped[0].get("reason", "")), log
    return Result(test, "PASS", seconds), log


def check_requirement(name: str) -> str | None:
    """Why ``name`` is missing on this machine (None when it is there)."""
    if name in ("gpu", "2gpus"):
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if name == "2gpus" and torch.cuda.device_count() < 2:
            return f"one CUDA device (torch.cuda.device_count() is {torch.cuda.device_count()})"
        return None
    sys.path.insert(0, str(ROOT))
    from compiled_mask import _fa4

    try:
        _fa4._check_fa4_installed("on this machine")
    except ImportError as e:  # not installed (ModuleNotFoundError), or older than the floor
        return str(e)
    return None


def _shown(test: str) -> str:
    """A test id relative to the current directory where it is below it."""
    path, sep, rest = test.partition("::")
    try:
        path = str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        pass
    return path + sep + rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=[str(ROOT / "tests")], help="test files or folders")
    parser.add_argument("-k", dest="keyword")
    parser.add_argument("-j", dest="jobs", type=int, default=1, help="tests run at once")
    parser.add_argument("--require", action="append", default=[], choices=sorted(_REQUIREMENTS),
                        help="fail where tests skip for want of this (repeatable)")
    parser.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu-tests.log")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a test may run before it is killed and counted as a failure")
    args = parser.parse_args(argv)
    paths = [str(Path(p).resolve()) for p in args.paths]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")

    problems = 0
    for name in args.require:
        missing = check_requirement(name)
        if missing:
            problems += 1
            print(f"REQUIRE {name}: missing: {missing}", flush=True)

    tests, collect_errors, collect_log = collect(paths, args.keyword)
    with args.log.open("a") as f:
        f.write(f"===== collection\n{collect_log}\n")
    for where, error in collect_errors:
        print(f"ERROR collecting {_shown(where)}: {error}", flush=True)
    if not tests:
        print("no GPU tests collected", flush=True)

    counts = dict.fromkeys(["PASS", "SKIP", "XFAIL", "FAIL"], 0)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in as_completed([pool.submit(run_one, t, args.timeout) for t in tests]):
            result, log = done.result()
            with args.log.open("a") as f:
                f.write(f"===== {result.test}\n{log}\n")
            why = "first error"
            if result.status == "SKIP" and skip_requirement(result.detail) in args.require:
                result.status, why = "FAIL", "why"
                result.detail = f"skipped ({result.detail}), but --require {' --require '.join(args.require)}"
            counts[result.status] += 1
            line = f"{result.status:<5} {result.seconds:6.1f}s {_shown(result.test)}"
            if result.status == "SKIP":
                line += f"  ({result.detail})"
            print(line, flush=True)
            if result.status == "FAIL":
                print(f"      {why}: {result.detail}", flush=True)

    summary = f"{counts['PASS']} passed, {counts['SKIP']} skipped, {counts['FAIL']} failed"
    if counts["XFAIL"]:
        summary += f", {counts['XFAIL']} xfailed"
    summary += f" of {len(tests)} tests"
    if collect_errors:
        summary += f"; {len(collect_errors)} module(s) FAILED TO COLLECT (their tests did not run)"
    if problems:
        summary += f"; {problems} requirement(s) missing"
    print(f"{summary}; full logs in {args.log}")
    return 1 if counts["FAIL"] or collect_errors or problems or not tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
