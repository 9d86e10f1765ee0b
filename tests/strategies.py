"""Hypothesis strategies shared by the fuzz tests: layouts, integer dtypes, strided views.

Every tensor a user may pass comes in many forms of the same values: any integer dtype, and any
strides (a column of a wider tensor, a transposed copy, a storage offset). The library must give
the same, exact answer for each.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

# Every integer dtype the API takes (uint64 is refused: Note [widen rounds first] in _checks.py).
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64)
STRIDES = ("contiguous", "step", "transposed", "offset")


def with_strides(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of ``t`` in a tensor of other strides (same shape, dtype and device)."""
    if kind == "step":  # every other element of a wider last dim
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1]) if t.dim() else t.new_zeros(2)
        wide[..., ::2] = t
        return wide[..., ::2] if t.dim() else wide[0]
    if kind == "transposed" and t.dim() >= 2:  # column-major storage
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "offset":  # a view that starts three elements into its storage
        flat = t.new_zeros(t.numel() + 3)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    return t.clone()


def as_int_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (ints, nested lists) as ``dtype``, wrapping like a cast of int64 does."""
    return torch.tensor(values, dtype=torch.int64).to(dtype)


@st.composite
def doc_rows(draw, B: int, Q_LEN: int) -> list[list[int]]:
    """``[B][Q_LEN]`` document ids: runs of ids from a small alphabet, so a document id comes back
    after another (0,0,1,1,0,0 is three documents) and -1 runs fall anywhere, also inside one."""
    # Mostly documents, or mostly padding with a few short documents (the block rule's counts of
    # valid queries then decide alone whether a block is listed).
    ids = draw(st.sampled_from([(-1, 0, 0, 1, 1, 2, 7), (-1,) * 8 + (0, 1)]))
    rows = []
    for _ in range(B):
        row = []
        while len(row) < Q_LEN:
            n = draw(st.integers(1, max(1, Q_LEN // draw(st.sampled_from([1, 2, 4, 16, 64])))))
            row += [draw(st.sampled_from(ids))] * n
        rows.append(row[:Q_LEN])
    return rows


@st.composite
def layouts(draw, B: int, Q_LEN: int, *, need_one: bool = False):
    """``(seq_lens, doc_ids)``: each None or a tensor of any integer dtype and strides; at least
    one of them with ``need_one``. Lengths run past [0, Q_LEN] on both sides."""
    seq_lens = doc_ids = None
    kinds = ("lens", "docs", "both") if need_one else ("none", "lens", "docs", "both")
    kind = draw(st.sampled_from(kinds))
    if kind in ("lens", "both"):
        values = draw(st.lists(st.integers(-2, Q_LEN + 2), min_size=B, max_size=B))
        seq_lens = with_strides(as_int_tensor(values, draw(st.sampled_from(INT_DTYPES))),
                                draw(st.sampled_from(STRIDES)))
    if kind in ("docs", "both"):
        dtype = draw(st.sampled_from(INT_DTYPES))
        doc_ids = with_strides(as_int_tensor(draw(doc_rows(B, Q_LEN)), dtype), draw(st.sampled_from(STRIDES)))
    return seq_lens, doc_ids


def python_allowed(Q_LEN: int, KV_LEN: int, seq_lens=None, doc_ids=None, B: int = 1) -> torch.Tensor:
    """The Eagle3 mask with a layout, straight from its definition in plain Python loops
    (DESIGN.md, "Per-sample layouts"): ``[B, 1, Q_LEN, KV_LEN]`` bool.

    A document is a maximal run of equal ids, -1 is padding, positions at or past seq_lens[b]
    are padding; query q attends causal key kv (kv <= q) iff both are valid and in one document,
    and its suffix key kv = q + s * Q_LEN iff q is valid.
    """
    lens = None if seq_lens is None else seq_lens.tolist()
    docs = None if doc_ids is None else doc_ids.tolist()
    allowed = torch.zeros(B, 1, Q_LEN, KV_LEN, dtype=torch.bool)
    for b in range(B):
        def valid(p):
            return (lens is None or p < lens[b]) and (docs is None or docs[b][p] != -1)

        def same_document(p, q):  # p <= q: no change of id between them
            return docs is None or all(docs[b][i] == docs[b][q] for i in range(p, q + 1))

        for q in range(Q_LEN):
            if not valid(q):
                continue
            for kv in range(KV_LEN):
                if kv < Q_LEN:
                    allowed[b, 0, q, kv] = kv <= q and valid(kv) and same_document(kv, q)
                else:
                    allowed[b, 0, q, kv] = (kv - q) % Q_LEN == 0
    return allowed
