"""Table 3, compile cost: cold compile time (a fresh process per backend) and graph count of a TTT
loop of rounds 1..8, per backend.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch
import torch._inductor.utils

from benchmarks.common import BENCH_SCRIPT, _fmt_row, _inputs, _sync
from compiled_mask import Eagle3Attention
from compiled_mask.inspect import GraphCounter


def compile_rows(device, dtype, q_len, max_rounds, heads, D, backends, backward) -> list[dict]:
    """One fresh Python process per backend: a compile is cold only with every in-process cache
    (dynamo, Inductor's code cache, Triton's and FA4's kernel caches) empty."""
    rows = []
    for backend in backends:
        spec = dict(device=str(device), dtype=str(dtype).removeprefix("torch."), q_len=q_len,
                    max_rounds=max_rounds, heads=list(heads), D=D, backend=backend, backward=backward)
        run = subprocess.run([sys.executable, str(BENCH_SCRIPT), "--compile-row", json.dumps(spec)],
                             capture_output=True, text=True)
        lines = run.stdout.strip().splitlines()
        if run.returncode == 0 and lines:
            row = json.loads(lines[-1])
        else:
            row = dict(table="compile", method=f"Eagle3Attention({backend!r})", Q_LEN=q_len,
                       skipped=f"exit {run.returncode}: {(run.stderr.strip().splitlines() or [''])[-1][:120]}")
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def compile_row(spec: dict) -> dict:
    """Cold compile time and graph count of a TTT loop of rounds 1..max_rounds (this process)."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    q_len, max_rounds, backend, backward = spec["q_len"], spec["max_rounds"], spec["backend"], spec["backward"]
    Hq, Hkv = spec["heads"]
    counter = GraphCounter()
    row = dict(table="compile", method=f"Eagle3Attention({backend!r})", Q_LEN=q_len,
               rounds=f"1..{max_rounds}", pass_="fwd+bwd" if backward else "fwd")
    try:
        with torch._inductor.utils.fresh_cache():
            attn = torch.compile(Eagle3Attention(q_len, max_rounds, backend=backend),
                                 backend=counter, fullgraph=True)
            (q, k, v, dout), = _inputs(device, dtype, 1, Hq, Hkv, q_len, q_len * max_rounds,
                                       spec["D"], backward)[:1]
            times = []
            for r in range(1, max_rounds + 1):
                t0 = time.perf_counter()
                with torch.no_grad() if not backward else contextlib.nullcontext():
                    out = attn(q, k, v, torch.tensor(r, device=device))
                    if backward:
                        torch.autograd.grad(out, (q, k, v), dout)
                _sync(device)
                times.append(time.perf_counter() - t0)
        row.update(cold_s=round(times[0], 2), later_steps_ms=round(1e3 * statistics.median(times[1:]), 2)
                   if len(times) > 1 else None, graphs=counter.graphs)
    except Exception as e:  # noqa: BLE001 - a backend that cannot run is a row too
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row
