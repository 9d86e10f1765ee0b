"""The FA4 backend: FlashAttention-4 (``flash-attn-4``, CuTe DSL) inside the compiled graph.

It goes through flex_attention's ``BACKEND="FLASH"`` lowering, which turns the flex HOP into
FA4's block-sparse forward and backward kernels under torch.compile. The kv-direction tensors feed
FA4's forward, the q-direction tensors its backward. FA4 refuses SymInts in mask_mod ("NYI: score_mod
or mask_mod captures a dynamic scalar"), which the static-width form never produces.

Note [FA4 mask_mod]
    torch 2.11's CuTe DSL lowering of mask_mod cannot load a captured 0-d tensor (the live-round
    count): it fails with "Expected TensorSSA, but got <class 'int'>" in fwd+bwd and with an
    UnboundLocalError in the forward-only graph (H200, flash-attn-4 4.0.0b36). So FA4 gets the
    plain Eagle3 mask_mod, which captures no live count (only the ``[B, Q_LEN]`` layout table of
    a padded/packed batch, Note [one layout table] in ``_layout.py``: an indexed capture lowers
    fine, fwd and bwd): the block tensors alone keep dead rounds out,
    which is exact when Q_LEN is a multiple of KV_BLOCK_SIZE or Q_LEN >= Q_BLOCK_SIZE +
    KV_BLOCK_SIZE - 1 (Note [when the plain mask_mod is exact] in ``block_mask.py``). Smaller
    unaligned Q_LEN raise, and so does eager use (eager flex evaluates mask_mod on the whole grid).

Importing compiled_mask never imports FA4; asking for ``backend="fa4"`` without it, or with a
release older than the floor (Note [FA4 version floor]), raises an error that says what to install.

Note [FA4 version floor]
    flash-attn-4 releases before 4.0.0b26 race in the SM90 block-sparse backward: the kernel,
    launched with programmatic dependent launch, loads the LSE written by the preprocess kernel
    before waiting for it, and returned garbage or NaN gradients in 0.1-1% of launches under flex's
    FLASH backend with a mask_mod (flash-attention PR #2756, merged 2026-08-05: the
    ``griddepcontrol_wait`` before ``load_LSE`` in ``block_sparse_utils.py``; 4.0.0b25 lacks it,
    4.0.0b26 is the first release with it). The floor is 4.0.0b36, the release this library was
    shown to work with (H200, torch 2.11, nvidia-cutlass-dsl 4.8.1); the ``fa4`` extra in
    pyproject.toml carries the same bounds. The version comes from the installed distribution's
    metadata, so the check imports no FA4 code; a flash_attn without metadata (a source tree on
    sys.path) has no known version and is not refused.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from torch.torch_version import TorchVersion

from compiled_mask._flex import flex_eagle3_attention
from compiled_mask.block_mask import _plain_mask_mod_is_exact

_INSTALL_HINT = "Install it with: pip install 'compiled-mask[fa4]' (the flash-attn-4 package)."
_FA4_MIN_VERSION = "4.0.0b36"  # Note [FA4 version floor]; the same bound as the fa4 extra
# FA4's tiles are 128 wide in both directions on SM90 and SM100 (m tile 128 x q_stage 2 = 256 on
# SM100); a sparse block must be a multiple of the tile (flash_attn/cute/block_sparsity.py).
_FA4_TILE = 128


@functools.cache
def fa4_available() -> bool:
    """Whether ``flash_attn.cute`` (FlashAttention-4) can be imported."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:
        return False


def _installed_fa4_version() -> str | None:
    """The installed flash-attn-4 release, from its metadata (imports nothing); None if unknown."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_fa4_installed(where: str) -> None:
    if not fa4_available():
        raise ModuleNotFoundError(
            f"{where}: backend='fa4' needs FlashAttention-4 (flash_attn.cute), which is not "
            f"installed. {_INSTALL_HINT} Or use backend='flex'."
        )
    version = _installed_fa4_version()
    # TorchVersion compares by PEP 440 (4.0.0b9 < 4.0.0b36 < 4.0.0rc1 < 4.0.0), with no
    # dependency on the `packaging` distribution, which torch does not require.
    if version is not None and TorchVersion(version) < _FA4_MIN_VERSION:
        raise ImportError(
            f"{where}: backend='fa4' needs flash-attn-4 >= {_FA4_MIN_VERSION}, but {version} is "
            "installed; releases before 4.0.0b26 can return garbage or NaN gradients (an SM90 "
            "block-sparse backward race, Note [FA4 version floor]). Upgrade with: pip install -U "
            f"'flash-attn-4>={_FA4_MIN_VERSION}' 'nvidia-cutlass-dsl>=4.8.1'. Or use backend='flex'."
        )


@torch.compiler.assume_constant_result
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def fa4_default_block_size(device: torch.device) -> tuple[int, int]:
    """FA4's BlockMask layout for ``device``: (128, 128) on Hopper (SM90), (256, 128) on SM100+."""
    return (128, 128) if _capability_major(device.index or 0) == 9 else (256, 128)


