"""Train an Eagle3 draft model: on your target model and chat data, or on a synthetic target.

With --target-model: the draft for that Hugging Face model (a local directory with weights and a
tokenizer with a chat template), trained on JSON-lines conversations (ShareGPT or OpenAI shape),
checkpointed, exported to OUT/draft for SGLang and vLLM, and its acceptance length measured on
held-out conversations; the last line names OUT/draft and the final tau (docs/training.md).

Without --target-model: a smoke run on a synthetic target (a fixed random second-order Markov
chain and random hidden-state features), the whole TTT step (forward and backward) one compiled
graph; the last line is ``trained N steps: loss A -> B, graphs compiled: G``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from compiled_mask.draft.model import Eagle3DraftConfig, Eagle3DraftModel  # noqa: E402
from compiled_mask.draft.synthetic import SyntheticTarget  # noqa: E402
from compiled_mask.draft.trainer import progress_line  # noqa: E402
from compiled_mask.draft.unroll import Eagle3Model  # noqa: E402
from compiled_mask.inspect import GraphCounter  # noqa: E402

EXAMPLES = """\
examples:
  python tools/train.py                        # synthetic target, CPU: a small draft, ~1 minute
  python tools/train.py --target-model models/Llama-3.1-8B-Instruct --data sharegpt.jsonl \\
      --output-dir runs/llama31 --device cuda --q-len 8192 --steps 20000 --save-every 1000
  python tools/train.py ... --resume           # continue the run in --output-dir where it stopped
  python tools/train.py --device cuda --dtype bfloat16 --backend fa4 --q-len 8192 --hidden 4096 \\
      --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256 --draft-vocab 32000 \\
      --ttt-steps 7 --batch 1 --steps 100      # synthetic, Llama-3-8B-sized draft
  torchrun --nproc-per-node 2 tools/train.py --context-parallel allgather --steps 20   # CPU, gloo

