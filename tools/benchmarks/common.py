"""What every table of tools/bench.py shares: timing, inputs, the card's peaks, the kernel table,
the environment, and the output (row lines, bench.md's tables, bench.png).

Timing: CUDA events through triton.testing.do_bench (median, after warm-up), fresh random inputs,
several input sets rotated so the cache does not flatter small sizes; on CPU (--smoke) a
perf_counter median. Every number is printed with the card's name.
"""

from __future__ import annotations

import gc
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from compiled_mask._fa4 import fa4_available

# tools/bench.py, which the compile and draft tables run again in a fresh process per row
# (``--compile-row``, ``--draft-row``).
BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "bench.py"

ROTATE = 3  # input sets cycled through while timing


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall of one call in ms: CUDA events (do_bench) on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(reps, 50), return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us_per_call(fn, device: torch.device, calls: int) -> float:
    """Host wall per call in µs, calls issued back to back (the GPU may still be busy after)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    _sync(device)
    return host


def kernel_profile(fn, device: torch.device, calls: int = 5) -> tuple[float, float]:
    """(median device µs of the kernels one call launches, kernels per call), by the profiler."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    per_call_us, per_call_n = [], []
    for _ in range(calls):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        per_call_us.append(sum(e.time_range.elapsed_us() for e in kernels))
        per_call_n.append(len(kernels))
    return statistics.median(per_call_us), statistics.median(per_call_n)


def peak_extra_mib(fn, device: torch.device) -> float:
    """Peak memory a call allocates beyond what was allocated before it, in MiB (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    torch.cuda.empty_cache()
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


# ----------------------------------------------------------------------------- inputs


def _inputs(device, dtype, B, Hq, Hkv, q_len, kv_len, D, grad):
    g = torch.Generator(device=device).manual_seed(0)
    sets = []
    for _ in range(ROTATE):
        q = torch.randn(B, Hq, q_len, D, device=device, dtype=dtype, generator=g)
        k = torch.randn(B, Hkv, kv_len, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, kv_len, D, device=device, dtype=dtype, generator=g)
        dout = torch.randn(B, Hq, q_len, D, device=device, dtype=dtype, generator=g)
        sets.append(tuple(t.requires_grad_(grad) for t in (q, k, v)) + (dout,))
    return sets


def packed_doc_ids(batch: int, q_len: int, device, seed: int = 0) -> torch.Tensor:
    """``[batch, q_len]`` doc_ids: each row packed full with documents of random lengths in
    [q_len // 32, q_len // 2] (the last one cut at q_len)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < q_len:
            ids += [doc] * int(torch.randint(max(1, q_len // 32), max(2, q_len // 2 + 1), (), generator=g))
            doc += 1
        rows.append(ids[:q_len])
    return torch.tensor(rows, device=device)


# ----------------------------------------------------------------------------- card peaks


# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) and HBM bandwidth (TB/s), spec sheets
# of the SXM parts, by the first name that the card's name contains.
CARD_PEAKS = {"H200": (989.0, 4.8), "H100": (989.0, 3.35), "A100": (312.0, 2.0), "B200": (2250.0, 8.0)}


def card_peaks(device: torch.device, tflops: float | None = None, tbps: float | None = None) -> dict:
    """The peaks the tables compare with: ``{"TFLOP/s": ..., "TB/s": ..., "source": ...}``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    spec = next((v for k, v in CARD_PEAKS.items() if k in name), (None, None))
    out = {"TFLOP/s": tflops or spec[0], "TB/s": tbps or spec[1]}
    out["source"] = ("--peak-tflops/--peak-tbps" if tflops or tbps else
                     f"{name} spec sheet (SXM), dense bf16" if spec[0] else "unknown card: no peak")
    return out


# ----------------------------------------------------------------------------- profile


def _kernel_table(fn, device, steps: int = 1, rows: int = 25) -> str:
    """The profiler's table of ``steps`` calls of ``fn`` (after it has run), by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)


# ----------------------------------------------------------------------------- output


def _fmt(v):
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
    return str(v)


def _fmt_row(row: dict) -> str:
    return "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "table")


TABLES = {
    "mask_build": ["method", "Q_LEN", "rounds", "BLOCK_SIZE", "device_us", "kernels", "host_us",
                   "wall_ms", "peak_extra_MiB", "out_MiB", "skipped"],
    "attention": ["method", "Q_LEN", "rounds", "heads", "D", "dtype", "pass_", "grad", "ms", "x_floor",
                  "TFLOP/s", "pct_peak", "skipped"],
    "suffix": ["op", "variant", "Q_LEN", "rounds", "heads", "D", "dtype", "us", "MB", "GB/s", "pct_bw",
               "check"],
    "padding": ["method", "B", "Q_LEN", "rounds", "heads", "D", "fill", "pass_", "ms",
                "x_no_seq_lens"],
    "documents": ["method", "B", "Q_LEN", "rounds", "heads", "D", "docs_per_row", "pass_", "ms",
                  "x_one_document", "skipped"],
    "compile": ["method", "Q_LEN", "rounds", "pass_", "cold_s", "later_steps_ms", "graphs",
                "skipped"],
    "draft": ["method", "Q_LEN", "ttt_steps", "memory", "step_ms", "TFLOP", "TFLOP/s", "peak_GiB", "cold_s",
              "graphs", "skipped"],
}
DEFAULT_TABLES = [t for t in TABLES if t != "draft"]  # the draft step runs only when asked for


def markdown(rows: list[dict]) -> str:
    out = []
    for table, cols in TABLES.items():
        mine = [r for r in rows if r["table"] == table]
        if not mine:
            continue
        cols = [c for c in cols if any(c in r for r in mine)]
        out.append(f"\n### {table.replace('_', ' ')}\n")
        out.append("| " + " | ".join(c.rstrip("_") for c in cols) + " |")
        out.append("|" + "---|" * len(cols))
        out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in mine]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    if not any(r["table"] == "mask_build" for r in rows):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "wall_ms", "wall per call (ms)"),
                           (axes[1], "device_us", "device time of kernels (µs)")):
        series: dict[str, list] = {}
        for r in rows:
            if r["table"] == "mask_build" and r.get(key) == r.get(key) and key in r:
                series.setdefault(f"{r['method']} ({r['rounds']} rounds, {r['BLOCK_SIZE']})", []
                                  ).append((r["Q_LEN"], r[key]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("Q_LEN")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("Eagle3 mask build")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), device=str(device))
    if device.type == "cuda":
        import triton

        env.update(card=torch.cuda.get_device_name(device), triton=triton.__version__)
        if fa4_available():
            import importlib.metadata as md

            env["flash_attn_4"] = md.version("flash-attn-4")
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return env
