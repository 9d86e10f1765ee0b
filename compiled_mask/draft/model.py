"""The Eagle3 draft model, built the way SpecForge (``LlamaForCausalLMEagle3``) and TorchSpec build
theirs, with the same module and parameter names, so their checkpoints' state dicts load here:

    fc                 Linear(3 * target_hidden_size -> hidden_size): fuses the target's three
                       auxiliary hidden states (a low, a middle and a late layer)
    embed_tokens       the target's token embedding (usually frozen: ``freeze_embedding()``)
    midlayer           one Llama decoder layer whose attention reads 2 * hidden_size:
                         input_layernorm(token embedding) ++ hidden_norm(hidden states)
                         -> self_attn (q/k/v_proj, RoPE, GQA through Eagle3Attention, o_proj)
                         + residual -> post_attention_layernorm -> mlp (SwiGLU) + residual
    norm, lm_head      RMSNorm and the head over the draft vocabulary
    t2d, d2t           vocabulary maps: t2d[target id] is True for ids in the draft vocabulary,
                       d2t[draft id] = target id - draft id
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiled_mask._dtypes import _f32_or_wider

__all__ = ["Eagle3DraftConfig", "Eagle3DraftModel"]


@dataclasses.dataclass
class Eagle3DraftConfig:
    """Sizes of an Eagle3 draft (HF ``LlamaConfig`` names; the defaults are Llama-3-8B's).

    Args:
        hidden_size: width of the draft (and, unless ``target_hidden_size`` says otherwise, of
            the target's hidden states).
        intermediate_size: SwiGLU width.
        num_attention_heads, num_key_value_heads: query and K/V heads (GQA when they differ).
        head_dim: per-head width; default ``hidden_size // num_attention_heads``.
        vocab_size: the target's vocabulary (embedding rows, ``t2d``).
        draft_vocab_size: rows of ``lm_head`` (the tokens the draft proposes).
        target_hidden_size: width of each of the target's three auxiliary hidden states; default
            ``hidden_size``.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base (Llama 3: 500000).
    """

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    vocab_size: int = 128256
    draft_vocab_size: int = 32000
    target_hidden_size: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0

    def __post_init__(self) -> None:
        where = "Eagle3DraftConfig"
        for name in ("hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "draft_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be an int >= 1, got {name}={value!r}.")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"{where}: hidden_size={self.hidden_size} is not a multiple of "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("head_dim", "target_hidden_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}: {name} must be an int >= 1 or None, got {name}={value!r}.")
        if self.head_dim % 2:
            raise ValueError(f"{where}: RoPE needs an even head_dim, got head_dim={self.head_dim}.")
        for name, low in (("rms_norm_eps", "0"), ("rope_theta", "1")):
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or (value < 0 if name == "rms_norm_eps" else value <= 1):
                bound = ">= 0" if name == "rms_norm_eps" else "> 1"
                raise ValueError(
                    f"{where}: {name} must be a finite number {bound}, got {name}={value!r} "
                    f"(Llama 3: rms_norm_eps=1e-5, rope_theta=500000)."
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{where}: num_attention_heads must be a multiple of num_key_value_heads (GQA), "
                f"got {self.num_attention_heads} and {self.num_key_value_heads}."
            )
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"{where}: draft_vocab_size={self.draft_vocab_size} exceeds vocab_size="
                f"{self.vocab_size}; the draft vocabulary is a subset of the target's."
            )
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size


class _RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32 (float64 for float64), scale in the input dtype
    (``weight`` [hidden])."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.to(_f32_or_wider(x.dtype))  # float64 stays float64
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


class _MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _SelfAttention(nn.Module):
    """The projections of the Eagle3 layer: q/k/v from ``2 * hidden_size`` inputs, o_proj back."""

    def __init__(self, config: Eagle3DraftConfig) -> None:
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_key_value_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, D)
        self.q_proj = nn.Linear(2 * H, self.num_heads * D, bias=False)
        self.k_proj = nn.Linear(2 * H, self.num_key_value_heads * D, bias=False)
        self.v_proj = nn.Linear(2 * H, self.num_key_value_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, 2 * hidden]`` -> q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]``, RoPE on q, k."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, D).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(B, T, self.num_key_value_heads, D).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.num_key_value_heads, D).transpose(1, 2)  # [B, Hkv, T, D]
        # contiguous(): the attention kernels (and Inductor's CPU flex kernel) want [B, H, T, D]
        # rows; the K/V round is copied into the buffer anyway.
        return _rope(q, cos, sin).contiguous(), _rope(k, cos, sin), v


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, HF's rotate-half convention: ``x [B, H, T, D]``, cos/sin ``[T, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # [B, H, T, D]
    return (x * cos + rotated * sin).to(x.dtype)


class _DecoderLayer(nn.Module):
    """SpecForge's ``midlayer``: a Llama decoder layer over [embedding ++ hidden states]."""

    def __init__(self, config: Eagle3DraftConfig) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = _SelfAttention(config)
        self.mlp = _MLP(H, config.intermediate_size)
        self.hidden_norm = _RMSNorm(H, eps)
        self.input_layernorm = _RMSNorm(H, eps)
        self.post_attention_layernorm = _RMSNorm(H, eps)


class Eagle3DraftModel(nn.Module):
    """The Eagle3 draft (SpecForge's ``LlamaForCausalLMEagle3``: same modules, same names).

    The pieces a TTT step uses are methods with SpecForge's names: :meth:`embed_input_ids`,
    :meth:`project_hidden_states`, :meth:`compute_logits`; the decoder layer runs inside
    :class:`Eagle3Model`, which owns the K/V rounds and the attention.

    Args:
        config: the sizes (:class:`Eagle3DraftConfig`).

    Example::

        >>> cfg = Eagle3DraftConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                         num_key_value_heads=2, vocab_size=300, draft_vocab_size=100)
        >>> draft = Eagle3DraftModel(cfg)
        >>> draft.midlayer.self_attn.q_proj.weight.shape  # reads [embedding ++ hidden states]
        torch.Size([64, 128])
    """

    def __init__(self, config: Eagle3DraftConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.fc = nn.Linear(3 * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = _DecoderLayer(config)
        self.norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        # The identity map until set_vocab_mapping: draft id i is target id i.
        self.register_buffer("t2d", torch.arange(config.vocab_size) < config.draft_vocab_size)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        inv_freq = 1.0 / config.rope_theta ** (
            torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D / 2]

    def freeze_embedding(self) -> None:
        """Stop training ``embed_tokens`` (it is the target's; Eagle3 trainers keep it frozen)."""
        self.embed_tokens.weight.requires_grad_(False)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` target-vocabulary ids -> ``[B, T, hidden_size]``.

        Ids must lie in ``[0, vocab_size)``: reading them to check would sync with the device, so
        an id outside is refused by the embedding itself (on CPU, eagerly, with this message).
        """
        try:
            return self.embed_tokens(input_ids)
        except IndexError as e:
            raise ValueError(
                f"Eagle3DraftModel: input_ids must be target-vocabulary ids in [0, vocab_size = "
                f"{self.config.vocab_size}); got an id outside it ({e}). Padding positions too need a "
                f"valid id (e.g. 0)."
            ) from e

    def project_hidden_states(self, hidden_states: Tensor) -> Tensor:
        """The target's three auxiliary hidden states ``[B, T, 3 * target_hidden_size]`` ->
        ``[B, T, hidden_size]`` (``fc``)."""
        expected = 3 * self.config.target_hidden_size
        if hidden_states.size(-1) != expected:
            raise ValueError(
                f"Eagle3DraftModel: hidden_states must be the target's three auxiliary hidden "
                f"states concatenated, [B, T, 3 * target_hidden_size = {expected}], got shape "
                f"{tuple(hidden_states.shape)}."
            )
        return self.fc(hidden_states)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        """``[B, T, hidden_size]`` (pre-norm) -> ``[B, T, draft_vocab_size]`` logits."""
        return self.lm_head(self.norm(hidden_states))

    def rope_cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``[P, head_dim]`` of RoPE at ``positions [P]``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [P, D / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.no_grad()
    def set_vocab_mapping(self, draft_to_target: Tensor) -> None:
        """Set ``t2d``/``d2t`` from the target id of each draft id.

        Args:
            draft_to_target: ``[draft_vocab_size]`` distinct target ids (e.g. the most frequent
                tokens, sorted), as SpecForge's vocab-mapping file lists them.
        """
        where = "Eagle3DraftModel.set_vocab_mapping"
        n, vocab = self.config.draft_vocab_size, self.config.vocab_size
        if (not isinstance(draft_to_target, Tensor) or draft_to_target.shape != (n,)
                or draft_to_target.dtype.is_floating_point or draft_to_target.dtype == torch.bool):
            got = (f"shape {tuple(draft_to_target.shape)} and dtype {draft_to_target.dtype}"
                   if isinstance(draft_to_target, Tensor) else type(draft_to_target).__name__)
            raise ValueError(f"{where}: expected [{n}] int target ids, got {got}.")
        # A one-off setup call, not a forward pass: reading the ids to check them is fine here.
        ids = draft_to_target.to("cpu", torch.int64)
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise ValueError(f"{where}: target ids must lie in [0, vocab_size = {vocab}), got {bad[:5].tolist()}.")
        unique, counts = ids.unique(return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"{where}: target ids must be distinct (each draft id maps to one target id and back), "
                f"got repeated ids {unique[counts > 1][:5].tolist()}."
            )
        ids = ids.to(self.d2t.device)
        self.d2t.copy_(ids - torch.arange(n, device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def target_to_draft_ids(self, target_ids: Tensor) -> Tensor:
        """Target-vocabulary ids -> draft ids, -1 where the draft vocabulary lacks the token (and for
        ids outside ``[0, vocab_size)``, such as -1 or -100 padding)."""
        n, vocab = self.config.draft_vocab_size, self.config.vocab_size
        table = torch.full((vocab,), -1, dtype=torch.int64, device=self.d2t.device)
        table[self.d2t + torch.arange(n, device=self.d2t.device)] = torch.arange(n, device=self.d2t.device)
        inside = (target_ids >= 0) & (target_ids < vocab)
        return table[target_ids.clamp(0, vocab - 1)].masked_fill(~inside, -1)
