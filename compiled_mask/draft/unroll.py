"""The training-time test (TTT) unroll of an Eagle3 draft: one compiled graph for the whole step.

:class:`Eagle3Model` runs it as TorchSpec's ``Eagle3Model`` and SpecForge's ``OfflineEagle3Model``
do: step s feeds its hidden states to step s + 1, shifts the token ids, target and loss mask by one
more position, writes its K/V as round s of the static buffer and attends over rounds 0..s with the
Eagle3 mask. Each step's loss is the cross entropy against the target's next-token distribution
(or ids) under the loss mask, through the fused, chunked LM head (``loss.py``: no ``[T, V]``
tensor is ever held); the total weights step s by 0.8**s, as Eagle3 does. Everything is tensor
ops with no data-dependent Python, so ``torch.compile(Eagle3Model(...), fullgraph=True)`` gives
one graph for the forward and backward of the whole step, for every batch of the same shape.

The unroll is written for a process that holds some positions of the sequence: a
:class:`Sequence` says which, and owns whatever needs other processes (shifted rows, sums, the
attention). :class:`WholeSequence` (the default) holds them all; ``context_parallel.py`` shards
them over a process group. The model itself knows nothing of ranks.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from compiled_mask._checks import _shape
from compiled_mask._inputs import Layout, normalize_layout
from compiled_mask._layout import _valid_queries
from compiled_mask.draft.loss import TargetHead, TargetLogits, head_loss
from compiled_mask.draft.model import Eagle3DraftModel
from compiled_mask.draft import staged
from compiled_mask.draft.tiled import tiled_mlp
from compiled_mask.modules import Eagle3Attention

__all__ = ["Eagle3Model", "Eagle3Output", "MEMORY_POLICIES", "Sequence", "WholeSequence"]


class Eagle3Output(NamedTuple):
    """What :class:`Eagle3Model` returns; all tensors, so nothing syncs with the host.

    Attributes:
        loss: 0-d float32, ``sum_s 0.8**s * plosses[s]`` (backpropagate this).
        plosses: ``[length]`` float32, each TTT step's masked mean cross entropy.
        acces: ``[length]`` float32, each step's top-1 agreement with the target on its
            masked positions.
    """

    loss: Tensor
    plosses: Tensor
    acces: Tensor


class Sequence(Protocol):
    """Which positions of the sequence this process holds, and the operations across processes.

    The unroll reads, at local position t of TTT step s, what step 0 reads at global position
    ``t + s`` (Note [sequence shards]). A strategy provides that and the sums over processes;
    :class:`WholeSequence` is the identity, ``context_parallel.ContextParallel`` a sharding.
    """

    rows_name: str  # how errors name the local rows of hidden_states and of a float target

    def bind(self, q_len: int, length: int, attention_backend: str) -> nn.Module: ...
    def local_len(self) -> int: ...
    def positions(self, device: torch.device) -> Tensor: ...
    def at(self, x: Tensor, s: int, dim: int = 1) -> Tensor: ...
    def halo(self, x: Tensor, n: int) -> Tensor | None: ...
    def shifted(self, x: Tensor, halo: Tensor | None, s: int) -> list[tuple[int, int, Tensor]]: ...
    def sum(self, x: Tensor) -> Tensor: ...
    def totals(self, plosses: Tensor, acces: Tensor) -> tuple[Tensor, Tensor]: ...
    def hint(self, name: str, local: bool) -> str: ...


# Note [sequence shards]
#     A process holds L positions of the T of each sample (all of them, or a rank's shard), in
#     chunks of C consecutive positions. Step s reads, at local position t, what step 0 reads at
#     global position t + s (ids, loss mask, int targets, RoPE position, same-document check):
#       - global ``[B, T]`` inputs (ids, loss mask, int targets, the layout table) are padded by
#         ``length - 1`` and read at the local positions + s (``Sequence.at``);
#       - local ``[B, L, ...]`` inputs (a soft target in any form) are read by rows: each chunk's
#         own rows from s on, then the first s rows of the next chunk, which may live elsewhere
#         (``Sequence.halo``, then ``Sequence.shifted``: pairs of local rows and target rows, no
#         copy of the target);
#       - positions past T read id 0 and no target under a False mask, so they count nothing, and
#         each step's loss is its masked sum over the count of all processes (``Sequence.sum``);
#         ``Sequence.totals`` turns the per-process parts into the totals.


def _check_unbound(sequence: Sequence) -> None:
    """A strategy holds its model's q_len and shards: one model each."""
    if hasattr(sequence, "q_len"):
        name = type(sequence).__name__
        raise ValueError(f"Eagle3Model: this {name} is already bound to a model with q_len={sequence.q_len}; "
                         f"pass a new {name}(...) to each Eagle3Model.")


