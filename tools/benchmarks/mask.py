"""Table 1, mask build: compiled_mask's op eagerly and inside a compiled function,
create_block_mask eager and compiled; median device time of the kernels (profiler), median host
wall per call, peak extra memory, kernels launched; and a batch of 8 with seq_lens and doc_ids.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask

from benchmarks.common import (ROTATE, _fmt_row, host_us_per_call, kernel_profile, median_ms,
                               packed_doc_ids, peak_extra_mib)
from compiled_mask import eagle3_mask_mod
from compiled_mask._op import _eagle3_block_mask_op, _first_keys
from compiled_mask.block_mask import _eagle3_block_mask


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
