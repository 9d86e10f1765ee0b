"""Benchmarks: mask build and attention per TTT step, against create_block_mask and the causal floor.

    python tools/bench.py                 # full run (GPU), under 10 minutes on an H100/H200
    python tools/bench.py --quick         # a subset, under 5 minutes
    python tools/bench.py --smoke         # tiny sizes on whatever device (CI runs this on CPU)
    python tools/bench.py --out DIR       # where bench.json / bench.md / bench.png go

Four tables, one run, all rows side by side:
1. mask build: compiled_mask's op eagerly and inside a compiled function, create_block_mask eager
   and compiled; median device time of the kernels (profiler), median host wall per call, peak
   extra memory, kernels launched; and a batch of 8 with seq_lens and doc_ids;
2. attention per TTT step (mask + attention, fwd and fwd+bwd): Eagle3Attention with each backend,
   flex_attention on create_block_mask's mask (mask prebuilt), and the floor: causal-only SDPA on
   leaf q, k, v of Q_LEN keys (the suffix rounds add only Q_LEN * (rounds - 1) useful pairs), GQA
   (enable_gqa) and MHA (K/V heads repeated), the faster of the two being the floor; fwd+bwd in
   both gradient modes (``torch.autograd.grad``, and ``.backward()`` into ``.grad`` as training
   does); the useful TFLOP/s of every row (``attention_tflop``) beside the card's dense bf16 peak;
   ``--long`` adds Q_LEN 32768 and 65536 x 7 rounds (``--q-lens`` picks any);
   the split backend's suffix ops alone (``--only suffix``): each kernel variant's time, the bytes
   it must move (``suffix_bytes``), GB/s against the card's bandwidth, and a check of every
   variant against the torch reference;
   a padded batch (8 samples, valid lengths spread over the Q_LEN bucket) with and without
   seq_lens, backend "flex"; a packed batch (2 rows of documents of random lengths) with and
   without doc_ids, per backend;
3. compile cost: cold compile time (a fresh process per backend) and graph count of a TTT loop
   of rounds 1..8, per backend;
4. draft training step (``--only draft``, not in the default run): one whole Eagle3 TTT training
   step (forward and backward of a Llama-3-8B-sized draft, 7 TTT steps, bf16) as one compiled
   graph with each backend, against the way trainers do it today (the model eager, a new
   ``create_block_mask(..., _compile=True)`` per TTT step, a compiled ``flex_attention``, K/V
   growing each step): step time, TFLOP/s, peak memory, cold compile time and graphs, at Q_LEN
   8192 and 32768, one fresh process per row.

Timing: CUDA events through triton.testing.do_bench (median, after warm-up), fresh random inputs,
several input sets rotated so the cache does not flatter small sizes; on CPU (--smoke) a
perf_counter median. Every number is printed with the card's name.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.utils
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from compiled_mask import Eagle3Attention, eagle3_mask_mod  # noqa: E402
from compiled_mask import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model  # noqa: E402
from compiled_mask._fa4 import fa4_available  # noqa: E402
from compiled_mask._op import _eagle3_block_mask_op  # noqa: E402
from compiled_mask._op import _first_keys  # noqa: E402
from compiled_mask.block_mask import _eagle3_block_mask  # noqa: E402
from compiled_mask.inspect import GraphCounter  # noqa: E402

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


# ----------------------------------------------------------------------------- 1. mask build


def mask_build_rows(device, q_lens, rounds_list, block_sizes, reps) -> list[dict]:
    rows = []
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30
    for q_bs, kv_bs in block_sizes:
        for q_len in q_lens:
            for rounds in rounds_list:
                kv_len = q_len * rounds
                n_q, n_kv = -(-q_len // q_bs), -(-kv_len // kv_bs)
                out_mib = 4 * 2 * (n_q + n_kv + 2 * n_q * n_kv) / 2**20
                live = [torch.tensor(rounds, device=device) for _ in range(ROTATE)]
                it = iter(range(10**9))

                def op_eager():
                    return _eagle3_block_mask_op(q_len, kv_len, q_bs, kv_bs, 1, 1, device,
                                                 live[next(it) % ROTATE], None)

                def build(r):
                    bm = _eagle3_block_mask(q_len, q_len * rounds, q_bs, kv_bs, 1, 1, device, r, None)
                    return bm.as_tuple()[2:10]

                compiled_build = torch.compile(build, fullgraph=True)

                def op_compiled():
                    return compiled_build(live[next(it) % ROTATE])

                mask_mod = eagle3_mask_mod(q_len)

                def cbm(compile_: bool):
                    return lambda: create_block_mask(mask_mod, 1, 1, q_len, kv_len, device=device,
                                                     BLOCK_SIZE=(q_bs, kv_bs), _compile=compile_)

                methods = [("compiled_mask op, eager", op_eager),
                           ("compiled_mask op, in torch.compile", op_compiled),
                           ("create_block_mask, eager", cbm(False)),
                           ("create_block_mask, _compile=True", cbm(True))]
                for name, fn in methods:
                    row = dict(table="mask_build", method=name, Q_LEN=q_len, rounds=rounds,
                               BLOCK_SIZE=f"{q_bs}x{kv_bs}", out_MiB=round(out_mib, 3))
                    # create_block_mask's dense grid: ~16 B per pair eager (int64 index grids),
                    # ~1 B compiled; skip where it would not fit.
                    per_pair = 16 if name.endswith("eager") and "create" in name else 1
                    if "create" in name and q_len * kv_len * per_pair > 0.7 * free:
                        row["skipped"] = f"needs ~{q_len * kv_len * per_pair / 2**30:.0f} GiB"
                        rows.append(row)
                        continue
                    try:
                        row["device_us"], row["kernels"] = kernel_profile(fn, device)
                        row["host_us"] = host_us_per_call(fn, device, calls=max(3, reps))
                        row["wall_ms"] = median_ms(fn, device, reps)
                        row["peak_extra_MiB"] = peak_extra_mib(fn, device)
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        torch.cuda.empty_cache()
                    rows.append(row)
                    print(_fmt_row(row), flush=True)
    return rows


def layout_build_rows(device, q_len, rounds, batch, reps) -> list[dict]:
    """The build for a batch with seq_lens and doc_ids (one mask per sample), against
    create_block_mask on the same mask_mod."""
    kv_len = q_len * rounds
    seq_lens = torch.linspace(q_len // batch, q_len, batch, device=device).round().long()
    doc_ids = packed_doc_ids(batch, q_len, device)
    live = torch.tensor(rounds, device=device)
    mask_mod = eagle3_mask_mod(q_len, seq_lens=seq_lens, doc_ids=doc_ids)
    methods = [
        ("compiled_mask op, eager", lambda: _eagle3_block_mask_op(
            q_len, kv_len, 128, 128, batch, 1, device, live, _first_keys(q_len, seq_lens, doc_ids))),
        ("create_block_mask, _compile=True", lambda: create_block_mask(
            mask_mod, batch, 1, q_len, kv_len, device=device, _compile=True)),
    ]
    rows = []
    for name, fn in methods:
        row = dict(table="mask_build", method=f"{name}, seq_lens + doc_ids, B={batch}", Q_LEN=q_len,
                   rounds=rounds, BLOCK_SIZE="128x128")
        row["device_us"], row["kernels"] = kernel_profile(fn, device)
        row["host_us"] = host_us_per_call(fn, device, calls=max(3, reps))
        row["wall_ms"] = median_ms(fn, device, reps)
        row["peak_extra_MiB"] = peak_extra_mib(fn, device)
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. attention


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


def _floor_inputs(sets, q_len, groups, grad):
    """The floors' inputs, from the same values as ``sets``: leaf q and leaf K/V of the first
    Q_LEN keys (a slice of the buffer would make the backward write a gradient for every round);
    ``groups`` > 1 repeats each K/V head that many times (the MHA form of GQA)."""
    def leaf(t, repeat=1):
        return t.detach()[:, :, :q_len].repeat_interleave(repeat, dim=1).contiguous().requires_grad_(grad)

    return [(leaf(q), leaf(k, groups), leaf(v, groups), dout) for q, k, v, dout in sets]


GRAD_MODES = ("autograd", "backward")


def _step(attend, sets, grad_mode: str | None):
    """One call per step, input sets rotated. ``grad_mode``: None (forward only), "autograd"
    (``torch.autograd.grad`` of q, k, v) or "backward" (``out.backward()`` into the leaves'
    ``.grad``, then ``.grad = None`` as ``optimizer.zero_grad(set_to_none=True)`` does)."""
    it = iter(range(10**9))

    def fn():
        q, k, v, dout = sets[next(it) % ROTATE]
        out = attend(q, k, v)
        if grad_mode == "autograd":
            torch.autograd.grad(out, (q, k, v), dout)
        elif grad_mode == "backward":
            out.backward(dout)
            q.grad = k.grad = v.grad = None
        return out

    return fn


def attention_tflop(B, Hq, q_len, rounds, D, Dv, backward, suffix=True) -> float:
    """Useful FLOPs of one step in TFLOP: the pairs the Eagle3 mask allows, Q_LEN (Q_LEN + 1) / 2
    causal ones plus Q_LEN (rounds - 1) suffix ones (``suffix=False``: the causal pairs only, the
    floors' work), per head, times 2 D + 2 Dv forward (S = QK^T, O = PV) and 6 D + 4 Dv more
    for the backward (S again, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q): 4 D and 14 D
    per pair at Dv = D, the usual causal fwd+bwd count (3.5x the forward's)."""
    pairs = q_len * (q_len + 1) // 2 + (q_len * (rounds - 1) if suffix else 0)
    per_pair = 2 * D + 2 * Dv + ((6 * D + 4 * Dv) if backward else 0)
    return B * Hq * pairs * per_pair / 1e12


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


def _with_throughput(row: dict, tflop: float, peaks: dict) -> dict:
    if "ms" in row:
        row["TFLOP/s"] = float(f"{tflop / (row['ms'] / 1e3):.4g}")
        if peaks.get("TFLOP/s"):
            row["pct_peak"] = round(100 * row["TFLOP/s"] / peaks["TFLOP/s"], 1)
    return row


def attention_rows(device, dtype, q_len, rounds_list, heads, D, backends, reps, passes, peaks, prebuilt=True):
    """``passes``: (pass name, grad mode) pairs, e.g. ("fwd", None), ("fwd+bwd", "autograd").
    On CPU the fwd+bwd passes time the floors only (flex has no CPU backward, and compiling the
    other backward graphs would double the CI smoke's time)."""
    torch._dynamo.reset()  # each module instance counts against dynamo's per-function recompile limit
    Hq, Hkv = heads
    max_rounds = max(rounds_list)
    compiled = {b: torch.compile(Eagle3Attention(q_len, max_rounds, backend=b), fullgraph=True)
                for b in backends}
    flex = torch.compile(flex_attention, fullgraph=True)
    floors = ("floor: causal SDPA, GQA (enable_gqa), leaf q/k/v of Q_LEN keys",
              "floor: causal SDPA, MHA (k/v repeat_interleave'd), leaf q/k/v of Q_LEN keys")
    rows = []
    for pass_, grad_mode in passes:
        backward = grad_mode is not None
        sets = _inputs(device, dtype, 1, Hq, Hkv, q_len, q_len * max_rounds, D, backward)
        floor_sets = {floors[0]: _floor_inputs(sets, q_len, 1, backward),
                      floors[1]: _floor_inputs(sets, q_len, Hq // Hkv, backward)}
        for rounds in rounds_list:
            kv_len = q_len * rounds
            live = torch.tensor(rounds, device=device)
            methods = []  # (name, attend, is_floor)
            if not (backward and device.type == "cpu"):
                for b, attn in compiled.items():
                    methods.append((f"Eagle3Attention({b!r}), mask in-graph",
                                    lambda q, k, v, attn=attn: attn(q, k, v, live), False))
                if prebuilt:
                    bm = create_block_mask(eagle3_mask_mod(q_len), 1, 1, q_len, kv_len, device=device)
                    methods.append(("flex_attention + create_block_mask (prebuilt)",
                                    lambda q, k, v, bm=bm: flex(q, k[:, :, :kv_len], v[:, :, :kv_len],
                                                                block_mask=bm, enable_gqa=True), False))
            methods.append((floors[0], lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True), True))
            methods.append((floors[1], lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True), True))
            results = []
            for name, attend, is_floor in methods:
                row = dict(table="attention", method=name, Q_LEN=q_len, rounds=rounds,
                           heads=f"{Hq}/{Hkv}", D=D, dtype=str(dtype).removeprefix("torch."),
                           pass_=pass_, grad=grad_mode or "")
                try:
                    with torch.no_grad() if not backward else contextlib.nullcontext():
                        fn = _step(attend, floor_sets[name] if is_floor else sets, grad_mode)
                        row["ms"] = median_ms(fn, device, reps)
                except Exception as e:  # noqa: BLE001 - a backend that cannot run is a row too
                    row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                tflop = attention_tflop(1, Hq, q_len, rounds, D, D, backward, suffix=not is_floor)
                results.append(_with_throughput(row, tflop, peaks))
            floor = min((r["ms"] for r in results if r["method"] in floors and "ms" in r), default=None)
            for row in results:
                if floor and "ms" in row:
                    row["x_floor"] = round(row["ms"] / floor, 3)
                rows.append(row)
                print(_fmt_row(row), flush=True)
        del sets, floor_sets
    return rows


# ----------------------------------------------------------------------------- 2b. padded batch


def padding_rows(device, dtype, q_len, rounds, heads, D, batch, reps) -> list[dict]:
    """A padded batch: valid lengths spread over the Q_LEN bucket, with and without ``seq_lens``.

    Without seq_lens the mask covers every position (the padding is attended and later masked out
    of the loss); with them the blocks that hold only padding are skipped.
    """
    torch._dynamo.reset()  # each module instance counts against dynamo's per-function recompile limit
    Hq, Hkv = heads
    seq_lens = torch.linspace(q_len // batch, q_len, batch, device=device).round().long()
    fill = seq_lens.sum().item() / (batch * q_len)
    live = torch.tensor(rounds, device=device)
    attn = torch.compile(Eagle3Attention(q_len, rounds, backend="flex"), fullgraph=True)
    rows = []
    for backward in [False] if device.type == "cpu" else [False, True]:
        sets = _inputs(device, dtype, batch, Hq, Hkv, q_len, q_len * rounds, D, backward)
        results = []
        for name, kwargs in (("Eagle3Attention('flex'), no seq_lens", {}),
                             ("Eagle3Attention('flex'), seq_lens", dict(seq_lens=seq_lens))):
            row = dict(table="padding", method=name, B=batch, Q_LEN=q_len, rounds=rounds,
                       heads=f"{Hq}/{Hkv}", D=D, fill=round(fill, 3),
                       pass_="fwd+bwd" if backward else "fwd")
            fn = _step(lambda q, k, v, kwargs=kwargs: attn(q, k, v, live, **kwargs), sets,
                       "autograd" if backward else None)
            with torch.no_grad() if not backward else contextlib.nullcontext():
                row["ms"] = median_ms(fn, device, reps)
            results.append(row)
        for row in results:
            row["x_no_seq_lens"] = round(row["ms"] / results[0]["ms"], 3)
            rows.append(row)
            print(_fmt_row(row), flush=True)
        del sets
    return rows


# ----------------------------------------------------------------------------- 2c. packed batch


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


def document_rows(device, dtype, q_len, rounds, heads, D, batch, backends, reps) -> list[dict]:
    """A packed batch: each backend with ``doc_ids`` against itself on the same rows as one document.

    With doc_ids the blocks between documents are skipped (flex, fa4) or the causal part runs on
    the per-document mask (split: flex_attention instead of cuDNN, Note [documents in the split
    backend]).
    """
    Hq, Hkv = heads
    doc_ids = packed_doc_ids(batch, q_len, device)
    docs_per_row = round((doc_ids.max(1).values + 1).float().mean().item(), 1)
    live = torch.tensor(rounds, device=device)
    rows = []
    for backend in backends:
        if device.type == "cpu" and backend == "split":
            continue  # compiled CPU flex returns no lse (Note [documents in the split backend])
        torch._dynamo.reset()  # module instances x grad modes x layouts count against one recompile limit
        attn = torch.compile(Eagle3Attention(q_len, rounds, backend=backend), fullgraph=True)
        for backward in [False] if device.type == "cpu" else [False, True]:
            sets = _inputs(device, dtype, batch, Hq, Hkv, q_len, q_len * rounds, D, backward)
            results = []
            for name, kwargs in (("one document per row", {}), ("doc_ids", dict(doc_ids=doc_ids))):
                row = dict(table="documents", method=f"Eagle3Attention({backend!r}), {name}", B=batch,
                           Q_LEN=q_len, rounds=rounds, heads=f"{Hq}/{Hkv}", D=D, docs_per_row=docs_per_row,
                           pass_="fwd+bwd" if backward else "fwd")
                fn = _step(lambda q, k, v, kwargs=kwargs: attn(q, k, v, live, **kwargs), sets,
                           "autograd" if backward else None)
                try:
                    with torch.no_grad() if not backward else contextlib.nullcontext():
                        row["ms"] = median_ms(fn, device, reps)
                except Exception as e:  # noqa: BLE001 - a backend that cannot run is a row too
                    row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                results.append(row)
            for row in results:
                if "ms" in row and "ms" in results[0]:
                    row["x_one_document"] = round(row["ms"] / results[0]["ms"], 3)
                rows.append(row)
                print(_fmt_row(row), flush=True)
            del sets
    return rows


# ----------------------------------------------------------------------------- 2d. suffix kernels


def suffix_bytes(B: int, Hq: int, Hkv: int, q_len: int, max_rounds: int, live: int, D: int, Dv: int,
                 itemsize: int = 2) -> tuple[int, int]:
    """(forward, backward) bytes the suffix op must move: every tensor it reads or writes, once
    (``_triton_suffix.py``); ``live`` is clamped to [1, max_rounds] as the callers clamp it.

    Forward: reads q and the K/V rows of the live suffix rounds; writes the part out_s and lse_s
    (float32). Backward: reads dO_s and out_s (float32), lse_s, q and the live rounds' K/V;
    writes dq and every row of the suffix K/V gradient (the live rounds', the dead rounds'
    zeros). q, K/V and their gradients are ``itemsize`` bytes.
    """
    live = min(max(live, 1), max_rounds)
    q_rows, kv_rows = B * Hq * q_len, B * Hkv * q_len  # query rows; K/V rows of one round
    lse = 4 * q_rows
    kv_round = kv_rows * (D + Dv) * itemsize  # K and V rows of one round
    forward = q_rows * D * itemsize + (live - 1) * kv_round + q_rows * Dv * 4 + lse
    backward = (q_rows * 2 * Dv * 4 + lse + 2 * q_rows * D * itemsize  # dO_s, out_s, lse_s, q read; dq written
                + (live - 1) * kv_round + (max_rounds - 1) * kv_round)  # K/V read, dK/dV written
    return forward, backward


# Launch parameters tried by --suffix-sweep for the grouped kernels (their ``config`` argument).
SUFFIX_SWEEP = [dict(rows=r, num_warps=w, stages=s) for r in (16, 32, 64) for w in (2, 4, 8) for s in (2, 3)]
# (run at the largest rounds only: 18 configurations x 2 kernels, a Triton compile each)


def suffix_rows(device, dtype, q_len, rounds_list, heads, D, reps, peaks, sweep=False) -> tuple[list[dict], int]:
    """The suffix op alone, every kernel form: time, bytes moved (``suffix_bytes``) and GB/s;
    each form's result checked against the torch reference and against the first form
    (``torch.testing.assert_close``). The byte count is what the op must move, the same for every
    form: a form that reads a tensor twice gets an effective rate. Returns (rows, number of
    failed checks).

    On CPU the op's CPU implementation (the torch reference itself) is timed, unchecked; in
    the Triton interpreter (TRITON_INTERPRET=1, a test) the kernels run on CPU tensors.
    """
    from compiled_mask._suffix import _suffix_backward_reference, _suffix_reference

    Hq, Hkv = heads
    scale = D**-0.5
    rows, failed = [], 0
    for rounds in rounds_list:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, Hq, q_len, D, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(1, Hkv, q_len * rounds, D, device=device, dtype=dtype, generator=g) for _ in "kv")
        live = torch.tensor(rounds, device=device)
        fwd_args = (q, k[:, :, q_len:], v[:, :, q_len:], live, scale)
        out, lse = _suffix_reference(*fwd_args)
        dout = torch.randn(out.shape, device=device, generator=g)  # the part's gradient: float32
        bwd_args = (dout, None, q, k[:, :, q_len:], v[:, :, q_len:], out, lse, live, scale)
        args = {"forward": fwd_args, "backward": bwd_args}
        nbytes = dict(zip(("forward", "backward"), suffix_bytes(1, Hq, Hkv, q_len, rounds, rounds, D, D,
                                                                q.element_size())))
        kernels = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if kernels:
            from compiled_mask import _triton_suffix as ts

            ops = {"forward": ts.suffix_forward_triton, "backward": ts.suffix_backward_triton}
            variants = [("forward", "heads", None), ("forward", "grouped", None),
                        ("backward", "split", None), ("backward", "fused", None)]
            if sweep and rounds == max(rounds_list):
                variants += [(op, name, c) for op, name in (("forward", "grouped"), ("backward", "fused"))
                             for c in SUFFIX_SWEEP]
            want = {"forward": (out, lse), "backward": _suffix_backward_reference(*bwd_args)}
        else:
            ops = {"forward": _suffix_reference, "backward": _suffix_backward_reference}
            variants = [("forward", "torch (CPU)", None), ("backward", "torch (CPU)", None)]
        first = {}  # each op's first variant, which the others are checked against too
        for op, variant, config in variants:
            label = variant
            if config is not None:
                label += " rows={rows} warps={num_warps} stages={stages}".format(**config)
            row = dict(table="suffix", op=op, variant=label, Q_LEN=q_len, rounds=rounds, heads=f"{Hq}/{Hkv}", D=D,
                       dtype=str(dtype).removeprefix("torch."), MB=float(f"{nbytes[op] / 1e6:.4g}"))
            if kernels:
                fn = lambda f=ops[op], a=args[op], variant=variant, config=config: f(*a, variant, config)  # noqa: E731
            else:
                fn = lambda f=ops[op], a=args[op]: f(*a)  # noqa: E731
            got = fn()
            row["us"] = round(1e3 * median_ms(fn, device, reps), 1)
            row["GB/s"] = float(f"{nbytes[op] / (row['us'] / 1e6) / 1e9:.4g}")
            if peaks.get("TB/s"):
                row["pct_bw"] = float(f"{100 * row['GB/s'] / (1e3 * peaks['TB/s']):.3g}")
            if kernels:
                try:
                    names = ("out_s", "lse_s") if op == "forward" else ("dq", "dks", "dvs")
                    for name, x, w, y in zip(names, got, want[op], first.setdefault(op, got)):
                        torch.testing.assert_close(x, w, msg=lambda m, name=name: f"{name} vs the reference: {m}")
                        torch.testing.assert_close(x, y, msg=lambda m, name=name: f"{name} vs the first variant: {m}")
                    row["check"] = "ok"
                except AssertionError as e:
                    row["check"] = "MISMATCH " + " ".join(str(e).split())[:200]
                    failed += 1
            rows.append(row)
            print(_fmt_row(row), flush=True)
        del q, k, v, out, lse, dout, args, got, first
        if kernels:
            del want
    return rows, failed


# ----------------------------------------------------------------------------- 3. compile cost


def compile_rows(device, dtype, q_len, max_rounds, heads, D, backends, backward) -> list[dict]:
    """One fresh Python process per backend: a compile is cold only with every in-process cache
    (dynamo, Inductor's code cache, Triton's and FA4's kernel caches) empty."""
    rows = []
    for backend in backends:
        spec = dict(device=str(device), dtype=str(dtype).removeprefix("torch."), q_len=q_len,
                    max_rounds=max_rounds, heads=list(heads), D=D, backend=backend, backward=backward)
        run = subprocess.run([sys.executable, __file__, "--compile-row", json.dumps(spec)],
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


# ----------------------------------------------------------------------------- 4. draft step

LLAMA3_8B_DRAFT = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, draft_vocab_size=32000)
SMOKE_DRAFT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, draft_vocab_size=256)
TODAY = "today: create_block_mask(_compile=True) per TTT step + compiled flex_attention, model eager"


class TodayEagle3Step(torch.nn.Module):
    """The TTT step as open-source Eagle3 trainers run it, on the same draft and the same loss:
    the model eager, K/V caches that grow by one round per TTT step (``torch.cat``), a new
    ``create_block_mask(..., _compile=True)`` per step over the grown length,
    ``torch.compile(flex_attention)``, and the unfused LM head and log-softmax over ``[T, V]``
    (float32 probabilities as the target). Returns the weighted loss."""

    def __init__(self, draft: Eagle3DraftModel, q_len: int, length: int) -> None:
        super().__init__()
        self.draft, self.q_len, self.length = draft, q_len, length
        self.flex = torch.compile(flex_attention)

    def forward(self, input_ids, hidden_states, target, loss_mask):
        draft, T = self.draft, self.q_len
        layer, attn = draft.midlayer, draft.midlayer.self_attn
        hidden = draft.project_hidden_states(hidden_states)
        B = hidden.shape[0]
        cos_all, sin_all = draft.rope_cos_sin(torch.arange(T + self.length, device=hidden.device), hidden.dtype)
        ks, vs, loss = [], [], 0.0
        for s in range(self.length):
            ids = torch.cat([input_ids[:, s:], input_ids.new_zeros(B, s)], dim=1)
            embeds = draft.embed_input_ids(ids).to(hidden.dtype)
            x = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)
            q, k, v = attn.project(x, cos_all[s: s + T], sin_all[s: s + T])
            ks.append(k)
            vs.append(v)
            block_mask = create_block_mask(eagle3_mask_mod(T), 1, 1, T, T * (s + 1), device=q.device, _compile=True)
            out = self.flex(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), block_mask=block_mask, enable_gqa=True)
            h = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            hidden = h + layer.mlp(layer.post_attention_layernorm(h))
            logp = torch.log_softmax(draft.compute_logits(hidden).float(), -1)  # [B, T, V]
            mask = loss_mask[:, s:].float()
            nll = -(target[:, s:] * logp[:, : T - s]).sum(-1)  # [B, T - s]
            loss = loss + 0.8**s * (nll * mask).sum() / mask.sum().clamp(min=1)
        return loss


