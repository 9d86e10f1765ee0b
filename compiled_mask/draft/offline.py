"""Offline training: the target's features of every packed row, precomputed to safetensors shards.

:func:`write_features` runs the target once over all rows and stores, per row, what the
training step needs from it: the auxiliary hidden states ``[T, 3H]`` and the last hidden state
``[T, H]`` (the compact form of the target distribution: with the lm_head rows of the draft
vocabulary, stored once in ``head.safetensors``, it gives the ``[T, draft_vocab]`` probabilities
at training time, ~8x smaller on disk than storing them for Llama 3). Training then reads rows
from disk (:class:`OfflineBatches`) without the target: for several epochs, the target runs
once instead of once per epoch, and the target's memory is free for the draft.

Layout of a features directory::

    index.json                 q_len, rows, the shards, and a fingerprint of what was computed
    head.safetensors           weight [draft_vocab, H] (lm_head rows), draft_to_target [draft_vocab]
    shard-00000.safetensors    hidden_states [R, T, 3H], last_hidden [R, T, H], input_ids,
                               loss_mask, doc_ids [R, T]; loss_mask is the counted mask
                               (``counted_positions``: the layout's mask where the target's
                               top token lies in the draft vocabulary)

A directory whose ``index.json`` fingerprint matches is reused as it is (a resumed offline run
does not recompute); the shards are written before ``index.json``, so an interrupted write is
never mistaken for a finished one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compiled_mask.draft.batches import batch_rows, make_batch
from compiled_mask.draft.data import Document, row_layout
from compiled_mask.draft.target import TargetModel, counted_positions
from compiled_mask.draft.trainer import Batch

__all__ = ["write_features", "OfflineBatches"]


def _st() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError:  # pragma: no cover
        raise ImportError("offline features need safetensors: pip install 'compiled-mask[train]'") from None
    return safetensors


def write_features(out_dir: str | Path, target: TargetModel, docs: Sequence[Document],
                   rows: Sequence[Sequence[int]], draft_to_target: Tensor, q_len: int, *,
                   fingerprint: dict[str, Any], rows_per_shard: int = 256,
                   say: Callable[[str], None] = lambda s: None) -> Path:
    """Compute and store the target's features of every row (skipped when already there).

    Args:
        out_dir: the features directory.
        target: the target model.
        docs, rows: the tokenized conversations and their packing (``pack_documents``).
        draft_to_target: ``[draft_vocab]`` the draft vocabulary's target ids.
        q_len: positions per row.
        fingerprint: JSON-able description of the inputs (data file, target, layers, q_len,
            vocabulary); a directory made from other inputs is recomputed.
        rows_per_shard: rows per shard file.
        say: progress messages.

    Returns:
        ``out_dir``.
    """
    st = _st()
    out = Path(out_dir)
    index_path = out / "index.json"
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except ValueError:
            index = {}
        if index.get("fingerprint") == fingerprint and index.get("rows") == len(rows):
            say(f"offline features: reusing {out} ({len(rows)} rows)")
            return out
        index_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    head = target.head_rows(draft_to_target).detach().to("cpu").contiguous()
    st.torch.save_file({"weight": head, "draft_to_target": draft_to_target.to(torch.int64).cpu().contiguous()},
                       str(out / "head.safetensors"))
    shards = []
    for s, r0 in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[r0 : r0 + rows_per_shard]
        row_docs = [[docs[d] for d in row] for row in chunk]
        layouts = [row_layout(ds, q_len) for ds in row_docs]
        hidden, last, top = target.rows(row_docs, layouts, q_len)
        tensors = {"hidden_states": hidden.cpu().contiguous(), "last_hidden": last.cpu().contiguous()}
        for key in ("input_ids", "loss_mask", "doc_ids"):
            tensors[key] = torch.stack([lay[key] for lay in layouts]).contiguous()
        # The positions that count, as OnlineBatches computes them (Note [the target's top token
        # outside the draft vocabulary] in target.py).
        tensors["loss_mask"] = counted_positions(tensors["loss_mask"], top, draft_to_target).cpu().contiguous()
        name = f"shard-{s:05d}.safetensors"
        st.torch.save_file(tensors, str(out / name))
        shards.append({"file": name, "rows": len(chunk)})
        say(f"offline features: {r0 + len(chunk)}/{len(rows)} rows")
    index = {"q_len": q_len, "rows": len(rows), "shards": shards, "fingerprint": fingerprint,
             "hidden_size": target.hidden_size, "dtype": str(target.dtype).removeprefix("torch.")}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(index_path)
    return out


class OfflineBatches:
    """Micro-batches read from :func:`write_features`' directory, in the same row order as
    :class:`~compiled_mask.draft.batches.OnlineBatches` (same seed, same rows: same batches).

    Args:
        features_dir: the directory.
        batch: rows per micro-batch.
        dtype: the draft's parameter dtype.
        device: where the batches go.
        seed: the row shuffle's seed.
        packed: several documents per row (``doc_ids``), or one (``seq_lens``).
    """

    def __init__(self, features_dir: str | Path, batch: int, dtype: torch.dtype,
                 device: str | torch.device, seed: int = 0, packed: bool = True) -> None:
        self.dir = Path(features_dir)
        index_path = self.dir / "index.json"
        if not index_path.exists():
            raise ValueError(f"{self.dir}: no index.json; run write_features first (train.py --offline).")
        self.index = json.loads(index_path.read_text())
        self.q_len, self.batch, self.dtype, self.seed, self.packed = (
            self.index["q_len"], batch, dtype, seed, packed)
        self.device = torch.device(device)
        head = _st().torch.load_file(str(self.dir / "head.safetensors"))
        self.head_weight = head["weight"].to(self.device)
        self.where: list[tuple[str, int]] = []
        for shard in self.index["shards"]:
            self.where += [(shard["file"], i) for i in range(shard["rows"])]
        self._open: dict[str, Any] = {}

    def _row(self, r: int) -> dict[str, Tensor]:
        file, i = self.where[r]
        if file not in self._open:
            self._open[file] = _st().safe_open(str(self.dir / file), framework="pt")
        f = self._open[file]
        return {k: f.get_slice(k)[i : i + 1] for k in ("hidden_states", "last_hidden", "input_ids",
                                                         "loss_mask", "doc_ids")}

    def get(self, index: int) -> Batch:
        rows = [self._row(r) for r in batch_rows(index, self.batch, len(self.where), self.seed)]
        cat = lambda key: torch.cat([row[key] for row in rows])  # noqa: E731
        return make_batch(cat("input_ids"), cat("hidden_states").to(self.device), cat("last_hidden"),
                          cat("loss_mask"), cat("doc_ids"), self.head_weight, self.dtype, self.packed)