def _check_fa4_device(where: str, device: torch.device) -> None:
    """FA4 runs on CUDA GPUs of compute capability 9.0 (Hopper) or newer (Blackwell)."""
    if device.type != "cuda":
        raise ValueError(
            f"{where}: backend='fa4' runs on CUDA GPUs (Hopper SM90, Blackwell SM100+), got "
            f"inputs on {device}. Use backend='flex' elsewhere."
        )
    major = _capability_major(device.index or 0)
    if major < 9:
        raise ValueError(
            f"{where}: backend='fa4' needs a Hopper (SM90) or Blackwell (SM100+) GPU, but "
            f"{device} is sm_{major}x. Use backend='flex' on this GPU."
        )


def _check_fa4_block_size(where: str, block_size: tuple[int, int]) -> None:
    q_bs, kv_bs = block_size
    if q_bs % _FA4_TILE or kv_bs % _FA4_TILE:
        raise ValueError(
            f"{where}: backend='fa4' needs block sizes that are multiples of its {_FA4_TILE}-wide "
            f"tiles, got block_size={block_size}. Use (128, 128) on Hopper or (256, 128) on "
            "Blackwell, or leave block_size=None to pick from the device."
        )


def _check_fa4_head_dims(where: str, D: int, Dv: int) -> None:
    """FA4's block-sparse kernels tile the keys 128 wide only for head dims up to 128 (Hopper):
    at D=192, Dv=128 (MLA) it asks for 96-wide KV blocks ("Block sparsity expects
    sparse_block_size[1]=96", H200, 4.0.0b36), which the Eagle3 layout (KV blocks dividing
    128-query blocks) cannot give. Checked on an H200: D = Dv = 64 and 128."""
    if D != Dv or D > 128:
        raise NotImplementedError(
            f"{where}: backend='fa4' takes q/k and v of one head dim up to 128 (FA4's block-sparse "
            f"tiles), got D={D} and Dv={Dv}. Use backend='split' or 'flex', which take MLA-style "
            "heads (e.g. D=192, Dv=128)."
        )


def _check_fa4_call(where: str, q_len: int, block_size: tuple[int, int]) -> None:
    """FA4 runs compiled, on a Q_LEN where the plain mask_mod is exact (Note [FA4 mask_mod])."""
    if not torch.compiler.is_compiling():
        raise ValueError(
            f"{where}: backend='fa4' runs inside torch.compile only (flex_attention lowers to FA4 "
            "there; eagerly it would run its dense reference path). Compile the model: "
            "torch.compile(model, fullgraph=True), or use backend='flex' eagerly."
        )
    q_bs, kv_bs = block_size
    if not _plain_mask_mod_is_exact(q_len, q_bs, kv_bs):
        raise NotImplementedError(
            f"{where}: backend='fa4' with q_len={q_len} is not supported: below "
            f"Q_BLOCK_SIZE + KV_BLOCK_SIZE - 1 = {q_bs + kv_bs - 1} it must be a multiple of "
            f"KV_BLOCK_SIZE={kv_bs} (torch 2.11's FA4 lowering cannot read the live-round tensor "
            f"in mask_mod). Pad Q_LEN to a multiple of {kv_bs}, or use backend='flex'."
        )


def fa4_eagle3_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None,
    kernel_options: dict | None,
) -> Tensor:
    """FA4 over ``block_mask`` via flex_attention's FLASH lowering (compile it: eager flex would
    run its dense reference path instead).

    Args:
        q: ``[B, Hq, Q_LEN, D]``; k, v: ``[B, Hkv, KV_LEN, D]``, Hq a multiple of Hkv; bf16/fp16.
        block_mask: the Eagle3 BlockMask in FA4's layout (fa4_default_block_size).

    Returns:
        ``[B, Hq, Q_LEN, D]``.
    """
    options = {**(kernel_options or {}), "BACKEND": "FLASH"}
    return flex_eagle3_attention(q, k, v, block_mask, scale=scale, kernel_options=options)