def draft_step_tflop(cfg: Eagle3DraftConfig, q_len: int, length: int, batch: int = 1) -> tuple[float, float]:
    """(matmul TFLOP, attention TFLOP) of one training step, forward + backward.

    Matmuls: every projection of each TTT step three times (forward, input and weight
    gradients), ``fc`` twice (its input, the target's hidden states, needs no gradient), the
    frozen embedding not at all. Attention: the causal half of Q_LEN x Q_LEN per step (the
    suffix diagonals add Q_LEN * s pairs, negligible), forward 2 and backward 5 matmuls.
    """
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Hq, Hkv, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.draft_vocab_size
    per_token = 2 * (2 * H * (Hq + 2 * Hkv) * D + Hq * D * H + 3 * H * I + H * V)  # one step, fwd
    tokens = batch * q_len
    matmul = 3 * per_token * tokens * length + 2 * 2 * 3 * cfg.target_hidden_size * H * tokens
    attention = length * 3.5 * 2 * batch * Hq * D * q_len * q_len  # causal: 2 * (4 * T^2 * D / 2)
    return matmul / 1e12, attention / 1e12


# Draft-table methods: "today" (TodayEagle3Step), or "BACKEND:MEMORY:TARGET" for Eagle3Model with
# attention_backend BACKEND, memory policy MEMORY (Note [memory policies] in draft/unroll.py) and a
# target of the form TARGET: "probs", float32 [T, V] probabilities (what today's trainers pass), or
# "head", TargetHead (a [T, H] bf16 last hidden state of the target and its [V, H] lm_head rows).
DRAFT_METHODS = ["today", "split:auto:probs", "split:auto:head"]


