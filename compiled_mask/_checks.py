"""Validation of user-facing ints and shapes, done in Python before any op runs.

Every check here reads only Python ints (or shape SymInts), never tensor data, so validation adds
no device sync and no data-dependent guard. Errors name the offending value and the fix.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DEFAULT_BLOCK_SIZE = 128


def _check_positive(where: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise ValueError(f"{where}: {name} must be an int, got {name}={value!r}.")
        if value < 1:
            raise ValueError(f"{where}: {name} must be >= 1, got {name}={value}.")


def _check_lengths(where: str, Q_LEN: int, KV_LEN: int) -> None:
    """Q_LEN >= 1 and KV_LEN >= Q_LEN (the keys hold at least the first round)."""
    _check_positive(where, Q_LEN=Q_LEN, KV_LEN=KV_LEN)
    if KV_LEN < Q_LEN:
        raise ValueError(
            f"{where}: KV_LEN must be >= Q_LEN (the keys start with the Q_LEN causal keys), "
            f"got Q_LEN={Q_LEN} and KV_LEN={KV_LEN}. For TTT round r use KV_LEN = Q_LEN * r."
        )


def _block_sizes(where: str, BLOCK_SIZE: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise ``BLOCK_SIZE`` (an int or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)``) and check it.

    KV_BLOCK_SIZE must divide Q_BLOCK_SIZE: that is the layout FA4 reads (e.g. 256x128 on
    Blackwell) and the one flex_attention's kernels assume.
    """
    if isinstance(BLOCK_SIZE, (tuple, list)):
        if len(BLOCK_SIZE) != 2:
            raise ValueError(
                f"{where}: BLOCK_SIZE must be an int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair, "
                f"got BLOCK_SIZE={BLOCK_SIZE!r}."
            )
        q_bs, kv_bs = BLOCK_SIZE
    else:
        q_bs = kv_bs = BLOCK_SIZE
    _check_positive(where, Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs)
    if q_bs % kv_bs != 0:
        raise ValueError(
            f"{where}: KV_BLOCK_SIZE must divide Q_BLOCK_SIZE, got BLOCK_SIZE=({q_bs}, {kv_bs}). "
            "Use e.g. 128, (128, 128) on Hopper or (256, 128) on Blackwell."
        )
    return q_bs, kv_bs


