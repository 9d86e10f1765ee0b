"""Training checkpoints: written atomically, verified on load, the latest one named by a pointer.

Layout of a checkpoint directory ``ROOT``::

    ROOT/step-00000100/state.pt      the Trainer's state (weights, optimizer, schedule, step, RNG)
    ROOT/step-00000100/meta.json     step, the run's settings, and state.pt's size and SHA-256
    ROOT/latest                      one line: the name of the newest complete checkpoint

Note [atomic checkpoints]
    A checkpoint is written into a hidden temporary directory next to its final place, flushed
    to disk, and renamed into place (a rename within a directory is atomic on POSIX); only then
    is ``latest`` replaced, by writing ``latest.tmp`` and ``os.replace``-ing it. A run killed at
    any moment therefore leaves ``latest`` naming a complete checkpoint (or no ``latest`` at
    all), never a half-written one. Older checkpoints beyond ``keep`` are deleted only after the
    new one is in place, so the previous one is always there when the newest turns out damaged
    (a disk error after the write): :func:`load_checkpoint` checks the size and hash from
    ``meta.json`` and, on a mismatch, raises :class:`CheckpointError` naming the intact earlier
    checkpoint to resume from. Nothing is deleted on a failed load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints"]

_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it, the reason, and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoint directories under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], *, meta: dict[str, Any] | None = None,
                    keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root`` and point ``latest`` at it
    (Note [atomic checkpoints]).

    Args:
        root: the checkpoint directory (created if needed).
        step: the optimizer steps done (names the checkpoint).
        state: what to save (``Trainer.state_dict()``), written with ``torch.save``.
        meta: JSON-able settings of the run, stored beside it (checked on resume by the caller).
        keep: how many of the newest checkpoints to keep (at least 1).

    Returns:
        The checkpoint's directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state_path = tmp / "state.pt"
    with state_path.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    info = {"step": step, "state_bytes": state_path.stat().st_size, "state_sha256": _sha256(state_path),
            "meta": meta or {}}
    with (tmp / "meta.json").open("w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again (a resumed run): the new one replaces it
        old = root / f".{name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    pointer = root / "latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    for old in list_checkpoints(root)[: -max(1, keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not name.startswith(_PREFIX):
        raise CheckpointError(f"{pointer} is damaged (it holds {name[:40]!r}, not a checkpoint name); "
                              f"resume from one of {[p.name for p in list_checkpoints(root)]} with "
                              f"--resume {root}/<name>.")
    return root / name


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load and verify a checkpoint.

    Args:
        path: a checkpoint directory (``ROOT/step-00000100``), or a checkpoint root, meaning the
            one ``ROOT/latest`` names.

    Returns:
        ``(state, meta)``: what :func:`save_checkpoint` was given.

    Raises:
        CheckpointError: missing, truncated or damaged (size or SHA-256 differs from meta.json,
            or it does not load); the message names the newest intact earlier checkpoint.
    """
    path = Path(path)
    if (path / "latest").exists() or (path.is_dir() and not (path / "meta.json").exists()
                                      and list_checkpoints(path)):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} has checkpoints but no 'latest' pointer; resume from one "
                                  f"of them: {[p.name for p in list_checkpoints(path)]}.")
        path = found
    root = path.parent

    def fail(reason: str) -> CheckpointError:
        earlier = [p for p in list_checkpoints(root) if p != path and _intact(p)]
        hint = (f" The earlier checkpoint {earlier[-1]} is intact and was kept: resume from it with "
                f"--resume {earlier[-1]}." if earlier else " No earlier checkpoint is intact; start the "
                "run again without --resume.")
        return CheckpointError(f"checkpoint {path} cannot be resumed: {reason}.{hint}")

    if not path.is_dir():
        raise fail("it does not exist")
    try:
        info = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise fail(f"meta.json is missing or damaged ({e.__class__.__name__})") from None
    state_path = path / "state.pt"
    if not state_path.is_file():
        raise fail("state.pt is missing")
    size = state_path.stat().st_size
    if size != info.get("state_bytes"):
        raise fail(f"state.pt has {size} bytes, meta.json says {info.get('state_bytes')} (truncated)")
    if _sha256(state_path) != info.get("state_sha256"):
        raise fail("state.pt's SHA-256 differs from meta.json's (damaged on disk)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise fail(f"state.pt does not load ({e.__class__.__name__}: {str(e)[:120]})") from None
    return state, info.get("meta", {})


def _intact(path: Path) -> bool:
    try:
        info = json.loads((path / "meta.json").read_text())
        state_path = path / "state.pt"
        return state_path.stat().st_size == info.get("state_bytes") and _sha256(state_path) == info.get("state_sha256")
    except (OSError, ValueError):
        return False
