"""How a sequence is cut into chunks over the ranks of a process group (Note [shard order] in
``distributed.py``), and the all-gathers both context-parallel layers use: shared by the
attention (``distributed.py``) and the draft's unroll (``draft/context_parallel.py``)."""

from __future__ import annotations

import torch.distributed._functional_collectives as funcol

_SHARD_ORDERS = ("zigzag", "contiguous")

# torch 2.13 names them all_gather_single(_autograd) and deprecates all_gather_tensor(_autograd),
# the names torch 2.11 has.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _check_shard_order(where: str, q_len: int, world_size: int, shard_order: str) -> None:
    if shard_order not in _SHARD_ORDERS:
        raise ValueError(f"{where}: unknown shard_order={shard_order!r}; choose one of {list(_SHARD_ORDERS)}.")
    chunks = _num_chunks(world_size, shard_order)
    if q_len % chunks != 0:
        raise ValueError(
            f"{where}: shard_order={shard_order!r} cuts Q_LEN into {chunks} equal chunks over "
            f"world_size={world_size} ranks, got q_len={q_len} (not a multiple of {chunks}). "
            f"Pad the sequence to a multiple of {chunks} (and mark the padding with seq_lens)."
        )


def _num_chunks(world_size: int, shard_order: str) -> int:
    return 2 * world_size if shard_order == "zigzag" else world_size


def _rank_chunks(world_size: int, rank: int, shard_order: str) -> tuple[int, ...]:
    """The global chunk indices rank ``rank`` holds, in its local order (Note [shard order])."""
    return (rank, 2 * world_size - 1 - rank) if shard_order == "zigzag" else (rank,)


def _global_order(world_size: int, shard_order: str) -> list[tuple[int, int]]:
    """``(rank, local chunk)`` of each global chunk 0, 1, ..., in order."""
    where = {c: (p, j) for p in range(world_size) for j, c in enumerate(_rank_chunks(world_size, p, shard_order))}
    return [where[c] for c in range(_num_chunks(world_size, shard_order))]
