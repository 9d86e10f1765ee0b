"""Demo: an Eagle3 TTT loop through a small compiled draft layer that uses Eagle3Attention.

Each step writes its round of keys/values into a static buffer and attends over the live rounds;
the whole step (projections, buffer write, mask build, attention) is one compiled graph, and the
same graph serves every step. Every step is checked against create_block_mask + eager
flex_attention on the truncated keys.

    python tools/demo.py                 # CPU by default, CUDA when present
    python tools/demo.py --q-len 1000 --rounds 7 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from compiled_mask import Eagle3BlockMask, eagle3_mask_mod  # noqa: E402
from compiled_mask.examples import DraftLayer  # noqa: E402
from compiled_mask.inspect import GraphCounter  # noqa: E402


def reference_step(model: DraftLayer, x: Tensor, k_buf: Tensor, v_buf: Tensor, r: int) -> Tensor:
    """The same step with create_block_mask + eager flex_attention on the live keys only."""
    q, _, _ = model.project(x)
    kv_len = model.q_len * r
    block_mask = create_block_mask(eagle3_mask_mod(model.q_len), None, None, model.q_len, kv_len,
                                   device=x.device, BLOCK_SIZE=model.attn.block_size_for(x.device))
    with warnings.catch_warnings():  # eager flex on purpose: it evaluates mask_mod densely
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = flex_attention(q, k_buf[:, :, :kv_len], v_buf[:, :, :kv_len],
                             block_mask=block_mask, enable_gqa=True)
    return model.finish(x, out)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch {torch.__version__} sees no CUDA device here. "
                         "Use --device cpu.")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--q-len", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--block-size", type=int, nargs="+", default=None,
                        help="Q_BLOCK_SIZE [KV_BLOCK_SIZE]; default: the backend's")
    parser.add_argument("--backend", default="flex")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:  # usage errors: one line and exit code 2, as argparse's own
        block_size = args.block_size and (
            tuple(args.block_size) if len(args.block_size) == 2 else args.block_size[0])
        device = _device(args.device)
        dtype = getattr(torch, args.dtype)
        model = DraftLayer(args.q_len, args.rounds, args.hidden, args.heads, args.kv_heads,
                           block_size, args.backend).to(device, dtype)
        masks = Eagle3BlockMask(args.q_len, args.rounds, block_size=model.attn.block_size_for(device))
    except (ValueError, NotImplementedError, ImportError) as e:  # ImportError: FA4 missing or too old
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)

    x = torch.randn(args.batch, args.q_len, args.hidden, device=device, dtype=dtype)
    kv_shape = (args.batch, args.kv_heads, args.q_len * args.rounds, model.head_dim)
    k_buf = torch.zeros(kv_shape, device=device, dtype=dtype)
    v_buf = torch.zeros(kv_shape, device=device, dtype=dtype)
    print(f"Eagle3 TTT demo: Q_LEN={args.q_len}, rounds 1..{args.rounds}, batch={args.batch}, "
          f"heads={args.heads}/{args.kv_heads}, block={model.attn.block_size_for(device)}, "
          f"backend={args.backend}, "
          f"device={device}, dtype={args.dtype}, torch {torch.__version__}")
    print(f"{'rounds':>6} {'FULL':>5} {'PARTIAL':>7} {'max |diff|':>11} {'step ms':>9}")

    start = time.perf_counter()
    worst = 0.0
    with torch.no_grad():  # flex_attention has no backward on CPU
        for r in range(1, args.rounds + 1):
            if r == 1:
                print("compiling the step (first step only; can take a minute on a small CPU)...",
                      flush=True)
            rounds = torch.tensor(r, device=device)
            t0 = time.perf_counter()
            x_next, k_buf, v_buf = compiled(x, k_buf, v_buf, rounds)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_ms = (time.perf_counter() - t0) * 1e3
            diff = (x_next - reference_step(model, x, k_buf, v_buf, r)).abs().max().item()
            worst = max(worst, diff)
            bm = masks(r, device=device)
            full, partial = bm.full_kv_num_blocks.sum().item(), bm.kv_num_blocks.sum().item()
            print(f"{r:>6} {full:>5} {partial:>7} {diff:>11.2e} {step_ms:>9.1f}")
            x = x_next
    elapsed = time.perf_counter() - start
    print(f"graphs compiled: {counter.graphs} (expected 1 for all {args.rounds} steps)")
    print(f"max |diff| vs create_block_mask + eager flex_attention: {worst:.2e}")
    print(f"time: {elapsed:.1f} s (the first step includes the compile)")
    return 0 if counter.graphs == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
