"""The split backend's suffix ops alone (``--only suffix``, beside table 2): each kernel variant's
time, the bytes it must move (``suffix_bytes``), GB/s against the card's bandwidth, and a check of
every variant against the torch reference.
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import _fmt_row, median_ms


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
                fn = lambda f=ops[op], a=args[op], variant=variant, config=config: f(*a, variant=variant, config=config)  # noqa: E731
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
