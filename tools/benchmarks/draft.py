"""Table 4, draft training step (``--only draft``, not in the default run): one whole Eagle3 TTT
training step (forward and backward of a Llama-3-8B-sized draft, 7 TTT steps, bf16) as one
compiled graph with each backend, against the way trainers do it today (the model eager, a new
``create_block_mask(..., _compile=True)`` per TTT step, a compiled ``flex_attention``, K/V growing
each step): step time, TFLOP/s, peak memory, cold compile time and graphs, at Q_LEN 8192 and
32768, one fresh process per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch._dynamo
import torch._inductor.utils
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from benchmarks.common import BENCH_SCRIPT, _fmt_row, _kernel_table, _sync
from compiled_mask import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model, eagle3_mask_mod


LLAMA3_8B_DRAFT = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, draft_vocab_size=32000)
SMOKE_DRAFT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, draft_vocab_size=256)
TODAY = "today: create_block_mask(_compile=True) per TTT step + compiled flex_attention, model eager"


class TodayEagle3Step(torch.nn.Module):
    """The TTT step as open-source Eagle3 trainers run it, on the same draft and the same loss:
    the model eager, K/V caches that grow by one round per TTT step (``torch.cat``), a new
    ``create_block_mask(..., _compile=True)`` per step over the grown length,
    ``torch.compile(flex_attention)``, and the unfused LM head and log-softmax over ``[T, V]``
    (float32 probabilities as the target). Returns the weighted loss."""

    def __init__(self, draft: Eagle3DraftModel, q_len: int, length: int) -> None:
        super().__init__()
        self.draft, self.q_len, self.length = draft, q_len, length
        self.flex = torch.compile(flex_attention)

    def forward(self, input_ids, hidden_states, target, loss_mask):
        draft, T = self.draft, self.q_len
        layer, attn = draft.midlayer, draft.midlayer.self_attn
        hidden = draft.project_hidden_states(hidden_states)
        B = hidden.shape[0]
        cos_all, sin_all = draft.rope_cos_sin(torch.arange(T + self.length, device=hidden.device), hidden.dtype)
        ks, vs, loss = [], [], 0.0
        for s in range(self.length):
            ids = torch.cat([input_ids[:, s:], input_ids.new_zeros(B, s)], dim=1)
            embeds = draft.embed_input_ids(ids).to(hidden.dtype)
            x = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)
            q, k, v = attn.project(x, cos_all[s: s + T], sin_all[s: s + T])
            ks.append(k)
            vs.append(v)
            block_mask = create_block_mask(eagle3_mask_mod(T), 1, 1, T, T * (s + 1), device=q.device, _compile=True)
            out = self.flex(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), block_mask=block_mask, enable_gqa=True)
            h = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            hidden = h + layer.mlp(layer.post_attention_layernorm(h))
            logp = torch.log_softmax(draft.compute_logits(hidden).float(), -1)  # [B, T, V]
            mask = loss_mask[:, s:].float()
            nll = -(target[:, s:] * logp[:, : T - s]).sum(-1)  # [B, T - s]
            loss = loss + 0.8**s * (nll * mask).sum() / mask.sum().clamp(min=1)
        return loss


def draft_step_tflop(cfg: Eagle3DraftConfig, q_len: int, length: int, batch: int = 1) -> tuple[float, float]:
    """(matmul TFLOP, attention TFLOP) of one training step, forward + backward.

    Matmuls: every projection of each TTT step three times (forward, input and weight
    gradients), ``fc`` twice (its input, the target's hidden states, needs no gradient), the
    frozen embedding not at all. Attention: the causal half of Q_LEN x Q_LEN per step (the
    suffix diagonals add Q_LEN * s pairs, negligible), forward 2 and backward 5 matmuls.
    """
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Hq, Hkv, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.draft_vocab_size
    per_token = 2 * (2 * H * (Hq + 2 * Hkv) * D + Hq * D * H + 3 * H * I + H * V)  # one step, fwd
    tokens = batch * q_len
    matmul = 3 * per_token * tokens * length + 2 * 2 * 3 * cfg.target_hidden_size * H * tokens
    attention = length * 3.5 * 2 * batch * Hq * D * q_len * q_len  # causal: 2 * (4 * T^2 * D / 2)
    return matmul / 1e12, attention / 1e12


# Draft-table methods: "today" (TodayEagle3Step), or "BACKEND:MEMORY:TARGET" for Eagle3Model with
# attention_backend BACKEND, memory policy MEMORY (Note [memory policies] in draft/unroll.py) and a
# target of the form TARGET: "probs", float32 [T, V] probabilities (what today's trainers pass), or
# "head", TargetHead (a [T, H] bf16 last hidden state of the target and its [V, H] lm_head rows).
DRAFT_METHODS = ["today", "split:auto:probs", "split:auto:head"]


def _draft_method(spec: str) -> str:
    if spec == "today":
        return spec
    backend, _, rest = spec.partition(":")
    memory, _, target = rest.partition(":")
    if backend not in ("split", "flex", "fa4") or target not in ("probs", "head") or not memory:
        raise argparse.ArgumentTypeError(
            f"got {spec!r}: expected 'today' or BACKEND:MEMORY:TARGET, e.g. split:recompute:head "
            "(BACKEND split|flex|fa4, MEMORY auto|save|recompute|recompute_tiled|staged|staged_tiled, TARGET probs|head)")
    return spec


def draft_rows(device, q_lens, methods, length, smoke, reps, profiles: list[str] | None = None) -> list[dict]:
    """One fresh Python process per (method, Q_LEN): cold compile, then step time and peak memory;
    with ``profiles`` (a list to append to), also the kernel table of one step per row."""
    rows = []
    for q_len in q_lens:
        for method in methods:
            spec = dict(device=str(device), method=method, q_len=q_len, length=length, smoke=smoke,
                        reps=reps, profile=profiles is not None)
            row = dict(table="draft", method=_draft_method_name(method), Q_LEN=q_len, ttt_steps=length)
            if device.type == "cpu" and not method.startswith("split:"):
                row["skipped"] = "needs CUDA (flex_attention has no CPU backward)"
            else:
                run = subprocess.run([sys.executable, str(BENCH_SCRIPT), "--draft-row", json.dumps(spec)],
                                     capture_output=True, text=True)
                lines = run.stdout.strip().splitlines()
                if run.returncode == 0 and lines:
                    row = json.loads(lines[-1])
                    text = row.pop("profile", None)
                    if text is not None and profiles is not None:
                        profiles.append(f"## {row['method']}: Q_LEN={q_len}, {length} TTT steps, "
                                        f"one training step (fwd+bwd)\n{text}\n")
                else:
                    err = (run.stderr.strip().splitlines() or [""])[-1][:160]
                    row["skipped"] = f"exit {run.returncode}: {err}"
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


def _draft_method_name(method: str) -> str:
    if method == "today":
        return TODAY
    backend, memory, target = method.split(":")
    return f"Eagle3Model({backend!r}, memory={memory!r}), target {target}, one graph"


def draft_step_inputs(cfg: Eagle3DraftConfig, q_len: int, target_form: str, device: torch.device,
                      dtype: torch.dtype):
    """The benchmarks' draft (seeded, embedding frozen) and one batch of random inputs for it:
    ``(draft, input_ids, hidden_states, target, loss_mask)``; the target is float32 ``[1, T, V]``
    probabilities ("probs") or a :class:`TargetHead` ("head")."""
    from compiled_mask.draft import TargetHead

    torch.manual_seed(0)
    draft = Eagle3DraftModel(cfg)
    draft.freeze_embedding()
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (1, q_len), device=device, generator=g)
    hidden = torch.randn(1, q_len, 3 * cfg.hidden_size, device=device, dtype=dtype, generator=g)
    loss_mask = torch.ones(1, q_len, dtype=torch.bool, device=device)
    if target_form == "probs":
        target = torch.randn(1, q_len, cfg.draft_vocab_size, device=device, generator=g).softmax(-1)
    else:
        target = TargetHead(torch.randn(1, q_len, cfg.hidden_size, device=device, dtype=dtype, generator=g),
                            torch.randn(cfg.draft_vocab_size, cfg.hidden_size, device=device, dtype=dtype,
                                        generator=g) / cfg.hidden_size**0.5)
    return draft, input_ids, hidden, target, loss_mask


def draft_row(spec: dict) -> dict:
    """One row of the draft table, in this (fresh) process."""
    device = torch.device(spec["device"])
    q_len, length, method = spec["q_len"], spec["length"], spec["method"]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = Eagle3DraftConfig(**(SMOKE_DRAFT if spec["smoke"] else LLAMA3_8B_DRAFT))
    row = dict(table="draft", method=_draft_method_name(method), Q_LEN=q_len, ttt_steps=length)
    matmul_tf, attn_tf = draft_step_tflop(cfg, q_len, length)
    try:
        target_form = "probs" if method == "today" else method.split(":")[2]
        draft, input_ids, hidden, target, loss_mask = draft_step_inputs(cfg, q_len, target_form, device, dtype)
        if method == "today":
            model = TodayEagle3Step(draft, q_len, length).to(device, dtype)
            step = model
        else:
            backend, memory, _ = method.split(":")
            model = Eagle3Model(draft, q_len, length, attention_backend=backend, memory=memory).to(device, dtype)
            row["memory"] = model.memory
            step = torch.compile(model, fullgraph=True)
        params = [p for p in model.parameters() if p.requires_grad]

        def train_step():
            out = step(input_ids, hidden, target, loss_mask)
            loss = out if method == "today" else out.loss
            loss.backward()
            for p in params:
                p.grad = None
            return loss

        with torch._inductor.utils.fresh_cache():
            t0 = time.perf_counter()
            train_step()
            _sync(device)
            row["cold_s"] = round(time.perf_counter() - t0, 1)
            train_step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(spec["reps"]):
                _sync(device)
                t0 = time.perf_counter()
                train_step()
                _sync(device)
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row.update(step_ms=round(1e3 * step_s, 1), TFLOP=round(matmul_tf + attn_tf, 3),
                   **{"TFLOP/s": round((matmul_tf + attn_tf) / step_s, 3)},
                   graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"])
        if device.type == "cuda":
            row["peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        if spec.get("profile"):
            row["profile"] = _kernel_table(train_step, device)
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
    except Exception as e:  # noqa: BLE001 - a method that cannot run is a row too
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row
