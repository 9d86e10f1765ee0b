"""Run the GPU tests one process per test, so one illegal memory access cannot hide the others.

    python tools/run_gpu_tests.py [-k EXPR] [-j N] [--log FILE]

Collects the tests marked ``gpu``, runs each in a fresh ``pytest`` process (``-j N`` of them at
once: compiling is CPU-bound, so a 16-core GPU host runs them several times faster), and prints one
line per test with the *first* error line of a failure (on CUDA the last error is often a
consequence of the first). Exits non-zero if any test failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
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
    parser.add_argument("-j", dest="jobs", type=int, default=1, help="tests run at once")
    parser.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu-tests.log")
    args = parser.parse_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")
    tests = collect(args.keyword)
    if not tests:
        print("no GPU tests collected")
        return 1

    def run_one(test: str) -> tuple[str, int, str, float]:
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", test],
                             cwd=ROOT, capture_output=True, text=True)
        return test, run.returncode, run.stdout + run.stderr, time.perf_counter() - t0

    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in as_completed([pool.submit(run_one, t) for t in tests]):
            test, returncode, log, seconds = done.result()
            with args.log.open("a") as f:
                f.write(f"===== {test}\n{log}\n")
            status = {0: "PASS", 5: "NONE"}.get(returncode, "FAIL")
            skipped = " (skipped)" if " skipped" in log and " passed" not in log else ""
            print(f"{status} {seconds:6.1f}s {test}{skipped}", flush=True)
            if status == "FAIL":
                failed += 1
                print(f"     first error: {first_error(log)}", flush=True)
    print(f"{len(tests) - failed}/{len(tests)} passed; full logs in {args.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
