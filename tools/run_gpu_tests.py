"""Run the GPU tests one process per test, so one illegal memory access cannot hide the others.

    python tools/run_gpu_tests.py [-k EXPR] [--log FILE]

Collects the tests marked ``gpu``, runs each in a fresh ``pytest`` process, and prints one line
per test with the *first* error line of a failure (on CUDA the last error is often a consequence
of the first). Exits non-zero if any test failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collect(keyword: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests"]
    if keyword:
        cmd += ["-k", keyword]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "::" in line]


def first_error(log: str) -> str:
    for line in log.splitlines():
        if re.match(r"^E\s+\S", line) or "Error:" in line:
            return line.strip()[:300]
    return "(no error line found; see the log)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="keyword")
    parser.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu-tests.log")
    args = parser.parse_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")
    tests = collect(args.keyword)
    if not tests:
        print("no GPU tests collected")
        return 1
    failed = 0
    for test in tests:
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                             cwd=ROOT, capture_output=True, text=True)
        log = run.stdout + run.stderr
        with args.log.open("a") as f:
            f.write(f"===== {test}\n{log}\n")
        status = {0: "PASS", 5: "NONE"}.get(run.returncode, "FAIL")
        skipped = " (skipped)" if " skipped" in log and " passed" not in log else ""
        print(f"{status} {time.perf_counter() - t0:6.1f}s {test}{skipped}", flush=True)
        if status == "FAIL":
            failed += 1
            print(f"     first error: {first_error(log)}", flush=True)
    print(f"{len(tests) - failed}/{len(tests)} passed; full logs in {args.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
