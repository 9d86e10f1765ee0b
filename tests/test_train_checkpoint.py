"""Checkpoints (compiled_mask/draft/checkpoint.py) and the trainer's state: atomic writes, a
damaged latest checkpoint refused with the earlier one named and kept, and a resumed Trainer
continuing bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_target import one_thread  # noqa: E402, F401 (fixture)

from compiled_mask.draft import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model
from compiled_mask.draft import checkpoint as ckpt
from compiled_mask.draft.trainer import Batch, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_save_load_and_keep(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))}, meta={"run": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000030"
    state, meta = ckpt.load_checkpoint(tmp_path)
    assert state["w"].tolist() == [30.0] * 3 and meta == {"run": 30}
    state, _ = ckpt.load_checkpoint(tmp_path / "step-00000020")
    assert state["w"].tolist() == [20.0] * 3


def test_a_save_killed_midway_leaves_the_earlier_checkpoint_latest(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(4)})

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as a kill during the write

    monkeypatch.setattr(ckpt.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(4)})
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    state, _ = ckpt.load_checkpoint(tmp_path)
    assert state["w"].tolist() == [1.0] * 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_a_damaged_latest_checkpoint_is_refused_and_the_earlier_one_kept(tmp_path, damage):
    ckpt.save_checkpoint(tmp_path, 5, {"w": torch.arange(100.0)})
    ckpt.save_checkpoint(tmp_path, 10, {"w": torch.arange(100.0) * 2})
    state_path = tmp_path / "step-00000010" / "state.pt"
    data = state_path.read_bytes()
    if damage == "truncate":
        state_path.write_bytes(data[: len(data) // 2])
        reason = "state.pt has .* bytes, meta.json says .* \\(truncated\\)"
    elif damage == "flip":
        state_path.write_bytes(data[:-20] + bytes(b ^ 1 for b in data[-20:]))
        reason = "state.pt.s SHA-256 differs from meta.json.s \\(damaged on disk\\)"
    else:
        (tmp_path / "step-00000010" / "meta.json").write_text("{")
        reason = "meta.json is missing or damaged \\(JSONDecodeError\\)"
    earlier = tmp_path / "step-00000005"
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {tmp_path}/step-00000010 cannot be resumed: "
                       rf"{reason}\. The earlier checkpoint {earlier} is intact and was kept: resume from "
                       rf"it with --resume {earlier}"):
        ckpt.load_checkpoint(tmp_path)
    assert earlier.is_dir() and (tmp_path / "step-00000010").is_dir()  # nothing deleted
    state, _ = ckpt.load_checkpoint(earlier)
    assert torch.equal(state["w"], torch.arange(100.0))


class _Batches:
    """Random micro-batches, a pure function of the index (as OnlineBatches)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def get(self, index):
        g = torch.Generator().manual_seed(index)
        ids = torch.randint(self.cfg.vocab_size, (2, 16), generator=g)
        hidden = torch.randn(2, 16, 3 * self.cfg.hidden_size, generator=g)
        target = torch.softmax(torch.randn(2, 16, self.cfg.draft_vocab_size, generator=g) * 3, -1)
        return Batch(ids, hidden, target, torch.ones(2, 16, dtype=torch.bool))


def _trainer(dtype):
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                            vocab_size=50, draft_vocab_size=20, rope_theta=10000.0)
    draft = Eagle3DraftModel(cfg)
    draft.freeze_embedding()
    model = Eagle3Model(draft, q_len=16, length=2).to(dtype)
    return Trainer(model, _Batches(cfg), TrainConfig(steps=6, lr=1e-2, warmup=2, accumulation=2, compiler="none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_resumed_trainer_continues_bit_for_bit(tmp_path, dtype):
    straight = _trainer(dtype)
    losses = [straight.train_step().loss for _ in range(6)]
    first = _trainer(dtype)
    for _ in range(3):
        first.train_step()
    ckpt.save_checkpoint(tmp_path, first.step, first.state_dict())
    torch.manual_seed(123)  # a new process: other random state, other initial weights
    resumed = _trainer(dtype)
    state, _ = ckpt.load_checkpoint(tmp_path)
    resumed.load_state_dict(state)
    assert resumed.step == 3
    assert [resumed.train_step().loss for _ in range(3)] == losses[3:]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    if dtype == torch.bfloat16:  # Note [master weights]: the float32 copies came back too
        assert all(m.dtype == torch.float32 for m in resumed.optimizer.master)
