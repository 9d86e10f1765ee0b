"""compiled-mask-show: a picture of the Eagle3 block mask (text, or PNG with matplotlib).

    compiled-mask-show --q-len 300 --rounds 3                   # one char per block
    compiled-mask-show --q-len 300 --kv-len 1000 --block-size 128 64
    compiled-mask-show --q-len 1024 --rounds 8 --live 3         # the static-width TTT form
    compiled-mask-show --q-len 12 --rounds 3 --block-size 4 --dense   # token-level mask too
    compiled-mask-show --q-len 4096 --rounds 4 --png mask.png

Legend: ``#`` FULL block (every pair attends; the kernel skips mask_mod), ``+`` PARTIAL (mask_mod
decides per pair), ``.`` absent (never visited). The ruler above the map gives the round (1-based,
last digit) whose first key falls in each kv-block column.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from compiled_mask.block_mask import eagle3_block_mask
from compiled_mask.modules import Eagle3BlockMask

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHARS = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
_DENSE_LIMIT = 200_000  # token pairs


def block_states(bm: BlockMask) -> Tensor:
    """``[n_q, n_kv]`` int: EMPTY / PARTIAL / FULL of each block (batch 0, head 0)."""
    n_q, n_kv = bm.kv_indices.shape[-2:]
    states = torch.zeros(n_q, n_kv, dtype=torch.int64)
    for value, num, idx in ((PARTIAL, bm.kv_num_blocks, bm.kv_indices),
                            (FULL, bm.full_kv_num_blocks, bm.full_kv_indices)):
        num, idx = num[0, 0].cpu(), idx[0, 0].cpu()
        valid = torch.arange(n_kv) < num.unsqueeze(-1)  # [n_q, n_kv]
        rows = torch.arange(n_q).unsqueeze(-1).expand(n_q, n_kv)  # [n_q, n_kv]
        states[rows[valid], idx.long()[valid]] = value
    return states


def build(q_len: int, kv_len: int, block_size: tuple[int, int], live: int | None) -> BlockMask:
    if live is None:
        return eagle3_block_mask(q_len, kv_len, device="cpu", BLOCK_SIZE=block_size)
    if kv_len % q_len:
        raise ValueError(f"--live needs whole rounds: KV_LEN={kv_len} is not a multiple of Q_LEN={q_len}.")
    return Eagle3BlockMask(q_len, kv_len // q_len, block_size=block_size)(live)


def text_map(bm: BlockMask, q_len: int, kv_len: int) -> str:
    states = block_states(bm)
    q_bs, kv_bs = bm.BLOCK_SIZE
    n_q, n_kv = states.shape
    ruler = [" "] * n_kv
    for s in range(-(-kv_len // q_len)):
        ruler[s * q_len // kv_bs] = str((s + 1) % 10)
    width = max(len("round"), len(str(n_q * q_bs)))
    lines = [f"{'round':>{width}} " + "".join(ruler)]
    for qi in range(n_q):
        lines.append(f"{qi * q_bs:>{width}} " + "".join(_CHARS[int(c)] for c in states[qi]))
    counts = {name: int((states == v).sum()) for name, v in (("FULL", FULL), ("PARTIAL", PARTIAL), ("empty", EMPTY))}
    lines.append(f"# FULL {counts['FULL']}   + PARTIAL {counts['PARTIAL']}   . empty {counts['empty']}"
                 f"   ({n_q} x {n_kv} blocks of {q_bs}x{kv_bs}; rows start at the query shown)")
    return "\n".join(lines)


def dense_map(bm: BlockMask, q_len: int, kv_len: int) -> str:
    if q_len * kv_len > _DENSE_LIMIT:
        raise ValueError(f"--dense prints one char per (q, kv) pair: Q_LEN * KV_LEN = {q_len * kv_len} "
                         f"is over {_DENSE_LIMIT}. Use smaller sizes.")
    q = torch.arange(q_len).unsqueeze(-1)
    kv = torch.arange(kv_len).unsqueeze(0)
    allowed = bm.mask_mod(torch.zeros(()), torch.zeros(()), q, kv)  # [Q_LEN, KV_LEN]
    lines = []
    for row in allowed.tolist():
        chars = "".join("#" if a else "." for a in row)
        lines.append("|".join(chars[s:s + q_len] for s in range(0, kv_len, q_len)))
    return "\n".join(lines)


def save_png(bm: BlockMask, q_len: int, kv_len: int, path: str, size=(8.0, 4.0), dpi=100) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ModuleNotFoundError("--png needs matplotlib: pip install matplotlib") from e
    states = block_states(bm)
    q_bs, kv_bs = bm.BLOCK_SIZE
    n_q, n_kv = states.shape
    colors = ["#f4f4f4", "#f2a541", "#2b6cb0"]
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    ax.imshow(states.numpy(), cmap=ListedColormap(colors), vmin=0, vmax=2, aspect="auto",
              interpolation="nearest", extent=(0, n_kv * kv_bs, n_q * q_bs, 0))
    for s in range(1, -(-kv_len // q_len)):
        ax.axvline(s * q_len, color="black", linewidth=0.8, linestyle="--")
    ax.axvline(kv_len, color="red", linewidth=0.8)
    ax.set_xlabel("key position (tokens); dashed: round boundaries, red: KV_LEN")
    ax.set_ylabel("query position (tokens)")
    ax.set_title(f"Eagle3 block mask: Q_LEN={q_len}, KV_LEN={kv_len}, blocks {q_bs}x{kv_bs}")
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, ("empty", "PARTIAL", "FULL"))],
              loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compiled-mask-show", description=__doc__.splitlines()[0])
    parser.add_argument("--q-len", type=int, required=True)
    lengths = parser.add_mutually_exclusive_group(required=True)
    lengths.add_argument("--kv-len", type=int)
    lengths.add_argument("--rounds", type=int, help="KV_LEN = Q_LEN * rounds")
    parser.add_argument("--block-size", type=int, nargs="+", default=[128],
                        help="BLOCK or Q_BLOCK KV_BLOCK (default 128)")
    parser.add_argument("--live", type=int, help="live rounds of the static-width form")
    parser.add_argument("--dense", action="store_true", help="also print the token-level mask")
    parser.add_argument("--png", help="write a picture to this file (needs matplotlib)")
    args = parser.parse_args(argv)
    try:  # usage errors: one line and exit code 2, as argparse's own
        if len(args.block_size) not in (1, 2):
            raise ValueError(f"--block-size takes one or two ints, got {len(args.block_size)}.")
        block_size = (args.block_size * 2)[:2]
        kv_len = args.kv_len if args.kv_len is not None else args.q_len * args.rounds
        bm = build(args.q_len, kv_len, tuple(block_size), args.live)
        dense = dense_map(bm, args.q_len, kv_len) if args.dense else None
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    live = "" if args.live is None else f", live rounds {args.live}"
    print(f"Eagle3 block mask: Q_LEN={args.q_len}, KV_LEN={kv_len}{live}")
    print(text_map(bm, args.q_len, kv_len))
    if dense is not None:
        print(dense)
    if args.png:
        try:
            save_png(bm, args.q_len, kv_len, args.png)
        except ModuleNotFoundError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
