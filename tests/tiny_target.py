"""A tiny target for the trainer's tests, made here, no download: a word-level tokenizer with a
chat template, a few dozen conversations of a small grammar (counting, spelling, repeating) in both
JSON-lines shapes, and a tiny ``LlamaForCausalLM`` trained for a few seconds on them, so that its
greedy answers are predictable and a draft can learn them (acceptance length > 1).

    build_target(directory)            tokenizer + model saved with save_pretrained (~5 s)
    conversations(n, seed)             the grammar's conversations, as messages
    write_jsonl(path, convs, shape)    ShareGPT / OpenAI / mixed JSON lines
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen", "twenty"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "road", "milk"]
LETTERS = sorted({c for w in NOUNS for c in w})
WORDS = ["count", "from", "to", "spell", "the", "word", "repeat", "times", "what", "comes",
         "after", "done", "please", "you", "are", "a", "helpful", "bot", "and", "then"]
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
VOCAB_SIZE = 128
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def vocabulary() -> list[str]:
    words = SPECIAL + NUMBERS + [w for w in NOUNS + LETTERS + WORDS if w not in NUMBERS]
    words = list(dict.fromkeys(words))
    return words + [f"unused{i}" for i in range(VOCAB_SIZE - len(words))]


def _exchange(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a = rng.randrange(0, 17)
        return f"count from {NUMBERS[a]}", " ".join(NUMBERS[a : a + 4]) + " done"
    if kind == 1:
        w = rng.choice(NOUNS)
        return f"spell the word {w}", " ".join(w) + " done"
    if kind == 2:
        w = rng.choice(NOUNS)
        return f"repeat {w}", f"{w} {w} {w} done"
    a = rng.randrange(0, 20)
    return f"what comes after {NUMBERS[a]}", f"{NUMBERS[a + 1]} comes after {NUMBERS[a]} done"


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` conversations of one or two exchanges, some with a system turn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "you are a helpful bot"})
        for _ in range(rng.choice([1, 1, 2])):
            user, assistant = _exchange(rng)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append(messages)
    return out


def write_jsonl(path: Path, convs: list[list[dict[str, str]]], shape: str = "mixed") -> Path:
    """Write ``convs`` as JSON lines: "sharegpt", "openai" or "mixed" (alternating)."""
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    with open(path, "w") as f:
        for i, messages in enumerate(convs):
            sharegpt = shape == "sharegpt" or (shape == "mixed" and i % 2 == 0)
            if sharegpt:
                record = {"id": f"c{i}", "conversations": [{"from": speaker[m["role"]], "value": m["content"]}
                                                           for m in messages]}
            else:
                record = {"messages": messages}
            f.write(json.dumps(record) + "\n")
    return path


def tokenizer():
    """The word-level tokenizer, as a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>",
                                   unk_token="<unk>", pad_token="</s>", chat_template=TEMPLATE)
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    return fast


def build_target(directory: Path, *, steps: int = 200, layers: int = 4, seed: int = 0) -> Path:
    """Save the tokenizer and a tiny Llama trained ``steps`` steps on the grammar into ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    texts = [tok.apply_chat_template(m, tokenize=False) for m in conversations(256, seed=seed + 100)]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = torch.randint(len(texts), (32,), generator=gen)
            loss = model(input_ids=enc["input_ids"][batch], attention_mask=enc["attention_mask"][batch],
                         labels=labels[batch]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    directory = Path(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


_BUILT: dict[str, Path] = {}


def cached_target(base: Path) -> Path:
    """:func:`build_target` once per test process, under ``base`` (a session temp directory)."""
    key = str(base)
    if key not in _BUILT:
        directory = Path(base) / "tiny-target"
        if not (directory / "config.json").exists():
            build_target(directory)
        _BUILT[key] = directory
    return _BUILT[key]


@pytest.fixture(autouse=False)
def one_thread():
    """Torch on one CPU thread for the test (the suite runs two workers on two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
