"""The target side (compiled_mask/draft/target.py): the auxiliary states captured by hooks are
Hugging Face's hidden_states of those layers, the per-row tensors are aligned as Eagle3Model reads
them, and the dense target distribution is the softmax over the draft vocabulary's logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from compiled_mask.draft.batches import OnlineBatches  # noqa: E402
from compiled_mask.draft.data import Document, row_layout  # noqa: E402
from compiled_mask.draft.offline import OfflineBatches, write_features  # noqa: E402
from compiled_mask.draft.target import TargetModel, counted_positions, default_aux_layers, target_probs  # noqa: E402


@pytest.fixture(scope="module")
def target():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return TargetModel(transformers.LlamaForCausalLM(config), aux_layers=[0, 2, 5])


def test_default_layers_are_specforges():
    assert default_aux_layers(32) == [1, 15, 28]  # Llama-3-8B: SGLang's/vLLM's (2, 16, 29) as inputs
    assert default_aux_layers(80) == [1, 39, 76]
    assert default_aux_layers(4) == [1, 1, 0]  # clamped for tiny models


def test_hooks_capture_the_layer_outputs(target):
    ids = torch.randint(97, (2, 11))
    aux, last = target.features(ids)
    with torch.no_grad():
        ref = target.model(input_ids=ids, output_hidden_states=True)
    hs = ref.hidden_states  # [embeddings, output of layer 0, ..., of layer 5]
    # Layer i's output is hidden_states[i + 1] (the last one is taken by a hook: some versions
    # return it after the final norm).
    torch.testing.assert_close(aux, torch.cat([hs[1], hs[3], target_layer_out(target, ids, 5)], -1))
    torch.testing.assert_close(target.logits(last), ref.logits)
    assert aux.shape == (2, 11, 96) and last.shape == (2, 11, 32)


def target_layer_out(target, ids, layer):
    """The last layer's output before the final norm (HF's hidden_states[-1] is after it)."""
    out = {}
    h = target.layers[layer].register_forward_hook(lambda m, a, o: out.setdefault("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        target.model(input_ids=ids)
    h.remove()
    return out["x"]


def test_rows_put_each_document_where_row_layout_says(target):
    """hidden_states[t] = aux at the document's position t, last_hidden[t] = at t + 1, top[t] =
    the full-vocabulary argmax there; each document runs alone (the same as its own forward),
    zeros (top: -1) on the unused tail."""
    a = Document(torch.randint(97, (7,)), torch.ones(7, dtype=torch.bool))
    b = Document(torch.randint(97, (5,)), torch.ones(5, dtype=torch.bool))
    lay = row_layout([a, b], 16)
    hidden, last, top = target.rows([[a, b]], [lay], 16)
    aux_a, last_a = target.features(a.ids[None])
    aux_b, last_b = target.features(b.ids[None])
    torch.testing.assert_close(hidden[0, :6], aux_a[0, :6])
    torch.testing.assert_close(last[0, :6], last_a[0, 1:7])
    torch.testing.assert_close(hidden[0, 6:10], aux_b[0, :4])
    torch.testing.assert_close(last[0, 6:10], last_b[0, 1:5])
    assert (hidden[0, 10:] == 0).all() and (last[0, 10:] == 0).all()
    assert torch.equal(top[0, :10], target.logits(last[0, :10]).argmax(-1))
    assert torch.equal(target.top_tokens(last[0, :10], chunk_rows=3), top[0, :10])  # chunks of 3, 3, 3, 1
    assert (top[0, 10:] == -1).all() and top.dtype == torch.int64


def test_counted_positions_leave_out_a_top_token_outside_the_draft_vocabulary():
    """The loss mask, less the positions whose target top token is not a draft token (-1: an
    unused position, never counted)."""
    loss_mask = torch.tensor([[True, True, True, False, True, True]])
    top = torch.tensor([[5, 9, 2, 5, -1, 7]])
    got = counted_positions(loss_mask, top, torch.tensor([2, 5, 7]))
    assert got.tolist() == [[True, False, True, False, False, True]]


@pytest.mark.parametrize("offline", [False, True])
def test_batches_count_only_a_top_token_in_the_draft_vocabulary(target, offline, tmp_path):
    """Online and offline batches: the loss mask is the row layout's, less the positions whose
    target top token is outside the draft vocabulary (here about half of them)."""
    g = torch.Generator().manual_seed(3)
    docs = [Document(torch.randint(97, (n,), generator=g), torch.rand(n, generator=g) < 0.8) for n in (9, 12, 7)]
    rows = [[0, 1], [2]]
    draft_to_target = torch.arange(0, 97, 2)  # the even ids
    if offline:
        pytest.importorskip("safetensors")
        features = write_features(tmp_path, target, docs, rows, draft_to_target, 24, fingerprint={})
        batch = OfflineBatches(features, 2, torch.float32, "cpu").get(0)
    else:
        batch = OnlineBatches(docs, rows, target, draft_to_target, 24, 2, torch.float32).get(0)
    order = [0, 1] if batch.input_ids[0, 0] == docs[0].ids[1] else [1, 0]  # the shuffle's row order
    layouts = [row_layout([docs[d] for d in rows[r]], 24) for r in order]
    _, _, top = target.rows([[docs[d] for d in rows[r]] for r in order], layouts, 24)
    layout_mask = torch.stack([lay["loss_mask"] for lay in layouts])
    assert torch.equal(batch.loss_mask, layout_mask & (top % 2 == 0) & (top >= 0))
    assert 0 < batch.loss_mask.sum() < layout_mask.sum()  # some dropped, some kept


def test_target_probs_is_the_draft_vocabulary_softmax(target):
    ids = torch.tensor([3, 7, 50, 96])
    hidden = torch.randn(1, 5, 32)
    p = target_probs(hidden, target.head_rows(ids), torch.float32)
    full = target.logits(hidden)
    torch.testing.assert_close(p, torch.softmax(full[..., ids], -1))


def test_errors_name_the_fix(target, tmp_path):
    with pytest.raises(ValueError, match=r"aux_layers must be three decoder layer indices in \[0, 6\), got \[0, 2, 6\]"):
        TargetModel(target.model, aux_layers=[0, 2, 6])
    with pytest.raises(ValueError, match="no config.json there; pass a local Hugging Face model directory"):
        TargetModel.from_pretrained(tmp_path)