class WholeSequence:
    """The whole sequence in this process (:class:`Sequence`): every operation is local."""

    rows_name = "T"

    def bind(self, q_len: int, length: int, attention_backend: str) -> nn.Module:
        _check_unbound(self)
        attn = Eagle3Attention(q_len, length, backend=attention_backend)
        self.q_len = q_len  # bound only once the attention accepted its arguments
        return attn

    def local_len(self) -> int:
        return self.q_len

    def positions(self, device: torch.device) -> Tensor:
        return torch.arange(self.q_len, device=device)

    def at(self, x: Tensor, s: int, dim: int = 1) -> Tensor:
        return x.narrow(dim, s, self.q_len)

    def halo(self, x: Tensor, n: int) -> Tensor | None:
        return None

    def shifted(self, x: Tensor, halo: Tensor | None, s: int) -> list[tuple[int, int, Tensor]]:
        return [(0, self.q_len - s, x[:, s:])]

    def sum(self, x: Tensor) -> Tensor:
        return x

    def totals(self, plosses: Tensor, acces: Tensor) -> tuple[Tensor, Tensor]:
        return plosses, acces

    def hint(self, name: str, local: bool) -> str:
        return ""


# Note [memory policies]
#     What each TTT step keeps for the backward, one argument with a default by Q_LEN:
#       - "save": everything autograd saves (the fastest; ~200 KB per token and step for the
#         Llama-3-8B-sized draft, docs/benchmarks.md);
#       - "recompute": each step's decoder layer under activation checkpointing: it keeps only
#         its inputs (the previous hidden states, the ids) and its K/V round, and the backward
#         replays the step. Eagerly, autograd replays one step just before its gradients are
#         needed, so one step's activations are alive at a time. Compiled, the partitioner and
#         Inductor's scheduler are free to move a replay earlier, and they do: parts of every
#         step's replay (e.g. the [T, 2H] input of the QKV projection) are computed at the start
#         of the backward and held until their step (tools/memory_peak.py lists what is alive at
#         the peak). On CPU, eager "recompute" holds 4.1x less than "save", compiled 2.3x less
#         (docs/benchmarks.md, 2026-12-06; ``tools/memory_peak.py --device cpu --size tiny
#         --q-len 1024``: Inductor "save" 223.8 [T, H], "recompute" 104.8, eager "recompute" 70.4);
#       - "recompute_tiled": as "recompute", with the MLP tiled over the sequence
#         (``tiled.py``), so that replaying a step at 128K tokens does not hold three
#         ``[T, intermediate]`` activations at once;
#       - "staged" / "staged_tiled": as "recompute" / "recompute_tiled", with each step's layer
#         one op of the graph (``staged.py``) whose backward op replays it. That op reads the
#         gradient of the step's outputs, which the next step's backward op returns, so the
#         replays run in order, one step's at a time, wherever Inductor schedules them: eager
#         recompute's memory inside the one compiled graph (CPU probe above: 69.6 [T, H] against
#         Inductor's 104.8 for "recompute"). Inside the op the layer runs as two halves
#         compiled on their own on CUDA (``staged._COMPILED_ON``: Inductor fuses the norms, RoPE
#         and SwiGLU), eagerly on CPU; its matmuls and attention are the same kernels.
#     The LM head and loss never keep ``[T, V]`` whatever the policy (``loss.py``). Each policy
#     computes the same numbers (tests/test_draft.py); they differ in memory and time only.
MEMORY_POLICIES = ("save", "recompute", "recompute_tiled", "staged", "staged_tiled")
_CHECKPOINTED, _STAGED = ("recompute", "recompute_tiled"), ("staged", "staged_tiled")
_TILED = ("recompute_tiled", "staged_tiled")
_AUTO_RECOMPUTE_TOKENS = 16384  # "auto": recompute above this many tokens per sample
_AUTO_TILE_TOKENS = 65536  # "auto": stage the recompute and tile the MLP above this many
_MLP_TILE_ROWS = 8192  # rows per MLP tile (the tiled policies)


