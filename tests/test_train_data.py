"""Chat data for draft training (compiled_mask/draft/data.py, vocab.py): both JSON-lines shapes,
malformed lines, the assistant mask under a chat template, packing, the aligned row tensors, the
draft vocabulary, and packed rows against one conversation per row through Eagle3Model."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

import tiny_target  # noqa: E402

from compiled_mask.draft import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model  # noqa: E402
from compiled_mask.draft.batches import make_batch  # noqa: E402
from compiled_mask.draft.data import (  # noqa: E402
    DataError,
    DataStats,
    Document,
    pack_documents,
    read_conversations,
    row_layout,
    tokenize_conversation,
    tokenize_conversations,
)
from compiled_mask.draft.vocab import draft_vocabulary, token_counts  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_target.tokenizer()


def test_both_shapes_read_the_same(tmp_path):
    convs = tiny_target.conversations(6, seed=3)
    a = read_conversations(tiny_target.write_jsonl(tmp_path / "a.jsonl", convs, "sharegpt"))
    b = read_conversations(tiny_target.write_jsonl(tmp_path / "b.jsonl", convs, "openai"))
    c = read_conversations(tiny_target.write_jsonl(tmp_path / "c.jsonl", convs, "mixed"))
    assert a == b == c == convs


@pytest.mark.parametrize("line, what, kind", [
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"', "not valid JSON", "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list", "not an object"),
    ('{"text": "hi"}', "no 'conversations' (ShareGPT) or 'messages' (OpenAI) list", "no conversation"),
    ('{"messages": []}', "'messages' must be a non-empty list", "no conversation"),
    ('{"messages": [{"role": "user"}]}', "'messages'[0] must be an object with 'role' and 'content'",
     "malformed turn"),
    ('{"conversations": [{"from": "robot", "value": "x"}]}', "'conversations'[0]: unknown from 'robot'",
     "unknown role"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "'messages'[0].content must be a string, got int",
     "malformed turn"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn", "no assistant turn"),
])
def test_malformed_line_names_file_line_and_what(tmp_path, line, what, kind):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: {re.escape(what)}.*--skip-malformed"):
        read_conversations(path)
    stats = DataStats()
    convs = read_conversations(path, skip_malformed=True, stats=stats)
    assert len(convs) == 3 and stats.lines == 4 and stats.skipped == {kind: 1}
    assert stats.summary() == f"3 conversations (4 lines; skipped 1 malformed ({kind}: 1))"


def test_assistant_mask_is_the_assistant_turns(tok):
    messages = [{"role": "system", "content": "you are a helpful bot"},
                {"role": "user", "content": "repeat cat"}, {"role": "assistant", "content": "cat cat cat done"},
                {"role": "user", "content": "spell the word sun"}, {"role": "assistant", "content": "s u n done"}]
    ids, mask = tokenize_conversation(tok, messages)
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "<s>"  # the template's BOS, once
    learned = [w for w, m in zip(words, mask) if m]
    assert learned == ["cat", "cat", "cat", "done", "<|end|>", "s", "u", "n", "done", "<|end|>"]


def test_assistant_mask_when_the_template_is_not_prefix_stable():
    """A template whose rendering of a conversation's end differs from the same turn followed by
    more (as Qwen 3 drops earlier reasoning): earlier turns are found by their content."""
    tok = tiny_target.tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% else %}then {% endif %}")
    messages = [{"role": "user", "content": "repeat cat"}, {"role": "assistant", "content": "cat cat cat done"},
                {"role": "user", "content": "repeat cat"}, {"role": "assistant", "content": "cat cat cat done"},
                {"role": "user", "content": "repeat sun"}, {"role": "assistant", "content": "sun sun sun done"}]
    ids, mask = tokenize_conversation(tok, messages)
    words = tok.convert_ids_to_tokens(ids)
    learned = [w for w, m in zip(words, mask) if m]
    assert learned == ["cat", "cat", "cat", "done"] * 2 + ["sun", "sun", "sun", "done", "<|end|>", "then"]
    assert not any(mask[: words.index("cat")])  # the user's "repeat cat" is not the assistant's


def test_packing_fills_rows_and_keeps_every_document():
    lengths = [30, 9, 17, 33, 5, 12, 21, 3, 40, 8]
    rows = pack_documents(lengths, q_len=40)
    assert sorted(d for row in rows for d in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[d] - 1 for d in row) <= 40
    # first fit decreasing: fewer rows than one per document, and the first row is full
    assert len(rows) == 5 and sum(lengths[d] - 1 for d in rows[0]) == 39
    with pytest.raises(ValueError, match="document 2 has 42 tokens; a row takes 2 to q_len \\+ 1 = 41"):
        pack_documents([5, 6, 42], q_len=40)


def test_row_layout_aligns_as_eagle3model_reads():
    """Note [one conversation, n - 1 positions]: input_ids[t] = x_{t+1}, loss at t iff x_{t+2} is
    the assistant's, each document's n - 1 positions, -1 after."""
    a = Document(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool))
    b = Document(torch.tensor([20, 21, 22]), torch.tensor([0, 1, 1], dtype=torch.bool))
    lay = row_layout([a, b], q_len=8)
    assert lay["input_ids"].tolist() == [11, 12, 13, 14, 21, 22, 0, 0]
    assert lay["loss_mask"].tolist() == [True, True, True, False, True, False, False, False]
    assert lay["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1, -1, -1]
    assert lay["starts"].tolist() == [0, 4] and lay["lengths"].tolist() == [5, 3]


def test_tokenize_truncates_and_drops(tok):
    convs = [[{"role": "user", "content": "count from one"}, {"role": "assistant", "content": "one two three done"}],
             [{"role": "user", "content": "count"}, {"role": "assistant", "content": " ".join(tiny_target.NUMBERS)}],
             [{"role": "user", "content": "repeat cat " * 20}, {"role": "assistant", "content": "cat"}]]
    stats = DataStats()
    docs = tokenize_conversations(tok, convs, q_len=16, stats=stats)
    assert [len(d) for d in docs] == [12, 17]  # the second cut to q_len + 1 tokens: one full row
    assert docs[1].ids.tolist() == tok(tok.apply_chat_template(convs[1], tokenize=False),
                                       add_special_tokens=False)["input_ids"][:17]
    assert stats.truncated == 2 and stats.no_assistant_tokens == 1  # the third: no assistant token left


def test_draft_vocabulary_is_the_most_frequent_assistant_tokens():
    docs = [Document(torch.tensor([5, 5, 5, 7, 7, 9, 1]), torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)),
            Document(torch.tensor([3, 3, 9, 9, 1, 1]), torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))]
    counts = token_counts(docs, vocab_size=12)
    assert counts.tolist() == [0, 0, 0, 2, 0, 3, 0, 2, 0, 2, 0, 0]  # token 1 never an assistant token
    ids, coverage = draft_vocabulary(counts, 3)
    assert ids.tolist() == [3, 5, 7]  # 5 (3x), then the ties 3, 7, 9 (2x) by id
    assert coverage == pytest.approx(7 / 9)
    ids, coverage = draft_vocabulary(counts, 6)  # more than seen: unseen ids by id
    assert ids.tolist() == [0, 1, 3, 5, 7, 9] and coverage == 1.0
    draft = Eagle3DraftModel(Eagle3DraftConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                               num_key_value_heads=1, vocab_size=12, draft_vocab_size=6))
    draft.set_vocab_mapping(ids)
    assert draft.target_to_draft_ids(torch.tensor([9, 2, 0])).tolist() == [5, -1, 0]
    with pytest.raises(ValueError, match="draft_vocab_size must be in \\[1, vocab_size=12\\], got 13"):
        draft_vocabulary(counts, 13)


def test_packed_rows_train_as_one_conversation_per_row():
    """The same documents, packed two per row (doc_ids) or one per row (seq_lens), batched by
    make_batch: Eagle3Model's loss, accuracies and gradients agree; nothing leaks between packed
    documents."""
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                            vocab_size=40, draft_vocab_size=40, rope_theta=10000.0)
    model = Eagle3Model(Eagle3DraftModel(cfg), q_len=24, length=3)
    docs = [Document(torch.randint(40, (n,)), torch.rand(n) < 0.7) for n in (13, 11, 9, 16)]
    aux = {id(d): torch.randn(len(d), 96) for d in docs}  # the target's, per token of each document
    last = {id(d): torch.randn(len(d), 16) for d in docs}
    head = torch.randn(40, 16)

    def run(rows, packed):
        lays = [row_layout(r, 24) for r in rows]
        h, lh = torch.zeros(len(rows), 24, 96), torch.zeros(len(rows), 24, 16)
        for b, (r, lay) in enumerate(zip(rows, lays)):
            for d, p0 in zip(r, lay["starts"].tolist()):  # as TargetModel.rows places them
                h[b, p0 : p0 + len(d) - 1] = aux[id(d)][: len(d) - 1]
                lh[b, p0 : p0 + len(d) - 1] = last[id(d)][1:]
        stack = lambda k: torch.stack([lay[k] for lay in lays])  # noqa: E731
        batch = make_batch(stack("input_ids"), h, lh, stack("loss_mask"), stack("doc_ids"), head,
                           torch.float32, packed)
        assert (batch.doc_ids is not None) == packed and (batch.seq_lens is None) == packed
        model.zero_grad()
        out = model(batch.input_ids, batch.hidden_states, batch.target, batch.loss_mask,
                    **({"doc_ids": batch.doc_ids} if packed else {"seq_lens": batch.seq_lens}))
        out.loss.backward()
        return out, [q.grad.clone() for q in model.parameters() if q.requires_grad]

    packed, g_packed = run([[docs[0], docs[1]], [docs[2], docs[3]]], True)
    single, g_single = run([[d] for d in docs], False)
    assert packed.acces.sum() > 0  # something to compare
    torch.testing.assert_close(packed.plosses, single.plosses)
    torch.testing.assert_close(packed.acces, single.acces)
    for a, b in zip(g_packed, g_single):
        torch.testing.assert_close(a, b)
