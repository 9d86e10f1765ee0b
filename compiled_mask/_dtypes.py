"""The dtype softmax statistics, losses and accumulations are computed in."""

from __future__ import annotations

import torch


def _f32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32, float64 for float64: half types are widened, float64 keeps
    its precision (the float64 references the tests compare against)."""
    return torch.promote_types(dtype, torch.float32)
