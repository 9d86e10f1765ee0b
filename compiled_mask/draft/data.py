"""Chat data for draft training: JSON lines -> tokens with an assistant mask -> packed rows.

Three steps, each a function:

    read_conversations(path)        JSON lines in the ShareGPT (``conversations: [{from, value}]``)
                                    or OpenAI (``messages: [{role, content}]``) shape -> messages
    tokenize_conversation(tok, m)   the target's chat template -> token ids and a mask that is
                                    True on the tokens the assistant wrote (its turn-end included)
    pack_documents(lengths, q_len)  conversations -> rows of Q_LEN positions, several per row

A row holds whole conversations one after another (a document each, ``doc_ids``, -1 for the
unused tail), so no position is padding unless no remaining conversation fits. The aligned
tensors :class:`~compiled_mask.draft.Eagle3Model` takes are built by :func:`row_layout` (Note
[one conversation, n - 1 positions]).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DataError",
    "DataStats",
    "Document",
    "read_conversations",
    "tokenize_conversation",
    "tokenize_conversations",
    "pack_documents",
    "row_layout",
]

# Speaker names of the ShareGPT shape (and OpenAI's roles) -> chat-template roles.
_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A malformed line of a conversation file: the message names the file, the line and what is
    wrong (``data.jsonl:17: ...``)."""


@dataclasses.dataclass
class DataStats:
    """What reading, tokenizing and packing kept and dropped (printed by the trainer).

    Attributes:
        lines: non-blank lines read.
        conversations: conversations kept.
        skipped: malformed lines skipped (``skip_malformed=True``), by reason.
        truncated: conversations cut to the row length.
        no_assistant_tokens: conversations dropped because no assistant token was left to learn.
    """

    lines: int = 0
    conversations: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated: int = 0
    no_assistant_tokens: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        """One line: ``48 conversations (50 lines; skipped 2 malformed (not valid JSON: 2); ...)``."""
        parts = [f"{self.conversations} conversations ({self.lines} lines"]
        n_skipped = sum(self.skipped.values())
        if n_skipped:
            why = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            parts.append(f"; skipped {n_skipped} malformed ({why})")
        if self.truncated:
            parts.append(f"; truncated to the row length: {self.truncated}")
        if self.no_assistant_tokens:
            parts.append(f"; dropped with no assistant token: {self.no_assistant_tokens}")
        return "".join(parts) + ")"


