"""Acceptance length: how many tokens greedy chain speculation emits per target forward.

The draft proposes up to k tokens from the target's hidden states, the target checks them in one
forward and keeps the longest prefix equal to its own greedy tokens, plus one token of its own
(the first mismatch's correction, or the next token when all k match). tau, the acceptance
length, is the mean number of tokens emitted per verifying target forward (1 <= tau <= k + 1);
speculation speeds decoding up by about tau over the cost of the draft's k steps.

The draft's inference here (:func:`draft_chain`) is the TTT unroll of
:class:`~compiled_mask.draft.Eagle3Model` at one position (Note [the chain is the unroll]), so
what training measures (``acces``) is what decoding gets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compiled_mask.draft.model import Eagle3DraftModel
from compiled_mask.draft.target import TargetModel

__all__ = ["draft_chain", "speculate", "acceptance_length", "EvalResult", "prompts_from_conversations"]


# Note [the chain is the unroll]
#     In the unroll, TTT step 0 at position t reads (fc(aux_t), embed(x_{t+1})) with RoPE
#     position t and attends causally over the round-0 keys of positions 0..t; step s >= 1 at t
#     reads (its step s - 1 hidden state at t, embed(x_{t+1+s})) with RoPE position t + s and
#     attends the round-0 keys 0..t plus its own keys of rounds 1..s at position t (the
#     diagonal). At decoding time the context is x_0..x_{n-1} with the target's states, the
#     target has chosen x_n, and the draft runs that unroll at t = n - 1 only: step 0 on the
#     whole context (its round-0 keys), then k - 1 chained steps with its own proposals in place
#     of x_{t+1+s}. Fed the true tokens instead (``forced``), its logits are the unroll's
#     (tests/test_train_evaluate.py checks them against Eagle3Model's).


def _attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """``q [1, Hq, m, D]`` over ``k, v [1, Hkv, n, D]`` (GQA by repeating K/V heads)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@torch.no_grad()
def draft_chain(draft: Eagle3DraftModel, aux: Tensor, next_ids: Tensor, k: int,
                forced: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """The draft's k chained proposals after a context (Note [the chain is the unroll]).

    Args:
        draft: the draft model.
        aux: ``[n, 3 * target_hidden]`` the target's auxiliary states at context positions 0..n-1.
        next_ids: ``[n]`` the token after each context position (x_1..x_n; x_n is the target's
            choice after the context), target-vocabulary ids.
        k: proposals to make (TTT steps).
        forced: optional ``[k - 1]`` target ids fed to steps 1..k-1 instead of the draft's own
            proposals (to compare with the training unroll on true tokens).

    Returns:
        ``(proposals [k], logits)``: target-vocabulary ids x_{n+1}..x_{n+k} as the draft
        guesses them, and each step's ``[draft_vocab]`` logits.
    """
    layer = draft.midlayer
    attn = layer.self_attn
    dtype = draft.fc.weight.dtype
    n = aux.shape[0]
    positions = torch.arange(n + k, device=aux.device)
    cos_all, sin_all = draft.rope_cos_sin(positions, dtype)  # [n + k, D]
    d2t = draft.d2t + torch.arange(draft.d2t.numel(), device=draft.d2t.device)  # draft id -> target id

    def block(embeds: Tensor, hidden: Tensor, pos: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)[None]  # [1, m, 2H]
        q, key, val = attn.project(x, cos_all[pos], sin_all[pos])  # [1, Hq, m, D], [1, Hkv, m, D]
        return x, q, key, val

    def finish(hidden: Tensor, out: Tensor) -> Tensor:
        out = out.transpose(1, 2).reshape(1, out.shape[2], -1)[0]  # [m, Hq * D]
        hidden = hidden + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))  # [m, H]

    # Step 0 over the whole context: its keys are round 0.
    hidden0 = draft.project_hidden_states(aux.to(dtype))  # [n, H]
    embeds = draft.embed_input_ids(next_ids).to(dtype)  # [n, H]
    _, q, k0, v0 = block(embeds, hidden0, slice(0, n))
    hidden = finish(hidden0, _attend(q, k0, v0, causal=True))[-1:]  # [1, H], position n - 1
    keys, values = [k0], [v0]
    proposals, logits_all = [], []
    for s in range(k):
        logits = draft.compute_logits(hidden)[0]  # [draft_vocab]
        logits_all.append(logits)
        proposals.append(d2t[logits.argmax()])
        if s == k - 1:
            break
        token = proposals[-1] if forced is None else forced[s].to(d2t.device)
        emb = draft.embed_input_ids(token.reshape(1)).to(dtype)  # [1, H]
        pos = slice(n - 1 + s + 1, n + s + 1)  # RoPE position t + s + 1
        _, q, key, val = block(emb, hidden, pos)
        keys.append(key)
        values.append(val)
        out = _attend(q, torch.cat(keys, 2), torch.cat(values, 2), causal=False)
        hidden = finish(hidden, out)
    return torch.stack(proposals), logits_all