Throughput of the whole loop with a random-weight Llama-3-8B target: tools/bench_train.py.
"""

# Defaults that differ between the synthetic smoke run and real data.
SYNTHETIC = dict(q_len=128, batch=4, ttt_steps=3, steps=400, lr=3e-3, draft_vocab=256)
REAL = dict(q_len=2048, batch=1, ttt_steps=7, steps=1000, lr=1e-4, draft_vocab=32000)
SYNTHETIC_ONLY = ("hidden", "intermediate", "heads", "kv_heads", "vocab", "batches", "context_parallel", "shard_order")
REAL_ONLY = ("data", "output_dir", "eval_data", "eval_conversations", "skip_malformed", "offline", "resume",
             "save_every", "keep_checkpoints", "accumulation", "warmup", "grad_clip", "weight_decay",
             "draft_intermediate_size", "draft_heads", "draft_kv_heads", "aux_layers", "init_from",
             "no_pack", "eval_every", "eval_k", "eval_tokens", "stop_after", "export_dtype")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        layers = []
    if len(layers) != 3 or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"must be three layer indices >= 0, e.g. 1,15,28; got {text!r}")
    return layers


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, epilog=EXAMPLES,
                                formatter_class=_Formatter)
    both = p.add_argument_group("both modes")
    both.add_argument("--device", default="cpu", help="cpu or cuda")
    both.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="parameter dtype (default: float32 on CPU, bfloat16 on CUDA; float16 is "
                           "refused: AdamW's eps is 0 in float16 and training turns NaN)")
    both.add_argument("--backend", default="split", choices=["split", "flex", "fa4"],
                      help="Eagle3Attention backend; on CPU only split can train (flex and fa4 have "
                           "no CPU backward)")
    both.add_argument("--q-len", type=_positive_int, default=None,
                      help="positions per row, Q_LEN (default: synthetic 128, real data 2048)")
    both.add_argument("--batch", type=_positive_int, default=None,
                      help="rows per (micro-)batch (default: synthetic 4, real data 1)")
    both.add_argument("--ttt-steps", type=_positive_int, default=None,
                      help="TTT steps unrolled per training step (default: synthetic 3, real data 7 "
                           "as Eagle3)")
    both.add_argument("--steps", type=_positive_int, default=None,
                      help="optimizer steps (default: synthetic 400, real data 1000)")
    both.add_argument("--lr", type=_positive_float, default=None,
                      help="peak learning rate (default: synthetic 3e-3, real data 1e-4)")
    both.add_argument("--draft-vocab", "--draft-vocab-size", dest="draft_vocab", type=_positive_int,
                      default=None, help="draft vocabulary size (default: synthetic 256, real data "
                                         "32000, the most frequent training tokens)")
    both.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    both.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "none"],
                      help="torch.compile backend of the training step ('none': eager)")
    both.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads for torch (default on CPU: 1; the small draft gains little "
                           "from more, and on a busy machine more threads wait on each other)")

    real = p.add_argument_group("real data (--target-model)")
    real.add_argument("--target-model", default=None,
                      help="local Hugging Face model directory of the target (weights, config, "
                           "tokenizer with a chat template); enables this mode")
    real.add_argument("--data", default=None, help="training conversations, JSON lines (ShareGPT "
                      "'conversations: [{from, value}]' or OpenAI 'messages: [{role, content}]')")
    real.add_argument("--output-dir", default=None,
                      help="checkpoints/, train_log.jsonl, train_curves.png and the exported draft/")
    real.add_argument("--eval-data", default=None,
                      help="held-out conversations for tau (default: the last --eval-conversations "
                           "of --data, not trained on)")
    real.add_argument("--eval-conversations", type=_non_negative_int, default=8,
                      help="conversations of --data held out when there is no --eval-data")
    real.add_argument("--skip-malformed", action="store_true",
                      help="skip malformed lines of --data (counted and printed) instead of stopping "
                           "at the first with its file and line")
    real.add_argument("--offline", action="store_true",
                      help="precompute the target's hidden states to OUT/features (safetensors "
                           "shards) first, then train from disk")
    real.add_argument("--no-pack", action="store_true",
                      help="one conversation per row (default: several per row, as documents)")
    real.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                      help="continue from the latest checkpoint in OUT/checkpoints (or from "
                           "CHECKPOINT, a step directory): weights, optimizer, schedule, data "
                           "position and random state, as if never stopped")
    real.add_argument("--save-every", type=_non_negative_int, default=0,
                      help="checkpoint every N steps (0: only at the end)")
    real.add_argument("--keep-checkpoints", type=_positive_int, default=2,
                      help="checkpoints kept (older ones are deleted after a new one is written)")
    real.add_argument("--accumulation", type=_positive_int, default=1,
                      help="micro-batches per optimizer step (gradient accumulation)")
    real.add_argument("--warmup", type=_non_negative_int, default=None,
                      help="linear warmup steps before the cosine decay (default: 1.5%% of --steps)")
    real.add_argument("--grad-clip", type=float, default=0.5, help="max gradient norm (0: none)")
    real.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    real.add_argument("--draft-intermediate-size", type=_positive_int, default=None,
                      help="draft MLP width (default: the target's)")
    real.add_argument("--draft-heads", type=_positive_int, default=None,
                      help="draft attention heads (default: the target's)")
    real.add_argument("--draft-kv-heads", type=_positive_int, default=None,
                      help="draft K/V heads (default: the target's)")
    real.add_argument("--aux-layers", type=_layers, default=None,
                      help="the three target layers whose outputs the draft reads, e.g. 1,15,28 "
                           "(default: 1, L/2-1, L-4 as SpecForge)")
    real.add_argument("--init-from", default=None,
                      help="an exported Eagle3 draft (this tool's, SpecForge's or TorchSpec's) to "
                           "fine-tune; its sizes and vocabulary are kept")
    real.add_argument("--eval-every", type=_non_negative_int, default=0,
                      help="measure tau on the held-out conversations every N steps (0: at the end)")
    real.add_argument("--eval-k", type=_positive_int, default=None,
                      help="draft tokens per verification for tau (default: --ttt-steps)")
    real.add_argument("--eval-tokens", type=_positive_int, default=64,
                      help="tokens generated per held-out prompt for tau")
    real.add_argument("--export-dtype", default=None, choices=["float32", "bfloat16"],
                      help="dtype of the exported weights (default: the training dtype)")
    real.add_argument("--stop-after", type=_positive_int, default=None,
                      help="stop after N steps as a killed run would (no final checkpoint or export); "
                           "for trying --resume")

    synth = p.add_argument_group("synthetic target (no --target-model)")
    synth.add_argument("--hidden", type=_positive_int, default=96, help="draft hidden size")
    synth.add_argument("--intermediate", type=_positive_int, default=256, help="draft MLP width")
    synth.add_argument("--heads", type=_positive_int, default=4, help="draft attention heads")
    synth.add_argument("--kv-heads", type=_positive_int, default=2, help="draft K/V heads")
    synth.add_argument("--vocab", type=_positive_int, default=512, help="target vocabulary size")
    synth.add_argument("--batches", type=_positive_int, default=16,
                       help="distinct synthetic batches, cycled (generated up front)")
    synth.add_argument("--context-parallel", default=None, choices=["ulysses", "allgather"],
                       help="shard each sequence over the ranks of a torchrun launch, with FSDP2 "
                            "over the same ranks (gloo on CPU, NCCL on CUDA, one GPU per rank); "
                            "ulysses needs --heads and --kv-heads divisible by the ranks; "
                            "allgather takes --backend split only")
    synth.add_argument("--shard-order", default="zigzag", choices=["zigzag", "contiguous"],
                       help="context parallel: which positions each rank holds")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """Refuse what cannot work before anything is loaded or compiled (one line each)."""
    real = args.target_model is not None
    given = {a.dest for a in parser._actions for opt in a.option_strings
             if any(arg == opt or arg.startswith(opt + "=") for arg in argv)}
    if real:
        misplaced = [d for d in SYNTHETIC_ONLY if d in given]
        if misplaced:
            parser.error(f"--{misplaced[0].replace('_', '-')} is for the synthetic target; with "
                         f"--target-model the draft takes the target's sizes (see --draft-* options)")
        for name in ("data", "output_dir"):
            if getattr(args, name) is None:
                parser.error(f"--target-model needs --{name.replace('_', '-')}")
    else:
        misplaced = [d for d in REAL_ONLY if d in given]
        if misplaced:
            parser.error(f"--{misplaced[0].replace('_', '-')} needs --target-model (real data)")
    if args.dtype == "float16":
        parser.error("--dtype float16 is not supported: AdamW's eps (1e-8) is 0 in float16, so the first "
                     "step turns the weights into NaN; use --dtype bfloat16 (GPUs) or float32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use "
                     f"--device cpu")
    if not args.device.startswith(("cpu", "cuda")):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.backend != "split" and args.device == "cpu":
        parser.error(f"--backend {args.backend} cannot train on CPU (torch's flex_attention has no CPU "
                     f"backward{'; FA4 needs an NVIDIA GPU' if args.backend == 'fa4' else ''}); use "
                     f"--backend split (the default) on CPU, or --device cuda")
    if args.context_parallel == "allgather" and args.backend != "split":
        parser.error("--context-parallel allgather takes --backend split only")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args, argv)
    defaults = REAL if args.target_model else SYNTHETIC
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.target_model:
        return train_real(args)
    return train_synthetic(parser, args)


def train_real(args: argparse.Namespace) -> int:
    """The real-data mode: compiled_mask.draft.pipeline.run with the flags."""
    from compiled_mask.draft.checkpoint import CheckpointError
    from compiled_mask.draft.data import DataError
    from compiled_mask.draft.pipeline import RunConfig, run

    config = RunConfig(
        target_model=args.target_model, data=args.data, output_dir=args.output_dir,
        eval_data=args.eval_data, eval_conversations=args.eval_conversations,
        skip_malformed=args.skip_malformed, q_len=args.q_len, batch=args.batch,
        accumulation=args.accumulation, steps=args.steps, lr=args.lr, warmup=args.warmup,
        grad_clip=args.grad_clip, weight_decay=args.weight_decay, ttt_steps=args.ttt_steps,
        draft_vocab_size=args.draft_vocab, draft_intermediate_size=args.draft_intermediate_size,
        draft_heads=args.draft_heads, draft_kv_heads=args.draft_kv_heads, aux_layers=args.aux_layers,
        init_from=args.init_from, offline=args.offline, packed=not args.no_pack, device=args.device,
        dtype=args.dtype, backend=args.backend, compiler=args.compiler, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, eval_every=args.eval_every,
        eval_k=args.eval_k, eval_tokens=args.eval_tokens, seed=args.seed, stop_after=args.stop_after,
        export_dtype=args.export_dtype)
    try:
        run(config)
    except (DataError, CheckpointError, FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


def local_batch(batch: tuple[torch.Tensor, ...], q_len: int, world_size: int, rank: int,
                shard_order: str) -> tuple[torch.Tensor, ...]:
    """A rank's part of a global batch, as Eagle3Model with sequence=ContextParallel() takes it: hidden states and
    target probabilities sharded, ids and loss mask global. Rank 0's batch: every rank generates
    the same one from the same seed, and the broadcast rules out a last-bit difference between
    devices."""
    import torch.distributed as dist

    from compiled_mask.distributed import shard_sequence

    input_ids, hidden, target, loss_mask = batch
    for t in (input_ids, hidden, target):
        dist.broadcast(t, 0)
    shard = lambda x: shard_sequence(x, q_len, world_size, rank, shard_order, dim=1)  # noqa: E731
    return input_ids, shard(hidden), shard(target), loss_mask


def context_parallel_model(draft: Eagle3DraftModel, args: argparse.Namespace, device: torch.device,
                           dtype: torch.dtype, world_size: int) -> torch.nn.Module:
    """The synthetic run's context-parallel wiring: Eagle3Model with the ContextParallel sequence
    strategy, under FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from compiled_mask.draft.context_parallel import ContextParallel

    model = Eagle3Model(draft, args.q_len, args.ttt_steps, attention_backend=args.backend,
                        sequence=ContextParallel(mode=args.context_parallel, shard_order=args.shard_order))
    model.to(device, dtype)
    # One FSDP unit: the draft's modules run once per TTT step, not once per forward as
    # per-module units assume, and the draft is a single layer. Gradients are averaged over the
    # ranks (FSDP's default), which the strategy's losses expect.
    fully_shard(model, mesh=init_device_mesh(device.type, (world_size,)))
    return model


