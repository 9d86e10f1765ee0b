"""Benchmarks: mask build and attention per TTT step, against create_block_mask and the causal floor.

    python tools/bench.py                 # full run (GPU), under 10 minutes on an H100/H200
    python tools/bench.py --quick         # a subset, under 5 minutes
    python tools/bench.py --smoke         # tiny sizes on whatever device (CI runs this on CPU)
    python tools/bench.py --out DIR       # where bench.json / bench.md / bench.png go

Four tables, one run, all rows side by side; each is a module of tools/benchmarks/ whose
docstring says what it measures and how:
1. mask build (``mask.py``): compiled_mask's op against create_block_mask, and a batch with
   seq_lens and doc_ids;
2. attention per TTT step, mask + attention, fwd and fwd+bwd, against the causal floor, and the
   padded and packed batches (``attention.py``); the split backend's suffix ops alone
   (``suffix.py``, ``--only suffix``);
3. compile cost (``compile_cost.py``): cold compile time and graph count of a TTT loop;
4. draft training step (``draft.py``, ``--only draft``, not in the default run): one whole Eagle3
   TTT training step against the way trainers do it today.

Timing, inputs, the card's peaks and the output (row lines, bench.md's tables, bench.png) are
``common.py``'s. This file is the command line: it parses the arguments, runs the tables asked
for, and writes bench.md, bench.json, bench.png and (``--profile``) profile.txt to ``--out``. The
compile and draft rows run in fresh processes of this file (``--compile-row``, ``--draft-row``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tables: tools/benchmarks/
from benchmarks import attention, common, compile_cost, draft, mask, suffix  # noqa: E402
from compiled_mask._fa4 import fa4_available  # noqa: E402
from train import _positive_int  # noqa: E402  (tools/train.py's flags' type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a subset, under 5 minutes on a GPU")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    parser.add_argument("--only", choices=list(common.TABLES), nargs="+", default=common.DEFAULT_TABLES,
                        help="tables to run (default: all but 'draft': 8 rows of a minute or two each)")
    parser.add_argument("--backends", nargs="+", choices=["flex", "split", "fa4"],
                        help="Eagle3Attention backends to time (default: all that can run here)")
    parser.add_argument("--grad-mode", choices=[*attention.GRAD_MODES, "both"], default="both",
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
    parser.add_argument("--draft-reps", type=_positive_int, default=None,
                        help="timed steps per draft row, after a cold and a warm one (default: 5; --smoke: 2)")
    parser.add_argument("--draft-methods", nargs="+", type=draft._draft_method, default=None,
                        help="draft-table rows: 'today' or BACKEND:MEMORY:TARGET, e.g. split:recompute:head "
                             f"(default: {' '.join(draft.DRAFT_METHODS)}; --smoke: split:auto:probs split:auto:head)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if args.compile_row:
        print(json.dumps(compile_cost.compile_row(json.loads(args.compile_row))))
        return 0
    if args.draft_row:
        print(json.dumps(draft.draft_row(json.loads(args.draft_row))))
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
    grad_modes = attention.GRAD_MODES if args.grad_mode == "both" else [args.grad_mode]
    passes = [("fwd", None)] + [("fwd+bwd", m) for m in grad_modes]
    long_q_lens = [32768, 65536] if args.long and not args.smoke else []
    peaks = common.card_peaks(device, args.peak_tflops, args.peak_tbps)

    env = common.environment(device)
    env["peaks"] = peaks
    print("environment:", json.dumps(env), flush=True)
    rows: list[dict] = []
    failed = 0
    if "mask_build" in args.only:
        rows += mask.mask_build_rows(device, q_lens, rounds_list, blocks, reps)
        if not args.smoke:  # the Blackwell layout, on a subset
            rows += mask.mask_build_rows(device, [32768], [8], [(256, 128)], reps)
        rows += mask.layout_build_rows(device, att["q_len"], max(att["rounds_list"]),
                                       8 if not args.smoke else 2, reps)
    # The attention and suffix tables: (Q_LEN, rounds, reps, prebuilt create_block_mask row) each.
    att_runs = [(n, att["rounds_list"], att["reps"], True) if n == att["q_len"] else (n, [7], 5, False)
                for n in (args.q_lens or [att["q_len"]]) + long_q_lens]  # long: no create_block_mask row
    if "suffix" in args.only:  # first: its checks say whether the kernels timed below are right
        for q_len, rounds_list, reps_, _ in att_runs:
            got, bad = suffix.suffix_rows(device, dtype, q_len, rounds_list, att["heads"], att["D"], reps_,
                                          peaks, sweep=args.suffix_sweep)
            rows += got
            failed += bad
    if "attention" in args.only:
        for q_len, rounds_list, reps_, prebuilt in att_runs:
            rows += attention.attention_rows(device, dtype, q_len, rounds_list, att["heads"], att["D"],
                                             backends, reps_, passes, peaks, prebuilt=prebuilt)
    if "padding" in args.only:
        rows += attention.padding_rows(device, dtype, att["q_len"], max(att["rounds_list"]), att["heads"],
                                       att["D"], 8 if not args.smoke else 2, att["reps"])
    if "documents" in args.only:
        rows += attention.document_rows(device, dtype, att["q_len"], max(att["rounds_list"]), att["heads"],
                                        att["D"], 2 if not args.smoke else 1, backends, att["reps"])
    if "compile" in args.only:
        rows += compile_cost.compile_rows(device, dtype, att["q_len"] if not args.smoke else 128,
                                          8 if not args.smoke else 3, att["heads"], att["D"], backends,
                                          backward=device.type == "cuda")
    draft_profiles = [] if args.profile else None
    if "draft" in args.only:
        q_lens_draft = args.draft_q_lens or ([64] if args.smoke else [8192, 32768])
        methods = args.draft_methods or (draft.DRAFT_METHODS[1:] if args.smoke else draft.DRAFT_METHODS)
        rows += draft.draft_rows(device, q_lens_draft, methods, length=3 if args.smoke else 7,
                                 smoke=args.smoke, reps=args.draft_reps or (2 if args.smoke else 5),
                                 profiles=draft_profiles)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        # The attention step's kernels, unless only the draft step was asked for; then the draft's.
        text = "" if args.only == ["draft"] else attention.profile_text(
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
               + common.markdown(rows))
    (args.out / "bench.md").write_text(md_text)
    (args.out / "bench.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    plotted = common.plot(rows, args.out / "bench.png")
    print(md_text)
    print(f"wrote {args.out}/bench.md, bench.json" + (", bench.png" if plotted else ""))
    if failed:
        print(f"{failed} suffix kernel check(s) failed: see the 'check' column", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
