"""The training loop around :class:`~compiled_mask.draft.Eagle3Model`.

:class:`Trainer` runs one optimizer step at a time: ``accumulation`` micro-batches, each the whole
TTT step (forward and backward) as one compiled graph (``torch.compile(model, fullgraph=True)``:
one graph per Q_LEN, every step), then gradient clipping, AdamW and a warmup + cosine learning
rate. Parameters in bfloat16 are updated through float32 master copies (Note [master weights]).
Its :meth:`~Trainer.state_dict` holds everything a resumed run needs to continue bit for bit:
weights, optimizer, schedule, the step counter (which fixes the data position, see
:mod:`~compiled_mask.draft.batches`) and every random generator.

Also here: the progress line (:func:`progress_line`), the JSON-lines log (:class:`TrainLog`) and
the loss/accuracy plot (:func:`plot_log`, needs matplotlib).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from compiled_mask.draft.unroll import Eagle3Model
from compiled_mask.inspect import GraphCounter

__all__ = [
    "Batch",
    "BatchSource",
    "TrainConfig",
    "StepResult",
    "Trainer",
    "TrainLog",
    "cosine_schedule",
    "progress_line",
    "plot_log",
    "rng_state",
    "set_rng_state",
]


class Batch(NamedTuple):
    """One micro-batch, aligned for TTT step 0 (``Eagle3Model.forward``).

    Attributes:
        input_ids: ``[B, T]`` int64, the token after each position.
        hidden_states: ``[B, T, 3 * target_hidden]``, the target's auxiliary states.
        target: ``TargetHead`` (the target's last hidden state and lm_head rows), or
            ``[B, T, draft_vocab]`` probabilities, or ``[B, T]`` draft ids (``Eagle3Model.forward``).
        loss_mask: ``[B, T]`` bool.
        doc_ids: ``[B, T]`` int64 document of each position, -1 unused; or None.
        seq_lens: ``[B]`` int64 valid length of each row (one document per row); or None.
    """

    input_ids: Tensor
    hidden_states: Tensor
    target: Any
    loss_mask: Tensor
    doc_ids: Tensor | None = None
    seq_lens: Tensor | None = None


class BatchSource(Protocol):
    """Micro-batch ``index`` (0, 1, 2, ...), the same for the same index in every run."""

    def get(self, index: int) -> Batch: ...


@dataclasses.dataclass
class TrainConfig:
    """The optimizer and schedule.

    Args:
        steps: optimizer steps.
        lr: peak learning rate (SpecForge's default for Eagle3: 1e-4).
        warmup: linear warmup steps; default 1.5% of ``steps`` (at least 1).
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        betas, weight_decay, eps: AdamW's.
        grad_clip: max global gradient norm (0: no clipping).
        accumulation: micro-batches per optimizer step.
        compiler: ``torch.compile`` backend of the step ("inductor", "aot_eager") or "none" (eager).
    """

    steps: int
    lr: float = 1e-4
    warmup: int | None = None
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 0.5
    accumulation: int = 1
    compiler: str = "inductor"

    def __post_init__(self) -> None:
        for name in ("steps", "accumulation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be an int >= 1, got {name}={value!r}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig: lr must be a finite number > 0, got lr={self.lr!r}.")
        if self.warmup is None:
            self.warmup = max(1, round(0.015 * self.steps))
        if self.compiler not in ("inductor", "aot_eager", "eager", "none"):
            raise ValueError(f"TrainConfig: compiler must be 'inductor', 'aot_eager', 'eager' or "
                             f"'none', got {self.compiler!r}.")


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    warmup = max(1, warmup)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def progress_line(step: int, total: int, loss: float, acces: list[float], tok_s: float) -> str:
    """``[####....] 40/400  loss 12.273  acc/step 0.18/0.05/0.03  5,593 tok/s``."""
    width = 24
    done = int(width * step / total)
    acc = "/".join(f"{a:.2f}" for a in acces)
    return (f"[{'#' * done}{'.' * (width - done)}] {step}/{total}  loss {loss:.3f}  "
            f"acc/step {acc}  {tok_s:,.0f} tok/s")


def rng_state() -> dict[str, Any]:
    """Every random generator a run may draw from: Python's, torch's CPU and CUDA ones."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Note [master weights]
#     AdamW's update lr * m / (sqrt(v) + eps) is ~1e-4 of a weight, below bfloat16's resolution
#     (8 bits of mantissa) for most weights, so bfloat16 parameters updated in place mostly do not
#     move; and in float16 eps = 1e-8 is 0, so the first step divides by zero (issue 24). Here
#     the optimizer owns float32 copies of low-precision parameters: gradients are copied into
#     them, clipped, stepped, and the result is rounded back into the parameters the compiled
#     step reads. Float32 parameters are stepped in place, with no copy.
class _Optimizer:
    """AdamW over float32 master weights (Note [master weights]) with gradient clipping."""

    def __init__(self, params: list[torch.nn.Parameter], config: TrainConfig) -> None:
        self.params = params
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                       for p in params]
        self.adamw = torch.optim.AdamW(self.master, lr=config.lr, betas=config.betas, eps=config.eps,
                                       weight_decay=config.weight_decay)
        self.grad_clip = config.grad_clip

    def step(self) -> Tensor:
        """Clip, step, zero the gradients; returns the global gradient norm (before clipping)."""
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        grads = [m for m in self.master if m.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m.grad) for m in grads]))
        self.adamw.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)
        for t in (*self.params, *self.master):
            t.grad = None
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(),
                "master": [m.detach().clone() if m is not p else None for p, m in zip(self.params, self.master)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adamw.load_state_dict(state["adamw"])
        with torch.no_grad():
            for m, saved in zip(self.master, state["master"]):
                if saved is not None:
                    m.copy_(saved)


class StepResult(NamedTuple):
    """What one optimizer step measured (host floats: the step is synchronised).

    Attributes:
        step: optimizer steps done, this one included.
        loss: the TTT loss (mean over the micro-batches); plosses, acces: per TTT step.
        lr: the learning rate this step used; grad_norm: the global norm before clipping.
        tokens: positions processed (micro-batches x B x Q_LEN).
        data_s: seconds getting the batches (the target's forward, online); step_s: seconds of
            the compiled steps (forward and backward); optim_s: clipping and AdamW. Exact only
            with ``sync_timing`` (else the device may still be busy when a phase's clock stops).
    """

    step: int
    loss: float
    plosses: list[float]
    acces: list[float]
    lr: float
    grad_norm: float
    tokens: int
    data_s: float
    step_s: float
    optim_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """Optimizer steps of an :class:`Eagle3Model` on a :class:`BatchSource`.

    Args:
        model: the TTT unroll (its draft's trainable parameters are trained).
        batches: where micro-batch i comes from.
        config: optimizer and schedule.
        sync_timing: synchronise the device between the data and the step, so ``data_s`` and
            ``step_s`` split the time exactly (the benchmark); otherwise only at the step's end.
    """

    def __init__(self, model: Eagle3Model, batches: BatchSource, config: TrainConfig, *,
                 sync_timing: bool = False) -> None:
        self.model = model
        self.batches = batches
        self.config = config
        self.sync_timing = sync_timing
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("Trainer: the model has no trainable parameters.")
        self.device = self.params[0].device
        self.optimizer = _Optimizer(self.params, config)
        self.scheduler = cosine_schedule(self.optimizer.adamw, config.steps, config.warmup,
                                         config.min_lr_ratio)
        self.step = 0
        if config.compiler in ("none", "eager"):
            self.counter = None
            self.step_fn: Callable[..., Any] = model
        else:
            self.counter = GraphCounter(config.compiler)
            self.step_fn = torch.compile(model, backend=self.counter, fullgraph=True)

    @property
    def graphs(self) -> int:
        """Graphs compiled so far (0 when eager)."""
        return 0 if self.counter is None else self.counter.graphs

    def train_step(self) -> StepResult:
        """One optimizer step: ``accumulation`` compiled forward+backward passes, clip, AdamW."""
        cfg = self.config
        lr = self.scheduler.get_last_lr()[0]
        data_s = step_s = 0.0
        loss = plosses = acces = None
        tokens = 0
        for a in range(cfg.accumulation):
            t0 = time.perf_counter()
            batch = self.batches.get(self.step * cfg.accumulation + a)
            if self.sync_timing:
                _sync(self.device)
            t1 = time.perf_counter()
            out = self.step_fn(batch.input_ids, batch.hidden_states, batch.target, batch.loss_mask,
                               **({"doc_ids": batch.doc_ids} if batch.doc_ids is not None else {}),
                               **({"seq_lens": batch.seq_lens} if batch.seq_lens is not None else {}))
            (out.loss / cfg.accumulation).backward()
            parts = (out.loss.detach(), out.plosses.detach(), out.acces.detach())
            loss, plosses, acces = parts if loss is None else (loss + parts[0], plosses + parts[1], acces + parts[2])
            tokens += batch.input_ids.numel()
            if self.sync_timing:
                _sync(self.device)
            data_s += t1 - t0
            step_s += time.perf_counter() - t1
        t2 = time.perf_counter()
        grad_norm = self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        n = cfg.accumulation
        values = torch.cat([(loss / n).reshape(1), plosses / n, acces / n, grad_norm.reshape(1).float()]).tolist()
        optim_s = time.perf_counter() - t2  # .tolist() synchronised
        length = plosses.numel()
        return StepResult(self.step, values[0], values[1 : 1 + length], values[1 + length : 1 + 2 * length],
                          lr, values[-1], tokens, data_s, step_s, optim_s)

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue this run exactly (see :mod:`compiled_mask.draft.checkpoint`)."""
        return {"draft": self.model.draft_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.draft_model.load_state_dict(state["draft"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])


class TrainLog:
    """The run's JSON-lines log: one object per line (``{"step": ..., "loss": ...}``, evaluations
    with ``"tau"``), flushed as written, so a killed run keeps what it logged.

    Args:
        path: the ``.jsonl`` file (appended to).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run logs them again)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_log(log: TrainLog, png: str | Path) -> Path | None:
    """Plot loss and per-TTT-step accuracy against the step (and tau, if evaluated) into ``png``.

    Returns:
        The PNG's path, or None when matplotlib is not installed (the plot is optional).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = log.read()
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "tau" in r]
    if not steps:
        return None
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 4))
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["loss"] for r in steps])
    axes[0].set(xlabel="step", ylabel="loss", title="TTT loss")
    for s in range(len(steps[0]["acces"])):
        axes[1].plot(x, [r["acces"][s] for r in steps], label=f"step {s}")
    axes[1].set(xlabel="step", ylabel="top-1 accuracy", title="accuracy per TTT step")
    axes[1].legend()
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["tau"] for r in evals], marker="o")
        axes[2].set(xlabel="step", ylabel="tau", title="acceptance length")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png
