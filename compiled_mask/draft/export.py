"""Eagle3 drafts as Hugging Face directories that SGLang and vLLM serve, and back.

:func:`export_draft` writes ``config.json`` (``architectures: ["LlamaForCausalLMEagle3"]``, the
sizes, ``draft_vocab_size``, ``target_hidden_size``, ``max_position_embeddings``, the RoPE
settings) and ``model.safetensors`` with the names both servers' Eagle3 loaders read, which are
the draft's own (SpecForge's and TorchSpec's): ``fc.weight``, ``midlayer.*``, ``norm.weight``,
``lm_head.weight``, ``d2t``, ``t2d`` and ``embed_tokens.weight``. SGLang's loader
(``python/sglang/srt/models/llama_eagle3.py``) skips a name it does not know and leaves the
parameter as initialised, so a missing key serves a broken draft without an error; as SpecForge's
``export --to sglang`` does, the exporter refuses to write a state that lacks one
(:func:`required_keys`). vLLM's loader (``vllm/model_executor/models/llama_eagle3.py``) reads the
same directory (it maps ``midlayer.`` to ``layers.0.`` and ``d2t`` to ``draft_id_to_target_id``).

:func:`load_draft` reads such a directory back, and SpecForge's and TorchSpec's exports (also
vLLM-style ``layers.0.`` names, ``model.`` prefixes, ``pytorch_model.bin``, sharded safetensors,
no ``t2d``/``d2t`` when the draft vocabulary is the whole vocabulary, no embedding), to fine-tune.

Note [aux layers in the config]
    The three target layers the draft reads are not in SGLang's or vLLM's Llama defaults when
    they differ from ``[1, L // 2 - 1, L - 4]`` (layer outputs; the servers count layer inputs,
    ``(2, L // 2, L - 3)``, the same states). Only then does the export name them, in both
    servers' conventions: ``eagle_config.eagle_aux_hidden_state_layer_ids`` as layer outputs
    (SGLang adds 1 when reading it) and a top-level ``eagle_aux_hidden_state_layer_ids`` as layer
    inputs (vLLM reads it as given).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compiled_mask.draft.model import Eagle3DraftConfig, Eagle3DraftModel
from compiled_mask.draft.target import default_aux_layers

__all__ = ["required_keys", "draft_config_json", "export_draft", "write_export", "load_draft"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("exporting or loading a draft needs safetensors: pip install "
                          "'compiled-mask[train]'") from None
    return safetensors.torch


def required_keys(config: Eagle3DraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a server needs, with its shape (the draft's state dict, ``inv_freq`` aside).

    ``embed_tokens.weight`` is included: vLLM loads it when present and SGLang takes the
    target's, so carrying it costs only disk and makes the directory self-contained.
    """
    H, D = config.hidden_size, config.head_dim
    Hq, Hkv, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    return {
        "embed_tokens.weight": (config.vocab_size, H),
        "fc.weight": (H, 3 * config.target_hidden_size),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (Hq * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": (Hkv * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": (Hkv * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, Hq * D),
        "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,),
        "lm_head.weight": (config.draft_vocab_size, H),
        "d2t": (config.draft_vocab_size,),
        "t2d": (config.vocab_size,),
    }


def draft_config_json(config: Eagle3DraftConfig, *, max_position_embeddings: int, dtype: torch.dtype,
                      aux_layers: Sequence[int] | None = None, target_layers: int | None = None,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of an exported draft.

    Args:
        config: the draft's sizes.
        max_position_embeddings: the longest position the draft serves; servers clamp RoPE
            there, so no shorter than the training length (the target's own is a good choice).
        dtype: the weights' dtype (``torch_dtype``).
        aux_layers, target_layers: the target layers the draft reads and the target's layer
            count (Note [aux layers in the config]).
        extra: more fields (e.g. the target's ``bos_token_id``/``eos_token_id``).
    """
    name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": int(max_position_embeddings),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "norm_before_residual": False,
        "torch_dtype": name,
        "dtype": name,
    }
    if aux_layers is not None and target_layers is not None and list(aux_layers) != default_aux_layers(target_layers):
        out["eagle_config"] = {"use_aux_hidden_state": True,
                               "eagle_aux_hidden_state_layer_ids": [int(i) for i in aux_layers]}
        out["eagle_aux_hidden_state_layer_ids"] = [int(i) + 1 for i in aux_layers]
    out.update(extra or {})
    return out


def write_export(out_dir: str | Path, state: dict[str, Tensor], config_json: dict[str, Any]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir``, replacing it atomically.

    Refuses (ValueError, nothing written) a state that lacks a tensor a server needs, or has one
    of the wrong shape: SGLang would serve such a draft silently broken.

    Args:
        out_dir: the directory to create (an existing one is replaced).
        state: tensors by name (:func:`required_keys`'s names).
        config_json: from :func:`draft_config_json`.
    """
    config = _config_from_json(config_json)
    need = required_keys(config)
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"export refused: the draft's state lacks {missing}; SGLang's Eagle3 loader "
                         f"skips absent weights without an error and would serve a broken draft. "
                         f"Export a complete Eagle3DraftModel (export_draft).")
    wrong = {k: (tuple(state[k].shape), shape) for k, shape in need.items() if tuple(state[k].shape) != shape}
    if wrong:
        raise ValueError(f"export refused: tensors of the wrong shape for config.json (got, expected): "
                         f"{wrong}.")
    unknown = sorted(set(state) - set(need))
    if unknown:
        raise ValueError(f"export refused: unknown tensors {unknown[:8]}; servers skip them silently.")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in need}
    _safetensors().save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return out_dir


def export_draft(draft: Eagle3DraftModel, out_dir: str | Path, *, max_position_embeddings: int,
                 dtype: torch.dtype | None = None, aux_layers: Sequence[int] | None = None,
                 target_layers: int | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Export a draft for SGLang and vLLM (``--speculative-draft-model-path OUT``, ``"model":
    "OUT"``; docs/training.md has the commands).

    Args:
        draft: the trained draft (with its vocabulary mapping set).
        out_dir: the directory to write.
        max_position_embeddings: see :func:`draft_config_json`.
        dtype: the weights' dtype; default the draft's.
        aux_layers, target_layers, extra: see :func:`draft_config_json`.

    Returns:
        ``out_dir``.
    """
    dtype = dtype or draft.fc.weight.dtype
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in draft.state_dict().items()}
    config_json = draft_config_json(draft.config, max_position_embeddings=max_position_embeddings,
                                    dtype=dtype, aux_layers=aux_layers, target_layers=target_layers,
                                    extra=extra)
    return write_export(out_dir, state, config_json)


def _config_from_json(cfg: dict[str, Any], where: str = "config.json") -> Eagle3DraftConfig:
    """An Eagle3DraftConfig from an exported (or SpecForge/TorchSpec) config.json."""
    if cfg.get("num_hidden_layers", 1) != 1:
        raise NotImplementedError(f"{where}: num_hidden_layers={cfg['num_hidden_layers']}; only "
                                  f"one-layer Eagle3 drafts are supported yet.")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise NotImplementedError(f"{where}: {flag}=true is not supported yet (the draft has no biases).")
    scaling = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if kind != "default":
        raise NotImplementedError(f"{where}: RoPE scaling {kind!r} is not supported yet (the draft "
                                  f"uses plain RoPE).")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))  # LlamaConfig's default
    vocab = int(cfg["vocab_size"])
    return Eagle3DraftConfig(
        hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
        head_dim=cfg.get("head_dim"), vocab_size=vocab,
        draft_vocab_size=int(cfg.get("draft_vocab_size") or vocab),
        target_hidden_size=cfg.get("target_hidden_size"), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta))


def _read_weights(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(_safetensors().load_file(str(path / f)))
        return state
    if (path / "model.safetensors").exists():
        return _safetensors().load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin.")


def _normalise_key(key: str) -> str:
    for prefix in ("draft_model.", "model."):
        key = key.removeprefix(prefix)
    if key.startswith("layers.0."):  # vLLM-style (TorchSpec's convert_to_hf --vllm)
        key = "midlayer." + key[len("layers.0."):]
    return key


def load_draft(path: str | Path, *, embedding: Tensor | None = None, strict: bool = True
               ) -> tuple[Eagle3DraftModel, dict[str, Any]]:
    """Load an exported draft (this package's, SpecForge's or TorchSpec's) to serve-check or fine-tune.

    Args:
        path: the directory (``config.json`` + weights).
        embedding: ``[vocab, hidden]`` the target's token embedding, used when the checkpoint
            carries none (SpecForge's SGLang export drops it); required then.
        strict: every tensor of the draft must come from the checkpoint (or ``embedding``), and
            the checkpoint must hold nothing else.

    Returns:
        ``(draft, config_json)``: the model in the checkpoint's dtype, frozen embedding, and the
        parsed config.json.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; pass an exported draft directory.")
    cfg = json.loads((path / "config.json").read_text())
    arch = cfg.get("architectures") or []
    if not any("Eagle3" in a for a in arch):
        raise ValueError(f"{path}/config.json: architectures={arch}, not an Eagle3 draft "
                         f"(LlamaForCausalLMEagle3).")
    config = _config_from_json(cfg, f"{path}/config.json")
    state = {_normalise_key(k): v for k, v in _read_weights(path).items()}
    state.pop("inv_freq", None)
    if "embed_tokens.weight" not in state:
        if embedding is None:
            raise ValueError(f"{path}: the checkpoint has no embed_tokens.weight (SpecForge's SGLang "
                             f"export drops it); pass the target's embedding (load_draft(..., "
                             f"embedding=target.embedding())).")
        state["embed_tokens.weight"] = embedding.detach().to("cpu")
    if "d2t" not in state and config.draft_vocab_size == config.vocab_size:
        state["d2t"] = torch.zeros(config.vocab_size, dtype=torch.int64)
        state["t2d"] = torch.ones(config.vocab_size, dtype=torch.bool)
    need = required_keys(config)
    missing = [k for k in need if k not in state]
    unknown = sorted(set(state) - set(need))
    if strict and (missing or unknown):
        raise ValueError(f"{path}: the checkpoint does not match its config.json: missing {missing}, "
                         f"unknown {unknown[:8]}.")
    dtype = next((v.dtype for k, v in state.items() if k == "fc.weight"), torch.float32)
    draft = Eagle3DraftModel(config).to(dtype)
    state["t2d"] = state["t2d"].to(torch.bool)
    state["d2t"] = state["d2t"].to(torch.int64)
    draft.load_state_dict({k: v for k, v in state.items() if k in need}, strict=strict)
    draft.freeze_embedding()
    return draft, cfg