def _check_rounds(where: str, rounds: torch.Tensor | int, max_rounds: int, device: torch.device) -> None:
    """Check the live-round count: a 0-d int tensor on ``device``, or (eagerly) an int.

    A tensor is checked by metadata only; its value is clamped to [1, max_rounds] in the graph
    (Note [static widths] in ``_op.py``). An int must lie in [1, max_rounds], and is refused
    inside torch.compile: there it would be a graph constant, recompiling at every TTT step.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, (int, torch.SymInt, torch.Tensor)):
        raise ValueError(f"{where}: rounds must be a 0-d int tensor or an int, got {rounds!r}.")
    if not isinstance(rounds, torch.Tensor):
        if torch.compiler.is_compiling():
            # (No value in the message: inside torch.compile it may be a symbol, which an f-string
            # cannot format there.)
            raise ValueError(
                f"{where}: rounds is a Python int inside torch.compile, which recompiles at every "
                "new value. Pass a 0-d int tensor on the inputs' device, e.g. "
                "torch.tensor(r, device=q.device): one graph then serves every TTT step."
            )
        if not 1 <= rounds <= max_rounds:
            raise ValueError(
                f"{where}: rounds must be in [1, max_rounds={max_rounds}], got rounds={rounds}."
            )
        return
    if rounds.dim() != 0 or not _is_int(rounds):
        raise ValueError(
            f"{where}: rounds must be a 0-d int tensor, got shape {tuple(rounds.shape)} and "
            f"dtype {rounds.dtype}. Use torch.tensor(r, device=...)."
        )
    _check_widens(where, "rounds", rounds)
    if not _same_device(rounds.device, device):
        raise ValueError(
            f"{where}: rounds is on {rounds.device} but the attention inputs are on {device}. "
            f"Create it there once: torch.tensor(r, device={str(device)!r})."
        )


def _live_rounds(rounds: torch.Tensor | int, max_rounds: int, device: torch.device) -> torch.Tensor:
    """The checked live-round count as a 0-d int64 tensor clamped to [1, max_rounds].

    Note [widen rounds first]
        Everything downstream computes with ``rounds`` (``rounds * Q_LEN`` in mask_mod, the
        suffix kernels' loop bound), and tensor arithmetic keeps the tensor's dtype: a uint8 count
        of 3 times Q_LEN=300 wraps to 132, an int32 count of 2**31 - 1 overflows. So the count is
        widened to int64 and clamped once, in the graph, before any arithmetic; every consumer
        then reads a value in [1, max_rounds]. (An op input is always realized, so mask_mod may
        capture it: Note [live keys in mask_mod] in ``block_mask.py``.)
    """
    if not isinstance(rounds, torch.Tensor):
        return torch.tensor(rounds, dtype=torch.int64, device=device)  # range-checked already
    return rounds.to(torch.int64).clamp(1, max_rounds)


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_widens(where: str, name: str, t: torch.Tensor) -> None:
    """Integer tensors are widened to int64 before any arithmetic; uint64 cannot be exactly."""
    if t.dtype == torch.uint64:
        raise ValueError(
            f"{where}: {name} has dtype torch.uint64, whose values above 2**63 - 1 cannot be "
            f"widened to int64 exactly. Pass it as int64 (e.g. {name}.to(torch.int64))."
        )


def _check_device(where: str, device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; a CUDA device where this torch has none is refused here
    (rather than failing later, deep inside the Triton build)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{where}: device={str(device)!r}, but this torch has no CUDA device "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Pass device='cpu', "
            "or the device of your inputs (device=q.device)."
        )
    return device


def _same_device(a: torch.device, b: torch.device | str) -> bool:
    """Same device, where an index-less device ("cuda") matches any index of its type."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_doc_layout(
    where: str,
    Q_LEN: int,
    B: int,
    seq_lens: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    device: torch.device | str | None = None,
) -> int:
    """Check ``seq_lens [B]`` / ``doc_ids [B, Q_LEN]`` (metadata only) and return the mask's batch.

    Values are not read (that would sync): every integer tensor of the right shape is a valid
    layout (Note [one layout table] in ``_layout.py``). ``device=None`` skips the device check
    against the mask (the two must still share one device).
    """
    batch = None
    for name, t, rank, shape in (("seq_lens", seq_lens, 1, "[B]"), ("doc_ids", doc_ids, 2, "[B, Q_LEN]")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != rank or not _is_int(t):
            got = f"shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)
            raise ValueError(f"{where}: {name} must be an int tensor {shape}, got {got}.")
        _check_widens(where, name, t)
        if device is not None and not _same_device(t.device, device):
            raise ValueError(f"{where}: {name} is on {t.device} but the mask is built on {device}. Move it there.")
        if batch is not None and t.shape[0] != batch:
            raise ValueError(
                f"{where}: seq_lens and doc_ids must have one batch size, got {batch} and {t.shape[0]}."
            )
        batch = t.shape[0]
    if seq_lens is not None and doc_ids is not None and seq_lens.device != doc_ids.device:
        raise ValueError(
            f"{where}: seq_lens is on {seq_lens.device} but doc_ids is on {doc_ids.device}. "
            "Put them on one device."
        )
    if doc_ids is not None and doc_ids.shape[1] != Q_LEN:
        raise ValueError(
            f"{where}: doc_ids must be [B, Q_LEN={Q_LEN}], got shape {tuple(doc_ids.shape)}."
        )
    if batch is None:
        return B
    if B not in (1, batch):
        raise ValueError(
            f"{where}: B={B} but seq_lens/doc_ids have batch {batch}. Leave B=1 or pass B={batch}."
        )
    return batch


def _shape(t: torch.Tensor) -> str:
    """``t``'s shape for an error message. Inside torch.compile a size traced as dynamic has no
    value, only a symbol (``s0``); the message then says so, and how to see the value."""
    note = ""
    if torch.compiler.is_compiling():
        note = (" (inside torch.compile a size shown as s0, s1, ... is traced as a symbol; the same "
                "call eagerly, e.g. under torch.compiler.set_stance('force_eager'), shows its value)")
    return f"{tuple(t.shape)}{note}"


def _check_qkv(where: str, q: Tensor, k: Tensor, v: Tensor, q_len: int, kv_len: int) -> None:
    """Shape, dtype and device checks of the attention inputs (metadata only)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = f"shape {_shape(t)}" if isinstance(t, Tensor) else repr(t)
            raise ValueError(f"{where}: {name} must be 4-D [B, H, S, D], got {got}.")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(
            f"{where}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{where}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}."
        )
    if q.size(2) != q_len:
        raise ValueError(
            f"{where}: q must have Q_LEN={q_len} positions (dim 2), got q.shape={_shape(q)}."
        )
    if k.size(2) != kv_len or v.size(2) != kv_len:
        raise ValueError(
            f"{where}: k and v must be the static buffer of Q_LEN * max_rounds = {kv_len} "
            f"positions (dim 2), got k.shape={_shape(k)} and v.shape={_shape(v)}. "
            "Allocate it once for max_rounds and write round s at [s * Q_LEN, (s + 1) * Q_LEN)."
        )
    if q.size(0) != k.size(0) or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{where}: batch and head dims must match: q.shape={_shape(q)}, "
            f"k.shape={_shape(k)}, v.shape={_shape(v)}."
        )
    if q.size(3) != k.size(3):
        raise ValueError(
            f"{where}: q and k must share the head dim D, got {q.size(3)} and {k.size(3)}."
        )
    if k.size(1) == 0 or q.size(3) == 0:
        raise ValueError(
            f"{where}: k/v need at least one head and q/k a head dim of at least 1, got "
            f"Hkv={k.size(1)} and D={q.size(3)}."
        )
    if q.size(1) % k.size(1) != 0:
        raise ValueError(
            f"{where}: the number of query heads must be a multiple of the K/V heads (GQA), "
            f"got Hq={q.size(1)} and Hkv={k.size(1)}."
        )