class _Malformed(ValueError):
    """What is wrong with one record; ``kind`` is its short name in the skipped counts."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _messages(record: Any) -> list[dict[str, str]]:
    """One JSON record -> ``[{role, content}]``; _Malformed (no file or line yet) when malformed."""
    if not isinstance(record, dict):
        raise _Malformed("not an object", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        key, speaker, text = "conversations", "from", "value"
    elif "messages" in record:
        key, speaker, text = "messages", "role", "content"
    else:
        raise _Malformed("no conversation", f"no 'conversations' (ShareGPT) or 'messages' (OpenAI) list; "
                         f"keys: {sorted(record)[:8]}")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise _Malformed("no conversation", f"'{key}' must be a non-empty list, got {turns!r:.60}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or speaker not in turn or text not in turn:
            raise _Malformed("malformed turn", f"'{key}'[{i}] must be an object with '{speaker}' and "
                             f"'{text}', got {turn!r:.80}")
        role = _ROLES.get(str(turn[speaker]).lower())
        if role is None:
            raise _Malformed("unknown role", f"'{key}'[{i}]: unknown {speaker} {turn[speaker]!r} (known: "
                             f"{', '.join(sorted(_ROLES))})")
        if not isinstance(turn[text], str):
            raise _Malformed("malformed turn", f"'{key}'[{i}].{text} must be a string, got "
                             f"{type(turn[text]).__name__}")
        messages.append({"role": role, "content": turn[text]})
    if not any(m["role"] == "assistant" for m in messages):
        raise _Malformed("no assistant turn", f"no assistant turn in '{key}' (nothing for the draft to learn)")
    return messages


def read_conversations(path: str | Path, *, skip_malformed: bool = False,
                       stats: DataStats | None = None) -> list[list[dict[str, str]]]:
    """Read a JSON-lines file of conversations, in either common shape.

    Each non-blank line is one object, ShareGPT's ``{"conversations": [{"from": "human",
    "value": ...}, {"from": "gpt", "value": ...}]}`` or OpenAI's ``{"messages": [{"role":
    "user", "content": ...}, {"role": "assistant", "content": ...}]}``; the shapes may be mixed.

    Args:
        path: the ``.jsonl`` file.
        skip_malformed: skip a malformed line (counted in ``stats.skipped`` by reason) instead of
            raising.
        stats: counts to update (a new :class:`DataStats` if None).

    Returns:
        The conversations, each a list of ``{"role": "system" | "user" | "assistant",
        "content": str}``.

    Raises:
        DataError: a malformed line (``skip_malformed=False``): ``FILE:LINE: what is wrong``.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    stats = stats if stats is not None else DataStats()
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.lines += 1
            try:
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise _Malformed("not valid JSON", f"not valid JSON ({e.msg} at column {e.colno})") from None
                messages = _messages(record)
            except _Malformed as e:
                if not skip_malformed:
                    raise DataError(f"{path}:{number}: {e}. Fix the line, or pass "
                                    f"--skip-malformed to skip such lines.") from None
                stats.skip(e.kind)
                continue
            out.append(messages)
    stats.conversations += len(out)
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation under the tokenizer's chat template, and the assistant mask.

    The mask is True on the tokens of each assistant turn: from the end of the template's
    generation prompt to the end of the turn (its end-of-turn token included, which the draft
    must predict too), found by rendering the conversation up to each assistant turn (Note
    [assistant spans]). The text is rendered once and tokenized without adding special tokens
    (the template writes its own BOS).

    Args:
        tokenizer: a Hugging Face fast tokenizer with a chat template (``tokenizer.chat_template``).
        messages: ``[{role, content}]`` as :func:`read_conversations` returns them.

    Returns:
        ``(ids, assistant_mask)``, two lists of the same length.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template (tokenizer.chat_template is "
                         "empty): set one in its tokenizer_config.json, or use an instruct model's "
                         "tokenizer.")
    # Note [assistant spans]
    #     Rendering messages[:i] with the generation prompt gives the text before assistant turn
    #     i's content; rendering messages[:i + 1] gives the text up to the end of that turn. For
    #     templates where both are prefixes of the full text (Llama 3, Qwen 2.5, Mistral, ...),
    #     the characters in between are exactly the assistant's; tokens are then assigned by
    #     their character offsets. A template that rewrites earlier turns (Qwen 3 drops earlier
    #     reasoning) breaks the prefix property: then the content string itself is located in the
    #     text, after the previous span.
    text = _render(tokenizer, messages, False)
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if text.startswith(through) and through.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(through)
        else:
            start = text.find(m["content"], cursor)
            if start < 0:
                raise ValueError(f"assistant turn {i} does not appear in the rendered chat "
                                 f"template text; the template rewrites it.")
            end = start + len(m["content"])
        spans.append((start, end))
        cursor = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = []
    k = 0
    for a, _ in offsets:
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        mask.append(k < len(spans) and spans[k][0] <= a < spans[k][1])
    return list(ids), mask


@dataclasses.dataclass
class Document:
    """One tokenized conversation.

    Attributes:
        ids: ``[n]`` int64 target-vocabulary token ids.
        assistant: ``[n]`` bool, True on tokens the assistant wrote.
    """

    ids: Tensor
    assistant: Tensor

    def __len__(self) -> int:
        return self.ids.numel()


