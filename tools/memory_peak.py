"""Peak memory of one draft training step (forward and backward), and what holds it at the peak.

The Llama-3-8B-sized draft (or a tiny one), 7 TTT steps, the target as ``TargetHead`` or float32
probabilities, ``Eagle3Model(memory=...)`` compiled whole (or eager). After a warm-up step it runs
one more and reports the peak above the memory held before that step. On CUDA it also replays
the caching allocator's trace of that step and lists the blocks alive at the peak, grouped by the
line that allocated them: a line of Inductor's generated code names the buffer's shape, a line of
the library names the op. On CPU the peak comes from the profiler's memory events (no lines).

    python tools/memory_peak.py --q-len 32768 --memory recompute           # CUDA, 8B-sized draft
    python tools/memory_peak.py --device cpu --size tiny --q-len 1024 --memory save recompute
    python tools/memory_peak.py --device cpu --size mid --q-len 2048 --chunk-rows 512 --memory staged
"""

from __future__ import annotations

import argparse
import collections
import linecache
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/benchmarks/

from benchmarks.draft import LLAMA3_8B_DRAFT, draft_step_inputs  # noqa: E402
from compiled_mask import Eagle3DraftConfig, Eagle3Model  # noqa: E402
from train import _non_negative_int, _positive_int  # noqa: E402  (tools/train.py's flags' types)

SIZES = {
    "llama3-8b": LLAMA3_8B_DRAFT,
    "tiny": dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=2000, draft_vocab_size=1000),
    # the 8B-sized draft's ratios (V / H ~ 8, I / H = 3.5) at a size a CPU runs in seconds
    "mid": dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
                vocab_size=4000, draft_vocab_size=4000),
}


def peak_blocks(events: list[dict]) -> tuple[int, list[tuple[int, int]]]:
    """Replay allocator events (``alloc`` / ``free_completed``, as in
    ``torch.cuda.memory._snapshot()["device_traces"]``): the peak of the bytes allocated during
    the trace, and the blocks alive at that peak as ``(size, index of the alloc event)``."""
    live: dict[int, tuple[int, int]] = {}
    current = peak = 0
    at_peak: list[tuple[int, int]] = []
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], i)
            current += event["size"]
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    return peak, at_peak


def allocated_where(frames: list[dict]) -> str:
    """The first frame outside torch's own Python (Inductor's generated code counts as outside),
    as ``file:line source``."""
    for frame in frames:
        name = frame["filename"]
        if "torch/" not in name or "torchinductor" in name:
            source = linecache.getline(name, frame["line"]).strip()
            return f"{Path(name).name}:{frame['line']} {source[:110]}"
    return "?"


def top_lines(events: list[dict], at_peak: list[tuple[int, int]], top: int) -> list[tuple[int, int, str]]:
    """``(bytes, blocks, where)`` of the lines holding the most at the peak, largest first."""
    by_line: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for size, i in at_peak:
        entry = by_line[allocated_where(events[i].get("frames", []))]
        entry[0] += size
        entry[1] += 1
    rows = sorted(((b, n, where) for where, (b, n) in by_line.items()), reverse=True)
    return rows[:top]


def _cpu_peak(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure(device: torch.device, size: str, q_len: int, ttt_steps: int, memory: str, target_form: str,
            compiler: str, top: int, chunk_rows: int | None = None) -> dict:
    """One policy: ``{"memory", "policy", "step_ms", "peak_bytes", "unit_bytes", "top"}``
    (``unit_bytes``: one ``[T, H]`` activation in the parameter dtype)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = Eagle3DraftConfig(**SIZES[size])
    draft, ids, hidden, target, loss_mask = draft_step_inputs(cfg, q_len, target_form, device, dtype)
    model = Eagle3Model(draft, q_len, ttt_steps, memory=memory, chunk_rows=chunk_rows).to(device, dtype)
    step = torch.compile(model, fullgraph=True) if compiler == "inductor" else model
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        step(ids, hidden, target, loss_mask).loss.backward()
        for p in params:
            p.grad = None

    run()  # compile and warm up
    row = dict(memory=memory, policy=model.memory, unit_bytes=q_len * cfg.hidden_size * dtype.itemsize, top=[])
    if device.type != "cuda":
        t0 = time.perf_counter()
        row["peak_bytes"] = _cpu_peak(run)
        row["step_ms"] = 1e3 * (time.perf_counter() - t0)
        return row
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        row["step_ms"] = 1e3 * (time.perf_counter() - t0)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snapshot["device_traces"] for e in trace if e["action"] in ("alloc", "free_completed")]
    peak, at_peak = peak_blocks(events)
    row.update(peak_bytes=peak, before_bytes=before, max_allocated_bytes=torch.cuda.max_memory_allocated(device),
               top=top_lines(events, at_peak, top))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(SIZES), default="llama3-8b", help="draft sizes (default: llama3-8b)")
    parser.add_argument("--q-len", type=_positive_int, default=32768, help="tokens per sample (default: 32768)")
    parser.add_argument("--ttt-steps", type=_positive_int, default=7, help="TTT steps (default: 7)")
    parser.add_argument("--memory", nargs="+", default=["recompute"],
                        help="Eagle3Model memory policies to measure, one after another (default: recompute)")
    parser.add_argument("--target", choices=["head", "probs"], default="head",
                        help="TargetHead, or float32 [T, V] probabilities (default: head)")
    parser.add_argument("--compiler", choices=["inductor", "none"], default="inductor",
                        help="torch.compile the whole step, or run it eagerly (default: inductor)")
    parser.add_argument("--top", type=_non_negative_int, default=25, help="lines listed at the peak (CUDA; default: 25)")
    parser.add_argument("--chunk-rows", type=_positive_int, default=None,
                        help="rows per chunk of the loss (default: the library's, Note [chunk size] in loss.py)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for memory in args.memory:
        torch._dynamo.reset()
        row = measure(device, args.size, args.q_len, args.ttt_steps, memory, args.target, args.compiler, args.top,
                      args.chunk_rows)
        rows.append(row)
        print(f"memory={memory} ({row['policy']}), Q_LEN {args.q_len} x {args.ttt_steps} TTT steps, "
              f"{args.compiler}, {args.device}: step {row['step_ms']:.0f} ms, peak {row['peak_bytes'] / 2**30:.2f} "
              f"GiB above the step's start ({row['peak_bytes'] / row['unit_bytes']:.1f} x one [T, H] activation)"
              + (f"; {row['max_allocated_bytes'] / 2**30:.2f} GiB allocated at the peak, "
                 f"{row['before_bytes'] / 2**30:.2f} GiB before the step" if "before_bytes" in row else ""))
        for size, blocks, where in row["top"]:
            print(f"  {size / 2**30:7.2f} GiB {blocks:4d}x  {where}")
    return rows


if __name__ == "__main__":
    main()
