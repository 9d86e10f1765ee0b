"""Table 2, attention per TTT step (mask + attention, fwd and fwd+bwd), and the padded and packed
batches.

Eagle3Attention with each backend, flex_attention on create_block_mask's mask (mask prebuilt),
and the floor: causal-only SDPA on leaf q, k, v of Q_LEN keys (the suffix rounds add only
Q_LEN * (rounds - 1) useful pairs), GQA (enable_gqa) and MHA (K/V heads repeated), the faster of
the two being the floor; fwd+bwd in both gradient modes (``torch.autograd.grad``, and
``.backward()`` into ``.grad`` as training does); the useful TFLOP/s of every row
(``attention_tflop``) beside the card's dense bf16 peak; ``--long`` adds Q_LEN 32768 and 65536 x 7
rounds (``--q-lens`` picks any). A padded batch (8 samples, valid lengths spread over the Q_LEN
bucket) with and without seq_lens, backend "flex"; a packed batch (2 rows of documents of random
lengths) with and without doc_ids, per backend. ``--profile``: the profiler's kernel table of one
step per backend (``profile_text``).
"""

from __future__ import annotations

import contextlib

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from benchmarks.common import ROTATE, _fmt_row, _inputs, _kernel_table, median_ms, packed_doc_ids
from compiled_mask import Eagle3Attention, eagle3_mask_mod


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


# ----------------------------------------------------------------------------- profile


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
