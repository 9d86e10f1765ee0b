"""Context parallel Eagle3 attention: the sequence sharded over a process group, in one graph.

Every round is sharded the same way along the sequence: rank r holds the same positions of q and
of every round of the K/V buffer (:func:`shard_positions`). A query's suffix keys
``q + s * Q_LEN`` then live on its own rank, so only the causal part over the first Q_LEN keys
needs other ranks' data. Two modes:

* ``"ulysses"``: all-to-all from sequence shards to head shards (q and the whole K/V buffer), the
  unchanged single-GPU :class:`~compiled_mask.Eagle3Attention` on the full sequence for
  ``Hq / P`` query heads (any backend, seq_lens and doc_ids included), all-to-all back.
* ``"allgather"``: all-gather round 0 of K/V (the causal keys), the causal part of each local
  query chunk against them, the local suffix rounds merged by log-sum-exp as the split backend
  merges them; the gathered keys' gradients are reduce-scattered back.

``compiled_mask.draft.context_parallel`` runs the whole Eagle3 draft training step on the shards.

The collectives are ``torch.distributed._functional_collectives``, which torch.compile traces into
the step's graph (forward and backward), so a compiled TTT step is still one graph for every
value of ``rounds``. On CPU with gloo (torch 2.13) they trace under ``aot_eager``
(``tests/test_distributed.py``) and compile with Inductor (docs/context_parallel.md, "Compiles").

Note [shard order]
    Q_LEN is cut into ``n`` equal chunks of ``C`` positions: ``n = 2P`` for ``"zigzag"``, where
    rank r holds chunks r and 2P-1-r (rank 0 the first and the last chunk): under a causal mask
    every rank then has the same work (chunk c attends c*C + (C+1)/2 keys on average, and
    r + (2P-1-r) is the same for every r); ``n = P`` for ``"contiguous"``, rank r holding chunk r
    (the last rank does 2P-1 times the causal work of the first; simplest to shard by hand).
    A rank's local sequence is its chunks in ascending order: ``L = Q_LEN / P`` positions.
    The local K/V buffer is ``[B, Hkv, max_rounds * L, D]``: round s at ``[s * L, (s + 1) * L)``,
    holding the rank's positions of round s in the same order as q. So the local buffer is the
    global one with each round sharded like q (:func:`shard_sequence`), and a draft model writes
    round s of its local keys at ``[s * L, (s + 1) * L)`` exactly as it would on one GPU with
    ``q_len = L``. seq_lens ``[B]`` and doc_ids ``[B, Q_LEN]`` are *global* (every rank passes
    the same tensors; they are small).

Note [all-gather, not a ring]
    The all-gather mode holds round 0 of K and V for the whole sequence on every rank
    (``2 * Q_LEN * Hkv * D`` elements: 0.5 GB in bf16 at Q_LEN = 128K, 8 K/V heads, d=128)
    instead of passing blocks round a ring. In exchange it is one collective forward and one
    backward (a reduce-scatter of the gathered keys' gradients), which torch.compile traces as
    plain functional collectives, and each query chunk's causal part is two large kernel calls
    (its full prefix, its causal diagonal block) rather than P smaller ones. The diagonal blocks
    and the suffix need only local data. docs/context_parallel.md counts the bytes.

Note [every rank's reduce-scatter depends on dO]
    The gathered keys' gradient is reduce-scattered in backward (the all-gather's autograd), and
    every rank must issue that collective in the same graph and order. A rank whose chunks have
    no prefix (rank 0 of the contiguous shard order) would read no gathered key, so its gradient
    would not depend on the output's gradient, and AOTAutograd's partitioner would move its
    reduce-scatter into the forward graph on that rank only: the ranks' collectives no longer
    match and the compiled step hangs (seen on NCCL and gloo). So each chunk's diagonal block
    reads its keys from the gathered tensor too (the rank's own rows, equal to its local ones):
    on every rank the collective's input depends on dO, and the reduce-scatter returns the
    diagonal block's gradient to its rank.

Note [cuDNN in the context-parallel split]
    The all-gather mode's causal calls are the causal op's (``_causal.py``), on cuDNN as on one
    GPU. Its backward makes the row slices of dO, out and lse it is handed dense inside the op
    (Note [cuDNN backward strides] in ``_causal.py``): without that, cuDNN's graph cache returned
    wrong gradients here under Inductor. The history and the cuDNN/flash timings are in
    docs/context_parallel.md ("One rank on one H200: the all-gather mode's compute").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from compiled_mask._causal import causal_attention
from compiled_mask._checks import _check_positive, _check_qkv, _check_rounds, _live_rounds, _shape
from compiled_mask._inputs import Layout, normalize_layout
from compiled_mask._layout import _valid_queries, _zero_padding
from compiled_mask._suffix import suffix_attention
from compiled_mask._shards import (
    _all_gather_autograd,
    _check_shard_order,
    _global_order,
    _num_chunks,
    _rank_chunks,
)
from compiled_mask.modules import Eagle3Attention

__all__ = ["Eagle3ContextParallelAttention", "shard_positions", "shard_sequence"]

_MODES = ("ulysses", "allgather")
def shard_positions(q_len: int, world_size: int, rank: int, shard_order: str = "zigzag", *,
                    device: torch.device | str | None = None) -> Tensor:
    """The global positions a rank holds, in its local order (Note [shard order]).

    Args:
        q_len: the global Q_LEN.
        world_size, rank: the group's size and this rank in it.
        shard_order: ``"zigzag"`` (rank r holds chunks r and 2P-1-r of 2P: balanced causal work) or
            ``"contiguous"`` (chunk r of P).
        device: where to put the result (default CPU).

    Returns:
        ``[q_len // world_size]`` int64: local position i is global position ``result[i]``. Use it
        for rotary embeddings, to shard inputs (``x[..., result, :]``, or :func:`shard_sequence`
        for every round at once), labels and loss masks.

    Example::

        >>> shard_positions(8, 2, 0)
        tensor([0, 1, 6, 7])
        >>> shard_positions(8, 2, 1, "contiguous")
        tensor([4, 5, 6, 7])
    """
    where = "shard_positions"
    _check_positive(where, q_len=q_len, world_size=world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"{where}: rank must be an int in [0, world_size={world_size}), got rank={rank!r}.")
    _check_shard_order(where, q_len, world_size, shard_order)
    C = q_len // _num_chunks(world_size, shard_order)
    return torch.cat([torch.arange(c * C, (c + 1) * C, device=device)
                      for c in _rank_chunks(world_size, rank, shard_order)])


def shard_sequence(x: Tensor, q_len: int, world_size: int, rank: int, shard_order: str = "zigzag", *,
                   dim: int = 2) -> Tensor:
    """A rank's shard of every round of a sequence tensor (Note [shard order]).

    Args:
        x: a tensor whose ``dim`` holds ``R * q_len`` positions, R >= 1 rounds of q_len: q
            ``[B, H, Q_LEN, D]`` (R = 1), the K/V buffer ``[B, Hkv, Q_LEN * max_rounds, D]``,
            hidden states ``[B, Q_LEN, E]`` (``dim=1``), ...
        q_len, world_size, rank, shard_order: as :func:`shard_positions`.
        dim: the sequence dim.

    Returns:
        ``x`` with ``dim`` of size ``R * (q_len // world_size)``: round s's slice holds the
        positions ``shard_positions(...)`` of round s, in that order. A copy.
    """
    where = "shard_sequence"
    dim = dim % x.dim()
    positions = shard_positions(q_len, world_size, rank, shard_order, device=x.device)
    if x.size(dim) % q_len != 0:
        raise ValueError(
            f"{where}: dim {dim} of x must hold whole rounds of q_len={q_len} positions, got "
            f"x.shape={tuple(x.shape)}."
        )
    rounds = x.size(dim) // q_len
    xr = x.unflatten(dim, (rounds, q_len))  # [..., R, Q_LEN, ...]
    return xr.index_select(dim + 1, positions).flatten(dim, dim + 1)  # [..., R * L, ...]


class Eagle3ContextParallelAttention(nn.Module):
    """Eagle3 TTT attention with the sequence sharded over a process group (module docstring).

    A drop-in for :class:`~compiled_mask.Eagle3Attention` on each rank: the same ``forward``,
    with each tensor replaced by the rank's shard (Note [shard order]). ``q_len`` stays the
    global Q_LEN; ``rounds`` stays a 0-d tensor, so a compiled step is one graph for every TTT
    step, collectives included.

    Args:
        q_len: the global Q_LEN (queries per round over all ranks).
        max_rounds: rounds the K/V buffer holds.
        group: the process group the sequence is sharded over (default: the world).
        mode: ``"ulysses"`` (all-to-all to head shards; needs Hq and Hkv divisible by the group
            size) or ``"allgather"`` (round-0 K/V gathered, the causal part per query chunk, the
            suffix local). See docs/context_parallel.md for which to pick.
        shard_order: ``"zigzag"`` or ``"contiguous"`` (:func:`shard_positions`). Q_LEN must be a
            multiple of 2P (zigzag) or P (contiguous).
        backend: the attention backend. ``"ulysses"`` runs ``Eagle3Attention(backend=...)`` on
            the gathered sequence, so any of ``"flex"``, ``"fa4"``, ``"split"``; ``"allgather"``
            runs the split backend's kernels and takes only ``"split"``.
        scale: softmax scale; default ``1 / sqrt(D)``.
        block_size, kernel_options: for the Ulysses mode's block-mask backends
            (``Eagle3Attention``).

    Attributes:
        positions: ``[L]`` int64 buffer, the global positions of this rank's queries (for rotary
            embeddings); L = q_len // world_size.
        local_len: L.
        kv_len: ``L * max_rounds``, the length of the local K/V buffer (as ``Eagle3Attention.kv_len``
            is the global one): a model that sizes its buffer by ``attn.kv_len`` and writes round s
            at ``[s * attn.kv_len // max_rounds, ...)`` runs unchanged on either module.

    Example::

        # On each rank, after torch.distributed.init_process_group(...):
        P, rank = dist.get_world_size(), dist.get_rank()
        q_len, max_rounds = 64, 3
        attn = Eagle3ContextParallelAttention(q_len, max_rounds, mode="allgather")
        torch.manual_seed(0)  # the same global tensors on every rank, for the example
        q = torch.randn(1, 4, q_len, 16)
        k_buf, v_buf = torch.randn(2, 1, 2, q_len * max_rounds, 16)
        local = [shard_sequence(t, q_len, P, rank) for t in (q, k_buf, v_buf)]
        out = attn(*local, torch.tensor(2))  # [1, 4, q_len // P, 16]: the rows attn.positions
        assert out.shape == (1, 4, q_len // P, 16)
    """

    def __init__(
        self,
        q_len: int,
        max_rounds: int,
        *,
        group: dist.ProcessGroup | None = None,
        mode: str = "allgather",
        shard_order: str = "zigzag",
        backend: str = "split",
        scale: float | None = None,
        block_size: int | tuple[int, int] | None = None,
        kernel_options: dict | None = None,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        _check_positive(where, q_len=q_len, max_rounds=max_rounds)
        if mode not in _MODES:
            raise ValueError(f"{where}: unknown mode={mode!r}; choose one of {list(_MODES)}.")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                f"{where}: torch.distributed is not initialised. Call "
                "torch.distributed.init_process_group(...) before building the module."
            )
        group = dist.group.WORLD if group is None else group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        _check_shard_order(where, q_len, self.world_size, shard_order)
        if mode == "allgather" and (backend != "split" or block_size is not None or kernel_options is not None):
            raise ValueError(
                f"{where}: mode='allgather' runs the split backend's kernels (a fused causal kernel "
                f"and the suffix merge), got backend={backend!r}, block_size={block_size}, "
                f"kernel_options={kernel_options}. Use backend='split', or mode='ulysses' for a "
                "block-mask backend."
            )
        self.group = group
        self.q_len = q_len
        self.max_rounds = max_rounds
        self.mode = mode
        self.shard_order = shard_order
        self.backend = backend
        self.scale = scale
        self.local_len = q_len // self.world_size
        self.kv_len = self.local_len * max_rounds  # the local K/V buffer (Eagle3Attention.kv_len)
        self.register_buffer("positions", shard_positions(q_len, self.world_size, self.rank, shard_order),
                             persistent=False)
        # The single-GPU attention the Ulysses mode runs on the full sequence of its head shard.
        self.local = (
            Eagle3Attention(q_len, max_rounds, backend=backend, block_size=block_size, scale=scale,
                            kernel_options=kernel_options)
            if mode == "ulysses" else None
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rounds: Tensor | int,
        *,
        seq_lens: Tensor | None = None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """Attention of this rank's queries over the live rounds (Note [shard order]).

        Args:
            q: ``[B, Hq, L, D]``, this rank's queries (L = Q_LEN / P, positions
                :attr:`positions`).
            k: ``[B, Hkv, max_rounds * L, D]``, this rank's K buffer: round s at
                ``[s * L, (s + 1) * L)``, the same positions as q. v: likewise ``[..., Dv]``.
            rounds: live rounds, a 0-d int tensor (one graph for all values), or eagerly an int.
            seq_lens: optional ``[B]``; doc_ids: optional ``[B, Q_LEN]``: *global*, as for
                ``Eagle3Attention`` (every rank passes the same). doc_ids needs mode="ulysses".

        Returns:
            ``[B, Hq, L, Dv]``, this rank's rows of the global output.
        """
        where = type(self).__name__
        L, P = self.local_len, self.world_size
        for name, t, n in (("q", q, L), ("k", k, L * self.max_rounds), ("v", v, L * self.max_rounds)):
            if t.dim() == 4 and t.size(2) != n:
                raise ValueError(
                    f"{where}: {name} must be this rank's shard of Q_LEN / world_size = {L} positions "
                    f"{'per round ' if name != 'q' else ''}({n} in dim 2), got {name}.shape="
                    f"{_shape(t)}. Shard the global tensors with shard_sequence(x, "
                    f"{self.q_len}, {P}, rank={self.rank}, shard_order={self.shard_order!r})."
                )
        _check_qkv(where, q, k, v, L, L * self.max_rounds)
        _check_rounds(where, rounds, self.max_rounds, q.device)
        layout = normalize_layout(where, self.q_len, seq_lens, doc_ids, q.device, q.size(0))  # Note [one layout table]
        rounds = _live_rounds(rounds, self.max_rounds, q.device)  # Note [widen rounds first]
        return self._attend(q, k, v, rounds, layout)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, layout: Layout, *,
                finite_padding: bool = False) -> Tensor:
        """The attention from checked, normalised inputs (``Eagle3Attention._attend``'s contract;
        ``layout`` is the global batch layout)."""
        where = type(self).__name__
        P = self.world_size
        if self.mode == "ulysses":
            for name, heads in (("Hq", q.size(1)), ("Hkv", k.size(1))):
                if heads % P != 0:
                    raise ValueError(
                        f"{where}: mode='ulysses' gives each of the {P} ranks a slice of the heads, "
                        f"got {name}={heads}, not a multiple of {P}. Use mode='allgather' (any head "
                        "count), or a group whose size divides both head counts."
                    )
            return self._ulysses(q, k, v, rounds, layout, finite_padding)
        if layout.documents:
            raise NotImplementedError(
                f"{where}: doc_ids with mode='allgather' is not supported yet (the causal part "
                "would need a kernel that stops at each document's start). Use mode='ulysses', "
                "which takes doc_ids."
            )
        if q.device.type == "cuda" and q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"{where}: mode='allgather' runs fused attention kernels (cuDNN or flash) on CUDA, "
                f"which take bf16 or fp16 inputs, got {q.dtype}. Cast q, k, v."
            )
        if v.size(3) != k.size(3):
            raise NotImplementedError(
                f"{where}: mode='allgather' gathers round 0 of k and v as one tensor and needs one "
                f"head dim, got D={k.size(3)} and Dv={v.size(3)}. Use mode='ulysses' for MLA-style heads."
            )
        if layout.first_key is None:
            return self._allgather(q, k, v, rounds)
        # The rank's rows of the layout: padding inputs and output rows are zeroed (Note [padding
        # is garbage] in _layout.py, Note [padding without a mask_mod check] in modules.py).
        positions = self.positions.to(q.device)
        if not finite_padding:
            q, k, v = _zero_padding(q, k, v, layout.first_key, self.q_len, positions)
        keep = _valid_queries(self.q_len, layout.first_key, q.device)[:, positions, None]  # [B, L, 1]
        return torch.where(keep[:, None], self._allgather(q, k, v, rounds), 0.0)  # [B, Hq, L, Dv]

    # ------------------------------------------------------------------------------- Ulysses

    def _ulysses(self, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor, layout: Layout,
                 finite_padding: bool) -> Tensor:
        qh = self._seq_to_heads(q, 1)  # [B, Hq/P, Q_LEN, D]
        kh = self._seq_to_heads(k, self.max_rounds)  # [B, Hkv/P, Q_LEN * max_rounds, D]
        vh = self._seq_to_heads(v, self.max_rounds)
        out = self.local._attend(qh, kh, vh, rounds, layout, finite_padding=finite_padding)  # [B, Hq/P, Q_LEN, Dv]
        return self._heads_to_seq(out)

    def _seq_to_heads(self, x: Tensor, rounds: int) -> Tensor:
        """``[B, H, R * L, D]`` sequence shard -> ``[B, H / P, R * Q_LEN, D]`` head shard, global
        position order."""
        P, L = self.world_size, self.local_len
        B, H, _, D = x.shape
        send = x.reshape(B, P, H // P, rounds, L, D).transpose(0, 1).contiguous()  # [P, B, H/P, R, L, D]
        recv = funcol.all_to_all_single_autograd(send, None, None, self.group)  # [P(src), B, H/P, R, L, D]
        n_local = len(_rank_chunks(P, 0, self.shard_order))
        recv = recv.view(P, B, H // P, rounds, n_local, L // n_local, D)  # [P, B, H/P, R, nl, C, D]
        pieces = [recv[p, :, :, :, j] for p, j in _global_order(P, self.shard_order)]  # each [B, H/P, R, C, D]
        return torch.stack(pieces, dim=3).reshape(B, H // P, rounds * self.q_len, D)  # [B, H/P, R * Q_LEN, D]

    def _heads_to_seq(self, x: Tensor) -> Tensor:
        """``[B, H / P, Q_LEN, D]`` head shard (global order) -> ``[B, H, L, D]`` sequence shard."""
        P, L = self.world_size, self.local_len
        B, Hp, _, D = x.shape
        n_local = len(_rank_chunks(P, 0, self.shard_order))
        chunks = x.view(B, Hp, _num_chunks(P, self.shard_order), L // n_local, D)  # [B, H/P, n, C, D]
        pieces = [chunks[:, :, c] for p in range(P) for c in _rank_chunks(P, p, self.shard_order)]
        send = torch.stack(pieces).view(P, n_local, B, Hp, L // n_local, D)  # [P(dst), nl, B, H/P, C, D]
        recv = funcol.all_to_all_single_autograd(send, None, None, self.group)  # [P(src), nl, B, H/P, C, D]
        return recv.permute(2, 0, 3, 1, 4, 5).reshape(B, P * Hp, L, D)  # [B, H, L, D]

    # ----------------------------------------------------------------------------- all-gather

    def _allgather(self, q: Tensor, k: Tensor, v: Tensor, rounds: Tensor) -> Tensor:
        P, L = self.world_size, self.local_len
        B, Hkv, _, D = k.shape
        n_local = len(_rank_chunks(P, 0, self.shard_order))
        C = L // n_local
        kv0 = torch.stack([k[:, :, :L], v[:, :, :L]])  # round 0: [2, B, Hkv, L, D]
        gathered = _all_gather_autograd(kv0, 0, self.group)  # [P * 2, B, Hkv, L, D]
        gathered = gathered.view(P, 2, B, Hkv, n_local, C, D)  # [P, 2, B, Hkv, nl, C, D]
        pieces = [gathered[p, :, :, :, j] for p, j in _global_order(P, self.shard_order)]  # each [2, B, Hkv, C, D]
        kv_full = torch.stack(pieces, dim=3).view(2, B, Hkv, self.q_len, D)  # [2, B, Hkv, Q_LEN, D]
        k_full, v_full = kv_full[0], kv_full[1]  # [B, Hkv, Q_LEN, D]: round 0 of every rank
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        out_s, lse_s = suffix_attention(q, k[:, :, L:], v[:, :, L:], rounds, scale)  # the local suffix rounds
        outs = []
        for i, g in enumerate(_rank_chunks(P, self.rank, self.shard_order)):
            # Local chunk i is global chunk g: its causal keys are the diagonal block (causal) and
            # the prefix of every chunk before it (all attended), merged by log-sum-exp with its
            # suffix part; the prefix, the largest call, last, so its kernel sees dO itself (Note
            # [the suffix first] in _causal.py). Both read the gathered keys, the diagonal block
            # too (Note [every rank's reduce-scatter depends on dO]).
            rows = slice(i * C, (i + 1) * C)
            q_i = q[:, :, rows]  # [B, Hq, C, D]
            diag = slice(g * C, (g + 1) * C)
            part = causal_attention(q_i, k_full[:, :, diag], v_full[:, :, diag], scale=scale,
                                    part=(out_s[:, :, rows], lse_s[:, :, rows]))
            if g > 0:
                part = causal_attention(q_i, k_full[:, :, : g * C], v_full[:, :, : g * C], scale=scale,
                                        causal=False, part=part)
            outs.append(part[0])
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [B, Hq, L, Dv]
