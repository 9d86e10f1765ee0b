"""The one command: conversations and a target model in, a served-ready draft and its tau out.

:func:`run` is what ``python tools/train.py --target-model DIR --data FILE.jsonl --output-dir OUT``
does: read and tokenize the conversations with the target's chat template, hold some out, pick
the draft vocabulary from the training tokens, build the draft at the target's sizes with the
target's embedding, pack the conversations into rows, train (online: the target in the loop;
offline: its features written to ``OUT/features`` first), checkpoint to ``OUT/checkpoints``,
export ``OUT/draft`` for SGLang/vLLM, and measure the acceptance length on the held-out
conversations. ``OUT/train_log.jsonl`` and ``OUT/train_curves.png`` record the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compiled_mask.draft.batches import OnlineBatches
from compiled_mask.draft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from compiled_mask.draft.data import DataStats, pack_documents, read_conversations, tokenize_conversations
from compiled_mask.draft.evaluate import EvalResult, acceptance_length, prompts_from_conversations
from compiled_mask.draft.export import export_draft, load_draft
from compiled_mask.draft.model import Eagle3DraftConfig, Eagle3DraftModel
from compiled_mask.draft.offline import OfflineBatches, write_features
from compiled_mask.draft.target import TargetModel
from compiled_mask.draft.trainer import StepResult, TrainConfig, Trainer, TrainLog, plot_log, progress_line
from compiled_mask.draft.unroll import Eagle3Model
from compiled_mask.draft.vocab import draft_vocabulary, token_counts

__all__ = ["RunConfig", "RunResult", "run"]


@dataclasses.dataclass
class RunConfig:
    """Settings of :func:`run` (the command line's flags, same names).

    Args:
        target_model: local Hugging Face model directory (weights, config, tokenizer with a chat
            template).
        data: JSON-lines conversations (ShareGPT or OpenAI shape).
        output_dir: where checkpoints, the log, the plot and the exported ``draft/`` go.
        eval_data: held-out conversations; default the last ``eval_conversations`` of ``data``.
        eval_conversations: how many of ``data`` to hold out when ``eval_data`` is None.
        skip_malformed: skip malformed lines (counted) instead of stopping at the first.
        q_len: positions per row (Q_LEN); conversations are packed into rows of this length.
        batch: rows per micro-batch; accumulation: micro-batches per optimizer step.
        steps: optimizer steps; lr, warmup, grad_clip, weight_decay: see TrainConfig.
        ttt_steps: TTT length (Eagle3: 7).
        draft_vocab_size: draft vocabulary (most frequent training tokens).
        draft_intermediate_size, draft_heads, draft_kv_heads: the draft layer's sizes (default:
            the target's); the draft's hidden size is always the target's.
        aux_layers: the three target layers (default low/middle/high as SpecForge).
        init_from: an exported draft (ours, SpecForge's, TorchSpec's) to fine-tune from.
        offline: precompute the target's features to ``output_dir/features`` and train from disk.
        packed: several conversations per row (``doc_ids``); False: one per row.
        device, dtype: where and in what the draft trains (default bfloat16 on CUDA, float32 CPU).
        backend: Eagle3Attention backend; compiler: torch.compile backend or "none".
        save_every: checkpoint every N steps (and at the end); keep_checkpoints: how many.
        resume: continue from ``output_dir/checkpoints`` (True) or this checkpoint directory.
        eval_every: measure tau every N steps (0: at the end only); eval_k: draft tokens per
            verification (default ``ttt_steps``); eval_tokens: tokens generated per prompt.
        seed: weights' and shuffle's seed.
        stop_after: stop after this many steps as if killed (no final save or export; tests).
        export_dtype: dtype of the exported weights (default the training dtype).
    """

    target_model: str
    data: str
    output_dir: str
    eval_data: str | None = None
    eval_conversations: int = 8
    skip_malformed: bool = False
    q_len: int = 2048
    batch: int = 1
    accumulation: int = 1
    steps: int = 1000
    lr: float = 1e-4
    warmup: int | None = None
    grad_clip: float = 0.5
    weight_decay: float = 0.0
    ttt_steps: int = 7
    draft_vocab_size: int = 32000
    draft_intermediate_size: int | None = None
    draft_heads: int | None = None
    draft_kv_heads: int | None = None
    aux_layers: list[int] | None = None
    init_from: str | None = None
    offline: bool = False
    packed: bool = True
    device: str = "cpu"
    dtype: str | None = None
    backend: str = "split"
    compiler: str = "inductor"
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool | str = False
    eval_every: int = 0
    eval_k: int | None = None
    eval_tokens: int = 64
    seed: int = 0
    stop_after: int | None = None
    export_dtype: str | None = None


@dataclasses.dataclass
class RunResult:
    """What :func:`run` produced: the exported draft, the final tau, the losses per step."""

    draft_dir: Path | None
    eval: EvalResult | None
    losses: list[float]
    graphs: int
    steps_done: int


def _fingerprint(config: RunConfig, target: TargetModel, draft_to_target: torch.Tensor) -> dict[str, Any]:
    """What a checkpoint or an offline features directory was made from (resume checks it)."""
    digest = hashlib.sha256(Path(config.data).read_bytes()).hexdigest()[:16]
    # The draft vocabulary itself, not only its size: the stored head rows and the positions that
    # count depend on its ids (an --init-from draft re-exported to the same path has other ids).
    vocab = hashlib.sha256(",".join(map(str, draft_to_target.tolist())).encode()).hexdigest()[:16]
    return {"data_sha256": digest, "eval_data": config.eval_data, "eval_conversations": config.eval_conversations,
            "target": str(Path(config.target_model).resolve()), "aux_layers": target.aux_layers,
            "q_len": config.q_len, "packed": config.packed, "draft_vocab_size": draft_to_target.numel(),
            "draft_vocab_sha256": vocab,
            "init_from": config.init_from, "skip_malformed": config.skip_malformed,
            # Which positions count (Note [the target's top token outside the draft vocabulary]):
            # features written under another rule are recomputed.
            "counted": "loss_mask & target top-1 in the draft vocabulary"}


def _dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    if config.dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.dtype == "float16":
        raise ValueError("dtype float16 is not supported: AdamW's eps = 1e-8 is 0 in float16 and the "
                         "first step turns the weights into NaN; use bfloat16 (GPUs) or float32.")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]


def _build_draft(config: RunConfig, target: TargetModel, draft_to_target: torch.Tensor | None
                 ) -> Eagle3DraftModel:
    if config.init_from:
        draft, _ = load_draft(config.init_from, embedding=target.embedding())
        if draft.config.target_hidden_size != target.hidden_size or draft.config.vocab_size != target.vocab_size:
            raise ValueError(f"--init-from {config.init_from}: made for a target with hidden size "
                             f"{draft.config.target_hidden_size} and vocabulary {draft.config.vocab_size}, "
                             f"this target has {target.hidden_size} and {target.vocab_size}.")
        return draft.float()
    tc = target.config
    heads = config.draft_heads or int(tc.num_attention_heads)
    draft_config = Eagle3DraftConfig(
        hidden_size=target.hidden_size,
        intermediate_size=config.draft_intermediate_size or int(tc.intermediate_size),
        num_attention_heads=heads,
        num_key_value_heads=config.draft_kv_heads or int(getattr(tc, "num_key_value_heads", None) or heads),
        head_dim=getattr(tc, "head_dim", None) if not config.draft_heads else None,
        vocab_size=target.vocab_size, draft_vocab_size=config.draft_vocab_size,
        target_hidden_size=target.hidden_size, rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
        rope_theta=target.rope_theta)
    torch.manual_seed(config.seed)
    draft = Eagle3DraftModel(draft_config)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.embedding().float().cpu())
    draft.freeze_embedding()
    assert draft_to_target is not None
    draft.set_vocab_mapping(draft_to_target)
    return draft


def _eos_ids(target: TargetModel, tokenizer: Any) -> list[int]:
    ids = set()
    for source in (getattr(target.model, "generation_config", None), target.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(int(i) for i in ids)


def run(config: RunConfig, say: Callable[..., None] = print) -> RunResult:
    """Train, checkpoint, export and evaluate a draft (see the module docstring).

    Returns:
        :class:`RunResult`; the last line printed names ``OUT/draft`` and the final tau.
    """
    from transformers import AutoTokenizer  # optional dependency: only this mode needs it

    t_start = time.perf_counter()
    out = Path(config.output_dir)
    device = torch.device(config.device)
    dtype = _dtype(config, device)
    if config.q_len < 4:
        raise ValueError(f"q_len must be >= 4, got {config.q_len}.")
    # Data first: a malformed file fails before anything large is loaded.
    stats = DataStats()
    convs = read_conversations(config.data, skip_malformed=config.skip_malformed, stats=stats)
    if config.eval_data:
        held_out = read_conversations(config.eval_data, skip_malformed=config.skip_malformed)
    else:
        n_eval = min(config.eval_conversations, max(0, len(convs) - 1))
        convs, held_out = convs[: len(convs) - n_eval], convs[len(convs) - n_eval :]
    target = TargetModel.from_pretrained(config.target_model, device=device, aux_layers=config.aux_layers)
    tokenizer = AutoTokenizer.from_pretrained(config.target_model)
    say(f"target: {config.target_model} ({type(target.model).__name__}, {target.num_layers} layers, hidden "
        f"{target.hidden_size}, vocabulary {target.vocab_size}, {str(target.dtype).removeprefix('torch.')}); "
        f"auxiliary layers {target.aux_layers}")
    docs = tokenize_conversations(tokenizer, convs, config.q_len, stats)
    if not docs:
        raise ValueError(f"{config.data}: no conversation with assistant tokens to train on ({stats.summary()}).")
    say(f"data: {config.data}: {stats.summary()}; {len(held_out)} held out for evaluation")

    # Vocabulary and draft.
    draft_to_target = None
    if not config.init_from:
        if config.draft_vocab_size > target.vocab_size:
            raise ValueError(f"--draft-vocab-size {config.draft_vocab_size} exceeds the target's "
                             f"vocabulary ({target.vocab_size}).")
        draft_to_target, coverage = draft_vocabulary(token_counts(docs, target.vocab_size), config.draft_vocab_size)
        say(f"draft vocabulary: the {config.draft_vocab_size} most frequent assistant tokens cover "
            f"{coverage:.1%} of them")
    draft = _build_draft(config, target, draft_to_target)
    draft_to_target = draft.d2t + torch.arange(draft.config.draft_vocab_size)
    fingerprint = _fingerprint(config, target, draft_to_target)

    # Rows.
    lengths = [len(d) for d in docs]
    rows = pack_documents(lengths, config.q_len) if config.packed else [[i] for i in range(len(docs))]
    filled = sum(n - 1 for n in lengths) / (len(rows) * config.q_len)
    say(f"rows: {len(docs)} conversations in {len(rows)} rows of {config.q_len} positions "
        f"({'packed' if config.packed else 'one per row'}, {filled:.1%} of positions hold tokens)")

    model = Eagle3Model(draft, config.q_len, config.ttt_steps, attention_backend=config.backend)
    model.to(device, dtype)
    if config.offline:
        features = write_features(out / "features", target, docs, rows, draft_to_target, config.q_len,
                                  fingerprint=fingerprint, say=say)
        batches: Any = OfflineBatches(features, config.batch, dtype, device, seed=config.seed,
                                      packed=config.packed)
    else:
        batches = OnlineBatches(docs, rows, target, draft_to_target, config.q_len,
                                config.batch, dtype, seed=config.seed, packed=config.packed)
    train_config = TrainConfig(steps=config.steps, lr=config.lr, warmup=config.warmup,
                               grad_clip=config.grad_clip, weight_decay=config.weight_decay,
                               accumulation=config.accumulation, compiler=config.compiler)
    trainer = Trainer(model, batches, train_config)
    n_params = sum(p.numel() for p in trainer.params)
    say(f"Eagle3 draft: hidden {draft.config.hidden_size}, heads {draft.config.num_attention_heads}/"
        f"{draft.config.num_key_value_heads}, draft vocab {draft.config.draft_vocab_size}, "
        f"{n_params / 1e6:.2f}M trainable; Q_LEN {config.q_len} x batch {config.batch} x "
        f"{config.accumulation} accumulation, {config.ttt_steps} TTT steps, backend {config.backend!r}, "
        f"{device.type} {str(dtype).removeprefix('torch.')}, {'offline' if config.offline else 'online'}")

    ckpt_root = out / "checkpoints"
    log = TrainLog(out / "train_log.jsonl")
    run_meta = {"fingerprint": fingerprint, "batch": config.batch, "accumulation": config.accumulation,
                "steps": config.steps, "ttt_steps": config.ttt_steps, "lr": config.lr}
    if config.resume:
        where = ckpt_root if config.resume is True else Path(str(config.resume))
        state, meta = load_checkpoint(where)
        if meta.get("run") != run_meta:
            def flat(run: dict[str, Any]) -> dict[str, Any]:  # the fingerprint's keys beside the others
                return {**{k: v for k, v in run.items() if k != "fingerprint"}, **run.get("fingerprint", {})}

            was, now = flat(meta.get("run", {})), flat(run_meta)
            diff = {k: (was.get(k), v) for k, v in now.items() if was.get(k) != v}
            raise CheckpointError(f"--resume {where}: the checkpoint was made with other settings "
                                  f"(checkpoint, now): {diff}; resume with the same flags and data.")
        trainer.load_state_dict(state)
        log.truncate_after(trainer.step)
        say(f"resumed from {where} at step {trainer.step}")
    elif log.path.exists():
        log.path.unlink()

    eval_k = config.eval_k or config.ttt_steps
    prompts = prompts_from_conversations(tokenizer, held_out)
    eos = _eos_ids(target, tokenizer)

    def evaluate() -> EvalResult | None:
        if not prompts:
            return None
        return acceptance_length(target, model.draft_model, prompts, eval_k, config.eval_tokens, eos)

    tty = sys.stdout.isatty()
    losses: list[float] = []
    timed_tokens, timed_s = 0, 0.0
    last_result: StepResult | None = None
    if trainer.graphs == 0 and config.compiler not in ("none", "eager"):
        say("compiling the training step (first step only)...", flush=True)
    while trainer.step < config.steps:
        t0 = time.perf_counter()
        result = trainer.train_step()
        dt = time.perf_counter() - t0
        last_result = result
        losses.append(result.loss)
        if not math.isfinite(result.loss):
            raise FloatingPointError(f"step {result.step}: the loss is {result.loss}; lower --lr or use "
                                     f"--dtype float32.")
        first = len(losses) == 1
        if not first:
            timed_tokens, timed_s = timed_tokens + result.tokens, timed_s + dt
        tok_s = timed_tokens / timed_s if timed_s else result.tokens / dt
        log.write({"step": result.step, "loss": result.loss, "plosses": result.plosses, "acces": result.acces,
                   "lr": result.lr, "grad_norm": result.grad_norm, "tokens": result.tokens,
                   "tok_s": tok_s, "time_s": round(time.perf_counter() - t_start, 3)})
        last = result.step == config.steps
        if first and trainer.graphs:
            say(f"compiled in {dt:.1f} s ({trainer.graphs} graph)", flush=True)
        if last or tty or result.step % max(1, config.steps // 10) == 0:
            line = progress_line(result.step, config.steps, result.loss, result.acces, tok_s)
            say(("\r" + line) if tty else line, end="" if tty and not last else "\n", flush=True)
        if config.save_every and result.step % config.save_every == 0 and not last:
            save_checkpoint(ckpt_root, result.step, trainer.state_dict(), meta={"run": run_meta},
                            keep=config.keep_checkpoints)
        if config.eval_every and result.step % config.eval_every == 0 and not last:
            ev = evaluate()
            if ev is not None:
                log.write({"step": result.step, "tau": ev.tau, "k": ev.k})
                say(("\n" if tty else "") + f"step {result.step}: {ev.summary()}")
        if config.stop_after is not None and result.step >= config.stop_after and not last:
            say(f"stopped after step {result.step} (--stop-after)")
            return RunResult(None, None, losses, trainer.graphs, trainer.step)
    if last_result is not None or not (ckpt_root / "latest").exists():
        save_checkpoint(ckpt_root, trainer.step, trainer.state_dict(), meta={"run": run_meta},
                        keep=config.keep_checkpoints)
    export_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.export_dtype] \
        if config.export_dtype else dtype
    max_pos = max(config.q_len, int(getattr(target.config, "max_position_embeddings", 0) or 0))
    extra = {k: getattr(target.config, k) for k in ("bos_token_id", "eos_token_id")
             if getattr(target.config, k, None) is not None}
    draft_dir = export_draft(model.draft_model, out / "draft", max_position_embeddings=max_pos,
                             dtype=export_dtype, aux_layers=target.aux_layers,
                             target_layers=target.num_layers, extra=extra)
    ev = evaluate()
    if ev is not None:
        log.write({"step": trainer.step, "tau": ev.tau, "k": ev.k})
    png = plot_log(log, out / "train_curves.png")
    k = max(1, len(losses) // 20)
    if losses:
        say(f"loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f} (first and last {k} steps "
            f"averaged); log {log.path}" + (f", plot {png}" if png else ""))
    if ev is not None:
        say(f"held-out: {ev.summary()}")
    tau = f"{ev.tau:.2f}" if ev is not None else "n/a (no held-out conversations)"
    say(f"draft exported to {draft_dir}: acceptance length tau {tau} (k={eval_k}), "
        f"{time.perf_counter() - t_start:.0f} s")
    return RunResult(draft_dir, ev, losses, trainer.graphs, trainer.step)