def _memory_policy(where: str, memory: str, q_len: int, can_stage: bool) -> str:
    if memory == "auto":
        if q_len > _AUTO_TILE_TOKENS:
            return "staged_tiled" if can_stage else "recompute_tiled"
        return "recompute" if q_len > _AUTO_RECOMPUTE_TOKENS else "save"
    if memory not in MEMORY_POLICIES:
        raise ValueError(f"{where}: unknown memory={memory!r}; choose 'auto' or one of {list(MEMORY_POLICIES)}.")
    return memory


class Eagle3Model(nn.Module):
    """Eagle3 training-time test: ``length`` draft steps, the loss and its per-step parts.

    As TorchSpec's ``Eagle3Model`` (``draft_model``, ``length``, ``attention_backend``): step s
    embeds the ids shifted by s, runs the decoder layer on them and on the previous step's hidden
    states (step 0: ``fc`` of the target's auxiliary states), writes its K/V as round s and
    attends over rounds 0..s with :class:`~compiled_mask.Eagle3Attention` (query q sees the causal
    keys of round 0 and key q of each later round). RoPE positions of step s are ``t + s``. The
    loss of step s compares the draft's distribution at position t with the target at ``t + s``.

    Compile it whole: ``torch.compile(Eagle3Model(...), fullgraph=True)``; one graph serves the
    forward and backward of every batch of the same shape (new ``seq_lens``/``doc_ids`` values
    included; None and a tensor are two graphs, so pass the same kind every call).

    Args:
        draft_model: the :class:`Eagle3DraftModel`.
        q_len: tokens per sample (T); batches are padded or packed to it.
        length: TTT steps (Eagle3 uses 7), at most q_len.
        attention_backend: ``Eagle3Attention``'s backend: "split", "flex" or "fa4".
        loss_decay: step s's loss weight is ``loss_decay ** s`` (Eagle3: 0.8).
        memory: what each step keeps for the backward (Note [memory policies]): "save",
            "recompute", "recompute_tiled", "staged", "staged_tiled" (one process only), or
            "auto" (the default): "save" up to 16384 tokens per sample, "recompute" up to 65536,
            "staged_tiled" beyond ("recompute_tiled" with context parallel, another backend, or
            for a call with doc_ids on CUDA or under autocast).
        chunk_rows: rows per chunk of the fused LM head and loss (``head_loss``; default from the
            draft vocabulary, ~256 MiB per float32 ``[rows, V]`` buffer).
        sequence: which positions this process holds (:class:`Sequence`); default
            :class:`WholeSequence`. ``context_parallel.ContextParallel`` shards the sequence over
            a process group.

    Example::

        >>> from compiled_mask.draft import Eagle3DraftConfig, Eagle3DraftModel
        >>> cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
        ...                         num_key_value_heads=1, vocab_size=50, draft_vocab_size=20)
        >>> model = Eagle3Model(Eagle3DraftModel(cfg), q_len=16, length=3)
        >>> ids, hidden = torch.randint(50, (2, 16)), torch.randn(2, 16, 3 * 32)
        >>> out = model(ids, hidden, torch.randint(20, (2, 16)), torch.ones(2, 16))
        >>> out.plosses.shape, out.acces.shape  # per TTT step
        (torch.Size([3]), torch.Size([3]))
        >>> out.loss.backward()
    """

    def __init__(self, draft_model: Eagle3DraftModel, q_len: int, length: int = 7, *,
                 attention_backend: str = "split", loss_decay: float = 0.8, memory: str = "auto",
                 chunk_rows: int | None = None, sequence: Sequence | None = None) -> None:
        super().__init__()
        where = "Eagle3Model"
        for name, value in (("q_len", q_len), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be an int >= 1, got {name}={value!r}.")
        if length > q_len:
            raise ValueError(
                f"{where}: TTT step s predicts the target s positions ahead, so length must be at "
                f"most q_len, got length={length} and q_len={q_len}."
            )
        if isinstance(loss_decay, bool) or not isinstance(loss_decay, (int, float)) or not 0 <= loss_decay < float("inf"):
            raise ValueError(f"{where}: loss_decay must be a finite number >= 0 (Eagle3: 0.8), got {loss_decay!r}.")
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"{where}: chunk_rows must be an int >= 1 or None, got chunk_rows={chunk_rows!r}.")
        self.draft_model = draft_model
        self.q_len = q_len
        self.length = length
        self.attention_backend = attention_backend
        self.loss_decay = float(loss_decay)
        self.sequence = WholeSequence() if sequence is None else sequence
        can_stage = attention_backend == "split" and isinstance(self.sequence, WholeSequence)
        self.memory = _memory_policy(where, memory, q_len, can_stage)
        self._memory_arg = memory
        self.chunk_rows = chunk_rows
        self.attn = self.sequence.bind(q_len, length, attention_backend)
        if self.memory in _STAGED:  # Note [memory policies]: the layer runs inside an op
            if not isinstance(self.sequence, WholeSequence):
                raise ValueError(f"{where}: memory={memory!r} runs on one process; with context parallel "
                                 f"use 'save', 'recompute' or 'recompute_tiled'.")
            if attention_backend != "split":
                raise ValueError(f"{where}: memory={memory!r} runs the attention eagerly, which only the 'split' "
                                 f"backend does without flex_attention's dense fallback; got "
                                 f"attention_backend={attention_backend!r}. Use 'split', or memory='recompute'.")
            self._staged_key = staged.register(self)
        self.register_buffer("live_rounds", torch.arange(1, length + 1), persistent=False)  # [length]

    def forward(self, input_ids: Tensor, hidden_states: Tensor, target: Tensor | TargetLogits | TargetHead,
                loss_mask: Tensor, *, seq_lens: Tensor | None = None, doc_ids: Tensor | None = None
                ) -> Eagle3Output:
        """One TTT unroll: losses and accuracies of every step.

        The inputs are aligned for step 0, as TorchSpec's ``Eagle3Model`` and SpecForge's offline
        trainer receive them: at position t the target model has read tokens ..t, and

        Args:
            input_ids: ``[B, T]`` target-vocabulary ids, the token *after* position t.
            hidden_states: ``[B, T, 3 * target_hidden_size]``, the target's three auxiliary
                hidden states at position t, concatenated.
            target: what step 0 predicts at position t (the token after ``input_ids[:, t]``), in
                one of these forms (``loss.py``; which to use when: docs/training.md):
                ``[B, T, draft_vocab_size]`` float probabilities over the draft vocabulary (any
                float dtype); ``[B, T]`` int draft-vocabulary ids, -1 where the token is not in
                the draft vocabulary (no loss there; :meth:`Eagle3DraftModel.target_to_draft_ids`
                maps target ids); :class:`~compiled_mask.draft.loss.TargetLogits` ``[B, T, V]``;
                :class:`~compiled_mask.draft.loss.TargetHead`, the target's last hidden state
                ``[B, T, Ht]`` and its lm_head rows of the draft vocabulary ``[V, Ht]``.
            loss_mask: ``[B, T]`` bool or 0/1: which step-0 predictions count. Step s uses it
                shifted by s (positions whose target lies past T drop out).
            seq_lens: optional ``[B]`` valid length of each sample (padded batch).
            doc_ids: optional ``[B, T]`` document of each position, -1 for padding (packed
                batch; a document is a maximal run of equal ids). The attention stays inside
                documents, and step s drops positions whose shifted target is in another document.

        Returns:
            :class:`Eagle3Output`: ``loss`` (weighted sum of the steps), ``plosses`` and
            ``acces`` ``[length]``.
        """
        draft, seq = self.draft_model, self.sequence
        T, ahead = self.q_len, self.length - 1  # step s reads position t + s, up to t + ahead
        self._check_inputs(input_ids, hidden_states, target, loss_mask)
        policy = self._call_policy(doc_ids, input_ids.device)
        layout = normalize_layout("Eagle3Model", T, seq_lens, doc_ids, input_ids.device, input_ids.size(0),
                                  name="input_ids")  # Note [one layout table]: once per training step
        mask = loss_mask.bool()  # [B, T]
        ids_target = isinstance(target, Tensor) and not target.dtype.is_floating_point
        if ids_target:  # ids outside the draft vocabulary (-1 for a token it lacks) count nothing
            mask = mask & (target >= 0) & (target < draft.config.draft_vocab_size)
        if layout.first_key is not None:
            valid = _valid_queries(T, layout.first_key, input_ids.device)  # [B, T]: not padding
            mask = mask & valid
            # Note [padding is garbage] in _layout.py: whatever the padding rows hold, they
            # compute on zeros, so every K/V the attention reads is finite.
            hidden_states = torch.where(seq.at(valid, 0)[..., None], hidden_states, 0)
        # Past T: no token (id 0), nothing counts (Note [sequence shards]).
        ids_pad, mask_pad = F.pad(input_ids, (0, ahead)), F.pad(mask, (0, ahead))
        target_pad = F.pad(target, (0, ahead)) if ids_target else None  # [B, T + ahead]
        first_key_pad = None if layout.first_key is None else F.pad(layout.first_key, (0, ahead))
        step_masks = []
        for s in range(self.length):
            step_mask = seq.at(mask_pad, s)  # [B, L]: loss_mask at t + s
            if first_key_pad is not None:  # the shifted target in the same document
                step_mask = step_mask & (seq.at(first_key_pad, s) == seq.at(first_key_pad, 0))
            step_masks.append(step_mask)
        counts = seq.sum(torch.stack([m.sum() for m in step_masks]))  # [length] int64
        soft, halo = None, None
        if not ids_target:
            soft = target.hidden if isinstance(target, TargetHead) else (
                target.logits if isinstance(target, TargetLogits) else target)  # [B, L, V or Ht]
            halo = seq.halo(soft, ahead)

        hidden = draft.project_hidden_states(hidden_states.to(draft.fc.weight.dtype))  # [B, L, H]
        positions = torch.arange(T + ahead, device=input_ids.device)  # [T + ahead]
        cos_all, sin_all = draft.rope_cos_sin(positions, hidden.dtype)  # [T + ahead, D] each
        rounds: list[Tensor] = []  # k_0, ..., k_s, v_0, ..., v_s
        nll_sums, hit_sums = [], []
        for s in range(self.length):
            step = (s, seq.at(ids_pad, s), hidden, seq.at(cos_all, s, dim=0), seq.at(sin_all, s, dim=0), layout)
            if policy in _CHECKPOINTED and torch.is_grad_enabled():  # Note [memory policies]
                hidden, k, v = torch.utils.checkpoint.checkpoint(self._step, policy, *step, *rounds,
                                                                 use_reentrant=False)
            else:
                hidden, k, v = self._step(policy, *step, *rounds)
            rounds = [*rounds[: s], k, *rounds[s:], v]
            # Step s predicts, at position t, what step 0 predicts at t + s.
            nll_sum, hit_sum = self._loss(hidden, target, soft, halo, target_pad, step_masks[s], s)
            nll_sums.append(nll_sum)
            hit_sums.append(hit_sum)
        # Each step's masked mean over all positions (of all processes); 0 where none counts.
        nll_sums, hit_sums = torch.stack(nll_sums), torch.stack(hit_sums)
        counts = counts.to(nll_sums.dtype).clamp(min=1.0)
        plosses, acces = seq.totals(nll_sums / counts, hit_sums / counts)
        loss = sum(self.loss_decay**s * plosses[s] for s in range(self.length))
        return Eagle3Output(loss, plosses, acces)

    def _step(self, policy: str, s: int, ids: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, layout: Layout,
              *rounds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """TTT step s's decoder layer: ``(next hidden states [B, L, H], k_s, v_s)``; ``rounds``:
        the K/V rounds of the earlier steps, ``k_0..k_{s-1}, v_0..v_{s-1}``."""
        if policy in _STAGED:  # Note [memory policies]
            weights = [p for _, p in self._staged_params()]
            return staged.staged_step(self._staged_key, ids, hidden, cos, sin, layout, self.live_rounds[s],
                                      list(rounds[:s]), list(rounds[s:]), weights)
        return self._layer(policy, ids, hidden, cos, sin, layout, self.live_rounds[s], rounds[:s], rounds[s:])

    def _layer(self, policy: str, ids: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, layout: Layout, live: Tensor,
               k_rounds: list[Tensor] | tuple[Tensor, ...], v_rounds: list[Tensor] | tuple[Tensor, ...],
               project=None, finish=None) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder layer of a TTT step: ``(next hidden states, k, v)`` of the step; ``live``:
        the live rounds (0-d); k_rounds, v_rounds: the earlier steps' K/V rounds. ``project`` and
        ``finish`` replace :meth:`_project` and :meth:`_finish` (the staged ops pass them compiled)."""
        q, k, v = (project or Eagle3Model._project)(self, ids, hidden, cos, sin)
        k_buf = self._buffer(policy, [*k_rounds, k])  # [B, Hkv, L * length, D]
        v_buf = self._buffer(policy, [*v_rounds, v])
        return (finish or Eagle3Model._finish)(self, policy, hidden, q, k_buf, v_buf, live, layout), k, v

    def _project(self, ids: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The layer up to its attention: q, and the step's K/V round."""
        layer = self.draft_model.midlayer
        embeds = self.draft_model.embed_input_ids(ids).to(hidden.dtype)  # [B, L, H]
        x = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)  # [B, L, 2H]
        return layer.self_attn.project(x, cos, sin)

    def _finish(self, policy: str, hidden: Tensor, q: Tensor, k_buf: Tensor, v_buf: Tensor, live: Tensor,
                layout: Layout) -> Tensor:
        """The layer from its attention on: the next hidden states (``hidden``: the step's input)."""
        layer = self.draft_model.midlayer
        B, L, _ = hidden.shape
        out = self.attn._attend(q, k_buf, v_buf, live, layout, finite_padding=True)
        out = out.transpose(1, 2).reshape(B, L, -1)  # [B, L, Hq * D]
        hidden = hidden + layer.self_attn.o_proj(out)
        normed = layer.post_attention_layernorm(hidden)
        if policy in _TILED:
            mlp = layer.mlp
            return hidden + tiled_mlp(normed, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                      chunk_rows=_MLP_TILE_ROWS)
        return hidden + layer.mlp(normed)  # [B, L, H]

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self.memory in _STAGED:  # a copy (deepcopy, unpickling) is a model of its own
            self._staged_key = staged.register(self)

    def _call_policy(self, doc_ids: Tensor | None, device: torch.device) -> str:
        """This call's memory policy: ``self.memory``, but a staged policy cannot take doc_ids on
        CUDA (split's document part is flex_attention there, which eagerly, inside the op, would be
        a dense O(T^2) fallback) nor run under autocast (which does not reach inside the op):
        "auto" then falls back to "recompute_tiled" for the call, an explicit staged policy is
        refused."""
        if self.memory not in _STAGED:
            return self.memory
        if doc_ids is not None and device.type == "cuda":
            why = ("runs the attention eagerly, and with doc_ids on CUDA the split backend's causal part is "
                   "flex_attention, which eagerly is a dense O(T^2) fallback. Pass seq_lens (padding) instead of "
                   "doc_ids, or")
        elif torch.is_autocast_enabled(device.type):
            why = ("runs each step's layer inside an op, where autocast does not reach. Cast the model instead "
                   "(model.to(torch.bfloat16)), or under autocast use")
        else:
            return self.memory
        if self._memory_arg == "auto":
            return "recompute_tiled"
        raise ValueError(f"Eagle3Model: memory={self.memory!r} {why} memory='recompute', 'recompute_tiled' or 'auto'.")

    def _staged_params(self) -> list[tuple[str, Tensor]]:
        """The parameters a step's layer reads (the staged ops take them as inputs)."""
        draft = self.draft_model
        return [("draft_model.embed_tokens.weight", draft.embed_tokens.weight),
                *(("draft_model.midlayer." + n, p) for n, p in draft.midlayer.named_parameters())]

    def _buffer(self, policy: str, rounds: list[Tensor]) -> Tensor:
        """The static K/V buffer of the rounds so far (Note [writing a round]); inside a
        recomputed step nothing is saved anyway, so the buffer is built plainly there."""
        if policy == "save":
            return _build_buffer(rounds, self.length)
        return _round_buffer(self.length, *rounds)

    def _loss(self, hidden: Tensor, target, soft: Tensor | None, halo: Tensor | None, target_pad: Tensor | None,
              counted: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """Step s's summed cross entropy and hits against the target at t + s (``head_loss``), over
        this process's rows (Note [sequence shards])."""
        draft = self.draft_model
        args = dict(eps=draft.config.rms_norm_eps, chunk_rows=self.chunk_rows)
        norm, head = draft.norm.weight, draft.lm_head.weight
        if soft is None:  # int ids: global, read at t + s
            return head_loss(hidden, norm, head, self.sequence.at(target_pad, s), counted, **args)
        nll_sum = hit_sum = 0
        for lo, hi, rows in self.sequence.shifted(soft, halo, s):
            if hi <= lo:
                continue
            if isinstance(target, TargetHead):
                rows = TargetHead(rows, target.weight)
            elif isinstance(target, TargetLogits):
                rows = TargetLogits(rows)
            n, h = head_loss(hidden[:, lo:hi], norm, head, rows, counted[:, lo:hi], **args)
            nll_sum, hit_sum = nll_sum + n, hit_sum + h
        return nll_sum, hit_sum

    def _check_inputs(self, input_ids: Tensor, hidden_states: Tensor, target, loss_mask: Tensor) -> None:
        where, seq = "Eagle3Model", self.sequence
        cfg = self.draft_model.config
        for name, t in (("input_ids", input_ids), ("hidden_states", hidden_states), ("loss_mask", loss_mask)):
            if not isinstance(t, Tensor):
                raise ValueError(f"{where}: {name} must be a Tensor, got {type(t).__name__}.")
        if input_ids.dim() != 2 or input_ids.shape[1] != self.q_len:
            raise ValueError(
                f"{where}: input_ids must be [B, T] with T = q_len = {self.q_len}, got shape "
                f"{_shape(input_ids)}. Pad or pack batches to q_len{seq.hint('input_ids', local=False)}."
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.uint64) or input_ids.is_complex():
            raise ValueError(
                f"{where}: input_ids must be integer token ids (e.g. int64), got dtype {input_ids.dtype}."
            )
        B, T = input_ids.shape
        L = seq.local_len()
        rows = seq.rows_name
        if hidden_states.dim() != 3 or hidden_states.shape[:2] != (B, L):
            raise ValueError(
                f"{where}: hidden_states must be [B, {rows}, 3 * target_hidden_size] with "
                f"B = {B} (from input_ids), {rows} = {L}, got shape "
                f"{_shape(hidden_states)}{seq.hint('hidden_states', local=True)}."
            )
        if not hidden_states.dtype.is_floating_point:
            raise ValueError(f"{where}: hidden_states must be floating point, got dtype {hidden_states.dtype}.")
        if isinstance(target, (TargetLogits, TargetHead)):
            soft = target.logits if isinstance(target, TargetLogits) else target.hidden
            name = "TargetLogits.logits" if isinstance(target, TargetLogits) else "TargetHead.hidden"
            if not isinstance(soft, Tensor) or soft.dim() != 3 or soft.shape[:2] != (B, L):
                got = f"shape {_shape(soft)}" if isinstance(soft, Tensor) else type(soft).__name__
                raise ValueError(
                    f"{where}: {name} must be [B, {rows}, ...] with B = {B}, {rows} = {L}, got "
                    f"{got}{seq.hint(name, local=True)}."
                )
        elif not isinstance(target, Tensor):
            raise ValueError(
                f"{where}: target must be a Tensor (probabilities or ids), TargetLogits or TargetHead, "
                f"got {type(target).__name__}."
            )
        elif target.dtype.is_floating_point:
            if target.shape != (B, L, cfg.draft_vocab_size):
                raise ValueError(
                    f"{where}: a float target must be [B, {rows}, draft_vocab_size] = "
                    f"[{B}, {L}, {cfg.draft_vocab_size}] probabilities, got shape "
                    f"{_shape(target)}{seq.hint('target', local=True)}."
                )
        elif target.shape != (B, T):
            raise ValueError(
                f"{where}: an int target must be [B, T] = [{B}, {T}] draft-vocabulary ids, got "
                f"shape {_shape(target)}{seq.hint('target', local=False)}."
            )
        if loss_mask.shape != (B, T):
            raise ValueError(
                f"{where}: loss_mask must be [B, T] = [{B}, {T}], got {_shape(loss_mask)}"
                f"{seq.hint('loss_mask', local=False)}."
            )

    def extra_repr(self) -> str:
        return (f"q_len={self.q_len}, length={self.length}, attention_backend={self.attention_backend!r}, "
                f"memory={self.memory!r}")


# Note [writing a round]
#     Eagle3 TTT step s attends over the K/V of steps 0..s, a static buffer
#     [B, Hkv, Q_LEN * length, D] with round s at [s * Q_LEN, (s + 1) * Q_LEN). Two ways of
#     writing a round into a buffer that lives outside the step both fail for training:
#       - in place (``k_buf[:, :, s * Q_LEN:(s + 1) * Q_LEN] = k``): step s - 1's attention saved
#         the buffer for its backward, so backward() raises "modified by an inplace operation";
#       - functionally with the buffer as an input of a compiled step (``index_copy``, as the demo
#         does in inference): the buffer of step 1 is a fresh zeros tensor, that of step 2 an
#         output of step 1 that requires grad, and dynamo guards on requires_grad, so it compiles
#         a second graph ("tensor 'k_buf' requires_grad mismatch").
#     Here the buffer never exists outside the step. Each step keeps its round as its own tensor
#     and the buffer of step s is built from the rounds so far plus zeros for the dead ones,
#     ``cat([k_0, ..., k_s, 0])``, inside the one compiled graph of the whole unroll: nothing is
#     written in place (autograd saves no tensor that is later modified), no buffer is a graph
#     input (no requires_grad guard), and cat's backward hands each round exactly its slice of the
#     buffer's gradient. Built that way and saved for backward, the buffers would cost
#     O(length**2) memory (step s holds a whole buffer: 7 steps at Q_LEN 8192, 8 K/V heads, d 128,
#     bf16 keep 1.5 GiB of buffers where the rounds are 0.22 GiB), so the cat runs under activation
#     checkpointing: the compiled graph saves only the rounds (O(length)) and rebuilds each
#     step's buffer in the backward, one copy of the rounds per step (tests/test_draft.py checks
#     what the compiled step saves; docs/benchmarks.md has the bytes). Only the compiled step gains:
#     eagerly the attention's own autograd node keeps the buffer it was given, so eager runs
#     (the tests' reference) build it plainly and stay O(length**2).
def _round_buffer(length: int, *rounds: Tensor) -> Tensor:
    """``cat([r_0, ..., r_s])`` padded with zeros (finite, never attended) for the rounds not yet
    written: the static buffer ``[B, H, Q_LEN * length, D]``."""
    T = rounds[0].shape[2]
    buf = torch.cat(rounds, dim=2) if len(rounds) > 1 else rounds[0]  # [B, H, T * (s + 1), D]
    # One op for the zeros (not a cat with a zeros tensor): a separate zeros tensor would be
    # constant-folded out of the checkpointed region and saved for backward.
    return F.pad(buf, (0, 0, 0, T * (length - len(rounds))))  # [B, H, T * length, D]


def _build_buffer(rounds: list[Tensor], length: int) -> Tensor:
    """:func:`_round_buffer`, under activation checkpointing when compiled with autograd
    (Note [writing a round])."""
    needs_grad = torch.is_grad_enabled() and any(r.requires_grad for r in rounds)
    if not (needs_grad and torch.compiler.is_compiling()):
        return _round_buffer(length, *rounds)
    return torch.utils.checkpoint.checkpoint(_round_buffer, length, *rounds, use_reentrant=False)
