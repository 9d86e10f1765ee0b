"""Throughput of the whole online training loop: target forward, draft step, optimizer.

A target with random weights and a named model's sizes (no download; default Llama-3-8B), random
token rows, and the same loop ``tools/train.py --target-model`` runs (OnlineBatches + Trainer):
per optimizer step the target's forward over the rows' documents (its auxiliary and last hidden
states: the soft target goes to the draft as ``TargetHead``), the compiled TTT step (forward and
backward), clipping and AdamW. The device is synchronised between the phases, so their times add
up to the step. Prints a table.

    python tools/bench_train.py --device cuda                       # Llama-3-8B target, Q_LEN 8192, 7 TTT steps
    python tools/bench_train.py --device cuda --profile prof/        # also a torch.profiler trace
    python tools/bench_train.py --target llama-tiny --q-len 64 --steps 3 --compiler none   # CPU check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/train.py
from compiled_mask.draft.batches import OnlineBatches  # noqa: E402
from compiled_mask.draft.data import Document  # noqa: E402
from compiled_mask.draft.model import Eagle3DraftConfig, Eagle3DraftModel  # noqa: E402
from compiled_mask.draft.target import RANDOM_TARGETS, TargetModel  # noqa: E402
from compiled_mask.draft.trainer import TrainConfig, Trainer  # noqa: E402
from compiled_mask.draft.unroll import Eagle3Model  # noqa: E402
from train import _positive_int  # noqa: E402  (tools/train.py's flags' type)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="llama3-8b", choices=sorted(RANDOM_TARGETS),
                   help="sizes of the random-weight target (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--q-len", type=_positive_int, default=8192, help="positions per row (default: %(default)s)")
    p.add_argument("--batch", type=_positive_int, default=1, help="rows per step (default: %(default)s)")
    p.add_argument("--docs-per-row", type=_positive_int, default=1,
                   help="documents packed per row (default: %(default)s: one sequence of Q_LEN + 1 tokens)")
    p.add_argument("--layout", default="doc_ids", choices=["doc_ids", "seq_lens", "none"],
                   help="how rows reach the step: doc_ids (as real data, packed documents), seq_lens, or "
                        "none (one full sequence per row; needs --docs-per-row 1) (default: %(default)s)")
    p.add_argument("--ttt-steps", type=_positive_int, default=7, help="TTT steps (default: %(default)s)")
    p.add_argument("--draft-vocab", type=_positive_int, default=None,
                   help="draft vocabulary size (default: 32000, or the target's vocabulary if smaller)")
    p.add_argument("--backend", default="split", choices=["split", "flex", "fa4"], help="(default: %(default)s)")
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "none"],
                   help="the draft step's torch.compile backend (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup-steps", type=_positive_int, default=3,
                   help="untimed steps first, compilation included (default: %(default)s)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also record 3 steps with torch.profiler: DIR/trace.json and the top kernels")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if device.type == "cpu" and args.backend != "split":
        p.error(f"--backend {args.backend} cannot train on CPU; use split")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.q_len % args.docs_per_row or args.q_len // args.docs_per_row < 2:
        p.error("--docs-per-row must divide --q-len into documents of at least 2 positions")
    if args.layout != "doc_ids" and args.docs_per_row != 1:
        p.error(f"--layout {args.layout} holds one document per row: use --docs-per-row 1")

    t0 = time.perf_counter()
    target = TargetModel.random(args.target, device=device, dtype=dtype)
    if args.draft_vocab is None:
        args.draft_vocab = min(32000, target.vocab_size)
    if args.draft_vocab > target.vocab_size:
        p.error(f"--draft-vocab {args.draft_vocab} exceeds the target's vocabulary {target.vocab_size}")
    tc = target.config
    config = Eagle3DraftConfig(hidden_size=target.hidden_size, intermediate_size=int(tc.intermediate_size),
                               num_attention_heads=int(tc.num_attention_heads),
                               num_key_value_heads=int(tc.num_key_value_heads), vocab_size=target.vocab_size,
                               draft_vocab_size=args.draft_vocab, rope_theta=target.rope_theta)
    draft = Eagle3DraftModel(config)
    draft.freeze_embedding()
    draft_to_target = torch.arange(args.draft_vocab)
    draft.set_vocab_mapping(draft_to_target)
    model = Eagle3Model(draft, args.q_len, args.ttt_steps, attention_backend=args.backend).to(device, dtype)

    # Random rows: docs_per_row documents of q_len / docs_per_row positions (+1 token) each.
    g = torch.Generator().manual_seed(0)
    n_rows = args.batch * 2
    per_doc = args.q_len // args.docs_per_row + 1
    docs, rows = [], []
    for _ in range(n_rows):
        row = []
        for _ in range(args.docs_per_row):
            ids = torch.randint(target.vocab_size, (per_doc,), generator=g)
            docs.append(Document(ids, torch.ones(per_doc, dtype=torch.bool)))
            row.append(len(docs) - 1)
        rows.append(row)
    batches = OnlineBatches(docs, rows, target, draft_to_target, args.q_len, args.batch,
                            dtype, packed=args.layout == "doc_ids")
    if args.layout == "none":  # the rows are full: the same batches without a layout tensor
        get = batches.get
        batches.get = lambda i: get(i)._replace(seq_lens=None)
    trainer = Trainer(model, batches, TrainConfig(steps=args.warmup_steps + args.steps, lr=1e-4,
                                                  compiler=args.compiler), sync_timing=True)
    n_params = sum(p.numel() for p in trainer.params)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"target: random {args.target} ({target.num_layers} layers, hidden {target.hidden_size}, vocab "
          f"{target.vocab_size}), draft: {n_params / 1e6:.0f}M trainable, draft vocab {args.draft_vocab}; "
          f"Q_LEN {args.q_len} x batch {args.batch} ({args.docs_per_row} document(s) per row, layout "
          f"{args.layout}), "
          f"{args.ttt_steps} TTT steps, backend {args.backend!r}, compiler {args.compiler!r}, "
          f"{str(dtype).removeprefix('torch.')}, {card}, torch {torch.__version__}; built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    for i in range(args.warmup_steps):
        t = time.perf_counter()
        trainer.train_step()
        print(f"warm-up step {i + 1}/{args.warmup_steps}: {time.perf_counter() - t:.1f} s"
              + (f" (compiled {trainer.graphs} graph)" if i == 0 and trainer.graphs else ""), flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = [trainer.train_step() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731  ms
    data = med([r.data_s for r in results])
    step = med([r.step_s for r in results])
    optim = med([r.optim_s for r in results])
    total = med([r.data_s + r.step_s + r.optim_s for r in results])
    tokens = results[0].tokens
    rows_out = [("target forward (hidden states, TargetHead)", data),
                ("draft TTT step, forward + backward (one graph)", step),
                ("clip + AdamW (fp32 master weights)" if dtype != torch.float32 else "clip + AdamW", optim),
                ("whole loop", total)]
    print(f"\n{args.steps} steps, medians ({tokens} tokens per step; peak {peak:.1f} GiB):\n")
    print(f"| {'phase':<48} | {'ms/step':>9} | {'share':>6} | {'tokens/s':>10} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 8}|{'-' * 12}|")
    for name, ms in rows_out:
        print(f"| {name:<48} | {ms:9.1f} | {ms / total:6.1%} | {tokens / (ms / 1e3):10,.0f} |")
    print(f"\nwhole loop: {tokens / (total / 1e3):,.0f} tokens/s on {card}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                trainer.train_step()
        prof.export_chrome_trace(str(out / "trace.json"))
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
        print(f"trace: {out / 'trace.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
