"""The training-time test (TTT) unroll of an Eagle3 draft: one compiled graph for the whole step.

:class:`Eagle3Model` runs it as TorchSpec's ``Eagle3Model`` and SpecForge's ``OfflineEagle3Model``
do: step s feeds its hidden states to step s + 1, shifts the token ids, target and loss mask by one
more position, writes its K/V as round s of the static buffer and attends over rounds 0..s with the
Eagle3 mask. Each step's loss is the cross entropy against the target's next-token distribution
(or ids) under the loss mask; the total weights step s by 0.8**s, as Eagle3 does. Everything,
including the loss, is tensor ops with no data-dependent Python, so
``torch.compile(Eagle3Model(...), fullgraph=True)`` gives one graph for the forward and backward of
the whole step, for every batch of the same shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from compiled_mask._checks import _check_input_layout
from compiled_mask._layout import _valid_queries
from compiled_mask._op import _first_keys
from compiled_mask.draft.model import Eagle3DraftModel
from compiled_mask.modules import Eagle3Attention

__all__ = ["Eagle3Model", "Eagle3Output"]


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


class Eagle3Model(nn.Module):
    """Eagle3 training-time test: ``length`` draft steps, the loss and its per-step parts.

    As TorchSpec's ``Eagle3Model`` (``draft_model``, ``length``, ``attention_backend``): step s
    embeds the ids shifted by s, runs the decoder layer on them and on the previous step's hidden
    states (step 0: ``fc`` of the target's auxiliary states), writes its K/V as round s and
    attends over rounds 0..s with :class:`~compiled_mask.Eagle3Attention` (query q sees the causal
    keys of round 0 and key q of each later round). RoPE positions of step s are ``t + s``. The
    loss of step s compares ``compute_logits`` at position t with the target at ``t + s``.

    Compile it whole: ``torch.compile(Eagle3Model(...), fullgraph=True)``; one graph serves the
    forward and backward of every batch of the same shape (new ``seq_lens``/``doc_ids`` values
    included; None and a tensor are two graphs, so pass the same kind every call).
    :class:`compiled_mask.distributed.Eagle3ContextParallelModel` runs the same step with the
    sequence sharded over several GPUs.

    Args:
        draft_model: the :class:`Eagle3DraftModel`.
        q_len: tokens per sample (T); batches are padded or packed to it.
        length: TTT steps (Eagle3 uses 7).
        attention_backend: ``Eagle3Attention``'s backend: "split", "flex" or "fa4".
        loss_decay: step s's loss weight is ``loss_decay ** s`` (Eagle3: 0.8).

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
                 attention_backend: str = "split", loss_decay: float = 0.8) -> None:
        super().__init__()
        for name, value in (("q_len", q_len), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Eagle3Model: {name} must be an int >= 1, got {name}={value!r}.")
        self.draft_model = draft_model
        self.q_len = q_len
        self.length = length
        self.attention_backend = attention_backend
        self.attn = Eagle3Attention(q_len, length, backend=attention_backend)
        self.loss_decay = loss_decay
        self.register_buffer("live_rounds", torch.arange(1, length + 1), persistent=False)  # [length]
        self._chunks, self._chunk_len = (0,), q_len  # the whole sequence (Note [sequence shards])

    def forward(self, input_ids: Tensor, hidden_states: Tensor, target: Tensor, loss_mask: Tensor,
                *, seq_lens: Tensor | None = None, doc_ids: Tensor | None = None) -> Eagle3Output:
        """One TTT unroll: losses and accuracies of every step.

        The inputs are aligned for step 0, as TorchSpec's ``Eagle3Model`` and SpecForge's offline
        trainer receive them: at position t the target model has read tokens ..t, and

        Args:
            input_ids: ``[B, T]`` target-vocabulary ids, the token *after* position t.
            hidden_states: ``[B, T, 3 * target_hidden_size]``, the target's three auxiliary
                hidden states at position t, concatenated.
            target: what step 0 predicts at position t (the token after ``input_ids[:, t]``):
                either ``[B, T, draft_vocab_size]`` float probabilities over the draft vocabulary
                (the target's next-token distribution), or ``[B, T]`` int draft-vocabulary ids,
                -1 where the token is not in the draft vocabulary (no loss there;
                :meth:`Eagle3DraftModel.target_to_draft_ids` maps target ids).
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
        draft = self.draft_model
        T, ahead = self.q_len, self.length - 1  # step s reads position t + s, up to t + ahead
        self._check_inputs(input_ids, hidden_states, target, loss_mask)
        mask = loss_mask.bool()  # [B, T]
        if target.dtype.is_floating_point:
            target_p = target.to(_loss_dtype(target))  # [B, L, V]
            target_next = self._next_chunk_rows(target, ahead).to(target_p.dtype)  # [B, chunks, ahead, V]
            target_ids = self._gather_rows(target_p.argmax(-1))  # [B, T], once for all steps
        else:
            target_p = target_next = None
            target_ids = target.clamp(min=0)
            mask = mask & (target >= 0)
        first_key = None
        if seq_lens is not None or doc_ids is not None:
            _check_input_layout(self._where, T, seq_lens, doc_ids, input_ids, name="input_ids")
            first_key = _first_keys(T, seq_lens, doc_ids)  # [B, T], Note [one layout table]
            mask = mask & _valid_queries(T, first_key, first_key.device)  # valid positions
        # Past T: no token (id 0), nothing counts (Note [sequence shards]).
        ids_pad, mask_pad, target_ids_pad = (F.pad(t, (0, ahead)) for t in (input_ids, mask, target_ids))
        first_key_pad = None if first_key is None else F.pad(first_key, (0, ahead))  # [B, T + ahead]
        step_masks = []
        for s in range(self.length):
            step_mask = self._at(mask_pad, s)  # [B, L]: loss_mask at t + s
            if first_key_pad is not None:  # the shifted target in the same document
                step_mask = step_mask & (self._at(first_key_pad, s) == self._at(first_key_pad, 0))
            step_masks.append(step_mask)
        counts = self._sum_over_ranks(torch.stack([m.sum() for m in step_masks]))  # [length] int64

        hidden = draft.project_hidden_states(hidden_states.to(draft.fc.weight.dtype))  # [B, L, H]
        positions = torch.arange(T + ahead, device=input_ids.device)  # [T + ahead]
        cos_all, sin_all = draft.rope_cos_sin(positions, hidden.dtype)  # [T + ahead, D] each
        k_rounds: list[Tensor] = []
        v_rounds: list[Tensor] = []
        nll_sums, hit_sums = [], []
        for s in range(self.length):
            embeds = draft.embed_input_ids(self._at(ids_pad, s)).to(hidden.dtype)  # [B, L, H]
            hidden = self._layer(embeds, hidden, self._at(cos_all, s, dim=0), self._at(sin_all, s, dim=0),
                                 s, k_rounds, v_rounds, seq_lens, doc_ids)
            # Step s predicts, at position t, what step 0 predicts at t + s.
            logits = draft.compute_logits(hidden)  # [B, L, V]
            logp = torch.log_softmax(logits.to(_loss_dtype(logits)), dim=-1)  # [B, L, V], float32 or wider
            step_ids = self._at(target_ids_pad, s)  # [B, L]
            if target_p is None:
                nll = -logp.gather(-1, step_ids.unsqueeze(-1)).squeeze(-1)  # [B, L]
            else:
                nll = self._soft_nll(logp, target_p, target_next, s)  # [B, L]
            weight = step_masks[s].to(logp.dtype)  # [B, L]
            nll_sums.append((nll * weight).sum())
            hit_sums.append(((logits.argmax(-1) == step_ids).to(logp.dtype) * weight).sum())
        # Each step's masked mean over all positions (of all ranks); 0 where none counts.
        counts = counts.to(logp.dtype).clamp(min=1.0)
        plosses, acces = self._reduce_steps(torch.stack(nll_sums) / counts, torch.stack(hit_sums) / counts)
        loss = sum(self.loss_decay**s * plosses[s] for s in range(self.length))
        return Eagle3Output(loss, plosses, acces)

    # Note [sequence shards]
    #     The unroll is written for a process that holds some chunks of the sequence: chunks
    #     ``_chunks`` (global chunk indices, in local order) of ``_chunk_len`` positions each, L
    #     positions in all. Here that is the whole sequence, one chunk; Eagle3ContextParallelModel
    #     (distributed.py) holds a rank's ``shard_positions`` and overrides the four hooks below
    #     that need other ranks. Step s reads, at local position t, what step 0 reads at global
    #     position t + s (ids, loss mask, target, RoPE position, same-document check):
    #       - global ``[B, T]`` inputs (ids, loss mask, int targets, the layout table) are padded
    #         by ``length - 1`` and sliced at each chunk's positions + s (:meth:`_at`);
    #       - the float target ``[B, L, V]`` is local: the last s rows of a chunk read the first s
    #         rows of the next global chunk, ``_next_chunk_rows`` (zeros after the last chunk);
    #       - positions past T read id 0 and target 0 under a False mask, so they count nothing,
    #         and each step's loss is its masked sum over the count of all ranks
    #         (``_sum_over_ranks``); ``_reduce_steps`` turns the per-rank parts into the totals.
    #     On one process the hooks are identities (and a zero halo): the same code, no collective.

    def _at(self, x: Tensor, s: int, dim: int = 1) -> Tensor:
        """``x`` (global positions along ``dim``, padded past T) at this process's positions + s."""
        C = self._chunk_len
        parts = [x.narrow(dim, g * C + s, C) for g in self._chunks]
        return torch.cat(parts, dim) if len(parts) > 1 else parts[0]  # L positions along dim

    def _soft_nll(self, logp: Tensor, target_p: Tensor, target_next: Tensor, s: int) -> Tensor:
        """Cross entropy against the float target at t + s, ``[B, L]``: per local chunk, its own
        rows from s on, then the first s rows of the next chunk (no copy of the target)."""
        C = self._chunk_len
        pieces = []
        for j in range(len(self._chunks)):
            chunk_logp = logp[:, j * C : (j + 1) * C]  # [B, C, V]
            pieces.append(-(target_p[:, j * C + s : (j + 1) * C] * chunk_logp[:, : C - s]).sum(-1))  # [B, C - s]
            if s:
                pieces.append(-(target_next[:, j, :s] * chunk_logp[:, C - s :]).sum(-1))  # [B, s]
        return torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]  # [B, L]

    def _next_chunk_rows(self, x: Tensor, n: int) -> Tensor:
        """``x [B, L, ...]`` -> ``[B, chunks, n, ...]``: the first n rows of the global chunk after
        each local chunk, zeros after the last (Note [sequence shards]). One chunk here: zeros."""
        return x.new_zeros(x.size(0), len(self._chunks), n, *x.shape[2:])

    def _gather_rows(self, x: Tensor) -> Tensor:
        """``x [B, L]`` local -> ``[B, T]`` in global order. Here L = T: ``x`` itself."""
        return x

    def _sum_over_ranks(self, x: Tensor) -> Tensor:
        """``x`` summed over the ranks that share the sequence (no gradient). Here: ``x``."""
        return x

    def _reduce_steps(self, plosses: Tensor, acces: Tensor) -> tuple[Tensor, Tensor]:
        """This process's parts of the per-step losses and accuracies -> the totals. Here: themselves."""
        return plosses, acces

    def _layer(self, embeds: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, s: int,
               k_rounds: list[Tensor], v_rounds: list[Tensor], seq_lens: Tensor | None,
               doc_ids: Tensor | None) -> Tensor:
        """One pass of the decoder layer (TTT step s): the next hidden states ``[B, L, H]`` (L = T
        on one process, the rank's positions under context parallelism)."""
        layer = self.draft_model.midlayer
        B, L, _ = hidden.shape
        residual = hidden
        x = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)  # [B, L, 2H]
        q, k, v = layer.self_attn.project(x, cos, sin)
        k_rounds.append(k)
        v_rounds.append(v)
        k_buf = _build_buffer(k_rounds, self.length)  # [B, Hkv, L * length, D]
        v_buf = _build_buffer(v_rounds, self.length)
        out = self.attn(q, k_buf, v_buf, self.live_rounds[s], seq_lens=seq_lens, doc_ids=doc_ids)
        out = out.transpose(1, 2).reshape(B, L, -1)  # [B, L, Hq * D]
        hidden = residual + layer.self_attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))  # [B, L, H]

    def _check_inputs(self, input_ids: Tensor, hidden_states: Tensor, target: Tensor,
                      loss_mask: Tensor) -> None:
        where = self._where
        cfg = self.draft_model.config
        if input_ids.dim() != 2 or input_ids.shape[1] != self.q_len:
            raise ValueError(
                f"{where}: input_ids must be [B, T] with T = q_len = {self.q_len}, got shape "
                f"{tuple(input_ids.shape)}. Pad or pack batches to q_len"
                f"{self._input_hint('input_ids', local=False)}."
            )
        B, T = input_ids.shape
        L = self._chunk_len * len(self._chunks)
        if hidden_states.shape[:2] != (B, L):
            raise ValueError(
                f"{where}: hidden_states must be [B, {self._rows_name}, 3 * target_hidden_size] with "
                f"B = {B} (from input_ids), {self._rows_name} = {L}, got shape "
                f"{tuple(hidden_states.shape)}{self._input_hint('hidden_states', local=True)}."
            )
        if target.dtype.is_floating_point:
            if target.shape != (B, L, cfg.draft_vocab_size):
                raise ValueError(
                    f"{where}: a float target must be [B, {self._rows_name}, draft_vocab_size] = "
                    f"[{B}, {L}, {cfg.draft_vocab_size}] probabilities, got shape "
                    f"{tuple(target.shape)}{self._input_hint('target', local=True)}."
                )
        elif target.shape != (B, T):
            raise ValueError(
                f"{where}: an int target must be [B, T] = [{B}, {T}] draft-vocabulary ids, got "
                f"shape {tuple(target.shape)}{self._input_hint('target', local=False)}."
            )
        if loss_mask.shape != (B, T):
            raise ValueError(
                f"{where}: loss_mask must be [B, T] = [{B}, {T}], got {tuple(loss_mask.shape)}"
                f"{self._input_hint('loss_mask', local=False)}."
            )

    # How _check_inputs names the model, the rows of hidden_states and a float target, and the fix
    # for a wrong shape (Eagle3ContextParallelModel names the rank's shard). A class attribute, not
    # type(self).__name__: fully_shard renames the class (FSDPEagle3Model).
    _where = "Eagle3Model"
    _rows_name = "T"

    def _input_hint(self, name: str, local: bool) -> str:
        return ""

    def extra_repr(self) -> str:
        return f"q_len={self.q_len}, length={self.length}, attention_backend={self.attention_backend!r}"


def _loss_dtype(t: Tensor) -> torch.dtype:
    """float32 for bf16/fp16 (the loss is computed in float32), else the tensor's own dtype."""
    return torch.promote_types(t.dtype, torch.float32)