def train_synthetic(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The synthetic smoke run (and its context-parallel launch under torchrun)."""
    device = torch.device(args.device)
    rank, world_size = 0, 1
    if args.context_parallel:
        import torch.distributed as dist

        if "LOCAL_RANK" not in os.environ:
            parser.error("--context-parallel runs one process per rank: launch with torchrun, e.g. "
                         "torchrun --nproc-per-node 2 tools/train.py --context-parallel allgather")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float32 if device.type == "cpu" else torch.bfloat16)
    torch.manual_seed(args.seed)
    if args.draft_vocab > args.vocab:
        parser.error(f"--draft-vocab {args.draft_vocab} exceeds --vocab {args.vocab}; the draft "
                     f"vocabulary is a subset of the target's")
    try:
        config = Eagle3DraftConfig(
            hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab, draft_vocab_size=args.draft_vocab, rope_theta=10000.0)
    except ValueError as e:
        parser.error(str(e))
    draft = Eagle3DraftModel(config)  # the same weights on every rank (the same seed)
    draft.freeze_embedding()
    if args.context_parallel:
        model = context_parallel_model(draft, args, device, dtype, world_size)
    else:
        model = Eagle3Model(draft, args.q_len, args.ttt_steps, attention_backend=args.backend)
        model.to(device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / args.steps)))

    data = SyntheticTarget(args.vocab, args.draft_vocab, args.hidden, device, seed=args.seed)
    batches = [data.batch(args.batch, args.q_len, dtype) for _ in range(args.batches)]
    if args.context_parallel:
        batches = [local_batch(batches.pop(0), args.q_len, world_size, rank, args.shard_order)
                   for _ in range(args.batches)]  # each global batch dropped once sharded
    n_params = sum(p.numel() for p in params)
    cp = (f"; context parallel {args.context_parallel!r} ({args.shard_order}) over {world_size} ranks, FSDP2"
          if args.context_parallel else "")
    say(f"Eagle3 draft: hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, draft vocab "
        f"{args.draft_vocab}, {n_params / 1e6:.2f}M trainable; Q_LEN {args.q_len} x batch "
        f"{args.batch}, {args.ttt_steps} TTT steps, backend {args.backend!r}, {device.type} "
        f"{str(dtype).removeprefix('torch.')}, torch {torch.__version__}{cp}")
    say(f"loss floor (the target's entropy): {data.entropy():.3f}; start ~ln({args.draft_vocab}) = "
        f"{math.log(args.draft_vocab):.3f}", flush=True)

    counter = GraphCounter(args.compiler) if args.compiler != "none" else None
    step_fn = model if counter is None else torch.compile(model, backend=counter, fullgraph=True)
    tty = sys.stdout.isatty()
    losses: list[float] = []
    tokens = args.batch * args.q_len
    t_start = time.perf_counter()
    timed_tokens, timed_s = 0, 0.0
    for step in range(args.steps):
        if step == 0 and counter is not None:
            estimate = "~1 min" if device.type == "cpu" else "~1-2 min"
            say(f"compiling the training step (first step only, {estimate})...", flush=True)
        t0 = time.perf_counter()
        out = step_fn(*batches[step % len(batches)])
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()  # syncs: the step is done
        dt = time.perf_counter() - t0
        if step == 0 and counter is not None:
            say(f"compiled in {dt:.1f} s ({counter.graphs} graph)", flush=True)
        else:
            timed_tokens, timed_s = timed_tokens + tokens, timed_s + dt
        losses.append(loss)
        last = step == args.steps - 1
        if last or (step > 0 and (tty or step % max(1, args.steps // 10) == 0)):
            acces = out.acces.tolist()
            line = progress_line(step + 1, args.steps, loss, acces, timed_tokens / max(timed_s, 1e-9))
            say(("\r" + line) if tty else line, end="" if tty and not last else "\n", flush=True)
    total = time.perf_counter() - t_start
    k = max(1, args.steps // 20)
    first, final = sum(losses[:k]) / k, sum(losses[-k:]) / k
    graphs = counter.graphs if counter is not None else 0
    say(f"time {total:.1f} s; loss averaged over the first and last {k} steps")
    say(f"trained {args.steps} steps: loss {first:.3f} -> {final:.3f}, graphs compiled: {graphs}")
    if args.context_parallel:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