def _draft_method(spec: str) -> str:
    if spec == "today":
        return spec
    backend, _, rest = spec.partition(":")
    memory, _, target = rest.partition(":")
    if backend not in ("split", "flex", "fa4") or target not in ("probs", "head") or not memory:
        raise argparse.ArgumentTypeError(
            f"got {spec!r}: expected 'today' or BACKEND:MEMORY:TARGET, e.g. split:recompute:head "
            "(BACKEND split|flex|fa4, MEMORY auto|save|recompute|recompute_tiled, TARGET probs|head)")
    return spec


def draft_rows(device, q_lens, methods, length, smoke, reps, profiles: list[str] | None = None) -> list[dict]:
    """One fresh Python process per (method, Q_LEN): cold compile, then step time and peak memory;
    with ``profiles`` (a list to append to), also the kernel table of one step per row."""
    rows = []
    for q_len in q_lens:
        for method in methods:
            spec = dict(device=str(device), method=method, q_len=q_len, length=length, smoke=smoke,
                        reps=reps, profile=profiles is not None)
            row = dict(table="draft", method=_draft_method_name(method), Q_LEN=q_len, ttt_steps=length)
            if device.type == "cpu" and not method.startswith("split:"):
                row["skipped"] = "needs CUDA (flex_attention has no CPU backward)"
            else:
                run = subprocess.run([sys.executable, __file__, "--draft-row", json.dumps(spec)],
                                     capture_output=True, text=True)
                lines = run.stdout.strip().splitlines()
                if run.returncode == 0 and lines:
                    row = json.loads(lines[-1])
                    text = row.pop("profile", None)
                    if text is not None and profiles is not None:
                        profiles.append(f"## {row['method']}: Q_LEN={q_len}, {length} TTT steps, "
                                        f"one training step (fwd+bwd)\n{text}\n")
                else:
                    err = (run.stderr.strip().splitlines() or [""])[-1][:160]
                    row["skipped"] = f"exit {run.returncode}: {err}"
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