def tokenize_conversations(tokenizer: Any, conversations: Sequence[list[dict[str, str]]], q_len: int,
                           stats: DataStats | None = None) -> list[Document]:
    """Tokenize every conversation; cut each to ``q_len + 1`` tokens (one row,
    Note [one conversation, n - 1 positions]) and drop those with no assistant token left.

    Args:
        tokenizer: the target's tokenizer (see :func:`tokenize_conversation`).
        conversations: as :func:`read_conversations` returns them.
        q_len: positions per row (Q_LEN).
        stats: counts to update (``truncated``, ``no_assistant_tokens``).

    Returns:
        The documents, in order.
    """
    stats = stats if stats is not None else DataStats()
    docs = []
    for messages in conversations:
        ids, mask = tokenize_conversation(tokenizer, messages)
        if len(ids) > q_len + 1:
            ids, mask = ids[: q_len + 1], mask[: q_len + 1]
            stats.truncated += 1
        # Position t learns token t + 2 (Note [one conversation, n - 1 positions]).
        if len(ids) < 3 or not any(mask[2:]):
            stats.no_assistant_tokens += 1
            continue
        docs.append(Document(torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool)))
    return docs


# Note [one conversation, n - 1 positions]
#     Eagle3Model takes its inputs aligned for TTT step 0 (unroll.py): at position t the target
#     has read tokens x_0..x_t, ``hidden_states[t]`` is its auxiliary states there, ``input_ids[t]``
#     is x_{t+1} and ``target[t]`` is the target's distribution of x_{t+2}, i.e. its next-token
#     distribution at position t + 1. A conversation of n tokens therefore fills n - 1 positions,
#     t = 0..n-2 (x_{t+1} must exist), and the prediction at t counts iff x_{t+2} exists and is
#     an assistant token. In a packed row, a document starting at position p0 puts its t at
#     p0 + t; the last position of a document never counts (x_{t+2} would be the next
#     document's), and Eagle3Model's ``doc_ids`` keep later TTT steps inside the document.


def pack_documents(lengths: Sequence[int], q_len: int) -> list[list[int]]:
    """Pack documents into rows of ``q_len`` positions, first fit in decreasing length.

    A document of n tokens takes n - 1 positions (Note [one conversation, n - 1 positions]);
    each must fit one row (:func:`tokenize_conversations` cuts longer ones).

    Args:
        lengths: tokens of each document.
        q_len: positions per row.

    Returns:
        Rows, each the list of document indices it holds, in the order they sit in the row.
        Deterministic for the same input.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        need = lengths[i] - 1
        if need > q_len or need < 1:
            raise ValueError(f"pack_documents: document {i} has {lengths[i]} tokens; a row takes "
                             f"2 to q_len + 1 = {q_len + 1}.")
        for r, space in enumerate(free):
            if space >= need:
                rows[r].append(i)
                free[r] -= need
                break
        else:
            rows.append([i])
            free.append(q_len - need)
    return rows


def row_layout(docs: Sequence[Document], q_len: int) -> dict[str, Tensor]:
    """The per-position tensors of one row holding ``docs`` one after another.

    Args:
        docs: the row's documents, in order (together at most ``q_len`` positions).
        q_len: positions per row.

    Returns:
        ``input_ids [T]`` (x_{t+1}; 0 on the unused tail), ``loss_mask [T]`` bool, ``doc_ids [T]``
        (the document's index in the row, -1 on the tail), and ``starts``/``lengths`` ``[len(docs)]``
        (where each document's positions begin, and its token count) for placing the target's
        per-token outputs (:meth:`~compiled_mask.draft.target.TargetModel.rows`).
    """
    input_ids = torch.zeros(q_len, dtype=torch.int64)
    loss_mask = torch.zeros(q_len, dtype=torch.bool)
    doc_ids = torch.full((q_len,), -1, dtype=torch.int64)
    starts, lengths = [], []
    p = 0
    for d, doc in enumerate(docs):
        n = len(doc)
        input_ids[p : p + n - 1] = doc.ids[1:]
        loss_mask[p : p + n - 2] = doc.assistant[2:]
        doc_ids[p : p + n - 1] = d
        starts.append(p)
        lengths.append(n)
        p += n - 1
    if p > q_len:
        raise ValueError(f"row_layout: the documents take {p} positions, more than q_len={q_len}.")
    return {"input_ids": input_ids, "loss_mask": loss_mask, "doc_ids": doc_ids,
            "starts": torch.tensor(starts, dtype=torch.int64),
            "lengths": torch.tensor(lengths, dtype=torch.int64)}
