"""Train an Eagle3 draft on synthetic data: the whole TTT step (7 draft steps, forward and
backward) as one compiled graph.

    python tools/train.py                       # CPU: a small draft, about two minutes
    python tools/train.py --device cuda --dtype bfloat16 --backend fa4 --q-len 8192 \\
        --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256 \\
        --draft-vocab 32000 --ttt-steps 7 --batch 1 --steps 100      # Llama-3-8B-sized draft

Context parallel (each sequence sharded over the ranks, FSDP2 over the same ranks), launched with
torchrun; the same flags otherwise, rank 0 prints:

    torchrun --nproc-per-node 2 tools/train.py --context-parallel allgather --steps 20   # CPU, gloo
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 \\
        tools/train.py --device cuda --context-parallel ulysses ...  # one GPU per rank, NCCL

The data come from a fixed random "target model": a second-order Markov chain whose next-token
distribution depends on the last two tokens through low-rank tables, and whose three auxiliary
hidden states at position t are fixed random features of tokens t and t - 1. The draft sees the
hidden states of position t and the embedding of token t + 1, and must predict the chain's
distribution of token t + 2; at TTT step s it must carry the token of step s - 1 itself (through
its hidden states and its own K/V round), as Eagle3 drafts do. The loss starts near
ln(draft vocabulary) and falls toward the chain's entropy (printed first).

Prints a progress bar with the loss, per-step accuracy and tokens/s, and as its last line
``trained N steps: loss A -> B, graphs compiled: G``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from compiled_mask import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model  # noqa: E402
from compiled_mask.distributed import shard_sequence  # noqa: E402
from compiled_mask.draft.context_parallel import Eagle3ContextParallelModel  # noqa: E402
from compiled_mask.inspect import GraphCounter  # noqa: E402


class SyntheticTarget:
    """A fixed random target model: token sequences, auxiliary hidden states and next-token
    distributions, all from low-rank tables (so the 8B-sized vocabulary stays small in memory).

    Args:
        vocab: token ids ``[0, vocab)``; the draft vocabulary is ``[0, draft_vocab)`` and the
            chain only emits those (so every target is in the draft vocabulary).
        draft_vocab: tokens the chain emits.
        hidden: width of each auxiliary hidden state.
        rank: rank of the tables; sharpness: scale of the chain's logits (higher: lower entropy).
    """

    def __init__(self, vocab: int, draft_vocab: int, hidden: int, device: torch.device,
                 seed: int = 0, rank: int = 32, sharpness: float = 16.0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
        self.draft_vocab, self.device = draft_vocab, device
        self.last = randn(draft_vocab, rank) / math.sqrt(rank)  # token t -> its part of logits t+1
        self.prev = randn(draft_vocab, rank) / math.sqrt(rank)  # token t-1 -> its part
        self.out = randn(draft_vocab, rank) * (sharpness / math.sqrt(rank))
        self.feat = randn(vocab, rank)  # token features of the hidden states
        self.proj = randn(2, rank, 3 * hidden) / math.sqrt(rank)  # [token t, token t-1] -> 3 aux states
        self.gen = torch.Generator(device=device).manual_seed(seed + 1)

    def logits(self, tok: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[..., draft_vocab]`` given tokens t and t - 1."""
        return (self.last[tok] + self.prev[prev]) @ self.out.T

    def batch(self, B: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """One batch aligned for Eagle3Model: ``input_ids, hidden_states, target, loss_mask``."""
        n = T + 2  # positions 0..T+1: position t's target is token t + 2
        toks = torch.empty(B, n, dtype=torch.long, device=self.device)
        toks[:, :2] = torch.randint(0, self.draft_vocab, (B, 2), generator=self.gen, device=self.device)
        for t in range(2, n):
            p = self.logits(toks[:, t - 1], toks[:, t - 2]).softmax(-1)  # [B, V]
            toks[:, t] = torch.multinomial(p, 1, generator=self.gen).squeeze(-1)
        prev = torch.cat([toks[:, :1], toks[:, :-1]], dim=1)  # token t - 1 ([B, n])
        hidden = self.feat[toks[:, :T]] @ self.proj[0] + self.feat[prev[:, :T]] @ self.proj[1]  # [B, T, 3H]
        # The distribution of token t + 2 given tokens t + 1 and t (what step 0 predicts at t).
        target = self.logits(toks[:, 1 : T + 1], toks[:, :T]).softmax(-1)  # [B, T, V]
        loss_mask = torch.ones(B, T, dtype=torch.bool, device=self.device)
        # Probabilities in the parameter dtype (the loss upcasts them): half the memory in bf16.
        return toks[:, 1 : T + 1], hidden.to(dtype), target.to(dtype), loss_mask

    def entropy(self, B: int = 8, T: int = 256) -> float:
        """Mean entropy of the chain's next-token distribution (the loss floor), in nats."""
        _, _, p, _ = self.batch(B, T, torch.float32)
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()


def local_batch(batch: tuple[torch.Tensor, ...], q_len: int, world_size: int, rank: int,
                layout: str) -> tuple[torch.Tensor, ...]:
    """A rank's part of a global batch, as Eagle3ContextParallelModel takes it: hidden states and
    target probabilities sharded, ids and loss mask global. Rank 0's batch: every rank generates
    the same one from the same seed, and the broadcast rules out a last-bit difference between
    devices."""
    input_ids, hidden, target, loss_mask = batch
    for t in (input_ids, hidden, target):
        dist.broadcast(t, 0)
    shard = lambda x: shard_sequence(x, q_len, world_size, rank, layout, dim=1)  # noqa: E731
    return input_ids, shard(hidden), shard(target), loss_mask


def progress(step: int, total: int, loss: float, acces: list[float], tok_s: float) -> str:
    width = 24
    done = int(width * step / total)
    acc = "/".join(f"{a:.2f}" for a in acces)
    return (f"[{'#' * done}{'.' * (width - done)}] {step}/{total}  loss {loss:.3f}  "
            f"acc/step {acc}  {tok_s:,.0f} tok/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--backend", default="split", choices=["split", "flex", "fa4"],
                        help="Eagle3Attention backend (CPU: split; flex and fa4 need CUDA)")
    parser.add_argument("--q-len", type=int, default=128, help="tokens per sample (Q_LEN)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ttt-steps", type=int, default=3, help="TTT length (Eagle3 uses 7)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512, help="target vocabulary")
    parser.add_argument("--draft-vocab", type=int, default=256, help="draft vocabulary")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "none"],
                        help="torch.compile backend for the training step ('none': eager)")
    parser.add_argument("--batches", type=int, default=16,
                        help="distinct synthetic batches, cycled (generated up front)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on CPU: 1; the small draft gains "
                             "little from more, and on a busy machine more threads wait on each other)")
    parser.add_argument("--context-parallel", default=None, choices=["ulysses", "allgather"],
                        help="shard each sequence over the ranks of a torchrun launch, with FSDP2 "
                             "over the same ranks (gloo on CPU, NCCL on CUDA, one GPU per rank); "
                             "ulysses needs --heads and --kv-heads divisible by the ranks; "
                             "allgather takes --backend split only")
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"],
                        help="context parallel: which positions each rank holds")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    rank, world_size = 0, 1
    if args.context_parallel:
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
    config = Eagle3DraftConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, draft_vocab_size=args.draft_vocab, rope_theta=10000.0)
    draft = Eagle3DraftModel(config)  # the same weights on every rank (the same seed)
    draft.freeze_embedding()
    if args.context_parallel:
        model = Eagle3ContextParallelModel(draft, args.q_len, args.ttt_steps, mode=args.context_parallel,
                                           layout=args.layout, attention_backend=args.backend)
        model.to(device, dtype)
        # One FSDP unit: the draft's modules run once per TTT step, not once per forward as
        # per-module units assume, and the draft is a single layer. Gradients are averaged over the
        # ranks (FSDP's default), which Eagle3ContextParallelModel's losses expect.
        fully_shard(model, mesh=init_device_mesh(device.type, (world_size,)))
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
        batches = [local_batch(batches.pop(0), args.q_len, world_size, rank, args.layout)
                   for _ in range(args.batches)]  # each global batch dropped once sharded
    n_params = sum(p.numel() for p in params)
    cp = (f"; context parallel {args.context_parallel!r} ({args.layout}) over {world_size} ranks, FSDP2"
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
            line = progress(step + 1, args.steps, loss, acces, timed_tokens / max(timed_s, 1e-9))
            say(("\r" + line) if tty else line, end="" if tty and not last else "\n", flush=True)
    total = time.perf_counter() - t_start
    k = max(1, args.steps // 20)
    first, final = sum(losses[:k]) / k, sum(losses[-k:]) / k
    graphs = counter.graphs if counter is not None else 0
    say(f"time {total:.1f} s; loss averaged over the first and last {k} steps")
    say(f"trained {args.steps} steps: loss {first:.3f} -> {final:.3f}, graphs compiled: {graphs}")
    if args.context_parallel:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