def _draft_method_name(method: str) -> str:
    if method == "today":
        return TODAY
    backend, memory, target = method.split(":")
    return f"Eagle3Model({backend!r}, memory={memory!r}), target {target}, one graph"


def draft_row(spec: dict) -> dict:
    """One row of the draft table, in this (fresh) process."""
    from compiled_mask.draft import TargetHead

    device = torch.device(spec["device"])
    q_len, length, method = spec["q_len"], spec["length"], spec["method"]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = Eagle3DraftConfig(**(SMOKE_DRAFT if spec["smoke"] else LLAMA3_8B_DRAFT))
    row = dict(table="draft", method=_draft_method_name(method), Q_LEN=q_len, ttt_steps=length)
    matmul_tf, attn_tf = draft_step_tflop(cfg, q_len, length)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(cfg)
    draft.freeze_embedding()
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (1, q_len), device=device, generator=g)
    hidden = torch.randn(1, q_len, 3 * cfg.hidden_size, device=device, dtype=dtype, generator=g)
    loss_mask = torch.ones(1, q_len, dtype=torch.bool, device=device)
    try:
        target_form = "probs" if method == "today" else method.split(":")[2]
        if target_form == "probs":
            target = torch.randn(1, q_len, cfg.draft_vocab_size, device=device, generator=g).softmax(-1)
        else:
            target = TargetHead(torch.randn(1, q_len, cfg.hidden_size, device=device, dtype=dtype, generator=g),
                                torch.randn(cfg.draft_vocab_size, cfg.hidden_size, device=device, dtype=dtype,
                                            generator=g) / cfg.hidden_size**0.5)
        if method == "today":
            model = TodayEagle3Step(draft, q_len, length).to(device, dtype)
            step = model
        else:
            backend, memory, _ = method.split(":")
            model = Eagle3Model(draft, q_len, length, attention_backend=backend, memory=memory).to(device, dtype)
            row["memory"] = model.memory
            step = torch.compile(model, fullgraph=True)
        params = [p for p in model.parameters() if p.requires_grad]

        def train_step():
            out = step(input_ids, hidden, target, loss_mask)
            loss = out if method == "today" else out.loss
            loss.backward()
            for p in params:
                p.grad = None
            return loss

        with torch._inductor.utils.fresh_cache():
            t0 = time.perf_counter()
            train_step()
            _sync(device)
            row["cold_s"] = round(time.perf_counter() - t0, 1)
            train_step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(spec["reps"]):
                _sync(device)
                t0 = time.perf_counter()
                train_step()
                _sync(device)
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row.update(step_ms=round(1e3 * step_s, 1), TFLOP=round(matmul_tf + attn_tf, 3),
                   **{"TFLOP/s": round((matmul_tf + attn_tf) / step_s, 3)},
                   graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"])
        if device.type == "cuda":
            row["peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        if spec.get("profile"):
            row["profile"] = _kernel_table(train_step, device)
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
    except Exception as e:  # noqa: BLE001 - a method that cannot run is a row too
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row


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


def profile_text(device, dtype, q_len, rounds, heads, D, backends, backward) -> str:
    """Where one TTT step's time goes: the profiler's kernel table per backend (and the floor)."""
    torch._dynamo.reset()
    Hq, Hkv = heads
    sets = _inputs(device, dtype, 1, Hq, Hkv, q_len, q_len * rounds, D, backward)
    live = torch.tensor(rounds, device=device)
    methods = {f"Eagle3Attention({b!r})": torch.compile(Eagle3Attention(q_len, rounds, backend=b),
                                                        fullgraph=True) for b in backends}
    methods["floor: causal SDPA, GQA, leaf q/k/v of Q_LEN keys"] = None
    floor_sets = _floor_inputs(sets, q_len, 1, backward)
    out = []
    for name, attn in methods.items():
        attend = (lambda q, k, v, attn=attn: attn(q, k, v, live)) if attn is not None else (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        fn = _step(attend, sets if attn is not None else floor_sets, "autograd" if backward else None)
        try:
            for _ in range(3):
                fn()
            table = _kernel_table(fn, device, steps=ROTATE, rows=18)
        except Exception as e:  # noqa: BLE001 - a backend that cannot run says why
            out.append(f"## {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}\n")
            continue
        out.append(f"## {name}: Q_LEN={q_len}, rounds={rounds}, {ROTATE} steps, "
                   f"{'fwd+bwd' if backward else 'fwd'}\n{table}\n")
    return "\n".join(out)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a subset, under 5 minutes on a GPU")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    parser.add_argument("--only", choices=list(TABLES), nargs="+", default=DEFAULT_TABLES,
                        help="tables to run (default: all but 'draft': 8 rows of a minute or two each)")
    parser.add_argument("--backends", nargs="+", choices=["flex", "split", "fa4"],
                        help="Eagle3Attention backends to time (default: all that can run here)")
    parser.add_argument("--grad-mode", choices=[*GRAD_MODES, "both"], default="both",
                        help="attention fwd+bwd rows: torch.autograd.grad of q/k/v, or .backward() into "
                             "the leaves' .grad (set to None after each step), or both (default)")
    parser.add_argument("--long", action="store_true",
                        help="also attention and suffix rows at Q_LEN 32768 and 65536 x 7 rounds (GPU)")
    parser.add_argument("--q-lens", type=int, nargs="+",
                        help="Q_LENs of the attention and suffix tables (default: 8192, --smoke 256); "
                             "a Q_LEN other than the default gets 7 rounds and no create_block_mask row")
    parser.add_argument("--suffix-sweep", action="store_true",
                        help="suffix table: also time the grouped kernels at each of SUFFIX_SWEEP's launch parameters")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    parser.add_argument("--peak-tbps", type=float, help="the card's memory bandwidth, TB/s (default: from its name)")
    parser.add_argument("--profile", action="store_true",
                        help="also write the top kernels of one fwd+bwd step per backend, and of one "
                        "draft training step per draft row (profile.txt)")
    parser.add_argument("--compile-row", help=argparse.SUPPRESS)  # internal: one cold compile
    parser.add_argument("--draft-row", help=argparse.SUPPRESS)  # internal: one draft-step row
    parser.add_argument("--draft-q-lens", type=int, nargs="+",
                        help="Q_LEN values of the draft table (default: 8192 32768; --smoke: 64)")
    parser.add_argument("--draft-methods", nargs="+", type=_draft_method, default=None,
                        help="draft-table rows: 'today' or BACKEND:MEMORY:TARGET, e.g. split:recompute:head "
                             f"(default: {' '.join(DRAFT_METHODS)}; --smoke: split:auto:probs split:auto:head)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if args.compile_row:
        print(json.dumps(compile_row(json.loads(args.compile_row))))
        return 0
    if args.draft_row:
        print(json.dumps(draft_row(json.loads(args.draft_row))))
        return 0
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    if args.smoke:
        q_lens, rounds_list, blocks, reps = [256, 1024], [1, 4], [(128, 128)], 3
        att = dict(q_len=256, rounds_list=[1, 2], heads=(4, 2), D=32, reps=3)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elif args.quick:
        q_lens, rounds_list, blocks, reps = [4096, 32768], [1, 8], [(128, 128)], 20
        att = dict(q_len=8192, rounds_list=[1, 7], heads=(32, 8), D=128, reps=20)
        dtype = torch.bfloat16
    else:
        q_lens, rounds_list, blocks, reps = [1024, 4096, 16384, 32768, 65536], [1, 4, 8], \
            [(128, 128)], 30
        att = dict(q_len=8192, rounds_list=[1, 4, 7], heads=(32, 8), D=128, reps=30)
        dtype = torch.bfloat16
    backends = args.backends or (
        ["flex", "split"] + (["fa4"] if device.type == "cuda" and fa4_available() else []))
    passes = [("fwd", None)] + [("fwd+bwd", m) for m in (GRAD_MODES if args.grad_mode == "both" else [args.grad_mode])]
    long_q_lens = [32768, 65536] if args.long and not args.smoke else []
    peaks = card_peaks(device, args.peak_tflops, args.peak_tbps)

    env = environment(device)
    env["peaks"] = peaks
    print("environment:", json.dumps(env), flush=True)
    rows: list[dict] = []
    failed = 0
    if "mask_build" in args.only:
        rows += mask_build_rows(device, q_lens, rounds_list, blocks, reps)
        if not args.smoke:  # the Blackwell layout, on a subset
            rows += mask_build_rows(device, [32768], [8], [(256, 128)], reps)
        rows += layout_build_rows(device, att["q_len"], max(att["rounds_list"]),
                                  8 if not args.smoke else 2, reps)
    # The attention and suffix tables: (Q_LEN, rounds, reps, prebuilt create_block_mask row) each.
    att_runs = [(n, att["rounds_list"], att["reps"], True) if n == att["q_len"] else (n, [7], 5, False)
                for n in (args.q_lens or [att["q_len"]]) + long_q_lens]  # long: no create_block_mask row
    if "suffix" in args.only:  # first: its checks say whether the kernels timed below are right
        for q_len, rounds_list, reps_, _ in att_runs:
            got, bad = suffix_rows(device, dtype, q_len, rounds_list, att["heads"], att["D"], reps_, peaks,
                                   sweep=args.suffix_sweep)
            rows += got
            failed += bad
    if "attention" in args.only:
        for q_len, rounds_list, reps_, prebuilt in att_runs:
            rows += attention_rows(device, dtype, q_len, rounds_list, att["heads"], att["D"], backends, reps_,
                                   passes, peaks, prebuilt=prebuilt)
    if "padding" in args.only:
        rows += padding_rows(device, dtype, att["q_len"], max(att["rounds_list"]), att["heads"],
                             att["D"], 8 if not args.smoke else 2, att["reps"])
    if "documents" in args.only:
        rows += document_rows(device, dtype, att["q_len"], max(att["rounds_list"]), att["heads"],
                              att["D"], 2 if not args.smoke else 1, backends, att["reps"])
    if "compile" in args.only:
        rows += compile_rows(device, dtype, att["q_len"] if not args.smoke else 128,
                             8 if not args.smoke else 3, att["heads"], att["D"], backends,
                             backward=device.type == "cuda")
    draft_profiles = [] if args.profile else None
    if "draft" in args.only:
        q_lens_draft = args.draft_q_lens or ([64] if args.smoke else [8192, 32768])
        methods = args.draft_methods or (DRAFT_METHODS[1:] if args.smoke else DRAFT_METHODS)
        rows += draft_rows(device, q_lens_draft, methods, length=3 if args.smoke else 7,
                           smoke=args.smoke, reps=2 if args.smoke else 5, profiles=draft_profiles)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        # The attention step's kernels, unless only the draft step was asked for; then the draft's.
        text = "" if args.only == ["draft"] else profile_text(
            device, dtype, att["q_len"], max(att["rounds_list"]), att["heads"], att["D"], backends,
            backward=device.type == "cuda")
        text += "\n".join(draft_profiles)
        (args.out / "profile.txt").write_text(text)
        print(text)
    md_text = (f"Card: {env['card']}; torch {env['torch']}"
               + (f", triton {env['triton']}" if "triton" in env else "")
               + (f", flash-attn-4 {env['flash_attn_4']}" if "flash_attn_4" in env else "")
               + f"\n\nPeaks: {peaks['TFLOP/s'] or 'n/a'} TFLOP/s, {peaks['TB/s'] or 'n/a'} TB/s ({peaks['source']})"
               + f"\n\nCommand: python tools/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
               + markdown(rows))
    (args.out / "bench.md").write_text(md_text)
    (args.out / "bench.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    plotted = plot(rows, args.out / "bench.png")
    print(md_text)
    print(f"wrote {args.out}/bench.md, bench.json" + (", bench.png" if plotted else ""))
    if failed:
        print(f"{failed} suffix kernel check(s) failed: see the 'check' column", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