@dataclasses.dataclass
class EvalResult:
    """Acceptance statistics.

    Attributes:
        tau: mean tokens emitted per verifying target forward.
        verifications: verifying target forwards; emitted: tokens they emitted.
        accepted: per draft position i, how many verifications accepted proposal i.
        k: proposals per verification; conversations: prompts decoded.
    """

    tau: float
    verifications: int
    emitted: int
    accepted: list[int]
    k: int
    conversations: int

    def summary(self) -> str:
        rates = "/".join(f"{a / max(1, self.verifications):.2f}" for a in self.accepted)
        return (f"tau {self.tau:.2f} (k={self.k}, {self.conversations} conversations, "
                f"{self.emitted} tokens in {self.verifications} target forwards; acceptance by "
                f"position {rates})")


@torch.no_grad()
def speculate(target: TargetModel, draft: Eagle3DraftModel, prompt: Tensor, k: int, max_new_tokens: int,
              eos_ids: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """Greedy chain speculative decoding of one prompt.

    Args:
        target, draft: the models (the draft's ``d2t`` maps its proposals to target ids).
        prompt: ``[n]`` token ids (the chat template's text up to the assistant's turn).
        k: draft tokens per verification.
        max_new_tokens: stop after this many generated tokens (or at an ``eos_ids`` token).

    Returns:
        ``(generated ids, accepted count of each verification)``. The generated ids equal the
        target's own greedy decoding (speculation never changes them).
    """
    device = target.device
    ids = prompt.to(device)
    aux, last = target.features(ids[None])
    nxt = int(target.logits(last[0, -1]).argmax())  # x_n, chosen by the target after the prompt
    generated = [nxt]
    accepted_counts = []
    eos = {int(e) for e in eos_ids}
    while len(generated) < max_new_tokens and nxt not in eos:
        context = ids
        next_ids = torch.cat([context[1:], torch.tensor([nxt], device=device)])
        proposals, _ = draft_chain(draft, aux[0].to(draft.fc.weight.device), next_ids.to(draft.fc.weight.device), k)
        proposals = proposals.to(device)
        seq = torch.cat([context, torch.tensor([nxt], device=device), proposals])  # [n + 1 + k]
        aux_all, last_all = target.features(seq[None])
        n = context.numel()
        greedy = target.logits(last_all[0, n:]).argmax(-1)  # [k + 1]: the target's token after x_n, d_1, ..
        a = 0
        while a < k and int(greedy[a]) == int(proposals[a]) and int(proposals[a]) not in eos:
            a += 1
        accepted_counts.append(a)
        new = [*proposals[:a].tolist(), int(greedy[a])]
        # The context now ends with x_n and the accepted proposals; their states are valid
        # (causal: they never saw the rejected ones).
        ids = seq[: n + 1 + a]
        aux = aux_all[:, : n + 1 + a]
        for t in new:
            generated.append(int(t))
            if int(t) in eos or len(generated) >= max_new_tokens:
                break
        nxt = generated[-1]
    return generated, accepted_counts


def prompts_from_conversations(tokenizer: Any, conversations: Sequence[list[dict[str, str]]]) -> list[Tensor]:
    """Each conversation up to its first assistant turn, with the template's generation prompt."""
    out = []
    for messages in conversations:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
        out.append(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64))
    return out


def acceptance_length(target: TargetModel, draft: Eagle3DraftModel, prompts: Sequence[Tensor], k: int,
                      max_new_tokens: int = 64, eos_ids: Sequence[int] = ()) -> EvalResult:
    """tau over held-out prompts (:func:`speculate` on each).

    Args:
        target, draft: the models.
        prompts: token ids of each prompt (:func:`prompts_from_conversations`).
        k: draft tokens per verification (servers' ``num_speculative_tokens``).
        max_new_tokens: tokens to generate per prompt.
        eos_ids: ids that end a generation.
    """
    was_training = draft.training
    draft.eval()
    accepted = [0] * k
    counts: list[int] = []
    try:
        for prompt in prompts:
            _, per_verification = speculate(target, draft, prompt, k, max_new_tokens, eos_ids)
            counts += per_verification
            for a in per_verification:
                for i in range(a):
                    accepted[i] += 1
    finally:
        draft.train(was_training)
    emitted = sum(a + 1 for a in counts)
    tau = emitted / len(counts) if counts else float("nan")
    return EvalResult(tau, len(counts), emitted, accepted, k, len(prompts))
