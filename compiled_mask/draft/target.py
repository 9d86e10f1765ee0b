"""The target model: a frozen Hugging Face causal LM whose hidden states train the draft.

:class:`TargetModel` wraps ``AutoModelForCausalLM`` (loaded from a local directory, or built with
random weights from a named config for benchmarks) and gives, for token sequences, what Eagle3
needs: the three auxiliary hidden states (outputs of a low, a middle and a late decoder layer,
captured with forward hooks, so no other layer's output is kept) and the last hidden state after
the final norm, from which the target's next-token distribution over the draft vocabulary is
``softmax(last_hidden @ lm_head[draft ids].T)`` (:func:`target_probs`). It runs without
gradients, in the dtype it was loaded in (bf16 on GPUs).

``transformers`` is an optional dependency (``pip install compiled-mask[train]``), imported here
only when a model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiled_mask.draft.data import Document

__all__ = ["RANDOM_TARGETS", "TargetModel", "counted_positions", "default_aux_layers", "target_probs"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("training on a Hugging Face target needs transformers: "
                          "pip install 'compiled-mask[train]' (transformers, tokenizers, "
                          "safetensors)") from None
    return transformers


def default_aux_layers(num_layers: int) -> list[int]:
    """The decoder layers whose outputs Eagle3 reads, as SpecForge and TorchSpec choose them:
    ``[1, num_layers // 2 - 1, num_layers - 4]`` (the output of layer i is Hugging Face's
    ``hidden_states[i + 1]``; SGLang's and vLLM's defaults, ``(2, L // 2, L - 3)`` counted as
    layer *inputs*, are the same states). Clamped to ``[0, num_layers)`` for tiny models."""
    return [min(max(i, 0), num_layers - 1) for i in (1, num_layers // 2 - 1, num_layers - 4)]


# Llama-3-8B's sizes (its config.json), for a random-weight target: no download.
RANDOM_TARGETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    # A tiny Llama for CPU checks of the benchmark's plumbing.
    "llama-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
}


class TargetModel:
    """A frozen causal LM and the Eagle3 features of token sequences.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (Llama, Qwen2/3, Mistral, ... : a decoder with
            ``.layers``, a final norm, an ``lm_head``).
        aux_layers: the three decoder layers whose outputs are the auxiliary hidden states;
            default :func:`default_aux_layers`.

    Attributes:
        hidden_size, vocab_size, num_layers, aux_layers: from the model.
    """

    def __init__(self, model: nn.Module, aux_layers: Sequence[int] | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.decoder = model.get_decoder()
        layers = getattr(self.decoder, "layers", None)
        if layers is None:
            raise ValueError(f"TargetModel: {type(model).__name__}'s decoder has no .layers list; "
                             f"Llama-family models (Llama, Qwen, Mistral) are supported.")
        self.layers = layers
        self.num_layers = len(layers)
        config = getattr(model.config, "text_config", model.config)
        self.config = config
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        aux = list(default_aux_layers(self.num_layers) if aux_layers is None else aux_layers)
        if len(aux) != 3 or any(not isinstance(i, int) or not 0 <= i < self.num_layers for i in aux):
            raise ValueError(f"TargetModel: aux_layers must be three decoder layer indices in "
                             f"[0, {self.num_layers}), got {aux}.")
        self.aux_layers = aux

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, aux_layers: Sequence[int] | None = None
                        ) -> TargetModel:
        """Load ``AutoModelForCausalLM.from_pretrained(path)`` onto ``device``.

        Args:
            path: a local model directory (config.json and weights).
            device: where the target runs.
            dtype: its dtype; default bfloat16 on CUDA, float32 on CPU.
            aux_layers: see :class:`TargetModel`.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"--target-model {path}: no config.json there; pass a local Hugging "
                             f"Face model directory (e.g. one saved by save_pretrained or "
                             f"`huggingface-cli download`).")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = _transformers().AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model.to(device), aux_layers)

    @classmethod
    def random(cls, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               seed: int = 0, aux_layers: Sequence[int] | None = None) -> TargetModel:
        """A target with random weights and the sizes of a named config (:data:`RANDOM_TARGETS`),
        built on ``device`` with no download: for throughput, not for learning."""
        if name not in RANDOM_TARGETS:
            raise ValueError(f"unknown random target {name!r}; choose from {sorted(RANDOM_TARGETS)}.")
        tf = _transformers()
        config = tf.LlamaConfig(**RANDOM_TARGETS[name])
        torch.manual_seed(seed)
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls(model, aux_layers)

    @property
    def rope_theta(self) -> float:
        """The target's RoPE base (``rope_theta``, or ``rope_parameters["rope_theta"]`` in
        transformers 5; LlamaConfig's default 10000 when neither is set)."""
        params = getattr(self.config, "rope_parameters", None) or {}
        return float(getattr(self.config, "rope_theta", None) or params.get("rope_theta") or 10000.0)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def embedding(self) -> Tensor:
        """The token embedding ``[vocab, hidden]`` (the draft's frozen ``embed_tokens``)."""
        return self.model.get_input_embeddings().weight

    def head_rows(self, draft_to_target: Tensor) -> Tensor:
        """The lm_head rows of the draft vocabulary, ``[draft_vocab, hidden]`` (row i: draft id i)."""
        weight = self.model.get_output_embeddings().weight
        return weight[draft_to_target.to(weight.device)]

    @torch.no_grad()
    def logits(self, last_hidden: Tensor) -> Tensor:
        """Full-vocabulary logits ``[..., vocab]`` from last hidden states ``[..., hidden]``."""
        return self.model.get_output_embeddings()(last_hidden)

    @torch.no_grad()
    def top_tokens(self, last_hidden: Tensor, chunk_rows: int = 4096) -> Tensor:
        """The argmax of the full-vocabulary logits, ``[N]`` int64, from ``[N, hidden]``, in
        chunks of rows: a chunk's logits (Llama-3: 4096 x 128256 in bf16, 1 GiB) instead of all
        of them at once (8 GiB at 32K positions)."""
        return torch.cat([self.logits(part).argmax(-1) for part in last_hidden.split(chunk_rows)])

    @torch.no_grad()
    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One forward of the decoder (no lm_head): the auxiliary and the last hidden states.

        Args:
            input_ids: ``[B, n]`` token ids.
            attention_mask: optional ``[B, n]`` 1/0 (right padding).

        Returns:
            ``aux [B, n, 3 * hidden]`` (the three layers' outputs, concatenated in
            ``aux_layers`` order) and ``last [B, n, hidden]`` (after the final norm).
        """
        captured: dict[int, Tensor] = {}

        def hook(index: int):
            def save(module: nn.Module, args: Any, output: Any) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output
            return save

        handles = [self.layers[i].register_forward_hook(hook(i)) for i in sorted(set(self.aux_layers))]
        try:
            out = self.decoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                               use_cache=False)
        finally:
            for h in handles:
                h.remove()
        aux = torch.cat([captured[i] for i in self.aux_layers], dim=-1)  # [B, n, 3H]
        return aux, out.last_hidden_state

    @torch.no_grad()
    def rows(self, rows: Sequence[Sequence[Document]], layouts: Sequence[dict[str, Tensor]],
             q_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """The target's per-position tensors of packed rows (Note [one conversation, n - 1
        positions] in data.py).

        Each document runs on its own tokens, one forward each, without padding or a mask (the
        plain causal kernel; nothing attends across documents), so a row's tensors do not depend
        on how rows are grouped into batches: online and offline runs see the same numbers.

        Args:
            rows: each row's documents, in order.
            layouts: :func:`~compiled_mask.draft.data.row_layout` of each row.
            q_len: positions per row.

        Returns:
            ``hidden_states [B, T, 3H]``: the auxiliary states at position t; ``last_hidden
            [B, T, H]``: the last hidden state at t + 1 (the target's next-token distribution
            there is what TTT step 0 learns at t), zeros on unused positions; ``top [B, T]``
            int64: the target's most likely token there over its whole vocabulary (the argmax of
            its lm_head), -1 on unused positions.
        """
        B, H = len(rows), self.hidden_size
        hidden = torch.zeros(B, q_len, 3 * H, dtype=self.dtype, device=self.device)
        last = torch.zeros(B, q_len, H, dtype=self.dtype, device=self.device)
        top = torch.full((B, q_len), -1, dtype=torch.int64, device=self.device)
        for b, (docs, layout) in enumerate(zip(rows, layouts)):
            for doc, p0 in zip(docs, layout["starts"].tolist()):
                n = len(doc)
                aux, lh = self.features(doc.ids[None])
                hidden[b, p0 : p0 + n - 1] = aux[0, : n - 1]
                last[b, p0 : p0 + n - 1] = lh[0, 1:n]
                top[b, p0 : p0 + n - 1] = self.top_tokens(lh[0, 1:n])
        return hidden, last, top


def counted_positions(loss_mask: Tensor, top: Tensor, draft_to_target: Tensor) -> Tensor:
    """The positions whose loss and accuracy count: the loss mask's (the assistant's tokens),
    less those where the target's most likely token is outside the draft vocabulary.

    Note [the target's top token outside the draft vocabulary]
        The draft proposes draft-vocabulary tokens only, so where the target's top token is
        another one, no proposal of the draft would be accepted there under greedy
        verification. SpecForge and TorchSpec leave such positions out of the loss and the
        accuracy; so does this (the accuracy's denominator counts the remaining positions, where
        theirs counts the whole loss mask). The distribution learned at the remaining positions
        is the target's renormalised over the draft vocabulary, as theirs.

    Args:
        loss_mask: ``[B, T]`` bool.
        top: ``[B, T]`` the target's top token ids (:meth:`TargetModel.rows`; -1: none).
        draft_to_target: ``[draft_vocab]`` the target id of each draft id.
    """
    return loss_mask.to(top.device) & torch.isin(top, draft_to_target.to(top.device))  # -1 is in no vocabulary


def target_probs(last_hidden: Tensor, head_weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The target's next-token distribution over the draft vocabulary, ``[B, T, draft_vocab]``.

    ``softmax(last_hidden @ head_weight.T)`` in float32, stored in ``dtype`` (the loss upcasts).
    The one place the dense target is made: Eagle3Model's compact target
    ``compiled_mask.draft.loss.TargetHead(last_hidden, head_weight)`` is the same distribution
    without the ``[B, T, V]`` tensor.

    Args:
        last_hidden: ``[B, T, H]`` the target's last hidden states (after its final norm).
        head_weight: ``[draft_vocab, H]`` its lm_head rows for the draft vocabulary.
        dtype: dtype of the result.
    """
    logits = F.linear(last_hidden, head_weight.to(last_hidden.dtype))  # [B, T, V]
    return torch.softmax(logits.float(), dim=-1).to(dtype)
