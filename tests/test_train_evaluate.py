"""Acceptance length (compiled_mask/draft/evaluate.py): the draft's decoding chain is the TTT
unroll (fed the true tokens, its logits are Eagle3Model's at every position and step),
speculation emits exactly the target's greedy tokens, and tau counts what was accepted."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_target import one_thread  # noqa: E402, F401 (fixture)

from compiled_mask.draft import (  # noqa: E402
    Eagle3DraftConfig,
    Eagle3DraftModel,
    Eagle3Model,
    evaluate,  # noqa: E402
)
from compiled_mask.draft.target import TargetModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _draft(seed=0):
    torch.manual_seed(seed)
    cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=61, draft_vocab_size=24, target_hidden_size=16, rope_theta=10000.0)
    d = Eagle3DraftModel(cfg)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    d.set_vocab_mapping(torch.randperm(61)[:24].sort().values)
    return d


def test_chain_is_the_training_unroll():
    """Note [the chain is the unroll]: at every position t and TTT step s, draft_chain's logits
    on a context ending at t, fed the true next tokens, are Eagle3Model's step-s logits at t."""
    draft = _draft()
    T, L = 20, 4
    model = Eagle3Model(draft, q_len=T, length=L)
    ids, hidden = torch.randint(61, (1, T)), torch.randn(1, T, 48)
    # Each TTT step's hidden state after the decoder layer, h + mlp(post_attention_layernorm(h)),
    # from hooks (the unroll computes its logits inside the fused loss), then its logits.
    residual, mlp_out = [], []
    layer = draft.midlayer
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: residual.append(a[0].detach())),
             layer.mlp.register_forward_hook(lambda m, a, out: mlp_out.append(out.detach()))]
    model(ids, hidden, torch.randint(24, (1, T)), torch.ones(1, T))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        steps = [draft.compute_logits(r + o) for r, o in zip(residual, mlp_out)]
    assert len(steps) == L
    for t in range(T - L + 1):
        proposals, logits = evaluate.draft_chain(draft, hidden[0, : t + 1], ids[0, : t + 1], L,
                                                 forced=ids[0, t + 1 : t + L])
        for s in range(L):
            torch.testing.assert_close(logits[s], steps[s][0, t], rtol=1e-5, atol=1e-5)
            assert proposals[s] == draft.d2t[steps[s][0, t].argmax()] + steps[s][0, t].argmax()


@pytest.fixture(scope="module")
def target():
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked: a varied greedy continuation
    return TargetModel(model)


def _greedy(target, prompt, n):
    ids = prompt.clone()
    for _ in range(n):
        _, last = target.features(ids[None])
        ids = torch.cat([ids, target.logits(last[0, -1]).argmax().reshape(1)])
    return ids[prompt.numel():].tolist()


@pytest.mark.parametrize("oracle", [None, "right", "wrong"])
def test_speculation_emits_the_target_greedy_tokens_and_counts_acceptance(target, monkeypatch, oracle):
    prompt = torch.randint(61, (7,), generator=torch.Generator().manual_seed(3))
    k, n = 3, 17
    longer = _greedy(target, prompt, n + k)
    want = longer[:n]
    if oracle is not None:  # a draft that always guesses right (or always wrong)
        def chain(draft, aux, next_ids, k, forced=None):
            n_ctx = aux.shape[0]  # proposals are tokens n_ctx + 1 .. n_ctx + k
            guess = torch.tensor(longer[n_ctx + 1 - prompt.numel() : n_ctx + 1 - prompt.numel() + k])
            return (guess if oracle == "right" else (guess + 1) % 61), None
        monkeypatch.setattr(evaluate, "draft_chain", chain)
    generated, accepted = evaluate.speculate(target, _draft(), prompt, k, n)
    assert generated == want  # speculation never changes the output
    assert len(generated) == n
    if oracle == "right":
        assert accepted[:-1] == [k] * (len(accepted) - 1)  # every proposal kept, k + 1 tokens a forward
    elif oracle == "wrong":
        assert accepted == [0] * (n - 1)
    result = evaluate.EvalResult(sum(a + 1 for a in accepted) / len(accepted), len(accepted),
                                 sum(a + 1 for a in accepted), [], k, 1)
    assert 1 <= result.tau <= k + 1


def test_acceptance_length_counts_tokens_per_verification(target, monkeypatch):
    monkeypatch.setattr(evaluate, "speculate", lambda *a, **kw: ([], [3, 0, 1, 3]))
    result = evaluate.acceptance_length(target, _draft(), [torch.tensor([1, 2])] * 2, k=3, max_new_tokens=9)
    assert result.tau == (4 + 1 + 2 + 4) / 4  # (accepted + 1) per target forward
    assert result.verifications == 8 and result.emitted == 22 and result.accepted == [6, 4, 4]
    assert "tau 2.75 (k=3, 2 conversations" in result.summary()
