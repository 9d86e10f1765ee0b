"""Export for SGLang/vLLM and import back (compiled_mask/draft/export.py): the config fields and
weight names the servers' Eagle3 loaders read, a refusal for a state a server would load broken,
a strict reload with the same outputs, and SpecForge's/TorchSpec's layouts loading for
fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from compiled_mask.draft import Eagle3DraftConfig, Eagle3DraftModel  # noqa: E402
from compiled_mask.draft.evaluate import draft_chain  # noqa: E402
from compiled_mask.draft.export import draft_config_json, export_draft, load_draft, required_keys, write_export  # noqa: E402

SGLANG_KEYS = {  # what python/sglang/srt/models/llama_eagle3.py's load_weights maps onto parameters
    "embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
    *(f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm",
                                        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
}


@pytest.fixture
def draft():
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=120, draft_vocab_size=40, target_hidden_size=24, rms_norm_eps=1e-6,
                            rope_theta=500000.0)
    d = Eagle3DraftModel(cfg)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from 1: a weight mixed up would show
    d.set_vocab_mapping(torch.randperm(120)[:40].sort().values)
    d.freeze_embedding()
    return d


def _outputs(d):
    g = torch.Generator().manual_seed(1)
    aux, ids = torch.randn(9, 72, generator=g), torch.randint(120, (9,), generator=g)
    return draft_chain(d, aux, ids, 3)


def test_export_is_what_servers_read_and_reloads_exactly(draft, tmp_path):
    out = export_draft(draft, tmp_path / "draft", max_position_embeddings=4096, aux_layers=[1, 15, 28],
                       target_layers=32, extra={"eos_token_id": 7})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"], cfg["draft_vocab_size"], cfg["target_hidden_size"]) == \
        (32, 48, 4, 2, 8, 120, 40, 24)
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["max_position_embeddings"] == 4096 and cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] is None
    assert cfg["norm_before_residual"] is False and cfg["eos_token_id"] == 7
    assert "eagle_config" not in cfg and "eagle_aux_hidden_state_layer_ids" not in cfg  # the default layers
    # transformers (which SGLang and vLLM parse config.json with) reads the sizes and RoPE back
    hf = transformers.AutoConfig.from_pretrained(out)
    assert hf.hidden_size == 32 and hf.draft_vocab_size == 40 and hf.target_hidden_size == 24
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert theta == 500000.0
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == SGLANG_KEYS == set(required_keys(draft.config))
    assert torch.equal(weights["d2t"], draft.d2t) and torch.equal(weights["t2d"], draft.t2d)
    reloaded, _ = load_draft(out)
    for (k, a), (k2, b) in zip(draft.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    (p1, l1), (p2, l2) = _outputs(draft), _outputs(reloaded)
    assert torch.equal(p1, p2) and all(torch.equal(a, b) for a, b in zip(l1, l2))


def test_custom_aux_layers_are_named_in_both_servers_conventions(draft):
    cfg = draft_config_json(draft.config, max_position_embeddings=2048, dtype=torch.bfloat16,
                            aux_layers=[2, 10, 20], target_layers=32)
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 10, 20]  # SGLang adds 1
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [3, 11, 21]  # vLLM: layer inputs
    assert cfg["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("fault", ["missing", "shape", "unknown"])
def test_export_refuses_a_state_a_server_would_load_broken(draft, tmp_path, fault):
    state = dict(draft.state_dict())
    cfg = draft_config_json(draft.config, max_position_embeddings=512, dtype=torch.float32)
    if fault == "missing":
        del state["midlayer.hidden_norm.weight"]
        match = r"lacks \['midlayer.hidden_norm.weight'\]; SGLang's Eagle3 loader skips absent weights"
    elif fault == "shape":
        state["lm_head.weight"] = state["lm_head.weight"][:39]
        match = r"wrong shape .*'lm_head.weight': \(\(39, 32\), \(40, 32\)\)"
    else:
        state["midlayer.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        match = r"unknown tensors \['midlayer.self_attn.rotary_emb.inv_freq'\]"
    with pytest.raises(ValueError, match=f"export refused: .*{match}"):
        write_export(tmp_path / "draft", state, cfg)
    assert not (tmp_path / "draft").exists() and list(tmp_path.iterdir()) == []


def test_loads_specforge_and_torchspec_layouts(draft, tmp_path):
    base = export_draft(draft, tmp_path / "ours", max_position_embeddings=512)
    cfg = json.loads((base / "config.json").read_text())
    weights = load_file(str(base / "model.safetensors"))
    want = _outputs(draft)

    # SpecForge's `export --to sglang`: no embedding (serving takes the target's), no head_dim,
    # RoPE as transformers 5 writes it.
    sf = tmp_path / "specforge"
    sf.mkdir()
    sf_cfg = {k: v for k, v in cfg.items() if k not in ("head_dim", "rope_theta", "rope_scaling")}
    (sf / "config.json").write_text(json.dumps(sf_cfg))
    save_file({k: v for k, v in weights.items() if k != "embed_tokens.weight"}, str(sf / "model.safetensors"))
    with pytest.raises(ValueError, match="no embed_tokens.weight .* pass the target's embedding"):
        load_draft(sf)
    loaded, _ = load_draft(sf, embedding=draft.embed_tokens.weight)
    assert torch.equal(_outputs(loaded)[0], want[0])

    # TorchSpec's convert_to_hf --vllm: layers.0.* names, pytorch_model.bin
    ts = tmp_path / "torchspec"
    ts.mkdir()
    (ts / "config.json").write_text(json.dumps(cfg))
    torch.save({k.replace("midlayer.", "layers.0."): v for k, v in weights.items()}, ts / "pytorch_model.bin")
    loaded, _ = load_draft(ts)
    assert torch.equal(_outputs(loaded)[0], want[0])

    # a full-vocabulary draft without t2d/d2t: the identity map
    full = Eagle3DraftModel(Eagle3DraftConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                              num_key_value_heads=1, vocab_size=30, draft_vocab_size=30))
    fv = export_draft(full, tmp_path / "full", max_position_embeddings=64)
    w = load_file(str(fv / "model.safetensors"))
    save_file({k: v for k, v in w.items() if k not in ("t2d", "d2t")}, str(fv / "model.safetensors"))
    loaded, _ = load_draft(fv)
    assert loaded.t2d.all() and (loaded.d2t == 0).all()

    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(NotImplementedError, match="RoPE scaling 'llama3' is not supported yet"):
        load_draft(scaled)
