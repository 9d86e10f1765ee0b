"""Context parallel benchmark: one TTT step (fwd+bwd) per rank against one GPU, both modes.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 tools/bench_distributed.py            # 2 GPUs, the full grid
    torchrun --nproc-per-node 2 tools/bench_distributed.py --smoke        # CPU, gloo, tiny sizes

For each Q_LEN (default 65536 and 131072) x max_rounds (7, all live), 32 query / 8 K/V heads,
d=128, bf16, batch 1:
- one GPU: ``Eagle3Attention(backend="split")`` on the whole sequence (run on every rank at once,
  each on its own GPU; rank 0's row is printed), if it fits;
- each mode of ``Eagle3ContextParallelAttention`` (zigzag shard order) over the group;
- the mode's collectives alone, at the step's sizes (the floor of its communication).
Every row: step time (median of timed steps, the slowest rank: collectives synchronise the
ranks), per-rank peak memory, bytes each rank sends per step, and the scaling efficiency
``t_one_gpu / (P * t_step)``. Everything compiled with ``fullgraph=True``; compile time is
reported separately. Writes bench_distributed.json and .md to ``--out`` (default $OUT or /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from compiled_mask import Eagle3Attention  # noqa: E402
from compiled_mask.distributed import Eagle3ContextParallelAttention  # noqa: E402

# The 2-GPU machine's NVLink multicast is off (../shared/GPU.md); NCCL reads these when it first
# builds a communicator, so setting them before the first collective is in time.
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
    os.environ.setdefault(_name, "1" if _name.startswith("TORCH") else "0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between rows, so each row's peak is its own."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_steps(step, device: torch.device, reps: int, group=None) -> list[float]:
    """Wall of each of ``reps`` steps in ms after a barrier (CUDA events on GPU)."""
    times = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group)
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_gib(step, device: torch.device) -> float:
    """Peak memory allocated during one step, inputs included, in GiB (NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _inputs(B, Hq, Hkv, L, max_rounds, D, dtype, device):
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    q = make(B, Hq, L, D).requires_grad_()
    k = make(B, Hkv, L * max_rounds, D).requires_grad_()
    v = make(B, Hkv, L * max_rounds, D).requires_grad_()
    return q, k, v, make(B, Hq, L, D)


def _measure(attn, inputs, rounds, device, reps, group) -> dict:
    """Compile (first call), then time fwd+bwd steps and the peak memory of one."""
    q, k, v, dout = inputs

    def step():
        out = attn(q, k, v, rounds)
        torch.autograd.grad(out, (q, k, v), dout)

    t0 = time.perf_counter()
    step()
    _sync(device)
    compile_s = time.perf_counter() - t0
    step()  # warm-up
    peak = _peak_gib(step, device)
    times = _time_steps(step, device, reps, group)
    return {"ms": statistics.median(times), "compile_s": compile_s, "peak_gib": peak}


def bytes_per_step(mode: str, q_len: int, P: int, max_rounds: int, B: int, Hq: int, Hkv: int,
                   D: int, elt: int) -> float:
    """Bytes each rank sends (and receives) in one fwd+bwd step (docs/context_parallel.md).

    ulysses: q, the K/V buffer, and the output change hands, (P-1)/P of each shard, forward and
    again backward (their gradients); allgather: round 0 of K and V, all-gathered forward and
    its gradient reduce-scattered backward.
    """
    L = q_len // P
    if mode == "ulysses":
        return 2 * (P - 1) / P * B * L * D * (2 * Hq + 2 * max_rounds * Hkv) * elt
    return 2 * (P - 1) / P * 2 * B * Hkv * q_len * D * elt


def _comm_only(mode, q_len, P, max_rounds, B, Hq, Hkv, D, dtype, device, reps, group) -> float:
    """The mode's collectives alone, at the step's sizes: ms per step (median)."""
    L = q_len // P
    if mode == "ulysses":
        sizes = [B * L * Hq * D, B * L * max_rounds * Hkv * D, B * L * max_rounds * Hkv * D,
                 B * L * Hq * D] * 2  # q, k, v, out; then their gradients
        bufs = [(torch.empty(n, device=device, dtype=dtype), torch.empty(n, device=device, dtype=dtype))
                for n in sizes]

        def step():
            for send, recv in bufs:
                dist.all_to_all_single(recv, send, group=group)
    else:
        n = 2 * B * Hkv * L * D
        send, gathered = torch.empty(n, device=device, dtype=dtype), torch.empty(P * n, device=device, dtype=dtype)
        grad = torch.empty(P * n, device=device, dtype=dtype)
        scattered = torch.empty(n, device=device, dtype=dtype)

        def step():
            dist.all_gather_into_tensor(gathered, send, group=group)
            dist.reduce_scatter_tensor(scattered, grad, group=group)
    step()
    return statistics.median(_time_steps(step, device, reps, group))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q-lens", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--max-rounds", type=int, default=7)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["allgather", "ulysses"],
                        help="modes, optionally with a shard order: allgather, ulysses:contiguous, ...")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--no-single", action="store_true", help="skip the one-GPU baseline")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny sizes, aot_eager")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 renames the c10d calls

    if args.smoke:
        args.q_lens, args.max_rounds, args.heads, args.head_dim, args.reps = [64], 3, [4, 2], 16, 2
    device = torch.device("cpu")
    if not args.smoke:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if args.smoke else "nccl")
    group = dist.group.WORLD
    rank, P = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32 if args.smoke else torch.bfloat16
    compile_backend = "aot_eager" if args.smoke else "inductor"
    B, (Hq, Hkv), D, R = 1, args.heads, args.head_dim, args.max_rounds
    elt = torch.finfo(dtype).bits // 8
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rounds = torch.tensor(R, device=device)

    rows = []
    for q_len in args.q_lens:
        single = None
        if not args.no_single:
            torch._dynamo.reset()
            attn = torch.compile(Eagle3Attention(q_len, R, backend="split"), backend=compile_backend,
                                 fullgraph=True)
            try:
                single = _measure(attn, _inputs(B, Hq, Hkv, q_len, R, D, dtype, device), rounds, device,
                                  args.reps, None)
            except torch.OutOfMemoryError:
                single = {"ms": float("nan"), "compile_s": float("nan"), "peak_gib": float("inf")}
            rows.append({"q_len": q_len, "what": "1 GPU, split", **single, "bytes": 0.0, "comm_ms": 0.0})
            del attn
            _release(device)
        for spec in args.modes:
            mode, _, shard_order = spec.partition(":")
            shard_order = shard_order or "zigzag"
            torch._dynamo.reset()
            attn = torch.compile(
                Eagle3ContextParallelAttention(q_len, R, group=group, mode=mode, shard_order=shard_order),
                backend=compile_backend, fullgraph=True,
            )
            result = _measure(attn, _inputs(B, Hq, Hkv, q_len // P, R, D, dtype, device), rounds, device,
                              args.reps, group)
            # The step time is the slowest rank's; memory the largest.
            stats = torch.tensor([result["ms"], result["peak_gib"]], device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
            per_rank = [None] * P
            dist.all_gather_object(per_rank, round(result["ms"], 2), group=group)
            comm = _comm_only(mode, q_len, P, R, B, Hq, Hkv, D, dtype, device, args.reps, group)
            row = {"q_len": q_len, "what": f"{P} GPUs, {mode}/{shard_order}", "ms": stats[0].item(),
                   "per_rank_ms": per_rank, "compile_s": result["compile_s"], "peak_gib": stats[1].item(),
                   "bytes": bytes_per_step(mode, q_len, P, R, B, Hq, Hkv, D, elt), "comm_ms": comm}
            if single is not None:
                row["efficiency"] = single["ms"] / (P * row["ms"])
            rows.append(row)
            del attn
            _release(device)

    if rank == 0:
        head = (f"Context parallel, one TTT step fwd+bwd: {card} x {P}, torch {torch.__version__}, "
                f"max_rounds={R} (all live), heads {Hq}/{Hkv}, d={D}, {str(dtype).split('.')[-1]}, "
                f"batch {B}, median of {args.reps} steps")
        lines = [head, "",
                 "| Q_LEN | run | step ms | per rank ms | efficiency | peak GiB/rank | sent GB/rank/step | collectives alone ms | compile s |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            eff = f"{r['efficiency']:.2f}" if "efficiency" in r else ""
            lines.append(
                f"| {r['q_len']} | {r['what']} | {r['ms']:.1f} | {r.get('per_rank_ms', '')} | {eff} | "
                f"{r['peak_gib']:.2f} | {r['bytes'] / 1e9:.2f} | {r['comm_ms']:.1f} | {r['compile_s']:.0f} |"
            )
        text = "\n".join(lines)
        print(text, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_distributed.md").write_text(text + "\n")
        (args.out / "bench_distributed.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
